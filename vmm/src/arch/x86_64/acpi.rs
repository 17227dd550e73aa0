//! ACPI tables for a hardware-reduced platform, built with the acpi_tables crate.
//!
//! The tables sit at [`ACPI_START`] (RSDP first, then XSDT, FADT, MADT, DSDT, each 8-byte
//! aligned); the kernel finds the RSDP through `boot_params.acpi_rsdp_addr` (bzImage) or
//! `hvm_start_info.rsdp_paddr` (PVH), or by scanning 0xE0000 to 0xFFFFF. What they say
//! (ACPI 6.5 chapter 5):
//! - FADT (5.2.9): `HW_REDUCED_ACPI`, so there are no PM1 blocks, no SCI and no fixed buttons;
//!   power-off goes through the sleep control and status registers at [`ACPI_SLEEP_PORT`].
//! - MADT (5.2.12): one local APIC per vCPU, with the APIC id its place in the `-smp` topology
//!   gives it ([`Topology::apic_id`], at most 254, so xAPIC entries name them all), and the
//!   IOAPIC; this is how a kernel without MP-table support finds every CPU.
//! - DSDT (5.2.11.1): COM1 (`PNP0501`), the CMOS RTC (`PNP0B00`), the power button (`PNP0C0C`)
//!   with the Generic Event Device that signals it (`ACPI0013`), the `\_S5_` package Linux needs
//!   before it registers ACPI power-off, and whatever devices the caller adds ([`DsdtDevice`]: the
//!   virtio-mmio transports, [`virtio_mmio_device`]; the PCI host bridge, [`pci_host_bridge`]).
//! - MCFG (PCI Firmware 3.3, 4.1.2), only when the machine has PCI: the ECAM window of bus 0.

use std::ops::Range;

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_END, ACPI_SLEEP_PORT, ACPI_START, APIC_START, COM1_IRQ, COM1_PORT, GED_IRQ, GED_START,
    IOAPIC_START, PCI_CONFIG_PORT, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START,
    RTC_PORT, VIRTIO_MMIO_SIZE,
};
use super::memory::GuestMemory;
use super::topology::Topology;
use devices::legacy::{GED_EVENT_POWER_BUTTON, GED_MMIO_SIZE, SLEEP_TYPE_S5};

/// OEM id and table id written in every table header.
const OEM_ID: [u8; 6] = *b"VMMRS ";
const OEM_TABLE_ID: [u8; 8] = *b"VMMRSTBL";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 and up means 64-bit AML integers (ACPI 6.5, 5.2.11.1).
const DSDT_REVISION: u8 = 6;
/// MADT flags: PCAT_COMPAT, the machine has the dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;

/// The AML encoding of a `Device` object the caller adds to the DSDT's `\_SB_` scope (a
/// virtio-mmio transport, for example); build it with [`aml_bytes`] from `acpi_tables::aml`.
pub type DsdtDevice = Vec<u8>;

/// Errors from writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit between [`ACPI_START`] and [`ACPI_END`].
    #[error("ACPI tables need {bytes} bytes, more than the {} reserved", ACPI_END - ACPI_START)]
    TooLarge {
        /// Bytes the tables need.
        bytes: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("Cannot write the {table} table at {addr:#x}")]
    Write {
        /// Table signature.
        table: &'static str,
        /// Guest address.
        addr: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The bytes of any AML object or table.
pub fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// The `LNRO0005` device of virtio-mmio transport `index` (its `_UID`), with its register window
/// at `base` and its interrupt `gsi`, edge-triggered: the irqfd that raises it has no resample fd,
/// so it pulses the line.
pub fn virtio_mmio_device(index: u8, base: u64, gsi: u32) -> DsdtDevice {
    let name = format!("V{index:03X}");
    let base = u32::try_from(base).unwrap_or(0);
    let size = u32::try_from(VIRTIO_MMIO_SIZE).unwrap_or(0x200);
    aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &index),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, base, size),
                    &aml::Interrupt::new(true, true, false, false, gsi),
                ]),
            ),
        ],
    ))
}

/// The PCI root bridge of bus 0 (`PNP0A08`, PCI Express, compatible with `PNP0A03`): its bus
/// range, the configuration mechanism #1 ports and the BAR windows it decodes (the 32-bit one,
/// and `window64` above 4 GiB if any: a QWord memory range, not prefetchable, as QEMU's generic
/// PCIe host describes its 64-bit window; a guest puts no non-prefetchable BAR in a prefetchable
/// window), its `_PRT` (ACPI 6.5, 6.2.13) from `intx`, (slot, GSI) pairs: INTA# of that slot's
/// function goes to that IOAPIC pin (a GSI in the source index, with no link device; the guest
/// makes such a pin level-triggered and active low, as PCI wants), and, in a `PNP0C02`
/// motherboard device, the ECAM window, which Linux wants reserved there before it uses the
/// MCFG entry.
pub fn pci_host_bridge(window64: Option<&Range<u64>>, intx: &[(u8, u32)]) -> DsdtDevice {
    let port = u16::try_from(PCI_CONFIG_PORT).unwrap_or(0xcf8);
    let mmio_start = u32::try_from(PCI_MMIO_START).unwrap_or(0);
    let mmio_end = u32::try_from(PCI_MMIO_START + PCI_MMIO_SIZE - 1).unwrap_or(0);
    let ecam_start = u32::try_from(PCI_ECAM_START).unwrap_or(0);
    let ecam_size = u32::try_from(PCI_ECAM_SIZE).unwrap_or(0);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let ports = aml::IO::new(port, port, 1, 8);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio_start,
        mmio_end,
        None,
    );
    let mmio64 = window64.map(|w| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            w.start,
            w.end - 1,
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus, &ports, &mmio];
    if let Some(m) = &mmio64 {
        resources.push(m);
    }
    // _PRT entries: the slot's address (device in the high word, any function), pin 0 (INTA#),
    // source 0 (a GSI, not a link), the GSI.
    let routes: Vec<(u32, u32)> = intx
        .iter()
        .map(|&(slot, gsi)| ((u32::from(slot) << 16) | 0xffff, gsi))
        .collect();
    let entries: Vec<aml::Package> = routes
        .iter()
        .map(|(address, gsi)| aml::Package::new(vec![address, &aml::ZERO, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
    let prt = aml::Name::new("_PRT".into(), &prt);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::ResourceTemplate::new(resources);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs];
    if !intx.is_empty() {
        children.push(&prt);
    }
    let mut aml = aml_bytes(&aml::Device::new("PCI0".into(), children));
    aml.extend(aml_bytes(&aml::Device::new(
        "MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    true, ecam_start, ecam_size,
                )]),
            ),
        ],
    )));
    aml
}

/// The MCFG: bus 0's ECAM window.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    aml_bytes(&mcfg)
}

/// The CMOS RTC (`PNP0B00`): without this entry a hardware-reduced kernel has no platform device
/// for rtc_cmos, and its probe fails. Its I/O ports only: the RTC model raises no interrupt, and
/// describing IRQ 8 anyway made the guest request it at boot, which shifted Linux's vector
/// allocation so that the first disk's interrupt went to CPU 1 and the console's to CPU 0, the
/// reverse of a QEMU microvm guest (measured in the nested host: with fio on CPU 0 and CPU 1 busy,
/// every completion then crossed CPUs). Without an IRQ, rtc_cmos registers the clock without
/// alarms.
fn rtc_device() -> Vec<u8> {
    let rtc_port = u16::try_from(RTC_PORT).unwrap_or(0x70);
    aml_bytes(&aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(rtc_port, rtc_port, 1, 2)]),
            ),
        ],
    ))
}

/// The power button (`PNP0C0C`) and the Generic Event Device (`ACPI0013`, ACPI 6.5 section 5.6.9)
/// that notifies it: on the GED's interrupt, `_EVT` reads the event selector (which clears it)
/// and sends the button notification 0x80 ("pressed", ACPI 6.5 section 4.8.3.1.1.2) when the
/// power-button bit is set.
fn power_button() -> Vec<u8> {
    let ged_base = u32::try_from(GED_START).unwrap_or(0xfea0_0000);
    let ged_size = u32::try_from(GED_MMIO_SIZE).unwrap_or(4);
    let button_bit = GED_EVENT_POWER_BUTTON;
    let mut aml = aml_bytes(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    ));
    aml.extend(aml_bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_IRQ,
                )]),
            ),
            &aml::OpRegion::new(
                "EREG".into(),
                aml::OpRegionSpace::SystemMemory,
                &ged_base,
                &ged_size,
            ),
            &aml::Field::new(
                "EREG".into(),
                aml::FieldAccessType::DWord,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::WriteAsZeroes,
                vec![aml::FieldEntry::Named(*b"ESEL", 32)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("ESEL")),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::ZERO, &aml::Local(0), &button_bit),
                            &button_bit,
                        ),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                ],
            ),
        ],
    )));
    aml
}

/// The DSDT body: `\_SB_` with COM1, the RTC, the power button and its GED, and `extra`; and
/// `\_S5_`.
fn dsdt(extra: &[DsdtDevice]) -> Vec<u8> {
    let com1_port = u16::try_from(COM1_PORT).unwrap_or(0x3f8);
    // ISA serial interrupts are edge-triggered and active high.
    let com1 = aml_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(com1_port, com1_port, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    ));
    let rtc = rtc_device();
    let mut sb_children = com1;
    sb_children.extend(rtc);
    sb_children.extend(power_button());
    sb_children.extend(extra.iter().flatten());
    let sb = aml::Scope::raw("\\_SB_".into(), sb_children);
    // \_S5_: SLP_TYPa (and SLP_TYPb, unused on hardware-reduced platforms) for soft-off.
    let s5 = aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&SLEEP_TYPE_S5, &SLEEP_TYPE_S5]),
    );
    let mut body = sb;
    body.extend(aml_bytes(&s5));
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// The FADT for a hardware-reduced platform whose DSDT is at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_reg =
        |port: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port);
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // Power and sleep buttons, if any, are control-method devices (in the DSDT).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.sleep_control_reg = sleep_reg(ACPI_SLEEP_PORT);
    builder.sleep_status_reg = sleep_reg(ACPI_SLEEP_PORT + 1);
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMMRSVMM").into();
    aml_bytes(&builder.finalize())
}

/// The MADT for the vCPUs of `topology` and the IOAPIC.
fn madt(topology: &Topology) -> Vec<u8> {
    let apic = u32::try_from(APIC_START).unwrap_or(0xfee0_0000);
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(apic),
    );
    let mut last_id = 0;
    for cpu in 0..topology.cpus() {
        last_id = topology.apic_id(cpu);
        madt.add_structure(ProcessorLocalApic::new(
            cpu,
            last_id,
            EnabledStatus::Enabled,
        ));
    }
    // The IOAPIC's id follows the CPUs' APIC ids (the largest is at most 254); its pins are
    // GSIs 0 to 23.
    let ioapic = u32::try_from(IOAPIC_START).unwrap_or(0xfec0_0000);
    madt.add_structure(IoApic::new(last_id.saturating_add(1), ioapic, 0));
    let mut bytes = aml_bytes(&madt);
    set_madt_flags(&mut bytes, MADT_PCAT_COMPAT);
    bytes
}

/// Sets the MADT's flags field (offset 40) and fixes the checksum (offset 9).
fn set_madt_flags(table: &mut [u8], flags: u32) {
    table[40..44].copy_from_slice(&flags.to_le_bytes());
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// Rounds `addr` up to 8 bytes.
fn align8(addr: u64) -> u64 {
    addr.div_ceil(8) * 8
}

/// Writes the tables for the vCPUs of `topology` (with `extra` devices in the DSDT, and an MCFG
/// when the machine has `pci`) and returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemory,
    topology: &Topology,
    extra: &[DsdtDevice],
    pci: bool,
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    // The XSDT holds the FADT, the MADT and the MCFG if any (the DSDT hangs off the FADT).
    let xsdt_len = 36 + if pci { 3 } else { 2 } * 8;
    let fadt_addr = align8(xsdt_addr + xsdt_len);
    let fadt_addr_end = fadt_addr + acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align8(fadt_addr_end);
    let madt = madt(topology);
    let dsdt_addr = align8(madt_addr + madt.len() as u64);
    let dsdt = dsdt(extra);
    let mcfg_addr = align8(dsdt_addr + dsdt.len() as u64);
    let mcfg = if pci { mcfg() } else { Vec::new() };
    let end = mcfg_addr + mcfg.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            bytes: end - ACPI_START,
        });
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if pci {
        xsdt.add_entry(mcfg_addr);
    }
    let tables: [(&'static str, u64, Vec<u8>); 6] = [
        ("RSDP", rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        ("XSDT", xsdt_addr, aml_bytes(&xsdt)),
        ("FADT", fadt_addr, fadt(dsdt_addr)),
        ("MADT", madt_addr, madt),
        ("DSDT", dsdt_addr, dsdt),
        ("MCFG", mcfg_addr, mcfg),
    ];
    for (table, addr, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write {
                table,
                addr,
                source,
            })?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).expect("in RAM");
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    /// Reads the table at `addr` whole, checking its checksum.
    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 36);
        let t = read(mem, addr, u32_at(&header, 4) as usize);
        assert!(
            checksum_ok(&t),
            "{:?} checksum",
            std::str::from_utf8(&t[..4])
        );
        t
    }

    #[test]
    fn tables_chain_from_the_rsdp() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("maps");
        let topology = Topology::cores(3).expect("valid");
        let rsdp_addr = create_acpi_tables(&mem, &topology, &[], false).expect("fits");
        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt = table(&mem, u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert!(fadt[8] >= 5, "FADT revision 5 or later");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        // Sleep control register: a byte-wide I/O port (GAS at offset 244, address at +4).
        assert_eq!((fadt[244], fadt[245]), (1, 8));
        assert_eq!(u64_at(&fadt, 248), ACPI_SLEEP_PORT);
        assert_eq!(u64_at(&fadt, 260), ACPI_SLEEP_PORT + 1);
        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);
        // Three local APICs (type 0, 8 bytes) then the IOAPIC (type 1, 12 bytes).
        let mut apic_ids = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            if madt[off] == 0 {
                apic_ids.push(madt[off + 3]);
            } else {
                assert_eq!(madt[off], 1);
                assert_eq!(u32_at(&madt, off + 4), 0xfec0_0000);
            }
            off += usize::from(madt[off + 1]);
        }
        assert_eq!(apic_ids, [0, 1, 2]);
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"_S5_") && find(b"COM1") && find(b"RTC_") && find(b"_CRS"));
        assert!(find(b"ACPI0013") && find(b"PWRB") && find(b"_EVT") && find(b"ESEL"));
    }

    #[test]
    fn extra_devices_land_in_the_dsdt() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("maps");
        let dsdt = aml_bytes(&aml::Device::new("VIO0".into(), vec![]));
        let topology = Topology::cores(1).expect("valid");
        create_acpi_tables(&mem, &topology, std::slice::from_ref(&dsdt), false).expect("fits");
        let all = read(&mem, ACPI_START, 0x1000);
        assert!(all.windows(dsdt.len()).any(|w| w == dsdt.as_slice()));
    }

    #[test]
    fn virtio_mmio_device_describes_its_window_and_edge_interrupt() {
        let dev = virtio_mmio_device(0x1a, 0xd000_0400, 12);
        let find = |needle: &[u8]| dev.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"V01A") && find(b"LNRO0005\0"));
        // Memory32Fixed (ACPI 6.5 section 6.4.3.4): tag 0x86, length 9, read-write, base, size.
        let mut mem32 = vec![0x86, 9, 0, 1];
        mem32.extend(0xd000_0400u32.to_le_bytes());
        mem32.extend(0x200u32.to_le_bytes());
        assert!(find(&mem32));
        // Extended interrupt descriptor (6.4.3.6): tag 0x89, length 6, flags consumer | edge
        // (active high, exclusive), one interrupt: 12.
        assert!(find(&[0x89, 6, 0, 0b0000_0011, 1, 12, 0, 0, 0]));
    }

    #[test]
    fn a_machine_with_pci_has_an_mcfg_and_a_host_bridge() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("maps");
        let topology = Topology::cores(1).expect("valid");
        let window64 = 0x1_0000_0000..0x9_0000_0000;
        let bridge = pci_host_bridge(Some(&window64), &[(1, 17), (2, 18)]);
        let rsdp =
            create_acpi_tables(&mem, &topology, std::slice::from_ref(&bridge), true).expect("fits");
        let xsdt = table(&mem, u64_at(&read(&mem, rsdp.0, 36), 24));
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let mcfg = table(&mem, u64_at(&xsdt, 52));
        assert_eq!(&mcfg[..4], b"MCFG");
        // One allocation (PCI Firmware 3.3, table 4-3): base, segment 0, buses 0 to 0.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&mcfg, 44), PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, 0]);
        let find = |needle: &[u8]| bridge.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"PCI0") && find(b"MBRD") && find(b"_BBN") && find(b"_SEG"));
        // PNP0A08 and PNP0C02 as EISA ids.
        assert!(find(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]) && find(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // The BAR window: a DWord memory descriptor (ACPI 6.5 section 6.4.3.5.2, tag 0x87)
        // from its start to its end.
        let mut window = PCI_MMIO_START.to_le_bytes()[..4].to_vec();
        window.extend(&(PCI_MMIO_START + PCI_MMIO_SIZE - 1).to_le_bytes()[..4]);
        assert!(find(&window));
        // The 64-bit window: a QWord memory descriptor (6.4.3.5.1, tag 0x8A, 43 bytes),
        // read-write and not prefetchable, granularity 0, then its first and last address.
        let mut window = vec![0x8a, 43, 0, 0, 0x0c, 0b01];
        window.extend(0u64.to_le_bytes());
        window.extend(0x1_0000_0000u64.to_le_bytes());
        window.extend(0x8_ffff_ffffu64.to_le_bytes());
        assert!(find(&window));
        assert!(!pci_host_bridge(None, &[])
            .windows(2)
            .any(|w| w == [0x8a, 43]));
        // The _PRT: a package of two packages, each a DWord slot address (0x000N_FFFF), pin
        // and source zero, and the GSI as a byte.
        assert!(find(b"_PRT"));
        let entry = |slot: u8, gsi: u8| {
            [
                0x12, 0x0b, 4, 0x0c, 0xff, 0xff, slot, 0, 0x00, 0x00, 0x0a, gsi,
            ]
        };
        assert!(find(&entry(1, 17)) && find(&entry(2, 18)));
        assert!(!pci_host_bridge(None, &[]).windows(4).any(|w| w == b"_PRT"));
        // The ECAM window in the motherboard resources.
        let mut ecam = vec![0x86, 9, 0, 1];
        ecam.extend(&PCI_ECAM_START.to_le_bytes()[..4]);
        ecam.extend(&PCI_ECAM_SIZE.to_le_bytes()[..4]);
        assert!(find(&ecam));
        // Without PCI: no MCFG.
        let rsdp = create_acpi_tables(&mem, &topology, &[], false).expect("fits");
        let xsdt = table(&mem, u64_at(&read(&mem, rsdp.0, 36), 24));
        assert_eq!(xsdt.len(), 36 + 2 * 8);
    }

    #[test]
    fn the_rtc_has_its_ports_and_no_interrupt() {
        let rtc = rtc_device();
        let find = |needle: &[u8]| rtc.windows(needle.len()).any(|w| w == needle);
        // I/O port descriptor (ACPI 6.5 section 6.4.2.5: tag 0x47, 16-bit decode, 0x70 to 0x70,
        // alignment 1, two ports) followed at once by the end tag (6.4.2.9, 0x79): the template
        // holds nothing else, no interrupt.
        assert!(find(&[0x47, 1, 0x70, 0, 0x70, 0, 1, 2, 0x79]));
        assert!(!find(&[0x89, 6]), "no extended interrupt descriptor");
    }

    /// The MADT's (ACPI processor id, APIC id) pairs and its IOAPIC's id.
    fn madt_ids(topology: &Topology) -> (Vec<(u8, u8)>, u8) {
        let madt = madt(topology);
        assert!(checksum_ok(&madt));
        let (mut cpus, mut ioapic) = (Vec::new(), None);
        let mut off = 44;
        while off < madt.len() {
            match madt[off] {
                0 => cpus.push((madt[off + 2], madt[off + 3])),
                1 => ioapic = Some(madt[off + 2]),
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += usize::from(madt[off + 1]);
        }
        (cpus, ioapic.expect("an IOAPIC entry"))
    }

    #[test]
    fn madt_apic_ids_follow_the_topology() {
        // 2 sockets of 3 cores of 2 threads: ids 0-5, then 8-13 (core field 2 bits wide).
        let (cpus, ioapic) = madt_ids(&Topology::new(2, 3, 2).expect("valid"));
        let ids: Vec<u8> = cpus.iter().map(|&(_, id)| id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert!(cpus
            .iter()
            .enumerate()
            .all(|(i, &(uid, _))| usize::from(uid) == i));
        assert_eq!(ioapic, 14);
        // The most one MADT can name: 255 vCPUs, ids 0 to 254, the IOAPIC at 255.
        let (cpus, ioapic) = madt_ids(&Topology::cores(255).expect("valid"));
        assert_eq!(
            (cpus.len(), cpus.last(), ioapic),
            (255, Some(&(254, 254)), 255)
        );
    }
}
