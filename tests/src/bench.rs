//! The boot benchmark of the boot issue: time from the VMM's start to the guest's first userspace
//! line, and the VMM's resident memory beyond guest RAM, for each VMM with the same kernel,
//! initramfs, memory, vCPUs and command line, runs interleaved in one host, median of N each.
//!
//! The inner half ([`measure`]) boots the guests and prints one `BOOT` line per boot; the outer half
//! ([`summarize`]) reads them back and writes a Markdown table.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::guest::{self, Guest};
use crate::memory;
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
        /// The VMM.
        target: Target,
        /// The run number.
        run: u32,
        /// What went wrong.
        #[source]
        source: guest::Error,
    },
    /// The VMM's memory map could not be read.
    #[error("{target} run {run}: reading its memory")]
    Memory {
        /// The VMM.
        target: Target,
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

/// Boots each target `setup.runs` times, interleaved, printing a `BOOT` line per boot; a failed
/// boot prints its transcript and stops the benchmark.
pub fn measure(targets: &[Target], setup: Setup, guest_dir: &Path) -> Result<(), Error> {
    // No guest.run words: the guest goes straight to its shell, whose prompt ends the boot.
    let boot = Boot::new(Kernel::BzImage, setup.smp, setup.mem_mib, "");
    for run in 1..=setup.runs {
        for &target in targets {
            let mut g =
                Guest::spawn(boot.command(target, guest_dir)).map_err(|source| Error::Guest {
                    target,
                    run,
                    source,
                })?;
            let sample = sample(&mut g, target, run, setup.mem_mib);
            if sample.is_err() {
                print!("{}", g.transcript());
            }
            println!("{}", sample?.line());
        }
    }
    Ok(())
}

fn sample(g: &mut Guest, target: Target, run: u32, mem_mib: u64) -> Result<BootSample, Error> {
    let err = |source| Error::Guest {
        target,
        run,
        source,
    };
    let up = g
        .wait_for("GUEST-USERSPACE-UP", BOOT_TIMEOUT)
        .map_err(err)?;
    g.wait_prompt("GUEST-PROMPT#", BOOT_TIMEOUT).map_err(err)?;
    let mem = memory::resident(g.pid(), mem_mib * 1024).map_err(|source| Error::Memory {
        target,
        run,
        source,
    })?;
    g.send("poweroff -f\n").map_err(err)?;
    g.wait_exit(BOOT_TIMEOUT).map_err(err)?;
    Ok(BootSample {
        target: target.to_string(),
        run,
        userspace_ms: up.at.as_secs_f64() * 1000.0,
        rss_kib: mem.total_kib,
        guest_kib: mem.guest_kib,
    })
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
    for t in targets {
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
        let md = summarize(out, setup, "nested");
        assert!(
            md.contains("| qemu | 3 | 2000 ms (1000–3000) | 40.1 MiB (39.1–41.1) |"),
            "{md}"
        );
        assert!(
            md.contains("| vmm | 3 | 600 ms (500–700) | 9.8 MiB (9.8–19.8) |"),
            "{md}"
        );
    }
}
