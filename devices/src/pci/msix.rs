//! MSI-X (PCI Local Bus 3.0, 6.8.2; PCIe 6.0, 7.7.2): the capability, the vector table and the
//! pending bit array a function keeps in one of its BARs, and the delivery of its vectors.
//!
//! Each vector is an eventfd the vmm registers with KVM as the irqfd of its own GSI; KVM routes
//! that GSI to the message (address, data) the guest wrote in the table ([`MsiRoutes`], the vmm's
//! `KVM_SET_GSI_ROUTING`). Signalling a vector writes its eventfd, unless the vector is masked
//! (its mask bit, the function mask, or MSI-X off): then its pending bit is set, and the
//! interrupt is sent when the vector is unmasked, as 6.8.2.9 asks.
//!
//! Locking: the owner keeps an [`Msix`] behind its own mutex; vCPUs writing the table or the
//! capability and the device's context signalling a vector take it, briefly, and nothing else
//! while they hold it except the route update (one ioctl).

use std::fmt;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::PciError;

/// The capability id of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes of one table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors a function may have (the table size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X is enabled.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: every vector of the function is masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;

/// One MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// The address (the local APIC window, with the destination in it, on x86).
    pub address: u64,
    /// The data (the vector and delivery mode, on x86).
    pub data: u32,
}

/// Where MSI routes go: the vmm points a GSI at a message (`KVM_SET_GSI_ROUTING`). Called from
/// vCPU threads, with the function's MSI-X lock held.
pub trait MsiRoutes: Send + Sync + fmt::Debug {
    /// Routes `gsi` to `message`.
    fn route(&self, gsi: u32, message: MsiMessage) -> Result<(), std::io::Error>;
}

/// One table entry and its delivery.
#[derive(Debug)]
struct Vector {
    address: u64,
    data: u32,
    control: u32,
    pending: bool,
    /// The message KVM routes the GSI to, once routed.
    routed: Option<MsiMessage>,
    gsi: u32,
    irqfd: EventFd,
}

/// A function's MSI-X state: the capability's control bits, the table and the pending bits.
#[derive(Debug)]
pub struct Msix {
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    routes: Arc<dyn MsiRoutes>,
}

impl Msix {
    /// `count` vectors on GSIs `first_gsi` on, each with a new irqfd; every vector starts
    /// masked (6.8.2.9) and MSI-X off.
    pub fn new(count: u16, first_gsi: u32, routes: Arc<dyn MsiRoutes>) -> Result<Self, PciError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(PciError::VectorCount(count));
        }
        let vectors = (0..count)
            .map(|i| {
                let gsi = first_gsi
                    .checked_add(u32::from(i))
                    .ok_or(PciError::VectorCount(count))?;
                Ok(Vector {
                    address: 0,
                    data: 0,
                    control: VECTOR_MASKED,
                    pending: false,
                    routed: None,
                    gsi,
                    irqfd: EventFd::new(EFD_NONBLOCK).map_err(PciError::Irqfd)?,
                })
            })
            .collect::<Result<Vec<_>, PciError>>()?;
        Ok(Msix {
            vectors,
            enabled: false,
            function_masked: false,
            routes,
        })
    }

    /// The number of vectors.
    pub fn len(&self) -> u16 {
        u16::try_from(self.vectors.len()).unwrap_or(MAX_VECTORS)
    }

    /// Whether there is no vector (never: `new` refuses it).
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Each vector's GSI and the eventfd to register with KVM as its irqfd.
    pub fn irqfds(&self) -> impl Iterator<Item = (u32, &EventFd)> {
        self.vectors.iter().map(|v| (v.gsi, &v.irqfd))
    }

    /// The capability's body (after the id and next pointer): message control (table size),
    /// then the table's and the pending bit array's BAR and offset. Only the control's enable
    /// and function-mask bits are the guest's to write (at body offset 0, byte 1).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut body = [0u8; 10];
        body[..2].copy_from_slice(&(self.len() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        body
    }

    /// The writable bits of message control.
    pub const CONTROL_WRITABLE: u16 = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;

    /// Bytes of the pending bit array (whole qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.len()).div_ceil(64) * 8
    }

    /// Whether the guest enabled MSI-X (message control); while it has not, the function
    /// interrupts through INTx.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote message control (its enable and function-mask bits).
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for i in 0..self.vectors.len() {
            self.update(i);
        }
    }

    fn delivers(&self, v: &Vector) -> bool {
        self.enabled && !self.function_masked && v.control & VECTOR_MASKED == 0
    }

    /// After a change to vector `i` or to the function: routes it where the guest says once it
    /// can fire, and sends what it held back.
    fn update(&mut self, i: usize) {
        let Some(v) = self.vectors.get(i) else {
            return;
        };
        if !self.delivers(v) {
            return;
        }
        let message = MsiMessage {
            address: v.address,
            data: v.data,
        };
        let (gsi, routed, pending) = (v.gsi, v.routed, v.pending);
        if routed != Some(message) {
            if let Err(e) = self.routes.route(gsi, message) {
                log::error!("msi-x: cannot route GSI {gsi}: {e}");
                return;
            }
            self.vectors[i].routed = Some(message);
        }
        if pending {
            self.vectors[i].pending = false;
            self.fire(i);
        }
    }

    fn fire(&self, i: usize) {
        if let Err(e) = self.vectors[i].irqfd.write(1) {
            log::warn!("msi-x: cannot signal vector {i}: {e}");
        }
    }

    /// Signals vector `vector`: sends it, or sets its pending bit while it is masked. A vector
    /// the function does not have is ignored (virtio's NO_VECTOR, 0xffff, among them).
    pub fn signal(&mut self, vector: u16) {
        let i = usize::from(vector);
        let Some(v) = self.vectors.get(i) else {
            return;
        };
        if self.delivers(v) {
            self.fire(i);
        } else {
            self.vectors[i].pending = true;
        }
    }

    /// A guest read of the table at `offset`: whole dwords or qwords, aligned; others read as
    /// zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((i, field)) = self.entry(offset, data.len()) else {
            return;
        };
        let v = &self.vectors[i];
        let dwords = [
            u32::try_from(v.address & 0xffff_ffff).unwrap_or(0),
            u32::try_from(v.address >> 32).unwrap_or(0),
            v.data,
            v.control,
        ];
        for (chunk, value) in data.chunks_mut(4).zip(&dwords[field..]) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A guest write to the table at `offset`: whole dwords or qwords, aligned.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((i, field)) = self.entry(offset, data.len()) else {
            log::warn!(
                "msi-x: ignored {}-byte table write at {offset:#x}",
                data.len()
            );
            return;
        };
        for (k, chunk) in data.chunks(4).enumerate() {
            let mut b = [0; 4];
            b.copy_from_slice(chunk);
            let value = u32::from_le_bytes(b);
            let v = &mut self.vectors[i];
            match field + k {
                0 => v.address = (v.address & !0xffff_ffff) | u64::from(value),
                1 => v.address = (v.address & 0xffff_ffff) | (u64::from(value) << 32),
                2 => v.data = value,
                // Only the mask bit is writable in vector control.
                _ => v.control = value & VECTOR_MASKED,
            }
        }
        self.update(i);
    }

    /// The entry and its dword (0 to 3) an aligned 4- or 8-byte access at `offset` starts at.
    fn entry(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let aligned = match len {
            4 => offset.is_multiple_of(4),
            8 => offset.is_multiple_of(8),
            _ => false,
        };
        let i = usize::try_from(offset / ENTRY_SIZE).ok()?;
        let field = usize::try_from(offset % ENTRY_SIZE / 4).ok()?;
        (aligned && i < self.vectors.len()).then_some((i, field))
    }

    /// A guest read of the pending bit array at `offset` (read-only: writes are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            let byte = offset.saturating_add(u64::try_from(k).unwrap_or(u64::MAX));
            *b = (0..8).fold(0u8, |acc, bit| {
                let i = byte.saturating_mul(8).saturating_add(bit);
                let pending = usize::try_from(i)
                    .ok()
                    .and_then(|i| self.vectors.get(i))
                    .is_some_and(|v| v.pending);
                acc | (u8::from(pending) << bit)
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Mutex;

    /// Records the routes it is asked for.
    #[derive(Debug, Default)]
    pub(crate) struct Routes(pub(crate) Mutex<Vec<(u32, MsiMessage)>>);

    impl MsiRoutes for Routes {
        fn route(&self, gsi: u32, message: MsiMessage) -> Result<(), std::io::Error> {
            self.0.lock().unwrap().push((gsi, message));
            Ok(())
        }
    }

    fn set(m: &mut Msix, vector: u64, dword: u64, value: u32) {
        m.write_table(vector * ENTRY_SIZE + dword * 4, &value.to_le_bytes());
    }

    fn fired(m: &Msix, vector: usize) -> bool {
        m.vectors[vector].irqfd.read().is_ok()
    }

    fn pba(m: &Msix) -> u8 {
        let mut b = [0];
        m.read_pba(0, &mut b);
        b[0]
    }

    fn program(m: &mut Msix, vector: u64, data: u32) {
        set(m, vector, 0, 0xfee0_0000);
        set(m, vector, 1, 0);
        set(m, vector, 2, data);
    }

    #[test]
    fn a_masked_vector_pends_and_fires_on_unmask() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(3, 24, routes.clone()).unwrap();
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 1, 0x41);
        // Masked at reset: pending, not sent, not routed yet.
        m.signal(1);
        assert!(!fired(&m, 1));
        assert_eq!(pba(&m), 0b010);
        assert!(routes.0.lock().unwrap().is_empty());
        // Unmask: routed to the message, then the pending interrupt goes out.
        set(&mut m, 1, 3, 0);
        assert_eq!(
            *routes.0.lock().unwrap(),
            [(
                25,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            )]
        );
        assert!(fired(&m, 1));
        assert_eq!(pba(&m), 0);
        // Unmasked: straight out.
        m.signal(1);
        assert!(fired(&m, 1));
        assert!(!fired(&m, 0) && !fired(&m, 2));
        // Vectors it does not have (virtio's NO_VECTOR).
        m.signal(3);
        m.signal(0xffff);
    }

    #[test]
    fn the_function_mask_and_the_enable_bit_hold_every_vector_back() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(2, 24, routes.clone()).unwrap();
        program(&mut m, 0, 0x30);
        program(&mut m, 1, 0x31);
        set(&mut m, 0, 3, 0);
        set(&mut m, 1, 3, 0);
        // MSI-X off: held back.
        m.signal(0);
        assert!(!fired(&m, 0));
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(1);
        assert!(!fired(&m, 0) && !fired(&m, 1));
        assert_eq!(pba(&m), 0b11);
        m.set_control(CONTROL_ENABLE);
        assert!(fired(&m, 0) && fired(&m, 1));
        assert_eq!(pba(&m), 0);
        assert_eq!(routes.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_new_message_moves_the_route() {
        let routes = Arc::new(Routes::default());
        let mut m = Msix::new(1, 30, routes.clone()).unwrap();
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0x41);
        set(&mut m, 0, 3, 0);
        // Linux masks, rewrites, unmasks (the guest moved the interrupt to another CPU).
        set(&mut m, 0, 3, 1);
        m.write_table(0, &0x0000_0000_fee0_1000u64.to_le_bytes());
        set(&mut m, 0, 2, 0x42);
        set(&mut m, 0, 3, 0);
        let got = routes.0.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                (
                    30,
                    MsiMessage {
                        address: 0xfee0_0000,
                        data: 0x41
                    }
                ),
                (
                    30,
                    MsiMessage {
                        address: 0xfee0_1000,
                        data: 0x42
                    }
                ),
            ]
        );
    }

    #[test]
    fn the_table_reads_back_and_odd_accesses_are_ignored() {
        let mut m = Msix::new(2, 24, Arc::new(Routes::default())).unwrap();
        program(&mut m, 1, 0x55);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        let mut d = [0u8; 4];
        m.read_table(16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked at reset");
        set(&mut m, 1, 3, 0xffff_fffe);
        m.read_table(16 + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "only the mask bit is writable");
        // Unaligned, odd widths, past the table: no effect, reads zero.
        m.write_table(17, &[1, 2, 3, 4]);
        m.write_table(16, &[1, 2]);
        m.write_table(32, &[1, 2, 3, 4]);
        m.read_table(32, &mut d);
        assert_eq!(d, [0; 4]);
        m.read_table(16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x55);
        assert!(matches!(
            Msix::new(0, 24, Arc::new(Routes::default())),
            Err(PciError::VectorCount(0))
        ));
        assert!(matches!(
            Msix::new(2049, 24, Arc::new(Routes::default())),
            Err(PciError::VectorCount(2049))
        ));
    }

    #[test]
    fn the_capability_names_the_table_and_the_pba() {
        let m = Msix::new(5, 24, Arc::new(Routes::default())).unwrap();
        let body = m.capability(0, 0x4000, 0x6000);
        assert_eq!(body, [4, 0, 0, 0x40, 0, 0, 0, 0x60, 0, 0]);
        assert_eq!(m.pba_size(), 8);
        assert_eq!(
            m.irqfds().map(|(g, _)| g).collect::<Vec<_>>(),
            [24, 25, 26, 27, 28]
        );
    }
}
