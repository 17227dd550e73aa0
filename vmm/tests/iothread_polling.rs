//! Adaptive polling in a real iothread of the `vmm` binary, with a tiny guest on the local
//! `/dev/kvm` that drives a virtio-blk disk on that iothread itself (virtio-mmio, one queue, one
//! request at a time): the iothread serves every read correctly whether it polls (QEMU's default
//! window) or never does (`poll-max-ns=0`, given in QEMU's JSON form), and once the guest is idle
//! the iothread uses no CPU in either case: its CPU time over an idle second, from
//! `/proc/PID/task/TID/schedstat`, is a small fraction of that second (a spinning loop would show
//! a large one, whatever the machine's load). The running VMM's memory is looked at too: no
//! thread's stack can be backed by a huge page, and its threads (vCPU, iothread, disk worker,
//! signal thread, all of which allocate) share glibc's main allocator arena and at most one more.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{bzimage, console_lines, cpu_ns, next_line, thread_named, vmm, Scratch, Vm};

/// Sectors the guest reads.
const SECTORS: u64 = 64;
/// The most of an idle second an idle iothread may spend on a CPU.
const IDLE_CPU_MAX: f64 = 0.05;

/// 64-bit: maps the first virtio-mmio transport (0xd0000000, through a new page directory at
/// 0xc000 for the 3-4 GiB range), sets up its disk's queue 0 (8 entries; rings at 0x300000),
/// reads sectors 0 to 63 one request at a time, polling the used ring, and checks that each
/// succeeded and starts with its tag; says "64 sectors read" (or "bad sector") on COM1, then
/// halts with interrupts off: an idle guest.
fn virtio_blk_reader() -> Vec<u8> {
    let mut code = common::virtio_mmio_prologue();
    code.extend_from_slice(&[
        0xc7, 0x43, 0x30, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x30(%rbx)
        0xc7, 0x43, 0x38, 0x08, 0x00, 0x00, 0x00, // movl $0x8,0x38(%rbx)
        0xc7, 0x83, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30,
        0x00, // movl $0x300000,0x80(%rbx)
        0xc7, 0x83, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x84(%rbx)
        0xc7, 0x83, 0x90, 0x00, 0x00, 0x00, 0x00, 0x10, 0x30,
        0x00, // movl $0x301000,0x90(%rbx)
        0xc7, 0x83, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x94(%rbx)
        0xc7, 0x83, 0xa0, 0x00, 0x00, 0x00, 0x00, 0x20, 0x30,
        0x00, // movl $0x302000,0xa0(%rbx)
        0xc7, 0x83, 0xa4, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0xa4(%rbx)
        0xc7, 0x43, 0x44, 0x01, 0x00, 0x00, 0x00, // movl $0x1,0x44(%rbx)
        0xc7, 0x43, 0x70, 0x0f, 0x00, 0x00, 0x00, // movl $0xf,0x70(%rbx)
        0x48, 0xc7, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x00, 0x30, 0x30,
        0x00, // movq $0x303000,0x300000
        0xc7, 0x04, 0x25, 0x08, 0x00, 0x30, 0x00, 0x10, 0x00, 0x00,
        0x00, // movl $0x10,0x300008
        0xc7, 0x04, 0x25, 0x0c, 0x00, 0x30, 0x00, 0x01, 0x00, 0x01,
        0x00, // movl $0x10001,0x30000c
        0x48, 0xc7, 0x04, 0x25, 0x10, 0x00, 0x30, 0x00, 0x00, 0x40, 0x30,
        0x00, // movq $0x304000,0x300010
        0xc7, 0x04, 0x25, 0x18, 0x00, 0x30, 0x00, 0x00, 0x02, 0x00,
        0x00, // movl $0x200,0x300018
        0xc7, 0x04, 0x25, 0x1c, 0x00, 0x30, 0x00, 0x03, 0x00, 0x02,
        0x00, // movl $0x20003,0x30001c
        0x48, 0xc7, 0x04, 0x25, 0x20, 0x00, 0x30, 0x00, 0x10, 0x30, 0x30,
        0x00, // movq $0x303010,0x300020
        0xc7, 0x04, 0x25, 0x28, 0x00, 0x30, 0x00, 0x01, 0x00, 0x00,
        0x00, // movl $0x1,0x300028
        0xc7, 0x04, 0x25, 0x2c, 0x00, 0x30, 0x00, 0x02, 0x00, 0x00,
        0x00, // movl $0x2,0x30002c
        0xc7, 0x04, 0x25, 0x00, 0x30, 0x30, 0x00, 0x00, 0x00, 0x00,
        0x00, // movl $0x0,0x303000
        0xc7, 0x04, 0x25, 0x04, 0x30, 0x30, 0x00, 0x00, 0x00, 0x00,
        0x00, // movl $0x0,0x303004
        0x31, 0xc9, // xor %ecx,%ecx
        0x48, 0x89, 0x0c, 0x25, 0x08, 0x30, 0x30, 0x00, // next: mov %rcx,0x303008
        0xc6, 0x04, 0x25, 0x10, 0x30, 0x30, 0x00, 0xff, // movb $0xff,0x303010
        0x48, 0xc7, 0x04, 0x25, 0x00, 0x40, 0x30, 0x00, 0x00, 0x00, 0x00,
        0x00, // movq $0x0,0x304000
        0x89, 0xc8, // mov %ecx,%eax
        0x83, 0xe0, 0x07, // and $0x7,%eax
        0x66, 0xc7, 0x04, 0x45, 0x04, 0x10, 0x30, 0x00, 0x00,
        0x00, // movw $0x0,0x301004(,%rax,2)
        0x8d, 0x51, 0x01, // lea 0x1(%rcx),%edx
        0x0f, 0xae, 0xf0, // mfence
        0x66, 0x89, 0x14, 0x25, 0x02, 0x10, 0x30, 0x00, // mov %dx,0x301002
        0x0f, 0xae, 0xf0, // mfence
        0xc7, 0x43, 0x50, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x50(%rbx)
        0xf3, 0x90, // wait: pause
        0x66, 0x39, 0x14, 0x25, 0x02, 0x20, 0x30, 0x00, // cmp %dx,0x302002
        0x75, 0xf4, // jne 17e <wait>
        0x80, 0x3c, 0x25, 0x10, 0x30, 0x30, 0x00, 0x00, // cmpb $0x0,0x303010
        0x75, 0x27, // jne 1bb <bad>
        0x48, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x54, 0x43, 0x45,
        0x53, // movabs $0x5345435400000000,%rax
        0x48, 0x09, 0xc8, // or %rcx,%rax
        0x48, 0x39, 0x04, 0x25, 0x00, 0x40, 0x30, 0x00, // cmp %rax,0x304000
        0x75, 0x10, // jne 1bb <bad>
        0xff, 0xc1, // inc %ecx
        0x83, 0xf9, 0x40, // cmp $0x40,%ecx
        0x75, 0x89, // jne 13b <next>
        0x48, 0x8d, 0x35, 0x19, 0x00, 0x00, 0x00, // lea 0x19(%rip),%rsi
        0xeb, 0x07, // jmp 1c2 <print>
        0x48, 0x8d, 0x35, 0x21, 0x00, 0x00, 0x00, // bad: lea 0x21(%rip),%rsi
        0x66, 0xba, 0xf8, 0x03, // print: mov $0x3f8,%dx
        0xac, // lods %ds:(%rsi),%al
        0x84, 0xc0, // test %al,%al
        0x74, 0x03, // je 1ce <idle>
        0xee, // out %al,(%dx)
        0xeb, 0xf8, // jmp 1c6 <print+0x4>
        0xfa, // idle: cli
        0xf4, // hlt
        0xeb, 0xfc, // jmp 1ce <idle>
    ]);
    code.extend_from_slice(b"64 sectors read\n\0bad sector\n\0"); // ok, fail
    code
}

/// Runs the reader guest with its disk on the iothread `object` makes, checks its reads, and
/// returns the share of an idle second the iothread spent on a CPU.
fn idle_cpu_share(test: &str, object: &str) -> f64 {
    let dir = Scratch::new(test);
    let kernel = dir.file("bzImage", &bzimage(&virtio_blk_reader()));
    let disk = dir.file("disk.raw", &common::tagged_disk(SECTORS));
    let child = vmm()
        .arg("-kernel")
        .arg(&kernel)
        .args(["-m", "16M", "-object", object, "-drive"])
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .args([
            "-device",
            r#"{"driver": "virtio-blk-device", "drive": "d0", "iothread": "io0"}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm runs");
    let mut vm = Vm(child);
    let lines = console_lines(&mut vm);
    let line = next_line(&lines, &mut vm, Duration::from_secs(30), object);
    assert_eq!(line, "64 sectors read", "{object}");

    let pid = vm.0.id();
    let tid = thread_named(pid, "io0");
    let (before, start) = (cpu_ns(pid, &tid), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (after, wall) = (cpu_ns(pid, &tid), start.elapsed());
    no_stack_spans_a_huge_page(pid, object);
    at_most_one_arena_besides_the_main_one(pid, object);
    let pid = i32::try_from(pid).expect("pids fit in an i32");
    // SAFETY: kill only sends a signal, to our own child.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0, "{}", std::io::Error::last_os_error());
    let status = vm.0.wait().expect("vmm ends");
    assert!(status.success(), "{object}: vmm ended with {status}");
    Duration::from_nanos(after.saturating_sub(before)).as_secs_f64() / wall.as_secs_f64()
}

/// No thread of the running VMM has a stack a 2 MiB huge page can back (with transparent huge
/// pages on `always`, a 2 MiB stack may be backed whole); the idle iothread and the halted vCPU
/// are among those checked.
fn no_stack_spans_a_huge_page(pid: u32, object: &str) {
    let stacks = common::thread_stacks_kib(pid);
    for thread in ["io0", "vcpu0", "signals"] {
        assert!(
            stacks.iter().any(|(name, _)| name == thread),
            "{object}: no stack found for {thread}: {stacks:?}"
        );
    }
    for (name, kib) in &stacks {
        assert!(*kib < 2048, "{object}: {name}'s stack is {kib} KiB");
    }
}

/// glibc's arenas other than the main one are heaps reserved whole on a boundary of their size
/// (`HEAP_MAX_SIZE`, 64 MiB on 64-bit hosts): the part in use, then the inaccessible rest.
const ARENA_RESERVATION: u64 = 64 << 20;

/// The VMM's threads share the main allocator arena and at most one more
/// (`vmm/src/process.rs`): `/proc/PID/maps` shows at most one arena's reservation.
fn at_most_one_arena_besides_the_main_one(pid: u32, object: &str) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let ranges: Vec<(u64, u64, bool)> = maps
        .lines()
        .filter(|line| line.split_whitespace().count() == 5)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (start, end) = words.next()?.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some((start, end, words.next()?.starts_with("---")))
        })
        .collect();
    let arenas = ranges
        .windows(2)
        .filter(|pair| {
            let ((start, end, none), (next_start, next_end, next_none)) = (pair[0], pair[1]);
            start % ARENA_RESERVATION == 0
                && !none
                && next_none
                && next_start == end
                && next_end - start == ARENA_RESERVATION
        })
        .count();
    assert!(
        arenas <= 1,
        "{object}: {arenas} arenas besides the main one:\n{maps}"
    );
}

#[test]
fn a_polling_iothread_serves_the_guest_and_sleeps_when_it_is_idle() {
    let share = idle_cpu_share("poll-default", "iothread,id=io0");
    assert!(
        share < IDLE_CPU_MAX,
        "idle iothread on a CPU {:.1}% of the time",
        share * 100.0
    );
}

#[test]
fn with_poll_max_ns_zero_the_iothread_serves_the_guest_and_never_spins() {
    let share = idle_cpu_share(
        "poll-off",
        r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": 0}"#,
    );
    assert!(
        share < IDLE_CPU_MAX,
        "idle iothread on a CPU {:.1}% of the time",
        share * 100.0
    );
}
