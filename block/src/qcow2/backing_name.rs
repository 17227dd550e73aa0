//! Rewriting the header of an image in place (spec "Header"): the backing file name and format a
//! live block job changes while the image is open, and the edits `rebase -u` and `amend` make.
//! Only the first cluster changes, in one write, synced before the call returns.

use super::{fmt_err, Header, Qcow2};
use crate::file::HostFile;
use crate::Error;

/// Writes `new` over `old` at the start of `file`, clearing what the old header, extensions and
/// backing name occupied past the new end, and syncs.
pub(crate) fn rewrite_header(file: &HostFile, old: &Header, new: &Header) -> Result<(), Error> {
    let old_len = old.encode().map_err(|e| fmt_err(file, e))?.len();
    let mut b = new.encode().map_err(|e| fmt_err(file, e))?;
    b.resize(b.len().max(old_len), 0);
    file.write_at(&b, 0)?;
    file.sync()
}

impl Qcow2 {
    /// Records `backing` (a name and its format), or none, in the header of this image opened
    /// read-write, under the metadata lock so that no other header write interleaves; the
    /// backing image already open stays as it is (the caller reopens the chain).
    pub fn set_backing_name(&self, backing: Option<(String, String)>) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut m = self.lock();
        let mut header = m.header.clone();
        header.backing = backing.map(|(name, format)| (name, Some(format)));
        rewrite_header(&self.file, &m.header, &header)?;
        m.header = header;
        Ok(())
    }
}
