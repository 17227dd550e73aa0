//! Opening each drive's image: `block::open_named` with the VMM's rule that a writable image is
//! never guessed raw (a guest could write a qcow2 header there and make the next start read host
//! files), and its failures sorted into the one-line errors a user can act on: a missing file, an
//! image another process uses, a read-write disk on a read-only file, a format to name.
//!
//! Runs while the VM is built, before its iothreads and vCPUs exist: it takes none of the VM's
//! locks, only the images' file locks (QEMU's OFD locks, see `block`).

use block::{Image, OpenOptions, WritableRaw};

use super::DiskError;
use crate::drive::DriveSpec;

/// Sorts an open failure of drive `id` into the errors a user can act on.
fn open_error(drive: &DriveSpec, source: block::Error) -> DiskError {
    let id = drive.id.clone();
    let path = drive.file.display().to_string();
    match &source {
        block::Error::Open { source: io, .. } if io.kind() == std::io::ErrorKind::NotFound => {
            DiskError::FileMissing { id, path }
        }
        block::Error::Open { source: io, .. }
            if !drive.read_only
                && matches!(
                    io.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS)
                ) =>
        {
            DiskError::ReadOnlyFile { id, path }
        }
        block::Error::UnsafeProbe { .. } => DiskError::FormatNeeded { id, path },
        e if e.kind() == block::ErrorKind::Locked => DiskError::Locked { id, path },
        _ => DiskError::Open { id, path, source },
    }
}

/// Opens the image of `drive`, refusing to guess the format where a guess is unsafe (a raw
/// image opened for writing).
pub(super) fn open_image(drive: &DriveSpec) -> Result<Image, DiskError> {
    let opts = OpenOptions {
        format: drive.format,
        read_only: drive.read_only,
        cache: drive.cache.host,
        lock: true,
        cache_sizes: drive.cache_sizes,
    };
    block::open_named(&drive.file, opts, WritableRaw::Refuse).map_err(|e| open_error(drive, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::CacheSetting;
    use block::{DetectZeroes, Format};
    use std::path::{Path, PathBuf};

    fn drive(file: &Path, format: Option<Format>, read_only: bool) -> DriveSpec {
        DriveSpec {
            id: "d0".into(),
            file: file.to_path_buf(),
            format,
            virtio: false,
            cache: CacheSetting::default(),
            read_only,
            discard: false,
            detect_zeroes: DetectZeroes::Off,
            aio: block::aio::Engine::Threads,
            stats_intervals: vec![],
            on_read_error: devices::virtio::block::ErrorPolicy::READ_DEFAULT,
            on_write_error: devices::virtio::block::ErrorPolicy::WRITE_DEFAULT,
            cache_sizes: block::qcow2::CacheSizes::default(),
            node_name: None,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-disks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join(name)
    }

    #[test]
    fn open_errors_by_variant() {
        let missing = temp("missing.img");
        assert!(matches!(
            open_image(&drive(&missing, Some(Format::Raw), false)),
            Err(DiskError::FileMissing { id, .. }) if id == "d0"
        ));
        let raw = temp("raw.img");
        std::fs::write(&raw, vec![0u8; 1 << 20]).expect("writes");
        // Unsafe probe: a writable raw image without format=.
        assert!(matches!(
            open_image(&drive(&raw, None, false)),
            Err(DiskError::FormatNeeded { .. })
        ));
        // Read-only, the probe is safe.
        assert!(open_image(&drive(&raw, None, true)).is_ok());
        // Locked by another writer (an open image holds QEMU's locks).
        let held = open_image(&drive(&raw, Some(Format::Raw), false)).expect("opens");
        assert!(matches!(
            open_image(&drive(&raw, Some(Format::Raw), false)),
            Err(DiskError::Locked { .. })
        ));
        drop(held);
        // Not an image at all: a qcow2 magic with a broken header.
        let bad = temp("bad.qcow2");
        std::fs::write(&bad, b"QFI\xfb\0\0\0\x09").expect("writes");
        assert!(matches!(
            open_image(&drive(&bad, Some(Format::Qcow2), true)),
            Err(DiskError::Open { .. })
        ));
        let _ = std::fs::remove_dir_all(missing.parent().expect("in a dir"));
    }

    #[test]
    fn permission_errors_mean_a_read_only_file() {
        let d = drive(Path::new("/x"), Some(Format::Raw), false);
        let denied = |errno| block::Error::Open {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        for errno in [libc::EACCES, libc::EPERM, libc::EROFS] {
            assert!(matches!(
                open_error(&d, denied(errno)),
                DiskError::ReadOnlyFile { .. }
            ));
        }
        let ro = drive(Path::new("/x"), Some(Format::Raw), true);
        assert!(matches!(
            open_error(&ro, denied(libc::EACCES)),
            DiskError::Open { .. }
        ));
    }
}
