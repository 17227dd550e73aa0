//! `vmm-img`'s command line beside qemu-img's on the same files: `--version`, `--help` on every
//! subcommand, the same refusal of a bad `--output`, and images of the formats QEMU reads and
//! the engine does not, named (as qemu-img names them) instead of read as raw disks.
#![allow(clippy::unwrap_used)]

mod common;
use std::process::{Command, Output};

use common::*;

fn vmm_img(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm-img"))
        .args(args)
        .output()
        .unwrap()
}

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

const COMMANDS: [&str; 7] = ["create", "info", "check", "convert", "map", "bench", "io"];

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
                "key-secret=sec0",
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
