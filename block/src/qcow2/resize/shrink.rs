//! Shrinking a qcow2 image (`vmm-img resize --shrink`, and applying a snapshot of a smaller
//! disk), as QEMU's `qcow2_co_truncate` does: every cluster wholly past the new end loses the
//! active table's reference, the L2 tables wholly past it leave the L1 table (whose length in
//! the header stays, as QEMU keeps it), the header records the new size, and the file is cut
//! after its last cluster in use. A partial last cluster keeps its bytes.
//!
//! Power-cut order: the L2 entries past the end are cleared (a shared table copied first) and
//! the L1 entries of the tables dropped are zeroed, written and synced before any reference is
//! dropped (each drop waits for the write that stopped pointing at the cluster, see `meta.rs`);
//! the refcount blocks are written and synced; then the header with the new size, in one synced
//! write; the file is cut last. A cut leaves the old size with its tail reading as unallocated
//! (the data asked to go is gone, the rest intact, a few clusters leaked at most) or the new
//! size. Under the flush mutex and the metadata lock, as growing is (`resize.rs`).

use std::sync::atomic::Ordering;

use super::write_header;
use crate::qcow2::meta::Meta;
use crate::qcow2::Qcow2;
use crate::Error;

impl Qcow2 {
    /// Grows ([`Qcow2::grow`]) or shrinks the virtual disk to `new_size` bytes, for a caller
    /// that holds the image alone. The caller keeps it a multiple of 512, as QEMU requires of
    /// qcow2.
    pub fn resize(&self, new_size: u64) -> Result<(), Error> {
        if new_size < self.size.load(Ordering::Acquire) {
            self.shrink(new_size)
        } else {
            self.grow(new_size)
        }
    }

    /// Shrinks the virtual disk to `new_size` bytes (steps in the module documentation).
    fn shrink(&self, new_size: u64) -> Result<(), Error> {
        let path = || self.file.path().to_string();
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.refuse_if_corrupt()?;
        // As in `grow`: no write-back writes copies of the L2 tables this frees meanwhile.
        let _flushing = self.flushing();
        let mut m = self.lock();
        if m.header.version < 3 && m.header.nb_snapshots > 0 {
            return Err(Error::V2Snapshots { path: path() });
        }
        let size = m.header.size;
        let cs = m.cs();
        let span = cs * m.geo.l2_entries();
        // The first cluster wholly past the new end, and the L1 entries still needed.
        let first = new_size.div_ceil(cs) * cs;
        let kept_l1 = usize::try_from(new_size.div_ceil(span)).unwrap_or(usize::MAX);
        let kept_end = (new_size.div_ceil(span) * span).min(size);
        if first < kept_end {
            self.clear_entries(&mut m, first, kept_end)?;
        }
        let dropped = self.drop_l2_tables(&mut m, kept_l1)?;
        m.write_back(&self.file)?;
        m.sync(&self.file)?;
        for &l2 in &dropped {
            m.l2.remove(l2);
        }
        // The dropped tables leave the metadata index before they lose their reference.
        self.overlap.build(&self.file, &m)?;
        for l2 in dropped {
            m.free_cluster(&self.file, l2)?;
        }
        m.write_refcount_blocks(&self.file)?;
        m.sync(&self.file)?;
        let mut header = m.header.clone();
        header.size = new_size;
        write_header(&self.file, &m.header, &header)?;
        m.sync(&self.file)?;
        m.header = header;
        self.size.store(new_size, Ordering::Release);
        self.cut_file_end(&mut m)
    }

    /// Clears the entries of `[from, to)` (one L2 table's range, its tail) in the active table,
    /// copying a shared table first; their clusters' references drop once it is durable.
    fn clear_entries(&self, m: &mut Meta, from: u64, to: u64) -> Result<(), Error> {
        let cs = m.cs();
        let (l2, _) = m.l1_entry(&self.file, m.l1_index(from))?;
        if l2 == 0 {
            return Ok(());
        }
        m.load_l2(&self.file, l2)?;
        let mapped = |m: &Meta, l2: u64, g: u64| m.l2_words(l2, g) != (0, 0);
        if !(from..to)
            .step_by(usize::try_from(cs).unwrap_or(usize::MAX))
            .any(|g| mapped(m, l2, g))
        {
            return Ok(());
        }
        let l2 = self.writable_l2(m, from)?;
        let mut guest = from;
        while guest < to {
            let (entry, _) = m.l2_words(l2, guest);
            if mapped(m, l2, guest) {
                m.set_l2_words(l2, guest, 0, 0);
                m.drop_refs(self.entry_clusters(entry));
            }
            guest += cs;
        }
        Ok(())
    }

    /// Zeroes the active L1 entries from index `from` on, queueing the release of the data
    /// clusters their L2 tables reach; returns those tables, for the caller to free once the
    /// zeroed entries are durable.
    fn drop_l2_tables(&self, m: &mut Meta, from: usize) -> Result<Vec<u64>, Error> {
        let words = m.geo.words();
        let mut dropped = Vec::new();
        for i in from..m.l1.len() {
            let (l2, _) = m.l1_entry(&self.file, i)?;
            if l2 == 0 {
                continue;
            }
            m.load_l2(&self.file, l2)?;
            let entries = m.l2.peek(l2).cloned().unwrap_or_default();
            m.drop_refs(
                entries
                    .iter()
                    .step_by(words)
                    .flat_map(|&e| self.entry_clusters(e)),
            );
            m.set_l1(i, 0);
            dropped.push(l2);
        }
        Ok(dropped)
    }

    /// Cuts the file after its last cluster with a reference, as QEMU does after a shrink. Only
    /// gives space back: a failure is logged and the image stays valid.
    fn cut_file_end(&self, m: &mut Meta) -> Result<(), Error> {
        let cs = m.cs();
        let len = self.file.len()?;
        let mut end = len.div_ceil(cs);
        while end > 1 && m.refcount(&self.file, end - 1)? == 0 {
            end -= 1;
        }
        if end * cs < len {
            if let Err(e) = self.file.set_len(end * cs) {
                log::warn!("{e}");
                return Ok(());
            }
            m.end = m.end.min(end);
            m.free_hint = m.free_hint.min(end);
        }
        Ok(())
    }
}
