//! Feeds arbitrary guest memory to a virtio-blk device: the input is the first 64 KiB of guest
//! RAM, where queue 0's descriptor table (0x0), available ring (0x100) and used ring (0x200) live,
//! so it chooses every descriptor, chain, request header and the available index. The driver side
//! goes through the virtio-mmio registers (features from the input's first byte), notifies, lets
//! the main-loop context run until the worker pool is done, and resets the device (which drains).
//! Any outcome but a panic, an abort or a hang is fine: a hostile guest gets a status or
//! DEVICE_NEEDS_RESET.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::aio::Workers;
use block::{Allocation, BlockStatus, DiskImage, Error};
use devices::context::Context;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::{GuestMemoryMmap, MmioTransport};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM size.
const RAM: usize = 64 << 10;
/// Disk size.
const DISK: usize = 32 << 10;

/// A disk in memory.
#[derive(Debug)]
struct MemDisk(Mutex<Vec<u8>>, bool);

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, Error> {
        let size = DISK as u64;
        let out = || Error::OutOfRange {
            offset,
            len: len as u64,
            size,
        };
        let start = usize::try_from(offset).map_err(|_| out())?;
        let end = start.checked_add(len).filter(|&e| e <= DISK).ok_or_else(out)?;
        Ok(start..end)
    }
}

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        DISK as u64
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        assert!(!self.1, "a write reached a read-only disk");
        let r = self.range(offset, buf.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), Error> {
        assert!(!self.1, "a write reached a read-only disk");
        let r = self.range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus, Error> {
        Ok(BlockStatus {
            allocation: Allocation::Data { host_offset: None },
            len,
        })
    }
}

fn set(t: &MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ram)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    mem.write_slice(&ram[..ram.len().min(RAM)], GuestAddress(0)).unwrap();
    let ctx = Context::new("fuzz").unwrap();
    let config = BlockConfig {
        queue_size: 16,
        discard: flags & 1 != 0,
        io_workers: Workers::fixed(1),
        ..Default::default()
    };
    let disk = Arc::new(MemDisk(Mutex::new(vec![0; DISK]), flags & 2 != 0));
    let dev = Block::new(config, disk, ctx.clone()).unwrap();
    let t = MmioTransport::new(dev, mem).unwrap();
    set(&t, 0x70, 3);
    // VERSION_1, event idx and indirect descriptors or not, and every virtio-blk feature the
    // device offers: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, MQ, DISCARD, WRITE_ZEROES,
    // and RO on a read-only disk (virtio 1.2, 5.2.3).
    let ring = (u32::from(flags >> 2) & 3) << 28;
    let ro = if flags & 2 != 0 { 1 << 5 } else { 0 };
    set(&t, 0x24, 0);
    set(&t, 0x20, ring | ro | 0x7646);
    set(&t, 0x24, 1);
    set(&t, 0x20, 1);
    set(&t, 0x70, 11);
    set(&t, 0x30, 0);
    set(&t, 0x38, 16);
    set(&t, 0x80, 0);
    set(&t, 0x90, 0x100);
    set(&t, 0xa0, 0x200);
    set(&t, 0x44, 1);
    set(&t, 0x70, 15);
    let mut status = [0u8; 4];
    t.read(0x70, &mut status);
    assert_eq!(status[0] & 15, 15, "the device refused the features the driver accepted");
    set(&t, 0x50, 0);
    for _ in 0..20 {
        if ctx.run_once(Some(Duration::from_millis(1))).unwrap() == 0 {
            break;
        }
    }
    set(&t, 0x70, 0);
});
