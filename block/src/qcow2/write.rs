//! Writing qcow2 (spec "Cluster mapping"): in-place writes to clusters that are ours alone,
//! allocation with copy-on-write of partial clusters (from the backing image, a compressed
//! cluster, or a cluster shared with a snapshot), L2 tables copied when shared, discard and
//! write-zeroes as zero clusters (v3) or zero subclusters (extended L2).
//!
//! Every change to metadata goes through `Meta`, which orders the writes (see `meta.rs`); old
//! clusters are released through `pending_frees`, after the metadata that pointed at them is
//! durable.

use super::l2::{Mapping, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::meta::Meta;
use super::Qcow2;
use crate::direct::DirectPin;
use crate::Error;

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
                let io = DirectPin::count(&self.inflight);
                let (m, run) = self.lookup(guest)?;
                if let Mapping::Data { host, copied: true } = m {
                    if run >= n as u64 {
                        self.check_data_write(host, n as u64)?;
                        self.file.write_at(chunk, host)?;
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

    /// Returns the offset of a writable (ours alone) L2 table for `guest`, allocating a new one
    /// or copying a shared one.
    fn writable_l2(&self, m: &mut Meta, guest: u64) -> Result<u64, Error> {
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
        m.l1[i] = new | COPIED;
        m.note_l2_moved(old, new);
        m.l1_dirty.insert(i);
        if old != 0 {
            m.pending_frees.push(old);
        }
        Ok(new)
    }

    /// Host clusters referenced by an L2 entry (for dropping its references).
    fn entry_clusters(&self, entry: u64) -> Vec<u64> {
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

    /// Writes `data` at `guest` within one cluster where the fast path could not: into a new
    /// cluster (copy-on-write) where the current one is not ours alone, in place otherwise.
    ///
    /// A new cluster is allocated under the lock, filled (old contents merged with `data`)
    /// outside it, and published by setting the L2 entry under the lock again, if nobody changed
    /// that entry meanwhile; otherwise the new cluster is released and the write starts over.
    /// In-place fills of subclusters stay under the lock, since two requests would share them.
    ///
    /// Returns false, having written nothing, when it had to wait for another request's claim on
    /// the cluster: the caller retries the fast path first.
    fn write_cluster(&self, data: &[u8], guest: u64) -> Result<bool, Error> {
        let cs = self.geo.cluster_size();
        let base = guest - guest % cs;
        let Some(claim) = Claim::new(self, base) else {
            return Ok(false);
        };
        loop {
            let mut m = self.lock();
            let l2 = self.writable_l2(&mut m, guest)?;
            let (entry, bitmap) = m.l2_words(l2, guest);
            let (mapping, run) = self
                .geo
                .decode(entry, bitmap, guest)
                .map_err(|e| super::fmt_err(&self.file, e))?;
            if let Mapping::Data { host, copied: true } = mapping {
                if run >= data.len() as u64 {
                    // The request that held the claim before us allocated it: write in place
                    // like the fast path, with neither the lock nor the claim.
                    let _io = DirectPin::count(&self.inflight);
                    drop(m);
                    drop(claim);
                    self.check_data_write(host, data.len() as u64)?;
                    return self.file.write_at(data, host).map(|()| true);
                }
            }
            let compressed = entry & COMPRESSED != 0;
            let host = if compressed { 0 } else { entry & OFFSET_MASK };
            let need_new = host == 0 || entry & COPIED == 0;
            // The span rewritten: touched subclusters with extended L2, else the whole cluster.
            let (span_start, span_end) = if self.geo.extended && !compressed {
                let sub = self.geo.sub_size();
                let s = (guest - base) / sub * sub;
                let e = (guest - base + data.len() as u64).div_ceil(sub) * sub;
                (s, e)
            } else {
                (0, cs)
            };
            let span_len = usize::try_from(span_end - span_start).unwrap_or(0);
            let mut content = vec![0u8; span_len];
            let at = usize::try_from(guest - base - span_start).unwrap_or(0);
            let new_bitmap = if !self.geo.extended {
                0
            } else if compressed {
                ALL_ALLOC
            } else {
                let sub = self.geo.sub_size();
                let first = span_start / sub;
                let count = (span_end - span_start) / sub;
                let touched = if count >= 32 {
                    ALL_ALLOC
                } else {
                    ((1u64 << count) - 1) << first
                };
                (bitmap | touched) & !(touched << 32)
            };
            if !need_new {
                // In place. Units (subclusters, or the cluster) already holding data get only the
                // new bytes: a fast-path writer may be writing the rest of them right now,
                // without the lock. The others are filled from what they read as now.
                let sub = self.geo.sub_size();
                let holds_data = |unit: u64| {
                    if self.geo.extended {
                        bitmap & (1 << unit) != 0
                    } else {
                        entry & ZERO == 0
                    }
                };
                let units = (span_start / sub)..(span_end / sub);
                self.check_data_write(host + span_start, span_end - span_start)?;
                if data.len() < span_len && !units.clone().all(holds_data) {
                    self.read_locked(&mut m, &mut content, base + span_start)?;
                }
                content[at..at + data.len()].copy_from_slice(data);
                let (d0, d1) = (at as u64, (at + data.len()) as u64);
                for unit in units {
                    let s0 = unit * sub - span_start;
                    let (lo, hi) = if holds_data(unit) {
                        (d0.max(s0), d1.min(s0 + sub))
                    } else {
                        (s0, s0 + sub)
                    };
                    if lo < hi {
                        let range =
                            usize::try_from(lo).unwrap_or(0)..usize::try_from(hi).unwrap_or(0);
                        self.file
                            .write_at(&content[range], host + span_start + lo)?;
                    }
                }
                m.set_l2_words(l2, guest, host | COPIED, new_bitmap);
                return Ok(true);
            }
            let target = m.alloc_cluster(&self.file)?;
            self.check_data_write(target, cs)?;
            drop(m);
            // Copy only what the new data does not cover: the head and the tail of the span.
            let (head, rest) = content.split_at_mut(at);
            let (middle, tail) = rest.split_at_mut(data.len());
            if !head.is_empty() {
                self.read_virtual(head, base + span_start)?;
            }
            if !tail.is_empty() {
                self.read_virtual(tail, base + span_start + (at + data.len()) as u64)?;
            }
            middle.copy_from_slice(data);
            if self.geo.extended && host != 0 && span_len as u64 != cs {
                // A shared cluster with subclusters: keep its other allocated subclusters.
                let mut old = vec![0u8; usize::try_from(cs).unwrap_or(0)];
                self.file.read_at(&mut old, host)?;
                self.file.write_at(&old, target)?;
            }
            self.file.write_at(&content, target + span_start)?;
            let mut m = self.lock();
            let l2_now = self.writable_l2(&mut m, guest)?;
            if l2_now != l2 || m.l2_words(l2, guest) != (entry, bitmap) {
                // Another request changed this cluster meanwhile: nothing points at ours.
                m.free_cluster(&self.file, target)?;
                continue;
            }
            m.set_l2_words(l2, guest, target | COPIED, new_bitmap);
            m.pending_frees.extend(self.entry_clusters(entry));
            return Ok(true);
        }
    }

    /// Whole clusters of `[offset, offset + len)`: (first cluster start, end), possibly empty.
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.geo.cluster_size();
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len == self.size {
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
        let cs = self.geo.cluster_size();
        let mut m = self.lock();
        let mut guest = start;
        while guest < end {
            let i = m.l1_index(guest);
            let (l2, _) = m.l1_entry(&self.file, i)?;
            let span = cs * self.geo.l2_entries();
            if l2 == 0 && self.backing.is_none() {
                // Unallocated without a backing image already reads as zeroes.
                guest = (guest / span + 1) * span;
                continue;
            }
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
                m.pending_frees.extend(self.entry_clusters(entry));
            }
            guest += cs;
        }
        Ok(())
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
