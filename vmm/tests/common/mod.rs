//! Helpers for the tests that run the `vmm` binary: the tiny guests and images (in [`images`],
//! shared with the unit tests of the boot code), scratch directories, running `vmm`, and reading
//! its threads' CPU time.

#![allow(dead_code)]

mod images;

pub use images::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory named after `test`.
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        Self(dir)
    }

    /// Writes `bytes` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("temp dir is writable");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `vmm` binary under test.
pub fn vmm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `vmm` with `args` (and the kernel at `kernel`, if any) to completion.
pub fn run_vmm(kernel: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = vmm();
    if let Some(k) = kernel {
        cmd.arg("-kernel").arg(k);
    }
    cmd.args(args).output().expect("vmm runs")
}

/// The running VM, killed if the test fails before it ends it.
pub struct Vm(pub Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Nanoseconds thread `tid` of process `pid` has run.
pub fn cpu_ns(pid: u32, tid: &str) -> u64 {
    schedstat(pid, tid).0
}

/// What `/proc/PID/task/TID/schedstat` says of thread `tid`: nanoseconds run, and how many times
/// it was put on a CPU (each wake-up of a thread that sleeps between events).
pub fn schedstat(pid: u32, tid: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .expect("schedstat readable");
    let fields: Vec<u64> = stat
        .split_whitespace()
        .map(|n| n.parse().expect("schedstat holds numbers"))
        .collect();
    match fields[..] {
        [run, _wait, slices] => (run, slices),
        _ => panic!("schedstat has three fields: {stat}"),
    }
}

/// The thread id of the thread named `name` in process `pid`.
pub fn thread_named(pid: u32, name: &str) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir readable")
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| panic!("no thread {name}"))
}
