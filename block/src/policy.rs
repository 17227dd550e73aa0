//! The part of QEMU's `-drive cache=` modes that is not about the host page cache: whether a
//! write is durable when it completes (`writethrough`, `directsync`: the guest sees no volatile
//! write cache) and whether flushes reach the disk at all (`unsafe` drops them). The host page
//! cache itself (O_DIRECT or not) is [`crate::CacheMode`], chosen when the image is opened.
//!
//! [`WithPolicy`] wraps any image; it adds no lock and no state of its own.

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

/// An image with a [`WritePolicy`] applied.
#[derive(Debug)]
pub struct WithPolicy<I> {
    inner: I,
    policy: WritePolicy,
}

impl<I: DiskImage> WithPolicy<I> {
    /// Applies `policy` to `inner`.
    pub fn new(inner: I, policy: WritePolicy) -> Self {
        WithPolicy { inner, policy }
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
        self.settle(self.inner.write_at(buf, offset))
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
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), Error> {
            self.log("zeroes");
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
        let image = WithPolicy::new(recorder, policy);
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
}
