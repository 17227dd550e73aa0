//! Copy-up (QEMU's copy-on-read write): a block job that pulls data from the backing chain into
//! the top writes it only where the top still reads from its backing image, so a guest write that
//! reached a cluster (or, with extended L2 entries, a subcluster) first is never overwritten by
//! the older data the job read, and every other part of the range is still copied. A whole
//! cluster of zeroes becomes a zero cluster (v3), no data cluster, as QEMU's copy-on-read writes
//! zeroes it read as a write-zeroes.
//!
//! A range of many clusters is copied as QEMU's copy-on-read writes its bounce buffer: the whole
//! clusters the top lacks entirely, up to an L2 table's worth, get their host clusters in one
//! plan under the metadata lock, are written with one write per run of consecutive host clusters
//! and published in one go; the rest (parts of clusters, zeroes, clusters partly the top's) go
//! one piece at a time.
//!
//! Locking: the claims of every cluster of the range (the claim every slow-path write takes,
//! `write.rs`), taken in ascending order, are held from the checks to the publications; a guest
//! write to a cluster the top does not have yet always takes the slow path, so it either
//! completed before the check (that part is skipped) or waits for the claim and then writes over
//! the copied data. Holding some claims while waiting for the next cannot deadlock: a writer
//! holds one claim at a time. The metadata lock is taken as for any write (plan, publish); a
//! discard or write-zeroes that changes an entry meanwhile makes its publication fail, and that
//! part is checked again.

use super::{Claim, Target, ALL_ALLOC};
use super::{Qcow2, COPIED};
use crate::direct::DirectPin;
use crate::qcow2::l2::Mapping;
use crate::Error;

/// A whole cluster of a batch, as planned under the metadata lock.
struct Planned {
    /// Its guest offset.
    guest: u64,
    /// Its L2 table and the entry words seen when planning.
    l2: u64,
    entry: u64,
    bitmap: u64,
    /// The new host cluster.
    host: u64,
}

impl Qcow2 {
    /// Writes `data` at `guest` wherever that range still reads from the backing image (is
    /// unallocated here); returns whether it wrote anything. A whole cluster of zeroes is
    /// written as a zero cluster where the version has them.
    pub(crate) fn copy_up(&self, data: &[u8], guest: u64) -> Result<bool, Error> {
        let len = data.len() as u64;
        self.check_request(guest, len, true)?;
        if len == 0 {
            return Ok(false);
        }
        let cs = self.geo.cluster_size();
        let end = guest + len;
        let mut claims = Vec::new();
        let mut cluster = guest - guest % cs;
        while cluster < end {
            claims.push(loop {
                if let Some(claim) = Claim::new(self, cluster) {
                    break claim;
                }
            });
            cluster += cs;
        }
        // Whole clusters the top lacks go in batches within one L2 table; anything else piece
        // by piece, in guest order.
        let table = cs * self.geo.l2_entries();
        let mut wrote = false;
        let mut batch: Vec<u64> = Vec::new();
        let mut at = guest;
        while at < end {
            let next = (at - at % cs + cs).min(end);
            let whole = next - at == cs;
            let piece = &data[offset_in(at - guest)..offset_in(next - guest)];
            let (mapping, run) = self.lookup(at)?;
            let batched = whole
                && mapping == Mapping::Unallocated
                && run >= cs
                && !(self.version >= 3 && piece.iter().all(|&b| b == 0));
            if batched {
                if batch.last().is_some_and(|&b| b / table != at / table) {
                    wrote |= self.copy_up_batch(&batch, data, guest)?;
                    batch.clear();
                }
                batch.push(at);
            } else {
                wrote |= self.copy_up_piece(piece, at)?;
            }
            at = next;
        }
        if !batch.is_empty() {
            wrote |= self.copy_up_batch(&batch, data, guest)?;
        }
        drop(claims);
        Ok(wrote)
    }

    /// Copies up the whole clusters `clusters` (ascending, claimed, within one L2 table) of
    /// `data`, which starts at `guest`: new host clusters for those still unallocated, planned
    /// under one metadata lock, written a run of consecutive host clusters at a time, published
    /// under one lock; a cluster whose entry changed meanwhile goes piece by piece instead.
    fn copy_up_batch(&self, clusters: &[u64], data: &[u8], guest: u64) -> Result<bool, Error> {
        let cs = self.geo.cluster_size();
        let slice = |at: u64, n: u64| &data[offset_in(at - guest)..offset_in(at - guest + n)];
        let (planned, _pin) = self.plan_batch(clusters)?;
        let written = self.fill_batch(&planned, &slice);
        let mut wrote = false;
        let mut again = Vec::new();
        let mut m = self.lock();
        let mut result = written;
        for p in &planned {
            if result.is_ok() {
                match self.writable_l2(&mut m, p.guest) {
                    Ok(l2) if l2 == p.l2 && m.l2_words(l2, p.guest) == (p.entry, p.bitmap) => {
                        let bitmap = if self.geo.extended { ALL_ALLOC } else { 0 };
                        m.publish_data(l2, p.guest, p.host | COPIED, bitmap);
                        // A host cluster the entry kept with no subcluster allocated.
                        m.drop_refs(self.entry_clusters(p.entry));
                        wrote = true;
                        continue;
                    }
                    Ok(_) => again.push(p.guest),
                    Err(e) => result = Err(e),
                }
            }
            // Nothing points at it (failing to free it only leaks it).
            if let Err(free) = m.free_cluster(&self.file, p.host) {
                log::warn!("{free}");
            }
        }
        self.unlock(m);
        result?;
        for at in again {
            wrote |= self.copy_up_piece(slice(at, cs), at)?;
        }
        Ok(wrote)
    }

    /// Under the metadata lock, a new host cluster for each of `clusters` that is still
    /// unallocated, with the pin that keeps them from reuse until they are written.
    fn plan_batch(&self, clusters: &[u64]) -> Result<(Vec<Planned>, DirectPin), Error> {
        let cs = self.geo.cluster_size();
        let mut m = self.lock_with_room()?;
        let mut planned: Vec<Planned> = Vec::with_capacity(clusters.len());
        let result = clusters.iter().try_for_each(|&guest| {
            let l2 = self.writable_l2(&mut m, guest)?;
            let (entry, bitmap) = m.l2_words(l2, guest);
            if !matches!(self.decode(entry, bitmap, guest)?, (Mapping::Unallocated, run) if run >= cs)
            {
                return Ok(());
            }
            let host = m.alloc_cluster(&self.file)?;
            planned.push(Planned {
                guest,
                l2,
                entry,
                bitmap,
                host,
            });
            Ok(())
        });
        if let Err(e) = result {
            for p in &planned {
                if let Err(free) = m.free_cluster(&self.file, p.host) {
                    log::warn!("{free}");
                }
            }
            self.unlock(m);
            return Err(e);
        }
        // After the allocations, which would otherwise wait for this very pin to reuse a
        // cluster.
        let pin = DirectPin::enter(&self.epochs);
        self.unlock(m);
        Ok((planned, pin))
    }

    /// Writes the planned clusters' bytes, one write per run of clusters consecutive both in
    /// the guest and in the file, without the metadata lock.
    fn fill_batch<'d>(
        &self,
        planned: &[Planned],
        slice: &impl Fn(u64, u64) -> &'d [u8],
    ) -> Result<(), Error> {
        let cs = self.geo.cluster_size();
        let mut i = 0;
        while i < planned.len() {
            let first = &planned[i];
            let mut n = 1;
            while planned.get(i + n).is_some_and(|p| {
                p.guest == first.guest + n as u64 * cs && p.host == first.host + n as u64 * cs
            }) {
                n += 1;
            }
            self.write_data(slice(first.guest, n as u64 * cs), first.host)?;
            i += n;
        }
        Ok(())
    }

    /// Copies up `data` at `guest`, within one claimed cluster, wherever it still reads from
    /// the backing image: each run of the mapping that is unallocated is written (a whole
    /// cluster of zeroes as a zero cluster where the version has them), the others are left.
    fn copy_up_piece(&self, data: &[u8], guest: u64) -> Result<bool, Error> {
        let cs = self.geo.cluster_size();
        let end = guest + data.len() as u64;
        let mut wrote = false;
        let mut at = guest;
        while at < end {
            let (mapping, run) = self.lookup(at)?;
            let next = at + run.min(end - at);
            if mapping == Mapping::Unallocated {
                let part = &data[offset_in(at - guest)..offset_in(next - guest)];
                wrote |= self.copy_up_unallocated(part, at, cs)?;
            }
            at = next;
        }
        Ok(wrote)
    }

    /// Writes `data` at `guest` (a run of one claimed cluster unallocated when looked up) if it
    /// still reads from the backing image; returns whether it wrote.
    fn copy_up_unallocated(&self, data: &[u8], guest: u64, cs: u64) -> Result<bool, Error> {
        let len = data.len() as u64;
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

/// A byte offset within a request's buffer (which fits in memory, so in `usize`).
fn offset_in(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
