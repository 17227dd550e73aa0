//! The allow-lists and the groups of calls several kinds of thread share: what every thread
//! makes (locks, memory, its own exit, the SIGSYS handler's line), what a thread makes that
//! starts threads, and what a thread makes that runs a virtio-blk device's handlers.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

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

    /// Whether `nr` is allowed whatever its arguments.
    #[cfg(test)]
    pub fn allows_unconditionally(&self, nr: libc::c_long) -> bool {
        matches!(self.0.get(&nr), Some(None))
    }

    /// The BPF program: the listed calls are allowed, anything else traps (SIGSYS).
    pub fn compile(&self) -> Result<BpfProgram, BackendError> {
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

/// Makes glibc's allocator settle, on the main thread, what it would otherwise find out on a
/// sandboxed thread's first allocation in a new arena: how many arenas it may make (it reads
/// `/sys/devices/system/cpu/online` for that). The limit set is glibc's own default, 8 per CPU.
pub fn settle_malloc() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt takes two integers and changes only the allocator's tuning.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

#[cfg(test)]
mod tests {
    use super::*;

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
