//! The seccomp sandbox of the real `vmm` binary with a tiny guest on the local `/dev/kvm`: each
//! kind of thread (main, signals, vCPU, iothread, disk worker), made to attempt a call outside its
//! filter through the test hook (`VMM_SANDBOX_TEST_VIOLATION`), kills the process with a line
//! naming the thread and the call; with `-sandbox off` the same attempt goes through and the
//! guest runs to its end, so the deaths come from the filters.

mod common;

use std::process::Output;

use common::{bzimage, long_mode_reset_guest, vmm, Scratch};

/// The exit status after a violation: 128 + SIGSYS.
const VIOLATION_STATUS: i32 = 159;

/// Runs the reset guest with a disk on an iothread (so that every kind of thread exists), the
/// test hook set to `kind`, and `extra` flags.
fn run_with_violation(dir: &Scratch, kind: &str, extra: &[&str]) -> Output {
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let disk = dir.file("disk.raw", &vec![0u8; 1 << 20]);
    let drive = format!("file={},format=raw,if=none,id=d0", disk.display());
    vmm()
        .env("VMM_SANDBOX_TEST_VIOLATION", kind)
        .arg("-kernel")
        .arg(&kernel)
        .args(["-m", "16M", "-object", "iothread,id=io0", "-drive", &drive])
        .args(["-device", "virtio-blk-device,drive=d0,id=d0,iothread=io0"])
        .args(extra)
        .output()
        .expect("vmm runs")
}

/// Checks that the thread `thread` of kind `kind` died on its forbidden call.
fn dies_naming(kind: &str, thread: &str) {
    let dir = Scratch::new(&format!("sandbox-{kind}"));
    let out = run_with_violation(&dir, kind, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(VIOLATION_STATUS),
        "{kind}: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "vmm: sandbox: thread {thread} made system call socket (41, arguments 0x2, 0x1), which its filter forbids\n"
        )),
        "{kind}: {stderr}"
    );
}

#[test]
fn the_main_thread_dies_on_a_forbidden_call() {
    dies_naming("main", "main");
}

#[test]
fn the_signal_thread_dies_on_a_forbidden_call() {
    dies_naming("signals", "signals");
}

#[test]
fn a_vcpu_thread_dies_on_a_forbidden_call() {
    dies_naming("vcpu", "vcpu0");
}

#[test]
fn an_iothread_dies_on_a_forbidden_call() {
    dies_naming("iothread", "io0");
}

#[test]
fn a_disk_worker_dies_on_a_forbidden_call() {
    dies_naming("worker", "d0-io0");
}

#[test]
fn without_the_sandbox_the_same_calls_go_through() {
    for kind in ["main", "signals", "vcpu", "iothread", "worker"] {
        let dir = Scratch::new(&format!("sandbox-off-{kind}"));
        let out = run_with_violation(&dir, kind, &["-sandbox", "off"]);
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).as_ref()
            ),
            (Some(0), "long mode guest, vCPUs: 1, RSDP: y\n"),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_sub_option_that_allows_calls_is_refused() {
    let out = vmm()
        .args(["-kernel", "k", "-sandbox", "on,spawn=allow"])
        .output()
        .expect("vmm runs");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vmm: -sandbox spawn=allow is not supported: vmm's filters always deny that group of calls (only spawn=deny)\n"
    );
}

#[test]
fn an_unknown_test_hook_kind_is_refused() {
    let dir = Scratch::new("sandbox-bad-kind");
    let out = run_with_violation(&dir, "console", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("VMM_SANDBOX_TEST_VIOLATION=console names no kind of thread"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
