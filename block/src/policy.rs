//! The part of QEMU's `-drive cache=` modes that is not about the host page cache: whether a
//! write is durable when it completes (`writethrough`, `directsync`: the guest sees no volatile
//! write cache) and whether flushes reach the disk at all (`unsafe` drops them). The host page
//! cache itself (O_DIRECT or not) is [`crate::CacheMode`], chosen when the image is opened. And
//! QEMU's `detect-zeroes=`: a write whose data is all zeroes becomes a write-zeroes request, which
//! qcow2 turns into zero clusters instead of data.
//!
//! [`WithPolicy`] wraps any image; it adds no lock and no state of its own.

use crate::direct::{DirectPin, DirectTarget, Extent, FlushPlan};
use crate::{BlockStatus, DiskImage, Error};

/// What happens to writes and flushes on top of the image's own behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritePolicy {
    /// Writes complete into whatever cache the image has; flushes make them durable
    /// (`cache=writeback`, `cache=none`).
    #[default]
    WriteBack,
    /// Every write, write-zeroes and discard is flushed before it completes
    /// (`cache=writethrough`, `cache=directsync`).
    WriteThrough,
    /// Flushes succeed without reaching the disk (`cache=unsafe`): fast, and a host crash loses
    /// data the guest believed durable.
    IgnoreFlush,
}

/// QEMU's `detect-zeroes=`: what a write of all zeroes becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// An ordinary write (`off`, QEMU's default).
    #[default]
    Off,
    /// A write-zeroes request that keeps the space allocated (`on`).
    On,
    /// A write-zeroes request that may free the space (`unmap`; QEMU takes it as `on` unless
    /// the drive also has `discard=unmap`, and so should the caller).
    Unmap,
}

/// An image with a [`WritePolicy`] and a [`DetectZeroes`] mode applied.
#[derive(Debug)]
pub struct WithPolicy<I> {
    inner: I,
    policy: WritePolicy,
    detect_zeroes: DetectZeroes,
}

impl<I: DiskImage> WithPolicy<I> {
    /// Applies `policy` and `detect_zeroes` to `inner`.
    pub fn new(inner: I, policy: WritePolicy, detect_zeroes: DetectZeroes) -> Self {
        WithPolicy {
            inner,
            policy,
            detect_zeroes,
        }
    }

    /// The image under the policy.
    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// Flushes after a modifying request when the policy is write-through.
    fn settle(&self, result: Result<(), Error>) -> Result<(), Error> {
        result?;
        match self.policy {
            WritePolicy::WriteThrough => self.inner.flush(),
            WritePolicy::WriteBack | WritePolicy::IgnoreFlush => Ok(()),
        }
    }
}

impl<I: DiskImage> DiskImage for WithPolicy<I> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let may_unmap = match self.detect_zeroes {
            DetectZeroes::Off => None,
            DetectZeroes::On => Some(false),
            DetectZeroes::Unmap => Some(true),
        };
        match may_unmap {
            Some(may_unmap) if !buf.is_empty() && buf.iter().all(|&b| b == 0) => {
                let len = buf.len() as u64; // usize to u64 never truncates
                self.settle(self.inner.write_zeroes(offset, len, may_unmap))
            }
            _ => self.settle(self.inner.write_at(buf, offset)),
        }
    }

    fn flush(&self) -> Result<(), Error> {
        match self.policy {
            WritePolicy::IgnoreFlush => Ok(()),
            WritePolicy::WriteBack | WritePolicy::WriteThrough => self.inner.flush(),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.settle(self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), Error> {
        self.settle(self.inner.write_zeroes(offset, len, may_unmap))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.inner.block_status(offset, len)
    }

    fn direct_target(&self) -> Option<DirectTarget> {
        let mut target = self.inner.direct_target()?;
        if self.policy == WritePolicy::IgnoreFlush {
            target.flush = FlushPlan::Skip;
        }
        Some(target)
    }

    /// Writes that need more than the bytes written in place (a flush after them, or a look
    /// at their data for zeroes) are not mapped.
    fn map_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        extents: &mut Vec<Extent>,
    ) -> Option<DirectPin> {
        if write
            && (self.policy == WritePolicy::WriteThrough || self.detect_zeroes != DetectZeroes::Off)
        {
            return None;
        }
        self.inner.map_direct(offset, len, write, extents)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::Allocation;

    /// Records the calls that reach it; every call succeeds unless `fail_writes`.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<&'static str>>,
        fail_writes: bool,
    }

    impl Recorder {
        fn log(&self, call: &'static str) {
            self.calls.lock().expect("not poisoned").push(call);
        }
        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().expect("not poisoned").clone()
        }
    }

    impl DiskImage for Recorder {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), Error> {
            self.log("read");
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
            self.log("write");
            if self.fail_writes {
                return Err(Error::OutOfRange {
                    offset,
                    len: u64::try_from(buf.len()).expect("small"),
                    size: 0,
                });
            }
            Ok(())
        }
        fn flush(&self) -> Result<(), Error> {
            self.log("flush");
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), Error> {
            self.log("discard");
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, may_unmap: bool) -> Result<(), Error> {
            self.log(if may_unmap { "zeroes+unmap" } else { "zeroes" });
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus, Error> {
            Ok(BlockStatus {
                allocation: Allocation::Zero,
                len,
            })
        }
    }

    fn run(policy: WritePolicy, recorder: Recorder) -> Vec<&'static str> {
        let image = WithPolicy::new(recorder, policy, DetectZeroes::Off);
        let mut buf = [0u8; 512];
        image.read_at(&mut buf, 0).expect("read");
        let _ = image.write_at(&buf, 0);
        image.write_zeroes(0, 512, false).expect("zeroes");
        image.discard(0, 512).expect("discard");
        image.flush().expect("flush");
        image.inner.calls()
    }

    #[test]
    fn write_back_passes_everything_through() {
        assert_eq!(
            run(WritePolicy::WriteBack, Recorder::default()),
            ["read", "write", "zeroes", "discard", "flush"]
        );
    }

    #[test]
    fn write_through_flushes_after_every_modification() {
        assert_eq!(
            run(WritePolicy::WriteThrough, Recorder::default()),
            ["read", "write", "flush", "zeroes", "flush", "discard", "flush", "flush"]
        );
    }

    #[test]
    fn a_failed_write_is_not_flushed_and_keeps_its_error() {
        let image = WithPolicy::new(
            Recorder {
                fail_writes: true,
                ..Recorder::default()
            },
            WritePolicy::WriteThrough,
            DetectZeroes::Off,
        );
        let err = image.write_at(&[0u8; 512], 4096).expect_err("fails");
        assert!(matches!(err, Error::OutOfRange { offset: 4096, .. }));
        assert_eq!(image.inner.calls(), ["write"]);
    }

    #[test]
    fn ignore_flush_drops_only_flushes() {
        assert_eq!(
            run(WritePolicy::IgnoreFlush, Recorder::default()),
            ["read", "write", "zeroes", "discard"]
        );
    }

    #[test]
    fn detect_zeroes_turns_only_all_zero_writes_into_write_zeroes() {
        for (mode, zeroes) in [
            (DetectZeroes::On, "zeroes"),
            (DetectZeroes::Unmap, "zeroes+unmap"),
        ] {
            let image = WithPolicy::new(Recorder::default(), WritePolicy::WriteBack, mode);
            image.write_at(&[0u8; 4096], 0).expect("zero write");
            let mut data = [0u8; 4096];
            data[4095] = 1;
            image.write_at(&data, 0).expect("data write");
            assert_eq!(image.inner.calls(), [zeroes, "write"], "{mode:?}");
        }
        let off = WithPolicy::new(
            Recorder::default(),
            WritePolicy::WriteBack,
            DetectZeroes::Off,
        );
        off.write_at(&[0u8; 512], 0).expect("write");
        assert_eq!(off.inner.calls(), ["write"]);
    }
}
