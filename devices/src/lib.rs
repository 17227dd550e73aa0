//! Devices the guest sees, and the contexts (event loops) that run them.

pub mod bus;
pub mod context;
pub mod legacy;
pub mod pci;
pub mod virtio;

/// An error and its causes on one line, for the log.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}
