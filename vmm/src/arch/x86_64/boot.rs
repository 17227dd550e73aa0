//! Loading a kernel and describing the machine to it: the one place that orders the boot steps.
//!
//! [`load_guest`] prepares guest memory, in this order:
//! 1. the kernel: a bzImage (64-bit boot protocol; one without a 64-bit entry is refused), at the
//!    address it prefers where it fits, or an ELF vmlinux (PVH; one without the PVH note is
//!    refused), through linux-loader;
//! 2. the command line at [`CMDLINE_START`];
//! 3. the initramfs, page-aligned at the top of RAM below 3 GiB (and below the kernel's
//!    `initrd_addr_max`), clear of the kernel's decompression area;
//! 4. the ACPI tables (see [`super::acpi`]);
//! 5. the boot information, pointing at all of the above plus the E820 map: the zero page for a
//!    bzImage (`boot_params`, with `acpi_rsdp_addr`), or `hvm_start_info` with its memory map and
//!    module list for PVH;
//! 6. the reset-vector stub at [`RESET_VECTOR`], for a guest that reboots through the BIOS.
//!
//! It returns the [`EntryPoint`]. Then [`configure_vcpu`] sets up each vCPU, in this order:
//! CPUID (APIC id and topology), MSRs, general registers, special registers with the boot GDT and
//! page tables, FPU, and the local APIC's LINT pins.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::acpi::{create_acpi_tables, AcpiError, DsdtDevice};
use super::cpuid::{setup_cpuid, CpuidError};
use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, RESET_VECTOR, ZERO_PAGE_START,
};
use super::memory::{e820_map, GuestMemory};
use super::msr::{setup_msrs, MsrError};
use super::regs::{setup_fpu, setup_lint, setup_regs, setup_sregs, EntryPoint, RegsError};
use super::topology::Topology;

/// `HdrS`, the setup header's magic (boot.rst, offset 0x202).
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The setup header's offset in a bzImage (boot.rst).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Boot protocol 2.10, the first with `pref_address` and `init_size`.
const PREF_ADDRESS_PROTOCOL: u16 = 0x020a;
/// Boot protocol 2.12, the first with `xloadflags`.
const MIN_64BIT_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit 0: the kernel has the 64-bit entry at 0x200 (boot.rst).
const XLF_KERNEL_64: u16 = 1;
/// `type_of_loader` 0xff: a boot loader without an assigned id (boot.rst).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `boot_flag`, 0xAA55 (boot.rst, offset 0x1fe).
const BOOT_FLAG: u16 = 0xaa55;
/// `XEN_HVM_START_MAGIC_VALUE` and the `hvm_start_info` version with the memory map (pvh.pandoc).
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u32 = 1;
/// The ELF magic, `\x7fELF`.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// The stub at the reset vector (16-bit real mode): pulse the i8042 reset line, then halt.
const RESET_STUB: [u8; 7] = [
    0xb0, 0xfe, // mov $0xfe, %al
    0xe6, 0x64, // out %al, $0x64
    0xf4, //       1: hlt
    0xeb, 0xfd, // jmp 1b
];
/// Page size, the initramfs alignment.
const PAGE_SIZE: u64 = 4096;

/// Errors from loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("Cannot open kernel {path}")]
    OpenKernel {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file could not be read.
    #[error("Cannot read kernel {path}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a bzImage nor an ELF file.
    #[error("Kernel {path} is neither a bzImage nor an ELF vmlinux")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// A bzImage without the 64-bit entry point.
    #[error("Kernel {path} has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x})")]
    No64BitEntry {
        /// The file.
        path: PathBuf,
        /// Its boot protocol version.
        version: u16,
        /// Its `xloadflags`.
        xloadflags: u16,
    },
    /// An ELF kernel without the PVH entry note.
    #[error("ELF kernel {path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry {
        /// The file.
        path: PathBuf,
    },
    /// linux-loader refused or could not load the kernel.
    #[error("Cannot load kernel {path} (an {format}): {reason}")]
    LoadKernel {
        /// The file.
        path: PathBuf,
        /// What it was loaded as: "ELF vmlinux" or "bzImage".
        format: &'static str,
        /// The loader's innermost error (its outer errors repeat it in their text).
        reason: String,
    },
    /// The command line is invalid or too long.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("Cannot write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The initramfs file could not be opened.
    #[error("Cannot open initrd {path}")]
    OpenInitrd {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("Initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// Reading the initramfs into guest memory failed.
    #[error("Cannot read initrd {path} into guest memory")]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the ACPI tables failed.
    #[error("Cannot write the ACPI tables")]
    Acpi(#[source] AcpiError),
    /// Writing the zero page or `hvm_start_info` failed.
    #[error("Cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing the reset-vector stub failed.
    #[error("Cannot write the reset-vector stub at {:#x}", RESET_VECTOR)]
    ResetStub(#[source] vm_memory::GuestMemoryError),
}

/// Errors from configuring a vCPU, one per step.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    /// CPUID.
    #[error("CPUID set-up failed")]
    Cpuid(#[source] CpuidError),
    /// MSRs.
    #[error("MSR set-up failed")]
    Msrs(#[source] MsrError),
    /// Registers, FPU or local APIC.
    #[error("Register set-up failed")]
    Regs(#[source] RegsError),
}

/// What [`load_guest`] needs.
#[derive(Debug)]
pub struct BootConfig<'a> {
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initramfs, if any.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The vCPUs (for the MADT).
    pub topology: &'a Topology,
    /// Guest RAM in bytes (for the E820 map).
    pub mem_bytes: u64,
    /// Extra DSDT devices.
    pub dsdt_devices: &'a [DsdtDevice],
    /// Whether the machine has a PCI bus (the MCFG table).
    pub pci: bool,
}

/// The kernel as loaded.
struct LoadedKernel {
    entry: EntryPoint,
    /// The setup header of a bzImage, to carry into the zero page.
    header: Option<linux_loader::loader::bootparam::setup_header>,
    /// The first address past the kernel and its decompression area.
    end: u64,
}

/// Loads the kernel, picking the protocol from the file's magic.
/// The innermost error of `error`'s chain, without linux-loader's "Kernel Loader: " prefix:
/// linux-loader's outer errors put their inner error's text in their own, so the whole chain
/// would say it twice.
fn loader_reason(error: &linux_loader::loader::Error) -> String {
    let mut inner: &dyn std::error::Error = error;
    while let Some(source) = inner.source() {
        inner = source;
    }
    let text = inner.to_string();
    text.strip_prefix("Kernel Loader: ")
        .map_or_else(|| text.clone(), str::to_owned)
}

fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let read_err = |source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    let is_elf = match file.read_exact(&mut magic) {
        Ok(()) => magic == ELF_MAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(read_err(e)),
    };
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let load_err = |format, error| BootError::LoadKernel {
        path: path.to_owned(),
        format,
        reason: loader_reason(&error),
    };
    if is_elf {
        let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err("ELF vmlinux", e))?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvhEntry {
                path: path.to_owned(),
            });
        };
        return Ok(LoadedKernel {
            entry: EntryPoint::Pvh(entry),
            header: None,
            end: loaded.kernel_end,
        });
    }
    let at = preferred_load_address(mem, &mut file).map_err(read_err)?;
    let loaded = match BzImage::load(mem, at, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(loaded) => loaded,
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage
            | linux_loader::loader::bzimage::Error::ReadBzImageHeader
            | linux_loader::loader::bzimage::Error::Underflow,
        )) => {
            return Err(BootError::NotAKernel {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(load_err("bzImage", e)),
    };
    let Some(header) = loaded
        .setup_header
        .filter(|h| h.header == SETUP_HEADER_MAGIC)
    else {
        return Err(BootError::NotAKernel {
            path: path.to_owned(),
        });
    };
    if header.version < MIN_64BIT_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry {
            path: path.to_owned(),
            version: header.version,
            xloadflags: header.xloadflags,
        });
    }
    // The kernel needs `init_size` bytes from where it was loaded (it decompresses in place when
    // loaded where it prefers).
    let end = loaded
        .kernel_end
        .max(loaded.kernel_load.0 + u64::from(header.init_size));
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64(loaded.kernel_load.unchecked_add(0x200)),
        header: Some(header),
        end,
    })
}

/// Where to load a bzImage's protected-mode kernel: at the address it prefers (`pref_address`,
/// boot protocol 2.10+; the kernel's `LOAD_PHYSICAL_ADDR`, 16 MiB by default, where it decompresses
/// itself) when the file and the `init_size` bytes the kernel needs from there fit in low RAM;
/// otherwise `None`, linux-loader's choice, `code32_start` (1 MiB). Loaded at 1 MiB, the compressed
/// kernel fills memory the kernel never decompresses to and leaves, once running, in `ZONE_DMA`,
/// which it rarely allocates from: RAM the host backs and zeroes for nothing. Loaded where it
/// decompresses, the kernel overwrites the memory it was read into, and what it frees there is
/// what it allocates first.
fn preferred_load_address(
    mem: &GuestMemory,
    file: &mut File,
) -> std::io::Result<Option<GuestAddress>> {
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))?;
    match file.read_exact(header.as_mut_slice()) {
        Ok(()) => {}
        // Too short to be a bzImage: linux-loader says so.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if header.header != SETUP_HEADER_MAGIC || header.version < PREF_ADDRESS_PROTOCOL {
        return Ok(None);
    }
    let at = header.pref_address;
    let needs = file.metadata()?.len().max(u64::from(header.init_size));
    let fits = at >= HIMEM_START
        && at
            .checked_add(needs)
            .is_some_and(|end| end <= low_ram_end(mem));
    Ok(fits.then_some(GuestAddress(at)))
}

/// The end of guest RAM below the PCI hole.
fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.last_addr()
        .raw_value()
        .saturating_add(1)
        .min(MMIO_GAP_START)
}

/// Loads the initramfs at the top of low RAM; returns (address, size).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::OpenInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let limit = low_ram_end(mem).min(addr_max.saturating_add(1));
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|source| BootError::ReadInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok((start, size))
}

/// Fills guest memory for `cfg` and returns the entry point (the steps are in the module doc).
pub fn load_guest(mem: &GuestMemory, cfg: &BootConfig) -> Result<EntryPoint, BootError> {
    // 1. Kernel.
    let kernel = load_kernel(mem, cfg.kernel)?;
    log::info!("startup: kernel loaded");
    // 2. Command line, within the kernel's limit when it states one.
    let cmdline_size = kernel
        .header
        .map_or(CMDLINE_MAX_SIZE, |h| {
            usize::try_from(h.cmdline_size).unwrap_or(0)
        })
        .clamp(1, CMDLINE_MAX_SIZE);
    let cmdline = Cmdline::try_from(cfg.cmdline, cmdline_size).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_len = u32::try_from(cfg.cmdline.len() + 1).unwrap_or(u32::MAX);
    // 3. Initramfs.
    let addr_max = kernel
        .header
        .map_or(MMIO_GAP_START - 1, |h| u64::from(h.initrd_addr_max));
    let initrd = cfg
        .initrd
        .map(|path| load_initrd(mem, path, kernel.end, addr_max))
        .transpose()?;
    log::info!("startup: command line and initramfs loaded");
    // 4. ACPI.
    let rsdp = create_acpi_tables(mem, cfg.topology, cfg.dsdt_devices, cfg.pci)
        .map_err(BootError::Acpi)?;
    log::info!("startup: ACPI tables written");
    // 5. Boot information.
    let e820 = e820_map(cfg.mem_bytes);
    match kernel.entry {
        EntryPoint::Linux64(_) => {
            let mut params = boot_params::default();
            if let Some(header) = kernel.header {
                params.hdr = header;
            }
            params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
            params.hdr.cmdline_size = cmdline_len;
            if let Some((addr, size)) = initrd {
                // Both fit in 32 bits: the initramfs ends below 3 GiB.
                params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
                params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
            }
            params.acpi_rsdp_addr = rsdp.0;
            for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&e820) {
                *slot = boot_e820_entry {
                    addr,
                    size,
                    r#type: type_,
                };
            }
            params.e820_entries = u8::try_from(e820.len()).unwrap_or(0);
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(BootError::BootParams)?;
        }
        EntryPoint::Pvh(_) => {
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut info = hvm_start_info {
                magic: PVH_MAGIC,
                version: PVH_VERSION,
                cmdline_paddr: CMDLINE_START,
                rsdp_paddr: rsdp.0,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: u32::try_from(memmap.len()).unwrap_or(0),
                ..Default::default()
            };
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            if let Some((paddr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
                params.set_modules(
                    &[hvm_modlist_entry {
                        paddr,
                        size,
                        ..Default::default()
                    }],
                    GuestAddress(PVH_MODLIST_START),
                );
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)?;
        }
    }
    // 6. Reset vector.
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(BootError::ResetStub)?;
    Ok(kernel.entry)
}

/// Sets up vCPU `index` of `topology` for `entry` (the steps are in the module doc). Only vCPU 0
/// runs the entry; the others start in wait-for-SIPI, but get the same state so that nothing
/// depends on which vCPU the kernel boots.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    supported_cpuid: &CpuId,
    index: u8,
    topology: &Topology,
    entry: EntryPoint,
) -> Result<(), VcpuSetupError> {
    setup_cpuid(vcpu, supported_cpuid, index, topology).map_err(VcpuSetupError::Cpuid)?;
    setup_msrs(vcpu).map_err(VcpuSetupError::Msrs)?;
    setup_regs(vcpu, entry).map_err(VcpuSetupError::Regs)?;
    setup_sregs(mem, vcpu, entry).map_err(VcpuSetupError::Regs)?;
    setup_fpu(vcpu).map_err(VcpuSetupError::Regs)?;
    setup_lint(vcpu).map_err(VcpuSetupError::Regs)?;
    Ok(())
}

/// The tiny guests and image builders the binary's tests use (kept beside them).
#[cfg(test)]
#[path = "../../../tests/common/images.rs"]
pub mod test_images;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::memory::create_guest_memory;
    use vm_memory::Bytes;

    use super::test_images as images;

    /// A file in the temp directory holding `bytes`, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!("vmm-boot-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).expect("temp dir is writable");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load(
        kernel: &Path,
        initrd: Option<&Path>,
        mem_bytes: u64,
    ) -> Result<(GuestMemory, EntryPoint), BootError> {
        let mem = create_guest_memory(mem_bytes, u64::MAX).expect("maps");
        let cfg = BootConfig {
            kernel,
            initrd,
            cmdline: "console=ttyS0",
            topology: &Topology::cores(2).expect("valid"),
            mem_bytes,
            dsdt_devices: &[],
            pci: false,
        };
        load_guest(&mem, &cfg).map(|entry| (mem, entry))
    }

    #[test]
    fn bzimage_boot_fills_the_zero_page() {
        let kernel = TempFile::new("bz", &images::bzimage(&images::spin_guest()));
        let initrd = TempFile::new("bz-initrd", &[0x5a; 5000]);
        let (mem, entry) = load(&kernel.0, Some(&initrd.0), 32 << 20).expect("boots");
        assert_eq!(
            entry,
            EntryPoint::Linux64(GuestAddress(HIMEM_START + 0x200))
        );
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("in RAM");
        let hdr = params.hdr;
        assert_eq!({ hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.ramdisk_size }, 5000);
        // The initramfs is page-aligned at the top of RAM.
        assert_eq!(u64::from(hdr.ramdisk_image), (32 << 20) - 8192);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.e820_entries, 3);
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .expect("in RAM");
        assert_eq!(&cmdline, b"console=ttyS0\0");
        let mut stub = [0u8; 7];
        mem.read_slice(&mut stub, GuestAddress(RESET_VECTOR))
            .expect("in RAM");
        assert_eq!(stub, RESET_STUB);
    }

    #[test]
    fn bzimage_loads_where_it_prefers_when_it_fits() {
        const PREFERRED: u64 = 16 << 20;
        let code = [0xf4, 0xeb, 0xfd];
        let mut image = images::bzimage(&code);
        image[0x258..0x260].copy_from_slice(&PREFERRED.to_le_bytes()); // pref_address
        let kernel = TempFile::new("bz-pref", &image);
        let (mem, entry) = load(&kernel.0, None, 32 << 20).expect("boots");
        assert_eq!(entry, EntryPoint::Linux64(GuestAddress(PREFERRED + 0x200)));
        let mut loaded = [0u8; 3];
        mem.read_slice(&mut loaded, GuestAddress(PREFERRED + 0x200))
            .expect("in RAM");
        assert_eq!(loaded, code);
        let mut below = [0xffu8; 0x300];
        mem.read_slice(&mut below, GuestAddress(HIMEM_START))
            .expect("in RAM");
        assert_eq!(below, [0; 0x300], "nothing loaded at code32_start");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("in RAM");
        assert_eq!(u64::from(params.hdr.code32_start), PREFERRED);
        // The kernel's init_size (64 KiB) from its preferred address passes the end of RAM: it
        // loads at code32_start.
        let small = (16 << 20) + (32 << 10);
        let (_, entry) = load(&kernel.0, None, small).expect("boots");
        assert_eq!(
            entry,
            EntryPoint::Linux64(GuestAddress(HIMEM_START + 0x200))
        );
    }

    #[test]
    fn pvh_boot_fills_start_info() {
        let kernel = TempFile::new("pvh", &images::pvh_elf(&images::pvh_poweroff_guest(), true));
        let initrd = TempFile::new("pvh-initrd", &[1; 100]);
        let (mem, entry) = load(&kernel.0, Some(&initrd.0), 16 << 20).expect("boots");
        assert_eq!(entry, EntryPoint::Pvh(GuestAddress(HIMEM_START)));
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("in RAM");
        assert_eq!(
            (info.magic, info.nr_modules, info.memmap_entries),
            (PVH_MAGIC, 1, 3)
        );
        assert_eq!(
            (info.rsdp_paddr, info.cmdline_paddr),
            (0xe0000, CMDLINE_START)
        );
        let module: hvm_modlist_entry = mem
            .read_obj(GuestAddress(PVH_MODLIST_START))
            .expect("in RAM");
        assert_eq!((module.paddr, module.size), ((16 << 20) - 4096, 100));
    }

    #[test]
    fn each_boot_error_by_variant() {
        let missing = Path::new("/nonexistent/kernel");
        assert!(matches!(
            load(missing, None, 16 << 20),
            Err(BootError::OpenKernel { .. })
        ));
        let text = TempFile::new("text", b"not a kernel at all");
        assert!(matches!(
            load(&text.0, None, 16 << 20),
            Err(BootError::NotAKernel { .. })
        ));
        let old = TempFile::new("old", &images::bzimage_with(&[0xf4], 0x020a, 0));
        assert!(matches!(
            load(&old.0, None, 16 << 20),
            Err(BootError::No64BitEntry {
                version: 0x020a,
                ..
            })
        ));
        let no_note = TempFile::new("nonote", &images::pvh_elf(&[0xf4], false));
        assert!(matches!(
            load(&no_note.0, None, 16 << 20),
            Err(BootError::NoPvhEntry { .. })
        ));
        let kernel = TempFile::new("ok", &images::bzimage(&[0xf4]));
        assert!(matches!(
            load(&kernel.0, Some(missing), 16 << 20),
            Err(BootError::OpenInitrd { .. })
        ));
        let big = TempFile::new("big", &vec![0; 17 << 20]);
        assert!(matches!(
            load(&kernel.0, Some(&big.0), 16 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
        // A kernel larger than guest memory.
        let huge = TempFile::new("huge", &images::bzimage(&vec![0x90; 9 << 20]));
        assert!(matches!(
            load(&huge.0, None, 8 << 20),
            Err(BootError::LoadKernel {
                format: "bzImage",
                ..
            })
        ));
        // An ELF entered below 1 MiB (as /bin/true is): the loader's reason, said once.
        let mut low = images::pvh_elf(&[0xf4], true);
        low[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        let low = TempFile::new("low-entry", &low);
        let err = load(&low.0, None, 16 << 20).expect_err("entry below the kernel's load address");
        assert!(std::error::Error::source(&err).is_none());
        assert_eq!(
            err.to_string(),
            format!(
                "Cannot load kernel {} (an ELF vmlinux): Invalid entry address",
                low.0.display()
            )
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        let mem = create_guest_memory(16 << 20, u64::MAX).expect("maps");
        let cfg = BootConfig {
            kernel: &kernel.0,
            initrd: None,
            cmdline: &long,
            topology: &Topology::cores(1).expect("valid"),
            mem_bytes: 16 << 20,
            dsdt_devices: &[],
            pci: false,
        };
        assert!(matches!(load_guest(&mem, &cfg), Err(BootError::Cmdline(_))));
    }
}
