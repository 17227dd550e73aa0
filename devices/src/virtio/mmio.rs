//! The virtio-mmio transport, modern interface only (virtio 1.2, 4.2 "Virtio Over MMIO", register
//! layout version 2).
//!
//! `read` and `write` take an offset into the device's 0x200-byte window, so the transport plugs
//! into any bus. Registers are 32-bit and aligned (4.2.2.2); other accesses to them are ignored
//! (reads give zeroes). Configuration space (from 0x100) takes any width.
//!
//! Locking: the transport's own state (feature selection, queue set-up, status) is behind a
//! mutex that only vCPUs take, without the global lock (the vmm puts transports on its shared
//! MMIO bus), and only for plain field updates, with one exception: activation at DRIVER_OK
//! acquires the device's contexts under it (order: transport, then contexts).
//! Configuration-space reads take neither (the device serves them from state that needs no
//! lock); configuration-space writes acquire the contexts alone. InterruptStatus and
//! InterruptACK use the atomics of [`Interrupt`] and take neither.
//!
//! A reset (Status = 0) of an active device drains its in-flight requests, which can take as
//! long as the slowest one. It marks the transport resetting under the mutex, releases it, has
//! the device drain with only the device's contexts acquired, then takes the mutex again to clear
//! the transport's state. Meanwhile other vCPUs' register accesses complete at once and see a
//! device being reset (virtio 1.2, 2.4 "Device Reset"): Status reads non-zero until the reset is
//! over, and writes are ignored, since the driver waits for that zero before it sets the device
//! up again. The vCPU that wrote the 0 returns once the reset is over.
//!
//! QueueNotify is normally an ioeventfd the vmm registers at `base + QUEUE_NOTIFY_OFFSET` with
//! the queue index as datamatch; a write that does reach the transport signals the same
//! eventfd.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::transport::{half, set_half, Core};
use super::{status, GuestMemoryMmap, Interrupt, TransportError, VirtioDevice};

/// Size of a virtio-mmio device's MMIO window (registers and configuration space).
pub const MMIO_SIZE: u64 = 0x200;
/// Offset of QueueNotify, where the vmm registers the queues' ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// "virt" in little-endian (4.2.2).
const MAGIC: u32 = 0x7472_6976;
/// The modern register layout.
const VERSION: u32 = 2;
/// Our vendor id: "RVMM" would do as well; QEMU's is used by no driver check, so any value works.
const VENDOR_ID: u32 = 0x554D_4551;
/// Where configuration space starts.
const CONFIG_OFFSET: u64 = 0x100;

/// The registers of 4.2.2, by offset.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// A virtio-mmio transport for one device.
#[derive(Debug)]
pub struct MmioTransport {
    core: Core,
}

impl MmioTransport {
    /// A transport for `device`, with one notification eventfd per queue and an interrupt.
    pub fn new(
        device: Arc<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        let interrupt = Interrupt::new().map_err(TransportError::Irqfd)?;
        Ok(MmioTransport {
            core: Core::new("virtio-mmio", device, mem, interrupt)?,
        })
    }

    /// The eventfds to register as ioeventfds at `base + QUEUE_NOTIFY_OFFSET`, datamatch = index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.core.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.core.interrupt
    }

    /// The eventfd to register with KVM as the device's irqfd.
    pub fn irqfd(&self) -> &EventFd {
        match self.core.interrupt.irqfd() {
            Some(fd) => fd,
            // `new` gives the transport an interrupt with one line, never vectors.
            None => unreachable!("a virtio-mmio interrupt has one line"),
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            // No lock: the device serves configuration space without its context.
            self.core.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        data.fill(0);
        let len = data.len();
        let Ok(out) = <&mut [u8; 4]>::try_from(data) else {
            log::warn!("virtio-mmio: ignored {len}-byte read at {offset:#x}");
            return;
        };
        if !offset.is_multiple_of(4) {
            log::warn!("virtio-mmio: ignored unaligned read at {offset:#x}");
            return;
        }
        *out = self.read_register(offset).to_le_bytes();
    }

    fn read_register(&self, offset: u64) -> u32 {
        // No lock for the interrupt status: vCPUs read it on every interrupt.
        if offset == reg::INTERRUPT_STATUS {
            return self.core.interrupt.status();
        }
        let state = self.core.state();
        let selected = usize::try_from(state.queue_sel).ok().and_then(|i| {
            state
                .queues
                .get(i)
                .copied()
                .zip(self.core.device.queue_max_sizes().get(i))
        });
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.core.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match state.device_features_sel {
                0 => half(self.core.device.features(), false),
                1 => half(self.core.device.features(), true),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => selected.map_or(0, |(_, max)| u32::from(*max)),
            reg::QUEUE_READY => selected.map_or(0, |(q, _)| u32::from(q.ready)),
            reg::STATUS => self.core.status(&state),
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                selected.map_or(0, |(q, _)| half(q.desc, offset == reg::QUEUE_DESC_HIGH))
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                selected.map_or(0, |(q, _)| half(q.driver, offset == reg::QUEUE_DRIVER_HIGH))
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                selected.map_or(0, |(q, _)| half(q.device, offset == reg::QUEUE_DEVICE_HIGH))
            }
            // No shared memory regions: their length reads as -1 (4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.core.device.config_generation(),
            _ => {
                log::warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return self.core.write_config(offset - CONFIG_OFFSET, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            log::warn!("virtio-mmio: ignored unaligned write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }

    fn write_register(&self, offset: u64, value: u32) {
        match offset {
            reg::INTERRUPT_ACK => return self.core.interrupt.ack(value),
            reg::QUEUE_NOTIFY => return self.core.notify(u64::from(value)),
            _ => {}
        }
        if offset == reg::STATUS {
            return self.core.write_status(value);
        }
        let mut state = self.core.state();
        if state.resetting {
            log::warn!("virtio-mmio: write {value:#x} at {offset:#x} ignored during a reset");
            return;
        }
        // Queue and feature set-up is only allowed before the device is live (4.2.3.1.1).
        let setting_up = state.status & status::DRIVER_OK == 0;
        let sel = usize::try_from(state.queue_sel).unwrap_or(usize::MAX);
        match offset {
            reg::DEVICE_FEATURES_SEL => state.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => state.driver_features_sel = value,
            reg::DRIVER_FEATURES if setting_up && state.status & status::FEATURES_OK == 0 => {
                match state.driver_features_sel {
                    0 => set_half(&mut state.driver_features, value, false),
                    1 => set_half(&mut state.driver_features, value, true),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => state.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if setting_up =>
            {
                if let Some(q) = state.queues.get_mut(sel) {
                    match offset {
                        reg::QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
                        reg::QUEUE_READY => q.ready = value == 1,
                        reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                            set_half(&mut q.desc, value, offset == reg::QUEUE_DESC_HIGH)
                        }
                        reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                            set_half(&mut q.driver, value, offset == reg::QUEUE_DRIVER_HIGH)
                        }
                        _ => set_half(&mut q.device, value, offset == reg::QUEUE_DEVICE_HIGH),
                    }
                }
            }
            _ => log::warn!("virtio-mmio: ignored write {value:#x} at {offset:#x}"),
        }
    }
}

/// On the shared MMIO bus: vCPUs reach it without the global lock (the transport guards its state
/// with its own mutex and reaches the device through its context).
impl crate::bus::SharedBusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::context::Context;
    use crate::virtio::{features, ActivateError, Activation};
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    /// A device that records what the transport asks of it.
    struct Recorder {
        ctx: Arc<Context>,
        sizes: Vec<u16>,
        activations: Mutex<Vec<Activation>>,
        resets: Mutex<u32>,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | features::RING_EVENT_IDX | 1
        }
        fn contexts(&self) -> &[Arc<Context>] {
            std::slice::from_ref(&self.ctx)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            assert!(!self.ctx.held_by_current_thread());
            for (i, b) in data.iter_mut().enumerate() {
                *b = u8::try_from(offset).unwrap() + u8::try_from(i).unwrap();
            }
        }
        fn write_config(&self, _: u64, _: &[u8]) {
            assert!(self.ctx.held_by_current_thread());
        }
        fn activate(&self, a: Activation) -> Result<(), ActivateError> {
            assert!(self.ctx.held_by_current_thread());
            self.activations.lock().unwrap().push(a);
            Ok(())
        }
        fn reset(&self) {
            assert!(self.ctx.held_by_current_thread());
            *self.resets.lock().unwrap() += 1;
        }
    }

    fn rig() -> (Arc<Recorder>, MmioTransport) {
        let dev = Arc::new(Recorder {
            ctx: Context::new("t").unwrap(),
            sizes: vec![16, 8],
            activations: Mutex::new(Vec::new()),
            resets: Mutex::new(0),
        });
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let t = MmioTransport::new(dev.clone(), mem).unwrap();
        (dev, t)
    }

    fn get(t: &MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set(t: &MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn negotiate(t: &MmioTransport, low: u32, high: u32) -> bool {
        set(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        set(t, reg::DRIVER_FEATURES_SEL, 0);
        set(t, reg::DRIVER_FEATURES, low);
        set(t, reg::DRIVER_FEATURES_SEL, 1);
        set(t, reg::DRIVER_FEATURES, high);
        set(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        get(t, reg::STATUS) & status::FEATURES_OK != 0
    }

    #[test]
    fn identification_and_features() {
        let (_, t) = rig();
        assert_eq!(get(&t, reg::MAGIC), MAGIC);
        assert_eq!(get(&t, reg::VERSION), 2);
        assert_eq!(get(&t, reg::DEVICE_ID), 42);
        set(&t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(get(&t, reg::DEVICE_FEATURES), 1); // VERSION_1 is bit 32
        set(&t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(get(&t, reg::DEVICE_FEATURES), (1 << 29) | 1);
        assert_eq!(get(&t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn legacy_drivers_and_unoffered_features_are_refused() {
        let (_, t) = rig();
        assert!(!negotiate(&t, 1, 0)); // no VERSION_1
        set(&t, reg::STATUS, 0);
        assert!(!negotiate(&t, 1 << 3, 1)); // bit 3 not offered
        set(&t, reg::STATUS, 0);
        assert!(negotiate(&t, 1, 1));
    }

    #[test]
    fn activation_hands_over_the_queues_and_later_setup_is_ignored() {
        let (dev, t) = rig();
        assert!(negotiate(&t, 1 << 29, 1));
        for (q, size) in [(0u32, 16u32), (1, 3)] {
            set(&t, reg::QUEUE_SEL, q);
            assert_eq!(get(&t, reg::QUEUE_NUM_MAX), 16 >> q);
            set(&t, reg::QUEUE_NUM, size);
            let base = 0x1000 * (q + 1);
            set(&t, reg::QUEUE_DESC_LOW, base);
            set(&t, reg::QUEUE_DRIVER_LOW, base + 0x100);
            set(&t, reg::QUEUE_DEVICE_LOW, base + 0x200);
            set(&t, reg::QUEUE_READY, 1);
            assert_eq!(get(&t, reg::QUEUE_DESC_LOW), base);
        }
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        set(&t, reg::STATUS, ok);
        {
            let acts = dev.activations.lock().unwrap();
            assert_eq!(acts.len(), 1);
            let a = &acts[0];
            assert_eq!(a.acked_features, (1 << 32) | (1 << 29));
            assert!(a.queues[0].ready());
            assert!(a.queues[0].event_idx_enabled());
            // Size 3 is not a power of two: that queue is never used.
            assert!(!a.queues[1].ready());
            assert_eq!(a.queue_events.len(), 2);
        }
        set(&t, reg::QUEUE_SEL, 0);
        set(&t, reg::QUEUE_DESC_LOW, 0x9000);
        assert_eq!(get(&t, reg::QUEUE_DESC_LOW), 0x1000);
        // Bits cannot be taken away except by a reset, which reaches the device.
        set(&t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(get(&t, reg::STATUS), ok);
        set(&t, reg::STATUS, 0);
        assert_eq!(get(&t, reg::STATUS), 0);
        assert_eq!(*dev.resets.lock().unwrap(), 1);
        assert_eq!(get(&t, reg::QUEUE_DESC_LOW), 0);
    }

    #[test]
    fn config_space_reads_skip_the_context_and_writes_take_it() {
        let (_, t) = rig();
        let mut b = [0u8; 3];
        t.read(CONFIG_OFFSET + 5, &mut b);
        assert_eq!(b, [5, 6, 7]);
        t.write(CONFIG_OFFSET, &[1]);
    }

    #[test]
    fn odd_sizes_and_unaligned_register_accesses_are_ignored() {
        let (_, t) = rig();
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(reg::MAGIC + 2, &mut b);
        assert_eq!(b, [0; 4]);
        set(&t, reg::QUEUE_SEL + 2, 1);
        t.write(reg::QUEUE_SEL, &[1, 0]);
        assert_eq!(get(&t, reg::QUEUE_NUM_MAX), 16); // still queue 0 (queue 1 has 8)
        set(&t, reg::QUEUE_SEL, 7);
        assert_eq!(get(&t, reg::QUEUE_NUM_MAX), 0); // no such queue
    }

    #[test]
    fn the_transport_sits_on_the_shared_mmio_bus() {
        let (_, t) = rig();
        let mut bus = crate::bus::SharedBus::new();
        bus.insert("virtio-mmio", 0xd000_0000, MMIO_SIZE, Arc::new(t))
            .unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0000 + reg::VERSION, &mut b));
        assert_eq!(u32::from_le_bytes(b), VERSION);
        assert!(bus.write(0xd000_0000 + reg::QUEUE_SEL, &1u32.to_le_bytes()));
        assert!(bus.read(0xd000_0000 + reg::QUEUE_NUM_MAX, &mut b));
        assert_eq!(u32::from_le_bytes(b), 8);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let (_, t) = rig();
        set(&t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err());
        set(&t, reg::QUEUE_NOTIFY, 9); // no such queue: ignored
    }

    #[test]
    fn interrupt_status_and_ack_do_not_need_the_context() {
        let (dev, t) = rig();
        let t = Arc::new(t);
        t.interrupt().signal_used_queue(0);
        // Another thread holds the device's context for the whole test.
        let (held_tx, held_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let ctx = Arc::clone(&dev.ctx);
        let holder = std::thread::spawn(move || {
            let _g = ctx.acquire();
            held_tx.send(()).unwrap();
            done_rx.recv().unwrap();
        });
        held_rx.recv().unwrap();
        let (tx, rx) = mpsc::channel();
        let vcpu = {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                let pending = get(&t, reg::INTERRUPT_STATUS);
                set(&t, reg::INTERRUPT_ACK, pending);
                tx.send((pending, get(&t, reg::INTERRUPT_STATUS))).unwrap();
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(10));
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        vcpu.join().unwrap();
        assert_eq!(got.unwrap(), (1, 0));
        assert_eq!(t.irqfd().read().unwrap(), 1);
    }

    /// A device that forwards to a virtio-blk device and says when a reset reaches it.
    struct ResetSignal {
        inner: Arc<crate::virtio::block::Block>,
        entered: Mutex<mpsc::Sender<()>>,
    }

    impl VirtioDevice for ResetSignal {
        fn device_type(&self) -> u32 {
            self.inner.device_type()
        }
        fn queue_max_sizes(&self) -> &[u16] {
            self.inner.queue_max_sizes()
        }
        fn features(&self) -> u64 {
            self.inner.features()
        }
        fn contexts(&self) -> &[Arc<Context>] {
            self.inner.contexts()
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            self.inner.read_config(offset, data);
        }
        fn write_config(&self, offset: u64, data: &[u8]) {
            self.inner.write_config(offset, data);
        }
        fn activate(&self, a: Activation) -> Result<(), ActivateError> {
            self.inner.activate(a)
        }
        fn reset(&self) {
            self.entered.lock().unwrap().send(()).unwrap();
            self.inner.reset();
        }
    }

    #[test]
    fn registers_answer_while_a_reset_drains_the_device() {
        use crate::virtio::block::test_util::*;
        let io = crate::context::IoThread::spawn("io-reset").unwrap();
        let mut rig = Rig::new(
            io.context().clone(),
            MemImage::new(1 << 16, false),
            1,
            false,
        );
        // The same device behind a transport that reports when the reset reaches it.
        let (entered_tx, entered_rx) = mpsc::channel();
        let signal = ResetSignal {
            inner: Arc::clone(&rig.dev),
            entered: Mutex::new(entered_tx),
        };
        rig.transport = MmioTransport::new(Arc::new(signal), rig.mem.clone()).unwrap();
        rig.start(!0);
        let live = get(&rig.transport, reg::STATUS);
        assert_ne!(live & status::DRIVER_OK, 0);
        // A read held in a worker until the gate opens: the reset's drain waits for it.
        rig.image.set_gate(false);
        rig.header(HDR, crate::virtio::block::request_type::IN, 0);
        rig.submit(
            0,
            0,
            &[(HDR, 16, 0), (BUF, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        );
        while rig
            .image
            .reads_started
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            std::thread::yield_now();
        }
        let rig = Arc::new(rig);
        let resetter = {
            let rig = Arc::clone(&rig);
            std::thread::spawn(move || set(&rig.transport, reg::STATUS, 0))
        };
        entered_rx.recv().unwrap();
        // The drain is pending (the gate is shut). Another vCPU's accesses complete meanwhile.
        let (tx, rx) = mpsc::channel();
        let vcpu = {
            let rig = Arc::clone(&rig);
            std::thread::spawn(move || {
                let magic = get(&rig.transport, reg::MAGIC);
                let during = get(&rig.transport, reg::STATUS);
                // Ignored: the driver must wait for Status to read 0 first.
                set(&rig.transport, reg::QUEUE_SEL, 0);
                set(&rig.transport, reg::QUEUE_DESC_LOW, 0x9000);
                set(&rig.transport, reg::STATUS, status::ACKNOWLEDGE);
                set(&rig.transport, reg::STATUS, 0);
                let again = get(&rig.transport, reg::STATUS);
                tx.send((magic, during, again)).unwrap();
            })
        };
        let answered = rx.recv_timeout(Duration::from_secs(10));
        let still_draining = !resetter.is_finished();
        rig.image.set_gate(true);
        resetter.join().unwrap();
        vcpu.join().unwrap();
        let (magic, during, again) = answered.expect("register accesses waited for the drain");
        assert!(still_draining);
        assert_eq!((magic, during, again), (MAGIC, live, live));
        // The reset completed the held read and cleared the transport.
        assert_eq!(get(&rig.transport, reg::STATUS), 0);
        assert_eq!(get(&rig.transport, reg::QUEUE_DESC_LOW), 0);
        assert_eq!(rig.used_idx(0), 1);
        assert_eq!(rig.byte(STATUS), crate::virtio::block::status::OK);
        rig.dev.shutdown().unwrap();
        drop(rig);
        io.stop().unwrap();
    }

    #[test]
    fn config_reads_complete_while_another_thread_holds_the_context() {
        use crate::virtio::block::test_util::*;
        let (io, rig) = iothread_rig("io-config", 1 << 16);
        let rig = Arc::new(rig);
        let (held_tx, held_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let holder = {
            let ctx = Arc::clone(&rig.ctx);
            std::thread::spawn(move || {
                let _g = ctx.acquire();
                held_tx.send(()).unwrap();
                done_rx.recv().unwrap();
            })
        };
        held_rx.recv().unwrap();
        let (tx, rx) = mpsc::channel();
        let vcpu = {
            let rig = Arc::clone(&rig);
            std::thread::spawn(move || {
                let mut capacity = [0u8; 8];
                rig.transport.read(CONFIG_OFFSET, &mut capacity);
                tx.send((u64::from_le_bytes(capacity), rig.reg(CONFIG_OFFSET + 20)))
                    .unwrap();
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(10));
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        vcpu.join().unwrap();
        // Capacity in sectors, then blk_size.
        assert_eq!(
            got.expect("the config read waited for the context"),
            (128, 512)
        );
        rig.dev.shutdown().unwrap();
        drop(rig);
        io.stop().unwrap();
    }
}
