//! The configuration space of one PCI function: a type 0 header, its capability list, and BARs
//! the VMM sizes and places (PCI Local Bus 3.0, 6.1 and 6.2.5; PCIe 6.0, 7.5.1).
//!
//! The space is 4 KiB (PCIe extended configuration space; past the first 256 bytes it reads as
//! zero and ignores writes). Every byte has a mask of the bits the guest may change; everything
//! else reads as the device set it, whatever the guest writes. A BAR's address bits below its size
//! and its flag bits are read-only, so the guest's sizing probe (write all ones, read back, restore)
//! works as on hardware: the read gives the size mask.
//!
//! A BAR is decoded (answers accesses) only while the command register's memory bit is on and
//! its address is one it can be at, as QEMU's `pci_bar_address` has it: not 0, and not ending at
//! the last address its width names (all ones: what a sizing probe leaves) or past it. Each write
//! says which BARs it moved in or out of decoding, so the function moves what hangs off their
//! addresses (the vmm's ioeventfds) with them.

use super::PciError;

/// Bytes of configuration space of one function (PCIe extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Where the capability list may start (the end of the type 0 header).
const FIRST_CAPABILITY: usize = 0x40;
/// The end of the legacy space, where capabilities must fit.
const LEGACY_END: usize = 0x100;

/// Header registers (PCI Local Bus 3.0, 6.1), by offset.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Status (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID (8 bits), then class code: programming interface, subclass, class.
    pub const REVISION_ID: usize = 0x08;
    /// Header type (8 bits).
    pub const HEADER_TYPE: usize = 0x0e;
    /// The first of six BARs (32 bits each).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line (8 bits, scratch for the guest).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (8 bits, read-only): 0 none, 1 to 4 INTA# to INTD#.
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    /// The function answers memory accesses to its BARs.
    pub const MEMORY: u16 = 1 << 1;
    /// The function may master the bus (DMA, MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx is disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register: the function has a capability list.
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// BAR flags: a 64-bit memory BAR (type 10b in bits 2:1).
const BAR_MEM64: u32 = 0b100;

/// What a function says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class: [u8; 3],
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// One memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes: a power of two, at least 16.
    pub size: u64,
    /// A 64-bit BAR (it takes two BAR registers); a 32-bit one otherwise.
    pub mem64: bool,
}

/// What a BAR register holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing: reads as zero.
    Free,
    /// A BAR (its low half, for a 64-bit one).
    Bar(Bar),
    /// The high half of the 64-bit BAR before.
    High,
}

/// A BAR that a configuration write moved: where it was decoded before and where it is now
/// (None: nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// The BAR register (the low half's, for a 64-bit BAR).
    pub index: usize,
    /// Its address before the write, if decoded.
    pub from: Option<u64>,
    /// Its address after the write, if decoded.
    pub to: Option<u64>,
}

/// The configuration space of one function.
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Slot; 6],
    /// Where each BAR is decoded now, as [`Self::decoded`] said after the last write.
    mapped: [Option<u64>; 6],
    /// Offset of the last capability, whose next pointer a new one fills in.
    last_capability: Option<usize>,
    /// Where the next capability goes.
    free: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("ids", &&self.bytes[..0x10])
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A type 0 header with `ids`, no BAR and no capability. The guest may write the command
    /// register's memory, bus-master and INTx-disable bits and the interrupt line.
    pub fn new(ids: PciIds) -> Self {
        let mut space = ConfigSpace {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [Slot::Free; 6],
            mapped: [None; 6],
            last_capability: None,
            free: FIRST_CAPABILITY,
        };
        space.set_u16(reg::VENDOR_ID, ids.vendor);
        space.set_u16(reg::DEVICE_ID, ids.device);
        space.bytes[reg::REVISION_ID] = ids.revision;
        space.bytes[reg::REVISION_ID + 1] = ids.class[2];
        space.bytes[reg::REVISION_ID + 2] = ids.class[1];
        space.bytes[reg::REVISION_ID + 3] = ids.class[0];
        space.bytes[reg::HEADER_TYPE] = 0;
        space.set_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        space.set_u16(reg::SUBSYSTEM_ID, ids.subsystem);
        let cmd = command::MEMORY | command::BUS_MASTER | command::INTX_DISABLE;
        space.set_writable(reg::COMMAND, &cmd.to_le_bytes());
        space.set_writable(reg::INTERRUPT_LINE, &[0xff]);
        space
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// Lets the guest change the bits of `mask` from `offset` on.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Gives the function memory BAR `index` of `bar`'s size, at `address` (the VMM places it; the
    /// guest may move it). A 64-bit BAR takes registers `index` and `index + 1`.
    pub fn add_bar(&mut self, index: usize, bar: Bar, address: u64) -> Result<(), PciError> {
        let last = if bar.mem64 { index + 1 } else { index };
        let fits_32 = bar.mem64 || address.checked_add(bar.size).is_some_and(|e| e <= 1 << 32);
        if last >= self.bars.len()
            || (index..=last).any(|i| self.bars[i] != Slot::Free)
            || !bar.size.is_power_of_two()
            || bar.size < 16
            || !address.is_multiple_of(bar.size)
            || !fits_32
        {
            return Err(PciError::Bar {
                index,
                size: bar.size,
                address,
            });
        }
        self.bars[index] = Slot::Bar(bar);
        let offset = reg::BAR0 + 4 * index;
        let low_mask = !(bar.size - 1) & !0xf;
        let flags = if bar.mem64 { BAR_MEM64 } else { 0 };
        let low = u32::try_from(address & 0xffff_fff0).unwrap_or(0) | flags;
        self.bytes[offset..offset + 4].copy_from_slice(&low.to_le_bytes());
        let low_mask = u32::try_from(low_mask & 0xffff_ffff).unwrap_or(0);
        self.set_writable(offset, &low_mask.to_le_bytes());
        if bar.mem64 {
            self.bars[index + 1] = Slot::High;
            let high = u32::try_from(address >> 32).unwrap_or(0);
            let high_mask = u32::try_from(!(bar.size - 1) >> 32).unwrap_or(0);
            self.bytes[offset + 4..offset + 8].copy_from_slice(&high.to_le_bytes());
            self.set_writable(offset + 4, &high_mask.to_le_bytes());
        }
        Ok(())
    }

    /// Where BAR `index` is now (what the guest last wrote, or where the VMM placed it) and its
    /// size; None for a register that is no BAR's first.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let Slot::Bar(bar) = *self.bars.get(index)? else {
            return None;
        };
        let offset = reg::BAR0 + 4 * index;
        let low = self.u32_at(offset);
        let mut address = u64::from(low & !0xf);
        if bar.mem64 {
            address |= u64::from(self.u32_at(offset + 4)) << 32;
        }
        Some((address, bar.size))
    }

    /// Gives the function interrupt pin `pin` (1 to 4: INTA# to INTD#; 0: none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[reg::INTERRUPT_PIN] = pin;
    }

    /// Whether the command register's INTx-disable bit is set.
    pub fn intx_disabled(&self) -> bool {
        self.u16_at(reg::COMMAND) & command::INTX_DISABLE != 0
    }

    /// Whether the function answers memory accesses (command register).
    pub fn memory_enabled(&self) -> bool {
        self.u16_at(reg::COMMAND) & command::MEMORY != 0
    }

    /// Where BAR `index` is decoded: its address while memory decoding is on and the address
    /// is one it can be at (not 0, and its last byte below the last address of its width).
    fn decoded(&self, index: usize) -> Option<u64> {
        let Slot::Bar(bar) = *self.bars.get(index)? else {
            return None;
        };
        let (address, size) = self.bar(index)?;
        let limit = if bar.mem64 {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        let last = address.checked_add(size - 1)?;
        (self.memory_enabled() && address != 0 && last < limit).then_some(address)
    }

    /// The BAR decoded where `[addr, addr + len)` is: its index and the offset of `addr` in it.
    pub fn bar_at(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        (0..self.bars.len()).find_map(|i| {
            let base = self.mapped[i]?;
            let Slot::Bar(bar) = self.bars[i] else {
                return None;
            };
            let offset = addr.checked_sub(base)?;
            (offset.checked_add(len)? <= bar.size).then_some((i, offset))
        })
    }

    /// Appends a capability with id `id` whose bytes after the id and next pointer are `body`;
    /// returns its offset. Capabilities live in the first 256 bytes, 4-byte aligned.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let offset = self.free;
        let end = offset + 2 + body.len();
        if end > LEGACY_END {
            return Err(PciError::CapabilitySpace { id });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        let pointer = u8::try_from(offset).map_err(|_| PciError::CapabilitySpace { id })?;
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = pointer,
            None => self.bytes[reg::CAPABILITIES] = pointer,
        }
        let status = self.u16_at(reg::STATUS) | STATUS_CAPABILITIES;
        self.set_u16(reg::STATUS, status);
        self.last_capability = Some(offset);
        self.free = end.div_ceil(4) * 4;
        Ok(offset)
    }

    /// A guest read of `data.len()` bytes at `offset`; bytes past the space read as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A guest write of `data` at `offset`: only the writable bits change. Returns the BARs
    /// it moved (a new address, memory decoding switched on or off), as QEMU's
    /// `pci_update_mappings` finds them.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        for (i, value) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                break;
            };
            let mask = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !mask) | (value & mask);
        }
        (0..self.bars.len())
            .filter_map(|index| {
                let to = self.decoded(index);
                let from = std::mem::replace(&mut self.mapped[index], to);
                (from != to).then_some(BarMove { index, from, to })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const IDS: PciIds = PciIds {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: [0x01, 0x00, 0x00],
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
    };

    fn get32(c: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set32(c: &mut ConfigSpace, offset: usize, value: u32) {
        c.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn the_header_says_what_the_function_is_and_ignores_writes_to_it() {
        let mut c = ConfigSpace::new(IDS);
        assert_eq!(get32(&c, 0), 0x1042_1af4);
        assert_eq!(get32(&c, 8), 0x0100_0001);
        assert_eq!(get32(&c, 0x2c), 0x1100_1af4);
        set32(&mut c, 0, 0xdead_beef);
        set32(&mut c, 8, 0);
        assert_eq!((get32(&c, 0), get32(&c, 8)), (0x1042_1af4, 0x0100_0001));
        // Command: only memory, bus master and INTx disable stick.
        c.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(get32(&c, 4) & 0xffff, 0x0406);
        assert!(c.memory_enabled());
        // Past the space: ones, and no panic.
        let mut b = [0u8; 4];
        c.read(CONFIG_SPACE_SIZE - 2, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
        c.write(CONFIG_SPACE_SIZE - 1, &[1, 2, 3]);
    }

    #[test]
    fn a_sizing_probe_reads_the_size_and_the_restore_puts_the_bar_back() {
        let mut c = ConfigSpace::new(IDS);
        c.add_bar(
            0,
            Bar {
                size: 0x8000,
                mem64: false,
            },
            0xc000_8000,
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                size: 0x4000,
                mem64: true,
            },
            0x1_0000_4000,
        )
        .unwrap();
        assert_eq!(c.bar(0), Some((0xc000_8000, 0x8000)));
        assert_eq!(c.bar(2), Some((0x1_0000_4000, 0x4000)));
        assert_eq!(c.bar(1), None);
        assert_eq!(c.bar(3), None, "the high half of BAR 2");
        // The guest's probe, as Linux's __pci_read_base does it.
        set32(&mut c, 0x10, !0);
        assert_eq!(get32(&c, 0x10), 0xffff_8000);
        set32(&mut c, 0x10, 0xc000_8000);
        set32(&mut c, 0x18, !0);
        set32(&mut c, 0x1c, !0);
        assert_eq!(
            get32(&c, 0x18),
            0xffff_c004,
            "size mask and the 64-bit type"
        );
        assert_eq!(get32(&c, 0x1c), 0xffff_ffff);
        set32(&mut c, 0x18, 0x4000);
        set32(&mut c, 0x1c, 1);
        assert_eq!(c.bar(0), Some((0xc000_8000, 0x8000)));
        assert_eq!(c.bar(2), Some((0x1_0000_4000, 0x4000)));
        // No BAR: reads zero whatever is written.
        set32(&mut c, 0x24, !0);
        assert_eq!(get32(&c, 0x24), 0);
    }

    #[test]
    fn bars_are_found_only_while_memory_decoding_is_on() {
        let mut c = ConfigSpace::new(IDS);
        c.add_bar(
            0,
            Bar {
                size: 0x1000,
                mem64: false,
            },
            0xc000_0000,
        )
        .unwrap();
        assert_eq!(c.bar_at(0xc000_0010, 4), None);
        c.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(c.bar_at(0xc000_0010, 4), Some((0, 0x10)));
        assert_eq!(c.bar_at(0xc000_0ffe, 4), None, "crosses the end");
        // The guest moved it.
        set32(&mut c, 0x10, 0xc010_0000);
        assert_eq!(c.bar_at(0xc000_0010, 4), None);
        assert_eq!(c.bar_at(0xc010_0010, 4), Some((0, 0x10)));
    }

    /// What each write does to where a 64-bit BAR and a 32-bit one are decoded, as QEMU's
    /// `pci_update_mappings` sees it: only the moves are reported.
    #[test]
    fn writes_report_the_bars_they_move() {
        let mut c = ConfigSpace::new(IDS);
        let wide = Bar {
            size: 0x8000,
            mem64: true,
        };
        let narrow = Bar {
            size: 0x1000,
            mem64: false,
        };
        c.add_bar(0, wide, 0xc000_8000).unwrap();
        c.add_bar(2, narrow, 0xc001_0000).unwrap();
        let moved = |index, from, to| BarMove { index, from, to };
        let cmd = |c: &mut ConfigSpace, v: u16| c.write(reg::COMMAND, &v.to_le_bytes());
        // Decoding on: both appear; a write that changes nothing moves nothing.
        assert_eq!(
            cmd(&mut c, command::MEMORY),
            [
                moved(0, None, Some(0xc000_8000)),
                moved(2, None, Some(0xc001_0000))
            ]
        );
        assert_eq!(cmd(&mut c, command::MEMORY | command::BUS_MASTER), []);
        assert_eq!(c.bar_at(0xc000_8010, 4), Some((0, 0x10)));
        // A probe with decoding on: the low half all ones leaves the BAR at 0xffff_8000 under
        // the old high half (decoded, as QEMU has it), then all ones in both (not decoded).
        assert_eq!(
            c.write(0x10, &[0xff; 4]),
            [moved(0, Some(0xc000_8000), Some(0xffff_8000))]
        );
        assert_eq!(
            c.write(0x14, &[0xff; 4]),
            [moved(0, Some(0xffff_8000), None)]
        );
        assert_eq!((get32(&c, 0x10), get32(&c, 0x14)), (0xffff_8004, !0));
        // The new place, half by half (the first half puts it just below the top of the 64-bit
        // space), above 4 GiB, then back below.
        assert_eq!(
            c.write(0x10, &0xd000_0000u32.to_le_bytes()),
            [moved(0, None, Some(0xffff_ffff_d000_0000))]
        );
        assert_eq!(
            c.write(0x14, &2u32.to_le_bytes()),
            [moved(0, Some(0xffff_ffff_d000_0000), Some(0x2_d000_0000))]
        );
        assert_eq!(c.bar_at(0x2_d000_7ffc, 4), Some((0, 0x7ffc)));
        assert_eq!(
            c.write(0x14, &[0; 4]),
            [moved(0, Some(0x2_d000_0000), Some(0xd000_0000))]
        );
        // A 32-bit BAR probed (ends at 4 GiB) or at 0 is not decoded.
        assert_eq!(
            c.write(0x18, &[0xff; 4]),
            [moved(2, Some(0xc001_0000), None)]
        );
        assert_eq!(c.write(0x18, &[0; 4]), []);
        assert_eq!(c.bar_at(0, 4), None);
        assert_eq!(
            c.write(0x18, &0xc001_0000u32.to_le_bytes()),
            [moved(2, None, Some(0xc001_0000))]
        );
        // Decoding off takes both away; one write of the command and BAR 0 together.
        assert_eq!(
            cmd(&mut c, 0),
            [
                moved(0, Some(0xd000_0000), None),
                moved(2, Some(0xc001_0000), None)
            ]
        );
        assert_eq!(c.bar_at(0xd000_0000, 4), None);
        let mut both = [0u8; 16];
        both[0..2].copy_from_slice(&command::MEMORY.to_le_bytes());
        both[12..16].copy_from_slice(&0xc002_0000u32.to_le_bytes());
        assert_eq!(
            c.write(reg::COMMAND, &both),
            [
                moved(0, None, Some(0xc002_0000)),
                moved(2, None, Some(0xc001_0000))
            ]
        );
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = ConfigSpace::new(IDS);
        let bar = |size, mem64| Bar { size, mem64 };
        // (register, size, 64-bit, address, why)
        let bad = [
            (0, 0x3000, false, 0, "not a power of two"),
            (0, 8, false, 0, "too small"),
            (0, 0x1000, false, 0x800, "misaligned"),
            (0, 0x1000, false, 1 << 32, "above 4 GiB"),
            (5, 0x1000, true, 0, "no room for the high half"),
            (6, 0x1000, false, 0, "no such register"),
        ];
        for (index, size, mem64, address, why) in bad {
            assert!(
                matches!(
                    c.add_bar(index, bar(size, mem64), address),
                    Err(PciError::Bar { index: i, size: s, address: a })
                        if (i, s, a) == (index, size, address)
                ),
                "{why}"
            );
        }
        c.add_bar(0, bar(0x1000, true), 0).unwrap();
        assert!(
            matches!(
                c.add_bar(1, bar(0x1000, false), 0x1000),
                Err(PciError::Bar { index: 1, .. })
            ),
            "taken by the high half"
        );
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut c = ConfigSpace::new(IDS);
        assert_eq!(get32(&c, 4) >> 16 & 0x10, 0);
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .unwrap();
        let b = c.add_capability(0x09, &[16, 0, 0]).unwrap();
        assert_eq!((a, b), (0x40, 0x4c));
        assert_ne!(get32(&c, 4) >> 16 & 0x10, 0, "status: capability list");
        let mut walk = Vec::new();
        let mut p = usize::from(c.bytes[reg::CAPABILITIES]);
        while p != 0 {
            walk.push((p, c.bytes[p]));
            p = usize::from(c.bytes[p + 1]);
        }
        assert_eq!(walk, [(0x40, 0x11), (0x4c, 0x09)]);
        // Read-only unless made writable.
        c.write(0x42, &[0xff]);
        assert_eq!(c.bytes[0x42], 1);
        c.set_writable(0x42, &[0x0f]);
        c.write(0x42, &[0xff]);
        assert_eq!(c.bytes[0x42], 0x0f);
        // The legacy space fills up.
        let big = [0u8; 0x40];
        assert!(c.add_capability(1, &big).is_ok());
        assert!(c.add_capability(1, &big).is_ok());
        assert!(matches!(
            c.add_capability(1, &big),
            Err(PciError::CapabilitySpace { id: 1 })
        ));
    }
}
