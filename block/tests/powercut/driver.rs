//! Running a tool (ours or QEMU's) under the recorder.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use super::log;

/// The recorder library, built by `cargo build -p powercut` (`ci/unit` builds the workspace).
pub fn recorder() -> PathBuf {
    // The test binary is target/<profile>/deps/<name>; the library sits in that same folder.
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = deps.join("libpowercut.so");
    assert!(
        lib.exists(),
        "{} is missing: build the recorder with `cargo build -p powercut`",
        lib.display()
    );
    lib
}

/// Which engine writes the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `vmm-img io` / `vmm-img bench`.
    Ours,
    /// `qemu-io` / `qemu-img bench`: the control.
    Qemu,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Ours => "vmm-img",
            Tool::Qemu => "qemu",
        }
    }
}

/// A recording: every file under `dir` is logged to `log`.
#[derive(Debug)]
pub struct Recording {
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Recording {
    /// A command with the recorder preloaded, plus extra environment (fault injection).
    pub fn command(&self, program: &str, env: &[(&str, String)]) -> Command {
        let mut c = Command::new(program);
        c.env("LD_PRELOAD", recorder())
            .env("POWERCUT_LOG", &self.log)
            .env("POWERCUT_DIR", &self.dir);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }
}

/// How a batch run ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stderr: String,
    /// Batches whose flush returned successfully.
    pub flushed: usize,
    /// A command reported a failure (qemu-io goes on after one; ours stops).
    pub failed: bool,
}

/// Reads the tool's output up to its next prompt (it then waits for a command); `None` at the
/// end of the output. Returns what it printed before the prompt.
fn until_prompt(out: &mut impl Read, prompt: &[u8]) -> Option<String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(prompt) {
        if out.read(&mut byte).unwrap() == 0 {
            return None;
        }
        got.push(byte[0]);
    }
    got.truncate(got.len() - prompt.len());
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// Runs batches of qemu-io commands (each ending with `flush`) on a qcow2 image through the
/// tool's standard input, one command per prompt, logging a marker before each batch's first
/// command (`B k`), before its flush is sent (`S k`: the batch's commands have returned) and
/// once its flush returned (`F k`). With `image_opts`, the image is opened with
/// `--image-opts driver=qcow2,file.filename=IMAGE,IMAGE_OPTS` (qemu-io's form) instead of `-f
/// qcow2 IMAGE`; with `copy_on_read`, with `-C`.
pub fn run_batches(
    tool: Tool,
    rec: &Recording,
    image: &Path,
    image_opts: Option<&str>,
    copy_on_read: bool,
    batches: &[Vec<String>],
    env: &[(&str, String)],
) -> Outcome {
    let (mut cmd, prompt) = match tool {
        Tool::Ours => {
            let mut c = rec.command(env!("CARGO_BIN_EXE_vmm-img"), env);
            c.arg("io");
            (c, "vmm-img> ")
        }
        Tool::Qemu => (rec.command("qemu-io", env), "qemu-io> "),
    };
    if copy_on_read {
        cmd.arg("-C");
    }
    match image_opts {
        None => cmd.args(["-f", "qcow2"]).arg(image),
        Some(opts) => cmd.arg("--image-opts").arg(format!(
            "driver=qcow2,file.filename={},{opts}",
            image.display()
        )),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} is required: {e}", tool.name()));
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let prompt = prompt.as_bytes();
    let (mut flushed, mut failed) = (0, false);
    'batches: for (k, cmds) in batches.iter().enumerate() {
        for (i, c) in cmds.iter().enumerate() {
            match until_prompt(&mut out, prompt) {
                Some(text) => failed |= text.contains("failed"),
                None => break 'batches,
            }
            if failed {
                break 'batches;
            }
            if i == 0 {
                log::mark(&rec.log, &format!("B {k}"));
            }
            if i + 1 == cmds.len() {
                log::mark(&rec.log, &format!("S {k}"));
            }
            if writeln!(stdin, "{c}").is_err() {
                break 'batches;
            }
        }
        // The next prompt: the flush returned.
        match until_prompt(&mut out, prompt) {
            Some(text) if !text.contains("failed") => {}
            _ => {
                failed = true;
                break;
            }
        }
        log::mark(&rec.log, &format!("F {k}"));
        flushed = k + 1;
        // Ask for the prompt again for the next batch's first command.
        if writeln!(stdin).is_err() {
            break;
        }
    }
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    failed |= rest.contains("failed");
    let status = child.wait().unwrap();
    Outcome {
        status,
        stderr: stderr.join().unwrap(),
        flushed,
        failed,
    }
}

/// Runs a whole tool command line under the recorder; panics when it fails.
pub fn run(rec: &Recording, program: &str, args: &[&str]) {
    let out = rec.command(program, &[]).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
