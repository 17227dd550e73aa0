//! The CPUID each vCPU reports: KVM's supported set, with what KVM emulates but leaves out of it
//! (the TSC-deadline timer), this vCPU's APIC id and the topology of `-smp` ([`Topology`]: sockets
//! of cores of threads).
//!
//! KVM's local APIC (always in the kernel here) runs the TSC-deadline timer, but older kernels'
//! `KVM_GET_SUPPORTED_CPUID` (6.1's, say) does not report it: a VMM adds it when
//! `KVM_CAP_TSC_DEADLINE_TIMER` says so (KVM's api.rst), as QEMU does. Without it the guest times with the APIC's one-shot
//! mode, which it first calibrates against another clock, and every timer set is an MMIO write.
//!
//! Which leaves say what (Intel SDM vol. 2A, "CPUID"; AMD APM vol. 3, appendix E):
//! - leaf 1: initial APIC id and logical processors per package (EBX), HTT (EDX), hypervisor and
//!   TSC-deadline (ECX);
//! - leaf 4 (Intel): cores per package and threads sharing each cache (EAX);
//! - leaves 0xB and 0x1F (x2APIC topology): the SMT level (`threads` wide, shift of the thread
//!   field) and the core level (`cores * threads` wide, shift of the socket field), the x2APIC id
//!   in EDX;
//! - leaf 0x80000008 (AMD): logical processors per package and APIC-id bits below the socket
//!   (ECX);
//! - leaf 0x8000001D (AMD): threads sharing each cache (EAX);
//! - leaf 0x8000001E (AMD): extended APIC id, core id and threads per core, node id (the socket).
//!
//! The APIC id of each vCPU comes from [`Topology::apic_id`], as the MADT's do.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use super::topology::Topology;

/// Errors from setting CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot get the CPUID leaves KVM supports")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("Cannot set CPUID on vCPU {cpu}")]
    Set {
        /// The vCPU.
        cpu: u8,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Leaf 1 EDX: hyper-threading (more than one logical processor per package).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the local APIC's TSC-deadline timer mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0xB/0x1F level types, in ECX bits 15:8.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The threads sharing a cache at `level` (1 to 3), minus one: a core's caches are shared by
/// its threads, the L3 by the package.
fn sharing(level: u32, topology: &Topology) -> u32 {
    if level >= 3 {
        topology.cores_per_socket() - 1
    } else {
        topology.threads_per_core() - 1
    }
}

/// Rewrites the APIC-id and topology fields of `entries` for vCPU `cpu` of `topology`.
pub fn patch_entries(entries: &mut [kvm_cpuid_entry2], cpu: u8, topology: &Topology) {
    let apic_id = u32::from(topology.apic_id(cpu));
    let per_package = topology.cores_per_socket();
    let threads = topology.threads_per_core();
    let cores = per_package / threads;
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (per_package << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if per_package > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // The null cache type (EAX[4:0] == 0) ends the list; leave it alone.
            0x4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                e.eax = (e.eax & 0x3fff) | ((cores - 1) << 26) | (sharing(level, topology) << 14);
            }
            0xb | 0x1f => {
                let (shift, width, level_type) = match e.index {
                    0 => (topology.thread_bits(), threads, LEVEL_TYPE_SMT),
                    1 => (topology.socket_shift(), per_package, LEVEL_TYPE_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = width;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            0x8000_0008 => {
                e.ecx = (topology.socket_shift() << 12) | (per_package - 1);
            }
            0x8000_001d if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                e.eax = (e.eax & 0x3fff) | (sharing(level, topology) << 14);
            }
            0x8000_001e => {
                e.eax = apic_id;
                // Core id in EBX[7:0], threads per core minus one in EBX[15:8].
                e.ebx = ((threads - 1) << 8) | topology.core_of(cpu);
                // One node per socket, node id in ECX[7:0].
                e.ecx = topology.socket_of(cpu);
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// The CPUID leaves KVM supports on this host, with the TSC-deadline timer where KVM has it.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        add_tsc_deadline(cpuid.as_mut_slice());
    }
    Ok(cpuid)
}

/// The physical address width the vCPUs report (leaf 0x80000008, EAX bits 7 to 0); 36 bits where the
/// leaf is missing, as the Intel SDM says of a processor without it (vol. 3A, 4.1.4).
pub fn phys_bits(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008 && e.index == 0)
        .map(|e| u8::try_from(e.eax & 0xff).unwrap_or(36))
        .filter(|&bits| bits != 0)
        .unwrap_or(36)
}

/// Reports the TSC-deadline timer in leaf 1.
fn add_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Sets `supported`, patched for vCPU `cpu` of `topology`, on `vcpu`.
pub fn setup_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    cpu: u8,
    topology: &Topology,
) -> Result<(), CpuidError> {
    let mut cpuid = supported.clone();
    patch_entries(cpuid.as_mut_slice(), cpu, topology);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| CpuidError::Set { cpu, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    fn cores(count: u8) -> Topology {
        Topology::cores(count).expect("a valid core count")
    }

    #[test]
    fn the_tsc_deadline_timer_is_reported_where_kvm_has_it() {
        let kvm = Kvm::new().expect("/dev/kvm is needed by the vmm tests");
        let cpuid = supported_cpuid(&kvm).expect("KVM's CPUID");
        let leaf1 = find(cpuid.as_slice(), 1, 0);
        assert_eq!(
            leaf1.ecx & LEAF1_ECX_TSC_DEADLINE != 0,
            kvm.check_extension(Cap::TscDeadlineTimer),
            "leaf 1 ECX {:#x}",
            leaf1.ecx
        );
    }

    #[test]
    fn the_physical_address_width_is_leaf_0x80000008_eax_low_byte() {
        let e = [
            leaf(1, 0, 0, 0, 0, 0),
            leaf(0x8000_0008, 0, 0x3028, 0, 0, 0),
        ];
        assert_eq!(phys_bits(&e), 40);
        assert_eq!(phys_bits(&e[..1]), 36, "no leaf");
        assert_eq!(
            phys_bits(&[leaf(0x8000_0008, 0, 0x3000, 0, 0, 0)]),
            36,
            "zero"
        );
    }

    #[test]
    fn a_kernel_that_leaves_tsc_deadline_out_gets_it_added() {
        // Older kernels (the nested host's 6.1) leave the bit out of KVM_GET_SUPPORTED_CPUID;
        // newer ones (this machine's) report it themselves.
        let mut e = [leaf(1, 0, 0, 0, 0x8000_0000, 0), leaf(7, 0, 0, 0, 0, 0)];
        add_tsc_deadline(&mut e);
        assert_eq!(e[0].ecx, 0x8100_0000);
        assert_eq!(e[1].ecx, 0, "only leaf 1 changes");
    }

    #[test]
    fn leaf_1_carries_apic_id_and_count() {
        // CLFLUSH size 8 in EBX[15:8] must survive.
        let mut e = [leaf(1, 0, 0, 0xff00_0800, 0, 0)];
        patch_entries(&mut e, 3, &cores(4));
        assert_eq!(e[0].ebx, 0x0304_0800);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, LEAF1_EDX_HTT);
        assert_eq!(e[0].ecx & LEAF1_ECX_HYPERVISOR, LEAF1_ECX_HYPERVISOR);
        patch_entries(&mut e, 0, &cores(1));
        assert_eq!(e[0].ebx, 0x0001_0800);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn intel_topology_leaves() {
        let mut e = [
            // L1 data cache (type 1, level 1) and L3 (type 3, level 3), as a host reports them
            // with 64 logical processors sharing its L3.
            leaf(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0),
            leaf(4, 3, 0x1c03_c163, 0x03c0_003f, 0x3fff, 6),
            leaf(4, 4, 0, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0xb, 1, 6, 64, 0x201, 7),
            leaf(0xb, 2, 0, 0, 2, 7),
        ];
        patch_entries(&mut e, 5, &cores(6));
        assert_eq!(find(&e, 4, 0).eax, (5 << 26) | 0x121);
        assert_eq!(find(&e, 4, 3).eax, (5 << 26) | (5 << 14) | 0x163);
        assert_eq!(find(&e, 4, 4).eax, 0, "terminator kept");
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx >> 8, end.edx), (0, 0, 0, 5));
    }

    #[test]
    fn amd_topology_leaves() {
        let mut e = [
            leaf(0x8000_0008, 0, 0x3030, 0, 0x0001_703f, 0),
            leaf(0x8000_001d, 0, 0x0000_4121, 0, 0, 0),
            leaf(0x8000_001d, 3, 0x0003_c163, 0, 0, 0),
            leaf(0x8000_001e, 0, 0x2a, 0x0115, 0x0103, 0),
        ];
        patch_entries(&mut e, 7, &cores(8));
        let size = find(&e, 0x8000_0008, 0);
        assert_eq!(size.eax, 0x3030, "address sizes kept");
        assert_eq!(size.ecx, (3 << 12) | 7);
        assert_eq!(find(&e, 0x8000_001d, 0).eax, 0x121);
        assert_eq!(find(&e, 0x8000_001d, 3).eax, (7 << 14) | 0x163);
        let ext = find(&e, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (7, 7, 0, 0));
    }

    #[test]
    fn sockets_and_threads_show_in_every_topology_leaf() {
        // 2 sockets of 3 cores of 2 threads; vCPU 7 is thread 1 of core 0 of socket 1: APIC id
        // 0b1_00_1 (thread 1 bit, core 2 bits).
        let topology = Topology::new(2, 3, 2).expect("valid");
        let mut e = [
            leaf(1, 0, 0, 0x0000_0800, 0, 0),
            leaf(4, 0, 0x1c00_4121, 0, 0, 0),
            leaf(4, 3, 0x1c03_c163, 0, 0, 0),
            leaf(0xb, 0, 0, 0, 0, 0),
            leaf(0xb, 1, 0, 0, 0, 0),
            leaf(0x8000_0008, 0, 0, 0, 0, 0),
            leaf(0x8000_001d, 0, 0x121, 0, 0, 0),
            leaf(0x8000_001e, 0, 0, 0, 0, 0),
        ];
        patch_entries(&mut e, 7, &topology);
        assert_eq!(find(&e, 1, 0).ebx, (9 << 24) | (6 << 16) | 0x800);
        // Cores per package minus one; L1 shared by a core's 2 threads, L3 by the package's 6.
        assert_eq!(find(&e, 4, 0).eax, (2 << 26) | (1 << 14) | 0x121);
        assert_eq!(find(&e, 4, 3).eax, (2 << 26) | (5 << 14) | 0x163);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, 9));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 9));
        assert_eq!(find(&e, 0x8000_0008, 0).ecx, (3 << 12) | 5);
        assert_eq!(find(&e, 0x8000_001d, 0).eax, (1 << 14) | 0x121);
        let ext = find(&e, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (9, (1 << 8), 1));
    }
}
