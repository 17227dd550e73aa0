//! The flags a pasted QEMU command line carries, as a user sees them on the local `/dev/kvm`
//! with the tiny guests: `-smp` topology in the CPUID the guest reads, `-smp 255`, `-name` and
//! `-pidfile` on the running process, and the lines `-qmp ...,server=on` (wait=on) and `-S`
//! without a monitor print instead of waiting silently.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{bzimage, long_mode_reset_guest, run_vmm, spin_guest, vmm, Scratch};

/// Waits for `child` to exit, at most `limit`, killing it after.
fn wait_for(child: &mut Child, limit: Duration) -> Option<i32> {
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

fn sigterm(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid fits");
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

/// Starts the spinning guest with `args`, stdout and stderr piped.
fn spawn_spinning(dir: &Scratch, args: &[&str]) -> Child {
    let kernel = dir.file("bzImage", &bzimage(&spin_guest()));
    vmm()
        .arg("-kernel")
        .arg(kernel)
        .args(["-m", "16"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts")
}

fn first_line(pipe: impl Read) -> String {
    let mut line = String::new();
    BufReader::new(pipe).read_line(&mut line).expect("output");
    line
}

/// What the long-mode guest prints: the logical processors per package from CPUID leaf 1
/// (EBX[23:16]) as one character, `'0' + count` (wrapping in a byte).
fn guest_count(smp: &str) -> (String, Option<i32>) {
    let dir = Scratch::new("smp");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let out = run_vmm(Some(&kernel), &["-m", "32", "-smp", smp]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        out.status.code(),
    )
}

#[test]
fn smp_topology_shows_in_the_cpuid_the_guest_reads() {
    // Logical processors per package: 2 sockets of 2 cores: 2; 2 sockets of 2 cores of 2
    // threads: 4; 3 cores: 3, in one socket or two.
    for (smp, per_package) in [
        ("4,sockets=2,cores=2", '2'),
        ("8,sockets=2,threads=2", '4'),
        ("sockets=1,cores=3,threads=1", '3'),
        // APIC ids 0, 1, 2, 4, 5, 6: KVM's vCPU ids have the same hole.
        ("6,sockets=2,cores=3", '3'),
    ] {
        let (out, code) = guest_count(smp);
        assert_eq!(
            (out.as_str(), code),
            (
                format!("long mode guest, vCPUs: {per_package}, RSDP: y\n").as_str(),
                Some(0)
            ),
            "-smp {smp}"
        );
    }
}

#[test]
fn smp_255_boots() {
    // '0' + 255 wraps to '/' in the guest's byte arithmetic.
    let (out, code) = guest_count("255");
    assert_eq!(
        (out.as_str(), code),
        ("long mode guest, vCPUs: /, RSDP: y\n", Some(0))
    );
}

#[test]
fn name_and_pidfile_apply_to_the_running_process() {
    let dir = Scratch::new("name-pid");
    let pidfile = dir.0.join("vmm.pid");
    let pidfile_arg = pidfile.to_str().expect("utf-8 temp path");
    let mut child = spawn_spinning(
        &dir,
        &[
            "-name",
            "guest1,process=vmm-named,debug-threads=on",
            "-pidfile",
            pidfile_arg,
        ],
    );
    assert_eq!(
        first_line(child.stdout.take().expect("piped")),
        "spinning\n"
    );
    let pid = child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("proc readable");
    assert_eq!(comm, "vmm-named\n");
    let written = std::fs::read_to_string(&pidfile).expect("pidfile written");
    assert_eq!(written, format!("{pid}\n"));
    sigterm(&child);
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));
    assert!(!pidfile.exists(), "pidfile removed at exit");
}

#[test]
fn qmp_wait_says_what_it_waits_for() {
    let dir = Scratch::new("qmp-wait");
    let sock = dir.0.join("qmp.sock");
    let sock_str = sock.to_str().expect("utf-8 temp path");
    let mut child = spawn_spinning(&dir, &["-qmp", &format!("unix:{sock_str},server=on")]);
    let line = first_line(child.stderr.take().expect("piped"));
    assert_eq!(
        line,
        format!(
            "vmm: -qmp unix:{sock_str},server=on: info: vmm waiting for connection on: \
             disconnected:unix:{sock_str},server=on\n"
        )
    );
    let _client = UnixStream::connect(&sock).expect("the socket listens");
    assert_eq!(
        first_line(child.stdout.take().expect("piped")),
        "spinning\n"
    );
    sigterm(&child);
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));

    let mut child = spawn_spinning(&dir, &["-qmp", "tcp:127.0.0.1:0,server=on"]);
    let line = first_line(child.stderr.take().expect("piped"));
    let port = line
        .strip_prefix("vmm: -qmp tcp:127.0.0.1:")
        .and_then(|rest| rest.split_once(','))
        .map(|(port, _)| port.to_owned())
        .expect("the bound address");
    assert_eq!(
        line,
        format!(
            "vmm: -qmp tcp:127.0.0.1:{port},server=on: info: vmm waiting for connection on: \
             disconnected:tcp:127.0.0.1:{port},server=on\n"
        )
    );
    let _client = std::net::TcpStream::connect(("127.0.0.1", port.parse().expect("a port")))
        .expect("the socket listens");
    assert_eq!(
        first_line(child.stdout.take().expect("piped")),
        "spinning\n"
    );
    sigterm(&child);
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));
}

#[test]
fn paused_without_a_monitor_warns_that_nothing_can_start_it() {
    let dir = Scratch::new("paused");
    let kernel = dir.file("bzImage", &bzimage(&spin_guest()));
    let mut child = vmm()
        .arg("-kernel")
        .arg(kernel)
        .args(["-m", "16", "-S"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let line = first_line(child.stderr.take().expect("piped"));
    assert_eq!(
        line,
        "vmm: warning: -S without -qmp: nothing can start the guest's vCPUs (Ctrl-A x or a \
         signal ends vmm)\n"
    );
    // Ctrl-A x, read once the main loop runs, ends the paused VM as the warning says.
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(b"\x01x").expect("vmm reads stdin");
    assert_eq!(wait_for(&mut child, Duration::from_secs(5)), Some(0));
}
