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

/// The lines `vm` prints on its standard output (piped), read on a thread of their own.
pub fn console_lines(vm: &mut Vm) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = vm.0.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line of `lines` (from [`console_lines`]) within `timeout`; if none comes, ends `vm`
/// and panics with what it said on its standard error (piped), `what` naming the line awaited.
pub fn next_line(
    lines: &std::sync::mpsc::Receiver<String>,
    vm: &mut Vm,
    timeout: std::time::Duration,
    what: &str,
) -> String {
    use std::io::Read;
    let Ok(line) = lines.recv_timeout(timeout) else {
        let _ = vm.0.kill();
        let _ = vm.0.wait();
        let mut stderr = String::new();
        if let Some(mut e) = vm.0.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        panic!("{what}: nothing from the guest; vmm said: {stderr}")
    };
    line
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

/// The size in KiB of the stack mapping of each thread of `pid` but the main one, by thread name,
/// for the threads waiting in a system call (`/proc/PID/task/TID/syscall` gives their stack
/// pointer then), as `/proc/PID/smaps` sizes the mapping holding that pointer.
pub fn thread_stacks_kib(pid: u32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps readable");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let mut mappings = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            if let (Some(a), Some(b)) = (hex(a), hex(b)) {
                mappings.push(a..b);
            }
        }
    }
    let mut stacks = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir readable") {
        let task = task.expect("task entry");
        if task.file_name().to_string_lossy() == pid.to_string() {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let call = read("syscall");
        let words: Vec<&str> = call.split_whitespace().collect();
        let Some(sp) = words
            .get(7)
            .filter(|_| words.len() == 9)
            .and_then(|w| hex(w))
        else {
            continue;
        };
        if let Some(m) = mappings.iter().find(|m| m.contains(&sp)) {
            stacks.push((read("comm").trim_end().to_owned(), (m.end - m.start) >> 10));
        }
    }
    stacks
}

/// Guest code (64-bit, for the tiny guests' page tables) that maps the first virtio-mmio
/// transport (0xd0000000, through a new page directory at 0xc000 for the 3-4 GiB range) into
/// `%rbx` and brings its device to FEATURES_OK with VERSION_1 alone (status 0, 1, 3; feature
/// words 1 and 0; status 0xb). The code after it sets up queues and says DRIVER_OK.
pub fn virtio_mmio_prologue() -> Vec<u8> {
    vec![
        0xc7, 0x04, 0x25, 0x00, 0xc4, 0x00, 0x00, 0x83, 0x00, 0x00,
        0xd0, // movl $0xd0000083,0xc400
        0xc7, 0x04, 0x25, 0x04, 0xc4, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0xc404
        0x48, 0xc7, 0x04, 0x25, 0x18, 0xa0, 0x00, 0x00, 0x03, 0xc0, 0x00,
        0x00, // movq $0xc003,0xa018
        0x0f, 0x20, 0xd8, // mov %cr3,%rax
        0x0f, 0x22, 0xd8, // mov %rax,%cr3
        0xbb, 0x00, 0x00, 0x00, 0xd0, // mov $0xd0000000,%ebx
        0xc7, 0x43, 0x70, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x70(%rbx)
        0xc7, 0x43, 0x70, 0x01, 0x00, 0x00, 0x00, // movl $0x1,0x70(%rbx)
        0xc7, 0x43, 0x70, 0x03, 0x00, 0x00, 0x00, // movl $0x3,0x70(%rbx)
        0xc7, 0x43, 0x24, 0x01, 0x00, 0x00, 0x00, // movl $0x1,0x24(%rbx)
        0xc7, 0x43, 0x20, 0x01, 0x00, 0x00, 0x00, // movl $0x1,0x20(%rbx)
        0xc7, 0x43, 0x24, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x24(%rbx)
        0xc7, 0x43, 0x20, 0x00, 0x00, 0x00, 0x00, // movl $0x0,0x20(%rbx)
        0xc7, 0x43, 0x70, 0x0b, 0x00, 0x00, 0x00, // movl $0xb,0x70(%rbx)
    ]
}

/// What the first 8 bytes of each sector of a [`tagged_disk`] hold: this, or'ed with the
/// sector's number.
pub const SECTOR_TAG: u64 = 0x5345_4354 << 32;

/// A raw disk of `sectors` sectors, each starting with its tag.
pub fn tagged_disk(sectors: u64) -> Vec<u8> {
    let mut disk = vec![0u8; usize::try_from(sectors).expect("a test's disk fits in memory") * 512];
    for (s, sector) in (0..).zip(disk.chunks_mut(512)) {
        sector[..8].copy_from_slice(&(SECTOR_TAG | s).to_le_bytes());
    }
    disk
}
