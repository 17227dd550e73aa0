//! What the command line does to the `vmm` process itself: its name (`-name`, with
//! `prctl(PR_SET_NAME)`, which `ps` and `top` show; the kernel keeps 15 bytes of it) and its
//! pidfile (`-pidfile`, written before the VM is built, as QEMU writes it before it waits for a
//! monitor client, and removed when `vmm` ends); and, whatever the command line, the allocator's
//! arena limit ([`limit_arenas`]).

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors in naming the process or writing its pidfile.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A name the kernel cannot take (it holds a NUL byte).
    #[error("Cannot name the process '{0}'")]
    BadName(String),
    /// `prctl(PR_SET_NAME)` failed.
    #[error("Cannot name the process '{name}'")]
    SetName {
        /// The name.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The pidfile cannot be written.
    #[error("Cannot write the pid file {path}")]
    PidFile {
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// glibc's allocator arenas the process may have, all threads sharing them.
const MALLOC_ARENAS: libc::c_int = 2;

/// Limits glibc's allocator to [`MALLOC_ARENAS`], before any other thread exists. glibc's default
/// (8 per CPU) gives nearly every thread that allocates (vCPUs, iothreads, disk workers) an arena
/// of its own, and each keeps what its thread freed resident for that thread alone: the arenas
/// were 1.5 MiB of the VMM's memory beyond guest RAM in a Debian boot. Setting a limit also spares a sandboxed thread's first allocation in a new arena from reading
/// `/sys/devices/system/cpu/online` to work out the default.
pub fn limit_arenas() {
    // SAFETY: mallopt takes two integers and changes only the allocator's tuning.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
}

/// Gives the process (its main thread, the one `ps` names it by) the name `name`.
pub fn set_name(name: &str) -> Result<(), ProcessError> {
    let c_name = CString::new(name).map_err(|_| ProcessError::BadName(name.to_owned()))?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (at most 16 bytes of it) from a valid
    // pointer that outlives the call.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, c_name.as_ptr(), 0, 0, 0) };
    if rc != 0 {
        return Err(ProcessError::SetName {
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A pidfile holding this process's id, removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's id and a newline to `path`, replacing what was there.
    pub fn create(path: &Path) -> Result<Self, ProcessError> {
        let err = |source| ProcessError::PidFile {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::create(path).map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove the pid file {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfile_holds_the_pid_until_dropped() {
        let path = std::env::temp_dir().join(format!("vmm-pidfile-{}", std::process::id()));
        let pidfile = PidFile::create(&path).expect("temp dir is writable");
        let text = std::fs::read_to_string(&path).expect("written");
        assert_eq!(text, format!("{}\n", std::process::id()));
        drop(pidfile);
        assert!(!path.exists());
        assert!(matches!(
            PidFile::create(Path::new("/nonexistent/dir/pid")),
            Err(ProcessError::PidFile { .. })
        ));
    }

    #[test]
    fn a_name_with_a_nul_is_refused() {
        assert!(matches!(set_name("a\0b"), Err(ProcessError::BadName(_))));
    }
}
