//! Test support: an in-memory disk image, and a driver that sets a device up through the
//! virtio-mmio transport and places descriptor chains in real guest memory (virtio-queue's
//! `MockSplitQueue` lays the rings out).

#![allow(clippy::unwrap_used, missing_debug_implementations)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use block::{BlockStatus, DiskImage};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::context::Context;
use crate::virtio::{features as common, status, GuestMemoryMmap, MmioTransport, VirtioDevice};

use super::{request_type, Block, BlockConfig};

/// `VRING_DESC_F_NEXT`, `VRING_DESC_F_WRITE`, `VRING_DESC_F_INDIRECT` (virtio 1.2, 2.7.5).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Queue size the tests use.
pub const QSIZE: u16 = 16;
/// Guest memory size.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where data buffers start.
pub const DATA: u64 = 0x10_0000;
/// Where the tests put request headers.
pub const HDR: u64 = DATA;
/// Where the tests put status bytes.
pub const STATUS: u64 = DATA + 0x100;
/// Where the tests put data.
pub const BUF: u64 = DATA + 0x1000;

/// A device on a fresh main-loop context (run by the test thread) with one queue and
/// `discard=unmap`.
pub fn main_loop_rig(size: usize, read_only: bool) -> Rig {
    Rig::new(
        Context::new("main-loop").unwrap(),
        MemImage::new(size, read_only),
        1,
        true,
    )
}

/// An iothread named `name` and a started device on it with a `size`-byte image in memory.
pub fn iothread_rig(name: &str, size: usize) -> (crate::context::IoThread, Rig) {
    let io = crate::context::IoThread::spawn(name).unwrap();
    let rig = Rig::new(io.context().clone(), MemImage::new(size, false), 1, false);
    rig.start(!0);
    (io, rig)
}

/// A `size`-byte raw image file in `dir`, opened read-write through the block crate.
pub fn raw_image(dir: &tempfile::TempDir, size: u64) -> Arc<block::Image> {
    let path = dir.path().join("disk.raw");
    let o = block::qcow2::create::CreateOptions {
        size,
        ..Default::default()
    };
    block::create(&path, block::Format::Raw, &o).unwrap();
    let opts = block::OpenOptions {
        format: Some(block::Format::Raw),
        read_only: false,
        ..Default::default()
    };
    Arc::new(block::open(&path, opts).unwrap())
}

/// A disk image in memory, with a gate that can hold reads back.
#[derive(Debug)]
pub struct MemImage {
    pub data: Mutex<Vec<u8>>,
    pub read_only: bool,
    pub fail_reads: std::sync::atomic::AtomicBool,
    /// Reads that entered `read_at`.
    pub reads_started: std::sync::atomic::AtomicUsize,
    pub gate: Mutex<bool>,
    pub gate_cond: Condvar,
}

impl MemImage {
    pub fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(MemImage {
            data: Mutex::new(vec![0; size]),
            read_only,
            fail_reads: Default::default(),
            reads_started: Default::default(),
            gate: Mutex::new(true),
            gate_cond: Condvar::new(),
        })
    }

    pub fn set_gate(&self, open: bool) {
        *self.gate.lock().unwrap() = open;
        self.gate_cond.notify_all();
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, block::Error> {
        let size = self.size();
        let out = block::Error::OutOfRange {
            offset,
            len: len as u64,
            size,
        };
        let start = usize::try_from(offset).map_err(|_| out)?;
        let end = start.checked_add(len).filter(|&e| e as u64 <= size);
        end.map(|end| start..end).ok_or(block::Error::OutOfRange {
            offset,
            len: len as u64,
            size,
        })
    }
}

impl DiskImage for MemImage {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), block::Error> {
        self.reads_started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.gate.lock().unwrap();
        while !*open {
            open = self.gate_cond.wait(open).unwrap();
        }
        drop(open);
        if self.fail_reads.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(block::Error::Io {
                op: "read",
                path: "mem".into(),
                offset,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), block::Error> {
        if self.read_only {
            return Err(block::Error::ReadOnly);
        }
        let r = self.range(offset, buf.len())?;
        self.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), block::Error> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), block::Error> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), block::Error> {
        let r = self.range(offset, usize::try_from(len).unwrap())?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus, block::Error> {
        Ok(BlockStatus {
            allocation: block::Allocation::Data { host_offset: None },
            len,
        })
    }
}

/// A device, its transport and guest memory, with `queues` queues placed at 0x1000 * (i + 1).
pub struct Rig<I: DiskImage = MemImage> {
    pub mem: GuestMemoryMmap,
    pub ctx: Arc<Context>,
    pub image: Arc<I>,
    pub dev: Arc<Block>,
    pub transport: MmioTransport,
}

impl<I: DiskImage + 'static> Rig<I> {
    pub fn new(ctx: Arc<Context>, image: Arc<I>, queues: u16, discard: bool) -> Self {
        Self::with_engine(ctx, image, queues, discard, block::aio::Engine::Threads)
    }

    /// As [`Rig::new`], with the given I/O engine.
    pub fn with_engine(
        ctx: Arc<Context>,
        image: Arc<I>,
        queues: u16,
        discard: bool,
        aio: block::aio::Engine,
    ) -> Self {
        let config = BlockConfig {
            id: "d0".into(),
            serial: "serial-0123456789abcdefXYZ".into(),
            num_queues: queues,
            queue_size: QSIZE,
            discard,
            io_workers: block::aio::Workers::fixed(2),
            aio,
            stats_intervals: vec![60],
            ..BlockConfig::default()
        };
        Self::with_config(ctx, image, config)
    }

    /// A device with this configuration on `image`.
    pub fn with_config(ctx: Arc<Context>, image: Arc<I>, config: BlockConfig) -> Self {
        let queues = (0..config.num_queues).collect();
        Self::with_groups(vec![(ctx, queues)], image, config)
    }

    /// A device with this configuration on `image`, its queues served by `groups` (`ctx` is the
    /// first group's).
    pub fn with_groups(
        groups: Vec<(Arc<Context>, Vec<u16>)>,
        image: Arc<I>,
        config: BlockConfig,
    ) -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
                .unwrap();
        let ctx = Arc::clone(&groups[0].0);
        let dev = Block::with_groups(config, image.clone(), groups).unwrap();
        let transport = MmioTransport::new(dev.clone(), mem.clone()).unwrap();
        Rig {
            mem,
            ctx,
            image,
            dev,
            transport,
        }
    }

    fn write16(&self, addr: GuestAddress, value: u16) {
        self.mem.write_obj(value.to_le(), addr).unwrap();
    }

    fn read16(&self, addr: GuestAddress) -> u16 {
        u16::from_le(self.mem.read_obj(addr).unwrap())
    }

    /// Stores descriptor `index` of queue `q`'s table.
    pub fn store_desc(&self, q: u16, index: u16, desc: Descriptor) {
        let addr = desc_addr(q).unchecked_add(16 * u64::from(index));
        self.mem.write_obj(RawDescriptor::from(desc), addr).unwrap();
    }

    /// Queue `q`'s available index.
    pub fn avail_idx(&self, q: u16) -> u16 {
        self.read16(avail_addr(q).unchecked_add(2))
    }

    /// Sets queue `q`'s available index.
    pub fn set_avail_idx(&self, q: u16, value: u16) {
        self.write16(avail_addr(q).unchecked_add(2), value);
    }

    /// Sets queue `q`'s `used_event` (2.7.10).
    pub fn set_used_event(&self, q: u16, value: u16) {
        self.write16(avail_addr(q).unchecked_add(4 + 2 * u64::from(QSIZE)), value);
    }

    /// Queue `q`'s `avail_event` (2.7.10).
    pub fn avail_event(&self, q: u16) -> u16 {
        self.read16(used_addr(q).unchecked_add(4 + 8 * u64::from(QSIZE)))
    }

    /// Queue `q`'s used index.
    pub fn used_idx(&self, q: u16) -> u16 {
        self.read16(used_addr(q).unchecked_add(2))
    }

    pub fn reg(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn set_reg(&self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Negotiates `features` (those the device offers, VERSION_1 always) and starts every queue.
    pub fn start(&self, features: u64) {
        self.start_sized(features, QSIZE);
    }

    /// `start` with queues of `size` entries (rings still laid out for `QSIZE`: the first `size`
    /// entries coincide).
    pub fn start_sized(&self, features: u64, size: u16) {
        self.set_reg(0x70, status::ACKNOWLEDGE);
        self.set_reg(0x70, status::ACKNOWLEDGE | status::DRIVER);
        let features = (features | common::VERSION_1) & self.dev.features();
        self.set_reg(0x24, 0);
        self.set_reg(0x20, (features & 0xffff_ffff) as u32);
        self.set_reg(0x24, 1);
        self.set_reg(0x20, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_reg(0x70, s);
        assert_eq!(self.reg(0x70) & status::FEATURES_OK, status::FEATURES_OK);
        for i in 0..u16::try_from(self.dev.queue_max_sizes().len()).unwrap() {
            self.set_reg(0x30, u32::from(i));
            assert_eq!(self.reg(0x34), u32::from(QSIZE));
            self.set_reg(0x38, u32::from(size));
            for (low, addr) in [
                (0x80, desc_addr(i)),
                (0x90, avail_addr(i)),
                (0xa0, used_addr(i)),
            ] {
                self.set_reg(low, (addr.0 & 0xffff_ffff) as u32);
                self.set_reg(low + 4, (addr.0 >> 32) as u32);
            }
            self.set_reg(0x44, 1);
        }
        self.set_reg(0x70, s | status::DRIVER_OK);
    }

    /// Places a chain of `(addr, len, flags)` descriptors at table index `first` onwards (NEXT
    /// links added), makes it available on queue `q` and notifies.
    pub fn submit(&self, q: u16, first: u16, descs: &[(u64, u32, u16)]) {
        self.store_chain(q, first, descs);
        self.publish(q, first);
    }

    /// Places a chain of `(addr, len, flags)` descriptors at table index `first` onwards (NEXT
    /// links added) in queue `q`'s table.
    pub fn store_chain(&self, q: u16, first: u16, descs: &[(u64, u32, u16)]) {
        let n = u16::try_from(descs.len()).unwrap();
        for (i, (addr, len, flags)) in (0u16..).zip(descs) {
            let (flags, next) = if i + 1 < n {
                (flags | F_NEXT, first + i + 1)
            } else {
                (*flags, 0)
            };
            self.store_desc(q, first + i, Descriptor::new(*addr, *len, flags, next));
        }
    }

    /// Makes head `head` available on queue `q` and notifies.
    pub fn publish(&self, q: u16, head: u16) {
        self.make_available(q, head);
        self.set_reg(0x50, u32::from(q));
    }

    /// Makes head `head` available on queue `q` without notifying (a driver whose notifications
    /// the device turned off).
    pub fn make_available(&self, q: u16, head: u16) {
        let idx = self.avail_idx(q);
        self.write16(
            avail_addr(q).unchecked_add(4 + 2 * u64::from(idx % QSIZE)),
            head,
        );
        self.set_avail_idx(q, idx.wrapping_add(1));
    }

    /// Runs the context on this thread until queue `q`'s used index reaches `want`.
    pub fn run_until_used(&self, q: u16, want: u16) {
        for _ in 0..1000 {
            if self.used_idx(q) >= want {
                return;
            }
            self.ctx.run_once(Some(Duration::from_millis(10))).unwrap();
        }
        panic!("queue {q} used index stuck at {}", self.used_idx(q));
    }

    /// Waits (another thread runs the context) until queue `q`'s used index reaches `want`.
    pub fn wait_used(&self, q: u16, want: u16) {
        for _ in 0..10_000 {
            if self.used_idx(q) >= want {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("queue {q} used index stuck at {}", self.used_idx(q));
    }

    /// The used element `i` of queue `q`: (head, len).
    pub fn used(&self, q: u16, i: u16) -> (u32, u32) {
        let elem = used_addr(q).unchecked_add(4 + 8 * u64::from(i % QSIZE));
        let id: u32 = self.mem.read_obj(elem).unwrap();
        let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// A 16-byte request header at `addr`.
    pub fn header(&self, addr: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    /// Whether the irqfd was written since the last call (clears it).
    pub fn irq_fired(&self) -> bool {
        self.transport.irqfd().read().is_ok()
    }
}

impl Rig<MemImage> {
    /// Puts a 512-byte read of sector 0 (head 0) in flight and holds it in a worker; a thread
    /// lets it go after 50 ms. Returns that thread.
    pub fn hold_a_read(&self) -> std::thread::JoinHandle<()> {
        self.image.set_gate(false);
        self.header(HDR, request_type::IN, 0);
        self.submit(
            0,
            0,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        while self.image.reads_started.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let image = Arc::clone(&self.image);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            image.set_gate(true);
        })
    }
}

/// Where queue `index`'s rings live: descriptor table, then the available ring, then the used
/// ring aligned to 4 (virtio 1.2, 2.7 "Split Virtqueues").
pub fn queue_addr(index: u16) -> GuestAddress {
    GuestAddress(0x1000 * (u64::from(index) + 1))
}

/// Queue `q`'s descriptor table.
pub fn desc_addr(q: u16) -> GuestAddress {
    queue_addr(q)
}

/// Queue `q`'s available ring.
pub fn avail_addr(q: u16) -> GuestAddress {
    queue_addr(q).unchecked_add(16 * u64::from(QSIZE))
}

/// Queue `q`'s used ring.
pub fn used_addr(q: u16) -> GuestAddress {
    let end = avail_addr(q).0 + 6 + 2 * u64::from(QSIZE);
    GuestAddress((end + 3) & !3)
}
