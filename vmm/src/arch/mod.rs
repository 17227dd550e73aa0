//! Architecture-specific machine set-up (x86_64 only).

pub mod x86_64;
