//! Running the inner half of the harness where Linux guests boot: `resources/nested-host` (which
//! picks direct KVM or the nested host by itself and says which on stderr) runs a one-line script
//! that calls this same binary, copied in with `--bin` beside the VMM under test. One call is one
//! outer host, however many guests the inner half boots.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors running the outer host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This binary's own path is unknown, so it cannot be copied in.
    #[error("cannot find this executable")]
    CurrentExe(#[source] std::io::Error),
    /// The script file could not be written.
    #[error("cannot write the script {path}")]
    Script {
        /// The script file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `resources/nested-host` could not be started.
    #[error("cannot run {path}")]
    Spawn {
        /// The nested-host script.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The outer host failed twice (nested-host's exit status 125).
    #[error("the outer host failed twice (see the nested-host lines above)")]
    OuterHost,
}

/// Where the outer host runs the inner half.
#[derive(Debug, Clone)]
pub struct Host {
    /// `resources/` of this repository.
    pub resources: PathBuf,
    /// Extra executables to put on the inner PATH (the VMM under test).
    pub bins: Vec<PathBuf>,
    /// `--nested` or `--direct` to force the choice; None lets nested-host pick.
    pub force: Option<&'static str>,
    /// A folder to give the inner half as `$DISK_DIR` (a writable copy, on ext4).
    pub disk_dir: Option<PathBuf>,
    /// Words for the nested outer kernel's command line (nested-host's `--append`).
    pub outer_append: Option<&'static str>,
}

impl Host {
    /// Runs `linux-tests ARGS` on the host that boots Linux guests, with `$GUEST_DIR` appended as
    /// `--guest-dir`. Returns its exit code and its output (stdout and stderr, nothing else).
    pub fn run_inner(&self, args: &[String]) -> Result<(i32, String), Error> {
        let me = std::env::current_exe().map_err(Error::CurrentExe)?;
        let script = std::env::temp_dir().join(format!("linux-tests-{}.sh", std::process::id()));
        let mut line = String::from("exec linux-tests");
        for a in args {
            line.push_str(&format!(" '{}'", a.replace('\'', r"'\''")));
        }
        line.push_str(" --guest-dir \"$GUEST_DIR\"\n");
        std::fs::write(&script, line).map_err(|source| Error::Script {
            path: script.clone(),
            source,
        })?;
        let nested_host = self.resources.join("nested-host");
        let mut c = Command::new(&nested_host);
        c.arg("--script").arg(&script).arg("--bin").arg(&me);
        for b in &self.bins {
            c.arg("--bin").arg(b);
        }
        if let Some(f) = self.force {
            c.arg(f);
        }
        if let Some(d) = &self.disk_dir {
            c.arg("--disk-dir").arg(d);
        }
        if let Some(a) = self.outer_append {
            c.arg("--append").arg(a);
        }
        let out = c
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| Error::Spawn {
                path: nested_host,
                source,
            });
        // The script is not needed any more, whatever happened.
        let _ = std::fs::remove_file(&script);
        let out = out?;
        let code = out.status.code().unwrap_or(-1);
        if code == 125 {
            return Err(Error::OuterHost);
        }
        Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

/// The repository's root, as seen from this crate's sources (`tests/` is one level down).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.join(".."), Path::to_path_buf)
}

/// The repository's `resources/` directory.
pub fn default_resources() -> PathBuf {
    repo_root().join("resources")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_outer_kernels_words_go_to_nested_host_as_append() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nested-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("nested-host");
        std::fs::write(&fake, "#!/bin/sh\nprintf '%s|' \"$@\"\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let host = |outer_append| Host {
            resources: dir.clone(),
            bins: vec![],
            force: None,
            disk_dir: None,
            outer_append,
        };
        let (_, with) = host(Some("init_on_free=1")).run_inner(&[]).unwrap();
        let (_, without) = host(None).run_inner(&[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(with.contains("|--append|init_on_free=1|"), "{with}");
        assert!(!without.contains("--append"), "{without}");
    }

    #[test]
    fn a_missing_nested_host_is_named() {
        let host = Host {
            resources: PathBuf::from("/nonexistent"),
            bins: vec![],
            force: None,
            disk_dir: None,
            outer_append: None,
        };
        let err = host.run_inner(&[]).unwrap_err();
        assert!(
            matches!(err, Error::Spawn { ref path, .. } if path == Path::new("/nonexistent/nested-host"))
        );
    }

    #[test]
    fn the_resources_directory_holds_nested_host() {
        assert!(default_resources().join("nested-host").is_file());
    }
}
