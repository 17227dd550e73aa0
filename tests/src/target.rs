//! The inner VMMs a guest can boot under, and how each is told to boot one.
//!
//! Both take QEMU's flags, so one [`Boot`] description becomes either command line: ours (`vmm`)
//! and QEMU's microvm as a user tuning it for boot time runs it ([`QEMU_BASELINE`], from
//! `ci/qemu-baseline.args`), the baseline we compare with and the VMM that proves the harness itself
//! works.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The QEMU command every comparison starts with, one argument per line after `#` comments: the
/// project's one definition, shared with the shell benchmarks.
pub const QEMU_BASELINE: &str = include_str!("../../ci/qemu-baseline.args");

/// The words of [`QEMU_BASELINE`]: the program, then its arguments.
pub fn qemu_baseline() -> Vec<&'static str> {
    QEMU_BASELINE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Each VMM's fastest `-drive aio=` engine for a `cache=none` disk, `VMM ENGINE` lines after `#`
/// comments: the project's one definition, shared with `ci/bench-latency`.
pub const AIO_BEST: &str = include_str!("../../ci/aio-best");

/// The kernel command line every boot starts with: the same for every VMM compared, since each
/// byte on the console is an exit (DESIGN.md, "Guest boot").
pub const BASE_APPEND: &str = "console=ttyS0 quiet";

/// Errors choosing a target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is neither `vmm` nor `qemu`.
    #[error("unknown target {0:?}: want vmm or qemu")]
    Unknown(String),
}

/// An inner VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Our `vmm` binary, found on PATH.
    Vmm,
    /// QEMU's microvm, as [`QEMU_BASELINE`] runs it.
    Qemu,
}

impl Target {
    /// Parses `vmm` or `qemu`.
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "vmm" => Ok(Target::Vmm),
            "qemu" => Ok(Target::Qemu),
            other => Err(Error::Unknown(other.to_owned())),
        }
    }

    /// Parses a comma-separated list of targets.
    pub fn parse_list(list: &str) -> Result<Vec<Self>, Error> {
        list.split(',').map(Target::parse).collect()
    }

    /// The arguments that make this VMM write its debug log to `path` with what the boot benchmark
    /// reads from it: vmm's own `startup:` lines (each vCPU's first `KVM_RUN` among them), and
    /// QEMU's `kvm_cpu_exec` trace event (a vCPU entering its `KVM_RUN` loop) with wall-clock
    /// timestamps.
    pub fn debug_log_args(self, path: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-D".into(), path.into()];
        if self == Target::Qemu {
            args.extend(["-trace", "kvm_cpu_exec", "-msg", "timestamp=on"].map(OsString::from));
        }
        args
    }

    /// This VMM's engine in [`AIO_BEST`] (what its `cache=none` disks get in a comparison), or
    /// `None` where the file has no line for it.
    pub fn aio_best(self) -> Option<&'static str> {
        let name = self.to_string();
        AIO_BEST
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                [vmm, engine] if vmm == name => Some(engine),
                _ => None,
            })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Vmm => "vmm",
            Target::Qemu => "qemu",
        })
    }
}

/// Which image of the kernel to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The bzImage, through the 64-bit boot protocol.
    BzImage,
    /// The ELF vmlinux, through its PVH entry point.
    Pvh,
    /// A distribution's kernel (a bzImage), as Debian names it.
    Vmlinuz,
}

impl Kernel {
    /// The file name in the guest directory (resources/build).
    pub fn file(self) -> &'static str {
        match self {
            Kernel::BzImage => "bzImage",
            Kernel::Pvh => "vmlinux",
            Kernel::Vmlinuz => "vmlinuz",
        }
    }
}

/// One guest boot, described once for every VMM.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The kernel image.
    pub kernel: Kernel,
    /// vCPUs (`-smp`).
    pub smp: u32,
    /// Guest memory in MiB (`-m`).
    pub mem_mib: u64,
    /// The initramfs file name in the guest directory.
    pub initrd: &'static str,
    /// Words appended to [`BASE_APPEND`] (the guest's `guest.run=` and the like).
    pub append: String,
    /// Further VMM arguments, the same for every VMM (QEMU's `-object`, `-drive`, `-device`).
    pub extra: Vec<String>,
    /// Each `-drive` of [`Boot::extra`] gets the VMM's fastest engine ([`Target::aio_best`],
    /// `,aio=` appended): for the `cache=none` disks of a comparison, each VMM at its best.
    pub aio_best: bool,
    /// The guest has PCI devices: QEMU's microvm is then told `pcie=on` (vmm's PCI bus needs no
    /// flag).
    pub pcie: bool,
}

impl Boot {
    /// A bzImage boot with the small initramfs and the given command-line words.
    pub fn new(kernel: Kernel, smp: u32, mem_mib: u64, append: &str) -> Self {
        Boot {
            kernel,
            smp,
            mem_mib,
            initrd: "initrd.img",
            append: append.to_owned(),
            extra: Vec::new(),
            aio_best: false,
            pcie: false,
        }
    }

    /// The full kernel command line.
    pub fn cmdline(&self) -> String {
        if self.append.is_empty() {
            BASE_APPEND.to_owned()
        } else {
            format!("{BASE_APPEND} {}", self.append)
        }
    }

    /// The command that boots this guest under `target`, with the console on stdio.
    pub fn command(&self, target: Target, guest_dir: &Path) -> Command {
        let kernel: PathBuf = guest_dir.join(self.kernel.file());
        let initrd: PathBuf = guest_dir.join(self.initrd);
        let mut c;
        match target {
            Target::Vmm => {
                c = Command::new("vmm");
                c.arg("-m").arg(format!("{}M", self.mem_mib));
            }
            Target::Qemu => {
                let baseline = qemu_baseline();
                let (program, args) = baseline.split_first().unwrap_or((&"", &[]));
                c = Command::new(program);
                let mut machine = false;
                for a in args.iter() {
                    match a.strip_prefix("microvm") {
                        Some(options) if machine && self.pcie => {
                            c.arg(format!("microvm,pcie=on{options}"));
                        }
                        _ => {
                            c.arg(a);
                        }
                    }
                    machine = *a == "-M";
                }
                c.arg("-m").arg(format!("{}M", self.mem_mib));
            }
        }
        c.arg("-smp").arg(self.smp.to_string());
        c.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
        c.arg("-append").arg(self.cmdline());
        let mut drive = false;
        for a in &self.extra {
            match target.aio_best() {
                Some(aio) if drive && self.aio_best => c.arg(format!("{a},aio={aio}")),
                _ => c.arg(a),
            };
            drive = a == "-drive";
        }
        c
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn one_boot_becomes_both_command_lines() {
        let b = Boot::new(Kernel::Pvh, 2, 512, "guest.run=info");
        let dir = Path::new("/g");
        let v = b.command(Target::Vmm, dir);
        assert_eq!(v.get_program(), "vmm");
        assert_eq!(
            args(&v),
            [
                "-m",
                "512M",
                "-smp",
                "2",
                "-kernel",
                "/g/vmlinux",
                "-initrd",
                "/g/initrd.img",
                "-append",
                "console=ttyS0 quiet guest.run=info"
            ]
        );
        let q = b.command(Target::Qemu, dir);
        assert_eq!(q.get_program(), "qemu-system-x86_64");
        let qa = args(&q);
        assert!(qa.starts_with(
            &qemu_baseline()[1..]
                .iter()
                .map(|a| (*a).to_owned())
                .collect::<Vec<_>>()
        ));
        assert!(qa.ends_with(&[
            "-smp".into(),
            "2".into(),
            "-kernel".into(),
            "/g/vmlinux".into(),
            "-initrd".into(),
            "/g/initrd.img".into(),
            "-append".into(),
            "console=ttyS0 quiet guest.run=info".into()
        ]));
    }

    #[test]
    fn the_qemu_baseline_is_tuned_for_boot() {
        let b = qemu_baseline();
        assert_eq!(b.first(), Some(&"qemu-system-x86_64"));
        let machine = b.windows(2).find(|w| w[0] == "-M").map(|w| w[1]).unwrap();
        let opts: Vec<&str> = machine.split(',').collect();
        assert_eq!(opts.first(), Some(&"microvm"));
        assert!(opts.contains(&"rtc=on"), "{machine}");
        assert!(b.windows(2).any(|w| w == ["-cpu", "host"]));
        assert!(b.contains(&"-nodefaults") && b.contains(&"-no-user-config"));
        assert!(b.contains(&"-enable-kvm"));
        assert!(b.iter().all(|w| !w.contains(' ')), "one word per line");
    }

    #[test]
    fn a_boot_with_pci_devices_turns_qemus_pcie_on() {
        let mut b = Boot::new(Kernel::BzImage, 1, 256, "");
        b.pcie = true;
        let qa = args(&b.command(Target::Qemu, Path::new("/g")));
        assert!(
            qa.windows(2).any(|w| w == ["-M", "microvm,pcie=on,rtc=on"]),
            "{qa:?}"
        );
        assert_eq!(qa.iter().filter(|a| a.contains("microvm")).count(), 1);
        let va = args(&b.command(Target::Vmm, Path::new("/g")));
        assert!(va.iter().all(|a| !a.contains("pcie")), "{va:?}");
    }

    #[test]
    fn each_vmm_has_a_fastest_aio_engine_it_takes() {
        assert!(
            matches!(
                Target::Qemu.aio_best(),
                Some("threads" | "io_uring" | "native")
            ),
            "{:?}",
            Target::Qemu.aio_best()
        );
        // vmm takes threads and io_uring (vmm/src/drive.rs), not QEMU's linux-aio.
        assert!(
            matches!(Target::Vmm.aio_best(), Some("threads" | "io_uring")),
            "{:?}",
            Target::Vmm.aio_best()
        );
    }

    #[test]
    fn a_boot_gives_its_drives_each_vmms_fastest_aio_engine_when_asked() {
        let mut b = Boot::new(Kernel::BzImage, 1, 256, "");
        b.extra = [
            "-object",
            "iothread,id=io0",
            "-drive",
            "file=d,if=none,id=d0,cache=none",
        ]
        .map(String::from)
        .to_vec();
        for t in [Target::Vmm, Target::Qemu] {
            let a = args(&b.command(t, Path::new("/g")));
            assert!(a.ends_with(&b.extra), "{a:?}");
        }
        b.aio_best = true;
        for t in [Target::Vmm, Target::Qemu] {
            let a = args(&b.command(t, Path::new("/g")));
            let drive = format!(
                "file=d,if=none,id=d0,cache=none,aio={}",
                t.aio_best().unwrap()
            );
            assert!(
                a.ends_with(&[
                    b.extra[0].clone(),
                    b.extra[1].clone(),
                    "-drive".into(),
                    drive
                ]),
                "{a:?}"
            );
        }
    }

    #[test]
    fn debug_log_args_add_qemus_trace() {
        let p = Path::new("/t/log");
        assert_eq!(Target::Vmm.debug_log_args(p), ["-D", "/t/log"]);
        assert_eq!(
            Target::Qemu.debug_log_args(p),
            [
                "-D",
                "/t/log",
                "-trace",
                "kvm_cpu_exec",
                "-msg",
                "timestamp=on"
            ]
        );
    }

    #[test]
    fn targets_parse_and_unknown_ones_are_named() {
        assert_eq!(
            Target::parse_list("vmm,qemu").unwrap(),
            [Target::Vmm, Target::Qemu]
        );
        let err = Target::parse_list("vmm,kvmtool").unwrap_err();
        assert!(matches!(err, Error::Unknown(ref n) if n == "kvmtool"));
    }
}
