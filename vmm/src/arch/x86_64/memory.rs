//! Guest RAM: where it goes (around the 32-bit PCI hole) and the E820 map that tells the guest.
//!
//! RAM fills guest-physical memory from 0 up to [`MMIO_GAP_START`] (3 GiB); whatever is left
//! resumes at [`MMIO_GAP_END`] (4 GiB), so the hole stays free for MMIO devices and the APICs.
//! The E820 map (ACPI 6.5 chapter 15) marks the EBDA and BIOS area below 1 MiB reserved (the ACPI
//! tables live there) and everything else in the RAM ranges usable.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// The concrete guest-memory type used everywhere in the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// E820 type of usable RAM (ACPI 6.5, table 15.312).
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory (ACPI 6.5, table 15.312).
pub const E820_RESERVED: u32 = 2;

/// Smallest guest RAM accepted: room for the boot structures below 1 MiB and a kernel above.
pub const MIN_MEM_BYTES: u64 = 8 << 20;

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
        source: vm_memory::mmap::FromRangesError,
    },
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
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
        .into_iter()
        // Fits: below the host's RAM size, which fits in usize.
        .map(|(start, len)| (start, usize::try_from(len).unwrap_or(usize::MAX)))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Mmap { bytes, source })
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

    #[test]
    fn memory_above_the_hole_is_mapped_there() {
        // Mappings are lazily backed, so 4 GiB costs nothing here.
        let mem = create_guest_memory(4 * GIB, 8 * GIB).expect("maps");
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(4 * GIB + GIB - 1)));
        assert!(!mem.address_in_range(GuestAddress(3 * GIB)));
    }
}
