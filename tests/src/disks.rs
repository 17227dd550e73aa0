//! The disk case of the virtio-blk issue, end to end: the guest's root file system on the top of a
//! qcow2 chain of depth 3 (`resources/rootfs`), the disk on an iothread with `cache=none`. The guest
//! reads a file from each layer, writes a file, syncs and powers off; then `qemu-img check` passes on
//! the top image, the two backing images are byte for byte unchanged, and a second boot reads the
//! file back.
//!
//! The chain's folder comes in as `$DISK_DIR` (nested-host's `--disk-dir`, on ext4 so `cache=none`
//! works); each run works on a copy of it in a folder of its own there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cases::{self, Failure};
use crate::guest::Guest;
use crate::target::{Boot, Kernel, Target};

/// How long a disk boot may take to reach userspace and finish its script.
const DISK_TIMEOUT: Duration = Duration::from_secs(240);
/// What the first boot writes and the second reads back.
const WRITTEN: &str = "written-by-the-first-boot";

/// Errors of the disk case beside the guest's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `$DISK_DIR` is not set: the outer half did not attach the root file system images.
    #[error("DISK_DIR is not set (run linux-tests with --disks)")]
    NoDiskDir,
    /// Copying the chain for this run failed.
    #[error("cannot copy {path}")]
    Copy {
        /// The file being copied or compared.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img check` could not be run.
    #[error("cannot run qemu-img check")]
    CheckSpawn(#[source] std::io::Error),
    /// `qemu-img check` found the top image inconsistent.
    #[error("qemu-img check {path} failed: {output}")]
    Check {
        /// The image.
        path: PathBuf,
        /// What qemu-img said.
        output: String,
    },
    /// A backing image changed although only the top one is writable.
    #[error("backing image {0} changed")]
    BackingChanged(PathBuf),
    /// A boot failed.
    #[error(transparent)]
    Boot(#[from] Failure),
}

/// Runs the chain case for `target`; the Ok detail lists what was checked.
pub fn chain_on_iothread(
    target: Target,
    guest_dir: &Path,
    name: &str,
    transcript: &mut Option<String>,
) -> Result<String, Error> {
    let disk_dir = PathBuf::from(std::env::var_os("DISK_DIR").ok_or(Error::NoDiskDir)?);
    let source = disk_dir.clone();
    let work = disk_dir.join(format!("work-{}", name.replace('/', "-")));
    let copy_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Copy { path, source }
    };
    std::fs::create_dir_all(&work).map_err(copy_err(&work))?;
    for layer in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        std::fs::copy(source.join(layer), work.join(layer))
            .map_err(copy_err(&source.join(layer)))?;
    }
    let top = work.join("top.qcow2");

    let write = "echo \"GUEST-LAYERS $(head -1 /etc/layer-base) $(head -1 /etc/layer-mid) \
                 $(head -1 /etc/layer-top)\"\n"
        .to_owned()
        + &format!("echo {WRITTEN} > /root/written\nsync\necho GUEST-WROTE\npoweroff -f\n");
    let first = boot_disk(target, guest_dir, &top, &write, transcript, |g| {
        let layers = g
            .wait_for("GUEST-LAYERS", DISK_TIMEOUT)
            .map_err(Failure::from)?;
        if layers.text.trim() != "GUEST-LAYERS base mid top" {
            return Err(Failure::Info(layers.text));
        }
        g.wait_for("GUEST-WROTE", DISK_TIMEOUT)
            .map_err(Failure::from)?;
        Ok("layers base, mid and top read".to_owned())
    })?;

    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&top)
        .output()
        .map_err(Error::CheckSpawn)?;
    if !out.status.success() {
        let output = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        return Err(Error::Check { path: top, output });
    }
    for layer in ["base.qcow2", "mid.qcow2"] {
        let (a, b) = (source.join(layer), work.join(layer));
        let same =
            std::fs::read(&a).map_err(copy_err(&a))? == std::fs::read(&b).map_err(copy_err(&b))?;
        if !same {
            return Err(Error::BackingChanged(b));
        }
    }

    let read = "echo \"GUEST-READ $(cat /root/written)\"\npoweroff -f\n";
    boot_disk(target, guest_dir, &top, read, transcript, |g| {
        let want = format!("GUEST-READ {WRITTEN}");
        g.wait_line(&want, DISK_TIMEOUT, |l| l.trim() == want)
            .map_err(Failure::from)?;
        Ok(String::new())
    })?;
    // Only a passing case removes its copy; a failing one leaves it to look at.
    let _ = std::fs::remove_dir_all(&work);
    Ok(format!(
        "{first}; qemu-img check passed, backing images unchanged, the file read back"
    ))
}

/// Boots with the root file system on `top` (disk on an iothread, `cache=none`) and the inline
/// guest script `script`, runs `check`, and expects a clean exit.
fn boot_disk(
    target: Target,
    guest_dir: &Path,
    top: &Path,
    script: &str,
    transcript: &mut Option<String>,
    check: impl FnOnce(&mut Guest) -> Result<String, Failure>,
) -> Result<String, Failure> {
    let append = format!("guest.root=/dev/vda guest.sh={}", base64(script.as_bytes()));
    let mut boot = Boot::new(Kernel::BzImage, 2, 512, &append);
    boot.extra = [
        "-object".to_owned(),
        "iothread,id=io0".to_owned(),
        "-drive".to_owned(),
        format!(
            "file={},format=qcow2,if=none,id=d0,cache=none",
            top.display()
        ),
        "-device".to_owned(),
        "virtio-blk-device,drive=d0,iothread=io0".to_owned(),
    ]
    .into();
    cases::drive(target, &boot, guest_dir, transcript, check)
}

/// Standard base64 (RFC 4648, section 4) with padding, as busybox `base64 -d` reads it.
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk.first(), chunk.get(1), chunk.get(2)].map(|x| x.copied().unwrap_or(0));
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = usize::try_from((n >> (18 - 6 * i)) & 63).unwrap_or(0);
                out.push(char::from(ALPHABET.get(index).copied().unwrap_or(b'A')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_test_vectors() {
        // RFC 4648, section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn without_a_disk_dir_the_case_says_so() {
        if std::env::var_os("DISK_DIR").is_some() {
            return;
        }
        let err =
            chain_on_iothread(Target::Qemu, Path::new("/g"), "qemu/x", &mut None).unwrap_err();
        assert!(matches!(err, Error::NoDiskDir));
    }
}
