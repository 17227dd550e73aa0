//! Landlock: the files the main thread, and every thread it starts from then on, may open,
//! create or remove, put on just before the vCPU threads start (after every file of the VM is
//! open), where the host kernel has Landlock.
//!
//! What is allowed ([`Grants::new`]):
//! - reading the kernel, the initrd and every image of each disk's backing chain;
//! - writing (and truncating) each writable top image and the debug log (`-D`);
//! - removing files in the directories of the monitor's unix socket and of the pidfile (both are
//!   removed at exit; Landlock grants removal per directory, not per file);
//! - with a monitor (`-qmp`), reading, writing, truncating and creating regular files anywhere
//!   beneath the directories of the chains' images: the monitor's chain commands need files not
//!   known at start (`blockdev-snapshot-sync` creates or opens the overlay the command names;
//!   `block-stream` and `block-commit` reopen backing images read-write; the overlays' own
//!   chains grow later). An overlay elsewhere is refused with EACCES ("Permission denied"): put
//!   it beside an image of the disk's chain. Without a monitor nothing is opened after start,
//!   and the directories get nothing.
//!
//! Nothing else: every other file-system access Landlock knows (ABI 5: executing, listing
//! directories, making directories, sockets, pipes, devices and links, device ioctls) is
//! refused, and so are TCP `bind` and `connect` (ABI 4). Files opened before (`/dev/kvm`, the
//! images, the log, the terminal, the monitor's listening socket) keep working: Landlock checks
//! opens, not the use of descriptors already open.
//!
//! The threads started before (the signal thread, the iothreads, the disk workers of start-up)
//! are outside the Landlock domain, which a thread puts on only for itself and the threads it
//! starts afterwards; their seccomp filters make every `openat` fail with EACCES and allow no
//! call that changes a path but the signal thread's `unlink` of the monitor's socket.
//!
//! A kernel without Landlock (before 5.13, or not enabled at boot) gets one warning line and the
//! seccomp filters alone; an older ABI gets what it knows (an ABI before 3 cannot refuse
//! truncation, for instance).
//!
//! Test hook: `VMM_SANDBOX_TEST_OPEN=MODE:PATH[|MODE:PATH...]` (MODE `r` to read, `w` to open
//! for writing, creating the file if missing) makes the main thread try each open right after
//! its sandbox is on and write one line per path: `vmm: sandbox: test open (MODE) of PATH: ok`
//! or the error. It is meant for tests only.

use std::path::{Path, PathBuf};

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, BitFlags, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, ABI,
};

use crate::cli::Config;
use crate::monitor::QmpAddress;

/// The environment variable of the test hook (see the module documentation).
const TEST_OPEN_VAR: &str = "VMM_SANDBOX_TEST_OPEN";

/// The ABI whose file-system rights are handled (refused unless granted).
const FS_ABI: ABI = ABI::V5;
/// The ABI whose network rights are handled (TCP bind and connect, never granted).
const NET_ABI: ABI = ABI::V4;

/// Errors putting Landlock on.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel has Landlock and refused the rules.
    #[error("Cannot restrict file access with Landlock")]
    Restrict(#[source] RulesetError),
}

/// A file of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// Its path, as the chain opened it.
    pub path: PathBuf,
    /// Whether the disk writes it (the top of a disk that is not read-only).
    pub writable: bool,
}

/// The paths and the rights on them (see the module documentation).
#[derive(Debug, Default, PartialEq, Eq)]
struct Grants {
    /// Files that may be opened for reading.
    read: Vec<PathBuf>,
    /// Files that may be opened for reading and writing, and truncated.
    write: Vec<PathBuf>,
    /// Directories beneath which files may be removed.
    remove: Vec<PathBuf>,
    /// Directories beneath which regular files may be created, read, written and truncated.
    create: Vec<PathBuf>,
}

impl Grants {
    /// What `config` with the disks' `images` needs.
    fn new(config: &Config, images: &[ImageFile]) -> Self {
        let mut g = Self::default();
        g.read.push(config.kernel.clone());
        g.read.extend(config.initrd.iter().cloned());
        g.write.extend(config.debug_log.iter().cloned());
        for image in images {
            let list = if image.writable {
                &mut g.write
            } else {
                &mut g.read
            };
            push_new(list, image.path.clone());
        }
        let socket = config.qmp.as_ref().and_then(|q| match &q.address {
            QmpAddress::Unix(path) => Some(path),
            QmpAddress::Tcp { .. } => None,
        });
        for path in socket.into_iter().chain(&config.pidfile) {
            push_new(&mut g.remove, directory_of(path));
        }
        if config.qmp.is_some() {
            for image in images {
                push_new(&mut g.create, directory_of(&image.path));
            }
        }
        g
    }

    /// Puts the rules on the calling thread (and the threads it starts from now on).
    fn restrict(&self) -> Result<RulesetStatus, RulesetError> {
        let read = BitFlags::from(AccessFs::ReadFile);
        let write = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
        let status = Ruleset::default()
            .handle_access(AccessFs::from_all(FS_ABI))?
            .handle_access(AccessNet::from_all(NET_ABI))?
            .create()?
            .add_rules(path_beneath_rules(&self.read, read))?
            .add_rules(path_beneath_rules(&self.write, write))?
            .add_rules(path_beneath_rules(&self.remove, AccessFs::RemoveFile))?
            .add_rules(path_beneath_rules(&self.create, write | AccessFs::MakeReg))?
            .restrict_self()?;
        Ok(status.ruleset)
    }
}

/// Appends `path` unless `list` has it.
fn push_new(list: &mut Vec<PathBuf>, path: PathBuf) {
    if !list.contains(&path) {
        list.push(path);
    }
}

/// The directory of `path` (`.` for a bare file name).
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Restricts the calling thread's, and its future threads', file access to what `config` and
/// the disks' `images` need (see the module documentation); a kernel without Landlock gets one
/// warning line on stderr.
pub fn restrict(config: &Config, images: &[ImageFile]) -> Result<(), LandlockError> {
    let grants = Grants::new(config, images);
    match grants.restrict().map_err(LandlockError::Restrict)? {
        RulesetStatus::FullyEnforced => log::info!("sandbox: Landlock on: {grants:?}"),
        RulesetStatus::PartiallyEnforced => {
            log::info!("sandbox: Landlock on, with the rights this kernel knows of: {grants:?}")
        }
        RulesetStatus::NotEnforced => {
            eprintln!(
                "vmm: warning: sandbox: this kernel has no Landlock: file access is not restricted"
            );
            return Ok(());
        }
    }
    log::info!("startup: Landlock rules on");
    Ok(())
}

/// The test hook: the opens `VMM_SANDBOX_TEST_OPEN` asks for, one line each.
pub fn test_opens() {
    let Ok(list) = std::env::var(TEST_OPEN_VAR) else {
        return;
    };
    for entry in list.split('|') {
        let (mode, path) = entry.split_once(':').unwrap_or(("r", entry));
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(mode == "w")
            .create(mode == "w")
            .truncate(false)
            .open(path);
        let outcome = opened.map_or_else(|e| e.to_string(), |_| "ok".to_owned());
        eprintln!("vmm: sandbox: test open ({mode}) of {path}: {outcome}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::QmpOptions;

    fn image(path: &str, writable: bool) -> ImageFile {
        ImageFile {
            path: path.into(),
            writable,
        }
    }

    fn config(args: &[&str]) -> Config {
        let args = ["-kernel", "/k/bzImage"].iter().chain(args);
        match crate::cli::parse(args.map(|a| (*a).to_owned())) {
            Ok(crate::cli::Command::Run(config)) => *config,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_a_monitor_only_the_files_are_granted() {
        let c = config(&["-initrd", "/k/initrd", "-D", "/log/vmm.log"]);
        let images = [
            image("/img/top.qcow2", true),
            image("/base/base.raw", false),
            image("/ro/disk.raw", false),
        ];
        assert_eq!(
            Grants::new(&c, &images),
            Grants {
                read: vec![
                    "/k/bzImage".into(),
                    "/k/initrd".into(),
                    "/base/base.raw".into(),
                    "/ro/disk.raw".into()
                ],
                write: vec!["/log/vmm.log".into(), "/img/top.qcow2".into()],
                remove: vec![],
                create: vec![],
            }
        );
    }

    #[test]
    fn a_monitor_gets_its_socket_s_directory_and_the_chains_directories() {
        let mut c = config(&["-pidfile", "/run/vmm.pid"]);
        c.qmp = Some(QmpOptions {
            address: QmpAddress::Unix("/run/qmp.sock".into()),
            wait: false,
        });
        let images = [image("top.qcow2", true), image("/base/base.raw", false)];
        let g = Grants::new(&c, &images);
        assert_eq!(g.remove, vec![PathBuf::from("/run")]);
        assert_eq!(g.create, vec![PathBuf::from("."), PathBuf::from("/base")]);
    }
}
