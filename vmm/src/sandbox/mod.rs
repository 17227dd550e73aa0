//! `-sandbox on` (the default): every thread of the VMM runs under a seccomp filter made for its
//! kind of thread, allowing only the system calls, and where it matters the arguments (ioctl
//! numbers, `fcntl` commands, `mmap` protections, socket families), that kind makes.
//!
//! The kinds ([`Kind`]) and where each filter goes on:
//! - `signals`: first thing in the signal thread ([`crate::signals::start`]);
//! - `iothread`: first thing in each iothread (the hook [`devices::context::set_iothread_start`]),
//!   before any device is added to its context;
//! - `worker`: first thing in each disk I/O worker (the hook [`block::aio::set_worker_start`]),
//!   including the workers a pool grows later, before they take a request; and first thing in
//!   each block job's thread (`vmm/src/disks/jobs/`), whose copy does the same I/O;
//! - `vcpu`: first thing in each vCPU thread, before its first `KVM_RUN`;
//! - `main`: on the main thread in [`crate::vm::Vm::run`], after the vCPU threads are started and
//!   while it holds the global lock they wait on first, so before the guest's first instruction.
//!
//! Everything the VMM opens (`/dev/kvm`, images, the kernel, the monitor's socket) is opened
//! before that, on the main thread; the main loop keeps what the monitor needs to open snapshot
//! overlays. On every other thread `openat` fails with EACCES rather than trapping (see
//! [`Kind::compile`]). A new thread inherits its creator's filter, and filters stack (a call must pass
//! both): so a thread that grows a disk's worker pool (the main loop, an iothread, and a vCPU
//! that activates a virtio-blk device) also allows what a new thread does before its own filter
//! is on. The filters are compiled once, at start-up ([`init`], the debug log's `startup: seccomp
//! filters built` step), and kept in a static.
//!
//! A call outside the filter raises SIGSYS (`SECCOMP_RET_TRAP`): the handler in [`trap`] writes
//! one line naming the thread, the call and its first two arguments, and the process exits with
//! status 159. A thread whose filter cannot be installed exits the same way: no thread runs
//! unconfined when the sandbox is on.
//!
//! Anything new that runs on a thread (a device, a QMP command, a thread of a new kind) extends
//! these lists in the same change; the tiny-guest and nested-host suites run with the sandbox on,
//! so a missing call shows up there.
//!
//! File access is limited too, with Landlock where the kernel has it ([`landlock`]): put on the
//! main thread before the vCPU threads start, once every file of the VM is open.
//!
//! Test hook: with `VMM_SANDBOX_TEST_VIOLATION=KIND` in the environment, each thread of that kind
//! makes a forbidden call (`socket(AF_INET)`) right after its filter is on, so the tests can see
//! each filter and the handler do their work. It makes the VMM die at once and is meant for tests
//! only.

mod iothread;
pub mod landlock;
mod main_loop;
mod rules;
mod signals;
mod syscalls;
mod trap;
mod vcpu;
mod worker;

use std::sync::OnceLock;

use seccompiler::BpfProgram;

use crate::options::{OptionError, Options};

/// The environment variable of the test hook (see the module documentation).
const TEST_VIOLATION_VAR: &str = "VMM_SANDBOX_TEST_VIOLATION";

/// The kinds of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread: build, main loop, monitor, shutdown.
    Main,
    /// The thread that reads SIGTERM, SIGINT and SIGHUP.
    Signals,
    /// A vCPU.
    Vcpu,
    /// An iothread.
    IoThread,
    /// A disk's I/O worker, or a block job's thread.
    Worker,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 5] = [
        Kind::Main,
        Kind::Signals,
        Kind::Vcpu,
        Kind::IoThread,
        Kind::Worker,
    ];

    /// The name the test hook and the documentation use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Signals => "signals",
            Kind::Vcpu => "vcpu",
            Kind::IoThread => "iothread",
            Kind::Worker => "worker",
        }
    }

    /// Its rules.
    fn rules(self) -> rules::Rules {
        let mut r = match self {
            Kind::Main => main_loop::rules(),
            Kind::Signals => signals::rules(),
            Kind::Vcpu => vcpu::rules(),
            Kind::IoThread => iothread::rules(),
            Kind::Worker => worker::rules(),
        };
        if self != Kind::Main {
            // Passed here so that the refusal filter's EACCES wins over a trap.
            r.allow(&[libc::SYS_openat]);
        }
        r
    }

    /// The programs its threads install, in order: first the refusals ([`rules::refusals`]):
    /// `clone3` with ENOSYS, so that new threads come from `clone`, whose flags the filters
    /// check, and on every thread but the main one `openat` with EACCES (glibc opens files
    /// lazily on whichever thread first needs them, `/proc/sys/vm/overcommit_memory` when a
    /// thread's heap first shrinks, and copes with the failure; these threads open nothing
    /// else); then the allow-list, `rules` (its [`Kind::rules`]).
    fn compile(self, rules: &rules::Rules) -> Result<Vec<BpfProgram>, rules::CompileError> {
        let mut programs = rules::refusals(self != Kind::Main)?;
        programs.push(rules.compile()?);
        Ok(programs)
    }
}

/// Errors setting up the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter did not compile.
    #[error("Cannot compile the seccomp filter of the {kind} threads")]
    Compile {
        /// The kind of thread.
        kind: &'static str,
        /// Why.
        #[source]
        source: rules::CompileError,
    },
    /// The SIGSYS handler could not be installed.
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The test hook names no kind of thread.
    #[error(
        "{TEST_VIOLATION_VAR}={0} names no kind of thread (main, signals, vcpu, iothread, worker)"
    )]
    TestKind(String),
}

/// Errors in `-sandbox`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SandboxFlagError {
    /// Not key=value, an unknown key, a bad on/off.
    #[error("Invalid -sandbox")]
    Option(#[source] OptionError),
    /// A QEMU sub-option asking for calls the filters never allow.
    #[error("-sandbox {key}={value} is not supported: vmm's filters always deny that group of calls (only {key}=deny)")]
    Allow {
        /// The sub-option.
        key: String,
        /// Its value.
        value: String,
    },
}

/// QEMU's sub-options of `-sandbox`; each names a group of calls QEMU can allow, which the filters
/// here never allow.
const SUB_OPTIONS: [&str; 4] = ["obsolete", "elevateprivileges", "spawn", "resourcecontrol"];

/// Parses `-sandbox on|off[,obsolete=deny][,elevateprivileges=deny][,spawn=deny]
/// [,resourcecontrol=deny]`: whether the sandbox is on.
pub fn parse_flag(value: &str) -> Result<bool, SandboxFlagError> {
    let mut known = vec!["enable"];
    known.extend(SUB_OPTIONS);
    let opts = Options::parse(value, Some("enable"), &known).map_err(SandboxFlagError::Option)?;
    for key in SUB_OPTIONS {
        match opts.get::<String>(key).map_err(SandboxFlagError::Option)? {
            None => {}
            Some(v) if v == "deny" => {}
            Some(value) => {
                return Err(SandboxFlagError::Allow {
                    key: key.to_owned(),
                    value,
                })
            }
        }
    }
    Ok(opts
        .get::<bool>("enable")
        .map_err(SandboxFlagError::Option)?
        .unwrap_or(true))
}

/// The compiled filters and the test hook, set once by [`init`].
#[derive(Debug)]
struct Sandbox {
    /// The programs of each kind, in [`Kind::ALL`]'s order.
    filters: Vec<Vec<BpfProgram>>,
    /// The kind whose threads make a forbidden call on purpose (tests only).
    test_violation: Option<Kind>,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// Turns the sandbox on for every thread started from now on and for those that call [`enter`]:
/// compiles the filters, installs the SIGSYS handler and fills the block and devices crates'
/// thread-start hooks. Call it on the main thread before starting any other thread.
pub fn init() -> Result<(), SandboxError> {
    let test_violation = match std::env::var(TEST_VIOLATION_VAR) {
        Ok(name) => Some(
            Kind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or(SandboxError::TestKind(name))?,
        ),
        Err(_) => None,
    };
    let filters = Kind::ALL
        .into_iter()
        .map(|kind| {
            let rules = kind.rules();
            let programs = kind
                .compile(&rules)
                .map_err(|source| SandboxError::Compile {
                    kind: kind.name(),
                    source,
                })?;
            log::info!(
                "sandbox: {} threads may make {} system calls (filters of {} BPF instructions)",
                kind.name(),
                rules.len(),
                programs.iter().map(Vec::len).sum::<usize>()
            );
            Ok(programs)
        })
        .collect::<Result<Vec<_>, _>>()?;
    trap::install_handler().map_err(SandboxError::Handler)?;
    log::info!("startup: seccomp filters built");
    // Only `init` sets it, once: a second call keeps the first filters.
    let _ = SANDBOX.set(Sandbox {
        filters,
        test_violation,
    });
    block::aio::set_worker_start(|| enter(Kind::Worker));
    devices::context::set_iothread_start(|| enter(Kind::IoThread));
    Ok(())
}

/// Puts the calling thread under the filter of `kind`, when the sandbox is on; a thread that
/// cannot be confined ends the process (see the module documentation). The main thread then runs
/// the Landlock test hook ([`landlock::test_opens`]), sandbox on or off.
pub fn enter(kind: Kind) {
    if let Some(sandbox) = SANDBOX.get() {
        confine(sandbox, kind);
    }
    if kind == Kind::Main {
        landlock::test_opens();
    }
}

/// Installs `kind`'s programs on the calling thread, then makes the test hook's forbidden call
/// if it names `kind`.
fn confine(sandbox: &Sandbox, kind: Kind) {
    trap::remember_thread_name();
    let index = Kind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
    for program in &sandbox.filters[index] {
        if let Err(e) = seccompiler::apply_filter(program) {
            trap::die_unconfined(kind.name(), &e.to_string());
        }
    }
    if sandbox.test_violation == Some(kind) {
        // SAFETY: socket takes no pointers; the filter forbids it, so it never returns.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_parses_as_qemu_s() {
        assert_eq!(parse_flag("on"), Ok(true));
        assert_eq!(parse_flag("off"), Ok(false));
        assert_eq!(parse_flag("enable=off"), Ok(false));
        assert_eq!(
            parse_flag("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
            Ok(true)
        );
        assert_eq!(
            parse_flag("on,spawn=allow"),
            Err(SandboxFlagError::Allow {
                key: "spawn".into(),
                value: "allow".into()
            })
        );
        assert!(matches!(
            parse_flag("on,elevateprivileges=children"),
            Err(SandboxFlagError::Allow { .. })
        ));
        assert!(matches!(
            parse_flag("maybe"),
            Err(SandboxFlagError::Option(_))
        ));
        assert!(matches!(
            parse_flag("on,bogus=1"),
            Err(SandboxFlagError::Option(OptionError::UnknownKey { .. }))
        ));
    }

    /// Puts the calling thread under `kind`'s filter; a forbidden call ends the test process with
    /// the violation line.
    fn confine(kind: Kind) {
        trap::remember_thread_name();
        for program in kind.compile(&kind.rules()).expect("compiles") {
            seccompiler::apply_filter(&program).expect("installs");
        }
    }

    #[test]
    fn a_worker_grown_by_a_confined_thread_comes_from_clone_confines_itself_and_does_its_io() {
        let path = std::env::temp_dir().join(format!("sandbox-grow-{}", std::process::id()));
        std::fs::write(&path, b"data").expect("temp dir is writable");
        trap::install_handler().expect("installs");
        for spawner in [Kind::Main, Kind::IoThread, Kind::Vcpu] {
            let file = std::fs::File::open(&path).expect("opens");
            let grown = std::thread::Builder::new()
                .name(format!("{spawner:?}"))
                .spawn(move || {
                    confine(spawner);
                    // SAFETY: clone3 with no arguments creates nothing whatever the filter does.
                    let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) };
                    assert_eq!(
                        (r, std::io::Error::last_os_error().raw_os_error()),
                        (-1, Some(libc::ENOSYS)),
                        "clone3 is refused, so that threads come from clone"
                    );
                    std::thread::Builder::new()
                        .name("d0-io1".into())
                        .spawn(move || {
                            confine(Kind::Worker);
                            // Refused, not trapped: what glibc's lazy opens meet.
                            let refused = std::fs::File::open("/proc/sys/vm/overcommit_memory");
                            assert_eq!(
                                refused.map_err(|e| e.raw_os_error()).err(),
                                Some(Some(libc::EACCES))
                            );
                            let mut buf = [0u8; 4];
                            std::os::unix::fs::FileExt::read_at(&file, &mut buf, 0).expect("reads");
                            buf
                        })
                        .expect("spawns under the spawner's filter")
                        .join()
                        .expect("the worker ran")
                })
                .expect("spawns")
                .join()
                .expect("the spawner ran");
            assert_eq!(&grown, b"data", "{spawner:?}");
        }
        std::fs::remove_file(&path).expect("removes");
    }

    #[test]
    fn every_kind_s_program_gives_seccompiler_s_verdicts_in_fewer_instructions() {
        for kind in Kind::ALL {
            let rules = kind.rules();
            let programs = kind.compile(&rules).expect("compiles");
            assert_eq!(
                programs.last(),
                Some(&rules.compile().expect("compiles")),
                "{kind:?}: the allow-list goes on last"
            );
            let (mine, theirs) = rules::tests::same_verdicts_as_seccompiler(&rules);
            eprintln!("{kind:?}: {mine} instructions, seccompiler's {theirs}");
        }
    }

    #[test]
    fn every_filter_compiles_and_none_allows_a_network_socket() {
        for kind in Kind::ALL {
            let rules = kind.rules();
            assert!(!rules.allows_unconditionally(libc::SYS_socket), "{kind:?}");
            assert!(!rules.allows_unconditionally(libc::SYS_execve), "{kind:?}");
            assert!(!rules.is_empty(), "{kind:?}");
            kind.compile(&rules).expect("compiles");
        }
    }
}
