//! Copy-up (QEMU's copy-on-read write): a block job that pulls data from the backing chain into
//! the top writes it only where the top still reads from its backing image, so a guest write that
//! reached the cluster first is never overwritten by the older data the job read. A whole
//! cluster of zeroes becomes a zero cluster (v3), no data cluster, as QEMU's copy-on-read writes
//! zeroes it read as a write-zeroes.
//!
//! Locking: the cluster's claim (the one every slow-path write takes, `write.rs`) is held from
//! the check to the publication; a guest write to a cluster the top does not have yet always
//! takes the slow path, so it either completed before the check (the copy is skipped) or waits
//! for the claim and then writes over the copied data. The metadata lock is taken as for any
//! write (plan, publish); a discard or write-zeroes that changes the entry meanwhile makes the
//! publication fail, and the check runs again.

use super::{Claim, Qcow2, Target};
use crate::qcow2::l2::Mapping;
use crate::{DiskImage, Error};

impl Qcow2 {
    /// Writes `data` at `guest`, within one cluster, only if that range reads from the backing
    /// image (is unallocated here); returns whether it wrote. A whole cluster of zeroes is
    /// written as a zero cluster where the version has them.
    pub(crate) fn copy_up(&self, data: &[u8], guest: u64) -> Result<bool, Error> {
        let len = data.len() as u64;
        self.check_request(guest, len, true)?;
        let cs = self.geo.cluster_size();
        if len == 0 || guest % cs + len > cs {
            return Err(Error::OutOfRange {
                offset: guest,
                len,
                size: self.size(),
            });
        }
        let cluster = guest - guest % cs;
        let _claim = loop {
            if let Some(claim) = Claim::new(self, cluster) {
                break claim;
            }
        };
        let unallocated =
            |entry: (Mapping, u64)| matches!(entry, (Mapping::Unallocated, run) if run >= len);
        loop {
            if !unallocated(self.lookup(guest)?) {
                return Ok(false);
            }
            if len == cs && self.version >= 3 && data.iter().all(|&b| b == 0) {
                // The claim keeps guest writes out of the cluster; what a guest discard or
                // write-zeroes did to it meanwhile reads as zeroes too.
                self.discard_inner(guest, len, true)?;
                return Ok(true);
            }
            let plan = self.plan(data, guest)?;
            let planned = self.decode(plan.entry, plan.bitmap, guest)?;
            let result = if unallocated(planned) {
                self.fill(&plan, data, guest)
            } else {
                Ok(())
            };
            if !unallocated(planned) || result.is_err() {
                if let Target::New(target) = plan.target {
                    // Nothing points at it yet (failing to free it only leaks it).
                    if let Err(free) = self.lock().free_cluster(&self.file, target) {
                        log::warn!("{free}");
                    }
                }
                return result.map(|()| false);
            }
            if self.publish(&plan, guest)? {
                return Ok(true);
            }
        }
    }
}
