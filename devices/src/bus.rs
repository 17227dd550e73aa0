//! The PIO and MMIO buses: the only code that maps guest addresses to devices.
//!
//! A [`Bus`] holds non-overlapping address ranges, each owned by one [`BusDevice`] that sees
//! accesses as an offset from the start of its range. A vCPU exit (`in`/`out` on the PIO bus, a
//! load or store that misses guest RAM on the MMIO bus) becomes one [`Bus::read`] or
//! [`Bus::write`]. An access that no device owns reads as all ones and its writes are dropped, as
//! on an unterminated ISA or PCI bus.
//!
//! # Locking
//!
//! A [`Bus`] lives inside the VMM's global state and is only ever reached with the **global lock**
//! held (the vCPU exit path and the main-loop handlers take it; nothing else does), so a device
//! needs no lock of its own for state that only the bus and the main loop touch. The lock order is:
//! the global lock, then (for devices that run in an iothread) that device's contexts; never the
//! other way round, and several contexts only in their creation order (`Context::acquire_all`). A device must not block while it holds the
//! bus: it only updates its registers and signals eventfds.
//!
//! A [`SharedBus`] holds devices that lock their own state ([`SharedBusDevice`], `&self`): the
//! vCPUs reach it without the global lock, so a guest touching such a device (a virtio-mmio
//! transport acknowledging an interrupt) never waits for a main-loop handler. Its devices must
//! never take the global lock.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A device that owns one range of a bus.
pub trait BusDevice: Any + Send {
    /// Fills `data` with the bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes the bytes in `data` written at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device that owns one range of a [`SharedBus`]: it guards its own state, so several vCPUs may
/// call it at once, none of them holding the global lock.
pub trait SharedBusDevice: Send + Sync {
    /// Fills `data` with the bytes at `offset` from the start of the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Takes the bytes in `data` written at `offset` from the start of the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero, or one that wraps past the end of the address space.
    #[error("Bus range of {len:#x} bytes at {base:#x} for {name} is empty or wraps around")]
    BadRange {
        /// Device name.
        name: &'static str,
        /// First address of the range.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The new range overlaps a range already on the bus.
    #[error("Bus range {base:#x}+{len:#x} for {name} overlaps {other} at {other_base:#x}")]
    Overlap {
        /// Device name.
        name: &'static str,
        /// First address of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// The device already there.
        other: &'static str,
        /// First address of that device's range.
        other_base: u64,
    },
}

/// One range on a bus and the device that owns it.
struct Entry<D> {
    len: u64,
    name: &'static str,
    device: D,
}

/// Non-overlapping ranges by first address, each with its device: what both buses are made of.
struct Ranges<D> {
    entries: BTreeMap<u64, Entry<D>>,
}

impl<D> Ranges<D> {
    fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }

    /// Gives `device` the range `[base, base + len)`, refusing an empty range or one that overlaps
    /// a range already there.
    fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: D,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { name, base, len })?;
        // The only ranges that can overlap are the last one starting before `end` and, through
        // it, nothing else (ranges never overlap each other).
        if let Some((&other_base, other)) = self.entries.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    name,
                    base,
                    len,
                    other: other.name,
                    other_base,
                });
            }
        }
        self.entries.insert(base, Entry { len, name, device });
        Ok(())
    }

    /// The first address of the range holding every byte of `[addr, addr + size)`.
    fn locate(&self, addr: u64, size: usize) -> Option<u64> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let last = addr.checked_add(u64::try_from(size).ok()?)?;
        (last <= base + entry.len).then_some(base)
    }
}

impl<D> std::fmt::Debug for Ranges<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (base, e) in &self.entries {
            list.entry(&format_args!("{}@{base:#x}+{:#x}", e.name, e.len));
        }
        list.finish()
    }
}

/// An address space (PIO or MMIO) split into device ranges, reached with the global lock held.
#[derive(Debug)]
pub struct Bus {
    ranges: Ranges<Box<dyn BusDevice>>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            ranges: Ranges::new(),
        }
    }

    /// Gives `device` the range `[base, base + len)`, refusing an empty range or one that overlaps
    /// a range already on the bus.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Box<dyn BusDevice>,
    ) -> Result<(), BusError> {
        self.ranges.insert(name, base, len, device)
    }

    /// The device owning every byte of `[addr, addr + size)`, with its first address.
    fn find(&mut self, addr: u64, size: usize) -> Option<(u64, &mut Box<dyn BusDevice>)> {
        let base = self.ranges.locate(addr, size)?;
        let entry = self.ranges.entries.get_mut(&base)?;
        Some((base, &mut entry.device))
    }

    /// Reads `data.len()` bytes at `addr`. Returns false (and fills `data` with ones) when no
    /// device owns the whole access.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, device)) => {
                device.read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes `data` at `addr`. Returns false (and drops the write) when no device owns the
    /// whole access.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, device)) => {
                device.write(addr - base, data);
                true
            }
            None => false,
        }
    }

    /// The device of concrete type `T` whose range starts at `base`, for the main loop's handlers
    /// (the serial console's input, for example).
    pub fn device_mut<T: BusDevice>(&mut self, base: u64) -> Option<&mut T> {
        let device: &mut dyn Any = self.ranges.entries.get_mut(&base)?.device.as_mut();
        device.downcast_mut::<T>()
    }
}

/// Device ranges that vCPUs reach without the global lock (see the module documentation). Built
/// before the vCPUs start; read-only afterwards.
#[derive(Debug)]
pub struct SharedBus {
    ranges: Ranges<Arc<dyn SharedBusDevice>>,
}

impl Default for SharedBus {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            ranges: Ranges::new(),
        }
    }

    /// Gives `device` the range `[base, base + len)`, refusing an empty range or one that overlaps
    /// a range already on the bus.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<dyn SharedBusDevice>,
    ) -> Result<(), BusError> {
        self.ranges.insert(name, base, len, device)
    }

    /// The device owning every byte of `[addr, addr + size)` and the offset of `addr` in it.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, &dyn SharedBusDevice)> {
        let base = self.ranges.locate(addr, size)?;
        let entry = self.ranges.entries.get(&base)?;
        Some((addr - base, entry.device.as_ref()))
    }

    /// Reads `data.len()` bytes at `addr`; false (and `data` untouched) when no device owns the
    /// whole access, so the caller can try the other bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.find(addr, data.len())
            .map(|(offset, device)| device.read(offset, data))
            .is_some()
    }

    /// Writes `data` at `addr`; false (and nothing written) when no device owns the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.find(addr, data.len())
            .map(|(offset, device)| device.write(offset, data))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with a few bytes of storage, enough to see offsets and sizes.
    struct Scratch([u8; 8]);

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let start = usize::try_from(offset).expect("offsets in tests are small");
            data.copy_from_slice(&self.0[start..start + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let start = usize::try_from(offset).expect("offsets in tests are small");
            self.0[start..start + data.len()].copy_from_slice(data);
        }
    }

    fn scratch() -> Box<dyn BusDevice> {
        Box::new(Scratch([0; 8]))
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = Bus::new();
        bus.insert("a", 0x100, 8, scratch()).expect("free range");
        assert!(bus.write(0x102, &[1, 2]));
        let mut data = [0; 4];
        assert!(bus.read(0x100, &mut data));
        assert_eq!(data, [0, 0, 1, 2]);
        let dev = bus.device_mut::<Scratch>(0x100).expect("device at 0x100");
        assert_eq!(dev.0[2], 1);
    }

    #[test]
    fn accesses_outside_every_range_read_ones() {
        let mut bus = Bus::new();
        bus.insert("a", 0x100, 8, scratch()).expect("free range");
        let mut data = [0; 2];
        assert!(!bus.read(0xff, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        // Straddling the end of the range is not the device's either.
        assert!(!bus.read(0x107, &mut data));
        assert!(!bus.write(0x108, &[1]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert("a", 0x100, 8, scratch()).expect("free range");
        bus.insert("b", 0x108, 8, scratch())
            .expect("adjacent range");
        bus.insert("c", 0xf8, 8, scratch())
            .expect("adjacent range below");
        let err = bus.insert("d", 0x104, 2, scratch()).expect_err("inside a");
        assert!(matches!(
            err,
            BusError::Overlap {
                other: "a",
                other_base: 0x100,
                ..
            }
        ));
        let err = bus
            .insert("e", 0xf0, 0x10, scratch())
            .expect_err("covers c's start");
        assert!(matches!(err, BusError::Overlap { other: "c", .. }));
        let err = bus
            .insert("f", 0x10f, 0x100, scratch())
            .expect_err("over b's end");
        assert!(matches!(err, BusError::Overlap { other: "b", .. }));
    }

    #[test]
    fn empty_and_wrapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let err = bus.insert("a", 0x100, 0, scratch()).expect_err("empty");
        assert!(matches!(err, BusError::BadRange { len: 0, .. }));
        let err = bus.insert("b", u64::MAX, 2, scratch()).expect_err("wraps");
        assert!(matches!(err, BusError::BadRange { .. }));
    }

    /// A shared device: a byte of storage behind its own lock.
    struct SharedLatch(std::sync::Mutex<u8>);

    impl SharedBusDevice for SharedLatch {
        fn read(&self, offset: u64, data: &mut [u8]) {
            let value = *self.0.lock().expect("test lock");
            data.fill(value.wrapping_add(u8::try_from(offset).expect("small offset")));
        }
        fn write(&self, _: u64, data: &[u8]) {
            *self.0.lock().expect("test lock") = data[0];
        }
    }

    #[test]
    fn shared_bus_reaches_its_devices_and_leaves_misses_alone() {
        let mut bus = SharedBus::new();
        let latch = Arc::new(SharedLatch(std::sync::Mutex::new(0)));
        bus.insert("l", 0x200, 4, latch.clone())
            .expect("free range");
        let err = bus.insert("m", 0x1ff, 2, latch).expect_err("overlaps");
        assert!(matches!(err, BusError::Overlap { other: "l", .. }));
        assert!(bus.write(0x200, &[7]));
        let mut data = [0; 2];
        assert!(bus.read(0x202, &mut data));
        assert_eq!(data, [9, 9], "offset 2 from the range's start");
        // Outside, or straddling the end: not handled, and the buffer is left for the other bus.
        let mut data = [0x55; 2];
        assert!(!bus.read(0x203, &mut data));
        assert!(!bus.read(0x1ff, &mut data[..1]));
        assert_eq!(data, [0x55, 0x55]);
        assert!(!bus.write(0x204, &[1]));
    }

    #[test]
    fn device_mut_checks_the_type() {
        struct Other;
        impl BusDevice for Other {
            fn read(&mut self, _: u64, _: &mut [u8]) {}
            fn write(&mut self, _: u64, _: &[u8]) {}
        }
        let mut bus = Bus::new();
        bus.insert("a", 0x100, 8, scratch()).expect("free range");
        assert!(bus.device_mut::<Other>(0x100).is_none());
        assert!(bus.device_mut::<Scratch>(0x101).is_none());
    }
}
