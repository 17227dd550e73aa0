//! A VMM's resident memory, split into guest RAM and the VMM's own overhead, from
//! `/proc/PID/smaps` (proc(5)).
//!
//! Guest RAM is an anonymous mapping as large as the guest's memory (or one per region, where the
//! VMM splits it around the 32-bit PCI hole), so every anonymous mapping of at least half the guest's
//! memory counts as guest RAM; everything else resident (code, libraries, heaps, stacks, device
//! buffers) is the VMM's overhead. With a 512 MiB guest that threshold is 256 MiB, far above any heap
//! arena (64 MiB) or thread stack (8 MiB).
//!
//! The overhead is also split by kind ([`Resident::kinds`]), to tell where it goes: files
//! (the program's and libraries' code and data), the mappings the kernel names (`[heap]`, the main
//! thread's `[stack]`, io_uring's rings), and anonymous mappings, told apart by their layout as
//! glibc makes them: a thread's stack lies just above its guard page (an inaccessible mapping), an
//! allocator arena's heap starts on a 64 MiB boundary just below the inaccessible rest of its
//! reservation, and any other (buffers mapped for themselves, say) is "anonymous".

use std::path::Path;

/// Errors reading a process's memory map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/PID/smaps` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `Size:` or `Rss:` line did not hold a number of kB.
    #[error("malformed smaps line {0:?}")]
    Malformed(String),
}

/// Resident memory of a VMM process, in KiB.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resident {
    /// Everything resident.
    pub total_kib: u64,
    /// Resident in the guest-RAM mappings.
    pub guest_kib: u64,
    /// The guest-RAM mappings' host address ranges (start, end), in address order.
    pub guest_ranges: Vec<(u64, u64)>,
    /// The rest by kind (see the module documentation), in the order first met.
    pub kinds: Vec<(String, u64)>,
    /// Each resident mapping outside guest RAM: its header line, its size and what is resident.
    pub mappings: Vec<String>,
}

impl Resident {
    /// The kinds as `KIND=KIB` words, separated by spaces.
    pub fn kind_words(&self) -> String {
        let words: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{k}={n}")).collect();
        words.join(" ")
    }
}

/// One mapping of an smaps text.
struct Mapping<'a> {
    header: &'a str,
    start: u64,
    end: u64,
    perms: &'a str,
    /// The path or the kernel's name; empty for an anonymous mapping.
    name: &'a str,
    size: u64,
    rss: u64,
}

impl Mapping<'_> {
    fn inaccessible_anonymous(&self) -> bool {
        self.name.is_empty() && self.perms.starts_with("---")
    }
}

/// Reads `/proc/PID/smaps` for a VMM whose guest has `guest_mem_kib` of memory.
pub fn resident(pid: u32, guest_mem_kib: u64) -> Result<Resident, Error> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(Path::new(&path)).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    parse_smaps(&text, guest_mem_kib)
}

fn kib(line: &str) -> Result<u64, Error> {
    let mut words = line.split_whitespace().skip(1);
    match (words.next().map(str::parse::<u64>), words.next()) {
        (Some(Ok(n)), Some("kB")) => Ok(n),
        _ => Err(Error::Malformed(line.to_owned())),
    }
}

/// Sums the `Rss:` of every mapping in an smaps text, and separately of the guest-RAM mappings.
pub fn parse_smaps(text: &str, guest_mem_kib: u64) -> Result<Resident, Error> {
    let maps = mappings(text)?;
    let mut r = Resident::default();
    for (i, m) in maps.iter().enumerate() {
        r.total_kib += m.rss;
        if m.name.is_empty() && m.size >= guest_mem_kib / 2 {
            r.guest_kib += m.rss;
            r.guest_ranges.push((m.start, m.end));
            continue;
        }
        if m.rss == 0 {
            continue;
        }
        let before = i.checked_sub(1).and_then(|j| maps.get(j));
        let after = maps.get(i + 1);
        let kind = if m.name.starts_with('/') {
            "file"
        } else if !m.name.is_empty() {
            m.name
        } else if m.start % ARENA_ALIGN == 0
            && after.is_some_and(|a| a.start == m.end && a.inaccessible_anonymous())
        {
            "arena"
        } else if before.is_some_and(|b| b.end == m.start && b.inaccessible_anonymous()) {
            "thread-stack"
        } else {
            "anonymous"
        };
        match r.kinds.iter_mut().find(|(k, _)| k == kind) {
            Some((_, n)) => *n += m.rss,
            None => r.kinds.push((kind.to_owned(), m.rss)),
        }
        r.mappings
            .push(format!("{} size={} rss={}", m.header, m.size, m.rss));
    }
    Ok(r)
}

/// The block [`resident_blocks`] maps by one character: x86's huge page, 2 MiB.
pub const BLOCK: u64 = 2 << 20;

/// Which [`BLOCK`]s of the host range `start..end` of process `pid` are resident, from
/// `/proc/PID/pagemap` (bit 63 of each 4 KiB page's entry: present; readable without privileges):
/// one character per block, `.` for none of its pages, `#` for all, `+` for some. Where in guest
/// RAM a guest touched memory, so each VMM's guest can be compared block by block.
pub fn resident_blocks(pid: u32, start: u64, end: u64) -> Result<String, Error> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    const PRESENT: u64 = 1 << 63;
    let path = format!("/proc/{pid}/pagemap");
    let read_err = |source| Error::Read {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(read_err)?;
    let pages_per_block = BLOCK / PAGE;
    let mut entries = vec![0u8; usize::try_from(pages_per_block * 8).unwrap_or(0)];
    let mut map = String::new();
    let mut block = start;
    while block < end {
        let pages = (end - block).min(BLOCK) / PAGE;
        let bytes = entries
            .get_mut(..usize::try_from(pages * 8).unwrap_or(0))
            .unwrap_or_default();
        file.read_exact_at(bytes, block / PAGE * 8)
            .map_err(read_err)?;
        let present = bytes
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap_or_default()) & PRESENT != 0)
            .count();
        map.push(match present {
            0 => '.',
            n if n as u64 == pages => '#',
            _ => '+',
        });
        block += BLOCK;
    }
    Ok(map)
}

/// glibc's arenas other than the main one are heaps reserved on this boundary (`HEAP_MAX_SIZE`,
/// 64 MiB on 64-bit hosts), in bytes.
const ARENA_ALIGN: u64 = 64 << 20;

/// The mappings of an smaps text, in its order (by address).
fn mappings(text: &str) -> Result<Vec<Mapping<'_>>, Error> {
    let mut maps: Vec<Mapping<'_>> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A header: "start-end perms offset dev inode [path]".
            let mut words = line.split_whitespace();
            let range = words.next().unwrap_or("");
            let perms = words.next().unwrap_or("");
            let name = words.nth(3).unwrap_or("");
            let (start, end) = range.split_once('-').unwrap_or((range, ""));
            let address = |a: &str| u64::from_str_radix(a, 16).unwrap_or(0);
            maps.push(Mapping {
                header: line.trim_end(),
                start: address(start),
                end: address(end),
                perms,
                name,
                size: 0,
                rss: 0,
            });
        } else if let Some(m) = maps.last_mut() {
            if first == "Size:" {
                m.size = kib(line)?;
            } else if first == "Rss:" {
                m.rss = kib(line)?;
            }
        }
    }
    Ok(maps)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c1000000 r-xp 00000000 fd:00 1234    /usr/bin/qemu-system-x86_64
Size:              16384 kB
Rss:                9000 kB
7f0000000000-7f0020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              100000 kB
7f1000000000-7f1004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                2000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
Size:                132 kB
Rss:                  16 kB
";

    #[test]
    fn guest_ram_is_the_large_anonymous_mapping() {
        let r = parse_smaps(SMAPS, 512 * 1024).unwrap();
        assert_eq!(r.total_kib, 111_016);
        assert_eq!(r.guest_kib, 100_000);
    }

    #[test]
    fn the_overhead_is_split_by_kind() {
        let text = format!(
            "{SMAPS}\
7f2000000000-7f2000021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                  40 kB
7f2000021000-7f2004000000 ---p 00000000 00:00 0
Size:              65404 kB
Rss:                   0 kB
7f3000000000-7f3000001000 ---p 00000000 00:00 0
Size:                  4 kB
Rss:                   0 kB
7f3000001000-7f3000201000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                  24 kB
7f4000000000-7f4000010000 rw-p 00000000 00:00 0
Size:                 64 kB
Rss:                  64 kB
7f5000000000-7f5000004000 rw-s 00000000 00:0f 55    anon_inode:[io_uring]
Size:                 16 kB
Rss:                  16 kB
"
        );
        let r = parse_smaps(&text, 512 * 1024).unwrap();
        assert_eq!(r.guest_kib, 100_000);
        assert_eq!(r.total_kib, 111_016 + 40 + 24 + 64 + 16);
        // The 64 MiB mapping starts on an arena's boundary, but no inaccessible rest follows it.
        assert_eq!(
            r.kinds,
            [
                ("file".to_owned(), 9000),
                ("anonymous".to_owned(), 2000 + 64),
                ("[stack]".to_owned(), 16),
                ("arena".to_owned(), 40),
                ("thread-stack".to_owned(), 24),
                ("anon_inode:[io_uring]".to_owned(), 16),
            ]
        );
        assert_eq!(r.mappings.len(), 7);
        assert_eq!(
            r.mappings[3],
            "7f2000000000-7f2000021000 rw-p 00000000 00:00 0 size=132 rss=40"
        );
    }

    #[test]
    fn malformed_numbers_are_refused() {
        let err = parse_smaps("7f-8f rw-p 0 00:00 0\nRss: lots kB\n", 1024).unwrap_err();
        assert!(matches!(err, Error::Malformed(ref l) if l == "Rss: lots kB"));
    }

    #[test]
    fn reading_a_missing_process_names_the_file() {
        let err = resident(u32::MAX, 1024).unwrap_err();
        assert!(matches!(err, Error::Read { ref path, .. } if path == "/proc/4294967295/smaps"));
    }

    #[test]
    fn resident_blocks_tell_touched_huge_pages_from_untouched() {
        // Four blocks of fresh memory, aligned to a block: touch all of the second block's
        // pages and one page of the fourth.
        let block = usize::try_from(BLOCK).unwrap();
        // Zeroed by the allocator as fresh pages the kernel maps when first touched (calloc).
        let mut memory = vec![0u8; 5 * block];
        let skip = memory.as_ptr().align_offset(block);
        let blocks = memory.get_mut(skip..skip + 4 * block).unwrap();
        // SAFETY: advice on memory this test owns; it changes how it is backed, not its contents.
        let advised = unsafe {
            libc::madvise(
                blocks.as_mut_ptr().cast(),
                blocks.len(),
                libc::MADV_NOHUGEPAGE,
            )
        };
        // Small pages, so that the test sees pages and not the host's choice of huge ones.
        assert_eq!(advised, 0);
        for page in (0..block).step_by(4096) {
            blocks[block + page] = 1;
        }
        blocks[3 * block + 8192] = 1;
        // The writes are what the test is about: keep the optimizer from dropping them.
        std::hint::black_box(&blocks);
        let start = blocks.as_ptr() as u64;
        let map = resident_blocks(std::process::id(), start, start + 4 * BLOCK).unwrap();
        drop(memory);
        assert_eq!(map, ".#.+");
    }

    #[test]
    fn our_own_process_has_resident_memory() {
        let r = resident(std::process::id(), 1 << 40).unwrap();
        assert!(r.total_kib > 0);
        assert_eq!(r.guest_kib, 0);
    }
}
