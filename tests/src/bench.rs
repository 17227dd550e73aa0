//! The boot benchmark of the boot issue: time from the VMM's start to the end of the guest's boot,
//! and the VMM's resident memory beyond guest RAM, for each VMM with the same kernel, initramfs,
//! disks, memory, vCPUs and command line, runs interleaved in one host, median of N each; and where
//! that time goes, phase by phase ([`crate::phases`]), with vmm's own start-up in microseconds. A
//! variant ([`Column::variant`], `--vmm-variant NAME=ARGS`) is vmm with arguments appended, booted
//! as one more column `vmm-NAME` interleaved with the others, to measure what a flag costs
//! (`-sandbox off`, say).
//!
//! Two guests ([`GuestImage`]): the project's small initramfs to its first userspace line, with no
//! disk or with a small raw disk on virtio-blk-pci ([`Disk::Pci`], QEMU's microvm then with
//! `pcie=on`); and a full Debian 12 (`resources/debian`, systemd) from its own kernel and initramfs,
//! its root on a fresh qcow2 overlay of its zlib-compressed base per boot, served by an iothread
//! (`cache=none`, each VMM's fastest `aio=` engine, [`crate::target::AIO_BEST`]), to
//! `systemctl is-system-running` = `running`.
//!
//! The inner half ([`measure`]) prints each VMM's exact command line (`COMMAND`), then boots the
//! guests with their debug logs on (`-D`; QEMU also traces `kvm_cpu_exec`) and prints per boot a
//! `BOOT` line, a `PHASES` line and, for vmm, a `STARTUP` line per start-up step; once per VMM it
//! prints the small guest's `dmesg` (`DMESG`), or per boot Debian's `systemd-analyze` lines
//! (`ANALYZE`). Per boot it prints the memory beyond guest RAM by kind of mapping (`MEMORY`), and
//! on each VMM's first boot every resident mapping outside guest RAM (`SMAPS`). It also prints,
//! per boot when the guest is up, each VMM thread's CPU time so far, the system part of it and
//! the part in the guest (`THREADS`), where the host's CPUs spent the time since the VMM started
//! (`HOSTCPU`: milliseconds user, system, idle, waiting for I/O, in interrupts, in guests), and
//! KVM's counters of the VM from debugfs (`KVMSTATS`: exits, page faults, guest memory mapped in
//! 4 KiB or 2 MiB pages); per boot, how the host's memory counters grew (`HOSTMM`: transparent
//! huge pages, compaction, faults); all kept with the raw lines to tell where a slow phase's time
//! went, and the CPU times summed in a table. The outer half ([`summarize`]) reads them
//! back and writes Markdown tables.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::disks::base64;
use crate::guest::{self, Guest};
use crate::memory;
use crate::phases::{self, Anchor, Milestones, Phase};
use crate::report::{median, BootSample};
use crate::target::{Boot, Kernel, Target};

/// How long one boot of the small initramfs may take to reach its shell prompt.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long one boot of Debian may take to reach `running` and to power off.
const DEBIAN_TIMEOUT: Duration = Duration::from_secs(600);
/// The raw disk of [`Disk::Pci`], in MiB.
const PCI_DISK_MIB: u64 = 64;
/// The nested outer kernel zeroes pages when they are freed rather than when they are allocated
/// (`init_on_free=1`), for the boot benchmark only. Under TCG, a write to a page that held
/// translated code invalidates that page's translation blocks, store by store, and Debian's kernel
/// zeroes a page as it allocates it: each inner boot's memory comes from pages that held the
/// previous guests' code, so 50,000 to 80,000 invalidations (1 to 3 s of the outer QEMU's CPU,
/// `perf`) landed in a random phase of a boot, most often "first KVM_RUN → kernel clock".
/// Zeroed when the previous VMM exits, between boots, they cost no boot anything: `ci/bench-boot
/// --runs 5`, two runs each way, that phase 1.9 to 7.0 s → 1.1 to 2.0 s, vmm to userspace
/// 6.5–10.7 s → 3.9–6.5 s, QEMU 6.7–14.3 s → 4.5–6.8 s (`resources/nested-host`'s timeline
/// shows the counts). The price: the outer kernel zeroes all its memory as it boots (about 33 s
/// more before the script starts, and the outer QEMU's RSS reaches 7.3 GB: its 6 GiB and the
/// translation cache's 0.55 GB), so tests, which time nothing, go without.
pub const OUTER_APPEND: &str = "init_on_free=1";

/// Errors of one measured boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest did not boot or power off as expected.
    #[error("{target} run {run}")]
    Guest {
        /// The column's name.
        target: String,
        /// The run number.
        run: u32,
        /// What went wrong.
        #[source]
        source: guest::Error,
    },
    /// Debian did not reach `running` (`degraded`, say), or said nothing the benchmark reads.
    #[error(
        "{target} run {run}: the guest said {report:?}, not running (failed units: {failed:?})"
    )]
    NotRunning {
        /// The column's name.
        target: String,
        /// The run number.
        run: u32,
        /// What the guest printed, or why it could not be read.
        report: String,
        /// The units systemd listed as failed.
        failed: Vec<String>,
    },
    /// Debian's guest directory (the `$DISK_DIR` of `resources/nested-host`) was not given.
    #[error("the Debian guest needs its folder ($DISK_DIR)")]
    NoDebian,
    /// A disk image for the guest could not be made.
    #[error("cannot make the disk {path}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img create` failed to make Debian's overlay.
    #[error("qemu-img create {path} ended with {status}")]
    Overlay {
        /// The overlay.
        path: std::path::PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The VMM's memory map could not be read.
    #[error("{target} run {run}: reading its memory")]
    Memory {
        /// The column's name.
        target: String,
        /// The run number.
        run: u32,
        /// What went wrong.
        #[source]
        source: memory::Error,
    },
}

/// The guest the benchmark boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestImage {
    /// The project's bzImage and small initramfs, to its first userspace line.
    Initramfs,
    /// Debian 12 from `resources/debian`, to `systemctl is-system-running` = `running`.
    Debian,
}

impl GuestImage {
    /// Parses `--guest`'s value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "initramfs" => Some(GuestImage::Initramfs),
            "debian" => Some(GuestImage::Debian),
            _ => None,
        }
    }

    /// The name `--guest` takes.
    pub fn name(self) -> &'static str {
        match self {
            GuestImage::Initramfs => "initramfs",
            GuestImage::Debian => "debian",
        }
    }

    /// The phases the summary shows, the whole boot last.
    fn phases(self) -> &'static [Phase] {
        match self {
            GuestImage::Initramfs => &phases::INITRAMFS_PHASES,
            GuestImage::Debian => &phases::SYSTEMD_PHASES,
        }
    }
}

/// A disk attached to the small initramfs's boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disk {
    /// No disk.
    None,
    /// A raw disk on virtio-blk-pci served by an iothread, so the guest probes a PCI bus.
    Pci,
}

impl Disk {
    /// Parses `--disk`'s value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Disk::None),
            "pci" => Some(Disk::Pci),
            _ => None,
        }
    }

    /// The name `--disk` takes.
    pub fn name(self) -> &'static str {
        match self {
            Disk::None => "none",
            Disk::Pci => "pci",
        }
    }
}

/// What to boot, the same for every VMM.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Boots per VMM.
    pub runs: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub smp: u32,
    /// The guest.
    pub guest: GuestImage,
    /// The small initramfs's disk (Debian always has its root disk).
    pub disk: Disk,
}

impl Setup {
    /// The boot of this setup: kernel, initramfs, command line and disks; `dir` holds the guest's
    /// files (the guest directory, or Debian's) and gets its disks.
    fn boot(&self, dir: &Path) -> Boot {
        match self.guest {
            GuestImage::Initramfs => {
                // No guest.run words: the guest goes straight to its shell, whose prompt ends the boot.
                let mut boot = Boot::new(Kernel::BzImage, self.smp, self.mem_mib, "");
                if self.disk == Disk::Pci {
                    boot.extra = iothread_disk(&dir.join(PCI_DISK), "raw", "", "virtio-blk-pci");
                    boot.pcie = true;
                }
                boot
            }
            GuestImage::Debian => {
                let script = debian_script();
                let append = format!("root=/dev/vda ro guest.sh={}", base64(script.as_bytes()));
                let mut boot = Boot::new(Kernel::Vmlinuz, self.smp, self.mem_mib, &append);
                boot.extra = iothread_disk(
                    &dir.join(DEBIAN_OVERLAY),
                    "qcow2",
                    ",cache=none",
                    "virtio-blk-device",
                );
                boot.aio_best = true;
                boot
            }
        }
    }

    /// The first line of the summary: what was booted, and where.
    fn title(&self, host: &str) -> String {
        let what = match (self.guest, self.disk) {
            (GuestImage::Debian, _) => "Debian 12 to `systemctl is-system-running` = running, its kernel and initramfs, root on a qcow2 overlay of a zlib-compressed base on an iothread (`cache=none`, each VMM's fastest `aio=`: `ci/aio-best`), `console=ttyS0 quiet`",
            (GuestImage::Initramfs, Disk::None) => "Boot to userspace, bzImage, `console=ttyS0 quiet`",
            (GuestImage::Initramfs, Disk::Pci) => "Boot to userspace with a raw disk on virtio-blk-pci on an iothread (QEMU: `-M microvm,pcie=on,rtc=on`), bzImage, `console=ttyS0 quiet`",
        };
        format!("{what}, {} MiB, {} vCPUs, {host}", self.mem_mib, self.smp)
    }
}

/// The raw disk of [`Disk::Pci`], in the guest directory.
const PCI_DISK: &str = "bench-pci-disk.raw";
/// Debian's overlay over `base.qcow2`, made afresh for every boot in Debian's folder.
const DEBIAN_OVERLAY: &str = "bench-top.qcow2";

/// The arguments of a disk on iothread `io0`, the same for both VMMs.
fn iothread_disk(path: &Path, format: &str, options: &str, driver: &str) -> Vec<String> {
    vec![
        "-object".into(),
        "iothread,id=io0".into(),
        "-drive".into(),
        format!(
            "file={},format={format},if=none,id=d0{options}",
            path.display()
        ),
        "-device".into(),
        format!("{driver},drive=d0,iothread=io0"),
    ]
}

/// The lines the Debian guest's script starts with.
const STATE: &str = "BENCH-SYSTEM-STATE ";
const FAILED: &str = "BENCH-FAILED-UNIT ";
const SYSTEMD: &str = "BENCH-SYSTEMD ";
const KMSG: &str = "BENCH-DMESG ";
const ANALYZE: &str = "BENCH-ANALYZE ";
/// The line the Debian guest's script prints last, before it powers off.
const END: &str = "BENCH-END";

/// The script the Debian guest runs once the boot has been queued (`guest.sh=`, run by
/// `resources/debian`'s unit after multi-user.target, which does not hold up the boot): wait for
/// the boot's end, print the state with the guest's uptime, systemd's and the kernel's milestones
/// and `systemd-analyze`'s view, then power off at once (`-ff`: the overlay is thrown away).
fn debian_script() -> String {
    format!(
        "state=$(systemctl is-system-running --wait)
read -r up _ < /proc/uptime
echo \"{STATE}$state $up\"
systemctl list-units --failed --no-legend --plain | sed 's/^/{FAILED}/'
systemctl show -p {} -p {} | sed 's/^/{SYSTEMD}/'
dmesg | grep -E '{}' | sed 's/^/{KMSG}/'
{{ systemd-analyze time; systemd-analyze blame | head -8; }} 2>&1 | sed 's/^/{ANALYZE}/'
echo {END}
systemctl poweroff -ff
",
        phases::SYSTEMD_PROPERTIES[0],
        phases::SYSTEMD_PROPERTIES[1],
        phases::KERNEL_LOG_PATTERN,
    )
}

/// What the Debian guest's script printed (its lines' text after their prefixes).
#[derive(Debug, Clone, PartialEq, Default)]
struct DebianReport {
    /// `systemctl is-system-running`'s answer.
    state: String,
    /// The guest's uptime as it printed the state, ms.
    uptime_ms: f64,
    /// The failed units.
    failed: Vec<String>,
    /// systemd's `NAME=MICROSECONDS` lines.
    systemd: Vec<String>,
    /// The kernel's milestone lines.
    dmesg: Vec<String>,
    /// `systemd-analyze`'s lines.
    analyze: Vec<String>,
}

impl DebianReport {
    /// Reads the console's lines; None without a state line holding a state and an uptime.
    fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut r = DebianReport::default();
        let mut stated = false;
        for l in lines {
            // Other writers to the console can leave text before a line of the script's.
            let Some(at) = l.find("BENCH-") else {
                continue;
            };
            let l = l.get(at..).unwrap_or_default();
            if let Some(rest) = l.strip_prefix(STATE) {
                let (state, up) = rest.trim().rsplit_once(' ')?;
                r.state = state.to_owned();
                r.uptime_ms = up.parse::<f64>().ok()? * 1000.0;
                stated = true;
            } else {
                for (prefix, to) in [
                    (FAILED, &mut r.failed),
                    (SYSTEMD, &mut r.systemd),
                    (KMSG, &mut r.dmesg),
                    (ANALYZE, &mut r.analyze),
                ] {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        to.push(rest.to_owned());
                    }
                }
            }
        }
        stated.then_some(r)
    }
}

/// One column of the benchmark: a VMM, or vmm with arguments appended (a variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The name in the tables: `vmm`, `qemu`, or `vmm-NAME` for a variant.
    pub name: String,
    /// The VMM it boots.
    pub target: Target,
    /// Arguments appended to the VMM's command line.
    pub args: Vec<String>,
}

impl Column {
    /// A VMM as it is.
    pub fn plain(target: Target) -> Self {
        Column {
            name: target.to_string(),
            target,
            args: Vec::new(),
        }
    }

    /// The variant `NAME=ARGS`: the column `vmm-NAME`, vmm with ARGS (split at whitespace)
    /// appended; `None` unless NAME is a lowercase letter then lowercase letters and digits and
    /// ARGS is not empty.
    pub fn variant(spec: &str) -> Option<Self> {
        let (name, args) = spec.split_once('=')?;
        let mut chars = name.chars();
        let named = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let args: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        (named && !args.is_empty()).then(|| Column {
            name: format!("vmm-{name}"),
            target: Target::Vmm,
            args,
        })
    }

    /// The command that boots `boot` in this column.
    fn command(&self, boot: &Boot, guest_dir: &Path) -> std::process::Command {
        let mut c = boot.command(self.target, guest_dir);
        c.args(&self.args);
        c
    }
}

/// Boots each column `setup.runs` times, interleaved, printing a `BOOT` line per boot; a failed
/// boot prints its transcript and stops the benchmark. `debian_dir` holds Debian's `base.qcow2`,
/// `vmlinuz` and `initrd.img` (written: each boot's overlay is made there). `append` holds
/// words added to every boot's kernel command line (diagnostics such as `initcall_debug`).
pub fn measure(
    columns: &[Column],
    setup: Setup,
    append: &str,
    guest_dir: &Path,
    debian_dir: Option<&Path>,
) -> Result<(), Error> {
    let dir = match setup.guest {
        GuestImage::Initramfs => guest_dir.to_path_buf(),
        GuestImage::Debian => debian_dir.ok_or(Error::NoDebian)?.to_path_buf(),
    };
    let mut boot = setup.boot(&dir);
    if !append.is_empty() {
        boot.append = [boot.append.as_str(), append].join(" ").trim().to_owned();
    }
    if setup.guest == GuestImage::Initramfs && setup.disk == Disk::Pci {
        let path = dir.join(PCI_DISK);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(PCI_DISK_MIB << 20))
            .map_err(|source| Error::Disk { path, source })?;
    }
    for col in columns {
        println!(
            "COMMAND {} {}",
            col.name,
            shell_words(&col.command(&boot, &dir))
        );
    }
    let log_dir = std::env::temp_dir();
    for run in 1..=setup.runs {
        for col in columns {
            let (target, name) = (col.target, col.name.as_str());
            let log = log_dir.join(format!("bench-boot-{}-{name}.log", std::process::id()));
            if setup.guest == GuestImage::Debian {
                new_overlay(&dir)?;
            }
            let mut command = col.command(&boot, &dir);
            command.args(target.debug_log_args(&log));
            let host_before = host_memory_counters();
            let cpu_before = host_cpu_ms();
            let mut g = Guest::spawn(command).map_err(|source| Error::Guest {
                target: name.to_owned(),
                run,
                source,
            })?;
            // The whole kernel log once per VMM (to read); then only the milestones' lines,
            // since every console byte costs the guest an exit.
            let whole = run == 1;
            let sample = match setup.guest {
                GuestImage::Initramfs => {
                    sample(&mut g, name, run, setup.mem_mib, whole, &cpu_before)
                }
                GuestImage::Debian => sample_debian(&mut g, name, run, setup.mem_mib, &cpu_before),
            };
            if sample.is_err() {
                print!("{}", g.transcript());
            }
            let (sample, logs) = sample?;
            println!(
                "HOSTMM {name} {run} {}",
                counter_deltas(&host_before, &host_memory_counters())
            );
            println!("{}", sample.line());
            // The log is complete: the VMM has exited. Without it the phases say "-".
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            let started = g.started_unix();
            let kvm_run = match target {
                Target::Vmm => {
                    let steps = phases::vmm_startup(&log_text, started);
                    for (step, us) in &steps {
                        println!("STARTUP {name} {run} {us:.0} {step}");
                    }
                    phases::vmm_first_run(&steps)
                }
                Target::Qemu => phases::qemu_first_run(&log_text, started),
            };
            let m = Milestones::from_guest_logs(
                kvm_run,
                logs.dmesg.iter().map(String::as_str),
                logs.systemd.iter().map(String::as_str),
                logs.anchor,
                sample.userspace_ms,
            );
            println!("PHASES {name} {run} {}", m.words());
            if whole && setup.guest == GuestImage::Initramfs {
                for l in &logs.dmesg {
                    println!("DMESG {name} {l}");
                }
            }
            for l in &logs.analyze {
                println!("ANALYZE {name} {run} {l}");
            }
        }
    }
    Ok(())
}

/// A fresh overlay [`DEBIAN_OVERLAY`] over `base.qcow2` in `dir`.
fn new_overlay(dir: &Path) -> Result<(), Error> {
    let path = dir.join(DEBIAN_OVERLAY);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::Disk { path, source: e })
        }
        _ => {}
    }
    let status = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ])
        .arg(&path)
        .status()
        .map_err(|source| Error::Disk {
            path: path.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Overlay { path, status })
    }
}

/// A command line as one string, words with spaces quoted.
fn shell_words(c: &std::process::Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|w| {
            let w = w.to_string_lossy();
            if w.contains(' ') {
                format!("'{w}'")
            } else {
                w.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The line the guest's shell prints after `dmesg`.
const DMESG_END: &str = "BENCH-DMESG-END";

/// What a boot's guest said about its boot, for [`Milestones::from_guest_logs`].
#[derive(Debug, Default)]
struct GuestLogs {
    /// The kernel's log lines.
    dmesg: Vec<String>,
    /// systemd's `NAME=MICROSECONDS` lines.
    systemd: Vec<String>,
    /// `systemd-analyze`'s lines.
    analyze: Vec<String>,
    /// How the kernel's clock is placed on the harness's.
    anchor: Anchor,
}

/// One boot of the small initramfs: its figures, and the guest kernel's log read at the prompt.
fn sample(
    g: &mut Guest,
    target: &str,
    run: u32,
    mem_mib: u64,
    whole_dmesg: bool,
    cpu_before: &[(String, u64)],
) -> Result<(BootSample, GuestLogs), Error> {
    let err = |source| Error::Guest {
        target: target.to_owned(),
        run,
        source,
    };
    let up = g
        .wait_for("GUEST-USERSPACE-UP", BOOT_TIMEOUT)
        .map_err(err)?;
    g.wait_prompt("GUEST-PROMPT#", BOOT_TIMEOUT).map_err(err)?;
    let mem = resident_memory(g, target, run, mem_mib)?;
    print_cpu(target, run, g.pid(), cpu_before);
    let from = g.lines().len();
    let command = if whole_dmesg {
        "dmesg".to_owned()
    } else {
        format!("dmesg | grep -E '{}'", phases::KERNEL_LOG_PATTERN)
    };
    g.send(&format!("{command}; echo {DMESG_END}\n"))
        .map_err(err)?;
    // The echo of the typed command holds the marker too, but not alone on its line.
    g.wait_line(DMESG_END, BOOT_TIMEOUT, |l| l == DMESG_END)
        .map_err(err)?;
    let dmesg = g
        .lines()
        .get(from..)
        .unwrap_or_default()
        .iter()
        .map(|l| l.text.clone())
        .filter(|l| l.as_str() != DMESG_END)
        .collect();
    g.send("poweroff -f\n").map_err(err)?;
    g.wait_exit(BOOT_TIMEOUT).map_err(err)?;
    let sample = boot_sample(target, run, &up, &mem);
    let logs = GuestLogs {
        dmesg,
        anchor: Anchor::RunInit,
        ..GuestLogs::default()
    };
    Ok((sample, logs))
}

/// The VMM's resident memory now (guest RAM `mem_mib`), printed as [`print_memory`] does.
fn resident_memory(
    g: &Guest,
    target: &str,
    run: u32,
    mem_mib: u64,
) -> Result<memory::Resident, Error> {
    let mem = memory::resident(g.pid(), mem_mib * 1024).map_err(|source| Error::Memory {
        target: target.to_owned(),
        run,
        source,
    })?;
    print_memory(target, run, &mem);
    for &(start, end) in &mem.guest_ranges {
        // Only to tell where the guest touched memory: a VMM whose pagemap cannot be read is
        // measured all the same.
        if let Ok(map) = memory::resident_blocks(g.pid(), start, end) {
            println!("RESIDENT {target} {run} {map}");
        }
    }
    Ok(mem)
}

/// A boot's measurement: to the guest's line `up`, with the memory taken then.
fn boot_sample(target: &str, run: u32, up: &guest::Line, mem: &memory::Resident) -> BootSample {
    BootSample {
        target: target.to_owned(),
        run,
        userspace_ms: up.at.as_secs_f64() * 1000.0,
        rss_kib: mem.total_kib,
        guest_kib: mem.guest_kib,
    }
}

/// Prints where a boot's memory beyond guest RAM is (`MEMORY`: KiB by kind), and on a VMM's first
/// boot each resident mapping outside guest RAM (`SMAPS`).
fn print_memory(target: &str, run: u32, mem: &memory::Resident) {
    println!("MEMORY {target} {run} {}", mem.kind_words());
    if run == 1 {
        for m in &mem.mappings {
            println!("SMAPS {target} {m}");
        }
    }
}

/// The CPU time each thread of process `pid` has used so far, `NAME:TID=MS/SYS/GUEST` separated
/// by spaces (user plus system time, the system time alone, and the time in a guest, from
/// `/proc/PID/task/TID/stat`, at 100 ticks a second), to tell which of a VMM's threads took the
/// host's CPUs during the boot, and for a vCPU whether running the guest (guest time, which the
/// host counts in its user time too), in the VMM (the rest of its user time) or in the host's
/// kernel (system time: exits, faults on guest memory); empty where `/proc` says nothing.
fn thread_times(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold spaces; the fields after it are plain.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].replace(' ', "_");
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime, stime and guest_time are the 14th, 15th and 43rd fields of stat: the 12th, 13th
        // and 41st after the name.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (user, system, guest) = (ticks(11), ticks(12), ticks(40));
        out.push(format!(
            "{name}:{}={}/{}/{}",
            task.file_name().to_string_lossy(),
            (user + system) * 10,
            system * 10,
            guest * 10
        ));
    }
    out.join(" ")
}

/// Prints, with the guest up, where the CPU time went since the VMM started: each of its threads'
/// (`THREADS`), the host's by kind since `cpu_before` (`HOSTCPU`), and KVM's counters of the VM
/// (`KVMSTATS`).
fn print_cpu(target: &str, run: u32, pid: u32, cpu_before: &[(String, u64)]) {
    println!("THREADS {target} {run} {}", thread_times(pid));
    println!(
        "HOSTCPU {target} {run} {}",
        counter_deltas(cpu_before, &host_cpu_ms())
    );
    println!("KVMSTATS {target} {run} {}", kvm_stats(pid));
}

/// The host kernel's counters (`/proc/vmstat`) of how it backs memory: transparent huge pages
/// given or refused at a fault, compaction, faults; read before and after a boot ([`counter_deltas`])
/// to tell whether the host had to compact or zero memory for the guest's first touches.
fn host_memory_counters() -> Vec<(String, u64)> {
    const NAMES: [&str; 9] = [
        "thp_fault_alloc",
        "thp_fault_fallback",
        "thp_split_pmd",
        "thp_zero_page_alloc",
        "compact_stall",
        "compact_migrate_scanned",
        "compact_free_scanned",
        "pgfault",
        "pgmajfault",
    ];
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    vmstat
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| NAMES.contains(name))
        .filter_map(|(name, v)| Some((name.to_owned(), v.trim().parse().ok()?)))
        .collect()
}

/// Where the host's CPUs have spent their time since it booted, in milliseconds summed over the
/// CPUs (the `cpu` line of `/proc/stat`, at 100 ticks a second): in user space (guests' time
/// included, which `guest` gives again), the kernel, idle, idle waiting for I/O, and interrupts.
/// Read before and after a boot ([`counter_deltas`]): with one CPU, whether the boot waited on
/// anything but that CPU.
fn host_cpu_ms() -> Vec<(String, u64)> {
    const NAMES: [&str; 9] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest",
    ];
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find_map(|l| l.strip_prefix("cpu ")) else {
        return Vec::new();
    };
    NAMES
        .iter()
        .zip(cpu.split_whitespace())
        .filter_map(|(name, ticks)| Some(((*name).to_owned(), ticks.parse::<u64>().ok()? * 10)))
        .collect()
}

/// `NAME=DELTA` separated by spaces: how much each counter of `after` grew since `before` (a
/// counter missing from `before` counts from 0).
fn counter_deltas(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    after
        .iter()
        .map(|(name, v)| {
            let was = before.iter().find(|(n, _)| n == name).map_or(0, |b| b.1);
            format!("{name}={}", v.saturating_sub(was))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// KVM's counters of the VM of process `pid` so far (`NAME=VALUE` separated by spaces, from
/// debugfs's `kvm/PID-FD/`: exits, page faults fixed, guest memory mapped as 4 KiB, 2 MiB and 1 GiB
/// pages), to tell how the host mapped the guest's memory; empty where debugfs is not mounted.
fn kvm_stats(pid: u32) -> String {
    const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";
    if !Path::new(KVM_DEBUGFS).exists() {
        // The host may not have mounted debugfs; without it the counters are left out.
        let _ = std::process::Command::new("mount")
            .args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"])
            .status();
    }
    let Ok(dirs) = std::fs::read_dir(KVM_DEBUGFS) else {
        return String::new();
    };
    let prefix = format!("{pid}-");
    let mut out = Vec::new();
    for dir in dirs.flatten() {
        if !dir.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        for name in [
            "exits",
            "pf_fixed",
            "pf_taken",
            "io_exits",
            "mmio_exits",
            "halt_exits",
            "pages_4k",
            "pages_2m",
            "pages_1g",
            "nx_lpage_splits",
            "mmu_shadow_zapped",
            "mmu_recycled",
            "tlb_flush",
            "irq_window_exits",
            "insn_emulation",
        ] {
            if let Ok(v) = std::fs::read_to_string(dir.path().join(name)) {
                out.push(format!("{name}={}", v.trim()));
            }
        }
    }
    out.join(" ")
}

/// One boot of Debian: its figures (memory read as the guest says `running`), and what its
/// script printed.
fn sample_debian(
    g: &mut Guest,
    target: &str,
    run: u32,
    mem_mib: u64,
    cpu_before: &[(String, u64)],
) -> Result<(BootSample, GuestLogs), Error> {
    let err = |source| Error::Guest {
        target: target.to_owned(),
        run,
        source,
    };
    let up = g.wait_for(STATE, DEBIAN_TIMEOUT).map_err(err)?;
    let mem = resident_memory(g, target, run, mem_mib)?;
    print_cpu(target, run, g.pid(), cpu_before);
    let from = g.lines().len().saturating_sub(1);
    g.wait_line(END, DEBIAN_TIMEOUT, |l| l.ends_with(END))
        .map_err(err)?;
    let lines = g.lines().get(from..).unwrap_or_default();
    let report = DebianReport::parse(lines.iter().map(|l| l.text.as_str()));
    let not_running = |report: String, failed: Vec<String>| Error::NotRunning {
        target: target.to_owned(),
        run,
        report,
        failed,
    };
    let report = match report {
        Some(r) if r.state == "running" => r,
        Some(r) => return Err(not_running(r.state, r.failed)),
        None => return Err(not_running(up.text.clone(), Vec::new())),
    };
    g.wait_exit(DEBIAN_TIMEOUT).map_err(err)?;
    let sample = boot_sample(target, run, &up, &mem);
    let logs = GuestLogs {
        dmesg: report.dmesg,
        systemd: report.systemd,
        analyze: report.analyze,
        anchor: Anchor::Uptime(report.uptime_ms),
    };
    Ok((sample, logs))
}

/// The Markdown summary of the `BOOT` lines in `output`: per VMM, the median time to userspace and
/// the median resident memory beyond guest RAM, with the range of each.
pub fn summarize(output: &str, setup: Setup, host: &str) -> String {
    let samples: Vec<BootSample> = output
        .lines()
        .filter_map(|l| BootSample::parse(l).ok().flatten())
        .collect();
    let mut targets: Vec<&str> = samples.iter().map(|s| s.target.as_str()).collect();
    targets.dedup();
    targets.sort_unstable();
    targets.dedup();
    let mut md = String::new();
    let _ = writeln!(md, "{}\n", setup.title(host));
    let to = match setup.guest {
        GuestImage::Initramfs => "to userspace",
        GuestImage::Debian => "to `running`",
    };
    let _ = writeln!(md, "| VMM | boots | {to}, median (min–max) | RSS beyond guest RAM, median (min–max) | total RSS, median |");
    md.push_str("|---|---|---|---|---|\n");
    for &t in &targets {
        let mine: Vec<&BootSample> = samples.iter().filter(|s| s.target == t).collect();
        let ms: Vec<f64> = mine.iter().map(|s| s.userspace_ms).collect();
        let over: Vec<f64> = mine
            .iter()
            .map(|s| kib_f64(s.rss_kib.saturating_sub(s.guest_kib)))
            .collect();
        let total: Vec<f64> = mine.iter().map(|s| kib_f64(s.rss_kib)).collect();
        let (lo, hi) = range(&ms);
        let (olo, ohi) = range(&over);
        let _ = writeln!(
            md,
            "| {t} | {} | {:.0} ms ({lo:.0}–{hi:.0}) | {:.1} MiB ({:.1}–{:.1}) | {:.1} MiB |",
            mine.len(),
            median(&ms).unwrap_or(f64::NAN),
            median(&over).unwrap_or(f64::NAN) / 1024.0,
            olo / 1024.0,
            ohi / 1024.0,
            median(&total).unwrap_or(f64::NAN) / 1024.0,
        );
    }
    md.push_str(&memory_table(output, &targets));
    md.push_str(&phase_table(output, &targets, setup.guest.phases()));
    md.push_str(&cpu_table(output, &targets));
    md.push_str(&startup_table(output, &targets));
    md.push_str("\nCommands (each boot adds its debug log: `-D FILE`, and for QEMU `-trace kvm_cpu_exec -msg timestamp=on`):\n\n");
    for l in output.lines() {
        if let Some(rest) = l.strip_prefix("COMMAND ") {
            let (t, cmd) = rest.split_once(' ').unwrap_or((rest, ""));
            let _ = writeln!(md, "- {t}: `{cmd}`");
        }
    }
    md
}

/// Per kind of mapping (`MEMORY` lines, [`memory::Resident::kinds`]), each column's median
/// resident KiB beyond guest RAM (0 for a boot without that kind).
fn memory_table(output: &str, targets: &[&str]) -> String {
    // (target, kind, KiB) of each boot's MEMORY line, and how many boots each target had.
    let mut seen: Vec<(&str, &str, u64, u32)> = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    for l in output.lines() {
        let Some(rest) = l.strip_prefix("MEMORY ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let (Some(t), Some(run)) = (w.next(), w.next().and_then(|r| r.parse::<u32>().ok())) else {
            continue;
        };
        for (kind, kib) in w.filter_map(|x| x.split_once('=')) {
            if let Ok(kib) = kib.parse() {
                seen.push((t, kind, kib, run));
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
        }
    }
    if seen.is_empty() {
        return String::new();
    }
    let mut md = table_head(
        "Memory beyond guest RAM by kind of mapping, KiB, median of the boots (`tests/src/memory.rs`):",
        "kind",
        targets.iter().map(ToString::to_string),
    );
    for kind in kinds {
        let _ = write!(md, "| {kind} |");
        for &t in targets {
            let mut runs: Vec<u32> = seen.iter().filter(|s| s.0 == t).map(|s| s.3).collect();
            runs.sort_unstable();
            runs.dedup();
            let v: Vec<f64> = runs
                .iter()
                .map(|&r| {
                    kib_f64(
                        seen.iter()
                            .filter(|s| s.0 == t && s.3 == r && s.1 == kind)
                            .map(|s| s.2)
                            .sum(),
                    )
                })
                .collect();
            match median(&v) {
                Some(m) => {
                    let _ = write!(md, " {m:.0} |");
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

/// The `PHASES` lines of `output` as (target, milestones).
fn milestones(output: &str) -> Vec<(&str, Milestones)> {
    output
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.strip_prefix("PHASES ")?.split_whitespace().collect();
            let (target, rest) = w.split_first()?;
            Some((*target, Milestones::parse(rest.get(1..)?)?))
        })
        .collect()
}

/// Per phase, each column's median time in it, and vmm's over QEMU's and over each variant's.
fn phase_table(output: &str, targets: &[&str], phases: &[Phase]) -> String {
    let all = milestones(output);
    if all.is_empty() {
        return String::new();
    }
    // vmm over QEMU, then over each variant (the columns named vmm-NAME).
    let others: Vec<&str> = std::iter::once("qemu")
        .chain(targets.iter().copied().filter(|t| t.starts_with("vmm-")))
        .collect();
    let mut md = table_head(
        "Where the time goes, ms, median of the boots (milestones from the VMM's debug log, the guest's dmesg and systemd, `tests/src/phases.rs`):",
        "phase",
        targets
            .iter()
            .map(ToString::to_string)
            .chain(others.iter().map(|o| format!("vmm / {o}"))),
    );
    for (name, from, to) in phases {
        let _ = write!(md, "| {name} |");
        let mut by = Vec::new();
        for t in targets {
            let v: Vec<f64> = all
                .iter()
                .filter(|(n, _)| n == t)
                .filter_map(|(_, m)| m.span(*from, *to))
                .collect();
            let m = median(&v);
            by.push((*t, m));
            let _ = write!(
                md,
                " {} |",
                m.map_or_else(|| "–".to_owned(), |m| format!("{m:.0}"))
            );
        }
        let get = |name: &str| by.iter().find(|(t, _)| *t == name).and_then(|(_, m)| *m);
        for o in &others {
            let ratio = match (get("vmm"), get(o)) {
                (Some(v), Some(q)) if q > 0.0 => format!("{:.2}", v / q),
                _ => "–".to_owned(),
            };
            let _ = write!(md, " {ratio} |");
        }
        md.push('\n');
    }
    md
}

/// Where the host's CPU time went in each column's boots, from the VMM's start to the guest being
/// up (`THREADS` and `HOSTCPU` lines): the VMM's vCPU threads (those with guest time) in the guest
/// and out of it, its other threads, and the host's CPUs idle; median milliseconds of the boots.
/// The threads' times are the scheduler's, the idle time is counted in ticks (`/proc/stat`), so
/// the two are not subtracted from each other: under TCG the host's ticks fall short of the wall
/// time by a second or so in a Debian boot.
fn cpu_table(output: &str, targets: &[&str]) -> String {
    const ROWS: [&str; 4] = [
        "vCPUs running the guest",
        "vCPUs outside the guest (exits in the VMM and the host kernel)",
        "the VMM's other threads (I/O, main loop)",
        "the host's CPUs idle",
    ];
    // (target, row, ms): one per row and boot.
    let mut seen: Vec<(&str, usize, f64)> = Vec::new();
    for l in output.lines() {
        let mut w = l.split_whitespace();
        let (Some(kind), Some(t), Some(_run)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        match kind {
            "THREADS" => {
                let mut vmm = [0.0; 3];
                for thread in w {
                    let Some((_, times)) = thread.rsplit_once('=') else {
                        continue;
                    };
                    let n: Vec<f64> = times.split('/').filter_map(|x| x.parse().ok()).collect();
                    let [all, _, guest] = n[..] else {
                        continue;
                    };
                    if guest > 0.0 {
                        vmm[0] += guest;
                        vmm[1] += all - guest;
                    } else {
                        vmm[2] += all;
                    }
                }
                seen.extend(vmm.into_iter().enumerate().map(|(row, v)| (t, row, v)));
            }
            "HOSTCPU" => {
                let idle = w
                    .filter_map(|x| x.split_once('='))
                    .filter(|(k, _)| matches!(*k, "idle" | "iowait"))
                    .filter_map(|(_, v)| v.parse::<f64>().ok())
                    .sum();
                seen.push((t, 3, idle));
            }
            _ => {}
        }
    }
    if seen.is_empty() {
        return String::new();
    }
    let mut md = table_head(
        "Where the host's CPU time went from the VMM's start to the guest being up, ms, median of the boots (each VMM thread's time, `THREADS`; the host's idle time, from `/proc/stat`, `HOSTCPU`):",
        "CPU time",
        targets.iter().map(ToString::to_string),
    );
    for (i, row) in ROWS.iter().enumerate() {
        let _ = write!(md, "| {row} |");
        for t in targets {
            let v: Vec<f64> = seen
                .iter()
                .filter(|s| s.0 == *t && s.1 == i)
                .map(|s| s.2)
                .collect();
            let cell = median(&v).map_or_else(|| "–".to_owned(), |m| format!("{m:.0}"));
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}

/// vmm's start-up steps (`STARTUP` lines), median microseconds from its start, in log order, a
/// column per vmm column (vmm and its variants).
fn startup_table(output: &str, targets: &[&str]) -> String {
    // (step, [(column, µs)]) in the order the steps first appear.
    let mut steps: Vec<(String, Vec<(&str, f64)>)> = Vec::new();
    for l in output.lines() {
        let Some(rest) = l.strip_prefix("STARTUP ") else {
            continue;
        };
        let mut w = rest.splitn(4, ' ');
        let (Some(target), Some(_run), Some(us), Some(step)) =
            (w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        let Ok(us) = us.parse::<f64>() else {
            continue;
        };
        match steps.iter_mut().find(|(s, _)| s == step) {
            Some((_, v)) => v.push((target, us)),
            None => steps.push((step.to_owned(), vec![(target, us)])),
        }
    }
    let columns: Vec<&str> = targets
        .iter()
        .copied()
        .filter(|t| steps.iter().any(|(_, v)| v.iter().any(|(c, _)| c == t)))
        .collect();
    if columns.is_empty() {
        return String::new();
    }
    let mut md = table_head(
        "vmm's own start-up, µs from its start (the process started by the harness), median:",
        "step",
        columns.iter().map(|c| format!("{c} µs")),
    );
    for (step, v) in steps {
        let _ = write!(md, "| {step} |");
        for c in &columns {
            let mine: Vec<f64> = v
                .iter()
                .filter(|(t, _)| t == c)
                .map(|(_, us)| *us)
                .collect();
            let cell = median(&mine).map_or_else(|| "–".to_owned(), |m| format!("{m:.0}"));
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}

/// A Markdown table's caption (a paragraph of its own) and head: its first column's heading,
/// then one per column.
fn table_head(caption: &str, first: &str, columns: impl Iterator<Item = String>) -> String {
    let mut md = format!("\n{caption}\n\n| {first} |");
    let mut count = 0;
    for c in columns {
        let _ = write!(md, " {c} |");
        count += 1;
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(count));
    md.push('\n');
    md
}

/// KiB as a float for the statistics (exact below 2^53).
fn kib_f64(kib: u64) -> f64 {
    f64::from(u32::try_from(kib).unwrap_or(u32::MAX))
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_has_a_row_per_vmm_with_medians() {
        let out = "noise\nBOOT qemu 1 1000.0 100000 60000\nBOOT vmm 1 500.0 70000 60000\n\
                   BOOT qemu 2 3000.0 102048 60000\nBOOT vmm 2 700.0 70000 60000\n\
                   BOOT qemu 3 2000.0 101024 60000\nBOOT vmm 3 600.0 80240 60000\n";
        let setup = Setup {
            runs: 3,
            mem_mib: 512,
            smp: 2,
            guest: GuestImage::Initramfs,
            disk: Disk::None,
        };
        let out = format!(
            "{out}COMMAND qemu qemu-system-x86_64 -M microvm,rtc=on\n\
             PHASES vmm 1 2.0 100.0 - - 200.0 300.0 500.0 - - 500.0\nPHASES qemu 1 50.0 150.0 - - 300.0 400.0 1000.0 - - 1000.0\n\
             STARTUP vmm 1 900 KVM opened and VM created\nSTARTUP vmm 2 1100 KVM opened and VM created\n"
        );
        let md = summarize(&out, setup, "nested");
        assert!(
            md.contains("| qemu | 3 | 2000 ms (1000–3000) | 40.1 MiB (39.1–41.1) |"),
            "{md}"
        );
        assert!(
            md.contains("| vmm | 3 | 600 ms (500–700) | 9.8 MiB (9.8–19.8) |"),
            "{md}"
        );
        assert!(
            md.contains("| VMM start → first KVM_RUN | 50 | 2 | 0.04 |"),
            "{md}"
        );
        assert!(
            md.contains("| initramfs unpacking | 100 | 100 | 1.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| VMM start → first userspace line | 1000 | 500 | 0.50 |"),
            "{md}"
        );
        assert!(md.contains("| KVM opened and VM created | 1000 |"), "{md}");
        assert!(
            md.contains("- qemu: `qemu-system-x86_64 -M microvm,rtc=on`"),
            "{md}"
        );
    }

    #[test]
    fn the_memory_table_gives_each_kinds_median() {
        let out = "MEMORY vmm 1 file=2000 heap=300\nMEMORY qemu 1 file=9000\n\
                   MEMORY vmm 2 file=2100 heap=500 anonymous=64\nMEMORY qemu 2 file=9100\n\
                   MEMORY vmm 3 file=2050 heap=400\nMEMORY qemu 3 file=8900\n";
        let md = memory_table(out, &["qemu", "vmm"]);
        assert!(
            md.contains("| kind | qemu | vmm |\n|---|---|---|\n"),
            "{md}"
        );
        assert!(md.contains("| file | 9000 | 2050 |"), "{md}");
        assert!(md.contains("| heap | 0 | 400 |"), "{md}");
        assert!(md.contains("| anonymous | 0 | 0 |"), "{md}");
        assert_eq!(memory_table("BOOT vmm 1 1.0 2 1\n", &["vmm"]), "");
    }

    #[test]
    fn the_cpu_table_splits_vcpus_from_the_other_threads() {
        // Two boots each: vCPU threads are those with guest time.
        let out = "THREADS vmm 1 vmm:1=100/90/0 vcpu0:2=5000/400/4000 io0:3=300/100/0\n\
                   HOSTCPU vmm 1 user=5300 system=900 idle=50 iowait=10 guest=4000\n\
                   THREADS vmm 2 vmm:1=200/90/0 vcpu0:2=7000/400/6000 io0:3=500/100/0\n\
                   HOSTCPU vmm 2 user=7500 system=900 idle=70 iowait=10 guest=6000\n\
                   THREADS qemu 1 qemu-system-x86:7=900/100/0 qemu-system-x86:8=6000/600/5500\n\
                   THREADS qemu 2 qemu-system-x86:7=1100/100/0 qemu-system-x86:8=6000/600/5500\n";
        let md = cpu_table(out, &["qemu", "vmm"]);
        assert!(
            md.contains("| CPU time | qemu | vmm |\n|---|---|---|\n"),
            "{md}"
        );
        assert!(
            md.contains("| vCPUs running the guest | 5500 | 5000 |"),
            "{md}"
        );
        assert!(
            md.contains("(exits in the VMM and the host kernel) | 500 | 1000 |"),
            "{md}"
        );
        assert!(md.contains("(I/O, main loop) | 1000 | 550 |"), "{md}");
        // QEMU's boots had no HOSTCPU line.
        assert!(md.contains("| the host's CPUs idle | – | 70 |"), "{md}");
        assert_eq!(cpu_table("BOOT vmm 1 1.0 2 1\n", &["vmm"]), "");
    }

    #[test]
    fn a_variant_is_a_column_with_vmm_over_it() {
        let out = "BOOT qemu 1 1000.0 100000 60000\nBOOT vmm 1 500.0 70000 60000\n\
                   BOOT vmm-nosandbox 1 400.0 70000 60000\n\
                   PHASES qemu 1 50.0 150.0 - - 300.0 400.0 1000.0 - - 1000.0\n\
                   PHASES vmm 1 2.0 100.0 - - 200.0 300.0 500.0 - - 500.0\n\
                   PHASES vmm-nosandbox 1 1.0 80.0 - - 160.0 240.0 400.0 - - 400.0\n\
                   STARTUP vmm 1 900 KVM opened and VM created\n\
                   STARTUP vmm-nosandbox 1 600 KVM opened and VM created\n\
                   STARTUP vmm 1 1500 sandbox entered\n";
        let setup = Setup {
            runs: 1,
            mem_mib: 512,
            smp: 2,
            guest: GuestImage::Initramfs,
            disk: Disk::None,
        };
        let md = summarize(out, setup, "nested");
        assert!(
            md.contains("| vmm-nosandbox | 1 | 400 ms (400–400) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| phase | qemu | vmm | vmm-nosandbox | vmm / qemu | vmm / vmm-nosandbox |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| VMM start → first userspace line | 1000 | 500 | 400 | 0.50 | 1.25 |"),
            "{md}"
        );
        assert!(md.contains("| step | vmm µs | vmm-nosandbox µs |"), "{md}");
        assert!(
            md.contains("| KVM opened and VM created | 900 | 600 |"),
            "{md}"
        );
        assert!(md.contains("| sandbox entered | 1500 | – |"), "{md}");
    }

    #[test]
    fn thread_times_name_each_thread_of_the_process() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        // The thread names itself once it runs: it says so before the names are read.
        let probe = std::thread::Builder::new()
            .name("cpu-probe".into())
            .spawn(move || {
                let _ = started_tx.send(());
                rx.recv()
            })
            .expect("spawns");
        started.recv().expect("the probe thread started");
        let times = thread_times(std::process::id());
        drop(tx);
        let _ = probe.join();
        let entry = times
            .split(' ')
            .find(|e| e.starts_with("cpu-probe:"))
            .unwrap_or_else(|| panic!("no cpu-probe thread in {times:?}"));
        // NAME:TID=MS/SYS/GUEST, with numbers for all four, the system time within the whole,
        // and no guest time in a thread that runs none.
        let (tid, times) = entry["cpu-probe:".len()..]
            .split_once('=')
            .expect("TID=MS/SYS/GUEST");
        let n: Vec<Result<u64, _>> = times.split('/').map(str::parse::<u64>).collect();
        assert!(tid.parse::<u32>().is_ok(), "{entry}");
        assert!(
            matches!(n[..], [Ok(ms), Ok(sys), Ok(0)] if sys <= ms),
            "{entry}"
        );
        assert_eq!(thread_times(u32::MAX), "", "no such process");
    }

    #[test]
    fn counter_deltas_say_how_much_each_counter_grew() {
        let c = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
        };
        let before = c(&[("compact_stall", 3), ("pgfault", 100)]);
        let after = c(&[
            ("compact_stall", 5),
            ("pgfault", 100),
            ("thp_fault_alloc", 7),
        ]);
        assert_eq!(
            counter_deltas(&before, &after),
            "compact_stall=2 pgfault=0 thp_fault_alloc=7"
        );
        // This host's own counters hold the fault count, which every kernel keeps.
        assert!(host_memory_counters().iter().any(|(n, _)| n == "pgfault"));
    }

    #[test]
    fn the_hosts_cpu_time_is_read_by_kind_and_only_grows() {
        let before = host_cpu_ms();
        let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
        // Every kernel since 2.6.33 gives these nine; the harness's hosts all do.
        assert_eq!(
            names,
            ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest"]
        );
        // Spin until the host's clock has ticked at least once while this thread ran.
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            std::hint::spin_loop();
        }
        let after = host_cpu_ms();
        let grew: u64 = before.iter().zip(&after).map(|(b, a)| a.1 - b.1).sum();
        assert!(grew > 0, "{before:?} -> {after:?}");
    }

    #[test]
    fn a_variant_appends_its_arguments_to_vmms_command_line() {
        let v = Column::variant("nosandbox=-sandbox off").unwrap();
        assert_eq!(v.name, "vmm-nosandbox");
        let boot = Boot::new(Kernel::BzImage, 2, 512, "");
        let c = v.command(&boot, Path::new("/g"));
        assert_eq!(c.get_program(), "vmm");
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.ends_with(&["-sandbox".to_owned(), "off".to_owned()]),
            "{args:?}"
        );
        assert!(args.contains(&"/g/bzImage".to_owned()), "{args:?}");
    }

    fn debian_setup() -> Setup {
        Setup {
            runs: 1,
            mem_mib: 512,
            smp: 2,
            guest: GuestImage::Debian,
            disk: Disk::None,
        }
    }

    #[test]
    fn a_debian_summary_shows_systemds_phases() {
        let out = "BOOT qemu 1 10000.0 100000 60000\nBOOT vmm 1 8000.0 63000 60000\n\
                   PHASES qemu 1 100.0 700.0 900.0 1300.0 1500.0 2000.0 2600.0 4000.0 9500.0 10000.0\n\
                   PHASES vmm 1 5.0 500.0 650.0 1000.0 1200.0 1600.0 2100.0 3200.0 7600.0 8000.0\n";
        let md = summarize(out, debian_setup(), "nested");
        assert!(
            md.starts_with("Debian 12 to `systemctl is-system-running` = running"),
            "{md}"
        );
        assert!(
            md.contains("| VMM | boots | to `running`, median (min–max) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| /init → systemd starts (the initramfs mounts the root) | 1400 | 1100 | 0.79 |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| systemd starts → boot finished (systemd's timestamps) | 5500 | 4400 | 0.80 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| VMM start → system running | 10000 | 8000 | 0.80 |"),
            "{md}"
        );
        assert!(
            md.contains("| CPUs up → clock source switched (ACPI and PCI enumeration, core initcalls) | 400 | 350 | 0.88 |"),
            "{md}"
        );
        assert!(!md.contains("first userspace line"), "{md}");
    }

    #[test]
    fn the_debian_guests_report_is_read_from_its_console() {
        let console = [
            "debian-guest login: BENCH-SYSTEM-STATE running 7.51",
            "BENCH-SYSTEMD UserspaceTimestampMonotonic=3000000",
            "BENCH-SYSTEMD FinishTimestampMonotonic=7400000",
            "[  OK  ] some console noise",
            "BENCH-DMESG [    2.000000] Run /init as init process",
            "BENCH-ANALYZE Startup finished in 2.1s (kernel) + 5.3s (userspace) = 7.4s",
            "BENCH-END",
        ];
        let r = DebianReport::parse(console).unwrap();
        assert_eq!(r.state, "running");
        assert!((r.uptime_ms - 7510.0).abs() < 1e-6, "{r:?}");
        assert_eq!(
            r.systemd,
            [
                "UserspaceTimestampMonotonic=3000000",
                "FinishTimestampMonotonic=7400000"
            ]
        );
        assert_eq!(r.dmesg, ["[    2.000000] Run /init as init process"]);
        assert_eq!(r.analyze.len(), 1);
        assert!(r.failed.is_empty());
        let r = DebianReport::parse([
            "BENCH-SYSTEM-STATE degraded 9.00",
            "BENCH-FAILED-UNIT x.service loaded failed failed X",
        ])
        .unwrap();
        assert_eq!(r.state, "degraded");
        assert_eq!(r.failed, ["x.service loaded failed failed X"]);
        // No state line, or one without an uptime: nothing to measure.
        assert_eq!(DebianReport::parse(["BENCH-END"]), None);
        assert_eq!(DebianReport::parse(["BENCH-SYSTEM-STATE running"]), None);
    }

    #[test]
    fn the_debian_script_prints_what_the_report_reads() {
        let script = debian_script();
        for needle in [
            STATE,
            FAILED,
            SYSTEMD,
            KMSG,
            ANALYZE,
            END,
            phases::KERNEL_LOG_PATTERN,
        ] {
            assert!(script.contains(needle), "{needle}: {script}");
        }
        for p in phases::SYSTEMD_PROPERTIES {
            assert!(script.contains(&format!("-p {p}")), "{p}");
        }
        // It must not halt the boot's measurement: it waits, then powers off last.
        assert!(script.starts_with("state=$(systemctl is-system-running --wait)"));
        assert!(script.trim_end().ends_with("systemctl poweroff -ff"));
    }

    #[test]
    fn each_guest_boots_with_its_disk_on_an_iothread() {
        let args = |b: &Boot, t| -> Vec<String> {
            b.command(t, Path::new("/d"))
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let b = debian_setup().boot(Path::new("/d"));
        let v = args(&b, Target::Vmm);
        assert!(v.contains(&"/d/vmlinuz".to_owned()), "{v:?}");
        for (t, a) in [(Target::Vmm, &v), (Target::Qemu, &args(&b, Target::Qemu))] {
            let drive = format!(
                "file=/d/bench-top.qcow2,format=qcow2,if=none,id=d0,cache=none,aio={}",
                t.aio_best().unwrap()
            );
            assert!(a.contains(&drive), "{a:?}");
        }
        assert!(
            v.contains(&"virtio-blk-device,drive=d0,iothread=io0".to_owned()),
            "{v:?}"
        );
        let append = v
            .iter()
            .find(|a| a.contains("root=/dev/vda ro guest.sh="))
            .unwrap();
        assert!(
            append.starts_with("console=ttyS0 quiet root=/dev/vda ro guest.sh="),
            "{append}"
        );
        assert!(!b.pcie);
        let mut pci = debian_setup();
        pci.guest = GuestImage::Initramfs;
        pci.disk = Disk::Pci;
        let b = pci.boot(Path::new("/d"));
        let q = args(&b, Target::Qemu);
        assert!(q.contains(&"microvm,pcie=on,rtc=on".to_owned()), "{q:?}");
        assert!(
            q.contains(&"virtio-blk-pci,drive=d0,iothread=io0".to_owned()),
            "{q:?}"
        );
        assert!(
            q.contains(&"file=/d/bench-pci-disk.raw,format=raw,if=none,id=d0".to_owned()),
            "{q:?}"
        );
        assert!(q.contains(&"/d/bzImage".to_owned()), "{q:?}");
        pci.disk = Disk::None;
        assert!(pci.boot(Path::new("/d")).extra.is_empty());
    }
}
