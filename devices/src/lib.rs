//! Devices the guest sees, and the contexts (event loops) that run them.

pub mod bus;
pub mod legacy;
