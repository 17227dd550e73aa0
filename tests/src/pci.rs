//! The virtio-blk-pci case: a raw disk on the PCI bus, served by an iothread, with as many queues
//! as vCPUs (the default). The guest writes 4 MiB of random data with O_DIRECT, half from each
//! CPU (so each CPU's queue carries requests), reads it back with O_DIRECT and compares, and
//! prints its `/proc/interrupts` lines of the disk. The case wants: the data read back, the same
//! data in the image on the host (SHA-256), one MSI-X vector per queue (`virtio0-req.N`, each
//! having fired) and one for configuration changes (`virtio0-config`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cases::{self, Failure};
use crate::disks::base64;
use crate::guest::Guest;
use crate::target::{Boot, Kernel, Target};

/// vCPUs, hence queues.
const CPUS: u32 = 2;
/// Bytes the guest writes: 64 blocks of 64 KiB.
const WRITTEN: u64 = 4 << 20;
/// How long the guest's script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// The guest's script: writes and reads back half of the data from each CPU, then reports.
const SCRIPT: &str = "\
dd if=/dev/urandom of=/tmp/p bs=64k count=64 2>/dev/null
taskset -c 0 dd if=/tmp/p of=/dev/vda bs=64k count=32 oflag=direct 2>/dev/null
taskset -c 1 dd if=/tmp/p of=/dev/vda bs=64k skip=32 seek=32 count=32 oflag=direct 2>/dev/null
taskset -c 1 dd if=/dev/vda of=/tmp/r bs=64k count=32 iflag=direct 2>/dev/null
taskset -c 0 dd if=/dev/vda of=/tmp/r2 bs=64k skip=32 count=32 iflag=direct 2>/dev/null
cat /tmp/r2 >> /tmp/r
if cmp /tmp/p /tmp/r; then echo GUEST-PCI-VERIFY ok; else echo GUEST-PCI-VERIFY mismatch; fi
echo GUEST-PCI-SUM $(sha256sum < /tmp/p)
grep virtio /proc/interrupts | sed 's/^/GUEST-IRQ /'
echo GUEST-IRQS-DONE
poweroff -f
";

/// Errors of the case beside the guest's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image on the host does not hold what the guest wrote.
    #[error("the image holds sha256 {host}, the guest wrote {guest}")]
    HostData {
        /// The image's first bytes.
        host: String,
        /// What the guest said it wrote.
        guest: String,
    },
    /// Hashing the image on the host failed.
    #[error("cannot hash the image")]
    Hash(#[source] std::io::Error),
    /// The guest's interrupts are not one vector per queue and one for the configuration.
    #[error("expected virtio0-config and virtio0-req.0 to req.{last}, each req vector fired; got {lines:?}")]
    Vectors {
        /// The last queue.
        last: u32,
        /// The guest's `/proc/interrupts` lines.
        lines: Vec<String>,
    },
    /// A boot failed.
    #[error(transparent)]
    Boot(#[from] Failure),
}

/// What one `/proc/interrupts` line says: the name at its end and the sum of its per-CPU counts.
fn vector(line: &str) -> Option<(String, u64)> {
    let mut words = line.split_whitespace();
    words.next()?.strip_suffix(':')?;
    let counts: Vec<u64> = words
        .clone()
        .take(usize::try_from(CPUS).ok()?)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((words.last()?.to_owned(), counts.iter().sum()))
}

/// Whether `lines` show the config vector and one fired vector per queue, nothing else.
fn vectors_ok(lines: &[String]) -> bool {
    let mut names: Vec<(String, u64)> = lines.iter().filter_map(|l| vector(l)).collect();
    names.sort();
    let mut want = vec!["virtio0-config".to_owned()];
    want.extend((0..CPUS).map(|q| format!("virtio0-req.{q}")));
    names.len() == want.len()
        && names
            .iter()
            .zip(&want)
            .all(|((name, fired), w)| name == w && (name.ends_with("config") || *fired > 0))
}

/// Runs the case for `target`.
pub fn disk_on_pci(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    let image = std::env::temp_dir().join(format!(
        "linux-tests-{}-{}.raw",
        std::process::id(),
        name.replace('/', "-")
    ));
    let created = std::fs::File::create(&image).and_then(|f| f.set_len(2 * WRITTEN));
    created.map_err(|source| Failure::Image {
        path: image.display().to_string(),
        source,
    })?;
    let append = format!("guest.sh={}", base64(SCRIPT.as_bytes()));
    let mut boot = Boot::new(Kernel::BzImage, CPUS, 512, &append);
    boot.extra = [
        "-object".to_owned(),
        "iothread,id=io0".to_owned(),
        "-drive".to_owned(),
        format!("file={},format=raw,if=none,id=d0", image.display()),
        "-device".to_owned(),
        "virtio-blk-pci,drive=d0,id=vd0,iothread=io0".to_owned(),
    ]
    .into();
    let mut guest_sum = String::new();
    let mut irqs = Vec::new();
    let result = cases::drive(target, &boot, guest_dir, transcript, |g: &mut Guest| {
        let verify = g.wait_for("GUEST-PCI-VERIFY", SCRIPT_TIMEOUT)?;
        // "GUEST-PCI-VERIFY mismatch": the guest read back other data than it wrote.
        if verify.text.trim() != "GUEST-PCI-VERIFY ok" {
            return Err(Failure::Info(verify.text));
        }
        let sum = g.wait_line("GUEST-PCI-SUM", SCRIPT_TIMEOUT, |l| {
            l.trim_start().starts_with("GUEST-PCI-SUM")
        })?;
        guest_sum = sum.text.split_whitespace().nth(1).unwrap_or("").to_owned();
        loop {
            let line = g.wait_line("GUEST-IRQ", SCRIPT_TIMEOUT, |l| {
                l.trim_start().starts_with("GUEST-IRQ")
            })?;
            let text = line.text.trim_start();
            if text.starts_with("GUEST-IRQS-DONE") {
                break;
            }
            irqs.push(text.trim_start_matches("GUEST-IRQ").trim().to_owned());
        }
        Ok(String::new())
    });
    let checked = result.map_err(Error::from).and_then(|up| {
        if !vectors_ok(&irqs) {
            return Err(Error::Vectors {
                last: CPUS - 1,
                lines: irqs.clone(),
            });
        }
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {WRITTEN} '{}' | sha256sum",
                image.display()
            ))
            .output()
            .map_err(Error::Hash)?;
        let host = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned();
        if host.is_empty() || host != guest_sum {
            return Err(Error::HostData {
                host,
                guest: guest_sum.clone(),
            });
        }
        Ok(format!(
            "{up}; 4 MiB written and read back with O_DIRECT from both CPUs, the image holds it; \
             vectors: {}",
            irqs.iter()
                .filter_map(|l| vector(l))
                .map(|(n, c)| format!("{n} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    });
    let _ = std::fs::remove_file(&image);
    checked
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_lines_parse_and_want_a_fired_vector_per_queue() {
        let lines: Vec<String> = [
            "24:          0          0  PCI-MSIX-0000:00:01.0   0-edge      virtio0-config",
            "25:        130          0  PCI-MSIX-0000:00:01.0   1-edge      virtio0-req.0",
            "26:          0         97  PCI-MSIX-0000:00:01.0   2-edge      virtio0-req.1",
        ]
        .map(String::from)
        .into();
        assert_eq!(vector(&lines[1]), Some(("virtio0-req.0".to_owned(), 130)));
        assert!(vectors_ok(&lines));
        // A queue whose vector never fired, a missing queue, an extra line.
        let mut quiet = lines.clone();
        quiet[2] = quiet[2].replace("97", "0");
        assert!(!vectors_ok(&quiet));
        assert!(!vectors_ok(&lines[..2]));
        let mut extra = lines.clone();
        extra.push("27: 1 1 PCI-MSIX-0000:00:01.0 3-edge virtio0-req.2".into());
        assert!(!vectors_ok(&extra));
        // The mmio transport's single line does not pass.
        assert!(!vectors_ok(&["10: 5 5 IO-APIC 10-edge virtio0".to_owned()]));
    }
}
