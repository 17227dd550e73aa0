//! The `vmm-img` binary against qemu-img: images it creates pass `qemu-img check` and read the
//! same through qemu-img; info/check/map JSON carries qemu-img's fields and values; convert
//! flattens chains; io scripts the same edits as qemu-io; locks hold against qemu-io both ways.
#![allow(clippy::unwrap_used)]

mod common;
use std::process::Command;

use common::*;

fn ok(args: &[&str]) -> String {
    let o = vmm_img(args);
    assert!(
        o.status.success(),
        "vmm-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn created_images_pass_qemu_check_in_every_variant() {
    let dir = tempfile::tempdir().unwrap();
    let variants = [
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "extended_l2=on",
    ];
    for (i, v) in variants.iter().enumerate() {
        let p = tmp(&dir, &format!("c{i}.qcow2"));
        let ps = p.to_str().unwrap();
        ok(&["create", "-q", "-f", "qcow2", "-o", v, ps, "20M"]);
        ok(&[
            "io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1000 300k",
            "-c",
            "write -z 4M 1M",
            "-c",
            "discard 0 64k",
            ps,
        ]);
        assert_check_clean(&p);
        assert_same_as_qemu(&p);
        // qemu-io sees what vmm-img wrote.
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x11 65536 200000", ps],
        );
    }
    // A backing chain made by vmm-img: name right after the extensions, with its format.
    let base = tmp(&dir, "c0.qcow2");
    let top = tmp(&dir, "top.qcow2");
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "c0.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let info = json(&qemu_img(&["info", "--output=json", top.to_str().unwrap()]));
    assert_eq!(info["backing-filename"], "c0.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 20 << 20);
    assert_check_clean(&top);
    assert_same_as_qemu(&top);
    assert!(base.exists());
}

#[test]
fn info_check_and_map_speak_qemu_img_json() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "b.qcow2");
    let top = tmp(&dir, "t.qcow2");
    create_qcow2(&[base.to_str().unwrap(), "8M"]);
    qemu_io(&base, "qcow2", &["write -P 1 0 3M"]);
    create_qcow2(&["-b", "b.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 2 1M 100k", "write -z 5M 1M", "discard 2M 64k"],
    );
    let t = top.to_str().unwrap();
    let ours = json(&ok(&["info", "--output=json", "--backing-chain", t]));
    let theirs = json(&qemu_img(&["info", "--output=json", "--backing-chain", t]));
    for (o, q) in ours
        .as_array()
        .unwrap()
        .iter()
        .zip(theirs.as_array().unwrap())
    {
        for k in [
            "virtual-size",
            "filename",
            "format",
            "cluster-size",
            "format-specific",
            "backing-filename",
            "backing-filename-format",
            "dirty-flag",
        ] {
            assert_eq!(o.get(k), q.get(k), "info field {k}");
        }
    }
    let ours = json(&ok(&["check", "--output=json", t]));
    let theirs = json(&qemu_img(&["check", "--output=json", t]));
    for k in [
        "image-end-offset",
        "total-clusters",
        "check-errors",
        "allocated-clusters",
        "format",
    ] {
        assert_eq!(ours.get(k), theirs.get(k), "check field {k}");
    }
    assert_eq!(
        json(&ok(&["map", "--output=json", t])),
        json(&qemu_img(&["map", "--output=json", t]))
    );
    assert_eq!(ok(&["map", t]), qemu_img(&["map", t]));
}

#[test]
fn check_exit_codes_and_repair() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "l.qcow2");
    let ps = p.to_str().unwrap();
    create_qcow2(&[ps, "4M"]);
    qemu_io(&p, "qcow2", &["write 0 64k"]);
    // Leak: the L1 table's refcount (cluster 3; refcount block at cluster 2, 16-bit entries)
    // raised to 2.
    let mut b = std::fs::read(&p).unwrap();
    let at = 2 * 65536 + 2 * 3;
    b[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_eq!(vmm_img(&["check", ps]).status.code(), Some(3));
    assert_eq!(
        Command::new("qemu-img")
            .args(["check", ps])
            .status()
            .unwrap()
            .code(),
        Some(3)
    );
    assert!(ok(&["check", "-r", "leaks", ps]).contains("1 leaked clusters"));
    assert_check_clean(&p);
    // Corruption: the data cluster's refcount dropped to zero.
    let mut b = std::fs::read(&p).unwrap();
    let data =
        u64::from_be_bytes(b[4 * 65536..4 * 65536 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    // The repair above moved the refcount structures: follow the header to the block.
    let be64 = |b: &[u8], at: u64| {
        let at = usize::try_from(at).unwrap();
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    };
    let block = be64(&b, be64(&b, 48));
    let at = usize::try_from(block + 2 * (data / 65536)).unwrap();
    b[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_eq!(vmm_img(&["check", ps]).status.code(), Some(2));
    ok(&["check", "-r", "all", ps]);
    assert_check_clean(&p);
    // The COPIED flag of the data cluster's L2 entry cleared: a corruption for both tools, which
    // `-r all` repairs.
    let mut b = std::fs::read(&p).unwrap();
    b[4 * 65536] &= 0x7f;
    std::fs::write(&p, &b).unwrap();
    assert_eq!(vmm_img(&["check", ps]).status.code(), Some(2));
    assert_eq!(
        Command::new("qemu-img")
            .args(["check", ps])
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    assert!(ok(&["check", "-r", "all", ps]).contains("1 corruptions"));
    assert_check_clean(&p);
}

#[test]
fn convert_flattens_chains_and_io_edits_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "base.raw");
    let top = tmp(&dir, "top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "6M"]);
    qemu_io(&base, "raw", &["write -P 9 0 6M"]);
    create_qcow2(&["-b", "base.raw", "-F", "raw", top.to_str().unwrap()]);
    let edits = [
        "write -P 3 100k 1M",
        "write -z 3M 512k",
        "discard 4M 1M",
        "flush",
    ];
    // The same edits through qemu-io on a copy.
    let twin = tmp(&dir, "twin.qcow2");
    std::fs::copy(&top, &twin).unwrap();
    let mut args = vec!["-f", "qcow2"];
    for e in edits {
        args.extend(["-c", e]);
    }
    let t = top.to_str().unwrap().to_string();
    let mut ours = vec!["io"];
    ours.extend(args.iter().copied());
    ours.push(&t);
    ok(&ours);
    args.push(twin.to_str().unwrap());
    run("qemu-io", &args);
    qemu_img(&["compare", "-q", t.as_str(), twin.to_str().unwrap()]);
    // read -P fails on a mismatch, succeeds on a match.
    assert!(!vmm_img(&["io", "-r", "-c", "read -P 4 100k 4k", &t])
        .status
        .success());
    ok(&["io", "-r", "-c", "read -P 3 100k 4k", &t]);
    for fmt in ["raw", "qcow2"] {
        let out = tmp(&dir, &format!("flat.{fmt}"));
        let o = out.to_str().unwrap();
        let s = ok(&["convert", "-p", "-O", fmt, &t, o]);
        assert!(s.contains("100.00/100%"));
        qemu_img(&["compare", "-q", &t, o]);
        if fmt == "qcow2" {
            assert_check_clean(&out);
            assert!(json(&qemu_img(&["info", "--output=json", o]))
                .get("backing-filename")
                .is_none());
        }
    }
}

/// `io -C` copies up what reads found in the backing file as `qemu-io -C` does: the same
/// clusters become the top's (whole clusters around each read, zeroes as zero clusters), the
/// disk reads the same, the image checks clean; guest data already in the top stays.
#[test]
fn io_copy_on_read_allocates_what_qemu_io_does() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "base.qcow2");
    create_qcow2(&[base.to_str().unwrap(), "4M"]);
    qemu_io(&base, "qcow2", &["write -P 0xa1 0 3M", "write -z 1M 256k"]);
    let mut tops = Vec::new();
    for name in ["ours.qcow2", "qemu.qcow2"] {
        let t = tmp(&dir, name);
        create_qcow2(&[
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            t.to_str().unwrap(),
            "4M",
        ]);
        qemu_io(&t, "qcow2", &["write -P 7 40000 3000"]);
        tops.push(t.to_str().unwrap().to_string());
    }
    let reads = [
        "read -P 0xa1 4096 30000",
        "read 30000 40000",
        "read -P 7 40000 3000",
        "read -P 0 1100000 200000",
        "read 1000000 400000",
        "read 4193000 1304",
    ];
    let mut args = vec!["-C", "-f", "qcow2"];
    for r in reads {
        args.extend(["-c", r]);
    }
    let mut ours = vec!["io"];
    ours.extend(args.iter().copied());
    ours.push(&tops[0]);
    ok(&ours);
    args.push(&tops[1]);
    run("qemu-io", &args);
    // Where each byte comes from (depth) and whether it reads as zeroes; where the data sits
    // in the file (which splits extents) may differ.
    let map = |t: &str| {
        let mut extents: Vec<(u64, u64, u64, bool)> = Vec::new();
        for e in json(&qemu_img(&["map", "--output=json", t]))
            .as_array()
            .unwrap()
        {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            let (depth, zero) = (e["depth"].as_u64().unwrap(), e["zero"].as_bool().unwrap());
            match extents.last_mut() {
                Some(last) if (last.2, last.3) == (depth, zero) => last.1 += len,
                _ => extents.push((start, len, depth, zero)),
            }
        }
        extents
    };
    let ours_map = map(&tops[0]);
    assert!(
        ours_map.iter().any(|e| e.2 == 0 && !e.3),
        "nothing copied up: {ours_map:?}"
    );
    assert!(
        ours_map.iter().any(|e| e.2 == 0 && e.3),
        "no zero cluster: {ours_map:?}"
    );
    assert_eq!(ours_map, map(&tops[1]));
    qemu_img(&["compare", "-q", &tops[0], &tops[1]]);
    assert_check_clean(std::path::Path::new(&tops[0]));
    // Copy-on-read writes: not on an image opened read-only.
    assert!(!vmm_img(&["io", "-C", "-r", "-c", "read 0 512", &tops[0]])
        .status
        .success());
}

#[test]
fn io_and_qemu_io_refuse_each_others_writers() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "lock.qcow2");
    let ps = p.to_str().unwrap().to_string();
    create_qcow2(&[&ps, "1M"]);
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", &ps])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = vmm_img(&["io", "-c", "write 0 512", &ps]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("locked"),
        "{o:?}"
    );
    drop(child.stdin.take());
    child.wait().unwrap();
    // vmm-img bench holds it for writing while qemu-io tries.
    let mut bench = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(["bench", "-w", "-c", "20000000", "-d", "1", "-s", "512", &ps])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let q = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", &ps])
        .output()
        .unwrap();
    bench.kill().unwrap();
    bench.wait().unwrap();
    assert!(!q.status.success());
    assert!(String::from_utf8_lossy(&q.stderr).contains("lock"), "{q:?}");
}

#[test]
fn map_shows_holes_of_a_sparse_raw_base_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "r.raw");
    let top = tmp(&dir, "rt.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "4M"]);
    qemu_io(&base, "raw", &["write -P 1 1M 64k"]);
    create_qcow2(&["-b", "r.raw", "-F", "raw", top.to_str().unwrap()]);
    qemu_io(&top, "qcow2", &["write -P 2 0 64k"]);
    let t = top.to_str().unwrap();
    assert_eq!(
        json(&ok(&["map", "--output=json", t])),
        json(&qemu_img(&["map", "--output=json", t]))
    );
    assert_eq!(ok(&["map", t]), qemu_img(&["map", t]));
}

/// Runs vmm-img in `dir`, which must refuse: exit code 1 and one line on stderr, returned. The
/// deadline only guards against a hang (a command blocked in `open()` would never return).
fn refused_in(dir: &std::path::Path, args: &[&str]) -> String {
    let child = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let o = match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill with plain integers; the child is still ours (not yet reaped).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("vmm-img {args:?} hangs");
        }
    };
    let stderr = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "vmm-img {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "vmm-img {args:?}: {stderr}");
    assert!(o.stdout.is_empty(), "vmm-img {args:?}");
    stderr
}

/// The bytes of a file, to show a refused command left it alone.
fn bytes(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Waits until another process holds `p` open with QEMU's locks: byte 100 (consistent read,
/// held by every user that does not force-share) is locked.
fn wait_until_held(p: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    for _ in 0..6000 {
        // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::c_short::try_from(libc::F_WRLCK).unwrap();
        fl.l_start = 100;
        fl.l_len = 1;
        // SAFETY: F_OFD_GETLK on a descriptor we own with a valid flock.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(r, 0);
        if fl.l_type != libc::c_short::try_from(libc::F_UNLCK).unwrap() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("nobody took the lock on {}", p.display());
}

/// A qcow2 image of 4 MiB with data in its first MiB.
fn image_with_data(p: &std::path::Path) {
    create_qcow2(&[p.to_str().unwrap(), "4M"]);
    qemu_io(p, "qcow2", &["write -P 7 0 1M"]);
}

#[test]
fn create_and_convert_leave_an_image_in_use_alone() {
    let dir = tempfile::tempdir().unwrap();
    let a = tmp(&dir, "a.qcow2");
    image_with_data(&a);
    let src = tmp(&dir, "src.qcow2");
    image_with_data(&src);
    let before = bytes(&a);
    let attempts: [&[&str]; 4] = [
        &["create", "-f", "qcow2", "a.qcow2", "64M"],
        &["create", "-f", "raw", "a.qcow2", "1M"],
        &["convert", "-O", "qcow2", "src.qcow2", "a.qcow2"],
        &["convert", "-U", "-O", "raw", "src.qcow2", "a.qcow2"],
    ];
    // Held by QEMU, for writing and (refusing to share writes) for reading, as QEMU's create
    // is refused by both; then by vmm-img itself.
    for holder in [&["-f", "qcow2"][..], &["-r", "-f", "qcow2"]] {
        let mut q = Command::new("qemu-io")
            .args(holder)
            .arg(&a)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io is installed (ci/setup)");
        wait_until_held(&a);
        for args in attempts {
            let line = refused_in(dir.path(), args);
            assert!(line.contains("a.qcow2 is locked"), "{args:?}: {line}");
            assert!(bytes(&a) == before, "{args:?} under qemu-io {holder:?}");
        }
        drop(q.stdin.take());
        q.wait().unwrap();
    }
    let mut bench = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(["bench", "-c", "20000000", "-d", "1", "-s", "512"])
        .arg(&a)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until_held(&a);
    for args in attempts {
        let line = refused_in(dir.path(), args);
        assert!(line.contains("a.qcow2 is locked"), "{args:?}: {line}");
    }
    bench.kill().unwrap();
    bench.wait().unwrap();
    assert!(bytes(&a) == before);
}

#[test]
fn convert_never_writes_onto_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "base.qcow2");
    image_with_data(&base);
    let top = tmp(&dir, "top.qcow2");
    create_qcow2(&["-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io(&top, "qcow2", &["write -P 8 1M 1M"]);
    std::fs::hard_link(&base, tmp(&dir, "hard.qcow2")).unwrap();
    std::os::unix::fs::symlink("base.qcow2", tmp(&dir, "soft.qcow2")).unwrap();
    let (base_before, top_before) = (bytes(&base), bytes(&top));
    for (input, output) in [
        ("base.qcow2", "base.qcow2"),
        ("base.qcow2", "hard.qcow2"),
        ("soft.qcow2", "base.qcow2"),
        ("top.qcow2", "top.qcow2"),
        ("top.qcow2", "base.qcow2"),
        ("top.qcow2", "soft.qcow2"),
    ] {
        // With -U the input holds no lock, so only the identity check stands in the way (qemu-img
        // empties the input there); without, the check still comes first.
        for share in [&[][..], &["-U"]] {
            for fmt in ["qcow2", "raw"] {
                let mut args = vec!["convert"];
                args.extend_from_slice(share);
                args.extend(["-O", fmt, input, output]);
                let line = refused_in(dir.path(), &args);
                assert!(
                    line.contains(&format!("cannot convert onto {output}")),
                    "{args:?}: {line}"
                );
                assert!(bytes(&base) == base_before, "{args:?}");
                assert!(bytes(&top) == top_before, "{args:?}");
            }
        }
    }
    // A real output still converts.
    ok(&[
        "convert",
        "-O",
        "qcow2",
        top.to_str().unwrap(),
        tmp(&dir, "out.qcow2").to_str().unwrap(),
    ]);
    qemu_img(&[
        "compare",
        "-q",
        top.to_str().unwrap(),
        tmp(&dir, "out.qcow2").to_str().unwrap(),
    ]);
}

#[test]
fn create_refuses_an_image_that_would_back_itself() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp(&dir, "d")).unwrap();
    let a = tmp(&dir, "d/a.qcow2");
    image_with_data(&a);
    let b = tmp(&dir, "d/b.qcow2");
    create_qcow2(&["-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap()]);
    let before = bytes(&a);
    for args in [
        // The same name, opening the backing file (for its size) or not (-u).
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "d/a.qcow2",
        ][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "d/a.qcow2",
            "4M",
        ],
        // A relative name resolves against the new image's directory: qemu-img compares the
        // names ("a.qcow2" and "d/a.qcow2") and overwrites d/a.qcow2 with an image that backs
        // itself.
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "d/a.qcow2",
            "4M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "../d/a.qcow2",
            "-F",
            "qcow2",
            "d/a.qcow2",
            "4M",
        ],
        // Deeper in the chain: b.qcow2's backing file is a.qcow2.
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "d/a.qcow2",
            "4M",
        ],
    ] {
        let line = refused_in(dir.path(), args);
        assert!(
            line.contains("d/a.qcow2 would be its own backing file"),
            "{args:?}: {line}"
        );
        assert!(bytes(&a) == before, "{args:?}");
    }
    // A new file that would name itself is not left behind.
    let line = refused_in(
        dir.path(),
        &[
            "create", "-f", "qcow2", "-u", "-b", "n.qcow2", "-F", "raw", "n.qcow2", "1M",
        ],
    );
    assert!(line.contains("would be its own backing file"), "{line}");
    assert!(!tmp(&dir, "n.qcow2").exists());
}

#[test]
fn odd_files_are_refused_at_once_as_images_and_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = tmp(&dir, "fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(tmp(&dir, "dir")).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(tmp(&dir, "sock")).unwrap();
    let raw = tmp(&dir, "r.raw");
    std::fs::write(&raw, vec![1u8; 1 << 20]).unwrap();
    for (odd, kind) in [
        ("fifo", "FIFO"),
        ("dir", "directory"),
        ("sock", "socket"),
        ("/dev/null", "character device"),
    ] {
        let what = format!("{odd} is a {kind}, not a regular file or block device");
        let overlay = format!("over-{kind}.qcow2");
        create_qcow2(&[
            "-u",
            "-b",
            odd,
            "-F",
            "raw",
            tmp(&dir, &overlay).to_str().unwrap(),
            "1M",
        ]);
        for image in [odd, overlay.as_str()] {
            for cmd in [
                &["info"][..],
                &["check"],
                &["map"],
                &["bench", "-c", "1"],
                &["io", "-c", "read 0 512"],
                &["io", "-r", "-c", "read 0 512"],
            ] {
                let mut args = cmd.to_vec();
                args.push(image);
                let line = refused_in(dir.path(), &args);
                assert!(line.contains(&what), "{args:?}: {line}");
            }
            let line = refused_in(dir.path(), &["convert", "-O", "raw", image, "out.raw"]);
            assert!(line.contains(&what), "convert {image}: {line}");
        }
        for args in [
            &["create", "-f", "qcow2", "-b", odd, "-F", "raw", "new.qcow2"][..],
            &["create", "-f", "qcow2", odd, "1M"],
            &["create", "-f", "raw", odd, "1M"],
            &["convert", "-O", "raw", "r.raw", odd],
        ] {
            let line = refused_in(dir.path(), args);
            assert!(line.contains(&what), "{args:?}: {line}");
        }
        assert!(!tmp(&dir, "new.qcow2").exists());
    }
}

#[test]
fn info_prints_sizes_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "sizes.raw");
    let ps = p.to_str().unwrap();
    let line = |out: &str| -> String {
        out.lines()
            .find(|l| l.starts_with("virtual size:"))
            .unwrap()
            .to_owned()
    };
    for bytes in [
        0_u64,
        512,
        1024,
        1_572_864,
        8 << 20,
        1000 << 20,
        1023 << 20,
        123_457_024,
        10_240_000,
        20 << 30,
        5 << 40,
    ] {
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        assert_eq!(
            line(&ok(&["info", "-f", "raw", ps])),
            line(&qemu_img(&["info", "-f", "raw", ps])),
            "{bytes} bytes"
        );
    }
}

#[test]
fn output_into_a_closed_pipe_ends_vmm_img_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "pipe.raw");
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(["info", "-f", "raw", p.to_str().unwrap()])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}

/// A loop device over a sparse file, detached when dropped. Needs root, as CI has.
struct LoopDevice(String);

impl LoopDevice {
    fn over(file: &std::path::Path) -> Self {
        let dev = run("losetup", &["--find", "--show", file.to_str().unwrap()]);
        Self(dev.trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_block_device_s_size_is_its_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let backing = tmp(&dir, "loop.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let dev = LoopDevice::over(&backing);
    let ours = json(&ok(&["info", "-f", "raw", "--output=json", &dev.0]));
    let theirs = json(&qemu_img(&["info", "-f", "raw", "--output=json", &dev.0]));
    assert_eq!(ours["virtual-size"], 24 << 20);
    assert_eq!(ours["virtual-size"], theirs["virtual-size"]);
    // Read and written through the engine at its end.
    ok(&[
        "io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 24575k 1k",
        "-c",
        "read -P 0x5a 24575k 1k",
        &dev.0,
    ]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 24575k 1k", &dev.0],
    );
}
