//! A crash state opened read-write by the real `vmm`: started paused (`-S`) with the state as a
//! qcow2 drive on a virtio-blk device, asked `query-block` over QMP, told to `quit`. The guest
//! never runs; a tiny bzImage from the vmm's own tests (`vmm/tests/common/images.rs`) fills
//! `-kernel`. The caller checks the image with `qemu-img check` afterwards.

#[path = "../../../vmm/tests/common/images.rs"]
mod images;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long `vmm` may take to start, answer or exit.
const PATIENCE: Duration = Duration::from_secs(20);

/// The `vmm` binary of this build (`ci/unit` builds the workspace; alone: `cargo build -p vmm`).
pub fn binary() -> PathBuf {
    // The test binary is target/<profile>/deps/<name>; binaries sit in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let vmm = exe.parent().unwrap().parent().unwrap().join("vmm");
    assert!(
        vmm.exists(),
        "{} is missing: build it with `cargo build -p vmm`",
        vmm.display()
    );
    vmm
}

/// Kills the `vmm` if a check gives up on it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads the next QMP message that is not an event.
fn reply(r: &mut BufReader<UnixStream>) -> Result<Value, String> {
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err("the monitor closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the monitor: {e}")),
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// Negotiates, checks that `query-block` shows `d0` open read-write as qcow2, and sends `quit`.
fn converse(stream: UnixStream) -> Result<(), String> {
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    reply(&mut r)?; // The greeting.
    let mut ask = |cmd: &str| -> Result<Value, String> {
        writeln!(w, r#"{{"execute": "{cmd}"}}"#).map_err(|e| format!("{cmd}: {e}"))?;
        let v = reply(&mut r)?;
        v.get("return")
            .cloned()
            .ok_or_else(|| format!("{cmd}: {v}"))
    };
    ask("qmp_capabilities")?;
    let blocks = ask("query-block")?;
    let d0 = blocks
        .as_array()
        .and_then(|a| a.iter().find(|b| b["device"] == "d0"))
        .ok_or_else(|| format!("query-block has no d0: {blocks}"))?;
    let inserted = &d0["inserted"];
    if inserted["ro"] != false || inserted["drv"] != "qcow2" {
        return Err(format!(
            "query-block: d0 is not a read-write qcow2 drive: {d0}"
        ));
    }
    ask("quit").map(|_| ())
}

/// Starts `vmm` on `state` (in `dir`, which holds its backing files), checks that `query-block`
/// shows the drive open read-write, and quits it; `vmm` must exit 0.
pub fn open_read_write(state: &Path, dir: &Path) -> Result<(), String> {
    let kernel = dir.join("vmm-kernel");
    std::fs::write(&kernel, images::bzimage(&images::spin_guest())).unwrap();
    let sock = dir.join("vmm-qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(binary())
        .arg("-S")
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=d0",
            state.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-kernel")
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("vmm: {e}"))?;
    let mut vmm = Running(child);
    let stderr = |vmm: &mut Running| {
        let mut s = String::new();
        if let Some(mut e) = vmm.0.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s.trim().to_string()
    };
    let t0 = Instant::now();
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        if let Some(status) = vmm.0.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("vmm exited ({status}): {}", stderr(&mut vmm)));
        }
        if t0.elapsed() > PATIENCE {
            return Err("vmm's monitor never listened".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The monitor listens before the images are opened: a drive vmm refuses ends the
    // conversation, and then vmm's own error says why.
    if let Err(e) = converse(stream) {
        exited(&mut vmm);
        return Err(format!("{e}; vmm: {}", stderr(&mut vmm)));
    }
    match exited(&mut vmm) {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("vmm exited ({status}): {}", stderr(&mut vmm))),
        None => Err("vmm did not exit after quit".into()),
    }
}

/// Waits for `vmm` to exit, for a while.
fn exited(vmm: &mut Running) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(status)) = vmm.0.try_wait() {
            return Some(status);
        }
        if t0.elapsed() > PATIENCE {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
