//! Guest RAM: where it goes (around the 32-bit PCI hole) and the E820 map that tells the guest.
//!
//! RAM fills guest-physical memory from 0 up to [`MMIO_GAP_START`] (3 GiB); whatever is left
//! resumes at [`MMIO_GAP_END`] (4 GiB), so the hole stays free for MMIO devices and the APICs.
//! The E820 map (ACPI 6.5 chapter 15) marks the EBDA and BIOS area below 1 MiB reserved (the ACPI
//! tables live there) and everything else in the RAM ranges usable.
//!
//! Each RAM range is mapped at a host address aligned to [`HUGE_PAGE`] (as its guest address is)
//! and advised for transparent huge pages (`MADV_HUGEPAGE`), as QEMU maps its RAM: KVM maps a 2 MiB
//! guest page with one large page-table entry only when the host page under it is a huge page at
//! the same offset, and a guest on 4 KiB entries takes a fault per 4 KiB it first touches (many
//! times dearer under nested virtualization) and more TLB misses for good. The mappings are made
//! here, since vm-memory's own cannot be aligned, so vm-memory does not own them: guest RAM stays
//! mapped until the process ends, as the VM does (devices hold clones of the memory, and KVM's
//! memory slots point into it).

use std::io;
use std::ptr::null_mut;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// The concrete guest-memory type used everywhere in the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// E820 type of usable RAM (ACPI 6.5, table 15.312).
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory (ACPI 6.5, table 15.312).
pub const E820_RESERVED: u32 = 2;

/// Smallest guest RAM accepted: room for the boot structures below 1 MiB and a kernel above.
pub const MIN_MEM_BYTES: u64 = 8 << 20;

/// The size of a huge page (x86's 2 MiB): the alignment of each RAM mapping.
pub const HUGE_PAGE: usize = 2 << 20;

/// Errors from setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Less RAM than [`MIN_MEM_BYTES`].
    #[error("Guest memory of {bytes} bytes is too small: at least {} MiB needed", MIN_MEM_BYTES >> 20)]
    TooSmall {
        /// Requested size.
        bytes: u64,
    },
    /// More RAM than the host has.
    #[error("Guest memory of {} MiB is more than the host's {} MiB", bytes >> 20, host >> 20)]
    TooLarge {
        /// Requested size.
        bytes: u64,
        /// The host's physical memory.
        host: u64,
    },
    /// A size that is not a whole number of 4 KiB pages.
    #[error("Guest memory of {bytes} bytes is not a multiple of 4 KiB")]
    Unaligned {
        /// Requested size.
        bytes: u64,
    },
    /// The host refused the mapping.
    #[error("Cannot map {} MiB of guest memory", bytes >> 20)]
    Mmap {
        /// Requested size.
        bytes: u64,
        /// What mmap said.
        #[source]
        source: io::Error,
    },
    /// vm-memory refused a mapping made for it.
    #[error("Cannot use the {} MiB mapping at guest address {start:#x} as guest memory", len >> 20)]
    Region {
        /// The range's guest address.
        start: u64,
        /// The range's length.
        len: usize,
        /// What vm-memory said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A range that would end past the guest's address space.
    #[error("Guest memory of {len} bytes at {start:#x} ends past the address space")]
    PastEnd {
        /// The range's guest address.
        start: u64,
        /// The range's length.
        len: usize,
    },
    /// The ranges did not make one guest memory.
    #[error("Cannot assemble guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// The RAM ranges (start, length) for `bytes` of guest memory, split around the PCI hole.
pub fn ram_ranges(bytes: u64) -> Vec<(GuestAddress, u64)> {
    if bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), bytes - MMIO_GAP_START),
        ]
    }
}

/// Checks `bytes` against the limits and the host's RAM (`host_bytes`), then maps guest memory.
pub fn create_guest_memory(bytes: u64, host_bytes: u64) -> Result<GuestMemory, MemoryError> {
    if bytes < MIN_MEM_BYTES {
        return Err(MemoryError::TooSmall { bytes });
    }
    if bytes > host_bytes {
        return Err(MemoryError::TooLarge {
            bytes,
            host: host_bytes,
        });
    }
    if !bytes.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned { bytes });
    }
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(bytes) {
        // Fits: below the host's RAM size, which fits in usize.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let addr = map_aligned(len).map_err(|source| MemoryError::Mmap { bytes, source })?;
        let builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(MAP_FLAGS);
        // SAFETY: `addr` starts a live mapping of `len` bytes made just now by `map_aligned`,
        // which is never unmapped (see the module doc).
        let region = unsafe { builder.with_raw_mmap_pointer(addr) }
            .build()
            .map_err(|source| MemoryError::Region {
                start: start.0,
                len,
                source,
            })?;
        let region = GuestRegionMmap::new(region, start).ok_or(MemoryError::PastEnd {
            start: start.0,
            len,
        })?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(MemoryError::Collection)
}

/// The flags of every guest RAM mapping: private anonymous memory, backed when first touched.
const MAP_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `len` bytes of [`MAP_FLAGS`] memory at an address aligned to [`HUGE_PAGE`], advised for
/// transparent huge pages, and returns its address.
fn map_aligned(len: usize) -> Result<*mut u8, io::Error> {
    let total = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new mapping at an address the kernel picks; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            MAP_FLAGS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base_addr = base as usize;
    let head = base_addr.next_multiple_of(HUGE_PAGE) - base_addr;
    let tail = total - head - len;
    // SAFETY: `head` is below HUGE_PAGE, so `base + head` lies within the mapping of `total`
    // bytes just made.
    let start = unsafe { base.cast::<u8>().add(head) };
    // SAFETY: the slack before and after [start, start + len) lies within the mapping just made,
    // which nothing else uses yet; munmap of page-aligned parts of it only shrinks it.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap(start.add(len).cast(), tail);
        }
    }
    // SAFETY: advice on the mapping just made. It fails only where the kernel has no
    // transparent huge pages, and then the memory works all the same on small pages.
    unsafe { libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE) };
    Ok(start)
}

/// The E820 map (start, length, type) for `bytes` of guest RAM.
pub fn e820_map(bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(bytes) {
        let (start, len) = if start.0 == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start.0, len)
        };
        map.push((start, len, E820_RAM));
    }
    map
}

/// The host's physical RAM in bytes.
pub fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf reads a system constant and has no memory-safety preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let pages = u64::try_from(pages).unwrap_or(0);
    let page_size = u64::try_from(page_size).unwrap_or(0);
    pages.saturating_mul(page_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_above_3_gib_moves_above_4_gib() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(ram_ranges(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
        assert_eq!(
            ram_ranges(5 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 2 * GIB)]
        );
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let map = e820_map(5 * GIB);
        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, 3 * GIB - HIMEM_START, E820_RAM),
                (4 * GIB, 2 * GIB, E820_RAM),
            ]
        );
        let usable: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(usable, 5 * GIB - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            create_guest_memory(4 << 20, 8 * GIB),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            create_guest_memory(16 * GIB, 8 * GIB),
            Err(MemoryError::TooLarge { host, .. }) if host == 8 * GIB
        ));
        assert!(matches!(
            create_guest_memory((16 << 20) + 1, 8 * GIB),
            Err(MemoryError::Unaligned { .. })
        ));
        let mem = create_guest_memory(16 << 20, 8 * GIB).expect("16 MiB fits");
        assert_eq!(mem.num_regions(), 1);
    }

    /// The `VmFlags` of the mapping that starts at `addr` in `smaps`.
    fn vm_flags(smaps: &str, addr: usize) -> Option<&str> {
        let head = format!("{addr:x}-");
        // VmFlags is the last field of each mapping's block: the first after its header is its.
        smaps
            .lines()
            .skip_while(|l| !l.starts_with(&head))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .map(str::trim)
    }

    #[test]
    fn ram_is_mapped_on_huge_page_boundaries() {
        use vm_memory::GuestMemoryRegion;
        let mem = create_guest_memory(4 * GIB + (6 << 20), 8 * GIB).expect("maps");
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        for region in mem.iter() {
            let host = region.as_ptr() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "host address {host:#x}");
            assert_eq!(region.start_addr().0 % HUGE_PAGE as u64, 0);
            if thp {
                // The mapping's VmFlags carry "hg": advised for huge pages.
                let flags = vm_flags(&smaps, host).expect("the mapping is in smaps");
                assert!(flags.split(' ').any(|f| f == "hg"), "VmFlags: {flags}");
            }
        }
        // The memory is usable to its last byte.
        use vm_memory::Bytes;
        let last = GuestAddress(4 * GIB + GIB + (6 << 20) - 1);
        mem.write_obj(0xa5u8, last).expect("in range");
        assert_eq!(mem.read_obj::<u8>(last).expect("in range"), 0xa5);
    }

    #[test]
    fn memory_above_the_hole_is_mapped_there() {
        // Mappings are lazily backed, so 4 GiB costs nothing here.
        let mem = create_guest_memory(4 * GIB, 8 * GIB).expect("maps");
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(4 * GIB + GIB - 1)));
        assert!(!mem.address_in_range(GuestAddress(3 * GIB)));
    }
}
