//! Queue groups: the device's queues split into groups, each served in its own context (one
//! group with every queue on the main loop or one iothread; one group per iothread with
//! `iothread-vq-mapping`, see `mapping.rs`). A group owns what its queues' requests touch: the
//! queues and their notification eventfds, the in-flight table, the segment pool, the requests
//! kept for a retry, and an I/O engine ([`Aio`]: worker pool, io_uring ring, completion eventfd)
//! whose completions its context reaps, as QEMU gives each `AioContext` its own thread pool.
//!
//! Locking: a group's state is behind a mutex taken only with the group's context held, so it
//! is never contended, and a request takes exactly that one lock. What the groups share is read
//! or set without a lock: the negotiated features, `broken` and `quiescing` (atomics of the
//! device), statistics, stages and the I/O status (atomics of their own), and the image
//! (thread-safe: the block layer serves several threads at once). Whatever involves every group
//! (activation, reset, drain, [`super::Block::with_drained_io`]) holds every group's context,
//! taken in lock order ([`crate::context::in_lock_order`]).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use block::aio::{Aio, AioError};
use block::DiskImage;

use super::device::Active;
use crate::context::Context;

/// Queues served in one context, with the I/O engine their requests go to (see the module
/// documentation).
pub(super) struct Group {
    pub ctx: Arc<Context>,
    pub aio: Aio,
    /// The device's indices of the group's queues, ascending.
    pub queues: Vec<usize>,
    active: Mutex<Option<Active>>,
}

impl Group {
    /// A group of `queues` (the device's indices, ascending) served in `ctx` by `aio`.
    pub(super) fn new(ctx: Arc<Context>, aio: Aio, queues: Vec<usize>) -> Self {
        Group {
            ctx,
            aio,
            queues,
            active: Mutex::new(None),
        }
    }

    /// The place of the device's queue `queue` among the group's, if the group serves it.
    pub(super) fn slot_of(&self, queue: usize) -> Option<usize> {
        self.queues.binary_search(&queue).ok()
    }

    /// The group's state; the caller holds the group's context.
    pub(super) fn active(&self) -> MutexGuard<'_, Option<Active>> {
        debug_assert!(
            self.ctx.held_by_current_thread(),
            "virtio-blk state touched without its context"
        );
        // Only taken with the context held, by code that does not panic while holding it.
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a queue is served: its group and its place among the group's queues.
#[derive(Debug, Clone, Copy)]
pub(super) struct Home {
    pub group: usize,
    pub slot: usize,
}

/// The I/O engines of a drained device ([`super::Block::with_drained_io`]), one per queue group, all
/// on the same image.
pub struct Engines<'a>(pub(super) &'a [Group]);

impl std::fmt::Debug for Engines<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("groups", &self.0.len())
            .finish()
    }
}

impl Engines<'_> {
    /// Switches every engine to `image` and returns the one they ran before; if one refuses,
    /// those already switched go back, so all keep the same image.
    pub fn replace_image(&self, image: Arc<dyn DiskImage>) -> Result<Arc<dyn DiskImage>, AioError> {
        // A device has at least one group (`Block::with_groups` refuses none).
        let (first, rest) = self.0.split_at(1);
        let old = first[0].aio.replace_image(Arc::clone(&image))?;
        for (index, group) in rest.iter().enumerate() {
            if let Err(e) = group.aio.replace_image(Arc::clone(&image)) {
                for done in &self.0[..=index] {
                    if let Err(back) = done.aio.replace_image(Arc::clone(&old)) {
                        log::error!("cannot switch an I/O engine back to its image: {back}");
                    }
                }
                return Err(e);
            }
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_util::*;
    use super::super::{request_type as t, status as st, BlockConfig, ErrorSink};
    use crate::context::IoThread;
    use crate::virtio::VirtioDevice;

    /// A 512-byte read of sector 0 on queue `q`, head `head`, with the header, buffer and status
    /// of its own (per queue).
    fn read_on(rig: &Rig, q: u16, head: u16) {
        let hdr = HDR + 0x20 * u64::from(q);
        rig.header(hdr, t::IN, 0);
        rig.submit(
            q,
            head,
            &[
                (hdr, 16, 0),
                (BUF + 0x1000 * u64::from(q), 512, F_WRITE),
                (STATUS + u64::from(q), 1, F_WRITE),
            ],
        );
    }

    /// Two iothreads serve a four-queue disk, queues 0 and 2 on the first, 1 and 3 on the
    /// second (the round-robin mapping): each queue's requests complete on its own iothread
    /// (the thread that answers a failed read, as the error sink sees it), and while a thread
    /// holds the first iothread's context its queues wait and the others do not.
    #[test]
    fn each_queue_is_served_by_its_own_iothread() {
        let a = IoThread::spawn("io-vq-a").unwrap();
        let b = IoThread::spawn("io-vq-b").unwrap();
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = std::sync::Arc::clone(&heard);
        let sink = ErrorSink(std::sync::Arc::new(move |_| {
            let name = std::thread::current().name().map(str::to_owned);
            h.lock().unwrap().push(name.unwrap_or_default());
        }));
        let config = BlockConfig {
            id: "d0".into(),
            num_queues: 4,
            queue_size: QSIZE,
            io_workers: block::aio::Workers::fixed(2),
            error_sink: Some(sink),
            ..BlockConfig::default()
        };
        let groups = vec![
            (a.context().clone(), vec![0, 2]),
            (b.context().clone(), vec![1, 3]),
        ];
        let rig = Rig::with_groups(groups, MemImage::new(1 << 16, false), config);
        assert_eq!(rig.dev.queue_contexts(), ["io-vq-a", "io-vq-b"].repeat(2));
        assert_eq!(rig.dev.contexts().len(), 2);
        rig.start(!0);
        rig.image.fail_reads.store(true, Ordering::SeqCst);
        for q in 0..4u16 {
            read_on(&rig, q, 0);
            rig.wait_used(q, 1);
            assert_eq!(rig.byte(STATUS + u64::from(q)), st::IOERR, "queue {q}");
        }
        let want = ["io-vq-a", "io-vq-b", "io-vq-a", "io-vq-b"];
        assert_eq!(*heard.lock().unwrap(), want);
        rig.image.fail_reads.store(false, Ordering::SeqCst);
        {
            let _held = a.context().acquire();
            read_on(&rig, 0, 3);
            read_on(&rig, 1, 3);
            rig.wait_used(1, 2);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(rig.used_idx(0), 1, "queue 0 waits for its iothread");
        }
        rig.wait_used(0, 2);
        assert_eq!(rig.dev.stats().snapshot().rd.operations, 2);
        // Reset drains and stops both groups; the device starts again.
        rig.set_reg(0x70, 0);
        assert_eq!(rig.reg(0x70), 0);
        rig.dev.shutdown().unwrap();
        drop(rig);
        a.stop().unwrap();
        b.stop().unwrap();
    }

    /// Whatever order a mapping lists its iothreads in, the device takes their contexts in
    /// creation order, so two disks sharing iothreads cannot wait for each other.
    #[test]
    fn contexts_are_taken_in_creation_order_whatever_the_mapping_order() {
        let a = IoThread::spawn("io-order-a").unwrap();
        let b = IoThread::spawn("io-order-b").unwrap();
        let rig = |first: &IoThread, second: &IoThread| {
            let config = BlockConfig {
                num_queues: 2,
                queue_size: QSIZE,
                ..BlockConfig::default()
            };
            let groups = vec![
                (first.context().clone(), vec![0]),
                (second.context().clone(), vec![1]),
            ];
            std::sync::Arc::new(Rig::with_groups(
                groups,
                MemImage::new(1 << 16, false),
                config,
            ))
        };
        let (ab, ba) = (rig(&a, &b), rig(&b, &a));
        let names = |r: &Rig| {
            r.dev
                .contexts()
                .iter()
                .map(|c| c.name().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&ab), ["io-order-a", "io-order-b"]);
        assert_eq!(names(&ba), names(&ab));
        // Resets of both, again and again from two threads: each takes both contexts.
        let resets: Vec<_> = [ab, ba]
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        r.start(!0);
                        r.set_reg(0x70, 0);
                    }
                    r.dev.shutdown().unwrap();
                })
            })
            .collect();
        for r in resets {
            r.join().unwrap();
        }
        a.stop().unwrap();
        b.stop().unwrap();
    }

    /// Four queues on two iothreads write 64 KiB blocks over the same 512 KiB of a qcow2 image
    /// at once (each queue from a thread of its own, with a byte of its own), allocating the
    /// same clusters from both iothreads' engines: every write succeeds, `qemu-img check` finds
    /// the image clean, and every 4 KiB of it holds one queue's byte whole.
    #[test]
    fn queues_on_two_iothreads_write_over_each_other_into_one_qcow2_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        let o = block::qcow2::create::CreateOptions {
            size: 1 << 20,
            cluster_size: 65536,
            ..Default::default()
        };
        block::create(&path, block::Format::Qcow2, &o).unwrap();
        let opts = block::OpenOptions {
            format: Some(block::Format::Qcow2),
            read_only: false,
            ..Default::default()
        };
        let image = std::sync::Arc::new(block::open(&path, opts).unwrap());
        let a = IoThread::spawn("io-mix-a").unwrap();
        let b = IoThread::spawn("io-mix-b").unwrap();
        let config = BlockConfig {
            id: "d0".into(),
            num_queues: 4,
            queue_size: QSIZE,
            io_workers: block::aio::Workers::fixed(2),
            ..BlockConfig::default()
        };
        let groups = vec![
            (a.context().clone(), vec![0, 2]),
            (b.context().clone(), vec![1, 3]),
        ];
        let rig = std::sync::Arc::new(Rig::with_groups(groups, image, config));
        rig.start(!0);
        const WRITES: u16 = 64;
        let writers: Vec<_> = (0..4u16)
            .map(|q| {
                let rig = std::sync::Arc::clone(&rig);
                std::thread::spawn(move || {
                    let (hdr, buf) = (HDR + 0x20 * u64::from(q), BUF + 0x10000 * u64::from(q));
                    let status = STATUS + u64::from(q);
                    let byte = 0x11 * u8::try_from(q + 1).unwrap();
                    rig.mem
                        .write_slice(&[byte; 65536], GuestAddress(buf))
                        .unwrap();
                    for i in 0..WRITES {
                        // Blocks 0..8 in an order of the queue's own: each cluster is written
                        // by every queue, often at the same time.
                        let block = (u64::from(i) * 3 + u64::from(q)) % 8;
                        rig.header(hdr, t::OUT, block * 128);
                        let head = (i % 5) * 3;
                        rig.submit(
                            q,
                            head,
                            &[(hdr, 16, 0), (buf, 65536, 0), (status, 1, F_WRITE)],
                        );
                        rig.wait_used(q, i + 1);
                        assert_eq!(rig.byte(status), st::OK, "queue {q} write {i}");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(
            rig.dev.stats().snapshot().wr.operations,
            4 * u64::from(WRITES)
        );
        rig.dev.shutdown().unwrap();
        drop(rig);
        a.stop().unwrap();
        b.stop().unwrap();
        let check = std::process::Command::new("qemu-img")
            .args(["check", path.to_str().unwrap()])
            .output()
            .unwrap_or_else(|e| panic!("qemu-img is needed (ci/setup installs it): {e}"));
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let raw = dir.path().join("disk.raw");
        let convert = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw", path.to_str().unwrap()])
            .arg(&raw)
            .status()
            .unwrap();
        assert!(convert.success());
        let data = std::fs::read(&raw).unwrap();
        let bytes = [0x11, 0x22, 0x33, 0x44];
        for (i, piece) in data[..8 * 65536].chunks(4096).enumerate() {
            assert!(
                bytes.contains(&piece[0]) && piece.iter().all(|&x| x == piece[0]),
                "4 KiB block {i} is not one queue's write"
            );
        }
        assert!(data[8 * 65536..].iter().all(|&x| x == 0));
    }
}
