//! The command line, with QEMU's flag names so that a QEMU command line works.
//!
//! Flags that take a value take it as the next argument (`-m 1G`). Option strings go through
//! [`crate::options`]. The flags a QEMU command line carries out of habit are accepted with their
//! QEMU meaning where it applies here: `-cpu host` (and `max`, which under KVM is the host's
//! CPU too), `-accel kvm`, `-machine microvm,accel=kvm`, `-enable-kvm`, `-display none`,
//! `-nographic`, `-nodefaults`, `-serial stdio`, `-no-reboot` (a guest reboot always ends the
//! VMM) and `-name`. Anything else, or another value of those (`-cpu qemu64`, `-accel tcg`,
//! `-serial mon:stdio`, `-daemonize`), is an error that names it, never silently ignored.
//!
//! `-smp` reads QEMU's topology keys the way QEMU does for machines that prefer cores over
//! sockets (QEMU 6.2 and later): a missing count is worked out from the others, and the product
//! of sockets, cores and threads must be `maxcpus`. Without CPU hotplug, `maxcpus` above `cpus`
//! is refused.

use std::path::PathBuf;

use crate::arch::x86_64::topology::{Topology, TopologyError};
use crate::drive::{self, DiskSpec, DriveError, IoThreadSpec};
use crate::monitor::{parse_qmp_option, QmpOptionError, QmpOptions};
use crate::options::{MemorySize, OptionError, Options};
use crate::sandbox::{self, SandboxFlagError};

/// Default guest RAM, QEMU's default.
const DEFAULT_MEM_BYTES: u64 = 128 << 20;
/// QEMU rounds `-m` up to a multiple of 8 KiB; so does this VMM.
const MEM_ALIGN: u64 = 8 << 10;

/// The usage text for `-h`.
pub const USAGE: &str = "\
Usage: vmm -kernel FILE [options]
  -kernel FILE     bzImage (64-bit boot protocol) or ELF vmlinux with a PVH note
  -initrd FILE     initramfs
  -append CMDLINE  kernel command line
  -m SIZE          guest RAM; a bare number is MiB, or use a K, M or G suffix, 1.5G too (default 128M)
  -smp [cpus=]N[,sockets=S][,cores=C][,threads=T][,maxcpus=N]
                   vCPUs (default 1, at most 255) and their topology, as in QEMU; APIC ids
                   above 254 are refused, and maxcpus cannot exceed cpus (no CPU hotplug)
  -D FILE          write the debug log to FILE
  -object iothread,id=ID
                   an iothread (a thread of its own for the disks given iothread=ID)
  -drive file=PATH,format=raw|qcow2,if=none|virtio,id=ID[,cache=none|writeback|writethrough|directsync|unsafe][,readonly=on|off]
         [,aio=threads|io_uring][,discard=ignore|unmap][,detect-zeroes=off|on|unmap][,stats-intervals=SECS[:SECS]]
         [,werror=enospc|stop|report|ignore][,rerror=stop|report|ignore][,node-name=NAME]
                   a disk image (if=virtio also gives it a virtio-blk device on the main loop)
  -device virtio-blk-device,drive=ID[,id=ID][,iothread=ID][,serial=S][,num-queues=N][,queue-size=N]
                   a virtio-mmio disk for the guest
  -device virtio-blk-pci,drive=ID[,id=ID][,iothread=ID][,serial=S][,num-queues=N][,queue-size=N]
                   a virtio-pci disk on the PCI root bus, an MSI-X vector per queue
                   (num-queues defaults to the number of vCPUs)
  -device '{\"driver\":\"virtio-blk-pci\",\"drive\":ID,\"iothread-vq-mapping\":[{\"iothread\":ID[,\"vqs\":[N,...]]},...]}'
                   the queues spread over iothreads (round-robin without vqs), either driver
  -global DRIVER.PROPERTY=VALUE | driver=DRIVER,property=PROPERTY,value=VALUE
                   a default for PROPERTY of every -device DRIVER (virtio-blk-device or
                   virtio-blk-pci) that does not set it, as in QEMU
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off
                   a QMP monitor (wait=on, the default, waits for a client before starting)
  -S               start with the vCPUs paused, until the monitor's cont
  -name NAME[,process=PNAME][,debug-threads=on|off]
                   names the vmm process PNAME, else NAME (threads are always named)
  -pidfile FILE    write vmm's process id to FILE, removed at exit
  -sandbox on|off[,obsolete=deny][,elevateprivileges=deny][,spawn=deny][,resourcecontrol=deny]
                   seccomp filters on every thread and Landlock on the files (default on);
                   with -qmp, snapshot overlays go beside an image of the disk's chain;
                   QEMU's sub-options are accepted with deny, which the filters always do
  -cpu host|max, -accel kvm, -machine microvm[,accel=kvm], -enable-kvm, -display none,
  -nographic, -nodefaults, -serial stdio, -no-reboot
                   accepted for QEMU compatibility: this is what vmm always does
                   (the console is on stdio; a guest reboot ends vmm, as with -no-reboot)
  -h, --help       this text
  -version, --version  the version
  vmm blk-top [-i SECS] [-n COUNT] unix:PATH | tcp:HOST:PORT
                   a live view of a running vmm's disks over its QMP monitor: operations per
                   second and p50/p99 of each request stage (x-query-blockstats-stages)
Console: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A.";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Config {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// The vCPUs: how many, and their sockets, cores and threads.
    pub topology: Topology,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: String,
    /// Where the debug log goes.
    pub debug_log: Option<PathBuf>,
    /// The QMP monitor's socket.
    pub qmp: Option<QmpOptions>,
    /// `-S`: vCPUs wait for `cont`.
    pub start_paused: bool,
    /// The iothreads (`-object iothread`), in order.
    pub iothreads: Vec<IoThreadSpec>,
    /// The disks (`-drive` paired with `-device`), in order.
    pub disks: Vec<DiskSpec>,
    /// `-name`: the guest's name and the process's.
    pub name: Name,
    /// `-pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `-sandbox`: every thread runs under its seccomp filter, and Landlock limits the files (on
    /// unless `-sandbox off`).
    pub sandbox: bool,
}

impl Config {
    /// What the configuration lets happen that the user probably did not mean, one line each.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut warnings = Vec::new();
        if self.start_paused && self.qmp.is_none() {
            warnings.push(
                "-S without -qmp: nothing can start the guest's vCPUs (Ctrl-A x or a signal ends vmm)",
            );
        }
        warnings
    }
}

/// What to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run a VM.
    Run(Box<Config>),
    /// Print the usage text.
    Help,
    /// Print the version (`-version`, as QEMU's).
    Version,
}

/// Errors in the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// A flag this VMM does not have.
    #[error("Unsupported flag '{0}' (see -h)")]
    UnknownFlag(String),
    /// An argument that is not a flag.
    #[error("Unexpected argument '{0}' (flags start with '-')")]
    UnexpectedArgument(String),
    /// A flag at the end of the line without its value.
    #[error("Flag '{0}' needs a value")]
    MissingValue(&'static str),
    /// A flag given twice.
    #[error("Flag '{0}' given twice")]
    Repeated(&'static str),
    /// An option string that does not parse.
    #[error("Invalid {flag}")]
    Option {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        #[source]
        source: OptionError,
    },
    /// `-m` without a size.
    #[error("-m needs a size")]
    NoMemorySize,
    /// A vCPU count of zero or more than 255.
    #[error("-smp needs between 1 and 255 vCPUs, not {0}")]
    BadCpuCount(String),
    /// A topology count of zero.
    #[error("Invalid CPU topology: sockets, cores, threads and maxcpus must be greater than zero")]
    ZeroTopology,
    /// Sockets, cores and threads that do not multiply to `maxcpus`.
    #[error("Invalid CPU topology: sockets ({sockets}) * cores ({cores}) * threads ({threads}) != maxcpus ({maxcpus})")]
    TopologyMismatch {
        /// Sockets.
        sockets: u64,
        /// Cores per socket.
        cores: u64,
        /// Threads per core.
        threads: u64,
        /// `maxcpus` (or `cpus`).
        maxcpus: u64,
    },
    /// `maxcpus` below `cpus`.
    #[error("Invalid CPU topology: maxcpus ({maxcpus}) is below cpus ({cpus})")]
    MaxCpusBelowCpus {
        /// `cpus`.
        cpus: u64,
        /// `maxcpus`.
        maxcpus: u64,
    },
    /// `maxcpus` above `cpus`: room for CPUs added later.
    #[error("-smp maxcpus={maxcpus} above cpus={cpus} needs CPU hotplug, which vmm does not have (leave maxcpus out)")]
    NoCpuHotplug {
        /// `cpus`.
        cpus: u64,
        /// `maxcpus`.
        maxcpus: u64,
    },
    /// A topology whose APIC ids do not fit.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// A CPU model other than the host's.
    #[error("Unsupported CPU model '{0}' (only host, or max: the guest sees the host's CPU as KVM offers it)")]
    BadCpuModel(String),
    /// An accelerator other than KVM.
    #[error("Unsupported accelerator '{0}' (only kvm)")]
    BadAccel(String),
    /// A display other than none.
    #[error("Unsupported display '{0}' (only none: the console is on this terminal)")]
    BadDisplay(String),
    /// A machine type other than microvm.
    #[error("Unsupported machine type '{0}' (only microvm)")]
    BadMachine(String),
    /// A serial backend other than stdio.
    #[error("Unsupported serial backend '{0}' (only stdio)")]
    BadSerial(String),
    /// `-serial mon:stdio`: the console with QEMU's human monitor behind Ctrl-A c.
    #[error("-serial mon:stdio is not supported: vmm has no human monitor behind Ctrl-A c; use -serial stdio for the console and -qmp for a monitor")]
    SerialMonitor,
    /// `-daemonize`.
    #[error("-daemonize is not supported: vmm keeps its console on its stdio; start it in the background from the shell or a service manager, with -pidfile FILE")]
    Daemonize,
    /// No `-kernel`.
    #[error("No kernel given: use -kernel FILE")]
    NoKernel,
    /// A `-qmp` value that does not parse.
    #[error(transparent)]
    Qmp(#[from] QmpOptionError),
    /// A disk flag (`-object`, `-drive`, `-device`, `-global`) that does not parse or does not pair up.
    #[error(transparent)]
    Drive(#[from] DriveError),
    /// A `-sandbox` value that does not parse or asks for what the filters never allow.
    #[error(transparent)]
    Sandbox(#[from] SandboxFlagError),
}

/// Flags and whether each takes a value.
const FLAGS: &[(&str, bool)] = &[
    ("-m", true),
    ("-smp", true),
    ("-kernel", true),
    ("-initrd", true),
    ("-append", true),
    ("-D", true),
    ("-qmp", true),
    ("-S", false),
    ("-object", true),
    ("-drive", true),
    ("-device", true),
    ("-global", true),
    ("-machine", true),
    ("-M", true),
    ("-cpu", true),
    ("-accel", true),
    ("-display", true),
    ("-serial", true),
    ("-name", true),
    ("-pidfile", true),
    ("-sandbox", true),
    ("-daemonize", false),
    ("-nodefaults", false),
    ("-nographic", false),
    ("-enable-kvm", false),
    ("-no-reboot", false),
    ("-h", false),
    ("-help", false),
    ("--help", false),
    ("-version", false),
    ("--version", false),
];

/// Stores `value` in `slot`, refusing a second one.
fn set_once<T>(slot: &mut Option<T>, flag: &'static str, value: T) -> Result<(), CliError> {
    if slot.replace(value).is_some() {
        return Err(CliError::Repeated(flag));
    }
    Ok(())
}

fn option_err(flag: &'static str) -> impl Fn(OptionError) -> CliError {
    move |source| CliError::Option { flag, source }
}

/// `-m`: `SIZE` or `size=SIZE`, rounded up to 8 KiB as QEMU does.
fn parse_memory(value: &str) -> Result<u64, CliError> {
    let opts = Options::parse(value, Some("size"), &["size"]).map_err(option_err("-m"))?;
    let size: Option<MemorySize> = opts.get("size").map_err(option_err("-m"))?;
    let bytes = size.map(|s| s.0).ok_or(CliError::NoMemorySize)?;
    // Past u64::MAX - 8 KiB no host has the RAM; leave it for the memory check to refuse.
    Ok(bytes.checked_next_multiple_of(MEM_ALIGN).unwrap_or(bytes))
}

/// `-smp`: `N`, `cpus=N` and QEMU's topology keys.
fn parse_smp(value: &str) -> Result<Topology, CliError> {
    let err = option_err("-smp");
    let opts = Options::parse(
        value,
        Some("cpus"),
        &["cpus", "sockets", "cores", "threads", "maxcpus"],
    )
    .map_err(&err)?;
    let cpus = match opts.get::<String>("cpus").map_err(&err)? {
        None => None,
        Some(text) => Some(
            text.parse::<u8>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(CliError::BadCpuCount(text))?,
        ),
    };
    let count = |key| -> Result<Option<u64>, CliError> {
        Ok(opts.get::<u32>(key).map_err(&err)?.map(u64::from))
    };
    let (mut sockets, mut cores, mut threads) =
        (count("sockets")?, count("cores")?, count("threads")?);
    let maxcpus = count("maxcpus")?;
    if [sockets, cores, threads, maxcpus].contains(&Some(0)) {
        return Err(CliError::ZeroTopology);
    }
    // QEMU's order: with a cpus or maxcpus count, cores are worked out first, then sockets,
    // then threads; without either, every missing count is 1.
    if let Some(max) = maxcpus.or(cpus.map(u64::from)) {
        if cores.is_none() {
            let (s, t) = (sockets.unwrap_or(1), threads.unwrap_or(1));
            (sockets, threads, cores) = (Some(s), Some(t), Some(max / (s * t)));
        } else if sockets.is_none() {
            let (c, t) = (cores.unwrap_or(1), threads.unwrap_or(1));
            (threads, sockets) = (Some(t), Some(max / (c * t)));
        }
        if threads.is_none() {
            let (s, c) = (sockets.unwrap_or(1), cores.unwrap_or(1));
            threads = Some(max / (s * c));
        }
    }
    let (sockets, cores, threads) = (
        sockets.unwrap_or(1),
        cores.unwrap_or(1),
        threads.unwrap_or(1),
    );
    // Each below 2^32: the product fits in a u128.
    let total = u128::from(sockets) * u128::from(cores) * u128::from(threads);
    let total = u64::try_from(total).unwrap_or(u64::MAX);
    let maxcpus = maxcpus.or(cpus.map(u64::from)).unwrap_or(total);
    let cpus = cpus.map_or(maxcpus, u64::from);
    if total != maxcpus {
        return Err(CliError::TopologyMismatch {
            sockets,
            cores,
            threads,
            maxcpus,
        });
    }
    if maxcpus < cpus {
        return Err(CliError::MaxCpusBelowCpus { cpus, maxcpus });
    }
    if maxcpus > cpus {
        return Err(CliError::NoCpuHotplug { cpus, maxcpus });
    }
    let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(Topology::new(
        narrow(sockets),
        narrow(cores),
        narrow(threads),
    )?)
}

/// `-machine`: `microvm`, `type=microvm`, `accel=kvm`, or both.
fn check_machine(flag: &'static str, value: &str) -> Result<(), CliError> {
    let opts = Options::parse(value, Some("type"), &["type", "accel"]).map_err(option_err(flag))?;
    match opts.get::<String>("type").map_err(option_err(flag))? {
        None => {}
        Some(t) if t == "microvm" => {}
        Some(other) => return Err(CliError::BadMachine(other)),
    }
    match opts.get::<String>("accel").map_err(option_err(flag))? {
        // QEMU tries a colon-separated list in order; KVM first is what this VMM does.
        Some(list) if list.split(':').next() != Some("kvm") => Err(CliError::BadAccel(list)),
        _ => Ok(()),
    }
}

/// A flag whose one value must be one of `accepted`; `key` is the name QEMU gives that value.
fn check_choice(
    flag: &'static str,
    key: &str,
    value: &str,
    accepted: &[&str],
    refuse: fn(String) -> CliError,
) -> Result<(), CliError> {
    let opts = Options::parse(value, Some(key), &[key]).map_err(option_err(flag))?;
    let choice: String = opts.get(key).map_err(option_err(flag))?.unwrap_or_default();
    if accepted.contains(&choice.as_str()) {
        Ok(())
    } else {
        Err(refuse(choice))
    }
}

/// `-name`: what QMP's `query-name` says, and what `ps` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Name {
    /// `guest=` (or the value without a key): the guest's name.
    pub guest: Option<String>,
    /// `process=`: the process's name.
    pub process: Option<String>,
}

impl Name {
    /// The name the process takes: `process=`, else the guest's name.
    pub fn process_name(&self) -> Option<&str> {
        self.process.as_deref().or(self.guest.as_deref())
    }
}

/// `-name`: `NAME` or `guest=NAME`, `process=PNAME`, `debug-threads=on|off`.
fn parse_name(value: &str) -> Result<Name, CliError> {
    let err = option_err("-name");
    let opts = Options::parse(value, Some("guest"), &["guest", "process", "debug-threads"])
        .map_err(&err)?;
    // vmm's threads always carry names (vcpu0, the iothreads' ids...): debug-threads=off too.
    opts.get::<bool>("debug-threads").map_err(&err)?;
    Ok(Name {
        guest: opts.get("guest").map_err(&err)?,
        process: opts.get("process").map_err(&err)?,
    })
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut mem = None;
    let mut topology = None;
    let mut name = None;
    let mut pidfile = None;
    let mut sandbox_on = None;
    let mut kernel = None;
    let mut initrd = None;
    let mut append = None;
    let mut debug_log = None;
    let mut qmp = None;
    let mut start_paused = false;
    let mut iothreads = Vec::new();
    let mut drives = Vec::new();
    let mut devices = Vec::new();
    let mut globals = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(&(flag, takes_value)) = FLAGS.iter().find(|(f, _)| *f == arg) else {
            return Err(if arg.starts_with('-') {
                CliError::UnknownFlag(arg)
            } else {
                CliError::UnexpectedArgument(arg)
            });
        };
        let value = if takes_value {
            args.next().ok_or(CliError::MissingValue(flag))?
        } else {
            String::new()
        };
        match flag {
            "-m" => set_once(&mut mem, flag, parse_memory(&value)?)?,
            "-smp" => set_once(&mut topology, flag, parse_smp(&value)?)?,
            "-kernel" => set_once(&mut kernel, flag, PathBuf::from(value))?,
            "-initrd" => set_once(&mut initrd, flag, PathBuf::from(value))?,
            "-append" => set_once(&mut append, flag, value)?,
            "-D" => set_once(&mut debug_log, flag, PathBuf::from(value))?,
            "-qmp" => set_once(&mut qmp, flag, parse_qmp_option(&value)?)?,
            "-S" => start_paused = true,
            "-object" => iothreads.push(drive::parse_object(&value)?),
            "-drive" => drives.push(drive::parse_drive(&value, drives.len())?),
            // Parsed at the end, with every -global (which may come after them) as defaults.
            "-device" => devices.push(value),
            "-global" => globals.push(drive::parse_global(&value)?),
            "-machine" | "-M" => check_machine(flag, &value)?,
            "-cpu" => check_choice(
                flag,
                "model",
                &value,
                &["host", "max"],
                CliError::BadCpuModel,
            )?,
            "-accel" => check_choice(flag, "accel", &value, &["kvm"], CliError::BadAccel)?,
            "-display" => check_choice(flag, "type", &value, &["none"], CliError::BadDisplay)?,
            "-serial" if value == "mon:stdio" => return Err(CliError::SerialMonitor),
            "-serial" if value != "stdio" => return Err(CliError::BadSerial(value)),
            "-name" => set_once(&mut name, flag, parse_name(&value)?)?,
            "-pidfile" => set_once(&mut pidfile, flag, PathBuf::from(value))?,
            "-sandbox" => set_once(&mut sandbox_on, flag, sandbox::parse_flag(&value)?)?,
            "-daemonize" => return Err(CliError::Daemonize),
            "-h" | "-help" | "--help" => return Ok(Command::Help),
            "-version" | "--version" => return Ok(Command::Version),
            // -serial stdio, -nographic, -nodefaults, -enable-kvm, -no-reboot: what we always do.
            _ => {}
        }
    }
    // One vCPU is always a valid topology.
    let topology = topology.map_or_else(|| Topology::cores(1), Ok)?;
    let devices = devices
        .iter()
        .map(|d| drive::parse_device(d, &globals))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Command::Run(Box::new(Config {
        mem_bytes: mem.unwrap_or(DEFAULT_MEM_BYTES),
        kernel: kernel.ok_or(CliError::NoKernel)?,
        initrd,
        append: append.unwrap_or_default(),
        debug_log,
        qmp,
        start_paused,
        disks: drive::plan(
            &iothreads.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
            &drives,
            &devices,
            &globals,
            topology.cpus(),
        )?,
        iothreads,
        topology,
        name: name.unwrap_or_default(),
        pidfile,
        sandbox: sandbox_on.unwrap_or(true),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, CliError> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    fn config(line: &str) -> Config {
        match parse_str(line) {
            Ok(Command::Run(c)) => *c,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn globals_apply_to_devices_before_and_after_them() {
        let c = config(
            "-kernel k -drive file=a,format=raw,if=none,id=d0 \
             -drive file=b,format=raw,if=none,id=d1 -device virtio-blk-device,drive=d0 \
             -global virtio-blk-device.x-stage-timing=off \
             -device virtio-blk-device,drive=d1,x-stage-timing=on",
        );
        let timing: Vec<_> = c.disks.iter().map(|d| d.device.stage_timing).collect();
        assert_eq!(timing, [false, true]);
        assert_eq!(
            parse_str("-kernel k -global virtio-blk-device.nosuch=1").map(|_| ()),
            Err(CliError::Drive(DriveError::GlobalProperty {
                driver: "virtio-blk-device".into(),
                property: "nosuch".into(),
                value: "1".into(),
            }))
        );
    }

    #[test]
    fn a_qemu_command_line_parses() {
        let c = config(
            "-m 1G -smp 2 -kernel vmlinuz -initrd initrd.img -append console=ttyS0 -nographic \
             -serial stdio -enable-kvm -no-reboot -machine microvm -D log.txt \
             -qmp unix:/tmp/q.sock,server=on,wait=off -S",
        );
        assert_eq!(
            c,
            Config {
                mem_bytes: 1 << 30,
                topology: Topology::cores(2).expect("valid"),
                kernel: "vmlinuz".into(),
                initrd: Some("initrd.img".into()),
                append: "console=ttyS0".into(),
                debug_log: Some("log.txt".into()),
                qmp: Some(QmpOptions {
                    address: crate::monitor::QmpAddress::Unix("/tmp/q.sock".into()),
                    wait: false,
                }),
                start_paused: true,
                iothreads: Vec::new(),
                disks: Vec::new(),
                name: Name::default(),
                pidfile: None,
                sandbox: true,
            }
        );
    }

    #[test]
    fn defaults_and_memory_forms() {
        let c = config("-kernel k");
        assert_eq!(
            (c.mem_bytes, c.topology.cpus(), c.initrd, c.append),
            (128 << 20, 1, None, String::new())
        );
        assert_eq!(config("-kernel k -m 512").mem_bytes, 512 << 20);
        assert_eq!(config("-kernel k -m 4096K").mem_bytes, 4 << 20);
        assert_eq!(config("-kernel k -m size=2G").mem_bytes, 2 << 30);
        assert_eq!(config("-kernel k -smp cpus=8").topology.cpus(), 8);
        assert_eq!(config("-kernel k -M type=microvm").topology.cpus(), 1);
        assert_eq!(parse_str("-kernel k -h"), Ok(Command::Help));
        assert_eq!(parse_str("-version"), Ok(Command::Version));
        assert_eq!(parse_str("--version -kernel k"), Ok(Command::Version));
    }

    #[test]
    fn each_error_by_variant() {
        let cases: &[(&str, CliError)] = &[
            ("-kernel k -vga std", CliError::UnknownFlag("-vga".into())),
            (
                "-kernel k stray",
                CliError::UnexpectedArgument("stray".into()),
            ),
            ("-kernel", CliError::MissingValue("-kernel")),
            ("-kernel k -kernel j", CliError::Repeated("-kernel")),
            ("-kernel k -smp 0", CliError::BadCpuCount("0".into())),
            ("-kernel k -smp 256", CliError::BadCpuCount("256".into())),
            ("-kernel k -machine pc", CliError::BadMachine("pc".into())),
            ("-kernel k -serial pty", CliError::BadSerial("pty".into())),
            ("-m 1G", CliError::NoKernel),
            (
                "-kernel k -qmp stdio",
                CliError::Qmp(QmpOptionError::UnsupportedBackend("stdio".into())),
            ),
        ];
        for (line, err) in cases {
            assert_eq!(parse_str(line).as_ref(), Err(err), "{line}");
        }
        assert!(matches!(
            parse_str("-kernel k -m 1X"),
            Err(CliError::Option {
                flag: "-m",
                source: OptionError::BadValue { .. }
            })
        ));
        assert!(matches!(
            parse_str("-kernel k -smp 2,dies=2"),
            Err(CliError::Option {
                flag: "-smp",
                source: OptionError::UnknownKey { .. }
            })
        ));
    }

    /// The (sockets, cores, threads) `-smp` gives, as APIC-id checks see them.
    fn topology(smp: &str) -> Result<Topology, CliError> {
        parse_str(&format!("-kernel k -smp {smp}")).map(|c| match c {
            Command::Run(c) => c.topology,
            Command::Help | Command::Version => panic!("not a run"),
        })
    }

    fn t(sockets: u32, cores: u32, threads: u32) -> Result<Topology, CliError> {
        Ok(Topology::new(sockets, cores, threads).expect("valid"))
    }

    #[test]
    fn smp_topology_as_qemu_works_it_out() {
        // Cores are worked out first, then sockets, then threads (QEMU 6.2 and later).
        assert_eq!(topology("4"), t(1, 4, 1));
        assert_eq!(topology("cpus=8,sockets=2"), t(2, 4, 1));
        assert_eq!(topology("8,sockets=2,threads=2"), t(2, 2, 2));
        assert_eq!(topology("8,cores=2"), t(4, 2, 1));
        assert_eq!(topology("8,cores=2,sockets=2"), t(2, 2, 2));
        assert_eq!(topology("sockets=2,cores=3,threads=2"), t(2, 3, 2));
        assert_eq!(topology("maxcpus=6,cores=3"), t(2, 3, 1));
        assert_eq!(
            topology("6,maxcpus=6,sockets=1,cores=6,threads=1"),
            t(1, 6, 1)
        );
        assert_eq!(topology("255"), t(1, 255, 1));
        assert_eq!(topology("255").map(|t| t.apic_id(254)), Ok(254));
    }

    #[test]
    fn smp_topology_errors_by_variant() {
        let mismatch = |sockets, cores, threads, maxcpus| CliError::TopologyMismatch {
            sockets,
            cores,
            threads,
            maxcpus,
        };
        assert_eq!(topology("4,sockets=3"), Err(mismatch(3, 1, 1, 4)));
        assert_eq!(topology("2,sockets=4"), Err(mismatch(4, 0, 1, 2)));
        assert_eq!(
            topology("4,sockets=2,cores=2,threads=2"),
            Err(mismatch(2, 2, 2, 4))
        );
        assert_eq!(topology("4,threads=0"), Err(CliError::ZeroTopology));
        assert_eq!(topology("maxcpus=0"), Err(CliError::ZeroTopology));
        assert_eq!(
            topology("4,maxcpus=8"),
            Err(CliError::NoCpuHotplug {
                cpus: 4,
                maxcpus: 8
            })
        );
        assert_eq!(
            topology("8,maxcpus=4"),
            Err(CliError::MaxCpusBelowCpus {
                cpus: 8,
                maxcpus: 4
            })
        );
        // 3 sockets of 5 cores of 17 threads: 255 vCPUs, but APIC ids up to 656.
        assert!(matches!(
            topology("sockets=3,cores=5,threads=17"),
            Err(CliError::Topology(TopologyError::ApicIdTooLarge {
                apic_id: 656,
                ..
            }))
        ));
        assert!(matches!(
            topology("sockets=4294967295,cores=4294967295,threads=4294967295"),
            Err(CliError::Topology(TopologyError::ApicIdTooLarge { .. }))
        ));
    }

    #[test]
    fn fractional_memory_rounds_up_to_8k() {
        assert_eq!(config("-kernel k -m 1.5G").mem_bytes, 3 << 29);
        assert_eq!(config("-kernel k -m size=0.5G").mem_bytes, 512 << 20);
        assert_eq!(config("-kernel k -m 4097K").mem_bytes, 4104 << 10);
    }

    #[test]
    fn pasted_qemu_flags_are_accepted() {
        let c = config(
            "-kernel k -cpu host -accel kvm -machine microvm,accel=kvm -display none -nodefaults \
             -name guest1,debug-threads=on -pidfile /run/vm.pid -enable-kvm -M accel=kvm:tcg",
        );
        assert_eq!(c.name.guest.as_deref(), Some("guest1"));
        assert_eq!(c.name.process_name(), Some("guest1"));
        assert_eq!(c.pidfile, Some(PathBuf::from("/run/vm.pid")));
        let c = config("-kernel k -cpu max -accel accel=kvm -name guest=g,process=vmm-g");
        assert_eq!(c.name.guest.as_deref(), Some("g"));
        assert_eq!(c.name.process_name(), Some("vmm-g"));
        let c = config("-kernel k -drive file=a.img,format=raw,id=d0,node-name=disk0.top_1");
        assert_eq!(
            c.disks.len(),
            0,
            "an if=none drive without a device gives no disk"
        );
    }

    #[test]
    fn pasted_qemu_flags_with_other_meanings_are_refused() {
        let cases: &[(&str, CliError)] = &[
            ("-cpu qemu64", CliError::BadCpuModel("qemu64".into())),
            (
                "-cpu Skylake-Client",
                CliError::BadCpuModel("Skylake-Client".into()),
            ),
            ("-accel tcg", CliError::BadAccel("tcg".into())),
            (
                "-machine microvm,accel=tcg",
                CliError::BadAccel("tcg".into()),
            ),
            (
                "-machine accel=tcg:kvm",
                CliError::BadAccel("tcg:kvm".into()),
            ),
            ("-machine q35,accel=kvm", CliError::BadMachine("q35".into())),
            ("-display gtk", CliError::BadDisplay("gtk".into())),
            ("-serial mon:stdio", CliError::SerialMonitor),
            ("-daemonize", CliError::Daemonize),
            ("-name a -name b", CliError::Repeated("-name")),
            ("-pidfile a -pidfile b", CliError::Repeated("-pidfile")),
            (
                "-drive file=a,format=raw,id=d,node-name=0bad",
                CliError::Drive(DriveError::Unsupported {
                    key: "node-name",
                    value: "0bad".into(),
                    supported: "up to 31 letters, digits, '-', '.' or '_', starting with a letter",
                }),
            ),
        ];
        for (flags, err) in cases {
            assert_eq!(
                parse_str(&format!("-kernel k {flags}")).as_ref(),
                Err(err),
                "{flags}"
            );
        }
        assert!(matches!(
            parse_str("-kernel k -cpu host,+x2apic"),
            Err(CliError::Option {
                flag: "-cpu",
                source: OptionError::NotKeyValue { .. }
            })
        ));
        assert!(matches!(
            parse_str("-kernel k -name n,debug-threads=maybe"),
            Err(CliError::Option {
                flag: "-name",
                source: OptionError::BadValue { .. }
            })
        ));
    }

    #[test]
    fn paused_without_a_monitor_warns() {
        assert_eq!(config("-kernel k -S").warnings().len(), 1);
        assert!(config("-kernel k").warnings().is_empty());
        let with_monitor = "-kernel k -S -qmp unix:/tmp/q.sock,server=on,wait=off";
        assert!(config(with_monitor).warnings().is_empty());
    }
}
