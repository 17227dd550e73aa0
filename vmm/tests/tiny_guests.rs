//! Tiny hand-written guests on the local `/dev/kvm`, started by the `vmm` binary through its own
//! boot code: long mode through a bzImage, protected mode through PVH, each vCPU count's CPUID,
//! the zero page and `hvm_start_info`, the COM1 console, the i8042 reset and ACPI power-off, and
//! the ways a user ends a running VM (SIGTERM, SIGINT, Ctrl-A x).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    bzimage, echo_guest, emulation_failure_guest, long_mode_reset_guest, pci_probe_guest, pvh_elf,
    pvh_poweroff_guest, real_mode_reboot_guest, run_vmm, spin_guest, triple_fault_guest, vmm,
    Scratch,
};

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn long_mode_guest_writes_to_com1_and_resets_with_one_vcpu() {
    let dir = Scratch::new("lm1");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let out = run_vmm(Some(&kernel), &["-m", "16M", "-smp", "1"]);
    assert_eq!(
        stdout_of(&out),
        "long mode guest, vCPUs: 1, RSDP: y\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "a guest reset ends vmm with 0");
}

#[test]
fn long_mode_guest_sees_two_and_eight_vcpus_and_vmm_joins_the_waiting_ones() {
    let dir = Scratch::new("lm2");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    for cpus in ["2", "8"] {
        let start = Instant::now();
        let out = run_vmm(Some(&kernel), &["-m", "32", "-smp", cpus]);
        assert_eq!(
            stdout_of(&out),
            format!("long mode guest, vCPUs: {cpus}, RSDP: y\n")
        );
        assert_eq!(out.status.code(), Some(0));
        // The other vCPUs sit in wait-for-SIPI inside KVM_RUN; only a kick gets them out in time.
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn pvh_guest_gets_start_info_and_powers_off_through_acpi() {
    let dir = Scratch::new("pvh");
    let kernel = dir.file("vmlinux", &pvh_elf(&pvh_poweroff_guest(), true));
    let out = run_vmm(Some(&kernel), &["-m", "16", "-smp", "2", "-D"]);
    // -D without a file is a usage error; the real run follows.
    assert_eq!(out.status.code(), Some(1));
    let log = dir.0.join("debug.log");
    let out = run_vmm(
        Some(&kernel),
        &[
            "-m",
            "16",
            "-smp",
            "2",
            "-D",
            log.to_str().expect("utf-8 temp path"),
        ],
    );
    assert_eq!(stdout_of(&out), "PVH guest, start info: y\n");
    assert_eq!(out.status.code(), Some(0));
    let log = std::fs::read_to_string(&log).expect("debug log written");
    assert!(log.contains("GuestPowerOff"), "log: {log}");
}

#[test]
fn a_guest_finds_the_virtio_blk_pci_function_through_ecam_and_the_config_ports() {
    let dir = Scratch::new("pci");
    let kernel = dir.file("vmlinux", &pvh_elf(&pci_probe_guest(), true));
    let disk = dir.file("disk.raw", &vec![0; 1 << 20]);
    let drive = format!("file={},format=raw,if=none,id=d0", disk.display());
    let out = run_vmm(
        Some(&kernel),
        &[
            "-m",
            "16",
            "-smp",
            "2",
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,id=vd0",
        ],
    );
    let mut want = Vec::new();
    // Vendor 0x1af4 (virtio), device 0x1042 (modern virtio-blk) at 00:01.0 through ECAM; BAR 0's
    // size probe: 32 KiB, 64-bit memory (its low half); the same ids through the configuration
    // ports; with decoding on (the vCPU registers the queues' ioeventfds, within its sandbox)
    // and the BAR moved, two queues (one per vCPU) at the new place and nothing at the old.
    want.extend(0x1042_1af4u32.to_le_bytes());
    want.extend(0xffff_8004u32.to_le_bytes());
    want.extend(0x1042_1af4u32.to_le_bytes());
    want.extend(2u32.to_le_bytes());
    want.extend(0xffffu32.to_le_bytes());
    assert_eq!(
        out.stdout,
        want,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

/// Starts the spinning guest with stdin piped, and waits until it says it spins.
fn start_spinning(dir: &Scratch) -> std::process::Child {
    let kernel = dir.file("bzImage", &bzimage(&spin_guest()));
    let mut child = vmm()
        .arg("-kernel")
        .arg(kernel)
        .args(["-m", "16", "-smp", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("guest output");
    assert_eq!(line, "spinning\n");
    child
}

/// Waits for `child` to exit, at most `limit`.
fn wait_for(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait works") {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

fn signal_ends_vm_cleanly(signal: i32, name: &str) {
    let dir = Scratch::new(name);
    let mut child = start_spinning(&dir);
    let pid = i32::try_from(child.id()).expect("pid fits");
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));
}

#[test]
fn sigterm_ends_a_running_vm_cleanly() {
    signal_ends_vm_cleanly(libc::SIGTERM, "sigterm");
}

#[test]
fn sigint_ends_a_running_vm_cleanly() {
    signal_ends_vm_cleanly(libc::SIGINT, "sigint");
}

#[test]
fn ctrl_a_x_on_the_console_quits() {
    let dir = Scratch::new("ctrl-a-x");
    let mut child = start_spinning(&dir);
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(b"typed\x01x").expect("vmm reads stdin");
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));
}

#[test]
fn emulation_failure_is_reported_with_registers_in_the_debug_log() {
    let dir = Scratch::new("emulation");
    let kernel = dir.file("bzImage", &bzimage(&emulation_failure_guest()));
    let log = dir.0.join("debug.log");
    let out = run_vmm(
        Some(&kernel),
        &["-m", "16", "-D", log.to_str().expect("utf-8 temp path")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("vCPU 0 stopped: KVM emulation failure"),
        "{stderr}"
    );
    assert!(stderr.contains("rip 0x100211"), "{stderr}");
    let log = std::fs::read_to_string(&log).expect("debug log written");
    assert!(log.contains("vCPU 0 registers: kvm_regs {"), "{log}");
    assert!(log.contains("rax: 0x2000000"), "{log}");
}

#[test]
fn reboot_through_the_reset_vector_ends_the_vm() {
    let dir = Scratch::new("reset-vector");
    let kernel = dir.file("vmlinux", &pvh_elf(&real_mode_reboot_guest(), true));
    let log = dir.0.join("debug.log");
    let out = run_vmm(
        Some(&kernel),
        &["-m", "16", "-D", log.to_str().expect("utf-8 temp path")],
    );
    assert_eq!(out.status.code(), Some(0));
    let log = std::fs::read_to_string(&log).expect("debug log written");
    // The stub reset the machine through the i8042, not through a triple fault.
    assert!(
        log.contains("i8042: the guest pulsed the CPU reset line"),
        "{log}"
    );
    assert!(log.contains("VM exit requested: GuestReset"), "{log}");
}

#[test]
fn triple_fault_ends_the_vm_as_a_reset_with_registers_in_the_debug_log() {
    let dir = Scratch::new("triple-fault");
    let kernel = dir.file("bzImage", &bzimage(&triple_fault_guest()));
    let log = dir.0.join("debug.log");
    let out = run_vmm(
        Some(&kernel),
        &["-m", "16", "-D", log.to_str().expect("utf-8 temp path")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let log = std::fs::read_to_string(&log).expect("debug log written");
    // The ud2 right after the 7-byte lidt at startup_64 (0x100200).
    assert!(
        log.contains("vCPU 0: triple fault; the VM ends as on a reset at rip 0x100207"),
        "{log}"
    );
    assert!(log.contains("vCPU 0 registers: kvm_regs {"), "{log}");
    assert!(log.contains("VM exit requested: GuestReset"), "{log}");
}

/// The `c_lflag` of the terminal at `fd`.
fn local_flags(fd: i32) -> libc::tcflag_t {
    // SAFETY: termios is plain data, filled in by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t.c_lflag
}

#[test]
fn terminal_is_raw_while_running_and_restored_after() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = Scratch::new("pty");
    let kernel = dir.file("bzImage", &bzimage(&spin_guest()));
    let (mut master, mut slave) = (0, 0);
    // SAFETY: valid out-pointers; null name, termios and window size are allowed.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty");
    // SAFETY: openpty returned two new descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    use std::os::fd::AsRawFd;
    let cooked = local_flags(slave.as_raw_fd());
    assert_ne!(cooked & libc::ICANON, 0, "a new pty starts cooked");
    let mut child = vmm()
        .arg("-kernel")
        .arg(kernel)
        .args(["-m", "16"])
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("guest output");
    assert_eq!(line, "spinning\n");
    let raw = local_flags(slave.as_raw_fd());
    assert_eq!(
        raw & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw while running"
    );
    // Ctrl-C goes to the guest in raw mode; Ctrl-A x quits.
    let mut master = std::fs::File::from(master);
    master.write_all(b"\x03\x01x").expect("pty writable");
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));
    assert_eq!(local_flags(slave.as_raw_fd()), cooked, "restored on exit");
}

#[test]
fn console_input_larger_than_the_uart_fifo_reaches_the_guest_whole() {
    let dir = Scratch::new("echo");
    let kernel = dir.file("bzImage", &bzimage(&echo_guest()));
    let mut child = vmm()
        .arg("-kernel")
        .arg(kernel)
        .args(["-m", "16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    // Five times the 64-byte FIFO, in one write, then the guest's stop key.
    let typed: Vec<u8> = (0..320u32)
        .map(|i| b"abcdefghijklmnop"[(i % 16) as usize])
        .collect();
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(&typed).expect("vmm reads stdin");
    stdin.write_all(b"q").expect("vmm reads stdin");
    let out = child.wait_with_output().expect("vmm ends");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, typed);
}
