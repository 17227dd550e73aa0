//! The command line, with QEMU's flag names so that a QEMU command line works.
//!
//! Flags that take a value take it as the next argument (`-m 1G`). Option strings go through
//! [`crate::options`]. The flags a QEMU user types out of habit are accepted where they describe
//! what this VMM always does: `-nographic`, `-serial stdio`, `-enable-kvm`, `-no-reboot` (a
//! guest reboot always ends the VMM) and `-machine microvm`. Anything else is an error that names
//! it, never silently ignored.

use std::path::PathBuf;

use crate::drive::{self, DiskSpec, DriveError};
use crate::monitor::{parse_qmp_option, QmpOptionError, QmpOptions};
use crate::options::{MemorySize, OptionError, Options};

/// Default guest RAM, QEMU's default.
const DEFAULT_MEM_BYTES: u64 = 128 << 20;

/// The usage text for `-h`.
pub const USAGE: &str = "\
Usage: vmm -kernel FILE [options]
  -kernel FILE     bzImage (64-bit boot protocol) or ELF vmlinux with a PVH note
  -initrd FILE     initramfs
  -append CMDLINE  kernel command line
  -m SIZE          guest RAM; a bare number is MiB, or use a K, M or G suffix (default 128M)
  -smp N           number of vCPUs (default 1)
  -D FILE          write the debug log to FILE
  -object iothread,id=ID
                   an iothread (a thread of its own for the disks given iothread=ID)
  -drive file=PATH,format=raw|qcow2,if=none|virtio,id=ID[,cache=none|writeback|writethrough|directsync|unsafe][,readonly=on|off]
         [,aio=threads|io_uring][,discard=ignore|unmap][,detect-zeroes=off|on|unmap][,stats-intervals=SECS[:SECS]]
                   a disk image (if=virtio also gives it a virtio-blk device on the main loop)
  -device virtio-blk-device,drive=ID[,id=ID][,iothread=ID][,serial=S][,num-queues=N][,queue-size=N]
                   a virtio-mmio disk for the guest
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off
                   a QMP monitor (wait=on, the default, waits for a client before starting)
  -S               start with the vCPUs paused, until the monitor's cont
  -nographic, -serial stdio, -enable-kvm, -no-reboot, -machine microvm
                   accepted for QEMU compatibility: this is what vmm always does
                   (the console is on stdio; a guest reboot ends vmm, as with -no-reboot)
  -h, --help       this text
Console: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A.";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Config {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub cpus: u8,
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
    /// The iothreads' ids (`-object iothread`), in order.
    pub iothreads: Vec<String>,
    /// The disks (`-drive` paired with `-device`), in order.
    pub disks: Vec<DiskSpec>,
}

/// What to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run a VM.
    Run(Config),
    /// Print the usage text.
    Help,
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
    /// A machine type other than microvm.
    #[error("Unsupported machine type '{0}' (only microvm)")]
    BadMachine(String),
    /// A serial backend other than stdio.
    #[error("Unsupported serial backend '{0}' (only stdio)")]
    BadSerial(String),
    /// No `-kernel`.
    #[error("No kernel given: use -kernel FILE")]
    NoKernel,
    /// A `-qmp` value that does not parse.
    #[error(transparent)]
    Qmp(#[from] QmpOptionError),
    /// A disk flag (`-object`, `-drive`, `-device`) that does not parse or does not pair up.
    #[error(transparent)]
    Drive(#[from] DriveError),
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
    ("-machine", true),
    ("-M", true),
    ("-serial", true),
    ("-nographic", false),
    ("-enable-kvm", false),
    ("-no-reboot", false),
    ("-h", false),
    ("-help", false),
    ("--help", false),
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

/// `-m`: `SIZE` or `size=SIZE`.
fn parse_memory(value: &str) -> Result<u64, CliError> {
    let opts = Options::parse(value, Some("size"), &["size"]).map_err(option_err("-m"))?;
    let size: Option<MemorySize> = opts.get("size").map_err(option_err("-m"))?;
    size.map(|s| s.0).ok_or(CliError::NoMemorySize)
}

/// `-smp`: `N` or `cpus=N`.
fn parse_cpus(value: &str) -> Result<u8, CliError> {
    let opts = Options::parse(value, Some("cpus"), &["cpus"]).map_err(option_err("-smp"))?;
    let cpus: Option<String> = opts.get("cpus").map_err(option_err("-smp"))?;
    let cpus = cpus.unwrap_or_default();
    cpus.parse::<u8>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or(CliError::BadCpuCount(cpus))
}

/// `-machine`: `microvm` or `type=microvm`.
fn check_machine(flag: &'static str, value: &str) -> Result<(), CliError> {
    let opts = Options::parse(value, Some("type"), &["type"]).map_err(option_err(flag))?;
    match opts.get::<String>("type").map_err(option_err(flag))? {
        Some(t) if t == "microvm" => Ok(()),
        other => Err(CliError::BadMachine(other.unwrap_or_default())),
    }
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut mem = None;
    let mut cpus = None;
    let mut kernel = None;
    let mut initrd = None;
    let mut append = None;
    let mut debug_log = None;
    let mut qmp = None;
    let mut start_paused = false;
    let mut iothreads = Vec::new();
    let mut drives = Vec::new();
    let mut devices = Vec::new();
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
            "-smp" => set_once(&mut cpus, flag, parse_cpus(&value)?)?,
            "-kernel" => set_once(&mut kernel, flag, PathBuf::from(value))?,
            "-initrd" => set_once(&mut initrd, flag, PathBuf::from(value))?,
            "-append" => set_once(&mut append, flag, value)?,
            "-D" => set_once(&mut debug_log, flag, PathBuf::from(value))?,
            "-qmp" => set_once(&mut qmp, flag, parse_qmp_option(&value)?)?,
            "-S" => start_paused = true,
            "-object" => iothreads.push(drive::parse_object(&value)?),
            "-drive" => drives.push(drive::parse_drive(&value, drives.len())?),
            "-device" => devices.push(drive::parse_device(&value)?),
            "-machine" | "-M" => check_machine(flag, &value)?,
            "-serial" if value != "stdio" => return Err(CliError::BadSerial(value)),
            "-h" | "-help" | "--help" => return Ok(Command::Help),
            // -serial stdio, -nographic, -enable-kvm, -no-reboot: what we always do.
            _ => {}
        }
    }
    Ok(Command::Run(Config {
        mem_bytes: mem.unwrap_or(DEFAULT_MEM_BYTES),
        cpus: cpus.unwrap_or(1),
        kernel: kernel.ok_or(CliError::NoKernel)?,
        initrd,
        append: append.unwrap_or_default(),
        debug_log,
        qmp,
        start_paused,
        disks: drive::plan(&iothreads, &drives, &devices)?,
        iothreads,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, CliError> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    fn config(line: &str) -> Config {
        match parse_str(line) {
            Ok(Command::Run(c)) => c,
            other => panic!("{line}: {other:?}"),
        }
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
                cpus: 2,
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
            }
        );
    }

    #[test]
    fn defaults_and_memory_forms() {
        let c = config("-kernel k");
        assert_eq!(
            (c.mem_bytes, c.cpus, c.initrd, c.append),
            (128 << 20, 1, None, String::new())
        );
        assert_eq!(config("-kernel k -m 512").mem_bytes, 512 << 20);
        assert_eq!(config("-kernel k -m 4096K").mem_bytes, 4 << 20);
        assert_eq!(config("-kernel k -m size=2G").mem_bytes, 2 << 30);
        assert_eq!(config("-kernel k -smp cpus=8").cpus, 8);
        assert_eq!(config("-kernel k -M type=microvm").cpus, 1);
        assert_eq!(parse_str("-kernel k -h"), Ok(Command::Help));
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
            parse_str("-kernel k -smp 2,sockets=2"),
            Err(CliError::Option {
                flag: "-smp",
                source: OptionError::UnknownKey { .. }
            })
        ));
    }
}
