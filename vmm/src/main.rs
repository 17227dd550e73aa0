//! The `vmm` binary.

// Wired into the VM by the VM assembly; until then nothing in main uses it.
#[allow(dead_code, unused_imports)]
mod monitor;

fn main() {}
