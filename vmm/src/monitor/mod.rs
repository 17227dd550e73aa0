//! The QMP monitor, close enough to QEMU's (`docs/interop/qmp-spec.rst`) that QEMU's own clients
//! (`qemu.qmp`, `qmp-shell`) work unchanged.
//!
//! Wiring, from the VMM's side:
//! 1. the CLI parses each `-qmp` value with [`parse_qmp_option`];
//! 2. before the VM starts, [`Listener::bind`] binds the socket (and, for `wait=on`, waits for the
//!    first client, as QEMU does) and [`event_channel`] makes the channel through which the VM's
//!    threads raise events (`SHUTDOWN` when the guest powers off, say) with an [`events::EventSender`];
//! 3. [`Monitor::new`] takes the listener, the channel's receiver and the tag under which the main
//!    loop registers the monitor's descriptors; the main loop's subscriber for that tag calls
//!    [`Monitor::init`] once and [`Monitor::process`] for each event, with the global lock held,
//!    passing the [`MonitorBackend`] (the VM) that commands act on.
//!
//! Files: `options.rs` (the flag), `listener.rs` (sockets), `framing.rs` (QEMU's lexer and
//! streamer: the byte stream cut into JSON values, with QEMU's limits and error recovery),
//! `json.rs` (QEMU's JSON grammar: duplicate keys refused), `protocol.rs` (messages on the wire),
//! `args.rs` (argument checks), `commands.rs` (negotiation and commands), `events.rs` (events and
//! their channel), `backend.rs` (what the VM provides), `disk_stats.rs` (a virtio-blk disk's
//! statistics in QEMU's shape), `jobs.rs` (the block job commands), `qom.rs` (`qom-list`/`qom-get`/`qom-set` on the iothreads), `server.rs` (the sockets on the event loop). Locking is described
//! in `server.rs` and `backend.rs`: commands run on the main loop with the global lock held.

mod args;
mod backend;
mod commands;
mod disk_stats;
mod events;
mod framing;
mod jobs;
mod json;
mod listener;
mod options;
mod protocol;
mod qom;
mod server;
mod vm;

#[cfg(test)]
mod test_backend;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use backend::{
    BackendError, BlockDevice, BlockDeviceStats, BlockJobInfo, BlockStages, CacheMode,
    HistogramChange, ImageDescription, ImageNodes, IoThreadInfo, JobCommand, MonitorBackend,
    RunState, SnapshotMode,
};
pub use disk_stats::{
    apply_histogram_change, apply_stage_histograms, block_device_stats, block_stages,
};
#[cfg(test)]
pub(crate) use events::EventReceiver;
pub use events::{event_channel, BlockIoError, EventSender, JobEvent, QmpEvent, ShutdownCause};
pub use listener::Listener;
pub use options::{parse_qmp_option, QmpAddress, QmpOptionError, QmpOptions};
pub use server::Monitor;
pub use vm::{shutdown_cause, VmDisk, VmMonitor};

/// Errors setting up the monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Looking at what is at the unix socket path failed.
    #[error("Cannot inspect {path}")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the unix socket path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Removing an old socket at the path failed.
    #[error("Cannot remove the old socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding the unix socket failed.
    #[error("Cannot listen on {path}")]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Resolving the TCP host failed.
    #[error("Cannot resolve {host}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// Binding the TCP socket failed.
    #[error("Cannot listen on {address}")]
    BindTcp {
        /// `host:port`.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the first client (`wait=on`) failed.
    #[error("Waiting for the first QMP client failed")]
    Wait(#[source] io::Error),
    /// Making the listening socket non-blocking failed.
    #[error("Cannot make the QMP socket non-blocking")]
    NonBlocking(#[source] io::Error),
    /// Creating the event channel's eventfd failed.
    #[error("Cannot create the monitor's event channel")]
    EventFd(#[source] io::Error),
}
