//! The `-qmp` flag: `unix:PATH[,server=on][,wait=off]` and `tcp:HOST:PORT[,server=on][,wait=off]`,
//! with QEMU's meaning for each part (QEMU's `-chardev socket` options, see `qemu-options.hx`).
//!
//! As in QEMU, `server` defaults to off (connect out to a client) and, with `server=on`, `wait`
//! defaults to on (hold start-up until the first client connects). This monitor only listens, so a
//! missing `server=on` is an error that says so rather than a silent change of meaning. A literal
//! comma in a path is written `,,`, as in every QEMU option string. The habitual short forms `server`
//! and `nowait` are accepted, since QEMU still accepts them.

use std::path::PathBuf;

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
    /// An option this monitor does not know.
    #[error("-qmp: unsupported option '{0}'")]
    UnknownOption(String),
    /// A boolean option whose value is not on/off (or yes/no, true/false).
    #[error("-qmp: option '{key}' expects on or off, not '{value}'")]
    InvalidBool {
        /// The option's name.
        key: String,
        /// The value given.
        value: String,
    },
    /// The same option given twice.
    #[error("-qmp: option '{0}' given twice")]
    Duplicate(String),
    /// `server=off`, explicit or by default: the monitor does not connect out.
    #[error("-qmp: connecting out to a client is not supported, add server=on")]
    ClientMode,
}

/// Splits a QEMU option string at single commas; `,,` stands for a literal comma.
fn split_options(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            if let Some(last) = parts.last_mut() {
                last.push(c);
            }
        } else if chars.peek() == Some(&',') {
            chars.next();
            if let Some(last) = parts.last_mut() {
                last.push(',');
            }
        } else {
            parts.push(String::new());
        }
    }
    parts
}

/// QEMU's boolean spellings (`qapi_bool_parse`).
fn parse_bool(key: &str, value: &str) -> Result<bool, QmpOptionError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(QmpOptionError::InvalidBool {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
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

/// Parses a `-qmp` value; the CLI calls this once per `-qmp` flag.
pub fn parse_qmp_option(value: &str) -> Result<QmpOptions, QmpOptionError> {
    let parts = split_options(value);
    let (first, rest) = parts
        .split_first()
        .ok_or_else(|| QmpOptionError::UnsupportedBackend(value.to_owned()))?;
    let address = if let Some(path) = first.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(QmpOptionError::EmptyPath);
        }
        QmpAddress::Unix(PathBuf::from(path))
    } else if let Some(addr) = first.strip_prefix("tcp:") {
        parse_tcp(addr)?
    } else {
        return Err(QmpOptionError::UnsupportedBackend(first.clone()));
    };

    let mut server: Option<bool> = None;
    let mut wait: Option<bool> = None;
    for part in rest {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k, parse_bool(k, v)?),
            // Short forms QEMU still accepts: `server` and `nowait`.
            None if part == "server" => ("server", true),
            None if part == "nowait" => ("wait", false),
            None => return Err(QmpOptionError::UnknownOption(part.clone())),
        };
        let slot = match key {
            "server" => &mut server,
            "wait" => &mut wait,
            _ => return Err(QmpOptionError::UnknownOption(key.to_owned())),
        };
        if slot.replace(value).is_some() {
            return Err(QmpOptionError::Duplicate(key.to_owned()));
        }
    }
    if server != Some(true) {
        return Err(QmpOptionError::ClientMode);
    }
    Ok(QmpOptions {
        address,
        wait: wait.unwrap_or(true),
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
    fn short_forms_and_escaped_commas() {
        let o = parse_qmp_option("unix:/tmp/a,,b,server,nowait").expect("valid");
        assert_eq!(o.address, QmpAddress::Unix(PathBuf::from("/tmp/a,b")));
        assert!(!o.wait);
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
        assert!(
            matches!(e("unix:/s,server=on,ipv4=on"), QmpOptionError::UnknownOption(k) if k == "ipv4")
        );
        assert!(
            matches!(e("unix:/s,server=on,bogus"), QmpOptionError::UnknownOption(k) if k == "bogus")
        );
        assert!(matches!(
            e("unix:/s,server=maybe"),
            QmpOptionError::InvalidBool { key, value } if key == "server" && value == "maybe"
        ));
        assert!(
            matches!(e("unix:/s,server=on,server=on"), QmpOptionError::Duplicate(k) if k == "server")
        );
        assert!(
            matches!(e("unix:/s,server=on,wait=off,nowait"), QmpOptionError::Duplicate(k) if k == "wait")
        );
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
