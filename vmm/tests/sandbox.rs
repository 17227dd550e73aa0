//! The seccomp sandbox of the real `vmm` binary with a tiny guest on the local `/dev/kvm`: each
//! kind of thread (main, signals, vCPU, iothread, disk worker), made to attempt a call outside its
//! filter through the test hook (`VMM_SANDBOX_TEST_VIOLATION`), kills the process with a line
//! naming the thread and the call; with `-sandbox off` the same attempt goes through and the
//! guest runs to its end, so the deaths come from the filters.
//!
//! Landlock (on this host's kernel, which has it: the tests fail where it has not): the main
//! thread, asked by the test hook (`VMM_SANDBOX_TEST_OPEN`) to open files after its sandbox is
//! on, opens the chain's images as the disk uses them and nothing outside, unless the sandbox is
//! off.

mod common;

use std::path::Path;
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

/// Runs the reset guest on a qcow2 overlay (`top.qcow2`) over a raw base (`base.raw`), both in
/// `dir`, with the Landlock test hook asking for `opens` (`r` or `w`, a path) and `extra` flags;
/// checks that the guest ran to its end and returns vmm's stderr.
fn open_under_landlock(dir: &Scratch, opens: &[(&str, &Path)], extra: &[&str]) -> String {
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let base = dir.file("base.raw", &vec![0u8; 1 << 20]);
    let top = dir.0.join("top.qcow2");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .status()
        .expect("qemu-img is installed (ci/setup)");
    assert!(created.success());
    let drive = format!("file={},format=qcow2,if=none,id=d0", top.display());
    let hook = opens
        .iter()
        .map(|(mode, path)| format!("{mode}:{}", path.display()))
        .collect::<Vec<_>>()
        .join("|");
    let out = vmm()
        .env("VMM_SANDBOX_TEST_OPEN", hook)
        .arg("-kernel")
        .arg(&kernel)
        .args(["-m", "16M", "-drive", &drive])
        .args(["-device", "virtio-blk-device,drive=d0,id=d0"])
        .args(extra)
        .output()
        .expect("vmm runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(0), "long mode guest, vCPUs: 1, RSDP: y\n"),
        "{stderr}"
    );
    stderr
}

/// The hook's line for one open.
fn opened(mode: &str, path: &Path, outcome: &str) -> String {
    format!(
        "vmm: sandbox: test open ({mode}) of {}: {outcome}\n",
        path.display()
    )
}

const DENIED: &str = "Permission denied (os error 13)";

#[test]
fn landlock_limits_the_main_thread_to_the_chain_and_its_writable_top() {
    let dir = Scratch::new("landlock-chain");
    let elsewhere = Scratch::new("landlock-chain-elsewhere");
    let secret = elsewhere.file("secret", b"not for the guest");
    let (base, top, beside) = (
        dir.0.join("base.raw"),
        dir.0.join("top.qcow2"),
        dir.0.join("beside.qcow2"),
    );
    let opens = [
        ("r", secret.as_path()),
        ("r", base.as_path()),
        ("w", base.as_path()),
        ("w", top.as_path()),
        ("w", beside.as_path()),
    ];
    let stderr = open_under_landlock(&dir, &opens, &[]);
    for expected in [
        opened("r", &secret, DENIED),
        opened("r", &base, "ok"),
        opened("w", &base, DENIED),
        opened("w", &top, "ok"),
        opened("w", &beside, DENIED),
    ] {
        assert!(stderr.contains(&expected), "{expected}: {stderr}");
    }
    assert!(!beside.exists());
}

#[test]
fn with_a_monitor_files_beside_the_chain_may_be_made_and_written() {
    let dir = Scratch::new("landlock-monitor");
    let elsewhere = Scratch::new("landlock-monitor-elsewhere");
    let secret = elsewhere.file("secret", b"not for the guest");
    let (base, beside, socket) = (
        dir.0.join("base.raw"),
        dir.0.join("beside.qcow2"),
        dir.0.join("qmp.sock"),
    );
    // The pidfile's directory holds no image: its removal at exit needs its own rule.
    let pidfile = elsewhere.0.join("vmm.pid");
    let qmp = format!("unix:{},server=on,wait=off", socket.display());
    let pid = pidfile.to_str().expect("utf-8 path");
    let opens = [
        ("r", secret.as_path()),
        ("w", base.as_path()),
        ("w", beside.as_path()),
    ];
    let stderr = open_under_landlock(&dir, &opens, &["-qmp", &qmp, "-pidfile", pid]);
    for expected in [
        opened("r", &secret, DENIED),
        opened("w", &base, "ok"),
        opened("w", &beside, "ok"),
    ] {
        assert!(stderr.contains(&expected), "{expected}: {stderr}");
    }
    assert!(beside.exists());
    assert!(!socket.exists(), "the socket is removed at exit: {stderr}");
    assert!(
        !pidfile.exists(),
        "the pidfile is removed at exit: {stderr}"
    );
}

#[test]
fn without_the_sandbox_landlock_is_off() {
    let dir = Scratch::new("landlock-off");
    let elsewhere = Scratch::new("landlock-off-elsewhere");
    let secret = elsewhere.file("secret", b"readable without the sandbox");
    let base = dir.0.join("base.raw");
    let opens = [("r", secret.as_path()), ("w", base.as_path())];
    let stderr = open_under_landlock(&dir, &opens, &["-sandbox", "off"]);
    for expected in [opened("r", &secret, "ok"), opened("w", &base, "ok")] {
        assert!(stderr.contains(&expected), "{expected}: {stderr}");
    }
}
