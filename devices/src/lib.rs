//! Devices the guest sees, and the contexts (event loops) that run them.
