//! Writing qcow2 (spec "Cluster mapping"): in-place writes to clusters that are ours alone,
//! allocation with copy-on-write of partial clusters (from the backing image, a compressed
//! cluster, or a cluster shared with a snapshot), L2 tables copied when shared, discard and
//! write-zeroes as zero clusters (v3) or zero subclusters (extended L2).
//!
//! A write the fast path cannot do is planned under the metadata lock, filled without it and
//! published under it again (`Qcow2::write_cluster`). Publishing records that the new data must
//! be durable before the L2 table is written; every change to metadata goes through `Meta`,
//! which keeps the write orderings (see `meta.rs`); old clusters are released through
//! `pending_frees`, after the metadata that pointed at them is durable.

use super::l2::{Mapping, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::meta::Meta;
use super::Qcow2;
use crate::direct::DirectPin;
use crate::{DiskImage, Error};

mod copy_up;

/// Extended L2 bitmap with every subcluster allocated.
const ALL_ALLOC: u64 = 0xffff_ffff;
/// Extended L2 bitmap with every subcluster reading as zeroes.
const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// A guest cluster claimed by one slow-path write: other slow-path writes to it wait, so that
/// requests racing for an unallocated cluster copy it once instead of each copying and all but
/// one throwing the copy away.
struct Claim<'a> {
    img: &'a Qcow2,
    cluster: u64,
}

/// A write to one cluster as planned under the metadata lock (`Qcow2::plan`).
struct ClusterWrite {
    /// The L2 table holding the entry (ours alone), and the entry words seen when planning.
    l2: u64,
    entry: u64,
    bitmap: u64,
    /// The bytes of the cluster rewritten: the touched subclusters with extended L2 (unless
    /// compressed), else the whole cluster.
    span: std::ops::Range<u64>,
    /// The bitmap to publish (extended L2).
    new_bitmap: u64,
    /// Where the bytes go.
    target: Target,
    /// Taken under the lock that looked the clusters up: none of them is reused before the
    /// write is done with it.
    _pin: DirectPin,
}

/// Where a planned write goes.
enum Target {
    /// A cluster ours alone whose bytes are data already: written in place with nothing to
    /// publish (another request allocated it while we waited for its claim).
    Ready(u64),
    /// A cluster ours alone whose touched units partly read as zeroes or from the backing
    /// image: filled in place, then published as data.
    InPlace(u64),
    /// A newly allocated cluster replacing the entry (copy-on-write).
    New(u64),
}

impl<'a> Claim<'a> {
    /// Claims `cluster`, or, when another request holds it, waits until it is released and
    /// returns `None`: that request has probably allocated the cluster, so the caller should try
    /// the fast path again before claiming.
    fn new(img: &'a Qcow2, cluster: u64) -> Option<Claim<'a>> {
        // A poisoned set only means a panic elsewhere; the set itself stays consistent.
        let mut busy = img.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.contains(&cluster) {
            busy.insert(cluster);
            return Some(Claim { img, cluster });
        }
        let done = &img.busy_done[img.claim_group(cluster)];
        while busy.contains(&cluster) {
            busy = done.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        None
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut busy = self.img.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.cluster);
        self.img.busy_done[self.img.claim_group(self.cluster)].notify_all();
    }
}

impl Qcow2 {
    /// The condition variable group of a guest cluster (consecutive clusters in different
    /// groups, since sequential requests wait on neighbours).
    fn claim_group(&self, cluster: u64) -> usize {
        usize::try_from((cluster >> self.geo.cluster_bits) % super::CLAIM_GROUPS as u64)
            .unwrap_or(0)
    }

    /// Writes `buf` at `offset` (range already checked), one cluster at a time.
    pub(super) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let cs = self.geo.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let n = usize::try_from(cs - guest % cs)
                .unwrap_or(usize::MAX)
                .min(buf.len() - pos);
            let chunk = &buf[pos..pos + n];
            // Fast path: a cluster (or subcluster run) that is ours alone, written in place
            // without the metadata lock.
            loop {
                let (m, run, io) = self.lookup_pinned(guest)?;
                if let Mapping::Data { host, copied: true } = m {
                    if run >= n as u64 {
                        self.write_data(chunk, host)?;
                        break;
                    }
                }
                drop(io);
                if self.write_cluster(chunk, guest)? {
                    break;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes guest bytes, or bytes copied up for them, into a data cluster: the one place the
    /// write path puts data into the host file, so `host..host + data.len()` is the range about
    /// to be written, checked against the metadata first (`overlap.rs`).
    fn write_data(&self, data: &[u8], host: u64) -> Result<(), Error> {
        self.check_data_write(host, data.len() as u64)?;
        crate::trace::data(|| self.file.write_at(data, host))
    }

    /// Returns the offset of a writable (ours alone) L2 table for `guest`, allocating a new one
    /// or copying a shared one.
    pub(super) fn writable_l2(&self, m: &mut Meta, guest: u64) -> Result<u64, Error> {
        let i = m.l1_index(guest);
        let (old, copied) = m.l1_entry(&self.file, i)?;
        if old != 0 && copied {
            m.load_l2(&self.file, old)?;
            return Ok(old);
        }
        let table = if old == 0 {
            vec![0u64; usize::try_from(self.geo.l2_entries()).unwrap_or(0) * self.geo.words()]
        } else {
            m.load_l2(&self.file, old)?;
            m.l2.get(old).cloned().unwrap_or_default()
        };
        let new = m.alloc_cluster(&self.file)?;
        m.insert_l2(&self.file, new, table)?;
        m.set_l1(i, new | COPIED);
        m.note_l2_moved(old, new);
        if old != 0 {
            m.drop_refs([old]);
        }
        Ok(new)
    }

    /// Host clusters referenced by an L2 entry (for dropping its references).
    pub(super) fn entry_clusters(&self, entry: u64) -> Vec<u64> {
        let cs = self.geo.cluster_size();
        if entry & COMPRESSED != 0 {
            if let Ok((Mapping::Compressed { host, len }, _)) = self.geo.decode(entry, 0, 0) {
                let first = host / cs;
                let last = (host + len - 1) / cs;
                return (first..=last).map(|c| c * cs).collect();
            }
            return Vec::new();
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            Vec::new()
        } else {
            vec![host]
        }
    }

    /// Writes `data` at `guest` within one cluster where the fast path could not, in three
    /// steps: [`plan`](Self::plan) under the metadata lock (in place or a new cluster, which it
    /// allocates), [`fill`](Self::fill) without it (copy-up and the new bytes), and
    /// [`publish`](Self::publish) under it again (the L2 entry, after which the data must be
    /// durable before the table is written). When the entry changed meanwhile, the write starts
    /// over.
    ///
    /// Returns false, having written nothing, when it had to wait for another request's claim on
    /// the cluster: the caller retries the fast path first.
    fn write_cluster(&self, data: &[u8], guest: u64) -> Result<bool, Error> {
        let cs = self.geo.cluster_size();
        let Some(claim) = Claim::new(self, guest - guest % cs) else {
            return Ok(false);
        };
        loop {
            let plan = self.plan(data, guest)?;
            if let Target::Ready(host) = plan.target {
                // The request that held the claim before us allocated the cluster: write in
                // place like the fast path, without the claim.
                drop(claim);
                return self.write_data(data, host).map(|()| true);
            }
            if let Err(e) = self.fill(&plan, data, guest) {
                if let Target::New(target) = plan.target {
                    // Nothing points at it: give it back rather than leak it (failing that, it
                    // only leaks).
                    if let Err(free) = self.lock().free_cluster(&self.file, target) {
                        log::warn!("{free}");
                    }
                }
                return Err(e);
            }
            if self.publish(&plan, guest)? {
                return Ok(true);
            }
        }
    }

    /// Decides, under the metadata lock, where a write of `data` at `guest` goes.
    fn plan(&self, data: &[u8], guest: u64) -> Result<ClusterWrite, Error> {
        let cs = self.geo.cluster_size();
        let base = guest - guest % cs;
        let mut m = self.lock_with_room()?;
        let l2 = self.writable_l2(&mut m, guest)?;
        let (entry, bitmap) = m.l2_words(l2, guest);
        let (mapping, run) = self
            .geo
            .decode(entry, bitmap, guest)
            .map_err(|e| super::fmt_err(&self.file, e))?;
        let mut span = 0..cs;
        let mut new_bitmap = 0;
        let target = match mapping {
            Mapping::Data { host, copied: true } if run >= data.len() as u64 => Target::Ready(host),
            _ => {
                let compressed = entry & COMPRESSED != 0;
                if self.geo.extended && !compressed {
                    // Only the touched subclusters are rewritten.
                    let sub = self.geo.sub_size();
                    let start = (guest - base) / sub * sub;
                    let end = (guest - base + data.len() as u64).div_ceil(sub) * sub;
                    let count = (end - start) / sub;
                    let touched = if count >= 32 {
                        ALL_ALLOC
                    } else {
                        ((1u64 << count) - 1) << (start / sub)
                    };
                    span = start..end;
                    new_bitmap = (bitmap | touched) & !(touched << 32);
                } else if self.geo.extended {
                    new_bitmap = ALL_ALLOC;
                }
                let host = if compressed { 0 } else { entry & OFFSET_MASK };
                if host != 0 && entry & COPIED != 0 {
                    Target::InPlace(host)
                } else {
                    Target::New(m.alloc_cluster(&self.file)?)
                }
            }
        };
        let planned = ClusterWrite {
            l2,
            entry,
            bitmap,
            span,
            new_bitmap,
            target,
            // After the allocation, which would otherwise wait for this very pin to reuse a
            // cluster.
            _pin: DirectPin::enter(&self.epochs),
        };
        self.unlock(m);
        Ok(planned)
    }

    /// Writes a planned cluster's bytes, without the metadata lock: the new bytes, and around
    /// them what the rest of the span reads as now.
    fn fill(&self, plan: &ClusterWrite, data: &[u8], guest: u64) -> Result<(), Error> {
        let cs = self.geo.cluster_size();
        let base = guest - guest % cs;
        let span = &plan.span;
        let mut content = vec![0u8; usize::try_from(span.end - span.start).unwrap_or(0)];
        let at = usize::try_from(guest - base - span.start).unwrap_or(0);
        match plan.target {
            Target::Ready(_) => Ok(()),
            Target::InPlace(host) => {
                // Units (subclusters, or the cluster) already holding data get only the new
                // bytes: a fast-path writer may be writing the rest of them right now. The
                // others are filled whole, from what they read as now.
                let sub = self.geo.sub_size();
                let holds_data = |unit: u64| {
                    if self.geo.extended {
                        plan.bitmap & (1 << unit) != 0
                    } else {
                        plan.entry & ZERO == 0
                    }
                };
                let units = (span.start / sub)..(span.end / sub);
                if data.len() < content.len() && !units.clone().all(holds_data) {
                    self.read_virtual(&mut content, base + span.start)?;
                }
                content[at..at + data.len()].copy_from_slice(data);
                let (d0, d1) = (at as u64, (at + data.len()) as u64);
                for unit in units {
                    let s0 = unit * sub - span.start;
                    let (lo, hi) = if holds_data(unit) {
                        (d0.max(s0), d1.min(s0 + sub))
                    } else {
                        (s0, s0 + sub)
                    };
                    if lo < hi {
                        let range =
                            usize::try_from(lo).unwrap_or(0)..usize::try_from(hi).unwrap_or(0);
                        self.write_data(&content[range], host + span.start + lo)?;
                    }
                }
                Ok(())
            }
            Target::New(target) => {
                // Copy only what the new data does not cover: the head and the tail of the span.
                let (head, rest) = content.split_at_mut(at);
                let (middle, tail) = rest.split_at_mut(data.len());
                if !head.is_empty() {
                    self.read_virtual(head, base + span.start)?;
                }
                if !tail.is_empty() {
                    self.read_virtual(tail, base + span.start + (at + data.len()) as u64)?;
                }
                middle.copy_from_slice(data);
                let old = plan.entry & OFFSET_MASK;
                if self.geo.extended && plan.entry & COMPRESSED == 0 && old != 0 && *span != (0..cs)
                {
                    // A shared cluster with subclusters: keep its other allocated subclusters.
                    let mut whole = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                    self.file.read_at(&mut whole, old)?;
                    self.write_data(&whole, target)?;
                }
                self.write_data(&content, target + span.start)
            }
        }
    }

    /// Sets the planned entry under the metadata lock, if nobody changed the entry since the
    /// plan; returns false (a new cluster released again) when somebody did.
    fn publish(&self, plan: &ClusterWrite, guest: u64) -> Result<bool, Error> {
        // The plan's table is cached (dirty tables stay) unless it was clean and dropped since:
        // at most that one table is loaded again, and the step never waits for room, which
        // would leave the new cluster allocated and unpointed at if the write-back failed.
        let mut m = self.lock();
        let l2_now = self.writable_l2(&mut m, guest)?;
        let unchanged =
            l2_now == plan.l2 && m.l2_words(plan.l2, guest) == (plan.entry, plan.bitmap);
        let published = match plan.target {
            Target::Ready(_) => true,
            Target::InPlace(host) if unchanged => {
                m.publish_data(plan.l2, guest, host | COPIED, plan.new_bitmap);
                true
            }
            Target::New(target) if unchanged => {
                m.publish_data(plan.l2, guest, target | COPIED, plan.new_bitmap);
                m.drop_refs(self.entry_clusters(plan.entry));
                true
            }
            Target::InPlace(_) => false,
            Target::New(target) => {
                // Nothing ever pointed at it.
                m.free_cluster(&self.file, target)?;
                false
            }
        };
        self.unlock(m);
        Ok(published)
    }

    /// Whole clusters of `[offset, offset + len)`: (first cluster start, end), possibly empty.
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.geo.cluster_size();
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len == self.size() {
            (offset + len).div_ceil(cs) * cs
        } else {
            (offset + len) / cs * cs
        };
        (start, end.max(start))
    }

    /// Discards whole clusters (parts of clusters are left as they are, as QEMU does). They read
    /// as zeroes afterwards (v3 zero clusters or zero subclusters; v2 falls back to the backing
    /// image or zeroes); with `keep`, a host cluster that is ours alone stays allocated behind
    /// the zero cluster.
    pub(super) fn discard_inner(&self, offset: u64, len: u64, keep: bool) -> Result<(), Error> {
        let (start, end) = self.whole_clusters(offset, len);
        let span = self.geo.cluster_size() * self.geo.l2_entries();
        let mut guest = start;
        let mut backlog = false;
        // One L2 table's worth at a time, the lock released in between: a long discard does
        // not stall the requests waiting for it.
        while guest < end {
            let chunk_end = ((guest / span + 1) * span).min(end);
            backlog = self.discard_chunk(guest, chunk_end, keep)?;
            guest = chunk_end;
        }
        if backlog {
            // Freed clusters are reused only once the tables that dropped them are durable, which
            // a guest that discards and never flushes would postpone forever while the file grows:
            // write them back now, as a flush does (outside the lock). A failure leaves
            // everything owed dirty for the next flush, which reports it; the discard itself is
            // done.
            if let Err(e) = self.write_back() {
                log::debug!(
                    "{}: write-back after a discard failed: {e}",
                    self.file.path()
                );
            }
        }
        Ok(())
    }

    /// Discards the whole clusters of `[start, end)`, which one L2 table maps, under the lock;
    /// returns whether the clusters waiting to be freed passed `free_backlog`.
    fn discard_chunk(&self, start: u64, end: u64, keep: bool) -> Result<bool, Error> {
        let cs = self.geo.cluster_size();
        let mut m = self.lock_with_room()?;
        let (l2, _) = m.l1_entry(&self.file, m.l1_index(start))?;
        if l2 == 0 && self.backing.is_none() {
            // Unallocated without a backing image already reads as zeroes.
            return Ok(false);
        }
        let mut guest = start;
        while guest < end {
            let l2 = self.writable_l2(&mut m, guest)?;
            let (entry, bitmap) = m.l2_words(l2, guest);
            let unallocated = entry == 0 && bitmap == 0;
            let (new_entry, new_bitmap) = if self.geo.extended {
                (0, ALL_ZERO)
            } else if self.version >= 3 {
                (ZERO, 0)
            } else {
                (0, 0)
            };
            let own = entry & COPIED != 0 && entry & COMPRESSED == 0 && entry & OFFSET_MASK != 0;
            if keep && own {
                m.set_l2_words(l2, guest, entry | new_entry, new_bitmap);
            } else if !(unallocated && self.backing.is_none())
                && (entry, bitmap) != (new_entry, new_bitmap)
            {
                m.set_l2_words(l2, guest, new_entry, new_bitmap);
                m.drop_refs(self.entry_clusters(entry));
            }
            guest += cs;
        }
        let backlog = m.pending_frees.len() >= self.free_backlog();
        self.unlock(m);
        Ok(backlog)
    }

    /// How many freed clusters a discard lets wait for a flush: 1/256 of the disk's clusters,
    /// between 8 and 4096, so a disk that is discarded and rewritten without flushes grows by
    /// well under 1% (or 8 clusters) before its freed clusters become reusable.
    fn free_backlog(&self) -> usize {
        let clusters = self.size().div_ceil(self.geo.cluster_size());
        usize::try_from((clusters / 256).clamp(8, 4096)).unwrap_or(4096)
    }

    /// Makes a range read as zeroes: zero clusters for whole clusters (v3), written zeroes for
    /// the edges and for v2 images.
    pub(super) fn write_zeroes_inner(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), Error> {
        let (start, end) = if self.version >= 3 {
            self.whole_clusters(offset, len)
        } else {
            (offset + len, offset + len)
        };
        let zeroes = |from: u64, to: u64| -> Result<(), Error> {
            let chunk = vec![0u8; 1 << 20];
            let mut pos = from;
            while pos < to {
                let n = usize::try_from((to - pos).min(1 << 20)).unwrap_or(1 << 20);
                self.write_inner(&chunk[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        };
        if start >= end {
            return zeroes(offset, offset + len);
        }
        zeroes(offset, start)?;
        self.discard_inner(start, end - start, !may_unmap)?;
        zeroes(end.min(offset + len), offset + len)
    }
}
