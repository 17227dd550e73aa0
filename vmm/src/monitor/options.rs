//! The `-qmp` flag: `unix:PATH[,server=on][,wait=off]` and `tcp:HOST:PORT[,server=on][,wait=off]`,
//! with QEMU's meaning for each part (QEMU's `-chardev socket` options, see `qemu-options.hx`),
//! read through the VMM's one option-string parser ([`crate::options`]).
//!
//! As in QEMU, `server` defaults to off (connect out to a client) and, with `server=on`, `wait`
//! defaults to on (hold start-up until the first client connects). This monitor only listens, so a
//! missing `server=on` is an error that says so rather than a silent change of meaning. A literal
//! comma in a path is written `,,`.

use std::path::PathBuf;

use crate::options::{OptionError, Options};

/// Where the monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAddress {
    /// A unix socket at this path (an old socket left there is replaced, as QEMU does).
    Unix(PathBuf),
    /// A TCP socket; an empty host means every local address, as in QEMU.
    Tcp {
        /// Host name or address, without IPv6 brackets.
        host: String,
        /// Port number.
        port: u16,
    },
}

/// A parsed `-qmp` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpOptions {
    /// Where to listen.
    pub address: QmpAddress,
    /// Whether start-up waits for the first client (`wait=on`, QEMU's default with `server=on`).
    pub wait: bool,
}

/// Errors in a `-qmp` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QmpOptionError {
    /// The option string itself (unknown key, repeated key, bad boolean).
    #[error("Invalid -qmp")]
    Option(#[source] OptionError),
    /// The backend is neither `unix:` nor `tcp:`.
    #[error("-qmp {0}: unsupported backend, expected unix:PATH or tcp:HOST:PORT")]
    UnsupportedBackend(String),
    /// `unix:` with nothing after it.
    #[error("-qmp unix: the socket path is empty")]
    EmptyPath,
    /// A `tcp:` address with no `:PORT`.
    #[error("-qmp tcp:{0}: missing port, expected tcp:HOST:PORT")]
    MissingPort(String),
    /// A port that is not a number from 0 to 65535.
    #[error("-qmp: invalid port '{0}'")]
    InvalidPort(String),
    /// `server=off`, explicit or by default: the monitor does not connect out.
    #[error("-qmp: connecting out to a client is not supported, add server=on")]
    ClientMode,
}

impl From<OptionError> for QmpOptionError {
    fn from(e: OptionError) -> Self {
        Self::Option(e)
    }
}

/// Parses the address part after `tcp:`: `HOST:PORT`, `:PORT` or `[IPV6]:PORT`.
fn parse_tcp(rest: &str) -> Result<QmpAddress, QmpOptionError> {
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| QmpOptionError::MissingPort(rest.to_owned()))?;
    if port.is_empty() {
        return Err(QmpOptionError::MissingPort(rest.to_owned()));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| QmpOptionError::InvalidPort(port.to_owned()))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok(QmpAddress::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// Parses a `-qmp` value; the CLI calls this for the `-qmp` flag.
pub fn parse_qmp_option(value: &str) -> Result<QmpOptions, QmpOptionError> {
    let opts = Options::parse(value, Some("backend"), &["backend", "server", "wait"])?;
    let backend: String = opts.get("backend")?.unwrap_or_default();
    let address = if let Some(path) = backend.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(QmpOptionError::EmptyPath);
        }
        QmpAddress::Unix(PathBuf::from(path))
    } else if let Some(addr) = backend.strip_prefix("tcp:") {
        parse_tcp(addr)?
    } else {
        return Err(QmpOptionError::UnsupportedBackend(backend));
    };
    if opts.get::<bool>("server")? != Some(true) {
        return Err(QmpOptionError::ClientMode);
    }
    Ok(QmpOptions {
        address,
        wait: opts.get::<bool>("wait")?.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_socket_with_server_and_nowait() {
        let o = parse_qmp_option("unix:/tmp/vmm.sock,server=on,wait=off").expect("valid");
        assert_eq!(o.address, QmpAddress::Unix(PathBuf::from("/tmp/vmm.sock")));
        assert!(!o.wait);
    }

    #[test]
    fn wait_defaults_to_on_like_qemu() {
        let o = parse_qmp_option("unix:/tmp/s,server=on").expect("valid");
        assert!(o.wait);
    }

    #[test]
    fn escaped_commas() {
        let o = parse_qmp_option("unix:/tmp/a,,b,server=on,wait=off").expect("valid");
        assert_eq!(o.address, QmpAddress::Unix(PathBuf::from("/tmp/a,b")));
    }

    #[test]
    fn tcp_forms() {
        let o = parse_qmp_option("tcp:127.0.0.1:4444,server=on,wait=off").expect("valid");
        assert_eq!(
            o.address,
            QmpAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        let o = parse_qmp_option("tcp::4444,server=yes,wait=no").expect("valid");
        assert_eq!(
            o.address,
            QmpAddress::Tcp {
                host: String::new(),
                port: 4444
            }
        );
        let o = parse_qmp_option("tcp:[::1]:5555,server=on,wait=off").expect("valid");
        assert_eq!(
            o.address,
            QmpAddress::Tcp {
                host: "::1".into(),
                port: 5555
            }
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = |s: &str| parse_qmp_option(s).expect_err(s);
        assert!(matches!(e("stdio"), QmpOptionError::UnsupportedBackend(b) if b == "stdio"));
        assert!(matches!(e("server=on"), QmpOptionError::UnsupportedBackend(b) if b.is_empty()));
        assert!(matches!(e("unix:,server=on"), QmpOptionError::EmptyPath));
        assert!(matches!(
            e("tcp:localhost,server=on"),
            QmpOptionError::MissingPort(_)
        ));
        assert!(matches!(
            e("tcp:localhost:,server=on"),
            QmpOptionError::MissingPort(_)
        ));
        assert!(
            matches!(e("tcp:h:70000,server=on"), QmpOptionError::InvalidPort(p) if p == "70000")
        );
        assert!(matches!(
            e("tcp:h:http,server=on"),
            QmpOptionError::InvalidPort(_)
        ));
        assert!(matches!(
            e("unix:/s,server=on,ipv4=on"),
            QmpOptionError::Option(OptionError::UnknownKey { key, .. }) if key == "ipv4"
        ));
        assert!(matches!(
            e("unix:/s,server=on,nowait"),
            QmpOptionError::Option(OptionError::NotKeyValue { .. })
        ));
        assert!(matches!(
            e("unix:/s,server=maybe"),
            QmpOptionError::Option(OptionError::BadValue { key, .. }) if key == "server"
        ));
        assert!(matches!(
            e("unix:/s,server=on,server=on"),
            QmpOptionError::Option(OptionError::Duplicate { key }) if key == "server"
        ));
        assert!(matches!(e("unix:/s"), QmpOptionError::ClientMode));
        assert!(matches!(
            e("unix:/s,server=off"),
            QmpOptionError::ClientMode
        ));
    }

    #[test]
    fn messages_carry_their_fields() {
        let msg = parse_qmp_option("tcp:h:99999,server=on")
            .expect_err("bad port")
            .to_string();
        assert_eq!(msg, "-qmp: invalid port '99999'");
    }
}
