//! The root bus: a host bridge at 00.0 and up to 31 functions (device numbers 1 to 31, function
//! 0 each), reached through ECAM and through the window their BARs are placed in.
//!
//! ECAM (PCIe 6.0, 7.2.2): the configuration space of bus B, device D, function F is the 4 KiB at
//! `(B << 20) | (D << 15) | (F << 12)` in the window; the window the vmm maps covers bus 0 only
//! ([`ECAM_BUS_SIZE`]). A function that does not exist reads as all ones (vendor 0xffff, what
//! the guest's scan looks for) and ignores writes.
//!
//! The BAR window is one range of the shared MMIO bus; an access is for the function that decodes
//! it now (memory decoding on, its BAR holding the address), so a BAR the guest moves within the
//! window answers at its new place only. A function moves what it has registered at its BARs'
//! addresses itself (the virtio-pci transport, its ioeventfds), from its configuration writes.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::config::{ConfigSpace, PciIds, CONFIG_SPACE_SIZE};
use super::{PciDevice, PciError};
use crate::bus::SharedBusDevice;

/// Bytes of ECAM for one bus: 32 devices of 8 functions of 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 32 * 8 * 4096;
/// Device numbers on a bus.
pub const SLOTS: usize = 32;

/// The host bridge's identity: QEMU's generic PCIe host bridge (Red Hat, 0x0008), class host
/// bridge.
const HOST_BRIDGE: PciIds = PciIds {
    vendor: 0x1b36,
    device: 0x0008,
    revision: 0,
    class: [0x06, 0x00, 0x00],
    subsystem_vendor: 0x1b36,
    subsystem: 0x0008,
};

/// The host bridge: a configuration space and nothing else.
struct HostBridge(Mutex<ConfigSpace>);

impl PciDevice for HostBridge {
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(offset, data);
    }
    fn write_config(&self, offset: usize, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(offset, data);
    }
    fn bar_at(&self, _: u64, _: u64) -> Option<(usize, u64)> {
        None
    }
    fn read_bar(&self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&self, _: usize, _: u64, _: &[u8]) {}
}

/// Bus 0: its functions by device number. Built before the vCPUs start, then read-only.
pub struct PciRoot {
    slots: Vec<Option<Arc<dyn PciDevice>>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..SLOTS).filter(|&i| self.slots[i].is_some()).collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A bus with the host bridge at 00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Arc<dyn PciDevice>>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(HostBridge(Mutex::new(ConfigSpace::new(
            HOST_BRIDGE,
        )))));
        PciRoot { slots }
    }

    /// The device number the next [`add`](Self::add) gives.
    pub fn next_slot(&self) -> Option<u8> {
        let free = self.slots.iter().position(Option::is_none)?;
        u8::try_from(free).ok()
    }

    /// Puts `device` in the first free slot; returns its device number.
    pub fn add(&mut self, device: Arc<dyn PciDevice>) -> Result<u8, PciError> {
        let slot = self.next_slot().ok_or(PciError::BusFull)?;
        self.slots[usize::from(slot)] = Some(device);
        Ok(slot)
    }

    /// The function an ECAM offset is for and the offset in its configuration space.
    fn ecam_target(&self, offset: u64) -> Option<(&Arc<dyn PciDevice>, usize)> {
        if offset >= ECAM_BUS_SIZE {
            return None;
        }
        let function = (offset >> 12) & 0x7;
        let device = usize::try_from(offset >> 15).ok()?;
        let register = usize::try_from(offset & 0xfff).ok()?;
        if function != 0 {
            return None;
        }
        Some((self.slots.get(device)?.as_ref()?, register))
    }

    /// The function whose BAR holds `[addr, addr + len)`.
    fn bar_target(&self, addr: u64, len: usize) -> Option<(&Arc<dyn PciDevice>, usize, u64)> {
        let len = u64::try_from(len).ok()?;
        self.slots.iter().flatten().find_map(|d| {
            let (bar, offset) = d.bar_at(addr, len)?;
            Some((d, bar, offset))
        })
    }
}

impl PciRoot {
    /// A configuration read at ECAM offset `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        match self.ecam_target(offset) {
            Some((device, register)) if register + data.len() <= CONFIG_SPACE_SIZE => {
                device.read_config(register, data)
            }
            _ => data.fill(0xff),
        }
    }

    /// A configuration write at ECAM offset `offset`.
    fn write_config(&self, offset: u64, data: &[u8]) {
        if let Some((device, register)) = self.ecam_target(offset) {
            if register + data.len() <= CONFIG_SPACE_SIZE {
                device.write_config(register, data);
            }
        }
    }
}

/// The ECAM window of a [`PciRoot`], for the shared MMIO bus.
#[derive(Debug)]
pub struct PciEcam(pub Arc<PciRoot>);

impl SharedBusDevice for PciEcam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.read_config(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write_config(offset, data);
    }
}

/// Configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): the address register at port
/// 0xCF8 and the data window at 0xCFC to 0xCFF, for the PIO bus (8 ports). It reaches the bus
/// through a weak reference, so it keeps no device alive once the VMM drops the bus.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Weak<PciRoot>,
    address: u32,
}

/// The address register's enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    /// The ports of `root`.
    pub fn new(root: &Arc<PciRoot>) -> Self {
        PciConfigIo {
            root: Arc::downgrade(root),
            address: 0,
        }
    }

    /// The ECAM offset the address register and data port `offset` (0 to 3) select, when
    /// enabled.
    fn target(&self, offset: u64) -> Option<u64> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        // Bus (23:16), device (15:11), function (10:8), dword register (7:2).
        let bus = u64::from((self.address >> 16) & 0xff);
        let devfn = u64::from((self.address >> 8) & 0xff);
        let register = u64::from(self.address & 0xfc);
        Some((bus << 20) | (devfn << 12) | register | offset)
    }
}

impl crate::bus::BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..8 => match (self.target(offset - 4), self.root.upgrade()) {
                (Some(ecam), Some(root)) if offset - 4 + data.len() as u64 <= 4 => {
                    root.read_config(ecam, data)
                }
                _ => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(b);
                }
            }
            4..8 => {
                if let (Some(ecam), Some(root)) = (self.target(offset - 4), self.root.upgrade()) {
                    if offset - 4 + data.len() as u64 <= 4 {
                        root.write_config(ecam, data);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The window the BARs of a [`PciRoot`]'s functions are placed in, starting at guest address
/// `base`, for the shared MMIO bus.
#[derive(Debug)]
pub struct PciBars {
    /// The bus.
    pub root: Arc<PciRoot>,
    /// The window's first guest address.
    pub base: u64,
}

impl SharedBusDevice for PciBars {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let addr = self.base.saturating_add(offset);
        match self.root.bar_target(addr, data.len()) {
            Some((device, bar, offset)) => device.read_bar(bar, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let addr = self.base.saturating_add(offset);
        if let Some((device, bar, offset)) = self.root.bar_target(addr, data.len()) {
            device.write_bar(bar, offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pci::config::{command, Bar};

    /// A function with one 4 KiB BAR whose bytes read as their offset and remember the last
    /// write.
    struct Plain {
        config: Mutex<ConfigSpace>,
        last_write: Mutex<Option<(usize, u64, Vec<u8>)>>,
    }

    impl PciDevice for Plain {
        fn read_config(&self, offset: usize, data: &mut [u8]) {
            self.config.lock().unwrap().read(offset, data);
        }
        fn write_config(&self, offset: usize, data: &[u8]) {
            self.config.lock().unwrap().write(offset, data);
        }
        fn bar_at(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
            self.config.lock().unwrap().bar_at(addr, len)
        }
        fn read_bar(&self, _: usize, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = u8::try_from((offset + u64::try_from(i).unwrap()) & 0xff).unwrap();
            }
        }
        fn write_bar(&self, bar: usize, offset: u64, data: &[u8]) {
            *self.last_write.lock().unwrap() = Some((bar, offset, data.to_vec()));
        }
    }

    fn plain(address: u64) -> Arc<Plain> {
        let mut config = ConfigSpace::new(PciIds {
            device: 0x1234,
            ..HOST_BRIDGE
        });
        config
            .add_bar(
                0,
                Bar {
                    size: 0x1000,
                    mem64: false,
                },
                address,
            )
            .unwrap();
        Arc::new(Plain {
            config: Mutex::new(config),
            last_write: Mutex::new(None),
        })
    }

    fn read32(bus: &dyn SharedBusDevice, offset: u64) -> u32 {
        let mut b = [0; 4];
        bus.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ecam_finds_functions_by_device_number() {
        let mut root = PciRoot::new();
        assert_eq!(root.add(plain(0xc000_0000)).unwrap(), 1);
        assert_eq!(root.add(plain(0xc000_1000)).unwrap(), 2);
        let ecam = PciEcam(Arc::new(root));
        assert_eq!(read32(&ecam, 0), 0x0008_1b36, "the host bridge at 00.0");
        assert_eq!(read32(&ecam, 1 << 15), 0x1234_1b36);
        assert_eq!(read32(&ecam, (2 << 15) + 0x10), 0xc000_1000);
        // Empty slots, other functions, other buses: all ones.
        assert_eq!(read32(&ecam, 3 << 15), 0xffff_ffff);
        assert_eq!(read32(&ecam, (1 << 15) | (1 << 12)), 0xffff_ffff);
        assert_eq!(read32(&ecam, ECAM_BUS_SIZE), 0xffff_ffff);
        ecam.write(ECAM_BUS_SIZE + 4, &[1, 2, 3, 4]);
        // An access crossing the end of a function's space.
        let mut b = [0u8; 4];
        ecam.read((1 << 15) + 0xffe, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn bar_accesses_reach_the_function_that_decodes_them() {
        let mut root = PciRoot::new();
        let a = plain(0xc000_0000);
        let b = plain(0xc000_1000);
        root.add(a.clone()).unwrap();
        root.add(b.clone()).unwrap();
        let root = Arc::new(root);
        let ecam = PciEcam(Arc::clone(&root));
        let bars = PciBars {
            root,
            base: 0xc000_0000,
        };
        // Memory decoding off: nobody answers.
        assert_eq!(read32(&bars, 0x1010), 0xffff_ffff);
        let enable = command::MEMORY.to_le_bytes();
        ecam.write((1 << 15) + 4, &enable);
        ecam.write((2 << 15) + 4, &enable);
        assert_eq!(read32(&bars, 0x1010), 0x1312_1110);
        bars.write(0x1020, &[7]);
        assert_eq!(*b.last_write.lock().unwrap(), Some((0, 0x20, vec![7])));
        assert!(a.last_write.lock().unwrap().is_none());
        // The guest moves b's BAR: it answers at its new place only.
        ecam.write((2 << 15) + 0x10, &0xc000_5000u32.to_le_bytes());
        assert_eq!(read32(&bars, 0x1010), 0xffff_ffff);
        assert_eq!(read32(&bars, 0x5010), 0x1312_1110);
    }

    #[test]
    fn configuration_mechanism_1_reaches_the_same_spaces() {
        use crate::bus::BusDevice;
        let mut root = PciRoot::new();
        root.add(plain(0xc000_1000)).unwrap();
        let root = Arc::new(root);
        let mut io = PciConfigIo::new(&root);
        let read = |io: &mut PciConfigIo, port: u64, len: usize| {
            let mut b = [0u8; 4];
            io.read(port, &mut b[..len]);
            u32::from_le_bytes(b)
        };
        // Disabled: all ones. The address register reads back.
        io.write(0, &0x0000_0800u32.to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), 0xffff_ffff);
        assert_eq!(read(&mut io, 0, 4), 0x0000_0800);
        // 00:01.0, register 0x10 (BAR 0), then a 2-byte read of the device id at 0xCFE.
        io.write(0, &0x8000_0810u32.to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), 0xc000_1000);
        io.write(0, &0x8000_0800u32.to_le_bytes());
        assert_eq!(read(&mut io, 6, 2), 0x1234);
        // Writes land (the command register) and odd accesses are refused.
        io.write(0, &0x8000_0804u32.to_le_bytes());
        io.write(4, &[2, 0]);
        assert_eq!(read(&mut io, 4, 2), 2);
        assert_eq!(read(&mut io, 7, 2), 0xffff, "crosses the data window");
        // No such function, or the bus is gone: all ones.
        io.write(0, &0x8000_1000u32.to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), 0xffff_ffff);
        io.write(0, &0x8000_0800u32.to_le_bytes());
        drop(root);
        assert_eq!(read(&mut io, 4, 4), 0xffff_ffff);
    }

    #[test]
    fn the_bus_has_31_free_slots() {
        let mut root = PciRoot::new();
        for slot in 1..32 {
            assert_eq!(root.add(plain(0xc000_0000)).unwrap(), slot);
        }
        assert!(matches!(
            root.add(plain(0xc000_0000)),
            Err(PciError::BusFull)
        ));
    }
}
