//! What the virtio transports share: the driver's queue set-up, the device status with feature
//! negotiation, activation at DRIVER_OK and the reset that drains the device. The transports
//! (virtio-mmio, virtio-pci) only decode their registers into these.
//!
//! Locking (the transports' module docs say more): the state is behind a mutex only vCPUs take,
//! for plain field updates and across activation, which acquires the device's contexts under it
//! (order: transport state, then the contexts in lock order). A reset (Status = 0) of an active
//! device marks the state resetting, releases the mutex, drains the device with only its
//! contexts acquired, then clears the state; meanwhile writes are ignored and Status reads
//! non-zero.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::context::Context;

use super::{
    features, status, ActivateError, Activation, GuestMemoryMmap, Interrupt, TransportError,
    VirtioDevice,
};

/// What the driver set up for one queue before DRIVER_OK.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct QueueSetup {
    pub(super) size: u16,
    pub(super) ready: bool,
    pub(super) desc: u64,
    pub(super) driver: u64,
    pub(super) device: u64,
}

/// Transport state, changed by vCPUs only.
#[derive(Debug)]
pub(super) struct State {
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) queues: Vec<QueueSetup>,
    pub(super) active: bool,
    /// A reset is draining the device (with the mutex released): writes are ignored.
    pub(super) resetting: bool,
}

impl State {
    /// The state after a reset, for a device with `queues` queues.
    pub(super) fn new(queues: usize) -> Self {
        State {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![QueueSetup::default(); queues],
            active: false,
            resetting: false,
        }
    }
}

/// Replaces the low or high half of a 64-bit value.
pub(super) fn set_half(value: &mut u64, half: u32, high: bool) {
    *value = if high {
        (*value & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*value & !0xffff_ffff) | u64::from(half)
    };
}

/// The low or high half of a 64-bit value.
pub(super) fn half(value: u64, high: bool) -> u32 {
    let shifted = if high { value >> 32 } else { value };
    u32::try_from(shifted & 0xffff_ffff).unwrap_or(0)
}

/// A device and the transport state every transport keeps for it.
pub(super) struct Core {
    /// The transport's name, for the log.
    pub(super) name: &'static str,
    pub(super) device: Arc<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queue_events: Vec<EventFd>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(self.name)
            .field("device_type", &self.device.device_type())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// The state of `device` behind transport `name`, with one notification eventfd per queue.
    pub(super) fn new(
        name: &'static str,
        device: Arc<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Result<Self, TransportError> {
        let count = device.queue_max_sizes().len();
        let queue_events = (0..count)
            .map(|i| EventFd::new(EFD_NONBLOCK).map_err(|e| TransportError::QueueEventFd(i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Core {
            name,
            device,
            mem,
            interrupt: Arc::new(interrupt),
            queue_events,
            state: Mutex::new(State::new(count)),
        })
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // State updates are plain field stores that cannot panic half-way.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Device status as the driver reads it: what it wrote, and DEVICE_NEEDS_RESET when the
    /// device asked for a reset.
    pub(super) fn status(&self, state: &State) -> u32 {
        if self.interrupt.needs_reset() {
            state.status | status::DEVICE_NEEDS_RESET
        } else {
            state.status
        }
    }

    /// A notification of queue `index` that reached the transport (no ioeventfd caught it):
    /// signals the same eventfd.
    pub(super) fn notify(&self, index: u64) {
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.queue_events.get(i))
        {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    log::warn!("{}: cannot signal queue {index}: {e}", self.name);
                }
            }
            None => log::warn!("{}: notify of missing queue {index}", self.name),
        }
    }

    /// A write to device configuration space, with the device's contexts acquired.
    pub(super) fn write_config(&self, offset: u64, data: &[u8]) {
        let _guards = Context::acquire_all(self.device.contexts());
        self.device.write_config(offset, data);
    }

    /// A Status write: reset (0), feature negotiation (FEATURES_OK) and activation (DRIVER_OK).
    pub(super) fn write_status(&self, value: u32) {
        let mut state = self.state();
        if state.resetting {
            log::warn!("{}: status {value:#x} ignored during a reset", self.name);
            return;
        }
        if value == 0 {
            if state.active {
                state.resetting = true;
                drop(state);
                self.reset_device();
            } else {
                *state = State::new(state.queues.len());
                self.interrupt.reset();
            }
            return;
        }
        // The driver only ever adds bits (3.1.1); anything else is ignored.
        if value & state.status != state.status {
            log::warn!(
                "{}: status {:#x} -> {value:#x} ignored",
                self.name,
                state.status
            );
            return;
        }
        let mut value = value;
        let added = value & !state.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let acked = state.driver_features;
            // Modern devices only, and nothing the device did not offer (3.1.1, 6.1).
            if acked & !offered != 0 || acked & features::VERSION_1 == 0 {
                log::warn!("{}: driver features {acked:#x} refused", self.name);
                value &= !status::FEATURES_OK;
            }
        }
        state.status = value;
        if added & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 && !state.active {
            if let Err(e) = self.activate(&mut state) {
                log::error!("{}: {e}", self.name);
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Builds the queues from the driver's set-up and starts the device.
    fn activate(&self, state: &mut State) -> Result<(), ActivateError> {
        let event_idx = state.driver_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(state.queues.len());
        for (setup, max) in state.queues.iter().zip(self.device.queue_max_sizes()) {
            let mut queue = Queue::new(*max).map_err(|_| ActivateError::QueueSize(*max))?;
            if setup.ready {
                // A queue the driver set up wrongly (size, alignment, rings outside memory) is
                // never used: the device sees it not ready.
                let usable = queue.try_set_size(setup.size).is_ok()
                    && queue
                        .try_set_desc_table_address(GuestAddress(setup.desc))
                        .is_ok()
                    && queue
                        .try_set_avail_ring_address(GuestAddress(setup.driver))
                        .is_ok()
                    && queue
                        .try_set_used_ring_address(GuestAddress(setup.device))
                        .is_ok();
                queue.set_event_idx(event_idx);
                queue.set_ready(usable);
                if usable && !queue.is_valid(&self.mem) {
                    queue.set_ready(false);
                }
            }
            queues.push(queue);
        }
        let queue_events = self
            .queue_events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.try_clone()
                    .map_err(|err| ActivateError::CloneEventFd(i, err))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let _guards = Context::acquire_all(self.device.contexts());
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: Arc::clone(&self.interrupt),
            acked_features: state.driver_features,
        })?;
        state.active = true;
        Ok(())
    }

    /// Resets an active device, then the transport (a Status write of 0; the state is marked
    /// resetting). The device drains with the transport's mutex released (see the module
    /// documentation); the contexts are released before the mutex is taken again.
    fn reset_device(&self) {
        {
            let _guards = Context::acquire_all(self.device.contexts());
            self.device.reset();
        }
        let mut state = self.state();
        *state = State::new(state.queues.len());
        self.interrupt.reset();
    }
}
