//! Helpers for the tests that run the `vmm` binary: the tiny guests and images (in [`images`],
//! shared with the unit tests of the boot code), scratch directories, and running `vmm`.

#![allow(dead_code)]

mod images;

pub use images::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
