//! Where a boot's time goes: the milestones of one boot, in milliseconds from the VMM's start, read
//! from the VMM's own debug log, the guest kernel's log and (for a systemd guest) systemd's own
//! timestamps.
//!
//! - **First `KVM_RUN`**: vmm's `-D` log gives its start as Unix time and each step after it
//!   (`startup:` lines, [`vmm_startup`]); QEMU's `-D` log with `-trace kvm_cpu_exec -msg
//!   timestamp=on` gives each vCPU's entry into its `KVM_RUN` loop as Unix time ([`qemu_first_run`]).
//!   The harness took the VMM's start as Unix time when it started the process.
//! - **Kernel milestones**: the guest's `dmesg` (printk times, seconds on the kernel's clock): the
//!   secondary CPUs up (`smp: Brought up`: memory set up, SMP brought up), the switch to the
//!   clock source of the rest of the boot (an fs initcall, after ACPI's and PCI's enumeration), the
//!   start of initramfs unpacking, its end (the initrd's memory freed), and `Run /init`. The
//!   kernel's clock starts early in its set-up (kvmclock's first reading), after the bzImage has
//!   unpacked itself. It is placed on the harness's clock by an [`Anchor`]: for the small initramfs,
//!   `Run /init` is taken as the moment the console showed the first userspace line, so the short
//!   exec of `/init` before that line counts in "first `KVM_RUN` → kernel clock starts"; for a
//!   distribution, the guest prints its uptime (`/proc/uptime`, 10 ms steps, the kernel's clock as
//!   printk reads it to within a few ms) in the line that ends the boot.
//! - **systemd's milestones** (a distribution): `systemctl show`'s `UserspaceTimestampMonotonic`
//!   (systemd started in the root file system, after the initramfs's own `/init`) and
//!   `FinishTimestampMonotonic` (the boot's jobs done: what `systemctl is-system-running` then
//!   reports as `running`), microseconds on the kernel's monotonic clock.

use std::time::Duration;

/// The console line that starts userspace's first process, in the kernel's log.
const RUN_INIT: &str = "Run /init as init process";
/// The kernel has brought its secondary CPUs up.
const CPUS_UP: &str = "smp: Brought up";
/// The kernel switches to its clock source (an fs initcall: ACPI and PCI are enumerated).
const CLOCKSOURCE: &str = "clocksource: Switched to clocksource";
/// The kernel starts unpacking the initramfs.
const UNPACK_START: &str = "Trying to unpack rootfs image as initramfs";
/// The kernel has unpacked the initramfs and frees its image.
const UNPACK_END: &str = "Freeing initrd memory";

/// An extended regular expression (`grep -E`) for the kernel's log lines [`Milestones`] reads.
pub const KERNEL_LOG_PATTERN: &str = "smp: Brought up|clocksource: Switched to clocksource|\
     Run /init as init process|Trying to unpack rootfs image as initramfs|Freeing initrd memory";

/// systemd's manager properties [`Milestones::systemd`] and [`Milestones::finished`] come from, as
/// `systemctl show -p` prints them (`NAME=MICROSECONDS`).
pub const SYSTEMD_PROPERTIES: [&str; 2] =
    ["UserspaceTimestampMonotonic", "FinishTimestampMonotonic"];

/// How the kernel's clock is placed on the harness's.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Anchor {
    /// The kernel's `Run /init` is the end of the boot (the first userspace line).
    #[default]
    RunInit,
    /// The guest's clock read ms when it printed the line that ends the boot.
    Uptime(f64),
}

/// The milestones of one boot, milliseconds from the VMM's start; None where a log lacked one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Milestones {
    /// The first vCPU's first `KVM_RUN`.
    pub kvm_run: Option<f64>,
    /// The kernel's clock starts (printk time 0).
    pub kernel: Option<f64>,
    /// The kernel has brought its secondary CPUs up.
    pub cpus_up: Option<f64>,
    /// The kernel has switched to its clock source.
    pub clocksource: Option<f64>,
    /// The kernel starts unpacking the initramfs.
    pub unpack_start: Option<f64>,
    /// The kernel has unpacked the initramfs.
    pub unpack_end: Option<f64>,
    /// The kernel runs the initramfs's `/init`.
    pub init: Option<f64>,
    /// systemd starts in the root file system.
    pub systemd: Option<f64>,
    /// systemd has finished the boot's jobs.
    pub finished: Option<f64>,
    /// The console shows the line that ends the boot (the first userspace line, or `running`).
    pub end: f64,
}

/// A phase of a boot as the summary shows it: (name, from, to) over [`Milestones`]; `from` None
/// is the VMM's start.
pub type Phase = (&'static str, Option<Field>, Field);

/// The first phases of every boot, up to the kernel's unpacking of the initramfs.
const KERNEL_PHASES: [Phase; 6] = [
    ("VMM start → first KVM_RUN", None, Field::KvmRun),
    (
        "first KVM_RUN → kernel clock starts (bzImage unpacking, early set-up)",
        Some(Field::KvmRun),
        Field::Kernel,
    ),
    (
        "kernel clock → CPUs up (memory, ACPI tables, SMP)",
        Some(Field::Kernel),
        Field::CpusUp,
    ),
    (
        "CPUs up → clock source switched (ACPI and PCI enumeration, core initcalls)",
        Some(Field::CpusUp),
        Field::Clocksource,
    ),
    (
        "clock source switched → initramfs unpacking starts",
        Some(Field::Clocksource),
        Field::UnpackStart,
    ),
    (
        "initramfs unpacking",
        Some(Field::UnpackStart),
        Field::UnpackEnd,
    ),
];

/// The phases of the small initramfs's boot, the whole boot last.
pub const INITRAMFS_PHASES: [Phase; 8] = [
    KERNEL_PHASES[0],
    KERNEL_PHASES[1],
    KERNEL_PHASES[2],
    KERNEL_PHASES[3],
    KERNEL_PHASES[4],
    KERNEL_PHASES[5],
    (
        "initramfs unpacked → first userspace line",
        Some(Field::UnpackEnd),
        Field::End,
    ),
    ("VMM start → first userspace line", None, Field::End),
];

/// The phases of a distribution's boot to `running`, the whole boot last.
pub const SYSTEMD_PHASES: [Phase; 11] = [
    KERNEL_PHASES[0],
    KERNEL_PHASES[1],
    KERNEL_PHASES[2],
    KERNEL_PHASES[3],
    KERNEL_PHASES[4],
    KERNEL_PHASES[5],
    (
        "initramfs unpacked → /init runs (the kernel's drivers)",
        Some(Field::UnpackEnd),
        Field::Init,
    ),
    (
        "/init → systemd starts (the initramfs mounts the root)",
        Some(Field::Init),
        Field::Systemd,
    ),
    (
        "systemd starts → boot finished (systemd's timestamps)",
        Some(Field::Systemd),
        Field::Finished,
    ),
    (
        "boot finished → `running` on the console",
        Some(Field::Finished),
        Field::End,
    ),
    ("VMM start → system running", None, Field::End),
];

/// One milestone of [`Milestones`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// [`Milestones::kvm_run`].
    KvmRun,
    /// [`Milestones::kernel`].
    Kernel,
    /// [`Milestones::cpus_up`].
    CpusUp,
    /// [`Milestones::clocksource`].
    Clocksource,
    /// [`Milestones::unpack_start`].
    UnpackStart,
    /// [`Milestones::unpack_end`].
    UnpackEnd,
    /// [`Milestones::init`].
    Init,
    /// [`Milestones::systemd`].
    Systemd,
    /// [`Milestones::finished`].
    Finished,
    /// [`Milestones::end`].
    End,
}

impl Milestones {
    /// The milestone `f`.
    pub fn get(&self, f: Field) -> Option<f64> {
        match f {
            Field::KvmRun => self.kvm_run,
            Field::Kernel => self.kernel,
            Field::CpusUp => self.cpus_up,
            Field::Clocksource => self.clocksource,
            Field::UnpackStart => self.unpack_start,
            Field::UnpackEnd => self.unpack_end,
            Field::Init => self.init,
            Field::Systemd => self.systemd,
            Field::Finished => self.finished,
            Field::End => Some(self.end),
        }
    }

    /// Milliseconds from `from` (None: the VMM's start) to `to`.
    pub fn span(&self, from: Option<Field>, to: Field) -> Option<f64> {
        let start = match from {
            Some(f) => self.get(f)?,
            None => 0.0,
        };
        Some(self.get(to)? - start)
    }

    /// Places the guest's logs on the harness's clock, given when the line that ends the boot
    /// reached the console (`end`, ms from the VMM's start): the kernel's log (`dmesg` lines) and
    /// systemd's properties (`NAME=MICROSECONDS` lines of [`SYSTEMD_PROPERTIES`]; none for a guest
    /// without systemd).
    pub fn from_guest_logs<'a>(
        kvm_run: Option<f64>,
        dmesg: impl IntoIterator<Item = &'a str>,
        systemd: impl IntoIterator<Item = &'a str>,
        anchor: Anchor,
        end: f64,
    ) -> Self {
        let (mut run_init, mut unpack_start, mut unpack_end) = (None, None, None);
        let (mut cpus_up, mut clocksource) = (None, None);
        for line in dmesg {
            let Some((secs, text)) = printk_line(line) else {
                continue;
            };
            for (needle, slot) in [
                (RUN_INIT, &mut run_init),
                (CPUS_UP, &mut cpus_up),
                (CLOCKSOURCE, &mut clocksource),
                (UNPACK_START, &mut unpack_start),
                (UNPACK_END, &mut unpack_end),
            ] {
                if slot.is_none() && text.starts_with(needle) {
                    *slot = Some(secs * 1000.0);
                }
            }
        }
        let (mut userspace, mut finish) = (None, None);
        for line in systemd {
            let Some((name, us)) = line.trim().split_once('=') else {
                continue;
            };
            // systemd says 0 for a moment that has not come.
            let ms = us
                .parse::<f64>()
                .ok()
                .filter(|&us| us > 0.0)
                .map(|us| us / 1000.0);
            match name {
                n if n == SYSTEMD_PROPERTIES[0] => userspace = ms,
                n if n == SYSTEMD_PROPERTIES[1] => finish = ms,
                _ => {}
            }
        }
        let kernel = match anchor {
            Anchor::RunInit => run_init.map(|init| end - init),
            Anchor::Uptime(ms) => Some(end - ms),
        };
        let on_host = |t: Option<f64>| Some(kernel? + t?);
        Milestones {
            kvm_run,
            kernel,
            cpus_up: on_host(cpus_up),
            clocksource: on_host(clocksource),
            unpack_start: on_host(unpack_start),
            unpack_end: on_host(unpack_end),
            init: on_host(run_init),
            systemd: on_host(userspace),
            finished: on_host(finish),
            end,
        }
    }

    /// The words of a `PHASES` report line after its target and run ("-" for a missing one).
    pub fn words(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        format!(
            "{} {} {} {} {} {} {} {} {} {:.1}",
            f(self.kvm_run),
            f(self.kernel),
            f(self.cpus_up),
            f(self.clocksource),
            f(self.unpack_start),
            f(self.unpack_end),
            f(self.init),
            f(self.systemd),
            f(self.finished),
            self.end
        )
    }

    /// Parses what [`Milestones::words`] wrote.
    pub fn parse(words: &[&str]) -> Option<Self> {
        let opt = |w: &str| -> Option<Option<f64>> {
            if w == "-" {
                Some(None)
            } else {
                w.parse().ok().map(Some)
            }
        };
        let [a, b, cpus, clock, c, d, e, f, g, end] = words else {
            return None;
        };
        Some(Milestones {
            kvm_run: opt(a)?,
            kernel: opt(b)?,
            cpus_up: opt(cpus)?,
            clocksource: opt(clock)?,
            unpack_start: opt(c)?,
            unpack_end: opt(d)?,
            init: opt(e)?,
            systemd: opt(f)?,
            finished: opt(g)?,
            end: end.parse().ok()?,
        })
    }
}

/// A `dmesg` line `[   1.234567] text` as (seconds, text).
fn printk_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (secs, text) = rest.split_once(']')?;
    Some((secs.trim().parse().ok()?, text.trim_start()))
}

/// A debug-log timestamp, Unix seconds, as milliseconds after `started` (also Unix time).
fn ms_after(unix_secs: f64, started: Duration) -> f64 {
    (unix_secs - started.as_secs_f64()) * 1000.0
}

/// vmm's start-up steps from its `-D` log: (step, microseconds from the VMM's start) in log order.
pub fn vmm_startup(log: &str, started: Duration) -> Vec<(String, f64)> {
    let mut origin = None;
    let mut steps = Vec::new();
    for line in log.lines() {
        // "[    0.001234] INFO  main: message"
        let Some((secs, rest)) = printk_line(line) else {
            continue;
        };
        let message = rest.split_once(": ").map_or(rest, |(_, m)| m);
        if let Some(unix) = message.strip_prefix("debug log started at Unix time ") {
            origin = unix.trim().parse::<f64>().ok();
        } else if let (Some(o), Some(step)) = (origin, message.strip_prefix("startup: ")) {
            steps.push((step.to_owned(), ms_after(o + secs, started) * 1000.0));
        }
    }
    steps
}

/// QEMU's first `kvm_cpu_exec` trace line (`PID@SECS.MICROS:kvm_cpu_exec`), ms from its start.
pub fn qemu_first_run(log: &str, started: Duration) -> Option<f64> {
    log.lines().find_map(|line| {
        let (head, event) = line.split_once(':')?;
        if !event.starts_with("kvm_cpu_exec") {
            return None;
        }
        let (_, unix) = head.split_once('@')?;
        Some(ms_after(unix.parse().ok()?, started))
    })
}

/// The first `KVM_RUN` among vmm's start-up steps, in ms.
pub fn vmm_first_run(steps: &[(String, f64)]) -> Option<f64> {
    steps
        .iter()
        .find(|(s, _)| s.ends_with("first KVM_RUN"))
        .map(|(_, us)| us / 1000.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STARTED: Duration = Duration::from_micros(1_796_520_334_000_000);

    #[test]
    fn vmm_steps_are_placed_on_the_harness_clock() {
        let log = "[    0.000000] INFO  main: debug log started at Unix time 1796520334.001000\n\
                   [    0.000100] INFO  main: startup: KVM opened and VM created\n\
                   [    0.000500] DEBUG main: something else\n\
                   [    0.002000] INFO  vcpu0: startup: vCPU 0 first KVM_RUN\n";
        let steps = vmm_startup(log, STARTED);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[0].0, "KVM opened and VM created");
        assert!((steps[0].1 - 1100.0).abs() < 1.0, "{steps:?}");
        assert!((vmm_first_run(&steps).unwrap() - 3.0).abs() < 0.01);
    }

    #[test]
    fn qemus_first_kvm_cpu_exec_is_found() {
        let log = "2026-12-06T01:25:36.809196Z qemu-system-x86_64: warning: x\n\
                   28006@1796520334.250000:kvm_cpu_exec \n\
                   28007@1796520334.260000:kvm_cpu_exec \n";
        assert!((qemu_first_run(log, STARTED).unwrap() - 250.0).abs() < 0.01);
        assert_eq!(qemu_first_run("nothing\n", STARTED), None);
    }

    #[test]
    fn the_grep_pattern_names_every_milestone() {
        for needle in [RUN_INIT, CPUS_UP, CLOCKSOURCE, UNPACK_START, UNPACK_END] {
            assert!(
                KERNEL_LOG_PATTERN.split('|').any(|p| p == needle),
                "{needle}"
            );
        }
    }

    #[test]
    fn kernel_milestones_are_aligned_at_run_init() {
        let dmesg = [
            "GUEST-PROMPT# dmesg; echo X",
            "[    0.000000] Linux version 6.1",
            "[    1.000000] Trying to unpack rootfs image as initramfs...",
            "[    1.500000] Freeing initrd memory: 1000K",
            "[    3.000000] Run /init as init process",
        ];
        let m = Milestones::from_guest_logs(Some(100.0), dmesg, [], Anchor::RunInit, 5000.0);
        assert_eq!(m.kernel, Some(2000.0));
        assert_eq!(m.unpack_start, Some(3000.0));
        assert_eq!(m.unpack_end, Some(3500.0));
        assert_eq!(m.span(None, Field::KvmRun), Some(100.0));
        assert_eq!(m.span(Some(Field::KvmRun), Field::Kernel), Some(1900.0));
        assert_eq!(m.span(Some(Field::UnpackEnd), Field::End), Some(1500.0));
        let words = m.words();
        let back = Milestones::parse(&words.split(' ').collect::<Vec<_>>()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.init, Some(5000.0));
        assert_eq!((m.systemd, m.finished), (None, None));
        let none = Milestones::from_guest_logs(None, ["no times"], [], Anchor::RunInit, 10.0);
        assert_eq!(none.words(), "- - - - - - - - - 10.0");
        assert_eq!(none.span(None, Field::Kernel), None);
    }

    #[test]
    fn a_systemd_boot_is_aligned_at_the_guests_uptime() {
        let dmesg = [
            "[    0.100000] smp: Brought up 1 node, 2 CPUs",
            "[    0.350000] clocksource: Switched to clocksource kvm-clock",
            "[    0.800000] Trying to unpack rootfs image as initramfs...",
            "[    1.300000] Freeing initrd memory: 30000K",
            "[    2.000000] Run /init as init process",
        ];
        let systemd = [
            "UserspaceTimestampMonotonic=3500000",
            "FinishTimestampMonotonic=9000000",
            "Something=else",
        ];
        // The line that ends the boot reached the console 10 s after the VMM's start, with the
        // guest's clock at 9.25 s: the kernel's clock started at 750 ms.
        let m = Milestones::from_guest_logs(
            Some(50.0),
            dmesg,
            systemd,
            Anchor::Uptime(9250.0),
            10_000.0,
        );
        assert_eq!(m.kernel, Some(750.0));
        assert_eq!(m.unpack_start, Some(1550.0));
        assert_eq!(m.init, Some(2750.0));
        assert_eq!(m.systemd, Some(4250.0));
        assert_eq!(m.finished, Some(9750.0));
        let spans: Vec<Option<f64>> = SYSTEMD_PHASES
            .iter()
            .map(|(_, from, to)| m.span(*from, *to))
            .collect();
        assert_eq!(
            spans,
            [
                Some(50.0),
                Some(700.0),
                Some(100.0),
                Some(250.0),
                Some(450.0),
                Some(500.0),
                Some(700.0),
                Some(1500.0),
                Some(5500.0),
                Some(250.0),
                Some(10_000.0)
            ]
        );
        let back = Milestones::parse(&m.words().split(' ').collect::<Vec<_>>()).unwrap();
        assert_eq!(back, m);
        // A moment systemd has not reached reads 0: no milestone.
        let m = Milestones::from_guest_logs(
            None,
            [],
            ["FinishTimestampMonotonic=0"],
            Anchor::Uptime(1.0),
            2.0,
        );
        assert_eq!(m.finished, None);
        assert_eq!(Milestones::parse(&["1.0"; 9]), None);
    }
}
