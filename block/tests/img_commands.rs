//! `vmm-img`'s command line beside qemu-img's on the same files: `--version`, `--help` on every
//! subcommand, the same refusal of a bad `--output`, and images of the formats QEMU reads and
//! the engine does not, named (as qemu-img names them) instead of read as raw disks.
#![allow(clippy::unwrap_used)]

mod common;
use std::process::{Command, Output};

use block::DiskImage;
use common::*;

fn qemu_img_out(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required (ci/setup installs it): {e}"))
}

/// The first line of stderr without the tool's `name: ` prefix.
fn first_error(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr);
    let line = e.lines().next().unwrap_or("").to_string();
    line.split_once(": ")
        .map_or(line.clone(), |(_, rest)| rest.to_string())
}

const COMMANDS: [&str; 15] = [
    "amend", "create", "dd", "info", "check", "commit", "compare", "convert", "map", "measure",
    "rebase", "resize", "snapshot", "bench", "io",
];

#[test]
fn version_and_help_on_every_command() {
    let o = vmm_img(&["--version"]);
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.starts_with(&format!("vmm-img version {}\n", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    for cmd in COMMANDS {
        for flag in ["--help", "-h"] {
            // The flag wins wherever it is, as in qemu-img, even with other arguments around it.
            let o = vmm_img(&[cmd, "-f", "qcow2", flag, "no-such-file"]);
            assert!(o.status.success(), "{cmd} {flag}: {o:?}");
            let out = String::from_utf8(o.stdout).unwrap();
            assert!(out.starts_with("Usage:\n"), "{cmd}: {out}");
            assert!(out.contains(&format!("vmm-img {cmd} ")), "{cmd}: {out}");
        }
    }
    // A usage error points at the help, as qemu-img's do.
    let o = vmm_img(&["map", "--frobnicate", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Try 'vmm-img map --help'"));
}

#[test]
fn a_bad_output_format_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = tmp(&dir, "a.qcow2");
    let p = img.to_str().unwrap();
    create_qcow2(&[p, "1M"]);
    for cmd in ["info", "check", "map"] {
        for form in [vec!["--output=yaml"], vec!["--output", "yaml"]] {
            let mut args = vec![cmd];
            args.extend(&form);
            args.push(p);
            let ours = vmm_img(&args);
            let theirs = qemu_img_out(&args);
            assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
            assert_eq!(ours.status.code(), Some(1), "{args:?}");
            assert_eq!(first_error(&ours), first_error(&theirs), "{args:?}");
            assert!(ours.stdout.is_empty(), "{args:?}");
        }
    }
}

/// A minimal dmg: data, then the 512-byte "koly" trailer (qemu-img cannot create one).
fn write_dmg(path: &std::path::Path) {
    let mut b = vec![0u8; 4096];
    let koly = b.len() - 512;
    b[koly..koly + 4].copy_from_slice(b"koly");
    b[koly + 4..koly + 8].copy_from_slice(&4u32.to_be_bytes()); // version
    b[koly + 8..koly + 12].copy_from_slice(&512u32.to_be_bytes()); // header size
    std::fs::write(path, b).unwrap();
}

#[test]
fn other_formats_are_named_with_the_command_that_converts_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(tmp(&dir, "pw"), "secret").unwrap();
    let mut images = Vec::new();
    for fmt in ["vmdk", "vhdx", "vpc", "vdi", "qed", "qcow", "luks"] {
        let p = tmp(&dir, &format!("disk-{fmt}.img"));
        let mut args = vec!["create", "-q", "-f", fmt];
        if fmt == "luks" {
            args.extend([
                "--object",
                "secret,id=sec0,file=pw",
                "-o",
                "key-secret=sec0,iter-time=10",
            ]);
        }
        args.extend([p.to_str().unwrap(), "4M"]);
        let o = Command::new("qemu-img")
            .current_dir(dir.path())
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
        // qemu-img probes it as the format it was created as.
        let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["format"], fmt);
        images.push((fmt, p));
    }
    // A vmdk text descriptor with a flat extent.
    let desc = tmp(&dir, "desc.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        desc.to_str().unwrap(),
        "1M",
    ]);
    images.push(("vmdk", desc));
    let dmg = tmp(&dir, "disk.dmg");
    write_dmg(&dmg);
    images.push(("dmg", dmg));
    for (fmt, p) in &images {
        let ps = p.to_str().unwrap();
        for args in [
            vec!["info", ps],
            vec!["map", ps],
            vec!["convert", ps, "out"],
        ] {
            let o = vmm_img(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains(&format!("{ps} is a {fmt} image")),
                "{args:?}: {err}"
            );
            assert!(err.contains("qemu-img convert "), "{err}");
        }
        // Named explicitly as raw, it is read as raw, as QEMU would.
        let o = vmm_img(&["info", "-f", "raw", ps]);
        assert!(o.status.success(), "{fmt}: {o:?}");
    }
    // The command given works, and its output opens.
    let (_, vdi) = &images[3];
    let o = vmm_img(&["info", vdi.to_str().unwrap()]);
    let err = String::from_utf8(o.stderr).unwrap();
    let line = err.split("with: ").nth(1).unwrap().trim();
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words[0], "qemu-img");
    qemu_img(&words[1..]);
    let out = tmp(&dir, "disk-vdi.qcow2");
    let o = vmm_img(&["info", out.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("file format: qcow2"));
}

/// Runs the same command line through both tools and requires the same exit code and stdout.
fn same_as_qemu_img(dir: &std::path::Path, args: &[&str]) -> Output {
    let ours = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let theirs = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required (ci/setup installs it): {e}"));
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{args:?}: ours {ours:?}, qemu-img {theirs:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "{args:?}"
    );
    ours
}

#[test]
fn compare_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| tmp(&dir, n);
    let io = |n: &str, cmds: &[&str]| qemu_io(&p(n), "qcow2", cmds);
    create_qcow2(&[p("a.qcow2").to_str().unwrap(), "4M"]);
    io(
        "a.qcow2",
        &["write -P 1 0 64k", "write -P 2 1M 100k", "write -z 2M 64k"],
    );
    // The same content in a raw file and in an overlay over a partial base.
    let a = p("a.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        a.to_str().unwrap(),
        p("a.raw").to_str().unwrap(),
    ]);
    create_qcow2(&[p("base.qcow2").to_str().unwrap(), "4M"]);
    io("base.qcow2", &["write -P 1 0 64k"]);
    create_qcow2(&[
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p("top.qcow2").to_str().unwrap(),
    ]);
    io("top.qcow2", &["write -P 2 1M 100k", "write -P 0 3M 64k"]);
    // One byte apart, inside the second sector of a cluster.
    std::fs::copy(p("a.qcow2"), p("b.qcow2")).unwrap();
    io("b.qcow2", &["write -P 9 1049600 1"]);
    // Larger, with zeroes in the tail, then with data in it.
    create_qcow2(&[p("big.qcow2").to_str().unwrap(), "6M"]);
    io(
        "big.qcow2",
        &["write -P 1 0 64k", "write -P 2 1M 100k", "write -P 0 5M 4k"],
    );
    std::fs::copy(p("big.qcow2"), p("bigdata.qcow2")).unwrap();
    io("bigdata.qcow2", &["write -P 5 5000000 10"]);
    // Zeroes written as data where the other image has nothing.
    create_qcow2(&[p("empty.qcow2").to_str().unwrap(), "4M"]);
    create_qcow2(&[p("zerodata.qcow2").to_str().unwrap(), "4M"]);
    io("zerodata.qcow2", &["write -P 0 64k 64k"]);
    std::fs::write(p("ones.raw"), vec![1u8; 4 << 20]).unwrap();
    let cases: &[&[&str]] = &[
        &["a.qcow2", "a.raw"],
        &["-f", "raw", "-F", "qcow2", "a.raw", "a.qcow2"],
        &["a.qcow2", "top.qcow2"],
        &["top.qcow2", "a.raw"],
        &["a.qcow2", "b.qcow2"],
        &["b.qcow2", "a.raw"],
        &["a.qcow2", "big.qcow2"],
        &["big.qcow2", "a.qcow2"],
        &["-s", "a.qcow2", "big.qcow2"],
        &["a.qcow2", "bigdata.qcow2"],
        &["-q", "a.qcow2", "bigdata.qcow2"],
        &["empty.qcow2", "zerodata.qcow2"],
        &["-s", "empty.qcow2", "zerodata.qcow2"],
        &["-s", "a.qcow2", "a.qcow2"],
        &["ones.raw", "a.raw"],
        &["a.qcow2", "missing.qcow2"],
    ];
    for case in cases {
        let mut args = vec!["compare"];
        args.extend_from_slice(case);
        same_as_qemu_img(d, &args);
    }
    // The exit codes cover every outcome.
    let code = |args: &[&str]| same_as_qemu_img(d, args).status.code();
    assert_eq!(code(&["compare", "a.qcow2", "a.raw"]), Some(0));
    assert_eq!(code(&["compare", "a.qcow2", "b.qcow2"]), Some(1));
    assert_eq!(code(&["compare", "a.qcow2", "missing.qcow2"]), Some(2));
}

/// Runs qemu-img in `dq` and vmm-img in `dv` (two copies of the same files) with the same
/// arguments, and requires the same exit code and stdout.
fn both(dq: &std::path::Path, dv: &std::path::Path, args: &[&str]) {
    let theirs = Command::new("qemu-img")
        .current_dir(dq)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required (ci/setup installs it): {e}"));
    let ours = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .current_dir(dv)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{args:?}: ours {ours:?}, qemu-img {theirs:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "{args:?}"
    );
}

/// `qemu-img map --output=json` without host offsets: which ranges each layer allocates, as
/// data or zeroes (adjacent runs merged, wherever their clusters landed in the file).
fn allocation(path: &std::path::Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["map", "-U", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut merged: Vec<serde_json::Value> = Vec::new();
    for e in v.as_array().unwrap() {
        let mut e = e.clone();
        e.as_object_mut().unwrap().remove("offset");
        let same = |a: &serde_json::Value, b: &serde_json::Value| {
            ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| a[k] == b[k])
        };
        match merged.last_mut() {
            Some(last) if same(last, &e) => {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
            }
            _ => merged.push(e),
        }
    }
    merged
}

/// The first cluster: header, extensions and backing file name.
fn first_cluster(path: &std::path::Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    b.truncate(65536);
    b
}

/// Two directories holding the same chain: base1 (4 MiB), base2 (3 MiB, so the disk reads
/// zeroes past its end), and top over base1 with data of its own.
fn rebase_fixture() -> (tempfile::TempDir, tempfile::TempDir) {
    let dq = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp(&dq, n);
    create_qcow2(&[p("base1.qcow2").to_str().unwrap(), "4M"]);
    qemu_io(
        &p("base1.qcow2"),
        "qcow2",
        &[
            "write -P 1 0 128k",
            "write -P 3 1M 64k",
            "write -P 5 3200k 200k",
        ],
    );
    create_qcow2(&[p("base2.qcow2").to_str().unwrap(), "3M"]);
    qemu_io(
        &p("base2.qcow2"),
        "qcow2",
        &["write -P 1 0 64k", "write -P 4 2M 64k", "write -P 3 1M 1k"],
    );
    create_qcow2(&[
        "-b",
        "base1.qcow2",
        "-F",
        "qcow2",
        p("top.qcow2").to_str().unwrap(),
    ]);
    qemu_io(
        &p("top.qcow2"),
        "qcow2",
        &["write -P 7 1M 4k", "write -z 2M 64k"],
    );
    let dv = tempfile::tempdir().unwrap();
    for f in ["base1.qcow2", "base2.qcow2", "top.qcow2"] {
        std::fs::copy(p(f), tmp(&dv, f)).unwrap();
    }
    (dq, dv)
}

#[test]
fn rebase_copies_exactly_the_clusters_qemu_img_copies() {
    let cases: &[&[&str]] = &[
        &["rebase", "-b", "base2.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-q", "-b", "", "top.qcow2"],
        &[
            "rebase",
            "-u",
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-u", "top.qcow2"],
    ];
    for case in cases {
        let (dq, dv) = rebase_fixture();
        let before = read_qemu(&tmp(&dq, "top.qcow2"), "qcow2");
        both(dq.path(), dv.path(), case);
        let (tq, tv) = (tmp(&dq, "top.qcow2"), tmp(&dv, "top.qcow2"));
        assert_check_clean(&tv);
        assert_eq!(first_cluster(&tv), first_cluster(&tq), "{case:?}: header");
        assert_eq!(allocation(&tv), allocation(&tq), "{case:?}: allocation");
        assert_eq!(read_qemu(&tv, "qcow2"), read_qemu(&tq, "qcow2"), "{case:?}");
        if !case.contains(&"-u") {
            assert!(
                read_qemu(&tv, "qcow2") == before,
                "{case:?}: content changed"
            );
        }
    }
    // The old chain ending inside the disk: what lay past its end reads as zeroes, and stays so.
    let (dq, dv) = rebase_fixture();
    for d in [&dq, &dv] {
        qemu_img(&[
            "rebase",
            "-u",
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            tmp(d, "top.qcow2").to_str().unwrap(),
        ]);
    }
    let before = read_qemu(&tmp(&dq, "top.qcow2"), "qcow2");
    both(
        dq.path(),
        dv.path(),
        &["rebase", "-b", "base1.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    let (tq, tv) = (tmp(&dq, "top.qcow2"), tmp(&dv, "top.qcow2"));
    assert_eq!(allocation(&tv), allocation(&tq));
    assert!(read_qemu(&tv, "qcow2") == before);
    // Refusals: no -b without -u, and no -F with a backing file.
    let (dq, dv) = rebase_fixture();
    both(dq.path(), dv.path(), &["rebase", "top.qcow2"]);
    let o = vmm_img(&["rebase", "-b", "x", tmp(&dv, "top.qcow2").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("backing format must be specified"));
}

#[test]
fn a_backing_file_without_format_is_refused_with_the_fix_and_the_fix_works() {
    let dir = tempfile::tempdir().unwrap();
    let base = tmp(&dir, "base.qcow2");
    create_qcow2(&[base.to_str().unwrap(), "2M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 100k"]);
    let top = tmp(&dir, "top.qcow2");
    create_qcow2(&["-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    qemu_io(&top, "qcow2", &["write -P 0x11 64k 4k"]);
    // Rename the backing format extension: the image names its backing file without a format,
    // as images from old tools do.
    let mut b = std::fs::read(&top).unwrap();
    let at = b[..65536]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    b[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&top, b).unwrap();
    let t = top.to_str().unwrap();
    let o = vmm_img(&["info", t]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    let fix = format!("vmm-img rebase -u -b base.qcow2 -F qcow2 {t}");
    assert!(err.contains(&fix), "{err}");
    let words: Vec<&str> = fix.split(' ').collect();
    vmm_img(&words[1..]).status.success().then_some(()).unwrap();
    assert_check_clean(&top);
    let info = json(&String::from_utf8(vmm_img(&["info", "--output=json", t]).stdout).unwrap());
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(
        read_ours(&top, block::Format::Qcow2),
        read_qemu(&top, "qcow2")
    );
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

/// The ranges holding data, by layer, from `qemu-img map --output=json` (zero clusters aside:
/// the engine leaves a range that already reads as zeroes unallocated where qemu-img may
/// write a zero cluster).
fn data_ranges(path: &std::path::Path) -> Vec<(u64, u64, u64)> {
    let n = |e: &serde_json::Value, k: &str| e[k].as_u64().unwrap();
    allocation(path)
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (n(e, "start"), n(e, "length"), n(e, "depth")))
        .collect()
}

#[test]
fn commit_writes_the_top_into_its_base_and_empties_it_as_qemu_img_does() {
    let setup = || {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| tmp(&d, n);
        create_qcow2(&[p("base.qcow2").to_str().unwrap(), "4M"]);
        qemu_io(
            &p("base.qcow2"),
            "qcow2",
            &["write -P 1 0 1M", "write -P 2 3M 64k"],
        );
        create_qcow2(&[
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p("mid.qcow2").to_str().unwrap(),
        ]);
        qemu_io(&p("mid.qcow2"), "qcow2", &["write -P 3 2M 128k"]);
        create_qcow2(&[
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            p("top.qcow2").to_str().unwrap(),
        ]);
        qemu_io(
            &p("top.qcow2"),
            "qcow2",
            &[
                "write -P 7 512k 1M",
                "write -z 3M 64k",
                "write -P 8 4000k 1k",
            ],
        );
        // Larger than the base it is committed to.
        create_qcow2(&[
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p("big.qcow2").to_str().unwrap(),
            "6M",
        ]);
        qemu_io(&p("big.qcow2"), "qcow2", &["write -P 9 5M 64k"]);
        d
    };
    let cases: &[&[&str]] = &[
        &["commit", "top.qcow2"],
        &["commit", "-d", "top.qcow2"],
        &["commit", "-q", "-b", "base.qcow2", "top.qcow2"],
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "base.qcow2"],
        &["commit", "big.qcow2"],
    ];
    for case in cases {
        let (dq, dv) = (setup(), setup());
        let before = read_qemu(&tmp(&dq, "top.qcow2"), "qcow2");
        both(dq.path(), dv.path(), case);
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2", "big.qcow2"] {
            let (q, v) = (tmp(&dq, f), tmp(&dv, f));
            assert_check_clean(&v);
            assert_eq!(data_ranges(&v), data_ranges(&q), "{case:?}: {f}");
            assert!(
                read_qemu(&v, "qcow2") == read_qemu(&q, "qcow2"),
                "{case:?}: {f}"
            );
        }
        // The top still reads what it read (emptied, it reads the base it was committed to).
        assert!(
            read_qemu(&tmp(&dv, "top.qcow2"), "qcow2") == before,
            "{case:?}"
        );
    }
}

/// Where the last cluster in use ends, as `qemu-img check` finds it.
fn end_offset(path: &std::path::Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required (ci/setup installs it): {e}"));
    json(&String::from_utf8_lossy(&out.stdout))["image-end-offset"]
        .as_u64()
        .unwrap()
}

#[test]
fn resize_agrees_with_qemu_img() {
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dq, &dv] {
        let q = tmp(d, "a.qcow2");
        create_qcow2(&[q.to_str().unwrap(), "4M"]);
        qemu_io(&q, "qcow2", &["write -P 3 0 64k", "write -P 4 4032k 64k"]);
        std::fs::write(tmp(d, "a.raw"), vec![6u8; 4 << 20]).unwrap();
        // v2 with an internal snapshot: refused by both.
        let v2 = tmp(d, "v2.qcow2");
        create_qcow2(&["-o", "compat=0.10", v2.to_str().unwrap(), "1M"]);
        let out = Command::new("qemu-img")
            .args(["snapshot", "-c", "s1"])
            .arg(&v2)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // 512-byte clusters: one cluster of L1 entries maps 2 MiB.
        let s = tmp(d, "s.qcow2");
        create_qcow2(&["-o", "cluster_size=512", s.to_str().unwrap(), "1M"]);
        qemu_io(&s, "qcow2", &["write -P 5 0 4k", "write -P 6 1020k 4k"]);
        // 4 KiB clusters (an L2 table maps 2 MiB), a compressed cluster and an internal
        // snapshot of the 64 MiB disk sharing every table.
        let k = tmp(d, "k.qcow2");
        create_qcow2(&["-o", "cluster_size=4k", k.to_str().unwrap(), "64M"]);
        qemu_io(
            &k,
            "qcow2",
            &[
                "write -P 1 0 1M",
                "write -P 2 33M 2M",
                "write -P 3 63M 1M",
                "write -c -P 4 32M 4k",
            ],
        );
        qemu_img(&["snapshot", "-c", "big", k.to_str().unwrap()]);
        qemu_io(&k, "qcow2", &["write -P 5 32M 8k"]);
    }
    let steps: &[&[&str]] = &[
        &["resize", "a.qcow2", "+1M"],
        &["resize", "a.qcow2", "1000"],
        &["resize", "a.qcow2", "2M"],
        &["resize", "-q", "a.qcow2", "-1M"],
        &["resize", "a.qcow2", "8000001"],
        // More L1 entries (one per 512 MiB with 64 KiB clusters).
        &["resize", "-f", "qcow2", "a.qcow2", "2G"],
        &["resize", "a.qcow2", "+100G"],
        // Past 4 TiB the L1 table outgrows its cluster and moves.
        &["resize", "a.qcow2", "+8T"],
        &["resize", "s.qcow2", "64M"],
        // 10240 entries: 160 clusters, inside one refcount block's 256.
        &["resize", "s.qcow2", "+256M"],
        &["resize", "v2.qcow2", "2M"],
        &["resize", "-f", "raw", "a.raw", "2M"],
        &["resize", "-f", "raw", "--shrink", "a.raw", "1000"],
        &["resize", "-f", "raw", "a.raw", "+3M"],
        &["resize", "-f", "raw", "a.raw", "-5M"],
        &["resize", "k.qcow2", "33M"],
        // Inside an L2 table (its tail cleared, the shared table copied), then whole tables.
        &["resize", "--shrink", "k.qcow2", "33M"],
        &["resize", "--shrink", "-q", "k.qcow2", "-1000k"],
        &["resize", "--shrink", "k.qcow2", "1000"],
        // Applying the snapshot grows the disk back to its size.
        &["snapshot", "-a", "big", "k.qcow2"],
        &["resize", "--shrink", "k.qcow2", "1M"],
        &["snapshot", "-a", "1", "k.qcow2"],
        &["resize", "--shrink", "k.qcow2", "512"],
    ];
    for step in steps {
        both(dq.path(), dv.path(), step);
        for image in ["a.qcow2", "s.qcow2", "k.qcow2"] {
            let (q, v) = (tmp(&dq, image), tmp(&dv, image));
            assert_check_clean(&v);
            let size = |p: &std::path::Path| {
                json(&qemu_img(&[
                    "info",
                    "-U",
                    "--output=json",
                    p.to_str().unwrap(),
                ]))["virtual-size"]
                    .clone()
            };
            assert_eq!(size(&v), size(&q), "{step:?}");
            let compare = Command::new("qemu-img")
                .args(["compare", "-U", "-s"])
                .args([&q, &v])
                .output()
                .unwrap();
            assert!(compare.status.success(), "{step:?}: {compare:?}");
            let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
            // A shrink cuts the file after its last cluster in use, as qemu-img does.
            if step.contains(&"--shrink") && step.contains(&image) {
                assert!(len(&v) <= end_offset(&v), "{step:?}: {image}");
            }
        }
        assert!(
            std::fs::read(tmp(&dq, "a.raw")).unwrap() == std::fs::read(tmp(&dv, "a.raw")).unwrap(),
            "{step:?}"
        );
    }
    // The engine reads the grown image (its longer L1 table included), and writes past the old
    // end, where qemu-io then reads what it wrote.
    let v = tmp(&dv, "a.qcow2");
    let img = open_rw(&v);
    assert_eq!(img.size(), (2 << 30) + (100 << 30) + (8 << 40));
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 4032 << 10).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    img.read_at(&mut b, 101 << 30).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    img.write_at(&[9u8; 65536], 101 << 30).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_check_clean(&v);
    qemu_io(&v, "qcow2", &["read -P 9 101G 64k", "read -P 3 0 64k"]);
    // From 8 TiB (its L1 table moved) to 1 MiB, which drops the cluster written at 101 GiB: the
    // file is cut after its last cluster in use. (qemu-img takes minutes to discard 8 TiB.)
    let o = vmm_img(&["resize", "--shrink", v.to_str().unwrap(), "1M"]);
    assert!(o.status.success(), "{o:?}");
    assert_check_clean(&v);
    assert_eq!(open_ro(&v).size(), 1 << 20);
    qemu_io(&v, "qcow2", &["read -P 3 0 64k", "read -P 0 64k 960k"]);
    assert!(std::fs::metadata(&v).unwrap().len() <= end_offset(&v));
    // And the moved L1 of the small-cluster image still maps the data written before.
    let s = tmp(&dv, "s.qcow2");
    qemu_io(&s, "qcow2", &["read -P 5 0 4k", "read -P 6 1020k 4k"]);
}

#[test]
fn amend_changes_compat_and_lazy_refcounts_as_qemu_img_does() {
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dq, &dv] {
        let a = tmp(d, "a.qcow2");
        create_qcow2(&[a.to_str().unwrap(), "4M"]);
        qemu_io(&a, "qcow2", &["write -P 1 0 64k", "write -P 2 1M 64k"]);
        // Dirty: lazy refcounts, and qemu-io aborting before it cleans up.
        let dirty = tmp(d, "dirty.qcow2");
        create_qcow2(&["-o", "lazy_refcounts=on", dirty.to_str().unwrap(), "4M"]);
        let o = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 3 0 128k", "-c", "abort"])
            .arg(&dirty)
            .output()
            .unwrap();
        assert!(!o.status.success());
    }
    let info = |p: &std::path::Path| {
        let v = json(&qemu_img(&[
            "info",
            "-U",
            "--output=json",
            p.to_str().unwrap(),
        ]));
        (v["format-specific"].clone(), v["dirty-flag"].clone())
    };
    let steps: &[&[&str]] = &[
        &["amend", "-o", "compat=0.10", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
        &["amend", "-o", "compat=1.1", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
        &["amend", "-o", "compat=0.10", "a.qcow2"],
        &[
            "amend",
            "-q",
            "-o",
            "compat=0.10,lazy_refcounts=off",
            "a.qcow2",
        ],
        &["amend", "-o", "cluster_size=4k", "a.qcow2"],
        &["amend", "-o", "frobnicate=1", "a.qcow2"],
        &["amend", "a.qcow2"],
        &[
            "amend",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=off",
            "dirty.qcow2",
        ],
    ];
    for step in steps {
        both(dq.path(), dv.path(), step);
        for f in ["a.qcow2", "dirty.qcow2"] {
            let (q, v) = (tmp(&dq, f), tmp(&dv, f));
            assert_eq!(info(&v), info(&q), "{step:?}: {f}");
            assert!(
                read_qemu(&v, "qcow2") == read_qemu(&q, "qcow2"),
                "{step:?}: {f}"
            );
        }
        assert_check_clean(&tmp(&dv, "a.qcow2"));
    }
    assert_check_clean(&tmp(&dv, "dirty.qcow2"));
}

#[test]
fn amend_to_compat_0_10_expands_zero_clusters_as_qemu_img_does() {
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Unallocated zero clusters, zero clusters kept allocated (inside written data) and data,
    // with and without a backing file that could show through.
    let cmds = [
        "write -P 1 0 1M",
        "write -z 256k 128k",
        "write -z 2M 512k",
        "write -P 2 3M 64k",
        "write -z 3M 64k",
    ];
    for d in [&dq, &dv] {
        let base = tmp(d, "base.qcow2");
        create_qcow2(&[base.to_str().unwrap(), "4M"]);
        qemu_io(&base, "qcow2", &["write -P 7 0 4M"]);
        let nb = tmp(d, "nb.qcow2");
        create_qcow2(&[nb.to_str().unwrap(), "4M"]);
        qemu_io(&nb, "qcow2", &cmds);
        let b = tmp(d, "b.qcow2");
        create_qcow2(&["-b", "base.qcow2", "-F", "qcow2", b.to_str().unwrap()]);
        qemu_io(&b, "qcow2", &cmds);
    }
    for f in ["nb.qcow2", "b.qcow2"] {
        both(dq.path(), dv.path(), &["amend", "-o", "compat=0.10", f]);
        let (q, v) = (tmp(&dq, f), tmp(&dv, f));
        assert_check_clean(&v);
        let info = json(&qemu_img(&["info", "--output=json", v.to_str().unwrap()]));
        assert_eq!(info["format-specific"]["data"]["compat"], "0.10", "{f}");
        assert_eq!(
            qemu_img(&["compare", q.to_str().unwrap(), v.to_str().unwrap()]),
            "Images are identical.\n",
            "{f}"
        );
        // Which ranges are allocated, as data or zeroes, where: as qemu-img leaves them.
        assert_eq!(allocation(&v), allocation(&q), "{f}");
    }
}

/// `qemu-img info` of `p` as JSON, without the fields naming paths or the space used on disk.
fn info_but_paths(p: &std::path::Path) -> serde_json::Value {
    let mut v = json(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        p.to_str().unwrap(),
    ]));
    for k in [
        "filename",
        "actual-size",
        "children",
        "full-backing-filename",
    ] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

#[test]
fn amend_rewrites_refcounts_and_resizes_as_qemu_img_does() {
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dq, &dv] {
        // An internal snapshot sharing every cluster (refcounts of 2), 512-byte clusters (many
        // refcount blocks at narrow widths).
        let s = tmp(d, "s.qcow2");
        create_qcow2(&["-o", "cluster_size=512", s.to_str().unwrap(), "4M"]);
        qemu_io(&s, "qcow2", &["write -P 1 0 1M", "write -P 2 3M 1M"]);
        qemu_img(&["snapshot", "-c", "s", s.to_str().unwrap()]);
        qemu_io(&s, "qcow2", &["write -P 3 0 64k"]);
        let v2 = tmp(d, "v2.qcow2");
        create_qcow2(&["-o", "compat=0.10", v2.to_str().unwrap(), "4M"]);
        qemu_io(&v2, "qcow2", &["write -P 4 0 1M"]);
        let o = tmp(d, "o.qcow2");
        create_qcow2(&["-b", "v2.qcow2", "-F", "qcow2", o.to_str().unwrap()]);
        // Version 2 with a snapshot (whose entry records the disk size, as QEMU writes it).
        let u = tmp(d, "u.qcow2");
        create_qcow2(&["-o", "compat=0.10", u.to_str().unwrap(), "4M"]);
        qemu_io(&u, "qcow2", &["write -P 5 0 64k"]);
        qemu_img(&["snapshot", "-c", "s", u.to_str().unwrap()]);
        qemu_io(&u, "qcow2", &["write -P 6 0 64k"]);
        // Version 3 with a snapshot, to go to version 2.
        let w = tmp(d, "w.qcow2");
        create_qcow2(&[w.to_str().unwrap(), "4M"]);
        qemu_io(&w, "qcow2", &["write -P 7 0 64k"]);
        qemu_img(&["snapshot", "-c", "s", w.to_str().unwrap()]);
        qemu_io(&w, "qcow2", &["write -P 8 0 64k"]);
    }
    let info = |p: &std::path::Path| {
        let mut v = info_but_paths(p);
        for sn in v["snapshots"].as_array_mut().into_iter().flatten() {
            sn.as_object_mut().unwrap().remove("date-sec");
            sn.as_object_mut().unwrap().remove("date-nsec");
        }
        v
    };
    let steps: &[&[&str]] = &[
        &["amend", "-o", "refcount_bits=64", "s.qcow2"],
        &["amend", "-o", "refcount_bits=1", "s.qcow2"],
        &["amend", "-o", "refcount_bits=2", "s.qcow2"],
        &["amend", "-o", "refcount_bits=3", "s.qcow2"],
        &["amend", "-o", "size=8M", "s.qcow2"],
        &["amend", "-o", "size=2M,refcount_bits=16", "s.qcow2"],
        &["amend", "-o", "size=1000", "s.qcow2"],
        &["amend", "-o", "refcount_bits=8", "v2.qcow2"],
        &["amend", "-o", "compat=1.1,refcount_bits=8", "v2.qcow2"],
        &["amend", "-o", "refcount_bits=16,compat=0.10", "v2.qcow2"],
        &["amend", "-o", "backing_file=v2.qcow2", "o.qcow2"],
        &[
            "amend",
            "-o",
            "backing_file=v2.qcow2,backing_fmt=raw",
            "o.qcow2",
        ],
        &[
            "amend",
            "-o",
            "backing_file=v2.qcow2,backing_fmt=qcow2",
            "o.qcow2",
        ],
        &["amend", "-o", "encrypt.format=luks", "o.qcow2"],
        &["amend", "-o", "data_file=x", "o.qcow2"],
        &["amend", "-o", "data_file_raw=on", "o.qcow2"],
        &["amend", "-o", "compat=1.1", "u.qcow2"],
        &["amend", "-o", "refcount_bits=4", "u.qcow2"],
        &["amend", "-o", "compat=0.10", "w.qcow2"],
    ];
    for step in steps {
        both(dq.path(), dv.path(), step);
        // The image the step names (its last argument).
        if let Some(&f) = step.last() {
            let (q, v) = (tmp(&dq, f), tmp(&dv, f));
            assert_check_clean(&v);
            assert_eq!(info(&v), info(&q), "{step:?}: {f}");
            assert!(
                read_qemu(&v, "qcow2") == read_qemu(&q, "qcow2"),
                "{step:?}: {f}"
            );
        }
    }
    // The snapshot survived every rewrite: applied, it holds what it held.
    let s = tmp(&dv, "s.qcow2");
    let o = vmm_img(&["snapshot", "-a", "s", s.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    assert_check_clean(&s);
    qemu_io(&s, "qcow2", &["read -P 1 0 1M", "read -P 2 3M 1M"]);
    let u = tmp(&dv, "u.qcow2");
    let o = vmm_img(&["snapshot", "-a", "s", u.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    qemu_io(&u, "qcow2", &["read -P 5 0 64k"]);
    // A zero cluster that only a snapshot holds is refused (qemu-img rewrites it), untouched.
    let z = tmp(&dv, "z.qcow2");
    create_qcow2(&[z.to_str().unwrap(), "4M"]);
    qemu_io(&z, "qcow2", &["write -z 1M 64k"]);
    qemu_img(&["snapshot", "-c", "s", z.to_str().unwrap()]);
    qemu_io(&z, "qcow2", &["discard 1M 64k"]);
    let before = std::fs::read(&z).unwrap();
    let o = vmm_img(&["amend", "-o", "compat=0.10", z.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a zero cluster in snapshot 's'"));
    assert!(std::fs::read(&z).unwrap() == before);
}

#[test]
fn create_takes_size_and_backing_in_options_as_qemu_img_does() {
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dq, &dv] {
        create_qcow2(&[tmp(d, "base.qcow2").to_str().unwrap(), "4M"]);
    }
    let o = "backing_file=base.qcow2,backing_fmt=qcow2,preallocation=off";
    let steps: &[&[&str]] = &[
        &["create", "-q", "-f", "qcow2", "-o", o, "a.qcow2"],
        &[
            "create", "-q", "-f", "qcow2", "-o", o, "-o", "size=1M", "b.qcow2",
        ],
        &[
            "create", "-q", "-f", "qcow2", "-o", "size=1M", "c.qcow2", "2M",
        ],
    ];
    // The last is refused by both (a size twice): no image.
    for (step, f) in steps.iter().zip([Some("a.qcow2"), Some("b.qcow2"), None]) {
        both(dq.path(), dv.path(), step);
        if let Some(f) = f {
            assert_eq!(
                info_but_paths(&tmp(&dv, f)),
                info_but_paths(&tmp(&dq, f)),
                "{step:?}"
            );
        }
    }
    assert!(!tmp(&dv, "c.qcow2").exists());
}

#[test]
fn measure_gives_qemu_img_figures() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp(&dir, n);
    create_qcow2(&[p("base.qcow2").to_str().unwrap(), "10M"]);
    qemu_io(
        &p("base.qcow2"),
        "qcow2",
        &["write -P 1 0 100k", "write -P 2 5M 1k", "write -z 6M 1M"],
    );
    create_qcow2(&[
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p("top.qcow2").to_str().unwrap(),
    ]);
    qemu_io(&p("top.qcow2"), "qcow2", &["write -P 3 9M 300k"]);
    // A raw file with a hole and a tail that is not a whole cluster.
    let mut raw = vec![7u8; 3 << 20];
    raw[1 << 20..2 << 20].fill(0);
    raw.truncate((3 << 20) - 1000);
    std::fs::write(p("data.raw"), raw).unwrap();
    let files = ["base.qcow2", "top.qcow2", "data.raw"];
    let option_sets: &[&[&str]] = &[
        &[],
        &["-o", "cluster_size=4k"],
        &["-o", "cluster_size=2M,refcount_bits=1"],
        &["-o", "extended_l2=on"],
        &["-o", "compat=0.10"],
        &["-o", "preallocation=full"],
    ];
    for out in ["raw", "qcow2"] {
        for opts in option_sets {
            if out == "raw" && !opts.is_empty() {
                continue;
            }
            for output in ["--output=human", "--output=json"] {
                for f in files {
                    let mut args = vec!["measure", output, "-O", out];
                    args.extend_from_slice(opts);
                    args.push(f);
                    same_as_qemu_img(dir.path(), &args);
                }
                for size in ["1000", "1G", "3T"] {
                    let mut args = vec!["measure", output, "-O", out, "--size", size];
                    args.extend_from_slice(opts);
                    same_as_qemu_img(dir.path(), &args);
                }
            }
        }
    }
    for bad in [
        &["measure", "-O", "qcow2"][..],
        &["measure", "--size", "1G", "-O", "qcow2", "base.qcow2"],
        &["measure", "--size", "1G", "--output=yaml"],
    ] {
        same_as_qemu_img(dir.path(), bad);
    }
}

#[test]
fn snapshot_list_is_qemu_img_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp(&dir, n);
    let s = p("s.qcow2");
    create_qcow2(&[s.to_str().unwrap(), "4M"]);
    qemu_img(&["snapshot", "-c", "first", s.to_str().unwrap()]);
    qemu_io(&s, "qcow2", &["write -P 1 0 64k"]);
    qemu_img(&[
        "snapshot",
        "-c",
        "a much longer snapshot name than sixteen",
        s.to_str().unwrap(),
    ]);
    create_qcow2(&[p("none.qcow2").to_str().unwrap(), "4M"]);
    std::fs::write(p("r.raw"), [0u8; 4096]).unwrap();
    for args in [
        &["snapshot", "-l", "s.qcow2"][..],
        &["snapshot", "s.qcow2"],
        &["snapshot", "-l", "none.qcow2"],
        &["snapshot", "-l", "-f", "raw", "r.raw"],
    ] {
        same_as_qemu_img(dir.path(), args);
    }
    // The engine reads the image with its snapshots as before.
    assert_check_clean(&s);
}

#[test]
fn dd_copies_what_qemu_img_dd_copies() {
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dq, &dv] {
        let a = tmp(d, "a.qcow2");
        create_qcow2(&[a.to_str().unwrap(), "4M"]);
        qemu_io(&a, "qcow2", &["write -P 1 0 100k", "write -P 2 3M 1000"]);
    }
    let cases: &[(&[&str], &str)] = &[
        (
            &["dd", "if=a.qcow2", "of=o1.img", "bs=64k", "count=3"],
            "raw",
        ),
        (
            &["dd", "if=a.qcow2", "of=o2.img", "bs=64k", "skip=47"],
            "raw",
        ),
        (
            &[
                "dd",
                "-O",
                "qcow2",
                "if=a.qcow2",
                "of=o3.img",
                "bs=64k",
                "count=3",
                "skip=1",
            ],
            "qcow2",
        ),
        (
            &[
                "dd",
                "if=a.qcow2",
                "of=o4.img",
                "bs=1k",
                "count=5",
                "skip=3",
            ],
            "raw",
        ),
        (&["dd", "-f", "qcow2", "if=a.qcow2", "of=o5.img"], "raw"),
        (
            &["dd", "if=a.qcow2", "of=o6.img", "bs=64k", "skip=100"],
            "raw",
        ),
        (&["dd", "if=a.qcow2", "of=o7.img", "bs=0"], ""),
        (&["dd", "if=a.qcow2", "of=o8.img", "frob=1"], ""),
        (&["dd", "of=o9.img"], ""),
    ];
    for (args, fmt) in cases {
        both(dq.path(), dv.path(), args);
        if fmt.is_empty() {
            continue;
        }
        let out = args.iter().find_map(|a| a.strip_prefix("of=")).unwrap();
        let (q, v) = (tmp(&dq, out), tmp(&dv, out));
        if std::fs::metadata(&q).unwrap().len() == 0 {
            assert_eq!(std::fs::metadata(&v).unwrap().len(), 0, "{args:?}");
            continue;
        }
        assert!(read_qemu(&v, fmt) == read_qemu(&q, fmt), "{args:?}");
    }
}

#[test]
fn convert_sparse_size_and_coroutine_flags_as_qemu_img_does() {
    use std::os::unix::fs::MetadataExt;
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dq, &dv] {
        // Data with runs of zeroes of 128 KiB and 2 KiB inside it, and unallocated ranges.
        let src = tmp(d, "src.qcow2");
        create_qcow2(&[src.to_str().unwrap(), "4M"]);
        qemu_io(
            &src,
            "qcow2",
            &[
                "write -P 1 0 1M",
                "write -P 0 64k 128k",
                "write -P 0 512k 2k",
                "write -P 3 3M 64k",
            ],
        );
    }
    for s in [None, Some("0"), Some("512"), Some("4k"), Some("1M")] {
        for fmt in ["raw", "qcow2"] {
            let mut args = vec!["convert", "-O", fmt];
            if let Some(s) = s {
                args.extend(["-S", s]);
            }
            args.extend(["-m", "4", "-W", "src.qcow2", "out"]);
            both(dq.path(), dv.path(), &args);
            let (q, v) = (tmp(&dq, "out"), tmp(&dv, "out"));
            assert!(read_qemu(&v, fmt) == read_qemu(&q, fmt), "{args:?}");
            // Which ranges are allocated (and, raw, how much of the file), as qemu-img's.
            assert_eq!(allocation(&v), allocation(&q), "{args:?}");
            if fmt == "raw" {
                let blocks = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks();
                assert_eq!(blocks(&v), blocks(&q), "{args:?}");
            }
        }
    }
    // The values qemu-img refuses, with its messages.
    for bad in [
        ["-S", "x"],
        ["-S", "-1"],
        ["-S", "511"],
        ["-S", "17M"],
        ["-m", "0"],
        ["-m", "17"],
        ["-m", "x"],
    ] {
        let args = ["convert", bad[0], bad[1], "src.qcow2", "bad"];
        both(dq.path(), dv.path(), &args);
        let theirs = Command::new("qemu-img")
            .current_dir(dq.path())
            .args(args)
            .output()
            .unwrap();
        let theirs = String::from_utf8_lossy(&theirs.stderr);
        let ours = Command::new(env!("CARGO_BIN_EXE_vmm-img"))
            .current_dir(dv.path())
            .args(args)
            .output()
            .unwrap();
        let ours = String::from_utf8_lossy(&ours.stderr);
        let message = theirs
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("qemu-img: ");
        assert!(ours.contains(message), "{args:?}: {ours} / {theirs}");
        assert!(!tmp(&dv, "bad").exists(), "{args:?}");
    }
}

#[test]
fn create_preallocates_and_lists_its_options_as_qemu_img_does() {
    use std::os::unix::fs::MetadataExt;
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for mode in ["metadata", "falloc", "full"] {
        for extra in ["cluster_size=4k", "cluster_size=64k", "extended_l2=on"] {
            let opts = format!("preallocation={mode},{extra}");
            let args = ["create", "-q", "-f", "qcow2", "-o", &opts, "p.qcow2", "3M"];
            both(dq.path(), dv.path(), &args);
            let (q, v) = (tmp(&dq, "p.qcow2"), tmp(&dv, "p.qcow2"));
            assert_check_clean(&v);
            // Every cluster mapped, as data that reads as zeroes (or reserved, extended L2).
            assert_eq!(allocation(&v), allocation(&q), "{args:?}");
            assert_eq!(
                std::fs::metadata(&v).unwrap().len(),
                std::fs::metadata(&q).unwrap().len(),
                "{args:?}"
            );
            // The engine writes into it in place and reads it back.
            let img = open_rw(&v);
            img.write_at(&[7; 4096], 70 << 10).unwrap();
            img.flush().unwrap();
            drop(img);
            qemu_io(&v, "qcow2", &["read -P 7 70k 4k", "read -P 0 0 70k"]);
            assert_check_clean(&v);
        }
    }
    let blocks = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks();
    for mode in ["falloc", "full"] {
        let opts = format!("preallocation={mode}");
        both(
            dq.path(),
            dv.path(),
            &["create", "-q", "-f", "raw", "-o", &opts, "p.raw", "1M"],
        );
        assert_eq!(
            blocks(&tmp(&dv, "p.raw")),
            blocks(&tmp(&dq, "p.raw")),
            "{mode}"
        );
    }
    // Refused as qemu-img refuses them.
    for (fmt, opts) in [
        ("raw", "preallocation=metadata"),
        ("qcow2", "preallocation=x"),
    ] {
        both(
            dq.path(),
            dv.path(),
            &["create", "-q", "-f", fmt, "-o", opts, "bad", "1M"],
        );
    }
    // `-o help` and `-o ?`: the options taken, each line as qemu-img prints it; nothing made.
    let (h, hr) = (tmp(&dv, "h.qcow2"), tmp(&dv, "h.raw"));
    for args in [
        &["create", "-f", "qcow2", "-o", "help"][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,?",
            h.to_str().unwrap(),
        ],
        &["create", "-f", "raw", "-o", "help", hr.to_str().unwrap()],
    ] {
        let theirs = qemu_img(args);
        let o = vmm_img(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let ours = String::from_utf8_lossy(&o.stdout);
        assert_eq!(ours.lines().next(), theirs.lines().next(), "{args:?}");
        assert!(ours.lines().count() > 2, "{args:?}: {ours}");
        for line in ours.lines() {
            assert!(theirs.lines().any(|l| l == line), "{args:?}: {line}");
        }
    }
    assert!(!h.exists() && !hr.exists());
}
