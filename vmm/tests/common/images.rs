//! Tiny guests for the local `/dev/kvm`, and the kernel images that carry them.
//!
//! Each guest is a few instructions, kept here as bytes with their assembly (GNU `as` syntax) in
//! the comments; the data that follows the code is written as a byte string. The images are made
//! the way a real kernel is packaged, so the VMM's own boot code is what sets the guest up:
//! - [`bzimage`] wraps 64-bit code in a minimal bzImage (boot protocol 2.15, `XLF_KERNEL_64`),
//!   entered at `startup_64` (load address + 0x200) in long mode with the zero page in `%rsi`;
//! - [`pvh_elf`] wraps 32-bit code in a minimal ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note,
//!   entered in protected mode with `hvm_start_info` in `%ebx`.

#![allow(dead_code)]

/// 64-bit: reports the vCPU count from CPUID and whether the zero page points at the RSDP, then
/// resets through the i8042.
pub fn long_mode_reset_guest() -> Vec<u8> {
    let mut code = vec![
        0xb8, 0x01, 0x00, 0x00, 0x00, //       mov $1, %eax
        0x0f, 0xa2, //                         cpuid              # EBX[23:16]: vCPUs
        0xc1, 0xeb, 0x10, //                   shr $16, %ebx
        0x81, 0xe3, 0xff, 0x00, 0x00, 0x00, // and $0xff, %ebx
        0x80, 0xc3, 0x30, //                   add $'0', %bl
        0x88, 0x1d, 0x4c, 0x00, 0x00, 0x00, // mov %bl, count(%rip)
        0x48, 0x8b, 0x7e,
        0x70, //             mov 0x70(%rsi), %rdi  # boot_params.acpi_rsdp_addr
        0x48, 0xb8, 0x52, 0x53, 0x44, 0x20, // movabs $"RSD PTR ", %rax
        0x50, 0x54, 0x52, 0x20, //
        0x48, 0x39, 0x07, //                   cmp %rax, (%rdi)
        0x75, 0x07, //                         jne 1f
        0xc6, 0x05, 0x3b, 0x00, 0x00, 0x00, // movb $'y', rsdp(%rip)
        0x79, //
        0x48, 0x8d, 0x35, 0x13, 0x00, 0x00, // 1: lea msg(%rip), %rsi
        0x00, //
        0x66, 0xba, 0xf8, 0x03, //             mov $0x3f8, %dx    # COM1
        0xac, //                               next: lodsb
        0x84, 0xc0, //                         test %al, %al
        0x74, 0x03, //                         jz done
        0xee, //                               out %al, %dx
        0xeb, 0xf8, //                         jmp next
        0xb0, 0xfe, //                         done: mov $0xfe, %al
        0xe6, 0x64, //                         out %al, $0x64     # i8042: pulse reset
        0xf4, //                               hlt
        0xeb, 0xf9, //                         jmp done
    ];
    // msg, count, rsdp
    code.extend_from_slice(b"long mode guest, vCPUs: ?, RSDP: n\n\0");
    code
}

/// 64-bit: says it is spinning, then spins until the VMM stops it.
pub fn spin_guest() -> Vec<u8> {
    let mut code = vec![
        0x48, 0x8d, 0x35, 0x10, 0x00, 0x00, // lea msg(%rip), %rsi
        0x00, //
        0x66, 0xba, 0xf8, 0x03, //             mov $0x3f8, %dx
        0xac, //                               next: lodsb
        0x84, 0xc0, //                         test %al, %al
        0x74, 0x03, //                         jz spin
        0xee, //                               out %al, %dx
        0xeb, 0xf8, //                         jmp next
        0xf3, 0x90, //                         spin: pause
        0xeb, 0xfc, //                         jmp spin
    ];
    code.extend_from_slice(b"spinning\n\0"); // msg
    code
}

/// 64-bit: `fxsave` to an address with no RAM behind it (32 MiB, in a 16 MiB guest), an MMIO
/// access that KVM's instruction emulator does not handle on this kind of host: a KVM emulation
/// failure. The reset after it only runs if the emulation unexpectedly succeeds.
pub fn emulation_failure_guest() -> Vec<u8> {
    vec![
        0x0f, 0x20, 0xe0, //                   mov %cr4, %rax
        0x48, 0x0d, 0x00, 0x06, 0x00, 0x00, // or $0x600, %rax   # OSFXSR, OSXMMEXCPT
        0x0f, 0x22, 0xe0, //                   mov %rax, %cr4
        0xb8, 0x00, 0x00, 0x00, 0x02, //       mov $0x2000000, %eax
        0x0f, 0xae, 0x00, //                   fxsave (%rax)
        0xb0, 0xfe, //                         mov $0xfe, %al
        0xe6, 0x64, //                         out %al, $0x64
        0xf4, //                               hlt
    ]
}

/// 64-bit: loads an empty IDT and executes `ud2`: the #UD cannot be delivered, nor the #GP and
/// the #DF that follow, so the vCPU triple-faults (`KVM_EXIT_SHUTDOWN`).
pub fn triple_fault_guest() -> Vec<u8> {
    let mut code = vec![
        0x0f, 0x01, 0x1d, 0x02, 0x00, 0x00, // lidt idt(%rip)
        0x00, //
        0x0f, 0x0b, //                         ud2
    ];
    code.extend_from_slice(&[0; 10]); // idt: limit 0, base 0
    code
}

/// 64-bit: counts, forever, in the quadword at 0x8000 (below the boot stack, otherwise unused).
pub fn counter_guest() -> Vec<u8> {
    vec![
        0xf0, 0x48, 0xff, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, // 1: lock incq 0x8000
        0xeb, 0xf5, //                                           jmp 1b
    ]
}

/// 64-bit: echoes what arrives on COM1 (polling the line status register) until it reads `q`,
/// then powers off.
pub fn echo_guest() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xfd, 0x03, // mov $0x3fd, %dx       # line status register
        0xec, //                   1: in %dx, %al
        0xa8, 0x01, //             test $1, %al          # data ready
        0x74, 0xfb, //             jz 1b
        0x66, 0xba, 0xf8, 0x03, // mov $0x3f8, %dx
        0xec, //                   in %dx, %al           # receive buffer
        0x3c, 0x71, //             cmp $'q', %al
        0x74, 0x07, //             je 2f
        0xee, //                   out %al, %dx          # echo
        0x66, 0xba, 0xfd, 0x03, // mov $0x3fd, %dx
        0xeb, 0xeb, //             jmp 1b
        0x66, 0xba, 0x00, 0x06, // 2: mov $0x600, %dx    # ACPI sleep control
        0xb0, 0x34, //             mov $(5 << 2 | 1 << 5), %al
        0xee, //                   out %al, %dx
        0xf4, //                   hlt
    ]
}

/// 32-bit PVH: polls the Generic Event Device's event selector (0xFEA00000, below 4 GiB and
/// paging off) until an event arrives, then powers off if it is the power button (bit 1).
pub fn power_button_guest() -> Vec<u8> {
    vec![
        0xa1, 0x00, 0x00, 0xa0, 0xfe, // 1: mov 0xfea00000, %eax
        0x85, 0xc0, //                   test %eax, %eax
        0x74, 0xf7, //                   jz 1b
        0x83, 0xf8, 0x02, //             cmp $2, %eax
        0x75, 0x07, //                   jne 2f
        0x66, 0xba, 0x00, 0x06, //       mov $0x600, %dx  # ACPI sleep control
        0xb0, 0x34, //                   mov $(5 << 2 | 1 << 5), %al
        0xee, //                         out %al, %dx
        0xf4, //                         2: hlt
        0xeb, 0xfd, //                   jmp 2b
    ]
}

/// 32-bit PVH (paging off, so the ECAM window is reachable as is): reads the first dword of
/// 00:01.0's configuration space through ECAM (0xE0008000), probes BAR 0's size (writes all ones
/// at 0xE0008010 and reads it back), reads the same first dword through the 0xCF8/0xCFC ports,
/// then puts BAR 0 in the 32-bit window (0xC0008000, both halves: the VMM placed it above 4 GiB,
/// out of this guest's reach), turns memory decoding on, moves the BAR to 0xC0100000 and
/// reads the virtio common configuration's `num_queues` (offset 0x12, 16 bits) at its new place and
/// at its old one; writes each of the five values to COM1 as four raw bytes, low first, then
/// powers off.
pub fn pci_probe_guest() -> Vec<u8> {
    // mov $0x3f8, %dx; mov $4, %ecx; 1: out %al, %dx; shr $8, %eax; loop 1b
    let out4 = [
        0x66, 0xba, 0xf8, 0x03, 0xb9, 0x04, 0x00, 0x00, 0x00, 0xee, 0xc1, 0xe8, 0x08, 0xe2, 0xfa,
    ];
    let mut code = vec![0xa1, 0x00, 0x80, 0x00, 0xe0]; // mov 0xe0008000, %eax
    code.extend(out4);
    code.extend([
        0xc7, 0x05, 0x10, 0x80, 0x00, 0xe0, // movl $0xffffffff, 0xe0008010
        0xff, 0xff, 0xff, 0xff, //
        0xa1, 0x10, 0x80, 0x00, 0xe0, // mov 0xe0008010, %eax
    ]);
    code.extend(out4);
    code.extend([
        0x66, 0xba, 0xf8, 0x0c, //       mov $0xcf8, %dx
        0xb8, 0x00, 0x08, 0x00, 0x80, // mov $0x80000800, %eax  # enable, 00:01.0, register 0
        0xef, //                         out %eax, %dx
        0x66, 0xba, 0xfc, 0x0c, //       mov $0xcfc, %dx
        0xed, //                         in %dx, %eax
    ]);
    code.extend(out4);
    code.extend([
        0xc7, 0x05, 0x10, 0x80, 0x00, 0xe0, // movl $0xc0008000, 0xe0008010  # BAR 0 into the
        0x00, 0x80, 0x00, 0xc0, //                                            32-bit window,
        0xc7, 0x05, 0x14, 0x80, 0x00, 0xe0, // movl $0, 0xe0008014           # both halves
        0x00, 0x00, 0x00, 0x00, //
        0x66, 0xc7, 0x05, 0x04, 0x80, 0x00, 0xe0, // movw $2, 0xe0008004  # memory decoding on
        0x02, 0x00, //
        0xc7, 0x05, 0x10, 0x80, 0x00, 0xe0, // movl $0xc0100000, 0xe0008010  # moved
        0x00, 0x00, 0x10, 0xc0, //
        0x0f, 0xb7, 0x05, 0x12, 0x00, 0x10, 0xc0, // movzwl 0xc0100012, %eax
    ]);
    code.extend(out4);
    code.extend([0x0f, 0xb7, 0x05, 0x12, 0x80, 0x00, 0xc0]); // movzwl 0xc0008012, %eax
    code.extend(out4);
    code.extend([
        0x66, 0xba, 0x00, 0x06, // mov $0x600, %dx  # ACPI sleep control
        0xb0, 0x34, //             mov $(5 << 2 | 1 << 5), %al
        0xee, //                   out %al, %dx
        0xf4, //                   1: hlt
        0xeb, 0xfd, //             jmp 1b
    ]);
    code
}

/// 32-bit PVH: goes back to real mode and jumps to the reset vector (F000:FFF0), as Linux's
/// `machine_real_restart` does when it reboots through the BIOS.
pub fn real_mode_reboot_guest() -> Vec<u8> {
    let mut code = vec![
        0x0f, 0x01, 0x15, 0x40, 0x00, 0x10, 0x00, // lgdt gdtr
        0xea, 0x0e, 0x00, 0x00, 0x00, 0x08, 0x00, // ljmp $0x08, $(pm16 - start)
        // .code16
        0xb8, 0x10, 0x00, //                         pm16: mov $0x10, %ax
        0x8e, 0xd8, //                               mov %ax, %ds
        0x0f, 0x20, 0xc0, //                         mov %cr0, %eax
        0x66, 0x83, 0xe0, 0xfe, //                   and $~1, %eax   # clear PE
        0x0f, 0x22, 0xc0, //                         mov %eax, %cr0
        0xea, 0xf0, 0xff, 0x00, 0xf0, //             ljmp $0xf000, $0xfff0
    ];
    code.resize(0x28, 0x90); // .align 8, then gdt:
    for descriptor in [
        0u64,                  //                null
        0x0000_9b10_0000_ffff, // 16-bit code, base 0x100000 (this code), limit 64 KiB
        0x0000_9300_0000_ffff, // 16-bit data, base 0
    ] {
        code.extend_from_slice(&descriptor.to_le_bytes());
    }
    // gdtr: limit 23, base 0x100028
    code.extend_from_slice(&[0x17, 0x00, 0x28, 0x00, 0x10, 0x00]);
    code
}

/// 32-bit PVH: checks the `hvm_start_info` magic at `%ebx`, reports it, then powers off through
/// the ACPI sleep control register (SLP_TYP 5, SLP_EN). The `!` it writes after the power-off
/// must never appear: the VMM stops the vCPU at the power-off write.
pub fn pvh_poweroff_guest() -> Vec<u8> {
    let mut code = vec![
        0xbe, 0x31, 0x00, 0x10, 0x00, //       mov $msg, %esi
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmpl $0x336ec578, (%ebx)
        0x74, 0x07, //                         je 1f
        0xc6, 0x05, 0x48, 0x00, 0x10, 0x00, // movb $'n', ok
        0x6e, //
        0x66, 0xba, 0xf8, 0x03, //             1: mov $0x3f8, %dx
        0xac, //                               next: lodsb
        0x84, 0xc0, //                         test %al, %al
        0x74, 0x03, //                         jz done
        0xee, //                               out %al, %dx
        0xeb, 0xf8, //                         jmp next
        0x66, 0xba, 0x00, 0x06, //             done: mov $0x600, %dx  # ACPI sleep control
        0xb0, 0x34, //                         mov $(5 << 2 | 1 << 5), %al
        0xee, //                               out %al, %dx
        0x66, 0xba, 0xf8, 0x03, //             mov $0x3f8, %dx
        0xb0, 0x21, //                         mov $'!', %al
        0xee, //                               out %al, %dx
        0xf4, //                               hlt
        0xeb, 0xef, //                         jmp done
    ];
    code.extend_from_slice(b"PVH guest, start info: y\n\0"); // msg, ok
    code
}

/// A bzImage whose protected-mode part is 0x200 bytes of padding then `code`, so `code` runs at
/// the 64-bit entry; `version` and `xloadflags` go in the setup header.
pub fn bzimage_with(code: &[u8], version: u16, xloadflags: u16) -> Vec<u8> {
    let mut setup = vec![0u8; 1024];
    setup[0x1f1] = 1; // setup_sects: one sector after the boot sector
    setup[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    setup[0x202..0x206].copy_from_slice(b"HdrS"); // header
    setup[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    setup[0x211] = 1; // loadflags: LOADED_HIGH
    setup[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    setup[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    setup[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    setup[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    setup[0x260..0x264].copy_from_slice(&0x1_0000u32.to_le_bytes()); // init_size
    let mut image = setup;
    image.extend_from_slice(&[0u8; 0x200]);
    image.extend_from_slice(code);
    image
}

/// A bzImage with the 64-bit entry (protocol 2.15, `XLF_KERNEL_64`).
pub fn bzimage(code: &[u8]) -> Vec<u8> {
    bzimage_with(code, 0x020f, 1)
}

/// An ELF64 executable loading `code` at 1 MiB, with a PVH entry note pointing at it when `note`.
pub fn pvh_elf(code: &[u8], note: bool) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    let phnum: u16 = if note { 2 } else { 1 };
    let mut elf = Vec::new();
    // ELF header (System V ABI, "ELF Header"): 64-bit, little-endian, executable, x86-64.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&phnum.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0u8; 6]); // e_shentsize, e_shnum, e_shstrndx
    let note_offset = 64 + 56 * u64::from(phnum);
    // Program headers: (type, offset, address, size).
    let mut phdrs = vec![(1u32, CODE_OFFSET, LOAD, code.len() as u64)]; // PT_LOAD
    if note {
        phdrs.push((4, note_offset, 0, 20)); // PT_NOTE
    }
    for (p_type, offset, addr, size) in phdrs {
        elf.extend_from_slice(&p_type.to_le_bytes());
        elf.extend_from_slice(&7u32.to_le_bytes()); // p_flags: RWX
        elf.extend_from_slice(&offset.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
        elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
        elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    }
    if note {
        // XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", the 32-bit entry address.
        elf.extend_from_slice(&4u32.to_le_bytes());
        elf.extend_from_slice(&4u32.to_le_bytes());
        elf.extend_from_slice(&18u32.to_le_bytes());
        elf.extend_from_slice(b"Xen\0");
        elf.extend_from_slice(&0x10_0000u32.to_le_bytes());
    }
    elf.resize(usize::try_from(CODE_OFFSET).expect("small"), 0);
    elf.extend_from_slice(code);
    elf
}
