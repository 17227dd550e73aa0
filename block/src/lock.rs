//! Image locking compatible with QEMU's: open file description (OFD) locks on single bytes of the
//! image file. Byte `100 + n` is read-locked while a user holds permission `n`; byte `200 + n` is
//! read-locked while a user refuses to share permission `n` (QEMU `block/file-posix.c`,
//! `raw_apply_lock_bytes`). Permission bits (QEMU `BLK_PERM_*`): 0 consistent read, 1 write.
//! Every byte is taken with a shared (read) lock, as QEMU does; a conflict is found by asking
//! (`F_OFD_GETLK`) whether another description holds the byte that conflicts with ours.
//!
//! Like QEMU, a writer holds consistent-read and write and refuses to share write; a reader holds
//! consistent read and refuses to share write. So readers share with readers, and a writer
//! excludes everyone else, in both directions with QEMU's tools; the only conflict is over
//! write, so [`Error::Locked`] always names it. Creating an image takes the writer's locks
//! before the file is truncated ([`crate::NewImage`]), so a create is refused while anyone else
//! has the image open, as QEMU's create is. An open with `lock: false` (qemu-img's `-U`) takes
//! nothing and is invisible to the others.
//!
//! OFD locks belong to the open file description, not the process: two opens of one file in the
//! same process conflict like two processes (which is why a backing chain is checked for loops
//! before its files are locked, and `convert` compares its output with its input before locking
//! it). The locks go away when the file is closed, or when the process dies; a refused
//! [`lock_image`] leaves the bytes it already set until its file is closed.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::Error;

/// QEMU's base byte of the "permission held" locks.
const LOCK_BASE_PERM: i64 = 100;
/// QEMU's base byte of the "permission not shared" locks.
const LOCK_BASE_SHARED: i64 = 200;
/// QEMU `BLK_PERM_CONSISTENT_READ`'s bit number.
const PERM_CONSISTENT_READ: i64 = 0;
/// QEMU `BLK_PERM_WRITE`'s bit number.
const PERM_WRITE: i64 = 1;

/// `F_RDLCK`, `F_WRLCK`, `F_UNLCK` and `SEEK_SET` are small constants that fit `c_short`.
fn short(v: libc::c_int) -> libc::c_short {
    libc::c_short::try_from(v).unwrap_or(libc::c_short::MAX)
}

fn flock_at(byte: i64, kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = short(libc::SEEK_SET);
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set(file: &File, path: &str, byte: i64) -> Result<bool, Error> {
    let mut fl = flock_at(byte, short(libc::F_RDLCK));
    // SAFETY: fcntl with F_OFD_SETLK on our own descriptor and a valid flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(Error::Lock {
            path: path.to_string(),
            source: e,
        }),
    }
}

/// Whether another open file description holds a lock on `byte`.
fn taken(file: &File, path: &str, byte: i64) -> Result<bool, Error> {
    let mut fl = flock_at(byte, short(libc::F_WRLCK));
    // SAFETY: fcntl with F_OFD_GETLK on our own descriptor and a valid flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(Error::Lock {
            path: path.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fl.l_type != short(libc::F_UNLCK))
}

/// Takes QEMU-compatible locks on an image file for a read-only or read-write open. The locks
/// last as long as `file` stays open.
pub fn lock_image(file: &File, path: &str, write: bool) -> Result<(), Error> {
    let locked = |perm| Error::Locked {
        path: path.to_string(),
        perm,
    };
    // Our own lock bytes first: if someone refuses to share what we hold, or holds what we refuse
    // to share, the byte we test is theirs, never ours (OFD locks of one description never
    // conflict with themselves).
    let mut held = vec![
        LOCK_BASE_PERM + PERM_CONSISTENT_READ,
        LOCK_BASE_SHARED + PERM_WRITE,
    ];
    if write {
        held.push(LOCK_BASE_PERM + PERM_WRITE);
    }
    for byte in held {
        if !set(file, path, byte)? {
            return Err(locked("write"));
        }
    }
    // Someone holds write, which we refuse to share.
    if taken(file, path, LOCK_BASE_PERM + PERM_WRITE)? && !write {
        return Err(locked("write"));
    }
    if write {
        // With our own read lock on 101 in place, a conflicting test means a second holder.
        // F_OFD_GETLK ignores our own locks, so any lock reported is another user's.
        if taken(file, path, LOCK_BASE_PERM + PERM_WRITE)?
            || taken(file, path, LOCK_BASE_SHARED + PERM_WRITE)?
        {
            return Err(locked("write"));
        }
    }
    Ok(())
}

/// Takes or drops the write permission (byte 101) of a file [`lock_image`] locked for writing,
/// keeping its consistent-read lock and its refusal to share write: dropping it is how a live
/// snapshot turns the old top of a chain into a backing file, which a read-only open of the same
/// file (the new chain's) may then share; taking it again undoes that. Nobody else can have
/// taken write meanwhile (the refusal stayed), so taking it back checks nothing.
pub fn set_write_permission(file: &File, path: &str, write: bool) -> Result<(), Error> {
    if write {
        return match set(file, path, LOCK_BASE_PERM + PERM_WRITE)? {
            true => Ok(()),
            false => Err(Error::Locked {
                path: path.to_string(),
                perm: "write",
            }),
        };
    }
    let mut fl = flock_at(LOCK_BASE_PERM + PERM_WRITE, short(libc::F_UNLCK));
    // SAFETY: fcntl with F_OFD_SETLK on our own descriptor and a valid flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r != 0 {
        return Err(Error::Lock {
            path: path.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A 512-byte file in a temporary directory, opened read-write as often as a test asks.
    struct Scratch {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    impl Scratch {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("img");
            std::fs::write(&path, [0u8; 512]).unwrap();
            Self { _dir: dir, path }
        }

        fn open(&self) -> File {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .unwrap()
        }
    }

    #[test]
    fn a_writer_without_its_write_permission_shares_with_readers_only() {
        let img = Scratch::new();
        let open = || img.open();
        let writer = open();
        lock_image(&writer, "img", true).unwrap();
        let reader = open();
        assert!(lock_image(&reader, "img", false).is_err());
        set_write_permission(&writer, "img", false).unwrap();
        let reader = open();
        lock_image(&reader, "img", false).unwrap();
        // Still refusing to share write: no other writer gets in.
        assert!(lock_image(&open(), "img", true).is_err());
        set_write_permission(&writer, "img", true).unwrap();
        assert!(lock_image(&open(), "img", false).is_err());
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let img = Scratch::new();
        let open = || img.open();
        let r1 = open();
        let r2 = open();
        lock_image(&r1, "img", false).unwrap();
        lock_image(&r2, "img", false).unwrap();
        let w = open();
        assert!(matches!(
            lock_image(&w, "img", true),
            Err(Error::Locked { .. })
        ));
        drop((r1, r2, w));
        let w = open();
        lock_image(&w, "img", true).unwrap();
        let r3 = open();
        assert!(matches!(
            lock_image(&r3, "img", false),
            Err(Error::Locked { .. })
        ));
    }
}
