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

/// The host pointers of guest pieces, for the I/O engines. `f` gets each host piece as a raw
/// pointer and length, never as a slice: the guest may change the bytes, or pass them to
/// another request, while the engines use them.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Parses the chain `descs` (written as given, head at index 0) of a 16-entry queue.
    fn parse_raw(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        max: usize,
    ) -> Result<Parsed, ChainError> {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_multiple_desc_chains(descs).unwrap();
        parse(chain, mem, &mut Vec::new(), max)
    }

    /// The same with NEXT links added between consecutive descriptors.
    fn parse_linked(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> Result<Parsed, ChainError> {
        let vq = MockSplitQueue::new(mem, 16);
        let raws: Vec<_> = descs.iter().map(|&(a, l, f)| raw(a, l, f, 0)).collect();
        let chain = vq.build_desc_chain(&raws).unwrap();
        parse(chain, mem, &mut Vec::new(), 16)
    }

    #[test]
    fn header_data_and_status_anywhere_in_the_chain() {
        let mem = mem();
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&1u32.to_le_bytes());
        h[8..].copy_from_slice(&0x1234u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x10000)).unwrap();
        // Header split over two descriptors, data after it in the second; status at the end of a
        // writable buffer.
        let p = parse_linked(
            &mem,
            &[
                (0x10000, 10, 0),
                (0x1000a, 6 + 512, 0),
                (0x20000, 8, F_WRITE),
            ],
        )
        .unwrap();
        assert_eq!((p.req_type, p.sector, p.readable), (1, 0x1234, 2));
        assert_eq!((p.out_len, p.in_len), (512, 7));
        assert_eq!(p.status, GuestAddress(0x20007));
    }

    #[test]
    fn structural_faults_are_chain_errors() {
        let mem = mem();
        let e = parse_linked(&mem, &[(0x10000, 8, 0), (0x20000, 1, F_WRITE)]);
        assert!(matches!(e, Err(ChainError::MissingHeader(0))));
        let e = parse_linked(&mem, &[(0x10000, 16, 0), (0x20000, 0, F_WRITE)]);
        assert!(matches!(e, Err(ChainError::MissingStatus(0))));
        let e = parse_linked(&mem, &[(0x10000, 16, 0)]);
        assert!(matches!(e, Err(ChainError::MissingStatus(0))));
        let e = parse_linked(
            &mem,
            &[(0x10000, 16, 0), (0x20000, 1, F_WRITE), (0x30000, 1, 0)],
        );
        assert!(matches!(e, Err(ChainError::ReadableAfterWritable(0))));
        let e = parse_linked(&mem, &[(0x10000, 16, 0), ((1 << 20) - 4, 8, F_WRITE)]);
        assert!(matches!(
            e,
            Err(ChainError::OutsideMemory {
                addr: 0xffffc,
                len: 8
            })
        ));
        let e = parse_linked(&mem, &[(u64::MAX - 2, 16, 0), (0x20000, 1, F_WRITE)]);
        assert!(matches!(e, Err(ChainError::OutsideMemory { .. })));
    }

    #[test]
    fn loops_bad_indices_and_long_chains_are_refused() {
        let mem = mem();
        // 0 -> 1 -> 0 -> ...
        let e = parse_raw(
            &mem,
            &[raw(0x10000, 16, F_NEXT, 1), raw(0x20000, 1, F_NEXT, 0)],
            64,
        );
        assert!(matches!(e, Err(ChainError::Broken(0))));
        // Through writable descriptors, the order check fires first: refused either way.
        let e = parse_raw(
            &mem,
            &[
                raw(0x10000, 16, F_NEXT, 1),
                raw(0x20000, 1, F_WRITE | F_NEXT, 0),
            ],
            64,
        );
        assert!(matches!(e, Err(ChainError::ReadableAfterWritable(0))));
        let e = parse_raw(&mem, &[raw(0x10000, 16, F_NEXT, 200)], 64);
        assert!(matches!(e, Err(ChainError::Broken(0))));
        let long = [
            raw(0x10000, 16, F_NEXT, 1),
            raw(0x11000, 512, F_NEXT, 2),
            raw(0x20000, 1, F_WRITE, 0),
        ];
        assert!(matches!(
            parse_raw(&mem, &long, 2),
            Err(ChainError::TooLong { head: 0, max: 2 })
        ));
        assert!(parse_raw(&mem, &long, 3).is_ok());
    }

    #[test]
    fn bad_indirect_tables_are_refused() {
        let mem = mem();
        // A table length that is not a whole number of descriptors.
        let e = parse_raw(&mem, &[raw(0x40000, 20, F_INDIRECT, 0)], 64);
        assert!(matches!(e, Err(ChainError::Broken(0))));
        // An indirect descriptor inside an indirect table (2.7.5.3.1).
        mem.write_obj(
            Descriptor::new(0x40000, 16, F_INDIRECT, 0),
            GuestAddress(0x40000),
        )
        .unwrap();
        let e = parse_raw(&mem, &[raw(0x40000, 16, F_INDIRECT, 0)], 64);
        assert!(matches!(e, Err(ChainError::Broken(0))));
    }

    #[test]
    fn disk_ranges_refuse_overflow_partial_sectors_and_the_end() {
        let p = |sector| Parsed {
            head: 0,
            req_type: 0,
            sector,
            readable: 1,
            out_len: 0,
            in_len: 0,
            status: GuestAddress(0),
        };
        assert_eq!(p(2).disk_range(1024, 4), Some(1024));
        assert_eq!(p(3).disk_range(1024, 4), None);
        assert_eq!(p(0).disk_range(100, 4), None);
        assert_eq!(p(u64::MAX).disk_range(512, u64::MAX), None);
        assert_eq!(
            p(u64::MAX >> 9).disk_range(0, u64::MAX),
            Some((u64::MAX >> 9) << 9)
        );
    }

    #[test]
    fn pieces_skip_across_buffers() {
        let bufs = [
            Buf {
                addr: GuestAddress(0x1000),
                len: 10,
            },
            Buf {
                addr: GuestAddress(0x2000),
                len: 0,
            },
            Buf {
                addr: GuestAddress(0x3000),
                len: 20,
            },
        ];
        let mut got = Vec::new();
        for_each_piece::<()>(&bufs, 8, 12, |a, n| {
            got.push((a.0, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(0x1008, 2), (0x3000, 10)]);
        assert_eq!(locate(&bufs, 10), Some(GuestAddress(0x3000)));
        assert_eq!(locate(&bufs, 30), None);
    }
}
