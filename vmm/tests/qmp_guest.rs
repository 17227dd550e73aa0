//! The QMP monitor of the real `vmm` binary with tiny guests on the local `/dev/kvm`, driven by
//! QEMU's Python client (`qemu.qmp`, installed by `ci/qmp-venv`, which `ci/setup` runs):
//! `-S` and `cont`, `stop` freezing the guest, the queries, `quit`, the `SHUTDOWN` event of a guest
//! power-off and of SIGTERM, `wait=on` holding start-up until a client connects, and live disk
//! changes (snapshots, also by relative names in a subdirectory, where block jobs run too,
//! `block_resize`,
//! `query-named-block-nodes`) beside QEMU 10. The scenarios
//! are in `tests/qmp/guest_client.py`, block jobs beside QEMU 10 (and jobs whose writes fail,
//! `on-error`) in `tests/qmp/jobs_client.py`,
//! the README's chain walk-through (`ci/chain-ops`) in `tests/qmp/chain_ops_client.py`.

mod common;

use std::path::{Path, PathBuf};

use common::{bzimage, pvh_elf, pvh_poweroff_guest, Scratch};

/// 64-bit: writes 'x' to COM1, spins a while, and again, forever.
fn streaming_guest() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, //             mov $0x3f8, %dx
        0xb0, 0x78, //                         1: mov $'x', %al
        0xee, //                               out %al, %dx
        0xb9, 0x00, 0x08, 0x00, 0x00, //       mov $0x800, %ecx
        0xf3, 0x90, //                         2: pause
        0xe2, 0xfc, //                         loop 2b
        0xeb, 0xf2, //                         jmp 1b
    ]
}

/// The Python of the venv `ci/qmp-venv` makes.
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/qmp/bin/python3");
    assert!(
        python.exists(),
        "{} is missing: run ci/qmp-venv (ci/setup runs it)",
        python.display()
    );
    python
}

fn run_scenario(scenario: &str, kernel: &Path, dir: &Scratch) {
    run_script("guest_client.py", scenario, kernel, dir);
}

fn run_script(script: &str, scenario: &str, kernel: &Path, dir: &Scratch) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp")
        .join(script);
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(scenario)
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .arg(kernel)
        .arg(dir.0.join("qmp.sock"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    println!("{stdout}");
}

#[test]
fn qemu_qmp_drives_a_guest_through_its_lifecycle() {
    let dir = Scratch::new("qmp-lifecycle");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("lifecycle", &kernel, &dir);
}

#[test]
fn guest_power_off_reaches_the_monitor() {
    let dir = Scratch::new("qmp-poweroff");
    let kernel = dir.file("vmlinux", &pvh_elf(&pvh_poweroff_guest(), true));
    run_scenario("poweroff", &kernel, &dir);
}

#[test]
fn sigterm_reaches_the_monitor() {
    let dir = Scratch::new("qmp-signal");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("signal", &kernel, &dir);
}

#[test]
fn wait_on_holds_the_guest_until_a_client_connects() {
    let dir = Scratch::new("qmp-wait");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("wait", &kernel, &dir);
}

#[test]
fn disks_on_an_iothread_and_the_main_loop_in_the_monitor() {
    let dir = Scratch::new("qmp-disks");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("disks", &kernel, &dir);
}

#[test]
fn snapshots_of_a_running_guest_s_disks_answer_as_qemu_s() {
    let dir = Scratch::new("qmp-snapshot");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("snapshot", &kernel, &dir);
}

#[test]
fn snapshots_with_relative_names_in_a_subdirectory_answer_as_qemu_s() {
    let dir = Scratch::new("qmp-relative");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("relative", &kernel, &dir);
}

#[test]
fn jobs_on_a_chain_with_relative_names_in_a_subdirectory_answer_as_qemu_s() {
    let dir = Scratch::new("qmp-relative-jobs");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("relative-jobs", &kernel, &dir);
}

#[test]
fn block_resize_and_named_nodes_answer_as_qemu_s() {
    let dir = Scratch::new("qmp-resize");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_scenario("resize", &kernel, &dir);
}

#[test]
fn block_jobs_on_a_running_guest_s_disks_answer_as_qemu_s() {
    let dir = Scratch::new("qmp-jobs");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_script("jobs_client.py", "jobs", &kernel, &dir);
}

#[test]
fn block_jobs_whose_writes_fail_answer_as_qemu_s() {
    let dir = Scratch::new("qmp-onerror");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_script("jobs_client.py", "onerror", &kernel, &dir);
}

#[test]
fn the_readme_s_chain_walk_through_reshapes_a_running_guest_s_disk() {
    let dir = Scratch::new("qmp-chain-ops");
    let kernel = dir.file("bzImage", &bzimage(&streaming_guest()));
    run_script("chain_ops_client.py", "chain-ops", &kernel, &dir);
}
