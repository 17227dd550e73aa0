//! The boot benchmark of the boot issue: time from the VMM's start to the guest's first userspace
//! line, and the VMM's resident memory beyond guest RAM, for each VMM with the same kernel,
//! initramfs, memory, vCPUs and command line, runs interleaved in one host, median of N each; and
//! where that time goes, phase by phase ([`crate::phases`]), with vmm's own start-up in
//! microseconds. A variant ([`Column::variant`], `--vmm-variant NAME=ARGS`) is vmm with arguments
//! appended, booted as one more column `vmm-NAME` interleaved with the others, to measure what a
//! flag costs (`-sandbox off`, say).
//!
//! The inner half ([`measure`]) prints each VMM's exact command line (`COMMAND`), then boots the
//! guests with their debug logs on (`-D`; QEMU also traces `kvm_cpu_exec`) and prints per boot a
//! `BOOT` line, a `PHASES` line and, for vmm, a `STARTUP` line per start-up step; once per VMM it
//! prints the guest's `dmesg`. The outer half ([`summarize`]) reads them back and writes Markdown
//! tables.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::guest::{self, Guest};
use crate::memory;
use crate::phases::{self, Milestones, PHASES};
use crate::report::{median, BootSample};
use crate::target::{Boot, Kernel, Target};

/// How long one boot may take to reach its shell prompt.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

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

/// What to boot, the same for every VMM.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Boots per VMM.
    pub runs: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub smp: u32,
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
/// boot prints its transcript and stops the benchmark.
pub fn measure(columns: &[Column], setup: Setup, guest_dir: &Path) -> Result<(), Error> {
    // No guest.run words: the guest goes straight to its shell, whose prompt ends the boot.
    let boot = Boot::new(Kernel::BzImage, setup.smp, setup.mem_mib, "");
    for col in columns {
        println!(
            "COMMAND {} {}",
            col.name,
            shell_words(&col.command(&boot, guest_dir))
        );
    }
    let log_dir = std::env::temp_dir();
    for run in 1..=setup.runs {
        for col in columns {
            let (target, name) = (col.target, col.name.as_str());
            let log = log_dir.join(format!("bench-boot-{}-{name}.log", std::process::id()));
            let mut command = col.command(&boot, guest_dir);
            command.args(target.debug_log_args(&log));
            let mut g = Guest::spawn(command).map_err(|source| Error::Guest {
                target: name.to_owned(),
                run,
                source,
            })?;
            // The whole kernel log once per VMM (to read); then only the milestones' lines,
            // since every console byte costs the guest an exit.
            let whole = run == 1;
            let sample = sample(&mut g, name, run, setup.mem_mib, whole);
            if sample.is_err() {
                print!("{}", g.transcript());
            }
            let (sample, dmesg) = sample?;
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
            let m = Milestones::from_kernel_log(
                kvm_run,
                dmesg.iter().map(String::as_str),
                sample.userspace_ms,
            );
            println!("PHASES {name} {run} {}", m.words());
            if whole {
                for l in &dmesg {
                    println!("DMESG {name} {l}");
                }
            }
        }
    }
    Ok(())
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

/// One boot: its figures, and the guest kernel's log read at the prompt.
fn sample(
    g: &mut Guest,
    target: &str,
    run: u32,
    mem_mib: u64,
    whole_dmesg: bool,
) -> Result<(BootSample, Vec<String>), Error> {
    let err = |source| Error::Guest {
        target: target.to_owned(),
        run,
        source,
    };
    let up = g
        .wait_for("GUEST-USERSPACE-UP", BOOT_TIMEOUT)
        .map_err(err)?;
    g.wait_prompt("GUEST-PROMPT#", BOOT_TIMEOUT).map_err(err)?;
    let mem = memory::resident(g.pid(), mem_mib * 1024).map_err(|source| Error::Memory {
        target: target.to_owned(),
        run,
        source,
    })?;
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
    let sample = BootSample {
        target: target.to_owned(),
        run,
        userspace_ms: up.at.as_secs_f64() * 1000.0,
        rss_kib: mem.total_kib,
        guest_kib: mem.guest_kib,
    };
    Ok((sample, dmesg))
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
    let _ = writeln!(
        md,
        "Boot to userspace, {} MiB, {} vCPUs, bzImage, `console=ttyS0 quiet`, {host}\n",
        setup.mem_mib, setup.smp
    );
    md.push_str("| VMM | boots | to userspace, median (min–max) | RSS beyond guest RAM, median (min–max) | total RSS, median |\n");
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
    md.push_str(&phase_table(output, &targets));
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
fn phase_table(output: &str, targets: &[&str]) -> String {
    let all = milestones(output);
    if all.is_empty() {
        return String::new();
    }
    let mut md = String::from("\nWhere the time goes, ms, median of the boots (milestones from the VMM's debug log and the guest's dmesg, `tests/src/phases.rs`):\n\n| phase |");
    for t in targets {
        let _ = write!(md, " {t} |");
    }
    // vmm over QEMU, then over each variant (the columns named vmm-NAME).
    let others: Vec<&str> = std::iter::once("qemu")
        .chain(targets.iter().copied().filter(|t| t.starts_with("vmm-")))
        .collect();
    for o in &others {
        let _ = write!(md, " vmm / {o} |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(targets.len() + others.len()));
    md.push('\n');
    let total = (
        "VMM start → first userspace line",
        None,
        phases::Field::Userspace,
    );
    for (name, from, to) in PHASES.iter().chain(std::iter::once(&total)) {
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
    let mut md = String::from("\nvmm's own start-up, µs from its start (the process started by the harness), median:\n\n| step |");
    for c in &columns {
        let _ = write!(md, " {c} µs |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(columns.len()));
    md.push('\n');
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
        };
        let out = format!(
            "{out}COMMAND qemu qemu-system-x86_64 -M microvm,rtc=on\n\
             PHASES vmm 1 2.0 100.0 200.0 300.0 500.0\nPHASES qemu 1 50.0 150.0 300.0 400.0 1000.0\n\
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
    fn a_variant_is_a_column_with_vmm_over_it() {
        let out = "BOOT qemu 1 1000.0 100000 60000\nBOOT vmm 1 500.0 70000 60000\n\
                   BOOT vmm-nosandbox 1 400.0 70000 60000\n\
                   PHASES qemu 1 50.0 150.0 300.0 400.0 1000.0\n\
                   PHASES vmm 1 2.0 100.0 200.0 300.0 500.0\n\
                   PHASES vmm-nosandbox 1 1.0 80.0 160.0 240.0 400.0\n\
                   STARTUP vmm 1 900 KVM opened and VM created\n\
                   STARTUP vmm-nosandbox 1 600 KVM opened and VM created\n\
                   STARTUP vmm 1 1500 sandbox entered\n";
        let setup = Setup {
            runs: 1,
            mem_mib: 512,
            smp: 2,
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
}
