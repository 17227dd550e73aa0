//! The vCPU topology (`-smp sockets=,cores=,threads=`) and the APIC ids it gives.
//!
//! vCPU `n` is thread `n % threads` of core `(n / threads) % cores` of socket
//! `n / (threads * cores)`. Its APIC id packs the three into bit fields as x86 hardware does
//! (Intel SDM vol. 3A, 10.4.8.1 and CPUID leaf 0xB): the thread in the low `thread_bits`, then
//! the core in `core_bits`, then the socket, each field as wide as its count needs
//! (ceil(log2)). So a count that is not a power of two leaves holes in the ids, as on hardware.
//! The CPUID leaves ([`super::cpuid`]), the MADT ([`super::acpi`]) and KVM's vCPU ids (which
//! KVM uses as the local APIC's id) all take the ids from here.
//!
//! The MADT describes local APICs with 8-bit ids and 0xFF means "every CPU", so every APIC id
//! must be at most 254; a topology whose ids go past it is refused.

/// The largest APIC id an xAPIC MADT entry can name (0xFF is the broadcast id).
pub const MAX_APIC_ID: u32 = 254;

/// Errors in a topology.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// A count of zero.
    #[error("Invalid CPU topology: sockets ({sockets}), cores ({cores}) and threads ({threads}) must be greater than zero")]
    Zero {
        /// Sockets.
        sockets: u32,
        /// Cores per socket.
        cores: u32,
        /// Threads per core.
        threads: u32,
    },
    /// More vCPUs than the APIC ids can name.
    #[error("Invalid CPU topology: sockets ({sockets}) * cores ({cores}) * threads ({threads}) needs APIC ids up to {apic_id}, above {MAX_APIC_ID}")]
    ApicIdTooLarge {
        /// Sockets.
        sockets: u32,
        /// Cores per socket.
        cores: u32,
        /// Threads per core.
        threads: u32,
        /// The largest APIC id it would need.
        apic_id: u64,
    },
}

/// How many sockets, cores per socket and threads per core the vCPUs form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    sockets: u8,
    cores: u8,
    threads: u8,
}

/// Bits needed to number `count` items: ceil(log2(count)).
pub fn id_bits(count: u32) -> u32 {
    u32::BITS - (count.max(1) - 1).leading_zeros()
}

impl Topology {
    /// One socket of `count` single-threaded cores.
    pub fn cores(count: u8) -> Result<Self, TopologyError> {
        Self::new(1, u32::from(count), 1)
    }

    /// `sockets` sockets of `cores` cores of `threads` threads, if every APIC id fits.
    pub fn new(sockets: u32, cores: u32, threads: u32) -> Result<Self, TopologyError> {
        if sockets == 0 || cores == 0 || threads == 0 {
            return Err(TopologyError::Zero {
                sockets,
                cores,
                threads,
            });
        }
        // The last vCPU has the largest id: every field at its maximum.
        // In a u128: each field is below 2^32 and each shift at most 64 bits.
        let apic_id = (u128::from(sockets - 1) << (id_bits(cores) + id_bits(threads)))
            | (u128::from(cores - 1) << id_bits(threads))
            | u128::from(threads - 1);
        let apic_id = u64::try_from(apic_id).unwrap_or(u64::MAX);
        let too_large = TopologyError::ApicIdTooLarge {
            sockets,
            cores,
            threads,
            apic_id,
        };
        if apic_id > u64::from(MAX_APIC_ID) {
            return Err(too_large);
        }
        // Each count is at most its largest id plus one, at most 255: they fit in a u8, and so
        // does their product (the ids are distinct and at most 254).
        match (
            u8::try_from(sockets),
            u8::try_from(cores),
            u8::try_from(threads),
        ) {
            (Ok(sockets), Ok(cores), Ok(threads)) => Ok(Self {
                sockets,
                cores,
                threads,
            }),
            _ => Err(too_large),
        }
    }

    /// The number of vCPUs.
    pub fn cpus(&self) -> u8 {
        // At most 255: every vCPU has a distinct APIC id no larger than 254 (see `new`).
        u8::try_from(u32::from(self.sockets) * self.cores_per_socket()).unwrap_or(u8::MAX)
    }

    /// Threads per core.
    pub fn threads_per_core(&self) -> u32 {
        u32::from(self.threads)
    }

    /// Logical processors per socket (cores times threads).
    pub fn cores_per_socket(&self) -> u32 {
        u32::from(self.cores) * u32::from(self.threads)
    }

    /// Bits of the APIC id below the core field (the thread field's width).
    pub fn thread_bits(&self) -> u32 {
        id_bits(u32::from(self.threads))
    }

    /// Bits of the APIC id below the socket field (the thread and core fields' widths).
    pub fn socket_shift(&self) -> u32 {
        self.thread_bits() + id_bits(u32::from(self.cores))
    }

    /// The socket, core and thread of vCPU `index`.
    fn place(&self, index: u8) -> (u32, u32, u32) {
        let index = u32::from(index);
        let threads = u32::from(self.threads);
        let cores = u32::from(self.cores);
        (
            index / (threads * cores),
            (index / threads) % cores,
            index % threads,
        )
    }

    /// The core id of vCPU `index` within its socket.
    pub fn core_of(&self, index: u8) -> u32 {
        self.place(index).1
    }

    /// The socket of vCPU `index`.
    pub fn socket_of(&self, index: u8) -> u32 {
        self.place(index).0
    }

    /// The APIC id of vCPU `index` (at most [`MAX_APIC_ID`] for every index below `cpus()`).
    pub fn apic_id(&self, index: u8) -> u8 {
        let (socket, core, thread) = self.place(index);
        let id = (socket << self.socket_shift()) | (core << self.thread_bits()) | thread;
        // At most MAX_APIC_ID for a vCPU of this topology (checked in `new`).
        u8::try_from(id).unwrap_or(u8::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bits_round_up() {
        let counts = [0, 1, 2, 3, 4, 5, 8, 9, u32::MAX];
        let bits: Vec<u32> = counts.into_iter().map(id_bits).collect();
        assert_eq!(bits, [0, 0, 1, 2, 2, 3, 3, 4, 32]);
    }

    #[test]
    fn apic_ids_pack_socket_core_and_thread() {
        // 2 sockets of 3 cores of 2 threads: thread 1 bit, core 2 bits.
        let t = Topology::new(2, 3, 2).expect("valid");
        assert_eq!(t.cpus(), 12);
        let ids: Vec<u8> = (0..t.cpus()).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!((t.socket_of(7), t.core_of(7)), (1, 0));
        let flat = Topology::cores(255).expect("ids 0 to 254 fit");
        assert_eq!((flat.cpus(), flat.apic_id(254)), (255, 254));
    }

    #[test]
    fn ids_past_254_and_zero_counts_are_refused() {
        assert_eq!(
            Topology::new(3, 5, 17),
            Err(TopologyError::ApicIdTooLarge {
                sockets: 3,
                cores: 5,
                threads: 17,
                apic_id: (2 << 8) | (4 << 5) | 16,
            })
        );
        assert!(matches!(
            Topology::new(1, 256, 1),
            Err(TopologyError::ApicIdTooLarge { apic_id: 255, .. })
        ));
        assert!(matches!(
            Topology::new(1, 1, 0),
            Err(TopologyError::Zero { threads: 0, .. })
        ));
        // The broadcast id 255 is never a CPU's: 256 single-thread sockets do not fit.
        assert!(Topology::new(256, 1, 1).is_err());
        assert!(Topology::new(u32::MAX, u32::MAX, u32::MAX).is_err());
    }
}
