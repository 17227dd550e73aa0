//! Every bad input gets one line on stderr that names the problem, and exit code 1.

mod common;

use common::{bzimage, bzimage_with, long_mode_reset_guest, pvh_elf, run_vmm, Scratch};

/// Runs vmm and returns its single stderr line, checking the exit code and that nothing ran.
fn error_line(kernel: Option<&std::path::Path>, args: &[&str]) -> String {
    let out = run_vmm(kernel, args);
    assert_eq!(out.status.code(), Some(1), "args {args:?}");
    assert!(out.stdout.is_empty(), "no guest output");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("vmm: "), "{stderr}");
    stderr
}

#[test]
fn flag_errors() {
    assert!(error_line(None, &["-vga", "std"]).contains("'-vga'"));
    assert!(error_line(None, &["-m", "1G"]).contains("No kernel given"));
    assert!(error_line(None, &["-kernel", "k", "-m", "lots"]).contains("'lots'"));
    assert!(error_line(None, &["-kernel", "k", "-smp", "0"]).contains("-smp"));
    assert!(error_line(None, &["-kernel"]).contains("'-kernel' needs a value"));
}

#[test]
fn missing_or_unreadable_files() {
    let dir = Scratch::new("missing");
    let missing = dir.0.join("nope");
    let line = error_line(Some(&missing), &[]);
    assert!(
        line.contains("Cannot open kernel") && line.contains("nope"),
        "{line}"
    );
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let line = error_line(Some(&kernel), &["-initrd", "/nonexistent/initrd"]);
    assert!(
        line.contains("Cannot open initrd /nonexistent/initrd"),
        "{line}"
    );
    // A directory opens but cannot be read as a kernel.
    let line = error_line(Some(&dir.0), &[]);
    assert!(line.contains("kernel"), "{line}");
}

#[test]
fn images_that_are_not_bootable_kernels() {
    let dir = Scratch::new("images");
    let text = dir.file("text", &[b'x'; 4096]);
    assert!(error_line(Some(&text), &[]).contains("neither a bzImage nor an ELF"));
    let empty = dir.file("empty", &[]);
    assert!(error_line(Some(&empty), &[]).contains("neither a bzImage nor an ELF"));
    // Boot protocol 2.10 predates xloadflags: no 64-bit entry.
    let old = dir.file("old", &bzimage_with(&long_mode_reset_guest(), 0x020a, 0));
    assert!(error_line(Some(&old), &[]).contains("no 64-bit entry point"));
    let no64 = dir.file("no64", &bzimage_with(&long_mode_reset_guest(), 0x020f, 0));
    assert!(error_line(Some(&no64), &[]).contains("no 64-bit entry point"));
    let no_note = dir.file("vmlinux", &pvh_elf(&[0xf4], false));
    assert!(error_line(Some(&no_note), &[]).contains("no PVH entry note"));
}

#[test]
fn memory_too_small_or_too_large() {
    let dir = Scratch::new("memory");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    assert!(error_line(Some(&kernel), &["-m", "4M"]).contains("too small"));
    assert!(error_line(Some(&kernel), &["-m", "64T"]).contains("more than the host's"));
}

#[test]
fn initrd_larger_than_memory() {
    let dir = Scratch::new("initrd");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let initrd = dir.file("initrd", &vec![0u8; 20 << 20]);
    let line = error_line(
        Some(&kernel),
        &["-m", "16", "-initrd", initrd.to_str().expect("utf-8 path")],
    );
    assert!(line.contains("does not fit"), "{line}");
}

#[test]
fn disk_errors_before_the_guest_starts() {
    let dir = Scratch::new("disks");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let raw = dir.file("disk.raw", &[0u8; 65536]);
    let raw = raw.to_str().expect("utf-8 path");
    let drive = format!("file={raw},format=raw,if=none,id=d0");
    let device = "virtio-blk-device,drive=d0";
    let line = |args: &[&str]| error_line(Some(&kernel), args);
    let l = line(&[
        "-drive",
        "file=/nonexistent.img,format=raw,id=d0",
        "-device",
        device,
    ]);
    assert!(l.contains("no such file /nonexistent.img"), "{l}");
    let l = line(&["-drive", &format!("file={raw},id=d0"), "-device", device]);
    assert!(l.contains("say format=raw"), "{l}");
    let l = line(&["-drive", &drive, "-device", "virtio-blk-device,drive=d9"]);
    assert!(l.contains("no drive with id 'd9'"), "{l}");
    let l = line(&[
        "-drive",
        &drive,
        "-device",
        &format!("{device},iothread=io9"),
    ]);
    assert!(l.contains("no iothread with id 'io9'"), "{l}");
    let l = line(&["-drive", &drive, "-device", device, "-device", device]);
    assert!(l.contains("Drive 'd0' is already in use"), "{l}");
    // One image behind two drives: named as this VM's own drive, not as another process.
    let second = format!("file={raw},format=raw,if=none,id=d1");
    let l = line(&[
        "-drive",
        &drive,
        "-drive",
        &second,
        "-device",
        device,
        "-device",
        "virtio-blk-device,drive=d1",
    ]);
    assert!(
        l.contains("Drive 'd1': ") && l.contains("is already the image of drive 'd0'"),
        "{l}"
    );
    let l = line(&["-drive", &format!("{drive},aio=native"), "-device", device]);
    assert!(l.contains("aio=native is not supported"), "{l}");
    let l = line(&["-object", "iothread", "-drive", &drive, "-device", device]);
    assert!(l.contains("-object needs id="), "{l}");
    let l = line(&["-object", r#"{"qom-type": "iothread", "id": "io0""#]);
    assert!(l.contains("Invalid JSON option string: EOF"), "{l}");
    let l = line(&[
        "-object",
        r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": "0"}"#,
    ]);
    assert!(
        l.contains("Invalid parameter type for 'poll-max-ns', expected: integer"),
        "{l}"
    );
    let l = line(&[
        "-drive",
        &drive,
        "-device",
        r#"{"driver": "virtio-blk-pci", "drive": "d0", "iothread-vq-mapping": [{"iothread": "io0"}]}"#,
    ]);
    assert!(
        l.contains(r#"vmm: -device: IOThread "io0" object does not exist"#),
        "{l}"
    );
    let l = line(&[
        "-object",
        "iothread,id=io0",
        "-drive",
        &drive,
        "-device",
        r#"{"driver": "virtio-blk-pci", "drive": "d0", "num-queues": 2,
            "iothread-vq-mapping": [{"iothread": "io0", "vqs": [1]}]}"#,
    ]);
    assert!(
        l.contains("vmm: -device: missing vq 0 IOThread assignment in iothread-vq-mapping"),
        "{l}"
    );
    // A read-write disk on a file that cannot be written (immutable: even root gets EPERM).
    let chattr = |flag: &str| {
        let ok = std::process::Command::new("chattr")
            .args([flag, raw])
            .status()
            .expect("chattr (e2fsprogs) is installed");
        assert!(ok.success(), "chattr {flag} {raw}");
    };
    chattr("+i");
    let out = run_vmm(Some(&kernel), &["-drive", &drive, "-device", device]);
    chattr("-i");
    let l = String::from_utf8_lossy(&out.stderr);
    assert!(l.contains("is read-only; add readonly=on"), "{l}");
    // Locked by another writer: qemu-io holds the image open for writing meanwhile.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "raw", raw])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io is installed (ci/setup)");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let l = line(&["-drive", &drive, "-device", device]);
    assert!(l.contains("is locked by another process"), "{l}");
    drop(holder.stdin.take());
    let _ = holder.wait();
}

/// Runs vmm like `error_line`, killing it if it outlives a generous deadline: the deadline is
/// only a guard against a hang, such as an `open()` that waits for a FIFO's writer.
fn error_line_bounded(kernel: &std::path::Path, args: &[&str]) -> String {
    let child = common::vmm()
        .arg("-kernel")
        .arg(kernel)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vmm runs");
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let Ok(out) = rx.recv_timeout(std::time::Duration::from_secs(120)) else {
        // SAFETY: kill with plain integers; the child is not reaped yet, so the pid is its.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("vmm {args:?} hangs");
    };
    let out = out.expect("vmm runs");
    assert_eq!(out.status.code(), Some(1), "args {args:?}");
    assert!(out.stdout.is_empty(), "no guest output");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("vmm: "), "{stderr}");
    stderr
}

#[test]
fn odd_files_as_images_or_backing_files_are_refused_at_once() {
    let dir = Scratch::new("odd-files");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let fifo = dir.0.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8 path")).expect("no NUL");
    // SAFETY: mkfifo with a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let top = dir.0.join("top.qcow2");
    let top = top.to_str().expect("utf-8 path");
    let created = std::process::Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-b", "fifo", "-F", "raw", top, "1M",
        ])
        .status()
        .expect("qemu-img is installed (ci/setup)");
    assert!(created.success());
    let fifo = fifo.to_str().expect("utf-8 path");
    let device = "virtio-blk-device,drive=d0";
    for (file, format, named, kind) in [
        (top, ",format=qcow2", fifo, "FIFO"),
        (fifo, ",format=raw", fifo, "FIFO"),
        (fifo, "", fifo, "FIFO"),
        (fifo, ",format=raw,readonly=on", fifo, "FIFO"),
        ("/dev/null", ",format=raw", "/dev/null", "character device"),
    ] {
        let drive = format!("file={file}{format},if=none,id=d0");
        let l = error_line_bounded(&kernel, &["-drive", &drive, "-device", device]);
        assert!(
            l.contains(&format!(
                "{named} is a {kind}, not a regular file or block device"
            )),
            "{drive}: {l}"
        );
    }
}

/// A seccomp filter that fails `io_uring_setup` with ENOSYS, as a kernel without io_uring
/// does, and allows everything else (for `pre_exec`: only async-signal-safe calls).
fn deny_io_uring_setup() -> std::io::Result<()> {
    // Linux's include/uapi/linux/audit.h: AUDIT_ARCH_X86_64.
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let code = |c: u32| u16::try_from(c).expect("BPF opcodes fit in 16 bits");
    let stmt = |c: u32, k: u32| libc::sock_filter {
        code: code(c),
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
        jt,
        jf,
        k,
    };
    let nr = u32::try_from(libc::SYS_io_uring_setup).expect("a syscall number");
    let enosys = u32::try_from(libc::ENOSYS).expect("an errno");
    let mut filter = [
        // struct seccomp_data: nr at byte 0, arch at byte 4.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        jeq(nr, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | enosys,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).expect("a short filter"),
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl with integer arguments; PR_SET_NO_NEW_PRIVS lets an unprivileged process
    // install a filter.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies them.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn aio_io_uring_needs_io_uring_on_the_host() {
    use std::os::unix::process::CommandExt;
    let dir = Scratch::new("io-uring");
    let kernel = dir.file("bzImage", &bzimage(&long_mode_reset_guest()));
    let raw = dir.file("disk.raw", &[0u8; 65536]);
    let drive = format!(
        "file={},format=raw,if=none,id=d0,aio=io_uring",
        raw.to_str().expect("utf-8 path")
    );
    let args = ["-drive", &drive, "-device", "virtio-blk-device,drive=d0"];
    // Where the host has io_uring, the disk starts and the guest runs (and resets: exit 0).
    let out = run_vmm(Some(&kernel), &args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without it: one line naming it, before the guest starts.
    let mut cmd = common::vmm();
    cmd.arg("-kernel").arg(&kernel).args(args);
    // SAFETY: the closure only makes two prctl calls, which are async-signal-safe.
    unsafe { cmd.pre_exec(deny_io_uring_setup) };
    let out = cmd.output().expect("vmm runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no guest output");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("Drive 'd0'") && stderr.contains("unable to use io_uring"),
        "{stderr}"
    );
}
