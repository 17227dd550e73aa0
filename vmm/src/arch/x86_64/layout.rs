//! Every guest-physical address and I/O port the VMM places something at, in one table.
//!
//! Low memory (below 1 MiB) holds the boot structures; the kernel loads at 1 MiB; RAM continues
//! up to the 32-bit PCI hole at 3 GiB and resumes at 4 GiB; the hole holds the MMIO devices, the
//! IOAPIC and the local APICs. References: the Linux x86 boot protocol
//! (`Documentation/arch/x86/boot.rst`), the PVH boot ABI (xen `docs/misc/pvh.pandoc`), the
//! Intel SDM vol. 3 (APIC), the 82093AA IOAPIC datasheet, and the ACPI 6.5 specification.

/// The boot GDT, just past the real-mode interrupt vector table and BIOS data area (0 to 0x4FF,
/// left alone: Linux reads the BDA) (4 entries of 8 bytes), read by `lgdt` only through the vCPU's GDTR.
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty; interrupts stay off until the kernel loads its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The PVH `hvm_start_info` structure, pointed to by `%ebx` at the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (one entry: the initramfs), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map, one `hvm_memmap_table_entry` per E820 entry (a PVH boot has no zero
/// page, so it shares that page).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// The Linux zero page (`struct boot_params`), pointed to by `%rsi` at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack (it grows down from here); `%rsp` at the kernel's entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The boot PML4: one entry pointing at [`PDPTE_START`].
pub const PML4_START: u64 = 0x9000;
/// The boot page-directory-pointer table: one entry pointing at [`PDE_START`].
pub const PDPTE_START: u64 = 0xa000;
/// The boot page directory: 512 2-MiB pages identity-mapping the first GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line; Linux's `COMMAND_LINE_SIZE` on x86 is 2048.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: usable RAM ends here, reserved memory starts.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables, RSDP first, in the BIOS area where a kernel also scans for the RSDP
/// (0xE0000 to 0xFFFFF, ACPI 6.5 section 5.2.5.1).
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI table area.
pub const ACPI_END: u64 = 0xf0000;
/// The reset vector, F000:FFF0, where a CPU starts after a reset and where Linux jumps, in real
/// mode, when it reboots "through the BIOS" (`machine_real_restart`, its choice on a
/// hardware-reduced ACPI platform without EFI). A BIOS would reset the machine from there; we put
/// a stub that pulses the i8042 reset line, so such a reboot ends the VM too.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Start of high memory (1 MiB): where a bzImage's protected-mode kernel loads (`code32_start`)
/// when it cannot where it prefers, and the kernel's lowest acceptable load address.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI hole (3 GiB): RAM beyond this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit PCI hole (4 GiB): where the rest of RAM resumes.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The ACPI Generic Event Device's event selector (4 bytes, see `devices::legacy::Ged`), where
/// QEMU's microvm puts its GED.
pub const GED_START: u64 = 0xfea0_0000;
/// The IOAPIC's registers (82093AA default base), 4 KiB.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' registers (Intel SDM vol. 3, 11.4.1: `IA32_APIC_BASE` default), 4 KiB.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS for real-mode emulation on Intel (`KVM_SET_TSS_ADDR`), just below the
/// BIOS ROM shadow at the top of the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// The first virtio-mmio transport's registers; each further one follows `VIRTIO_MMIO_SIZE`
/// bytes higher (virtio 1.2 section 4.2.2: the register block is 0x100 bytes plus the
/// configuration space, 0x200 in all).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The window of one virtio-mmio transport (`devices::virtio::MMIO_SIZE`).
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// The virtio-mmio transports' interrupts: IOAPIC pins (GSIs) from this one up, one per device,
/// edge-triggered (an irqfd without a resample fd pulses its line).
pub const VIRTIO_IRQ_FIRST: u32 = 10;
/// The last GSI a virtio-mmio transport may have, so at most 13 disks.
pub const VIRTIO_IRQ_LAST: u32 = 22;

/// The first IOAPIC pin (GSI) a PCI function's INTx line may have: past the ISA interrupts (0 to
/// 15), whose trigger mode the MADT would otherwise have to override.
pub const PCI_INTX_GSI_FIRST: u32 = 16;

/// The GSI of the INTx line (INTA#) of the PCI function in slot `slot`, on a machine with
/// `mmio_count` virtio-mmio transports: the pins from [`PCI_INTX_GSI_FIRST`] to
/// [`VIRTIO_IRQ_LAST`] that those leave free, shared round the slots as a PCI bridge swizzles
/// its slots over four lines (a PCI interrupt is level-triggered, so functions may share one).
/// None when the virtio-mmio transports take them all.
pub fn pci_intx_gsi(mmio_count: u32, slot: u8) -> Option<u32> {
    let first = PCI_INTX_GSI_FIRST.max(VIRTIO_IRQ_FIRST.saturating_add(mmio_count));
    let pins = VIRTIO_IRQ_LAST.checked_sub(first)? + 1;
    Some(first + u32::from(slot) % pins)
}

/// The window the PCI functions' BARs are placed in (32-bit, non-prefetchable), from the start
/// of the hole up to the virtio-mmio transports.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
/// Bytes of the PCI BAR window.
pub const PCI_MMIO_SIZE: u64 = VIRTIO_MMIO_START - PCI_MMIO_START;
/// Bytes of the 64-bit PCI BAR window (QEMU's q35 default `pci-hole64-size`), or less where
/// the vCPU's physical addresses end sooner.
pub const PCI_MMIO64_SIZE: u64 = 32 << 30;
/// The 64-bit window starts on a GiB boundary, as QEMU rounds the start of its 64-bit hole.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;

/// The 64-bit PCI BAR window of a guest whose RAM ends at `ram_end` (exclusive) and whose vCPUs
/// address `phys_bits` bits of physical memory (CPUID 0x80000008, EAX bits 7 to 0): from the first GiB
/// boundary at or above 4 GiB and RAM's end, [`PCI_MMIO64_SIZE`] bytes, cut at the last address
/// the vCPU can reach (a window past it the guest's kernel refuses, and its BARs could not be
/// reached). None when less than `min` bytes would be left.
pub fn pci_mmio64_window(ram_end: u64, phys_bits: u8, min: u64) -> Option<std::ops::Range<u64>> {
    let start = ram_end
        .max(MMIO_GAP_END)
        .checked_next_multiple_of(PCI_MMIO64_ALIGN)?;
    let limit = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
    let end = start.saturating_add(PCI_MMIO64_SIZE).min(limit);
    (end.checked_sub(start)? >= min.max(1)).then_some(start..end)
}

/// The PCI root bus's ECAM window (PCIe memory-mapped configuration space), bus 0 only: 1 MiB
/// (`devices::pci::ECAM_BUS_SIZE`).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Bytes of the ECAM window.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// The PCI configuration mechanism #1 ports: address at 0xCF8, data at 0xCFC to 0xCFF.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
/// The first GSI of the PCI functions' MSI-X vectors, past the IOAPIC's 24 pins; each vector
/// has its own, routed to the guest's message.
pub const PCI_MSI_GSI_FIRST: u32 = 24;

/// COM1 (16550A UART), 8 ports.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 keyboard controller: data at 0x60, command and status at 0x64.
pub const I8042_PORT: u64 = 0x60;
/// The CMOS RTC: index at 0x70, data at 0x71.
pub const RTC_PORT: u64 = 0x70;
/// The Generic Event Device's interrupt: the IOAPIC's last pin, clear of the ISA lines.
pub const GED_IRQ: u32 = 23;
/// The ACPI sleep control (0x600) and sleep status (0x601) registers, one byte each; the port is
/// QEMU's PM base, free on a machine without PCI.
pub const ACPI_SLEEP_PORT: u64 = 0x600;

// The orderings the rest of the VMM relies on, checked at compile time.
const _: () = assert!(0x500 <= BOOT_GDT_START, "clear of the IVT and BDA");
const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(CMDLINE_START + (CMDLINE_MAX_SIZE as u64) < EBDA_START);
const _: () = assert!(MMIO_GAP_START < GED_START && GED_START < IOAPIC_START);
const _: () = assert!(IOAPIC_START < APIC_START);
const _: () = assert!(MMIO_GAP_START <= VIRTIO_MMIO_START);
const _: () = assert!(
    VIRTIO_MMIO_START + (VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as u64 * VIRTIO_MMIO_SIZE
        <= GED_START
);
const _: () = assert!(COM1_IRQ < VIRTIO_IRQ_FIRST);
const _: () = assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= VIRTIO_MMIO_START);
const _: () = assert!(
    VIRTIO_MMIO_START + (VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as u64 * VIRTIO_MMIO_SIZE
        <= PCI_ECAM_START
        && PCI_ECAM_START + PCI_ECAM_SIZE <= GED_START
);
const _: () = assert!(GED_IRQ < PCI_MSI_GSI_FIRST);
const _: () =
    assert!(VIRTIO_IRQ_FIRST < PCI_INTX_GSI_FIRST && PCI_INTX_GSI_FIRST <= VIRTIO_IRQ_LAST);
const _: () = assert!(
    VIRTIO_IRQ_LAST < GED_IRQ && GED_IRQ < 24,
    "IOAPIC pins 0 to 23"
);
const _: () = assert!(APIC_START < KVM_TSS_START && KVM_TSS_START + 0x3000 <= MMIO_GAP_END);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_memory_structures_do_not_overlap() {
        // (start, length) of each structure placed below 1 MiB, in address order.
        let used = [
            (BOOT_GDT_START, 4 * 8),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x38),
            (PVH_MODLIST_START, 0x20),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END - ACPI_START),
            (RESET_VECTOR, 16),
        ];
        for pair in used.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        assert_eq!(RESET_VECTOR + 16, HIMEM_START);
    }

    #[test]
    fn intx_lines_take_the_pins_the_mmio_transports_leave() {
        // No virtio-mmio disk: GSIs 16 to 22, seven pins shared round the slots.
        let gsis: Vec<u32> = (1..=8)
            .map(|slot| pci_intx_gsi(0, slot).expect("a pin"))
            .collect();
        assert_eq!(gsis, [17, 18, 19, 20, 21, 22, 16, 17]);
        // Eight virtio-mmio disks hold GSIs 10 to 17: 18 to 22 are left.
        assert_eq!(pci_intx_gsi(8, 1), Some(19));
        assert_eq!(pci_intx_gsi(8, 5), Some(18));
        // Twelve: 22 alone; thirteen: none.
        assert_eq!(pci_intx_gsi(12, 1), Some(22));
        assert_eq!(pci_intx_gsi(12, 31), Some(22));
        assert_eq!(pci_intx_gsi(13, 1), None);
        assert_eq!(pci_intx_gsi(u32::MAX, 1), None);
        for mmio in 0..=13 {
            for slot in 1..32 {
                if let Some(gsi) = pci_intx_gsi(mmio, slot) {
                    assert!(gsi >= PCI_INTX_GSI_FIRST && gsi >= VIRTIO_IRQ_FIRST + mmio);
                    assert!(gsi <= VIRTIO_IRQ_LAST && gsi != GED_IRQ && gsi != COM1_IRQ);
                }
            }
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_64_bit_window_starts_above_4_gib_and_above_ram() {
        // RAM below the hole: the window starts at 4 GiB.
        assert_eq!(
            pci_mmio64_window(512 << 20, 40, 1 << 20),
            Some(4 * GIB..36 * GIB)
        );
        // RAM above 4 GiB: past its end, on the next GiB boundary.
        assert_eq!(
            pci_mmio64_window(6 * GIB, 40, 1 << 20),
            Some(6 * GIB..38 * GIB)
        );
        assert_eq!(
            pci_mmio64_window(6 * GIB + 4096, 40, 1 << 20),
            Some(7 * GIB..39 * GIB)
        );
    }

    #[test]
    fn the_64_bit_window_stays_below_what_the_vcpu_addresses() {
        // 36 bits: 64 GiB; the window ends there.
        assert_eq!(
            pci_mmio64_window(40 * GIB, 36, 1 << 20),
            Some(40 * GIB..64 * GIB)
        );
        // RAM up to the limit: no room, no window; too little room for `min`, none either.
        assert_eq!(pci_mmio64_window(64 * GIB, 36, 1 << 20), None);
        assert_eq!(pci_mmio64_window(64 * GIB - 1, 36, 1 << 20), None);
        assert_eq!(pci_mmio64_window(63 * GIB, 36, 2 * GIB), None);
        assert_eq!(
            pci_mmio64_window(63 * GIB, 36, GIB),
            Some(63 * GIB..64 * GIB)
        );
        // Address widths no shift can take are no limit; RAM at the top, no window.
        assert_eq!(pci_mmio64_window(GIB, 64, 1 << 20), Some(4 * GIB..36 * GIB));
        assert_eq!(pci_mmio64_window(u64::MAX - 5, 64, 1 << 20), None);
    }
}
