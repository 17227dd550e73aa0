//! The allow-lists and the groups of calls several kinds of thread share: what every thread
//! makes (locks, memory, its own exit, the SIGSYS handler's line), what a thread makes that
//! starts threads, and what a thread makes that runs a virtio-blk device's handlers; and the
//! allow-lists' BPF programs ([`Rules::compile`]).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch,
};
#[cfg(test)]
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// A condition: argument `index` (0-based) equals `value`, compared on the low 32 bits (every
/// argument checked here is an `int` or an ioctl number, which Linux reads as 32 bits).
type ArgEq = (u8, u64);

/// An allow-list under construction: each call either unconditionally or when one of its
/// argument patterns matches.
#[derive(Debug, Default)]
pub struct Rules(BTreeMap<libc::c_long, Option<Vec<Vec<ArgEq>>>>);

impl Rules {
    /// Allows `calls` whatever their arguments.
    pub fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &nr in calls {
            self.0.insert(nr, None);
        }
        self
    }

    /// Allows `nr` when argument `index` is one of `values`.
    pub fn allow_arg(&mut self, nr: libc::c_long, index: u8, values: &[u64]) -> &mut Self {
        for &value in values {
            self.allow_args(nr, &[(index, value)]);
        }
        self
    }

    /// Allows `nr` when every argument of `args` has its value.
    pub fn allow_args(&mut self, nr: libc::c_long, args: &[ArgEq]) -> &mut Self {
        // An unconditional entry stays unconditional.
        if let Some(patterns) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            patterns.push(args.to_vec());
        }
        self
    }

    /// How many calls are allowed (in any form).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is allowed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The calls allowed under conditions, with their patterns.
    #[cfg(test)]
    pub fn patterns(&self) -> impl Iterator<Item = (libc::c_long, &[Vec<ArgEq>])> {
        self.0
            .iter()
            .filter_map(|(&nr, p)| p.as_deref().map(|p| (nr, p)))
    }

    /// Whether `nr` is allowed whatever its arguments.
    #[cfg(test)]
    pub fn allows_unconditionally(&self, nr: libc::c_long) -> bool {
        matches!(self.0.get(&nr), Some(None))
    }

    /// The BPF program: the listed calls are allowed, anything else traps (SIGSYS). Built here
    /// rather than by `seccompiler`, whose chains take five instructions per call even when it
    /// has no condition: first the architecture check (anything but x86_64 kills the process),
    /// then one comparison per unconditional call, all jumping to one `Allow`, then each call
    /// with conditions, its patterns one after the other, then the trap. The kernel's cost of
    /// taking a program grows with its length (see the module documentation of the sandbox).
    pub fn compile(&self) -> Result<BpfProgram, CompileError> {
        let unconditional: Vec<libc::c_long> = self
            .0
            .iter()
            .filter_map(|(&nr, patterns)| patterns.is_none().then_some(nr))
            .collect();
        let mut program = vec![
            stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH_OFFSET),
            jeq(AUDIT_ARCH_X86_64, 1, 0),
            stmt(BPF_RET, libc::SECCOMP_RET_KILL_PROCESS),
            stmt(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR_OFFSET),
        ];
        for (i, &nr) in unconditional.iter().enumerate() {
            // To the `Allow` after the last comparison.
            let to_allow = offset(unconditional.len() - i, nr)?;
            program.push(jeq(number(nr)?, to_allow, 0));
        }
        // The unconditional calls' `Allow`, reached only by their jumps.
        if !unconditional.is_empty() {
            program.push(stmt(BPF_JMP | BPF_JA, 1));
            program.push(stmt(BPF_RET, libc::SECCOMP_RET_ALLOW));
        }
        for (&nr, patterns) in &self.0 {
            let Some(patterns) = patterns else {
                continue;
            };
            // Each pattern: a load and a comparison per condition, then `Allow`.
            let mut body = Vec::new();
            for args in patterns {
                pattern(nr, args, &mut body)?;
            }
            // Another call: past the body and its closing trap to the next call's comparison,
            // the call's number still in the accumulator.
            program.push(jeq(number(nr)?, 0, offset(body.len() + 1, nr)?));
            program.extend(body);
            program.push(stmt(BPF_RET, libc::SECCOMP_RET_TRAP));
        }
        program.push(stmt(BPF_RET, libc::SECCOMP_RET_TRAP));
        if program.len() > BPF_MAX_LEN {
            return Err(CompileError::TooLong { len: program.len() });
        }
        Ok(program)
    }

    /// The program `seccompiler` builds from the same rules, which [`Rules::compile`]'s must
    /// match in every verdict.
    #[cfg(test)]
    pub fn compile_with_seccompiler(&self) -> Result<BpfProgram, BackendError> {
        let mut map = BTreeMap::new();
        for (&nr, patterns) in &self.0 {
            let rules = match patterns {
                None => Vec::new(),
                Some(patterns) => patterns
                    .iter()
                    .map(|args| {
                        let conditions = args
                            .iter()
                            .map(|&(index, value)| {
                                SeccompCondition::new(
                                    index,
                                    SeccompCmpArgLen::Dword,
                                    SeccompCmpOp::Eq,
                                    value,
                                )
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conditions)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            map.insert(nr, rules);
        }
        let filter = SeccompFilter::new(
            map,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?;
        BpfProgram::try_from(filter)
    }
}

/// Errors building an allow-list's program.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// `seccompiler` refused a refusal program.
    #[error("Cannot build a refusal program")]
    Seccompiler(#[from] BackendError),
    /// A jump longer than BPF's 255 instructions.
    #[error(
        "The program's jump for system call {nr} is {len} instructions long, beyond BPF's 255"
    )]
    JumpTooFar {
        /// The call.
        nr: libc::c_long,
        /// The jump's length.
        len: usize,
    },
    /// A negative system call number.
    #[error("System call number {nr} is negative")]
    Number {
        /// The call.
        nr: libc::c_long,
    },
    /// Longer than the kernel takes.
    #[error("The program has {len} instructions, beyond the kernel's {BPF_MAX_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

/// The kernel's limit on a program's length (`BPF_MAXINSNS`).
const BPF_MAX_LEN: usize = 4096;
/// `struct seccomp_data`'s offsets: the call's number, the architecture, the arguments (each 8
/// bytes, the low 32 bits first on x86_64).
const SECCOMP_DATA_NR_OFFSET: u32 = 0;
const SECCOMP_DATA_ARCH_OFFSET: u32 = 4;
const SECCOMP_DATA_ARGS_OFFSET: u32 = 16;
/// `AUDIT_ARCH_X86_64`: `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// BPF's opcodes (`include/uapi/linux/bpf_common.h`), as `sock_filter` holds them.
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;

/// An instruction without jump offsets.
fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// A comparison: `jt` instructions on if the accumulator is `k`, else `jf`.
fn jeq(k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: BPF_JMP | BPF_JEQ,
        jt,
        jf,
        k,
    }
}

/// A jump's length as BPF holds it, for call `nr`.
fn offset(len: usize, nr: libc::c_long) -> Result<u8, CompileError> {
    u8::try_from(len).map_err(|_| CompileError::JumpTooFar { nr, len })
}

/// A call's number as the filter compares it.
fn number(nr: libc::c_long) -> Result<u32, CompileError> {
    u32::try_from(nr).map_err(|_| CompileError::Number { nr })
}

/// Appends a pattern of call `nr` to `out`: for each condition, load the argument's low 32 bits
/// and go past the pattern's `Allow` (to the next pattern, or the call's trap) unless it has the
/// value; then `Allow`.
fn pattern(
    nr: libc::c_long,
    args: &[ArgEq],
    out: &mut Vec<sock_filter>,
) -> Result<(), CompileError> {
    for (i, &(index, value)) in args.iter().enumerate() {
        // The conditions after this one, two instructions each, and the `Allow`.
        let skip = offset((args.len() - i - 1) * 2 + 1, nr)?;
        out.push(stmt(
            BPF_LD | BPF_W | BPF_ABS,
            SECCOMP_DATA_ARGS_OFFSET + u32::from(index) * 8,
        ));
        // Compared on the low 32 bits (see `ArgEq`).
        let low = u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX);
        out.push(jeq(low, 0, skip));
    }
    out.push(stmt(BPF_RET, libc::SECCOMP_RET_ALLOW));
    Ok(())
}

/// The programs installed before the allow-list, one per refused call, whose errors win over
/// the allow-list's `Allow` (not over its traps): `clone3` fails with ENOSYS, so that glibc
/// starts threads with `clone`, whose flags the allow-lists check (`clone3` passes them in
/// memory, out of a filter's reach); with `refuse_opens`, `openat` fails with EACCES.
pub fn refusals(refuse_opens: bool) -> Result<Vec<BpfProgram>, BackendError> {
    let mut refused = vec![(libc::SYS_clone3, libc::ENOSYS)];
    if refuse_opens {
        refused.push((libc::SYS_openat, libc::EACCES));
    }
    refused
        .into_iter()
        .map(|(nr, errno)| {
            let filter = SeccompFilter::new(
                BTreeMap::from([(nr, Vec::new())]),
                SeccompAction::Allow,
                SeccompAction::Errno(errno.cast_unsigned()),
                TargetArch::x86_64,
            )?;
            BpfProgram::try_from(filter)
        })
        .collect()
}

/// A number as the filter compares it (the constants are small and non-negative).
pub fn arg(value: impl TryInto<u64>) -> u64 {
    value.try_into().unwrap_or(u64::MAX)
}

/// Memory protections a thread may ask for: none (guard pages, reservations) and read-write;
/// never executable.
fn protections() -> [u64; 2] {
    [
        arg(libc::PROT_NONE),
        arg(libc::PROT_READ | libc::PROT_WRITE),
    ]
}

/// What every thread makes: futexes (locks, condition variables, joins), memory for the
/// allocator (read-write or none, `MADV_DONTNEED` when it gives memory back), the thread's exit
/// (its alternate signal stack and guard page go), the kick signal's return, clocks and sleeps,
/// closing what it drops, writes (the console, eventfds, the debug log, the SIGSYS handler's
/// line on stderr) and the process exit that handler makes.
pub fn common() -> Rules {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_futex,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getrandom,
    ])
    .allow_arg(libc::SYS_madvise, 2, &[arg(libc::MADV_DONTNEED)])
    .allow_arg(libc::SYS_mmap, 2, &protections())
    .allow_arg(libc::SYS_mprotect, 2, &protections())
    // Checks that a descriptor is open before it is closed.
    .allow_arg(libc::SYS_fcntl, 1, &[arg(libc::F_GETFD)]);
    r
}

/// What a thread makes that starts threads (a disk's pool grows from whichever thread submits
/// to it), including what the new thread makes before and while its own filter goes on: `clone`
/// with exactly the flags of a thread (`clone3` is allowed here only to meet [`refusals`]'
/// ENOSYS, which makes glibc fall back to `clone`), robust futex lists, restartable sequences, its name and its CPU set,
/// `PR_SET_NO_NEW_PRIVS` and `seccomp`. The new worker's filter stacks on its creator's, so the
/// creator allows the worker's I/O calls too ([`super::worker::io`]).
pub fn spawner(r: &mut Rules) {
    super::worker::io(r);
    r.allow(&[
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
    ])
    .allow_args(
        libc::SYS_clone,
        &[(
            0,
            arg(libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM
                | libc::CLONE_SETTLS
                | libc::CLONE_PARENT_SETTID
                | libc::CLONE_CHILD_CLEARTID),
        )],
    )
    .allow_arg(
        libc::SYS_prctl,
        0,
        &[arg(libc::PR_SET_NAME), arg(libc::PR_SET_NO_NEW_PRIVS)],
    )
    // The new thread's own filter, stacked on the inherited one (it can only take calls away).
    .allow_arg(libc::SYS_seccomp, 0, &[arg(libc::SECCOMP_SET_MODE_FILTER)]);
}

/// What a thread makes that runs a virtio-blk device's handlers (its context's thread, and a
/// vCPU while it activates or resets the device): cloning, reading, adding and removing (in the
/// context's epoll set) the queues' and the pool's eventfds, submitting to the io_uring engine, and
/// growing the pool.
pub fn disk_handler(r: &mut Rules) {
    r.allow(&[
        libc::SYS_read,
        libc::SYS_epoll_ctl,
        libc::SYS_io_uring_enter,
    ])
    // Activation clones the queues' eventfds.
    .allow_arg(libc::SYS_fcntl, 1, &[arg(libc::F_DUPFD_CLOEXEC)]);
    spawner(r);
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Runs `program` as the kernel would on a call of architecture `arch`, number `nr` and
    /// arguments `args`: its verdict. Knows the instructions `seccompiler` and
    /// [`Rules::compile`] emit; any other fails the test.
    pub fn run(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + i * 8..24 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = &program[pc];
            let k = usize::try_from(insn.k).expect("32 bits fit");
            pc += 1;
            let taken = match insn.code {
                0x20 => {
                    let word = data[k..k + 4].try_into().expect("4 bytes");
                    acc = u32::from_le_bytes(word);
                    continue;
                }
                0x06 => return insn.k,
                0x05 => {
                    pc += k;
                    continue;
                }
                0x15 => acc == insn.k,
                0x25 => acc > insn.k,
                0x35 => acc >= insn.k,
                0x45 => acc & insn.k != 0,
                code => panic!("instruction {code:#x} is not interpreted"),
            };
            pc += usize::from(if taken { insn.jt } else { insn.jf });
        }
    }

    /// The calls a program is tried on: every number up to 460 and a few x32 ones with no
    /// arguments, and for each call with conditions each pattern's arguments, those with high
    /// bits set (compared on 32 bits), and those with one value changed.
    fn calls(rules: &Rules) -> Vec<(u32, [u64; 6])> {
        let mut calls: Vec<(u32, [u64; 6])> = (0..=460).map(|nr| (nr, [0; 6])).collect();
        calls.extend([0x4000_0000, 0x4000_0001, 0x4000_0010].map(|nr| (nr, [0; 6])));
        for (nr, patterns) in rules.patterns() {
            let nr = u32::try_from(nr).expect("non-negative");
            for args in patterns {
                let mut all = [0u64; 6];
                for &(index, value) in args {
                    all[usize::from(index)] = value;
                }
                calls.push((nr, all));
                calls.push((nr, all.map(|a| a | 0xdead_beef_0000_0000)));
                for &(index, _) in args {
                    let mut changed = all;
                    changed[usize::from(index)] ^= 1;
                    calls.push((nr, changed));
                }
            }
        }
        calls
    }

    /// Checks that [`Rules::compile`]'s program gives `seccompiler`'s verdict on every call
    /// [`calls`] lists, on x86_64 and on i386, and is shorter.
    pub fn same_verdicts_as_seccompiler(rules: &Rules) -> (usize, usize) {
        let mine = rules.compile().expect("compiles");
        let reference = rules.compile_with_seccompiler().expect("compiles");
        for arch in [AUDIT_ARCH_X86_64, 0x4000_0003] {
            for (nr, args) in calls(rules) {
                assert_eq!(
                    run(&mine, arch, nr, args),
                    run(&reference, arch, nr, args),
                    "arch {arch:#x}, call {nr}, arguments {args:x?}"
                );
            }
        }
        assert!(mine.len() < reference.len());
        (mine.len(), reference.len())
    }

    #[test]
    fn a_program_gives_seccompiler_s_verdicts() {
        let mut r = common();
        r.allow_args(libc::SYS_setsockopt, &[(1, 6), (2, 1)])
            .allow_arg(libc::SYS_setsockopt, 1, &[41]);
        let (mine, theirs) = same_verdicts_as_seccompiler(&r);
        assert!(mine < theirs);
        let allowed = r.compile().expect("compiles");
        let x86_64 = AUDIT_ARCH_X86_64;
        let nr = |c: libc::c_long| u32::try_from(c).expect("non-negative");
        assert_eq!(
            run(&allowed, x86_64, nr(libc::SYS_futex), [0; 6]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&allowed, x86_64, nr(libc::SYS_socket), [0; 6]),
            libc::SECCOMP_RET_TRAP
        );
        assert_eq!(
            run(
                &allowed,
                x86_64,
                nr(libc::SYS_setsockopt),
                [0, 6, 1, 0, 0, 0]
            ),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(
                &allowed,
                x86_64,
                nr(libc::SYS_setsockopt),
                [0, 6, 2, 0, 0, 0]
            ),
            libc::SECCOMP_RET_TRAP
        );
        assert_eq!(
            run(&allowed, 0x4000_0003, nr(libc::SYS_futex), [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn an_unconditional_entry_stays_unconditional() {
        let mut r = Rules::default();
        r.allow(&[libc::SYS_read])
            .allow_arg(libc::SYS_read, 0, &[1]);
        assert!(r.allows_unconditionally(libc::SYS_read));
        r.allow_arg(libc::SYS_ioctl, 1, &[1, 2])
            .allow(&[libc::SYS_ioctl]);
        assert!(r.allows_unconditionally(libc::SYS_ioctl));
        assert_eq!(r.len(), 2);
    }
}
