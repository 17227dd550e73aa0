//! KVM's GSI routing table for the PCI functions' MSI-X vectors (`KVM_SET_GSI_ROUTING`).
//!
//! KVM replaces the whole table at each call, so the table kept here starts with what KVM sets up
//! with the in-kernel irqchip (GSIs 0 to 15 on the PICs and the IOAPIC, 16 to 23 on the IOAPIC
//! alone) and adds one MSI route per vector the guest has programmed. A function calls
//! [`MsiRoutes::route`] from a vCPU thread with its MSI-X lock held, when a vector becomes
//! deliverable with a message KVM does not have yet (the guest unmasked it or rewrote it).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use devices::pci::{MsiMessage, MsiRoutes};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// The IOAPIC's pins: GSIs 0 to 23.
const IOAPIC_PINS: u32 = 24;

/// The VM's MSI routes.
#[derive(Debug)]
pub(crate) struct KvmMsiRoutes {
    vm_fd: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl KvmMsiRoutes {
    pub(crate) fn new(vm_fd: Arc<VmFd>) -> Self {
        KvmMsiRoutes {
            vm_fd,
            msi: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The irqchip routes KVM starts with (`kvm_setup_default_irq_routing`).
fn irqchip_entries() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        let mut pin = |chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            entries.push(e);
        };
        match gsi {
            0..8 => pin(KVM_IRQCHIP_PIC_MASTER, gsi),
            8..16 => pin(KVM_IRQCHIP_PIC_SLAVE, gsi - 8),
            _ => {}
        }
        pin(KVM_IRQCHIP_IOAPIC, gsi);
    }
    entries
}

/// The routing table: the irqchip routes, then `msi`.
fn table(msi: &BTreeMap<u32, MsiMessage>) -> Result<KvmIrqRouting, io::Error> {
    let mut entries = irqchip_entries();
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = u32::try_from(m.address & 0xffff_ffff).unwrap_or(0);
        e.u.msi.address_hi = u32::try_from(m.address >> 32).unwrap_or(0);
        e.u.msi.data = m.data;
        entries.push(e);
    }
    KvmIrqRouting::from_entries(&entries).map_err(|e| io::Error::other(format!("{e:?}")))
}

impl MsiRoutes for KvmMsiRoutes {
    fn route(&self, gsi: u32, message: MsiMessage) -> Result<(), io::Error> {
        // The map is only changed here, one insert: nothing panics half-way.
        let mut msi = self.msi.lock().unwrap_or_else(PoisonError::into_inner);
        let old = msi.insert(gsi, message);
        let result = table(&msi).and_then(|t| {
            self.vm_fd
                .set_gsi_routing(&t)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        });
        if result.is_err() {
            // KVM keeps the table it had: so does the map.
            match old {
                Some(m) => msi.insert(gsi, m),
                None => msi.remove(&gsi),
            };
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_irqchip_routes_and_adds_the_messages() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let t = table(&msi).expect("fits");
        let entries = t.as_slice();
        // 16 PIC routes, 24 IOAPIC routes, one MSI route.
        assert_eq!(entries.len(), 16 + 24 + 1);
        let last = entries[entries.len() - 1];
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry, written through the `msi` member.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
        let ioapic: Vec<u32> = entries
            .iter()
            .filter(|e| {
                e.type_ == KVM_IRQ_ROUTING_IRQCHIP
                    // SAFETY: an irqchip entry, written through the `irqchip` member.
                    && unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC
            })
            .map(|e| e.gsi)
            .collect();
        assert_eq!(ioapic, (0..24).collect::<Vec<_>>());
    }

    /// A real VM: the routes reach KVM (needs /dev/kvm, as the tiny-guest tests do).
    #[test]
    fn routes_reach_kvm() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm is needed for this test");
        let vm = Arc::new(kvm.create_vm().expect("a VM"));
        vm.create_irq_chip().expect("an irqchip");
        let routes = KvmMsiRoutes::new(Arc::clone(&vm));
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        routes.route(24, m).expect("routed");
        routes.route(25, m).expect("routed");
        assert_eq!(routes.msi.lock().expect("not poisoned").len(), 2);
        // A GSI past KVM's limit is refused and forgotten.
        assert!(routes.route(u32::MAX, m).is_err());
        assert_eq!(routes.msi.lock().expect("not poisoned").len(), 2);
    }
}
