//! The vCPU threads' filter: `KVM_RUN` and the two register reads of a failure report on their
//! own vCPU fd, the console's writes, and what a vCPU makes when the guest activates or resets a
//! virtio-blk device (see [`super::rules::disk_handler`]), and on the VM fd `KVM_SET_GSI_ROUTING`,
//! which a vCPU calls when the guest programs or unmasks a virtio-pci MSI-X vector, and
//! `KVM_IOEVENTFD`, when the guest moves a virtio-pci BAR or turns its decoding on or off.

use super::rules::{common, disk_handler, Rules};

/// `KVM_RUN`: `_IO(KVMIO, 0x80)` (`include/uapi/linux/kvm.h`).
const KVM_RUN: u64 = 0xae80;
/// `KVM_GET_REGS`: `_IOR(KVMIO, 0x81, struct kvm_regs)`.
const KVM_GET_REGS: u64 = 0x8090_ae81;
/// `KVM_GET_SREGS`: `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
const KVM_GET_SREGS: u64 = 0x8138_ae83;

/// `KVM_SET_GSI_ROUTING`: `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`.
const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;

/// `KVM_IOEVENTFD`: `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`.
const KVM_IOEVENTFD: u64 = 0x4040_ae79;

/// The allow-list.
pub fn rules() -> Rules {
    let mut r = common();
    r.allow_arg(
        libc::SYS_ioctl,
        1,
        &[
            KVM_RUN,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_SET_GSI_ROUTING,
            KVM_IOEVENTFD,
        ],
    );
    disk_handler(&mut r);
    r
}
