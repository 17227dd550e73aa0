//! The virtio-blk-pci cases: a raw disk on the PCI bus, served by an iothread, with as many queues
//! as vCPUs.
//!
//! [`disk_on_pci`] (the default number of queues): the guest's kernel moves the function's BAR
//! before its driver binds (`pci=resource_alignment=20@00:01.0`: a 1 MiB boundary, which the
//! VMM's placement at 00:01.0 is not, as firmware or `pci=realloc` reassigning would), then
//! writes 4 MiB of random data with O_DIRECT, half from each CPU (so each CPU's queue carries
//! requests, notified at the BAR's new place), reads it back with O_DIRECT and compares, and
//! prints its `/proc/interrupts` lines of the disk. The case wants: BAR 0 moved (64-bit, on a
//! 1 MiB boundary), the data read back, the same data in the image on the host (SHA-256),
//! one MSI-X vector per queue (`virtio0-req.N`, each having fired) and one for configuration
//! changes (`virtio0-config`).
//!
//! [`bar_above_4_gib`] (the guest's kernel keeps the VMM's placement): the same I/O and checks,
//! and the case wants the root bus's resources (its dmesg) to hold a memory window above 4 GiB
//! and BAR 0 (64-bit) to be in it, where the VMM placed it.
//!
//! [`intx_without_msi`] (the guest booted with `pci=nomsi`, so the function interrupts through
//! INTA#, the `_PRT`'s GSI, level-triggered): the fio `--verify` run of
//! [`queues_on_two_iothreads`] on one iothread, and the case wants fio to pass, the image to hold
//! what the guest reads, and the disk's one interrupt to be an IOAPIC pin in fasteoi (level)
//! mode that fired, with no MSI-X vector.
//!
//! [`queues_on_their_cpus`] (`num-queues` given, the guest with fio): fio reads with one job per
//! vCPU, each pinned to its own (`--cpus_allowed_policy=split`), and the case wants each queue's
//! vector to have fired on its own CPU only: `virtio0-req.K` counted in the column of CPU K and
//! nowhere else, which is the guest's managed interrupt affinity honoured by the
//! MSI routes (a route that ignored the destination would put them all on CPU 0).
//!
//! [`queues_on_two_iothreads`] (`iothread-vq-mapping` over two iothreads, one queue each): fio
//! writes with one job per vCPU, each pinned to its own and writing its own half of the first
//! 4 MiB, then reads it back and checks each block's crc32c (`--verify=crc32c`); the case wants
//! fio to pass, both queues' vectors to have fired (so both iothreads served requests), and the
//! image on the host to hold what the guest reads (SHA-256 of the first 4 MiB).

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

/// The guest's script: says where BAR 0 is, writes and reads back half of the data from each
/// CPU, then reports.
const SCRIPT: &str = "\
dmesg | grep 'root bus resource' | sed 's/^/GUEST-PCI-ROOT /'
echo GUEST-PCI-BAR $(head -n 1 /sys/bus/pci/devices/0000:00:01.0/resource)
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

/// fio's jobs: one per vCPU, each pinned to its own, 4 KiB random reads of the whole disk.
const FIO_SCRIPT: &str = "\
fio --name=mq --filename=/dev/vda --direct=1 --ioengine=psync --rw=randread --bs=4k \
 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split > /tmp/fio.out 2>&1
status=$?
if [ $status = 0 ]; then echo GUEST-FIO ok; else cat /tmp/fio.out; echo GUEST-FIO status $status; fi
grep virtio /proc/interrupts | sed 's/^/GUEST-IRQ /'
echo GUEST-IRQS-DONE
poweroff -f
";

/// fio's writing jobs on the mapped disk: one per vCPU, each pinned to its own and writing (then
/// verifying) its own 2 MiB, then the guest's SHA-256 of the 4 MiB they wrote.
const FIO_VERIFY_SCRIPT: &str = "\
fio --name=map --filename=/dev/vda --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
 --size=2M --offset_increment=2M --verify=crc32c --verify_fatal=1 \
 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split > /tmp/fio.out 2>&1
status=$?
if [ $status = 0 ]; then echo GUEST-FIO ok; else cat /tmp/fio.out; echo GUEST-FIO status $status; fi
echo GUEST-PCI-SUM $(dd if=/dev/vda bs=64k count=64 iflag=direct 2>/dev/null | sha256sum)
grep virtio /proc/interrupts | sed 's/^/GUEST-IRQ /'
echo GUEST-IRQS-DONE
poweroff -f
";

/// Errors of the cases beside the guest's.
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
    /// The guest's interrupts are not one IOAPIC level-triggered line of the disk that fired.
    #[error(
        "expected one IO-APIC fasteoi line virtio0 that fired, no MSI-X vector; got {lines:?}"
    )]
    Intx {
        /// The guest's `/proc/interrupts` lines.
        lines: Vec<String>,
    },
    /// A queue's vector fired on another CPU than its own, or not on its own.
    #[error("expected virtio0-req.K to fire on CPU K only, K = 0 to {last}; got {lines:?}")]
    Affinity {
        /// The last queue.
        last: u32,
        /// The guest's `/proc/interrupts` lines.
        lines: Vec<String>,
    },
    /// The guest's kernel did not move BAR 0 as asked, or it is not a 64-bit BAR.
    #[error("expected BAR 0 moved to a 1 MiB boundary, 64-bit; the guest said {0:?}")]
    Bar(String),
    /// BAR 0 is not in a root bus window above 4 GiB, or the guest has no such window.
    #[error("expected BAR 0 (64-bit) in the root bus's window above 4 GiB; the guest said BAR {bar:?}, windows {windows:?}")]
    Bar64 {
        /// The guest's sysfs `resource` line of BAR 0.
        bar: String,
        /// The root bus's memory windows the guest's kernel printed (start, end).
        windows: Vec<(u64, u64)>,
    },
    /// A boot failed.
    #[error(transparent)]
    Boot(#[from] Failure),
}

/// The guest kernel's alignment of the disk's BARs in [`disk_on_pci`]: 2^20 bytes.
const MOVED_ALIGN: u64 = 1 << 20;

/// IORESOURCE_MEM_64, in the flags of a sysfs `resource` line.
const RESOURCE_MEM_64: u64 = 0x0010_0000;

/// The start, end and flags of a sysfs `resource` line (three hex numbers).
fn resource(line: &str) -> Option<(u64, u64, u64)> {
    let words: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect();
    let [start, end, flags] = words[..] else {
        return None;
    };
    Some((start, end, flags))
}

/// Whether a sysfs `resource` line is a 64-bit memory BAR of at least 32 KiB on a
/// [`MOVED_ALIGN`] boundary (the kernel grows the resource to the alignment it was asked for;
/// the BAR itself stays 32 KiB).
fn bar_moved(line: &str) -> bool {
    let Some((start, end, flags)) = resource(line) else {
        return false;
    };
    start != 0
        && start.is_multiple_of(MOVED_ALIGN)
        && end.checked_sub(start).is_some_and(|d| d >= 0x7fff)
        && flags & RESOURCE_MEM_64 != 0
}

/// The transcript's `GUEST-PCI-BAR` line: BAR 0's sysfs `resource` line.
fn bar_line(transcript: Option<&str>) -> String {
    transcript
        .unwrap_or("")
        .lines()
        .find_map(|l| Some(l.split_once("GUEST-PCI-BAR")?.1))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// [`Error::Bar`] unless the transcript's `GUEST-PCI-BAR` line passes [`bar_moved`]; what it
/// found otherwise.
fn check_bar(transcript: Option<&str>) -> Result<String, Error> {
    let line = bar_line(transcript);
    if bar_moved(&line) {
        Ok("BAR 0 moved by the guest to a 1 MiB boundary".to_owned())
    } else {
        Err(Error::Bar(line))
    }
}

/// The root bus's memory windows in the transcript's `GUEST-PCI-ROOT` lines (the kernel's
/// `pci_bus 0000:00: root bus resource [mem 0x100000000-0x8ffffffff window]`).
fn root_windows(transcript: &str) -> Vec<(u64, u64)> {
    let hex = |w: &str| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok();
    transcript
        .lines()
        .filter(|l| l.contains("GUEST-PCI-ROOT"))
        .filter_map(|l| {
            let range = l.split_once("[mem ")?.1.split_once(" window]")?.0;
            let (start, end) = range.split_once('-')?;
            Some((hex(start)?, hex(end)?))
        })
        .collect()
}

/// Whether BAR 0's sysfs `resource` line is a 64-bit memory BAR of 32 KiB at or above 4 GiB,
/// within one of the root bus's `windows`.
fn bar_above_4_gib_in(line: &str, windows: &[(u64, u64)]) -> bool {
    let Some((start, end, flags)) = resource(line) else {
        return false;
    };
    start >= 1 << 32
        && end.checked_sub(start) == Some(0x7fff)
        && flags & RESOURCE_MEM_64 != 0
        && windows.iter().any(|&(s, e)| s <= start && end <= e)
}

/// [`Error::Bar64`] unless [`bar_above_4_gib_in`] holds for the transcript's BAR and windows;
/// what it found otherwise.
fn check_bar_above_4_gib(transcript: Option<&str>) -> Result<String, Error> {
    let bar = bar_line(transcript);
    let windows = root_windows(transcript.unwrap_or(""));
    if bar_above_4_gib_in(&bar, &windows) {
        let windows: Vec<String> = windows
            .iter()
            .map(|(s, e)| format!("{s:#x}-{e:#x}"))
            .collect();
        Ok(format!(
            "BAR 0 {bar} in the root bus window above 4 GiB (windows {})",
            windows.join(", ")
        ))
    } else {
        Err(Error::Bar64 { bar, windows })
    }
}

/// What one `/proc/interrupts` line says: the name at its end and its per-CPU counts.
fn vector(line: &str) -> Option<(String, Vec<u64>)> {
    let mut words = line.split_whitespace();
    words.next()?.strip_suffix(':')?;
    let counts: Vec<u64> = words
        .clone()
        .take(usize::try_from(CPUS).ok()?)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((words.last()?.to_owned(), counts))
}

/// Whether `lines` show the config vector and one fired vector per queue, nothing else.
fn vectors_ok(lines: &[String]) -> bool {
    let mut names: Vec<(String, Vec<u64>)> = lines.iter().filter_map(|l| vector(l)).collect();
    names.sort();
    let mut want = vec!["virtio0-config".to_owned()];
    want.extend((0..CPUS).map(|q| format!("virtio0-req.{q}")));
    names.len() == want.len()
        && names.iter().zip(&want).all(|((name, counts), w)| {
            name == w && (name.ends_with("config") || counts.iter().sum::<u64>() > 0)
        })
}

/// [`Error::Vectors`] unless [`vectors_ok`] holds for these `/proc/interrupts` lines.
fn check_vectors(lines: &[String]) -> Result<(), Error> {
    if vectors_ok(lines) {
        return Ok(());
    }
    Err(Error::Vectors {
        last: CPUS - 1,
        lines: lines.to_vec(),
    })
}

/// Whether `lines` show the disk's one interrupt: `virtio0` on an IOAPIC pin, level-triggered
/// (Linux's fasteoi flow), having fired; nothing else of the disk (no MSI-X vector).
fn intx_ok(lines: &[String]) -> bool {
    let [line] = lines else {
        return false;
    };
    vector(line).is_some_and(|(name, counts)| {
        name == "virtio0"
            && counts.iter().sum::<u64>() > 0
            && line.contains("IO-APIC")
            && line.contains("-fasteoi")
    })
}

/// [`Error::Intx`] unless [`intx_ok`] holds for these `/proc/interrupts` lines.
fn check_intx(lines: &[String]) -> Result<(), Error> {
    if intx_ok(lines) {
        return Ok(());
    }
    Err(Error::Intx {
        lines: lines.to_vec(),
    })
}

/// Whether each queue's vector in `lines` fired on its own CPU and on no other.
fn affinity_ok(lines: &[String]) -> bool {
    let vectors: Vec<(String, Vec<u64>)> = lines.iter().filter_map(|l| vector(l)).collect();
    (0..CPUS).all(|q| {
        let name = format!("virtio0-req.{q}");
        let Some((_, counts)) = vectors.iter().find(|(n, _)| *n == name) else {
            return false;
        };
        counts
            .iter()
            .enumerate()
            .all(|(cpu, &c)| (u32::try_from(cpu) == Ok(q)) == (c > 0))
    })
}

/// The per-vector figures of a passed case: `name a/b` with a count per CPU.
fn describe(lines: &[String]) -> String {
    lines
        .iter()
        .filter_map(|l| vector(l))
        .map(|(n, c)| {
            let per_cpu: Vec<String> = c.iter().map(u64::to_string).collect();
            format!("{n} {}", per_cpu.join("/"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fresh raw image of `2 * WRITTEN` bytes for the case `name`, and the boot of `initrd` with
/// `script`, the `iothreads` and the disk on `device` (`-device`'s value, `drive=d0`).
fn pci_boot(
    name: &str,
    initrd: &'static str,
    script: &str,
    iothreads: &[&str],
    device: &str,
) -> Result<(std::path::PathBuf, Boot), Failure> {
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
    let append = format!("guest.sh={}", base64(script.as_bytes()));
    let mut boot = Boot::new(Kernel::BzImage, CPUS, 512, &append);
    boot.initrd = initrd;
    let mut extra = Vec::new();
    for id in iothreads {
        extra.extend(["-object".to_owned(), format!("iothread,id={id}")]);
    }
    extra.extend([
        "-drive".to_owned(),
        format!("file={},format=raw,if=none,id=d0", image.display()),
        "-device".to_owned(),
        device.to_owned(),
    ]);
    boot.extra = extra;
    Ok((image, boot))
}

/// Reads the guest's `GUEST-IRQ` lines up to `GUEST-IRQS-DONE`.
fn read_irqs(g: &mut Guest) -> Result<Vec<String>, Failure> {
    let mut irqs = Vec::new();
    loop {
        let line = g.wait_line("GUEST-IRQ", SCRIPT_TIMEOUT, |l| {
            l.trim_start().starts_with("GUEST-IRQ")
        })?;
        let text = line.text.trim_start();
        if text.starts_with("GUEST-IRQS-DONE") {
            return Ok(irqs);
        }
        irqs.push(text.trim_start_matches("GUEST-IRQ").trim().to_owned());
    }
}

/// [`Error::HostData`] unless the first [`WRITTEN`] bytes of `image` hash to `guest_sum`.
fn check_host_data(image: &Path, guest_sum: &str) -> Result<(), Error> {
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
            guest: guest_sum.to_owned(),
        });
    }
    Ok(())
}

/// Reads the guest's `GUEST-PCI-SUM` line: the SHA-256 it printed.
fn read_sum(g: &mut Guest) -> Result<String, Failure> {
    let sum = g.wait_line("GUEST-PCI-SUM", SCRIPT_TIMEOUT, |l| {
        l.trim_start().starts_with("GUEST-PCI-SUM")
    })?;
    Ok(sum.text.split_whitespace().nth(1).unwrap_or("").to_owned())
}

/// Runs the `virtio-blk-pci` case for `target`.
pub fn disk_on_pci(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    let append = format!(" pci=resource_alignment={}@00:01.0", MOVED_ALIGN.ilog2());
    verified_io(target, guest_dir, (name, &append), transcript, check_bar)
}

/// Runs the `virtio-blk-pci-bar64` case for `target`.
pub fn bar_above_4_gib(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    verified_io(
        target,
        guest_dir,
        (name, ""),
        transcript,
        check_bar_above_4_gib,
    )
}

/// Boots the guest of [`SCRIPT`] (case `name`, `append` added to its command line) with the
/// disk on an iothread, checks its I/O, vectors and image, then its BAR with `bar` (which says
/// what it found).
fn verified_io(
    target: Target,
    guest_dir: &Path,
    (name, append): (&str, &str),
    transcript: &mut Option<String>,
    bar: fn(Option<&str>) -> Result<String, Error>,
) -> Result<String, Error> {
    let (image, mut boot) = pci_boot(
        name,
        "initrd.img",
        SCRIPT,
        &["io0"],
        "virtio-blk-pci,drive=d0,id=vd0,iothread=io0",
    )?;
    boot.append.push_str(append);
    // "GUEST-PCI-VERIFY mismatch": the guest read back other data than it wrote.
    let result = written_and_checked(
        target,
        &boot,
        guest_dir,
        transcript,
        ("GUEST-PCI-VERIFY", check_vectors),
        &image,
    );
    let checked = result.and_then(|(up, irqs)| {
        let bar = bar(transcript.as_deref())?;
        Ok(format!(
            "{up}; {bar}; 4 MiB written and read back with O_DIRECT from both CPUs, the image \
             holds it; vectors (per CPU): {}",
            describe(&irqs)
        ))
    });
    let _ = std::fs::remove_file(&image);
    checked
}

/// Runs the `virtio-blk-pci-mq-affinity` case for `target`.
pub fn queues_on_their_cpus(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    let device = format!("virtio-blk-pci,drive=d0,id=vd0,iothread=io0,num-queues={CPUS}");
    let (image, boot) = pci_boot(name, "initrd-fio.img", FIO_SCRIPT, &["io0"], &device)?;
    let mut irqs = Vec::new();
    let result = cases::drive(target, &boot, guest_dir, transcript, |g: &mut Guest| {
        // "GUEST-FIO status N": fio failed, its output just before in the transcript.
        expect_ok(g, "GUEST-FIO")?;
        irqs = read_irqs(g)?;
        Ok(String::new())
    });
    let checked = result.map_err(Error::from).and_then(|up| {
        check_vectors(&irqs)?;
        if !affinity_ok(&irqs) {
            return Err(Error::Affinity {
                last: CPUS - 1,
                lines: irqs.clone(),
            });
        }
        Ok(format!(
            "{up}; fio with a job per CPU, each queue's vector on its own CPU only \
             (per CPU): {}",
            describe(&irqs)
        ))
    });
    let _ = std::fs::remove_file(&image);
    checked
}

/// A check of the guest's `/proc/interrupts` lines of the disk.
type IrqCheck = fn(&[String]) -> Result<(), Error>;

/// Boots `boot`, waits for the guest script's `marker` line saying `ok`, then for the checksum
/// of what it wrote and its interrupt counts; checks the interrupts with `irqs_ok` and that
/// `image` holds the data the guest read. Returns the boot's summary and the interrupt lines.
fn written_and_checked(
    target: Target,
    boot: &Boot,
    guest_dir: &Path,
    transcript: &mut Option<String>,
    (marker, irqs_ok): (&str, IrqCheck),
    image: &Path,
) -> Result<(String, Vec<String>), Error> {
    let mut guest_sum = String::new();
    let mut irqs = Vec::new();
    let up = cases::drive(target, boot, guest_dir, transcript, |g: &mut Guest| {
        expect_ok(g, marker)?;
        guest_sum = read_sum(g)?;
        irqs = read_irqs(g)?;
        Ok(String::new())
    })?;
    irqs_ok(&irqs)?;
    check_host_data(image, &guest_sum)?;
    Ok((up, irqs))
}

/// Waits for the guest script's `MARKER` line and fails unless it says `MARKER ok`.
fn expect_ok(g: &mut Guest, marker: &str) -> Result<(), Failure> {
    let line = g.wait_for(marker, SCRIPT_TIMEOUT)?;
    if line.text.trim() != format!("{marker} ok") {
        return Err(Failure::Info(line.text));
    }
    Ok(())
}

/// Runs the `virtio-blk-pci-vq-mapping` case for `target`.
pub fn queues_on_two_iothreads(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    let device = r#"{"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0",
        "iothread-vq-mapping": [{"iothread": "io0"}, {"iothread": "io1"}]}"#;
    let (image, boot) = pci_boot(
        name,
        "initrd-fio.img",
        FIO_VERIFY_SCRIPT,
        &["io0", "io1"],
        device,
    )?;
    // "GUEST-FIO status N": fio failed (a verify error among them), its output just before.
    let result = written_and_checked(
        target,
        &boot,
        guest_dir,
        transcript,
        ("GUEST-FIO", check_vectors),
        &image,
    );
    let checked = result.map(|(up, irqs)| {
        format!(
            "{up}; fio --verify=crc32c with a job per CPU over queues on io0 and io1 passed, the \
             image holds what the guest reads; vectors (per CPU): {}",
            describe(&irqs)
        )
    });
    let _ = std::fs::remove_file(&image);
    checked
}

/// Runs the `virtio-blk-pci-intx` case for `target`.
pub fn intx_without_msi(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    let (image, mut boot) = pci_boot(
        name,
        "initrd-fio.img",
        FIO_VERIFY_SCRIPT,
        &["io0"],
        "virtio-blk-pci,drive=d0,id=vd0,iothread=io0",
    )?;
    boot.append.push_str(" pci=nomsi");
    // "GUEST-FIO status N": fio failed (a verify error among them), its output just before.
    let result = written_and_checked(
        target,
        &boot,
        guest_dir,
        transcript,
        ("GUEST-FIO", check_intx),
        &image,
    );
    let checked = result.map(|(up, irqs)| {
        format!(
            "{up}; pci=nomsi: fio --verify=crc32c with a job per CPU passed, the image holds \
             what the guest reads; the disk's interrupt: {}",
            irqs.join(" | ")
        )
    });
    let _ = std::fs::remove_file(&image);
    checked
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `/proc/interrupts` lines of a two-queue disk whose queues fired each on its own CPU.
    fn two_queues() -> Vec<String> {
        [
            "24:          0          0  PCI-MSIX-0000:00:01.0   0-edge      virtio0-config",
            "25:        130          0  PCI-MSIX-0000:00:01.0   1-edge      virtio0-req.0",
            "26:          0         97  PCI-MSIX-0000:00:01.0   2-edge      virtio0-req.1",
        ]
        .map(String::from)
        .into()
    }

    #[test]
    fn interrupt_lines_parse_and_want_a_fired_vector_per_queue() {
        let lines = two_queues();
        assert_eq!(
            vector(&lines[1]),
            Some(("virtio0-req.0".to_owned(), vec![130, 0]))
        );
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

    #[test]
    fn the_bar_must_have_moved_to_the_alignment_asked_and_be_64_bit() {
        // What the guest said in the nested host: the resource grown to 1 MiB.
        let moved = "0x00000000c0000000 0x00000000c00fffff 0x0000000000140204";
        assert!(bar_moved(moved));
        assert!(bar_moved(
            "0x00000000c0000000 0x00000000c0007fff 0x0000000000140204"
        ));
        // The transcript's lines start with their time.
        let transcript = format!("   6.040 GUEST-USERSPACE-UP\n   7.179 GUEST-PCI-BAR {moved}\n");
        assert!(check_bar(Some(&transcript)).is_ok());
        // Where the VMM placed it (00:01.0), a 32-bit BAR, smaller than the BAR, nothing.
        assert!(!bar_moved(
            "0x00000000c0008000 0x00000000c000ffff 0x0000000000140204"
        ));
        assert!(!bar_moved(
            "0x00000000c0000000 0x00000000c00fffff 0x0000000000040200"
        ));
        assert!(!bar_moved(
            "0x00000000c0000000 0x00000000c0003fff 0x0000000000140204"
        ));
        assert!(!bar_moved(
            "0x0000000000000000 0x0000000000000000 0x0000000000000000"
        ));
        assert!(matches!(check_bar(None), Err(Error::Bar(l)) if l.is_empty()));
    }

    #[test]
    fn the_bar_must_be_above_4_gib_in_a_root_window() {
        // What the guest printed in the nested host, with the transcript's times.
        let transcript = "   1.2 GUEST-PCI-ROOT [    0.31] pci_bus 0000:00: root bus resource \
            [mem 0xc0000000-0xcfffffff window]\n   1.2 GUEST-PCI-ROOT [    0.31] pci_bus \
            0000:00: root bus resource [mem 0x100000000-0x8ffffffff window]\n   1.2 \
            GUEST-PCI-ROOT [    0.31] pci_bus 0000:00: root bus resource [bus 00]\n   1.3 \
            GUEST-PCI-BAR 0x0000000100008000 0x000000010000ffff 0x0000000000140204\n";
        let windows = root_windows(transcript);
        assert_eq!(
            windows,
            [(0xc000_0000, 0xcfff_ffff), (0x1_0000_0000, 0x8_ffff_ffff)]
        );
        assert!(check_bar_above_4_gib(Some(transcript)).is_ok());
        let high = "0x0000000100008000 0x000000010000ffff 0x0000000000140204";
        // Below 4 GiB, outside every window, 32-bit, another size, no window above 4 GiB.
        assert!(!bar_above_4_gib_in(
            "0x00000000c0008000 0x00000000c000ffff 0x0000000000140204",
            &windows
        ));
        assert!(!bar_above_4_gib_in(
            "0x0000000900008000 0x000000090000ffff 0x0000000000140204",
            &windows
        ));
        assert!(!bar_above_4_gib_in(
            "0x0000000100008000 0x000000010000ffff 0x0000000000040200",
            &windows
        ));
        assert!(!bar_above_4_gib_in(
            "0x0000000100000000 0x00000001000fffff 0x0000000000140204",
            &windows
        ));
        assert!(!bar_above_4_gib_in(high, &windows[..1]));
        assert!(matches!(
            check_bar_above_4_gib(None),
            Err(Error::Bar64 { bar, windows }) if bar.is_empty() && windows.is_empty()
        ));
    }

    #[test]
    fn without_msi_the_disk_must_have_one_fired_level_ioapic_line() {
        let line = "17:        210        198   IO-APIC  17-fasteoi   virtio0".to_owned();
        assert!(check_intx(std::slice::from_ref(&line)).is_ok());
        // Never fired; edge-triggered; MSI-X vectors; another line beside it; none.
        assert!(!intx_ok(&[line.replace("210        198", "0          0")]));
        assert!(!intx_ok(&[line.replace("fasteoi", "edge")]));
        assert!(!intx_ok(&two_queues()));
        assert!(!intx_ok(&[line.clone(), two_queues()[1].clone()]));
        assert!(matches!(check_intx(&[]), Err(Error::Intx { lines }) if lines.is_empty()));
    }

    #[test]
    fn each_queue_vector_must_fire_on_its_own_cpu_only() {
        let lines = two_queues();
        assert!(affinity_ok(&lines));
        assert_eq!(
            describe(&lines),
            "virtio0-config 0/0, virtio0-req.0 130/0, virtio0-req.1 0/97"
        );
        // Every vector on CPU 0, as when the routes ignore the destination APIC id.
        let mut on_cpu0 = lines.clone();
        on_cpu0[2] = on_cpu0[2].replace("0         97", "97          0");
        assert!(vectors_ok(&on_cpu0) && !affinity_ok(&on_cpu0));
        // A vector spread over both CPUs, one that never fired, a missing one.
        let mut spread = lines.clone();
        spread[1] = spread[1].replace("130          0", "130          4");
        assert!(!affinity_ok(&spread));
        let mut quiet = lines.clone();
        quiet[2] = quiet[2].replace("97", "0");
        assert!(!affinity_ok(&quiet));
        assert!(!affinity_ok(&lines[..2]));
    }
}
