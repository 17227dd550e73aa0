//! The model-specific registers a vCPU starts with.
//!
//! KVM resets most MSRs to their power-on values; these are the ones a firmware would have set
//! before jumping to a kernel (MSR numbers and bits: Intel SDM vol. 4, table 2-2).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// `IA32_SYSENTER_CS`, `_ESP`, `_EIP`: no fast system calls until the kernel sets them.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `STAR`, `LSTAR`, `CSTAR`, `SFMASK`: the SYSCALL targets, cleared.
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`, the `swapgs` shadow, cleared.
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `IA32_TSC`: the time-stamp counter starts at 0.
const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_MISC_ENABLE`, with fast-string operations enabled (bit 0), as firmware leaves it.
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled (bit 11) with write-back (6) as the default memory type;
/// with MTRRs disabled, Linux maps all memory uncached.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// Errors from setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be built.
    #[error("Cannot build the list of {count} boot MSRs")]
    Build {
        /// Number of MSRs.
        count: usize,
        /// The allocation error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM_SET_MSRS failed.
    #[error("Cannot set the boot MSRs")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM set fewer MSRs than asked; the first it refused is named.
    #[error("KVM refused MSR {index:#x}")]
    Refused {
        /// The first MSR KVM did not set.
        index: u32,
    },
}

/// The boot MSRs and their values.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs on `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|source| MsrError::Build {
        count: entries.len(),
        source,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    match entries.get(set) {
        Some(refused) => Err(MsrError::Refused {
            index: refused.index,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtrrs_default_to_write_back() {
        let entries = boot_msr_entries();
        let def = entries
            .iter()
            .find(|e| e.index == MSR_MTRR_DEF_TYPE)
            .expect("listed");
        assert_eq!(def.data, 0x806);
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), entries.len(), "no MSR twice");
    }
}
