//! The Linux-booting test cases of the boot issue, for any inner VMM: the Debian kernel boots as a
//! bzImage and as a PVH vmlinux with 1, 2 and 8 vCPUs (the guest sees them all), `free` shows the
//! memory given (with 4 GiB, memory above the 32-bit PCI hole counts), the clock source is sane, a
//! command typed on the serial console gets its output, and the VMM exits 0 promptly after the
//! guest's `poweroff` and after its `reboot`.
//!
//! Optional groups ([`Groups`]) add the cases of features a VMM gains later: the virtio-blk disk case
//! ([`crate::disks`]) and the QMP power button. Every case runs inside the host that can run Linux
//! guests (direct or nested), one after another, and returns an [`Outcome`]; the guest's console
//! transcript comes with every failure.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::guest::{self, Guest};
use crate::qmp::{self, Qmp};
use crate::target::{Boot, Kernel, Target};

/// How long a guest may take to reach userspace or to answer. Generous: under the nested host every
/// inner exit is emulated, and a busy machine makes that several times slower.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the VMM may take to exit after the guest's kernel says it powers off or restarts
/// (the boot issue: "within a second"), on direct KVM and in the nested host, where everything
/// runs several times slower (QEMU took 0.3 to 0.7 s there on a busy machine).
const EXIT_LIMIT: Duration = Duration::from_secs(1);
const EXIT_LIMIT_NESTED: Duration = Duration::from_secs(3);
/// How long to wait for the VMM to exit at all before declaring it hung.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory of the guests that do not test memory size, in MiB.
const MEM_MIB: u64 = 512;
/// Clock sources a KVM guest should end up with; jiffies-based ones mean a broken timer set-up.
const SANE_CLOCKSOURCES: &[&str] = &["kvm-clock", "tsc"];

/// Why a case failed (beside the guest errors of [`guest::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Starting the guest, reading its console or waiting for its exit failed.
    #[error(transparent)]
    Guest(#[from] guest::Error),
    /// Talking to the VMM's QMP monitor failed.
    #[error(transparent)]
    Qmp(#[from] qmp::Error),
    /// The guest's kernel panicked or stopped before its userspace started.
    #[error("the guest's kernel stopped before userspace: {0:?}")]
    NoUserspace(String),
    /// The `GUEST-INFO` line lacks a field or holds a malformed one.
    #[error("malformed info line {0:?}")]
    Info(String),
    /// The guest saw another number of CPUs than `-smp`.
    #[error("the guest sees {got} CPUs, -smp was {want}")]
    CpuCount {
        /// `-smp`.
        want: u32,
        /// `nproc` in the guest.
        got: u64,
    },
    /// The guest's MemTotal is not within 80 % to 100 % of `-m`.
    #[error("the guest has MemTotal {got_kib} KiB, -m was {mem_mib} MiB")]
    Memory {
        /// `-m`.
        mem_mib: u64,
        /// MemTotal in the guest.
        got_kib: u64,
    },
    /// The guest's clock source is not one a KVM guest should use.
    #[error("the guest's clock source is {0}")]
    Clocksource(String),
    /// The VMM exited with another status than 0.
    #[error("the VMM exited with {0}")]
    ExitStatus(ExitStatus),
    /// The disk image of a case could not be made.
    #[error("cannot create {path}")]
    Image {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest saw another disk size than expected (in 512-byte sectors).
    #[error("the guest sees {got:?} sectors on vda, expected {want}")]
    DiskSize {
        /// What the disk should have.
        want: u64,
        /// What `/sys/block/vda/size` said.
        got: String,
    },
    /// The VMM took too long to exit after the guest's kernel powered off or restarted.
    #[error("the VMM exited {0:?} after the guest's kernel said {1:?}")]
    SlowExit(Duration, &'static str),
}

/// What a case does.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Boot, check CPUs, memory and clock source, power off.
    Boot {
        kernel: Kernel,
        smp: u32,
        mem_mib: u64,
    },
    /// Boot to the shell, type a command and read its output, type `poweroff -f`.
    Console,
    /// Boot and `reboot -f`.
    Reboot,
    /// The root file system on a qcow2 chain on an iothread ([`crate::disks`]).
    DiskChain,
    /// Boot with acpid, press the ACPI power button through QMP `system_powerdown`.
    PowerButton,
    /// Boot with a raw disk on this driver (`virtio-blk-device` or `virtio-blk-pci`), grow it
    /// through QMP `block_resize`, the guest sees the new size.
    BlockResize(&'static str),
    /// A raw disk on virtio-blk-pci on an iothread: verified I/O and a vector per queue
    /// ([`crate::pci`]).
    PciDisk,
    /// A raw disk on virtio-blk-pci whose BAR the VMM places above 4 GiB: the guest keeps it
    /// there, in the host bridge's 64-bit window ([`crate::pci`]).
    PciBar64,
    /// fio `--verify` on virtio-blk-pci in a guest booted with `pci=nomsi`: the disk interrupts
    /// through INTx, a level-triggered IOAPIC pin ([`crate::pci`]).
    PciIntx,
    /// fio with a job per vCPU on virtio-blk-pci: each queue's vector fires on its own CPU only
    /// ([`crate::pci`]).
    PciAffinity,
    /// fio `--verify` with a job per vCPU on virtio-blk-pci whose queues `iothread-vq-mapping`
    /// spreads over two iothreads ([`crate::pci`]).
    PciVqMapping,
}

/// The optional groups of cases, for features a VMM gains later.
#[derive(Debug, Clone, Copy, Default)]
pub struct Groups {
    /// The virtio-blk disk cases.
    pub disks: bool,
    /// The QMP monitor cases.
    pub qmp: bool,
}

/// One test case for one VMM.
#[derive(Debug, Clone)]
pub struct Case {
    /// `TARGET/what`, e.g. `vmm/pvh-smp2`.
    pub name: String,
    target: Target,
    kind: Kind,
}

/// The result of one case.
#[derive(Debug)]
pub struct Outcome {
    /// Passed or not.
    pub passed: bool,
    /// Wall time of the case.
    pub secs: f64,
    /// Figures measured on success, the failure otherwise.
    pub detail: String,
    /// The console transcript, on failure.
    pub transcript: Option<String>,
}

/// Every case for each target, in a stable order, with the optional `groups` asked for; `filter`
/// keeps those whose name contains it.
pub fn cases(targets: &[Target], filter: Option<&str>, groups: Groups) -> Vec<Case> {
    let mut all = Vec::new();
    for &target in targets {
        let mut add = |what: String, kind| {
            all.push(Case {
                name: format!("{target}/{what}"),
                target,
                kind,
            });
        };
        // QEMU's microvm loads the initrd of a PVH boot over the DSDT its firmware put at the top
        // of RAM ("ACPI: ... 000000 (v00 ...)", then AE_NO_ACPI_TABLES), so the guest finds no
        // console or power-off: PVH is checked on our VMM only.
        let kernels: &[Kernel] = match target {
            Target::Vmm => &[Kernel::BzImage, Kernel::Pvh],
            Target::Qemu => &[Kernel::BzImage],
        };
        for &kernel in kernels {
            for smp in [1, 2, 8] {
                let what = match kernel {
                    Kernel::BzImage => format!("bzimage-smp{smp}"),
                    Kernel::Pvh => format!("pvh-smp{smp}"),
                    Kernel::Vmlinuz => format!("vmlinuz-smp{smp}"),
                };
                add(
                    what,
                    Kind::Boot {
                        kernel,
                        smp,
                        mem_mib: MEM_MIB,
                    },
                );
            }
        }
        // 4 GiB reaches above the 32-bit PCI hole.
        add(
            "memory-4g".into(),
            Kind::Boot {
                kernel: Kernel::BzImage,
                smp: 2,
                mem_mib: 4096,
            },
        );
        add("console-input".into(), Kind::Console);
        add("reboot".into(), Kind::Reboot);
        // QEMU's microvm as the baseline runs it has no PCI bus.
        if target == Target::Vmm {
            add("virtio-blk-pci".into(), Kind::PciDisk);
            add("virtio-blk-pci-bar64".into(), Kind::PciBar64);
            add("virtio-blk-pci-intx".into(), Kind::PciIntx);
            add("virtio-blk-pci-mq-affinity".into(), Kind::PciAffinity);
            add("virtio-blk-pci-vq-mapping".into(), Kind::PciVqMapping);
        }
        if groups.disks {
            add("rootfs-chain3-iothread".into(), Kind::DiskChain);
        }
        if groups.qmp {
            add("qmp-power-button".into(), Kind::PowerButton);
            add(
                "qmp-block-resize".into(),
                Kind::BlockResize("virtio-blk-device"),
            );
            // The configuration-change interrupt on its MSI-X vector.
            if target == Target::Vmm {
                add(
                    "qmp-block-resize-pci".into(),
                    Kind::BlockResize("virtio-blk-pci"),
                );
            }
        }
    }
    all.retain(|c| filter.is_none_or(|f| c.name.contains(f)));
    all
}

/// Runs one case with the guest files in `guest_dir`.
pub fn run(case: &Case, guest_dir: &Path) -> Outcome {
    let start = Instant::now();
    let mut transcript = None;
    // Each kind fails with its own error type; the report needs only the message.
    let result: Result<String, String> = match case.kind {
        Kind::Boot {
            kernel,
            smp,
            mem_mib,
        } => {
            let boot = Boot::new(kernel, smp, mem_mib, "guest.run=info,poweroff");
            drive(case.target, &boot, guest_dir, &mut transcript, |g| {
                check_info(g, smp, mem_mib)
            })
            .map_err(|e| e.to_string())
        }
        Kind::Console => {
            let boot = Boot::new(Kernel::BzImage, 2, MEM_MIB, "");
            drive(case.target, &boot, guest_dir, &mut transcript, type_command)
                .map_err(|e| e.to_string())
        }
        Kind::Reboot => {
            let boot = Boot::new(Kernel::BzImage, 1, MEM_MIB, "guest.run=reboot");
            drive(case.target, &boot, guest_dir, &mut transcript, |_| {
                Ok(String::new())
            })
            .map_err(|e| e.to_string())
        }
        Kind::PowerButton => {
            power_button(case.target, guest_dir, &mut transcript).map_err(|e| e.to_string())
        }
        Kind::BlockResize(driver) => {
            block_resize(case.target, guest_dir, &case.name, driver, &mut transcript)
                .map_err(|e| e.to_string())
        }
        Kind::PciDisk => {
            crate::pci::disk_on_pci(case.target, guest_dir, &case.name, &mut transcript)
                .map_err(|e| e.to_string())
        }
        Kind::PciBar64 => {
            crate::pci::bar_above_4_gib(case.target, guest_dir, &case.name, &mut transcript)
                .map_err(|e| e.to_string())
        }
        Kind::PciIntx => {
            crate::pci::intx_without_msi(case.target, guest_dir, &case.name, &mut transcript)
                .map_err(|e| e.to_string())
        }
        Kind::PciAffinity => {
            crate::pci::queues_on_their_cpus(case.target, guest_dir, &case.name, &mut transcript)
                .map_err(|e| e.to_string())
        }
        Kind::PciVqMapping => {
            crate::pci::queues_on_two_iothreads(case.target, guest_dir, &case.name, &mut transcript)
                .map_err(|e| e.to_string())
        }
        Kind::DiskChain => {
            crate::disks::chain_on_iothread(case.target, guest_dir, &case.name, &mut transcript)
                .map_err(|e| e.to_string())
        }
    };
    let (passed, detail) = match result {
        Ok(detail) => (true, detail),
        Err(e) => (false, e),
    };
    Outcome {
        passed,
        secs: start.elapsed().as_secs_f64(),
        detail,
        transcript: transcript.filter(|_| !passed),
    }
}

/// Boots `boot` under `target`, waits for userspace, runs `check`, then expects the VMM to exit 0
/// promptly once the guest's kernel powers off or restarts. Keeps the transcript for failures.
///
/// A guest that resets itself before its userspace starts (the VMM exits 0 with no marker) is
/// booted once more, and the result says so with what ended the first boot: the nested host's
/// emulated virtualization has been seen to triple-fault an early-booting guest under either VMM,
/// once in a few hundred boots. A guest that printed nothing at all before the userspace timeout is
/// booted once more too: the nested host has been seen to stall an inner guest silently, under
/// either VMM, at a different point each time. A second early end or stall fails the case.
pub(crate) fn drive(
    target: Target,
    boot: &Boot,
    guest_dir: &Path,
    transcript: &mut Option<String>,
    check: impl FnOnce(&mut Guest) -> Result<String, Failure>,
) -> Result<String, Failure> {
    let debug_log = std::env::temp_dir().join(format!("linux-tests-{}.log", std::process::id()));
    let spawn = || {
        let mut command = boot.command(target, guest_dir);
        command.arg("-D").arg(&debug_log);
        Guest::spawn(command)
    };
    let mut guest = spawn()?;
    let mut first_boot = None;
    let mut up = wait_userspace(&mut guest);
    if matches!(up, Err(Failure::Guest(guest::Error::Ended { .. }))) {
        if let Ok((status, _)) = guest.wait_exit(EXIT_TIMEOUT) {
            if status.success() {
                first_boot = Some(early_end(&guest, &debug_log));
                guest = spawn()?;
                up = wait_userspace(&mut guest);
            }
        }
    }
    if first_boot.is_none() && guest.transcript().trim().is_empty() {
        if let Err(Failure::Guest(guest::Error::Timeout { timeout, .. })) = &up {
            first_boot = Some(format!("printed nothing within {timeout:?}"));
            guest = spawn()?;
            up = wait_userspace(&mut guest);
        }
    }
    let result = (|| {
        let up = up?;
        let checked = check(&mut guest)?;
        // The kernel's last words before it writes the ACPI sleep or reset register.
        let (last, what) = guest_end(&mut guest)?;
        let (status, exited) = guest.wait_exit(EXIT_TIMEOUT)?;
        if !status.success() {
            return Err(Failure::ExitStatus(status));
        }
        let after = exited.saturating_sub(last);
        let limit = if std::env::var("NESTED_HOST").as_deref() == Ok("nested") {
            EXIT_LIMIT_NESTED
        } else {
            EXIT_LIMIT
        };
        if after > limit {
            return Err(Failure::SlowExit(after, what));
        }
        Ok(format!(
            "userspace at {:.2} s, exit {:.0} ms after {what:?}{}{checked}{}",
            up.at.as_secs_f64(),
            after.as_secs_f64() * 1000.0,
            if checked.is_empty() { "" } else { ", " },
            first_boot
                .as_deref()
                .map(|f| format!(" (second boot; the first {f})"))
                .unwrap_or_default()
        ))
    })();
    *transcript = Some(match first_boot {
        Some(f) => format!("(the first boot {f})\n{}", guest.transcript()),
        None => guest.transcript(),
    });
    let _ = std::fs::remove_file(&debug_log);
    result
}

/// What ended a boot that exited 0 before userspace: the VMM's triple-fault line from its debug
/// log if there is one, and the console's last line.
fn early_end(guest: &Guest, debug_log: &Path) -> String {
    let log = std::fs::read_to_string(debug_log).unwrap_or_default();
    // vmm's line reads "vCPU N: triple fault; ... at rip X"; on AMD hosts KVM has reset the vCPU
    // by the time it reports the triple fault, so the rip is the reset vector's.
    let fault = log
        .lines()
        .find(|l| l.contains("triple fault"))
        .map(|l| l.find("vCPU ").and_then(|i| l.get(i..)).unwrap_or(l));
    let transcript = guest.transcript();
    let last = transcript.lines().last().unwrap_or("").trim();
    match fault {
        Some(f) => format!("reset before userspace ({f}) after {last:?}"),
        None => format!("reset before userspace after {last:?}"),
    }
}

/// Waits for the guest's userspace marker; a kernel that panics or halts first fails at once
/// instead of running into the timeout.
pub fn wait_userspace(guest: &mut Guest) -> Result<guest::Line, Failure> {
    const FATAL: [&str; 3] = [
        "Kernel panic",
        "reboot: System halted",
        "reboot: Power down",
    ];
    let line = guest.wait_line("GUEST-USERSPACE-UP", BOOT_TIMEOUT, |l| {
        l.contains("GUEST-USERSPACE-UP") || FATAL.iter().any(|f| l.contains(f))
    })?;
    if line.text.contains("GUEST-USERSPACE-UP") {
        Ok(line)
    } else {
        Err(Failure::NoUserspace(line.text))
    }
}

/// Waits for the kernel's "reboot: Power down" or "reboot: Restarting system" line.
fn guest_end(guest: &mut Guest) -> Result<(Duration, &'static str), Failure> {
    const ENDS: [&str; 2] = ["reboot: Power down", "reboot: Restarting system"];
    let line = guest.wait_line(
        "the kernel's power-off or restart line",
        BOOT_TIMEOUT,
        |l| ENDS.iter().any(|e| l.contains(e)),
    )?;
    let what = if line.text.contains(ENDS[0]) {
        ENDS[0]
    } else {
        ENDS[1]
    };
    Ok((line.at, what))
}

/// Reads the guest's `GUEST-INFO` line and checks CPUs, memory and clock source.
fn check_info(guest: &mut Guest, smp: u32, mem_mib: u64) -> Result<String, Failure> {
    let line = guest.wait_for("GUEST-INFO", BOOT_TIMEOUT)?.text;
    let field = |key: &str| -> Result<&str, Failure> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .ok_or_else(|| Failure::Info(line.clone()))
    };
    let number = |key: &str| -> Result<u64, Failure> {
        field(key)?.parse().map_err(|_| Failure::Info(line.clone()))
    };
    let nproc = number("nproc")?;
    if nproc != u64::from(smp) {
        return Err(Failure::CpuCount {
            want: smp,
            got: nproc,
        });
    }
    let got_kib = number("mem_total_kib")?;
    let want_kib = mem_mib * 1024;
    if got_kib > want_kib || got_kib * 10 < want_kib * 8 {
        return Err(Failure::Memory { mem_mib, got_kib });
    }
    let clocksource = field("clocksource")?;
    if !SANE_CLOCKSOURCES.contains(&clocksource) {
        return Err(Failure::Clocksource(clocksource.to_owned()));
    }
    Ok(format!(
        "nproc {nproc}, MemTotal {got_kib} KiB, clocksource {clocksource}"
    ))
}

/// Boots with busybox acpid and a QMP monitor on a free local port, waits for the shell, sends
/// `system_powerdown`, and expects the guest's acpid to power it off.
fn power_button(
    target: Target,
    guest_dir: &Path,
    transcript: &mut Option<String>,
) -> Result<String, Failure> {
    let port = qmp::free_port()?;
    let mut boot = Boot::new(Kernel::BzImage, 2, MEM_MIB, "guest.run=acpid");
    boot.extra = vec![
        "-qmp".to_owned(),
        format!("tcp:127.0.0.1:{port},server=on,wait=off"),
    ];
    drive(target, &boot, guest_dir, transcript, |g| {
        g.wait_prompt("GUEST-PROMPT#", BOOT_TIMEOUT)?;
        Qmp::connect(port)?.execute("system_powerdown")?;
        g.wait_for("GUEST-POWER-BUTTON", BOOT_TIMEOUT)?;
        Ok("system_powerdown pressed the power button, acpid powered off".to_owned())
    })
}

/// Sectors of the disk `block_resize` grows: 1 MiB, then 4 MiB.
const RESIZE_FROM: u64 = 2048;
const RESIZE_TO: u64 = 8192;

/// Boots with a 1 MiB raw disk on an iothread (on `driver`) and a QMP monitor; at the shell, reads the disk's
/// size in sectors from sysfs, grows the disk to 4 MiB with `block_resize`, and expects the
/// guest's `/sys/block/vda/size` to follow without a reboot (the virtio configuration-change
/// interrupt), within 5 s.
fn block_resize(
    target: Target,
    guest_dir: &Path,
    name: &str,
    driver: &str,
    transcript: &mut Option<String>,
) -> Result<String, Failure> {
    let port = qmp::free_port()?;
    let image = std::env::temp_dir().join(format!(
        "linux-tests-{}-{}.raw",
        std::process::id(),
        name.replace('/', "-")
    ));
    let created = std::fs::File::create(&image).and_then(|f| f.set_len(RESIZE_FROM * 512));
    created.map_err(|source| Failure::Image {
        path: image.display().to_string(),
        source,
    })?;
    let mut boot = Boot::new(Kernel::BzImage, 2, MEM_MIB, "");
    boot.extra = vec![
        "-qmp".to_owned(),
        format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        "-object".to_owned(),
        "iothread,id=io0".to_owned(),
        "-drive".to_owned(),
        format!("file={},format=raw,if=none,id=d0", image.display()),
        "-device".to_owned(),
        format!("{driver},drive=d0,iothread=io0"),
    ];
    let size = |g: &mut Guest, tag: &str, want: u64| -> Result<(), Failure> {
        // Not the echo of the typed command, which follows the prompt and holds `$(`.
        let line = g.wait_line(tag, BOOT_TIMEOUT, |l| {
            l.trim_start().starts_with(tag) && !l.contains('$')
        })?;
        let got = line.text.trim().trim_start_matches(tag).trim().to_owned();
        if got != want.to_string() {
            return Err(Failure::DiskSize { want, got });
        }
        Ok(())
    };
    let result = drive(target, &boot, guest_dir, transcript, |g| {
        g.wait_prompt("GUEST-PROMPT#", BOOT_TIMEOUT)?;
        g.send("echo GUEST-SIZE-BEFORE $(cat /sys/block/vda/size)\n")?;
        size(g, "GUEST-SIZE-BEFORE", RESIZE_FROM)?;
        let mut qmp = Qmp::connect(port)?;
        qmp.execute_with(
            "block_resize",
            &format!("{{\"device\": \"d0\", \"size\": {}}}", RESIZE_TO * 512),
        )?;
        let asked = Instant::now();
        // Polls sysfs for 5 s: the driver updates the size when the interrupt arrives.
        g.send(&format!(
            "i=0; while [ $(cat /sys/block/vda/size) = {RESIZE_FROM} ] && [ $i -lt 50 ]; do \
             sleep 0.1; i=$((i + 1)); done; echo GUEST-SIZE-AFTER $(cat /sys/block/vda/size)\n"
        ))?;
        size(g, "GUEST-SIZE-AFTER", RESIZE_TO)?;
        let seen = asked.elapsed();
        g.send("poweroff -f\n")?;
        Ok(format!(
            "vda grew from {RESIZE_FROM} to {RESIZE_TO} sectors, seen {:.1} s after block_resize",
            seen.as_secs_f64()
        ))
    });
    let _ = std::fs::remove_file(&image);
    result
}

/// Waits for the shell prompt, types a command whose output differs from its echo, reads the
/// output, and types `poweroff -f`.
fn type_command(guest: &mut Guest) -> Result<String, Failure> {
    guest.wait_prompt("GUEST-PROMPT#", BOOT_TIMEOUT)?;
    guest.send("echo typed-$((6 * 7))\n")?;
    let sent = Instant::now();
    guest.wait_line("typed-42", BOOT_TIMEOUT, |l| l.trim() == "typed-42")?;
    let answer = sent.elapsed();
    guest.send("poweroff -f\n")?;
    Ok(format!(
        "typed command answered in {:.0} ms",
        answer.as_secs_f64() * 1000.0
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_target_gets_every_case_and_filters_apply() {
        let all = cases(&[Target::Vmm, Target::Qemu], None, Groups::default());
        let everything = Groups {
            disks: true,
            qmp: true,
        };
        assert_eq!(
            cases(&[Target::Vmm, Target::Qemu], None, everything).len(),
            27
        );
        assert_eq!(all.len(), 20);
        assert!(all.iter().any(|c| c.name == "vmm/virtio-blk-pci"));
        assert!(!all.iter().any(|c| c.name == "qemu/virtio-blk-pci"));
        assert!(all
            .iter()
            .any(|c| c.name == "vmm/virtio-blk-pci-mq-affinity"));
        assert!(!all
            .iter()
            .any(|c| c.name == "qemu/virtio-blk-pci-mq-affinity"));
        assert_eq!(all.first().unwrap().name, "vmm/bzimage-smp1");
        assert!(all.iter().any(|c| c.name == "vmm/pvh-smp8"));
        assert!(!all.iter().any(|c| c.name.starts_with("qemu/pvh")));
        let some = cases(&[Target::Vmm, Target::Qemu], Some("vmm/pvh"), everything);
        let names: Vec<_> = some.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["vmm/pvh-smp1", "vmm/pvh-smp2", "vmm/pvh-smp8"]);
    }

    /// A stand-in VMM: a shell that prints what the guest would.
    fn fake(script: &str) -> Guest {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg(script);
        Guest::spawn(c).unwrap()
    }

    #[test]
    fn info_checks_cpus_memory_and_clock() {
        let line =
            "echo 'GUEST-INFO nproc=2 mem_total_kib=480160 clocksource=kvm-clock kernel=6.1'";
        check_info(&mut fake(line), 2, 512).unwrap();
        let err = check_info(&mut fake(line), 8, 512).unwrap_err();
        assert!(matches!(err, Failure::CpuCount { want: 8, got: 2 }));
        let err = check_info(&mut fake(line), 2, 4096).unwrap_err();
        assert!(matches!(
            err,
            Failure::Memory {
                mem_mib: 4096,
                got_kib: 480_160
            }
        ));
        let jiffies = "echo 'GUEST-INFO nproc=1 mem_total_kib=480160 clocksource=jiffies'";
        let err = check_info(&mut fake(jiffies), 1, 512).unwrap_err();
        assert!(matches!(err, Failure::Clocksource(ref c) if c == "jiffies"));
        let err = check_info(&mut fake("echo 'GUEST-INFO nproc=two'"), 1, 512).unwrap_err();
        assert!(matches!(err, Failure::Info(_)));
    }

    #[test]
    fn a_kernel_that_stops_early_fails_at_once() {
        let mut g = fake("echo '[ 7.0] reboot: System halted'; sleep 5");
        let err = wait_userspace(&mut g).unwrap_err();
        assert!(matches!(err, Failure::NoUserspace(ref l) if l.contains("System halted")));
        let mut g = fake("echo GUEST-USERSPACE-UP");
        assert!(wait_userspace(&mut g).is_ok());
    }

    #[test]
    fn an_early_end_names_the_triple_fault_and_the_last_console_line() {
        let mut g = fake("echo '[ 0.8] PCI: Fatal: No config space access function found'");
        assert!(matches!(
            wait_userspace(&mut g),
            Err(Failure::Guest(guest::Error::Ended { .. }))
        ));
        let log = std::env::temp_dir().join(format!("early-end-{}.log", std::process::id()));
        std::fs::write(
            &log,
            "[0.9] WARN  vcpu3: vCPU 3: triple fault; the VM ends as on a reset at rip 0x1\n",
        )
        .unwrap();
        let said = early_end(&g, &log);
        std::fs::remove_file(&log).unwrap();
        // The transcript's lines start with their arrival time.
        assert!(
            said.starts_with(
                "reset before userspace (vCPU 3: triple fault; the VM ends as on a reset at rip 0x1) \
                 after"
            ),
            "{said}"
        );
        assert!(
            said.ends_with("[ 0.8] PCI: Fatal: No config space access function found\""),
            "{said}"
        );
        assert!(early_end(&g, &log).starts_with("reset before userspace after"));
    }

    #[test]
    fn the_kernels_last_line_is_recognised() {
        let mut g = fake("echo '[    4.48] reboot: Restarting system'");
        let (_, what) = guest_end(&mut g).unwrap();
        assert_eq!(what, "reboot: Restarting system");
    }
}
