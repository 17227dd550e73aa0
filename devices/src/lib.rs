//! Devices the guest sees, and the contexts (event loops) that run them.

pub mod bus;
pub mod context;
pub mod legacy;
pub mod virtio;
