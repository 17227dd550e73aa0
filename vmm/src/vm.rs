//! VM assembly and its life: KVM, guest memory, the in-kernel irqchip and PIT, the legacy
//! devices on the PIO bus, the loaded guest, the vCPU threads and the main loop, and a shutdown
//! that joins every thread.
//!
//! [`Vm::build`] does the set-up in this order: open `/dev/kvm`, create the VM, map and register
//! guest memory, set KVM's TSS address, create the irqchip and PIT, build the devices (COM1 with
//! an irqfd on IRQ 4, i8042, RTC, ACPI sleep registers), load the guest (see
//! [`crate::arch::x86_64::boot`]), then create and configure the vCPUs. [`Vm::run`] starts one
//! thread per vCPU, runs the main loop until something records an exit reason, then pauses every
//! vCPU (condition variable on the global lock), tells them to stop, and joins them.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::bus::{Bus, BusDevice, BusError};
use devices::legacy::{AcpiSleep, EventFdTrigger, GuestExit, Rtc, Serial, I8042};
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{
    configure_vcpu, load_guest, BootConfig, BootError, VcpuSetupError,
};
use crate::arch::x86_64::cpuid::{supported_cpuid, CpuidError};
use crate::arch::x86_64::layout::{
    ACPI_SLEEP_PORT, COM1_IRQ, COM1_PORT, I8042_PORT, KVM_TSS_START, RTC_PORT,
};
use crate::arch::x86_64::memory::{create_guest_memory, host_ram_bytes, GuestMemory, MemoryError};
use crate::cli::Config;
use crate::global::{ExitReason, GlobalLock, Machine, VcpuRequest};
use crate::main_loop::{signal_fd, ConsoleInput, ExitEvents, Locked};
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
    /// The signalfd for SIGTERM/SIGINT.
    #[error("Cannot set up SIGTERM and SIGINT handling")]
    Signals(#[source] std::io::Error),
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
    _vm_fd: VmFd,
    /// Guest memory, mapped for the VM's lifetime.
    _memory: GuestMemory,
    global: Arc<GlobalLock>,
    vcpus: Vec<Vcpu>,
    exit_events: ExitEvents,
    /// Signalled by the UART when the guest has read its input.
    input_drained: EventFd,
}

/// The KVM device.
const KVM_PATH: &std::ffi::CStr = c"/dev/kvm";

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

impl Vm {
    /// Builds the VM `cfg` describes (the steps are in the module doc).
    pub fn build(cfg: &Config) -> Result<Self, VmError> {
        let kvm = open_kvm(KVM_PATH)?;
        let max = kvm.get_max_vcpus();
        if usize::from(cfg.cpus) > max {
            return Err(VmError::TooManyCpus {
                cpus: cfg.cpus,
                max,
            });
        }
        let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let memory =
            create_guest_memory(cfg.mem_bytes, host_ram_bytes()).map_err(VmError::Memory)?;
        register_memory(&vm_fd, &memory)?;
        let tss = usize::try_from(KVM_TSS_START).unwrap_or(0);
        vm_fd.set_tss_address(tss).map_err(VmError::SetTss)?;
        vm_fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(VmError::CreatePit)?;

        let exit_events = ExitEvents {
            guest: GuestExit::new().map_err(VmError::EventFd)?,
            vcpu_failed: eventfd()?,
            signals: signal_fd().map_err(VmError::Signals)?,
        };
        let input_drained = eventfd()?;
        let pio = legacy_devices(&vm_fd, &exit_events.guest, &input_drained)?;
        let global = Arc::new(GlobalLock::new(Machine::new(pio, Bus::new())));

        let entry = load_guest(
            &memory,
            &BootConfig {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cfg.append,
                cpus: usize::from(cfg.cpus),
                mem_bytes: cfg.mem_bytes,
                dsdt_devices: &[],
            },
        )
        .map_err(VmError::Boot)?;

        let cpuid = supported_cpuid(&kvm).map_err(VmError::Cpuid)?;
        let mut vcpus = Vec::with_capacity(usize::from(cfg.cpus));
        for index in 0..cfg.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(|source| VmError::CreateVcpu { index, source })?;
            configure_vcpu(&fd, &memory, &cpuid, index, cfg.cpus, entry)
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
        Ok(Self {
            _vm_fd: vm_fd,
            _memory: memory,
            global,
            vcpus,
            exit_events,
            input_drained,
        })
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
        } = self;
        install_kick_handler().map_err(VmError::KickHandler)?;
        let mut manager: EventManager<Locked> = EventManager::new().map_err(VmError::MainLoop)?;
        manager.add_subscriber(Locked::new(Arc::clone(&global), Box::new(exit_events)));
        manager.add_subscriber(Locked::new(
            Arc::clone(&global),
            Box::new(ConsoleInput::new(input_drained)),
        ));

        let (threads, started) = VcpuThreads::start(vcpus);
        let outcome = started.and_then(|()| main_loop(&global, &mut manager));
        threads.shutdown(&global)?;
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
    kickers: Vec<Kicker>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU; on a failure, the threads already started are returned with
    /// the error (to be shut down).
    fn start(vcpus: Vec<Vcpu>) -> (Self, Result<(), VmError>) {
        let mut started = Self {
            threads: Vec::with_capacity(vcpus.len()),
            kickers: Vec::with_capacity(vcpus.len()),
        };
        for (index, vcpu) in (0u8..).zip(vcpus) {
            let kick = vcpu.kick_handle();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu.run());
            match spawned {
                Ok(handle) => {
                    started.kickers.push(kick.on_thread(handle.as_pthread_t()));
                    started.threads.push((index, handle));
                }
                Err(source) => return (started, Err(VmError::SpawnVcpu { index, source })),
            }
        }
        (started, Ok(()))
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

    #[test]
    fn vcpus_pause_resume_and_stop() {
        let kernel = std::env::temp_dir().join(format!("vmm-pause-{}", std::process::id()));
        std::fs::write(&kernel, test_images::bzimage(&test_images::counter_guest()))
            .expect("temp dir is writable");
        let cfg = Config {
            mem_bytes: 16 << 20,
            cpus: 2,
            kernel: kernel.clone(),
            initrd: None,
            append: String::new(),
            debug_log: None,
        };
        let vm = Vm::build(&cfg).expect("builds");
        let _ = std::fs::remove_file(&kernel);
        install_kick_handler().expect("handler installs");
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
}
