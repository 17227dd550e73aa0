//! The disks' contexts: one thread per `-object iothread` (named after its id), each running its
//! own context, polling as its `-object iothread` says, and the main loop's context, which serves
//! every disk without an iothread; the handles the monitor reads and changes their polling
//! settings through; and their end.
//!
//! Threads and locks: an iothread runs its context on its own thread and never takes the global
//! lock; a loop that fails is handed to [`IoThreadFailures`] from that thread, which ends the VM.
//! The main loop's context has no thread of its own: [`MainContext`], a main-loop handler, runs
//! one non-blocking iteration of it per wake-up with the global lock held, as every main-loop
//! handler runs.

use std::sync::Arc;
use std::time::Duration;

use devices::context::{Context, IoThread, IoThreadHandle};
use event_manager::{EventOps, Events};

use super::DiskError;
use crate::drive::IoThreadSpec;
use crate::global::{Held, IoThreadFailures};
use crate::main_loop::{Handler, Tag};

/// The iothreads and the main loop's context.
#[derive(Debug)]
pub(super) struct IoThreads {
    threads: Vec<IoThread>,
    main_ctx: Arc<Context>,
}

impl IoThreads {
    /// Makes the main loop's context, then spawns the iothreads `specs`, each reporting a failed
    /// loop to `failures`.
    pub(super) fn start(
        specs: &[IoThreadSpec],
        failures: &IoThreadFailures,
    ) -> Result<Self, DiskError> {
        let main_ctx = Context::new("main-loop").map_err(DiskError::MainContext)?;
        let mut threads = Vec::with_capacity(specs.len());
        for spec in specs {
            let id = &spec.id;
            let t =
                IoThread::spawn_reporting(id, spec.poll, failures.hook(id)).map_err(|source| {
                    DiskError::IoThread {
                        id: id.clone(),
                        source,
                    }
                })?;
            threads.push(t);
        }
        Ok(Self { threads, main_ctx })
    }

    /// The context of the iothread `iothread`, or the main loop's when it is `None` (or names
    /// no iothread).
    pub(super) fn context(&self, iothread: Option<&str>) -> Arc<Context> {
        match iothread {
            Some(name) => self
                .threads
                .iter()
                .find(|t| t.id() == name)
                .map_or_else(|| Arc::clone(&self.main_ctx), |t| Arc::clone(t.context())),
            None => Arc::clone(&self.main_ctx),
        }
    }

    /// The handler that runs the main loop's context.
    pub(super) fn main_context(&self) -> MainContext {
        MainContext(Arc::clone(&self.main_ctx))
    }

    /// Handles on the iothreads, for `query-iothreads` and `qom-get`/`qom-set`.
    pub(super) fn handles(&self) -> Vec<IoThreadHandle> {
        self.threads.iter().map(IoThread::handle).collect()
    }

    /// Stops every iothread, even when one fails; returns the first failure.
    pub(super) fn stop(self) -> Result<(), DiskError> {
        let mut first = None;
        for t in self.threads {
            let id = t.id().to_owned();
            if let Err(source) = t.stop() {
                first = first.or(Some(DiskError::StopIoThread { id, source }));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The main-loop handler of the main loop's context: one non-blocking iteration per wake-up, with
/// the global lock held (the main loop holds it around every handler).
#[derive(Debug)]
pub struct MainContext(Arc<Context>);

impl Handler for MainContext {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.0.epoll_fd();
        if let Err(e) = ops.add(Events::with_data_raw(
            fd,
            Tag::MainContext as u32,
            vmm_sys_util::epoll::EventSet::IN,
        )) {
            log::error!("main loop: cannot watch the main context: {e:?}");
        }
    }

    fn process(&mut self, _: &mut Held<'_>, _: Tag, _: Events, _: &mut EventOps) {
        if let Err(e) = self.0.run_once(Some(Duration::ZERO)) {
            log::error!("main loop: {e}");
        }
    }
}
