//! The `vmm` binary: parse the command line, build the VM, run it, and turn the outcome into an
//! exit code and at most one line on stderr.
//!
//! Exit codes: 0 when the guest powers off or resets (a reset ends the VMM, as QEMU's
//! `-no-reboot` does), or on Ctrl-A x; 0 on SIGTERM/SIGINT/SIGHUP at any point, a clean shutdown
//! (see [`signals`]); 1 on any error (bad flags, bad images, KVM unusable, a vCPU or an iothread
//! failing).

mod arch;
mod blk_top;
mod cli;
mod console;
mod disks;
mod drive;
mod global;
mod logger;
mod main_loop;
mod monitor;
mod options;
mod process;
mod sandbox;
mod signals;
mod vcpu;
mod vm;

use std::process::ExitCode;

use cli::Command;
use global::ExitReason;

/// Everything `main` can fail with.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// Signal handling.
    #[error(transparent)]
    Signals(#[from] signals::SignalError),
    /// The seccomp filters.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// Landlock could not be put on.
    #[error(transparent)]
    Landlock(#[from] sandbox::landlock::LandlockError),
    /// The command line.
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    /// `vmm blk-top`.
    #[error(transparent)]
    BlkTop(#[from] blk_top::BlkTopError),
    /// The process name or pidfile.
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    /// The debug log.
    #[error(transparent)]
    Logger(#[from] logger::LoggerError),
    /// The terminal.
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// A vCPU failed while the guest ran.
    #[error("vCPU {cpu} stopped: {message}{hint}")]
    VcpuFailed {
        /// The vCPU.
        cpu: u8,
        /// What happened.
        message: String,
        /// Where the registers are.
        hint: &'static str,
    },
    /// An iothread's event loop failed while the guest ran.
    #[error("iothread {id} stopped: {message}")]
    IoThreadFailed {
        /// The iothread.
        id: String,
        /// What happened.
        message: String,
    },
}

/// Runs the command line in `args`; `Ok` is a clean end.
fn run(args: impl IntoIterator<Item = String>) -> Result<(), Error> {
    let mut args = args.into_iter().peekable();
    // `vmm blk-top` watches another vmm: no VM, and Ctrl-C ends it as any client.
    if args.peek().is_some_and(|a| a == "blk-top") {
        args.next();
        return Ok(blk_top::run(args)?);
    }
    let config = match cli::parse(args)? {
        Command::Help => {
            println!("{}", cli::USAGE);
            return Ok(());
        }
        Command::Version => {
            println!(
                "vmm version {}\nA KVM virtual machine monitor with QEMU's flags",
                env!("CARGO_PKG_VERSION")
            );
            return Ok(());
        }
        Command::Run(config) => config,
    };
    process::limit_arenas();
    if let Some(path) = &config.debug_log {
        logger::init(path)?;
    }
    // Before any other thread exists: see the sandbox and signals modules.
    if config.sandbox {
        sandbox::init()?;
    }
    signals::start(|| sandbox::enter(sandbox::Kind::Signals))?;
    for warning in config.warnings() {
        eprintln!("vmm: warning: {warning}");
    }
    if let Some(name) = config.name.process_name() {
        process::set_name(name)?;
    }
    let _pidfile = config
        .pidfile
        .as_deref()
        .map(process::PidFile::create)
        .transpose()?;
    let vm = vm::Vm::build(&config)?;
    let terminal = console::RawTerminal::enter()?;
    // Every file is open: from here on the main thread and the threads it starts (the vCPUs
    // first) open only what the sandbox's Landlock rules allow.
    if config.sandbox {
        sandbox::landlock::restrict(&config, &vm.image_files())?;
    }
    let reason = vm.run();
    drop(terminal);
    match reason? {
        ExitReason::VcpuFailed { cpu, message } => Err(Error::VcpuFailed {
            cpu,
            message,
            hint: if config.debug_log.is_some() {
                " (registers in the debug log)"
            } else {
                " (pass -D FILE to log its registers)"
            },
        }),
        ExitReason::IoThreadFailed { id, message } => Err(Error::IoThreadFailed { id, message }),
        reason => {
            log::info!("VM ended: {reason:?}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("vmm: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                line.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{line}");
            log::error!("{line}");
            ExitCode::FAILURE
        }
    }
}
