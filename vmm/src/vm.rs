//! VM assembly and its life: KVM, guest memory, the in-kernel irqchip and PIT, the legacy
//! devices on the PIO bus, the loaded guest, the vCPU threads and the main loop, and a shutdown
//! that joins every thread.
//!
//! [`Vm::build`] does the set-up in this order: bind the QMP monitor's socket (with `wait=on`,
//! wait for its first client, as QEMU does), open `/dev/kvm` and check its capabilities, create
//! the VM, map and register guest memory, set KVM's TSS address, create the irqchip and PIT, build
//! the devices (COM1 with an irqfd on IRQ 4, i8042, RTC, ACPI sleep registers; the Generic Event
//! Device with the power button, an irqfd on GSI 23), the disks and their iothreads (see
//! [`crate::disks`]), load the guest (see [`crate::arch::x86_64::boot`]), then create and
//! configure the vCPUs. [`Vm::run`] starts one thread per vCPU (paused under `-S`), adds the
//! monitor to the main loop, runs the loop until something records an exit reason, sends the
//! monitor's `SHUTDOWN` event, then pauses every vCPU (condition variable on the global lock),
//! tells them to stop, and joins them; then the disks are drained, flushed and closed and the
//! iothreads stopped.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::bus::{Bus, BusDevice, BusError, SharedBus};
use devices::legacy::{
    AcpiSleep, EventFdTrigger, Ged, GuestExit, Rtc, Serial, GED_MMIO_SIZE, I8042,
};
use devices::pci::PciConfigIo;
use devices::virtio::PCI_BAR_SIZE;
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{
    configure_vcpu, load_guest, BootConfig, BootError, VcpuSetupError,
};
use crate::arch::x86_64::cpuid::{phys_bits, supported_cpuid, CpuidError};
use crate::arch::x86_64::layout::{
    pci_mmio64_window, ACPI_SLEEP_PORT, COM1_IRQ, COM1_PORT, GED_IRQ, GED_START, I8042_PORT,
    KVM_TSS_START, PCI_CONFIG_PORT, RTC_PORT,
};
use crate::arch::x86_64::memory::{create_guest_memory, host_ram_bytes, GuestMemory, MemoryError};
use crate::cli::Config;
use crate::disks::{DiskError, Disks, IoErrorStop, IoErrors};
use crate::global::{ExitReason, GlobalLock, IoThreadFailures, Machine, VcpuRequest};
use crate::main_loop::{ConsoleInput, ExitEvents, Locked, Tag};
use crate::monitor::{
    event_channel, shutdown_cause, Listener, Monitor, MonitorError, QmpEvent, VmMonitor,
};
use crate::sandbox;
use crate::sandbox::landlock::ImageFile;
use crate::vcpu::{install_kick_handler, Kicker, Vcpu};

/// Errors from building or running the VM, one per failing step.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: is the kvm module loaded?")]
    NoKvm,
    /// `/dev/kvm` exists but may not be opened.
    #[error("No permission to open /dev/kvm")]
    KvmPermission,
    /// Opening `/dev/kvm` failed otherwise.
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability the VMM relies on.
    #[error("KVM lacks {0:?}, which vmm needs")]
    MissingCap(Cap),
    /// More vCPUs than KVM allows.
    #[error("{cpus} vCPUs requested, KVM allows {max}")]
    TooManyCpus {
        /// Requested.
        cpus: u8,
        /// KVM's limit.
        max: usize,
    },
    /// KVM_CREATE_VM failed.
    #[error("Cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Guest memory (its errors say what was asked for and why it cannot be had).
    #[error(transparent)]
    Memory(MemoryError),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("Cannot register guest memory slot {slot} with KVM")]
    MemorySlot {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_TSS_ADDR failed.
    #[error("Cannot set KVM's TSS address")]
    SetTss(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("Cannot create the in-kernel irqchip")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("Cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM_IRQFD failed.
    #[error("Cannot register the irqfd for IRQ {irq}")]
    Irqfd {
        /// The interrupt line.
        irq: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device range clashed.
    #[error("Cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// Loading the guest.
    #[error("Cannot load the guest")]
    Boot(#[source] BootError),
    /// Reading KVM's CPUID.
    #[error("Cannot read KVM's CPUID")]
    Cpuid(#[source] CpuidError),
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {index}")]
    CreateVcpu {
        /// The vCPU.
        index: u8,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Configuring a vCPU.
    #[error("Cannot configure vCPU {index}")]
    ConfigureVcpu {
        /// The vCPU.
        index: u8,
        /// What failed.
        #[source]
        source: VcpuSetupError,
    },
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// The event loop could not be created or failed.
    #[error("Main loop failed")]
    MainLoop(#[source] event_manager::Error),
    /// A vCPU thread could not be started.
    #[error("Cannot start the thread of vCPU {index}")]
    SpawnVcpu {
        /// The vCPU.
        index: u8,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The disks or their iothreads.
    #[error(transparent)]
    Disk(DiskError),
    /// The QMP monitor could not be set up.
    #[error("QMP monitor")]
    Monitor(#[source] MonitorError),
    /// A vCPU thread panicked.
    #[error("The thread of vCPU {index} panicked")]
    VcpuPanicked {
        /// The vCPU.
        index: u8,
    },
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vm {
    /// Kept open for the VM's lifetime (the memory and vCPU fds hang off it).
    _vm_fd: Arc<VmFd>,
    /// Guest memory, mapped for the VM's lifetime.
    _memory: GuestMemory,
    global: Arc<GlobalLock>,
    vcpus: Vec<Vcpu>,
    exit_events: ExitEvents,
    /// Signalled by the UART when the guest has read its input.
    input_drained: EventFd,
    /// The monitor's socket, bound (and, with `wait=on`, connected) before the guest runs.
    qmp: Option<Listener>,
    /// `-S`: the vCPUs wait for the monitor's `cont`.
    start_paused: bool,
    /// `-name guest=`: what `query-name` says.
    guest_name: Option<String>,
    /// The disks, their iothreads and the main loop's context.
    disks: Disks,
    /// Where the disks report failed requests.
    io_errors: Arc<IoErrors>,
}

/// The least room the 64-bit PCI window must have: one BAR per device number of the bus.
const PCI_BARS_BYTES: u64 = devices::pci::SLOTS as u64 * PCI_BAR_SIZE;

/// The KVM device.
const KVM_PATH: &std::ffi::CStr = c"/dev/kvm";

/// What the VMM needs from KVM: the in-kernel irqchip and PIT, irqfds, memory slots, the TSS
/// address, and `immediate_exit` (without it a kick just before `KVM_RUN` would be lost).
const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Pit2,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::ImmediateExit,
];

/// Opens the KVM device at `path`, telling a missing device from a forbidden one.
fn open_kvm(path: &std::ffi::CStr) -> Result<Kvm, VmError> {
    Kvm::new_with_path(path).map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::OpenKvm(e),
    })
}

/// Registers every region of `mem` with KVM, one slot each.
fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let region_desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes that the Vm keeps (in
        // `_memory`) for as long as the VM fd exists.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(|source| VmError::MemorySlot { slot, source })?;
    }
    Ok(())
}

/// A non-blocking eventfd.
fn eventfd() -> Result<EventFd, VmError> {
    EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)
}

/// The legacy devices on a new PIO bus; the i8042 and the ACPI sleep registers end the VM through
/// `guest_exit`, and the UART signals `input_drained` when the guest has read its input.
fn legacy_devices(
    vm_fd: &VmFd,
    guest_exit: &GuestExit,
    input_drained: &EventFd,
) -> Result<Bus, VmError> {
    let com1_irq = eventfd()?;
    vm_fd
        .register_irqfd(&com1_irq, COM1_IRQ)
        .map_err(|source| VmError::Irqfd {
            irq: COM1_IRQ,
            source,
        })?;
    let drained = input_drained.try_clone().map_err(VmError::EventFd)?;
    let serial = Serial::new(
        EventFdTrigger(com1_irq),
        Box::new(std::io::stdout()),
        drained,
    );
    // (name, first port, number of ports, device)
    let devices: [(&'static str, u64, u64, Box<dyn BusDevice>); 4] = [
        ("com1", COM1_PORT, 8, Box::new(serial)),
        (
            "i8042",
            I8042_PORT,
            5,
            Box::new(I8042::new(guest_exit.clone())),
        ),
        ("rtc", RTC_PORT, 2, Box::new(Rtc::new())),
        (
            "acpi-sleep",
            ACPI_SLEEP_PORT,
            2,
            Box::new(AcpiSleep::new(guest_exit.clone())),
        ),
    ];
    let mut pio = Bus::new();
    for (name, base, len, device) in devices {
        pio.insert(name, base, len, device).map_err(VmError::Bus)?;
    }
    Ok(pio)
}

/// The MMIO devices on a new MMIO bus: the Generic Event Device (the power button), its
/// interrupt an irqfd on [`GED_IRQ`]. Main-loop handlers reach it as
/// `machine.mmio.device_mut::<Ged>(GED_START)`.
fn mmio_devices(vm_fd: &VmFd) -> Result<Bus, VmError> {
    let ged_irq = eventfd()?;
    vm_fd
        .register_irqfd(&ged_irq, GED_IRQ)
        .map_err(|source| VmError::Irqfd {
            irq: GED_IRQ,
            source,
        })?;
    let mut mmio = Bus::new();
    mmio.insert("ged", GED_START, GED_MMIO_SIZE, Box::new(Ged::new(ged_irq)))
        .map_err(VmError::Bus)?;
    Ok(mmio)
}

impl Vm {
    /// Builds the VM `cfg` describes (the steps are in the module doc).
    pub fn build(cfg: &Config) -> Result<Self, VmError> {
        let qmp = match &cfg.qmp {
            Some(options) => Some(Listener::bind(options).map_err(VmError::Monitor)?),
            None => None,
        };
        let kvm = open_kvm(KVM_PATH)?;
        if let Some(cap) = REQUIRED_CAPS.into_iter().find(|&c| !kvm.check_extension(c)) {
            return Err(VmError::MissingCap(cap));
        }
        let cpus = cfg.topology.cpus();
        let max = kvm.get_max_vcpus();
        if usize::from(cpus) > max {
            return Err(VmError::TooManyCpus { cpus, max });
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        log::info!("startup: KVM opened and VM created");
        let memory =
            create_guest_memory(cfg.mem_bytes, host_ram_bytes()).map_err(VmError::Memory)?;
        register_memory(&vm_fd, &memory)?;
        log::info!("startup: guest memory mapped and registered");
        let tss = usize::try_from(KVM_TSS_START).unwrap_or(0);
        vm_fd.set_tss_address(tss).map_err(VmError::SetTss)?;
        vm_fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(VmError::CreatePit)?;

        let vcpu_failed = eventfd()?;
        let iothread_failed =
            IoThreadFailures::new(vcpu_failed.try_clone().map_err(VmError::EventFd)?);
        let exit_events = ExitEvents {
            guest: GuestExit::new().map_err(VmError::EventFd)?,
            vcpu_failed,
            iothread_failed,
            signals: eventfd()?,
        };
        let input_drained = eventfd()?;
        let mut pio = legacy_devices(&vm_fd, &exit_events.guest, &input_drained)?;
        let mmio = mmio_devices(&vm_fd)?;
        let mut shared_mmio = SharedBus::new();
        let io_errors = IoErrors::new().map_err(VmError::EventFd)?;
        let cpuid = supported_cpuid(&kvm).map_err(VmError::Cpuid)?;
        let ram_end = memory.last_addr().0.saturating_add(1);
        let window64 = pci_mmio64_window(ram_end, phys_bits(cpuid.as_slice()), PCI_BARS_BYTES);
        let (disks, dsdt_devices) = Disks::build(
            &cfg.iothreads,
            &exit_events.iothread_failed,
            &cfg.disks,
            cpus,
            window64,
            &vm_fd,
            &memory,
            &mut shared_mmio,
            &io_errors,
        )
        .map_err(VmError::Disk)?;
        if let Some(root) = disks.pci_root() {
            pio.insert(
                "pci-config",
                PCI_CONFIG_PORT,
                8,
                Box::new(PciConfigIo::new(root)),
            )
            .map_err(VmError::Bus)?;
        }
        let mut machine = Machine::new(pio, mmio);
        if cfg.start_paused {
            machine.request = VcpuRequest::Pause;
        }
        let global = Arc::new(GlobalLock::new(machine, shared_mmio));
        log::info!("startup: devices and disks built");

        let entry = load_guest(
            &memory,
            &BootConfig {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cfg.append,
                topology: &cfg.topology,
                mem_bytes: cfg.mem_bytes,
                dsdt_devices: &dsdt_devices,
                pci: disks.pci_root().is_some(),
            },
        )
        .map_err(VmError::Boot)?;

        let mut vcpus = Vec::with_capacity(usize::from(cpus));
        for index in 0..cpus {
            // KVM gives the local APIC the vCPU's id: make it the topology's APIC id.
            let fd = vm_fd
                .create_vcpu(u64::from(cfg.topology.apic_id(index)))
                .map_err(|source| VmError::CreateVcpu { index, source })?;
            configure_vcpu(&fd, &memory, &cpuid, index, &cfg.topology, entry)
                .map_err(|source| VmError::ConfigureVcpu { index, source })?;
            let failed = exit_events
                .vcpu_failed
                .try_clone()
                .map_err(VmError::EventFd)?;
            vcpus.push(Vcpu::new(
                fd,
                index,
                Arc::clone(&global),
                exit_events.guest.clone(),
                failed,
            ));
        }
        log::info!("startup: vCPUs configured");
        Ok(Self {
            _vm_fd: vm_fd,
            _memory: memory,
            global,
            vcpus,
            exit_events,
            input_drained,
            qmp,
            start_paused: cfg.start_paused,
            guest_name: cfg.name.guest.clone(),
            disks,
            io_errors,
        })
    }

    /// Every file of every disk's chain (see [`Disks::image_files`]).
    pub fn image_files(&self) -> Vec<ImageFile> {
        self.disks.image_files()
    }

    /// Runs the VM until something ends it, then stops and joins every vCPU thread.
    pub fn run(self) -> Result<ExitReason, VmError> {
        let Self {
            _vm_fd,
            _memory,
            global,
            vcpus,
            exit_events,
            input_drained,
            qmp,
            start_paused,
            guest_name,
            mut disks,
            io_errors,
        } = self;
        install_kick_handler().map_err(VmError::KickHandler)?;
        let mut manager: EventManager<Locked> = EventManager::new().map_err(VmError::MainLoop)?;
        manager.add_subscriber(Locked::new(Arc::clone(&global), Box::new(exit_events)));
        manager.add_subscriber(Locked::new(
            Arc::clone(&global),
            Box::new(ConsoleInput::new(input_drained)),
        ));
        manager.add_subscriber(Locked::new(
            Arc::clone(&global),
            Box::new(disks.main_context()),
        ));

        // The monitor's parts that can fail are made before any vCPU thread starts.
        let qmp = match qmp {
            Some(listener) => Some((listener, event_channel().map_err(VmError::Monitor)?)),
            None => None,
        };
        if let Some((_, (sender, _))) = &qmp {
            io_errors.send_events_to(sender.clone());
        }
        // The vCPUs wait for the global lock before their first KVM_RUN: the main thread is in
        // its sandbox before the guest runs.
        let gate = global.lock();
        let (threads, started) = VcpuThreads::start(vcpus);
        sandbox::enter(sandbox::Kind::Main);
        drop(gate);
        manager.add_subscriber(Locked::new(
            Arc::clone(&global),
            Box::new(IoErrorStop::new(
                Arc::clone(&io_errors),
                Arc::clone(&threads.kickers),
            )),
        ));
        let events = qmp.map(|(listener, (sender, receiver))| {
            let monitor = Monitor::new(listener, receiver, Tag::Qmp as u32);
            let kickers = Arc::clone(&threads.kickers);
            let handler = VmMonitor::new(
                monitor,
                kickers,
                !start_paused,
                &mut disks,
                Arc::clone(&io_errors),
                guest_name,
                sender.clone(),
            );
            manager.add_subscriber(Locked::new(Arc::clone(&global), Box::new(handler)));
            sender
        });
        let outcome = started.and_then(|()| main_loop(&global, &mut manager));
        if let (Some(events), Ok(reason)) = (&events, &outcome) {
            // Delivered by the monitor's last wake-up or, at the latest, when it is dropped.
            if let Some(cause) = shutdown_cause(reason) {
                events.send(QmpEvent::Shutdown(cause));
            }
        }
        let stopped = threads.shutdown(&global);
        // The main loop's handlers (the monitor holds the disks too) go before the disks.
        drop(manager);
        let closed = disks.shutdown(&global).map_err(VmError::Disk);
        stopped?;
        closed?;
        outcome
    }
}

/// Runs the main loop until something records why the VM ends.
fn main_loop(
    global: &GlobalLock,
    manager: &mut EventManager<Locked>,
) -> Result<ExitReason, VmError> {
    loop {
        if let Some(reason) = global.lock().exit.clone() {
            return Ok(reason);
        }
        manager.run().map_err(VmError::MainLoop)?;
    }
}

/// The running vCPU threads and their kickers.
#[derive(Debug)]
struct VcpuThreads {
    threads: Vec<(u8, JoinHandle<Vcpu>)>,
    /// Shared with the monitor, which pauses and resumes the vCPUs.
    kickers: Arc<Vec<Kicker>>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU; on a failure, the threads already started are returned with
    /// the error (to be shut down).
    fn start(vcpus: Vec<Vcpu>) -> (Self, Result<(), VmError>) {
        let mut threads = Vec::with_capacity(vcpus.len());
        let mut kickers = Vec::with_capacity(vcpus.len());
        let mut result = Ok(());
        // An inclusive range ends at 255 without overflowing (there are at most 255 vCPUs).
        for (index, vcpu) in (0..=u8::MAX).zip(vcpus) {
            let kick = vcpu.kick_handle();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(block::THREAD_STACK)
                .spawn(move || {
                    sandbox::enter(sandbox::Kind::Vcpu);
                    vcpu.run()
                });
            match spawned {
                Ok(handle) => {
                    kickers.push(kick.on_thread(handle.as_pthread_t()));
                    threads.push((index, handle));
                }
                Err(source) => {
                    result = Err(VmError::SpawnVcpu { index, source });
                    break;
                }
            }
        }
        let kickers = Arc::new(kickers);
        (Self { threads, kickers }, result)
    }

    /// Pauses every vCPU, tells them to stop, and joins their threads; the vCPUs (and their
    /// `kvm_run` mappings, which the kickers point into) are dropped only after that.
    fn shutdown(self, global: &GlobalLock) -> Result<(), VmError> {
        let guard = global.lock();
        let mut guard = global.pause_all(guard, &self.kickers);
        global.release_all(&mut guard, VcpuRequest::Stop);
        drop(guard);
        let mut joined = Vec::with_capacity(self.threads.len());
        let mut panicked = None;
        for (index, handle) in self.threads {
            match handle.join() {
                Ok(vcpu) => joined.push(vcpu),
                Err(_) => panicked = panicked.or(Some(index)),
            }
        }
        drop(self.kickers);
        match panicked {
            Some(index) => Err(VmError::VcpuPanicked { index }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::test_images;
    use crate::arch::x86_64::topology::Topology;
    use devices::context::IoThread;
    use devices::legacy::GuestExitKind;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// The guest's counter.
    fn counter(vm_memory: &GuestMemory) -> u64 {
        vm_memory.read_obj(GuestAddress(0x8000)).expect("in RAM")
    }

    /// Waits until the counter passes `value`.
    fn wait_past(vm_memory: &GuestMemory, value: u64) {
        let start = Instant::now();
        while counter(vm_memory) <= value {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "guest is not running"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn kvm_device_errors() {
        assert!(matches!(open_kvm(c"/nonexistent/kvm"), Err(VmError::NoKvm)));
        // A directory cannot be opened read-write.
        assert!(matches!(open_kvm(c"/"), Err(VmError::OpenKvm(_))));
    }

    /// A VM with `cpus` vCPUs running `image`.
    fn build_vm(name: &str, image: &[u8], cpus: u8) -> Vm {
        let kernel = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
        std::fs::write(&kernel, image).expect("temp dir is writable");
        let cfg = Config {
            mem_bytes: 16 << 20,
            topology: Topology::cores(cpus).expect("a valid vCPU count"),
            kernel: kernel.clone(),
            initrd: None,
            append: String::new(),
            debug_log: None,
            qmp: None,
            start_paused: false,
            iothreads: Vec::new(),
            disks: Vec::new(),
            name: crate::cli::Name::default(),
            pidfile: None,
            sandbox: false,
        };
        let vm = Vm::build(&cfg).expect("builds");
        let _ = std::fs::remove_file(&kernel);
        install_kick_handler().expect("handler installs");
        vm
    }

    #[test]
    fn power_button_reaches_the_guest_through_the_ged() {
        let image = test_images::pvh_elf(&test_images::power_button_guest(), true);
        let vm = build_vm("ged", &image, 1);
        let guest_exit = vm.exit_events.guest.clone();
        let (threads, started) = VcpuThreads::start(vm.vcpus);
        started.expect("threads start");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            guest_exit.requested(),
            None,
            "the guest waits for the button"
        );
        vm.global
            .lock()
            .mmio
            .device_mut::<Ged>(GED_START)
            .expect("the GED is on the MMIO bus")
            .press_power_button()
            .expect("interrupt raised");
        let start = Instant::now();
        while guest_exit.requested().is_none() {
            assert!(start.elapsed() < Duration::from_secs(10), "no power-off");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(guest_exit.requested(), Some(GuestExitKind::PowerOff));
        threads.shutdown(&vm.global).expect("joins");
    }

    #[test]
    fn vcpus_pause_resume_and_stop() {
        let vm = build_vm(
            "pause",
            &test_images::bzimage(&test_images::counter_guest()),
            2,
        );
        let (threads, started) = VcpuThreads::start(vm.vcpus);
        started.expect("threads start");
        wait_past(&vm._memory, 0);

        // Paused: both vCPUs (the second waits for a SIPI inside KVM_RUN) report in, and the
        // guest's counter stands still.
        let guard = vm.global.lock();
        let mut guard = vm.global.pause_all(guard, &threads.kickers);
        assert_eq!((guard.paused, guard.finished), (2, 0));
        let frozen = counter(&vm._memory);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(counter(&vm._memory), frozen);

        // Resumed: it counts again.
        vm.global.release_all(&mut guard, VcpuRequest::Run);
        drop(guard);
        wait_past(&vm._memory, frozen);

        threads.shutdown(&vm.global).expect("joins");
        assert_eq!(vm.global.lock().finished, 2);
    }

    #[test]
    fn an_iothread_whose_loop_fails_ends_the_vm() {
        let vcpu_failed = eventfd().expect("eventfd");
        let iothread_failed =
            IoThreadFailures::new(vcpu_failed.try_clone().expect("eventfd clones"));
        let exit_events = ExitEvents {
            guest: GuestExit::new().expect("eventfd"),
            vcpu_failed,
            iothread_failed: iothread_failed.clone(),
            signals: eventfd().expect("eventfd"),
        };
        let global = Arc::new(GlobalLock::new(
            Machine::new(Bus::new(), Bus::new()),
            SharedBus::new(),
        ));
        let mut manager: EventManager<Locked> = EventManager::new().expect("event manager");
        manager.add_subscriber(Locked::new(Arc::clone(&global), Box::new(exit_events)));
        let io = IoThread::spawn_reporting("io0", Default::default(), iothread_failed.hook("io0"))
            .expect("spawns");
        // A real loop failure: the context's epoll descriptor number now refers to an eventfd,
        // so the loop's next epoll_wait fails (EINVAL); the wake-up gets it there.
        let not_epoll = eventfd().expect("eventfd");
        // SAFETY: both descriptors are open; dup2 only changes what the epoll number refers to.
        let ret = unsafe { libc::dup2(not_epoll.as_raw_fd(), io.context().epoll_fd()) };
        assert!(ret >= 0, "{}", std::io::Error::last_os_error());
        io.context().notify();
        let reason = main_loop(&global, &mut manager).expect("the main loop runs");
        assert!(
            matches!(&reason, ExitReason::IoThreadFailed { id, message }
                if id == "io0" && message.contains("Invalid argument")),
            "{reason:?}"
        );
        // Reported once, through the exit reason.
        io.stop().expect("the failure was reported already");
    }
}
