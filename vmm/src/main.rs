//! The `vmm` binary.

fn main() {}
