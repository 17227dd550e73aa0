//! A VMM's resident memory, split into guest RAM and the VMM's own overhead, from
//! `/proc/PID/smaps` (proc(5)).
//!
//! Guest RAM is an anonymous mapping as large as the guest's memory (or one per region, where the
//! VMM splits it around the 32-bit PCI hole), so every anonymous mapping of at least half the guest's
//! memory counts as guest RAM; everything else resident (code, libraries, heaps, stacks, device
//! buffers) is the VMM's overhead. With a 512 MiB guest that threshold is 256 MiB, far above any heap
//! arena (64 MiB) or thread stack (8 MiB).

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resident {
    /// Everything resident.
    pub total_kib: u64,
    /// Resident in the guest-RAM mappings.
    pub guest_kib: u64,
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
    let mut r = Resident::default();
    // The mapping being read: anonymous (no path), and its size.
    let mut anonymous = false;
    let mut size = 0;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A header: "start-end perms offset dev inode [path]".
            anonymous = line.split_whitespace().nth(5).is_none();
            size = 0;
        } else if first == "Size:" {
            size = kib(line)?;
        } else if first == "Rss:" {
            let rss = kib(line)?;
            r.total_kib += rss;
            if anonymous && size >= guest_mem_kib / 2 {
                r.guest_kib += rss;
            }
        }
    }
    Ok(r)
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
    fn our_own_process_has_resident_memory() {
        let r = resident(std::process::id(), 1 << 40).unwrap();
        assert!(r.total_kib > 0);
        assert_eq!(r.guest_kib, 0);
    }
}
