//! The debug log (`-D FILE`): every `log` record, with a timestamp and the thread's name.
//!
//! Timestamps count seconds from the log's start; its first line gives that start as Unix time (to
//! the microsecond), so that a benchmark can place the VMM's own steps (the `startup:` lines: the
//! sandbox's seccomp filters, guest memory, kernel, initramfs, ACPI tables, vCPUs, the sandbox's
//! Landlock rules, each vCPU's first `KVM_RUN`) on its own clock.
//!
//! Without `-D` nothing is logged: the terminal belongs to the guest's console, and the VMM's own
//! errors reach stderr through `main`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Errors from setting up the debug log.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The file could not be created.
    #[error("Cannot create debug log {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another logger was installed first.
    #[error("A logger is already installed")]
    AlreadySet,
}

/// Writes records to a file.
struct FileLogger {
    file: Mutex<File>,
    start: Instant,
}

impl log::Log for FileLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let elapsed = self.start.elapsed();
        let thread = std::thread::current();
        let line = format!(
            "[{:>5}.{:06}] {:<5} {}: {}\n",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            thread.name().unwrap_or("?"),
            record.args()
        );
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A log line that cannot be written has nowhere else to go.
        let _ = file.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = file.flush();
    }
}

/// Sends every log record to `path` from now on.
pub fn init(path: &Path) -> Result<(), LoggerError> {
    let file = File::create(path).map_err(|source| LoggerError::Create {
        path: path.to_owned(),
        source,
    })?;
    let start = Instant::now();
    // A clock before 1970 would be a broken host; the log then says 0.
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // The logger lives as long as the process: leaking it is what `log` expects.
    let logger: &'static FileLogger = Box::leak(Box::new(FileLogger {
        file: Mutex::new(file),
        start,
    }));
    log::set_logger(logger).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(log::LevelFilter::Debug);
    log::info!(
        "debug log started at Unix time {}.{:06}",
        unix.as_secs(),
        unix.subsec_micros()
    );
    Ok(())
}
