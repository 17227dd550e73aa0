//! Segment descriptors for the boot GDT, and the `kvm_segment` each one loads as.
//!
//! The layout of a descriptor is Intel SDM vol. 3, 3.4.5 ("Segment Descriptors"); the access
//! byte and flags are packed as `flags << 12 | access` in 16 bits, the way Linux's `GDT_ENTRY`
//! macro takes them.

use kvm_bindings::kvm_segment;

/// Flat 64-bit code: present, ring 0, execute/read, accessed (0x9b); long mode (L), 4 KiB
/// granularity.
pub const CODE64: u16 = 0xa09b;
/// Flat 32-bit code: as [`CODE64`] with a 32-bit default size (D) instead of L.
pub const CODE32: u16 = 0xc09b;
/// Flat data: present, ring 0, read/write, accessed (0x93); 32-bit, 4 KiB granularity.
pub const DATA: u16 = 0xc093;
/// A 64-bit TSS, busy (type 0xb), present.
pub const TSS: u16 = 0x808b;

/// A GDT entry with `flags` (access byte and flags as above), `base` and `limit`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment register contents a load of GDT entry `index` (holding `entry`) produces.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |shift: u32| u8::from(entry >> shift & 1 == 1);
    // Every field is masked to its width, so the conversions cannot fail.
    let field = |shift: u32, mask: u64| u8::try_from((entry >> shift) & mask).unwrap_or(0);
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)).unwrap_or(0);
    let g = bit(55);
    // With 4 KiB granularity the limit counts pages, and the low 12 bits read as ones.
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: field(40, 0xf),
        present: bit(47),
        dpl: field(45, 0x3),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm() {
        // The values Linux's boot GDT holds for flat 64-bit code and data.
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0, 0, 0), 0);
        // Base bits are split across the descriptor.
        assert_eq!(gdt_entry(0, 0x1234_5678, 0), 0x1200_0034_5678_0000);
    }

    #[test]
    fn segments_decode_every_field() {
        let code = kvm_segment_from_gdt(gdt_entry(CODE64, 0, 0xfffff), 1);
        assert_eq!((code.selector, code.type_, code.l, code.db), (8, 0xb, 1, 0));
        assert_eq!((code.present, code.s, code.g, code.dpl), (1, 1, 1, 0));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = kvm_segment_from_gdt(gdt_entry(DATA, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.l, data.db), (16, 3, 0, 1));
        let tss = kvm_segment_from_gdt(gdt_entry(TSS, 0x1000, 0x67), 3);
        // TSS flags have G set: the limit counts 4 KiB pages.
        assert_eq!((tss.base, tss.limit, tss.g, tss.s), (0x1000, 0x67fff, 1, 0));
        let bytes = kvm_segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((bytes.limit, bytes.g), (0x67, 0));
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
