//! x86_64 machine set-up: memory layout, boot protocols, ACPI, and per-vCPU state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod msr;
pub mod regs;
pub mod topology;
