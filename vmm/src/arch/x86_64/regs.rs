//! The vCPU state at the kernel's entry: general registers, segment and control registers, the
//! boot GDT and page tables, the FPU, and the local APIC's LINT pins.
//!
//! Two entry protocols (see [`EntryPoint`]):
//! - the Linux 64-bit boot protocol (`Documentation/arch/x86/boot.rst`, "64-bit Boot Protocol"):
//!   long mode with paging, an identity map covering the kernel, the zero page in `%rsi`;
//! - PVH (xen `docs/misc/pvh.pandoc`): 32-bit protected mode, paging off, flat segments,
//!   `hvm_start_info` in `%ebx`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{gdt_entry, kvm_segment_from_gdt, CODE32, CODE64, DATA, TSS};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use super::memory::GuestMemory;

/// Where and how the vCPU 0 starts the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// The 64-bit entry of a bzImage (`startup_64`, 0x200 past the protected-mode kernel).
    Linux64(GuestAddress),
    /// The PVH entry from an ELF kernel's `XEN_ELFNOTE_PHYS32_ENTRY` note.
    Pvh(GuestAddress),
}

/// Errors from setting registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// KVM_SET_REGS failed.
    #[error("Cannot set the general registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("Cannot get the special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("Cannot set the special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("Cannot set the FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_LAPIC failed.
    #[error("Cannot get the local APIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("Cannot set the local APIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// Writing the GDT, IDT or page tables to guest memory failed.
    #[error("Cannot write the boot {what} at {addr:#x}")]
    WriteMemory {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// CR0: protection enable (Intel SDM vol. 3, 2.5).
const CR0_PE: u64 = 1 << 0;
/// CR0: extension type, hard-wired to 1 on every processor since the i486.
const CR0_ET: u64 = 1 << 4;
/// CR0: paging.
const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension, required by long mode.
const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable and active (Intel SDM vol. 3, 2.2.1).
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// Page-table entry bits: present, writable, and (in a page directory) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_PAGE_SIZE: u64 = 1 << 7;

/// Sets the general registers for `entry`. Only vCPU 0 runs the kernel's entry; the others wait
/// for the INIT/SIPI the kernel sends them.
pub fn setup_regs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let regs = match entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: rip.0,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: rip.0,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// The boot GDT for `entry`: null, code, data, TSS.
fn boot_gdt(entry: EntryPoint) -> [u64; 4] {
    let code = match entry {
        EntryPoint::Linux64(_) => CODE64,
        EntryPoint::Pvh(_) => CODE32,
    };
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ]
}

/// Writes `value` at `addr` in guest memory, naming `what` on failure.
fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes the boot GDT and IDT to guest memory and fills `sregs` with segments, descriptor
/// tables and control registers for `entry`.
fn configure_segments_and_sregs(
    mem: &GuestMemory,
    sregs: &mut kvm_sregs,
    entry: EntryPoint,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(entry);
    for (i, e) in gdt.iter().enumerate() {
        write_obj(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *e)?;
    }
    write_obj(mem, "IDT", BOOT_IDT_START, 0u64)?;
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        EntryPoint::Linux64(_) => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Writes page tables identity-mapping the first GiB with 2 MiB pages, which covers the boot
/// structures and any kernel loaded at 1 MiB (the kernel builds its own tables right away).
fn setup_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    write_obj(mem, "PML4", PML4_START, PDPTE_START | PTE_PRESENT_RW)?;
    write_obj(mem, "PDPTE", PDPTE_START, PDE_START | PTE_PRESENT_RW)?;
    for i in 0..512u64 {
        write_obj(
            mem,
            "PDE",
            PDE_START + i * 8,
            (i << 21) | PDE_PAGE_SIZE | PTE_PRESENT_RW,
        )?;
    }
    Ok(())
}

/// Sets segments, descriptor tables, control registers and (for the 64-bit protocol) paging.
pub fn setup_sregs(mem: &GuestMemory, vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_segments_and_sregs(mem, &mut sregs, entry)?;
    if let EntryPoint::Linux64(_) = entry {
        setup_page_tables(mem)?;
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// Sets the x87 control word and MXCSR to their reset values (Intel SDM vol. 1, 8.1.5, 10.2.3.1).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Offsets of the LVT LINT0 and LINT1 registers in the local APIC page (Intel SDM vol. 3,
/// table 11-1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (Intel SDM vol. 3, 11.5.1): ExtINT and NMI, in bits 10:8.
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// `reg` with its delivery mode replaced by `mode`.
fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC BIOS leaves them (MP spec 1.4,
/// 3.6.1, "virtual wire mode").
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i].to_ne_bytes()[0]);
        let value = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = i8::from_ne_bytes([b]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("1 MiB maps")
    }

    #[test]
    fn long_mode_sregs_and_tables() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        configure_segments_and_sregs(&mem, &mut sregs, EntryPoint::Linux64(GuestAddress(0)))
            .expect("fits");
        setup_page_tables(&mem).expect("fits");
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr0 & CR0_PG, CR0_PG);
        let gdt1: u64 = mem
            .read_obj(GuestAddress(BOOT_GDT_START + 8))
            .expect("in RAM");
        assert_eq!(gdt1, gdt_entry(CODE64, 0, 0xfffff));
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("in RAM");
        assert_eq!(pml4, PDPTE_START | 3);
        let last_pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 511 * 8))
            .expect("in RAM");
        assert_eq!(last_pde, (511 << 21) | 0x83);
    }

    #[test]
    fn pvh_sregs_are_flat_32_bit_without_paging() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        configure_segments_and_sregs(&mem, &mut sregs, EntryPoint::Pvh(GuestAddress(0)))
            .expect("fits");
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert_eq!(sregs.cr0, CR0_PE | CR0_ET);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn delivery_mode_keeps_other_bits() {
        // Masked (bit 16) with vector 0x30: only bits 10:8 change.
        assert_eq!(set_delivery_mode(0x1_0730, APIC_MODE_NMI), 0x1_0430);
    }
}
