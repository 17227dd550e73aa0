//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.2, 5.2.6 "Device Operation"),
//! and the few guest-memory accesses around it.
//!
//! The layout is not assumed (virtio 1.x drivers may split buffers anywhere, 2.6.4 "Message
//! Framing"): the device-readable descriptors hold the 16-byte header and then any data to write;
//! the device-writable ones hold any data to read and end with the status byte. Guest input is
//! hostile. A chain that cannot be walked (descriptor loops, indices past the table, a bad
//! indirect table, a chain longer than the queue), a buffer outside guest memory, a readable
//! descriptor after a writable one, a missing header or a missing status byte is a
//! [`ChainError`]: the device then enters DEVICE_NEEDS_RESET, as QEMU's `virtio_error` does.
//! Everything else (unknown types, sectors past the end, overflow) is answered with a status.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use super::{HEADER_LEN, SECTOR_SHIFT};
use crate::virtio::GuestMemoryMmap;

/// A chain the device cannot answer at all; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain ended early: a loop, an index past the table, a bad indirect table, or a
    /// descriptor that could not be read.
    #[error("descriptor chain at head {0} is broken")]
    Broken(u16),
    /// More descriptors than the device accepts in one request.
    #[error("descriptor chain at head {head} is longer than {max} descriptors")]
    TooLong {
        /// Head index.
        head: u16,
        /// The limit.
        max: usize,
    },
    /// A buffer that is not all inside guest memory.
    #[error("buffer at {addr:#x} length {len} is outside guest memory")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor after a device-writable one (2.7.4.2).
    #[error("descriptor chain at head {0} has a readable descriptor after a writable one")]
    ReadableAfterWritable(u16),
    /// Fewer than 16 device-readable bytes for the request header.
    #[error("request at head {0} has no complete header")]
    MissingHeader(u16),
    /// No device-writable byte for the status.
    #[error("request at head {0} has no status byte")]
    MissingStatus(u16),
}

/// One guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request as the chain describes it; the buffers live in the caller's scratch vector.
#[derive(Debug, Clone, Copy)]
pub(super) struct Parsed {
    /// Head descriptor index (the used ring's id).
    pub head: u16,
    /// `virtio_blk_req.type`.
    pub req_type: u32,
    /// `virtio_blk_req.sector`.
    pub sector: u64,
    /// How many of the scratch buffers are device-readable (they come first).
    pub readable: usize,
    /// Device-readable bytes after the header (data to write, or a discard range list).
    pub out_len: u64,
    /// Device-writable bytes before the status byte (room for data to read).
    pub in_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Parsed {
    /// The disk byte offset and length of a read or write of `len` bytes, if it lies within a
    /// disk of `capacity` sectors and is whole sectors (virtio 1.2, 5.2.6.1: sizes are in
    /// 512-byte units).
    pub fn disk_range(&self, len: u64, capacity: u64) -> Option<u64> {
        if len & ((1 << SECTOR_SHIFT) - 1) != 0 {
            return None;
        }
        let end_sector = self.sector.checked_add(len >> SECTOR_SHIFT)?;
        if end_sector > capacity {
            return None;
        }
        self.sector.checked_mul(1 << SECTOR_SHIFT)
    }
}

/// Walks `chain` into `scratch` (cleared first) and reads the header.
pub(super) fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    scratch: &mut Vec<Buf>,
    max_descriptors: usize,
) -> Result<Parsed, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    scratch.clear();
    let mut readable = 0;
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        if scratch.len() == max_descriptors {
            return Err(ChainError::TooLong {
                head,
                max: max_descriptors,
            });
        }
        let len = desc.len();
        let size = usize::try_from(len).map_err(|_| ChainError::OutsideMemory {
            addr: desc.addr().raw_value(),
            len,
        })?;
        if len > 0 && !GuestMemoryBackend::check_range(mem, desc.addr(), size) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().raw_value(),
                len,
            });
        }
        if desc.is_write_only() {
            last = Some(desc);
        } else {
            if scratch.len() > readable {
                return Err(ChainError::ReadableAfterWritable(head));
            }
            readable += 1;
            last = Some(desc);
        }
        scratch.push(Buf {
            addr: desc.addr(),
            len,
        });
    }
    // The iterator stops silently on a loop, a bad index or an unreadable descriptor: the last
    // descriptor it gave then still points to a next one.
    match last {
        Some(desc) if !desc.has_next() => {}
        _ => return Err(ChainError::Broken(head)),
    }
    let total = |bufs: &[Buf]| bufs.iter().map(|b| u64::from(b.len)).sum::<u64>();
    let readable_len = total(&scratch[..readable]);
    let writable_len = total(&scratch[readable..]);
    if readable_len < HEADER_LEN {
        return Err(ChainError::MissingHeader(head));
    }
    if writable_len == 0 {
        return Err(ChainError::MissingStatus(head));
    }
    let status =
        locate(&scratch[readable..], writable_len - 1).ok_or(ChainError::MissingStatus(head))?;
    let mut header = [0u8; 16];
    copy_from_guest(mem, &scratch[..readable], 0, &mut header)
        .map_err(|()| ChainError::MissingHeader(head))?;
    let (type_bytes, rest) = header.split_at(4);
    let sector_bytes = &rest[4..];
    Ok(Parsed {
        head,
        req_type: u32::from_le_bytes(
            type_bytes
                .try_into()
                .map_err(|_| ChainError::MissingHeader(head))?,
        ),
        sector: u64::from_le_bytes(
            sector_bytes
                .try_into()
                .map_err(|_| ChainError::MissingHeader(head))?,
        ),
        readable,
        out_len: readable_len - HEADER_LEN,
        in_len: writable_len - 1,
        status,
    })
}

/// The guest address of byte `offset` of the concatenation of `bufs`.
fn locate(bufs: &[Buf], mut offset: u64) -> Option<GuestAddress> {
    for b in bufs {
        let len = u64::from(b.len);
        if offset < len {
            return b.addr.checked_add(offset);
        }
        offset -= len;
    }
    None
}

/// Calls `f` with each guest piece (address, length) of `len` bytes starting `skip` bytes into
/// the concatenation of `bufs`. Stops at the first error `f` returns.
pub(super) fn for_each_piece<E>(
    bufs: &[Buf],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
) -> Result<(), E> {
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(len);
        // Both fit: `take` is at most a descriptor's u32 length, and the range was checked to be
        // inside guest memory when the chain was parsed.
        if let (Some(addr), Ok(n)) = (b.addr.checked_add(skip), usize::try_from(take)) {
            f(addr, n)?;
        }
        skip = 0;
        len -= take;
    }
    Ok(())
}

/// Copies `out.len()` bytes from `skip` bytes into `bufs`.
pub(super) fn copy_from_guest(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: u64,
    out: &mut [u8],
) -> Result<(), ()> {
    let want = u64::try_from(out.len()).map_err(|_| ())?;
    let mut done = 0;
    for_each_piece(bufs, skip, want, |addr, n| {
        let dst = out.get_mut(done..done + n).ok_or(())?;
        mem.read_slice(dst, addr).map_err(|_| ())?;
        done += n;
        Ok(())
    })?;
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Copies `data` to `skip` bytes into `bufs` (as much as fits); returns the bytes written.
pub(super) fn copy_to_guest(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: u64,
    data: &[u8],
) -> Result<usize, ()> {
    let want = u64::try_from(data.len()).map_err(|_| ())?;
    let mut done = 0;
    for_each_piece(bufs, skip, want, |addr, n| {
        let src = data.get(done..done + n).ok_or(())?;
        mem.write_slice(src, addr).map_err(|_| ())?;
        done += n;
        Ok(())
    })?;
    Ok(done)
}

/// The host pointers of guest pieces, for the worker pool. `f` gets each host piece.
pub(super) fn host_pieces(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: u64,
    len: u64,
    mut f: impl FnMut(*mut u8, usize),
) -> Result<(), ()> {
    for_each_piece(bufs, skip, len, |addr, n| {
        for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
            let slice = slice.map_err(|_| ())?;
            f(slice.ptr_guard_mut().as_ptr(), slice.len());
        }
        Ok(())
    })
}
