//! QMP messages on the wire, after QEMU's `docs/interop/qmp-spec.rst`: the greeting, success and
//! error replies (with the request's `id` echoed), events with their timestamp, the check QEMU makes
//! on a request object before it looks up the command (`qapi/qmp-dispatch.c`), and the encoding:
//! QEMU's spacing (`", "`, `": "`) and `\r\n` after every message, as its monitor writes them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Map, Value};

/// QMP error classes (QEMU's `qapi/error.json`), the ones this monitor sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Every error without a class of its own.
    GenericError,
    /// An unknown command, or a command outside the current mode.
    CommandNotFound,
    /// A device named in the arguments does not exist.
    DeviceNotFound,
    /// No block job with the id given.
    DeviceNotActive,
}

/// An error reply: a class and a human-readable description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QmpError {
    /// The class clients match on.
    pub class: ErrorClass,
    /// The description, in QEMU's wording where QEMU has one.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound` error for a device id, in QEMU's words.
    pub fn device_not_found(id: &str) -> Self {
        Self {
            class: ErrorClass::DeviceNotFound,
            desc: format!("Device '{id}' not found"),
        }
    }
}

/// A request that passed QEMU's envelope check.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// The command name (`execute`).
    pub command: String,
    /// The arguments; an absent `arguments` member is an empty object.
    pub arguments: Map<String, Value>,
    /// The `id` member, any JSON value, echoed in the reply.
    pub id: Option<Value>,
}

/// A request that failed the envelope check, with the `id` to echo if the input had one.
#[derive(Debug, PartialEq)]
pub struct Rejected {
    /// The error to reply with.
    pub error: QmpError,
    /// The request's `id`, when the input was an object that had one.
    pub id: Option<Value>,
}

/// Checks a parsed request object the way `qmp_dispatch_check_obj` does. Out-of-band execution is
/// not offered, so `exec-oob` is an unexpected member, as in QEMU without the `oob` capability.
pub fn check_request(value: Value) -> Result<Request, Rejected> {
    let Value::Object(mut obj) = value else {
        return Err(Rejected {
            error: QmpError::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = obj.remove("id");
    let reject = |desc: String, id: Option<Value>| Rejected {
        error: QmpError::generic(desc),
        id,
    };
    let mut command = None;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match (key.as_str(), value) {
            ("execute", Value::String(name)) => command = Some(name),
            ("execute", _) => {
                return Err(reject(
                    "QMP input member 'execute' must be a string".into(),
                    id,
                ))
            }
            ("arguments", Value::Object(args)) => arguments = args,
            ("arguments", _) => {
                return Err(reject(
                    "QMP input member 'arguments' must be an object".into(),
                    id,
                ))
            }
            (other, _) => {
                return Err(reject(
                    format!("QMP input member '{other}' is unexpected"),
                    id,
                ))
            }
        }
    }
    match command {
        Some(command) => Ok(Request {
            command,
            arguments,
            id,
        }),
        None => Err(reject("QMP input lacks member 'execute'".into(), id)),
    }
}

/// `{"return": ...}` with the request's `id`.
pub fn success(ret: Value, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    reply.insert("return".into(), ret);
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// `{"error": {"class": ..., "desc": ...}}` with the request's `id`.
pub fn failure(error: &QmpError, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    reply.insert(
        "error".into(),
        json!({"class": error.class, "desc": error.desc}),
    );
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// The version this monitor reports, in QEMU's `VersionInfo` shape: the `qemu` triple carries this
/// VMM's own version (clients such as `qmp-shell` print it), `package` names the VMM.
pub fn version_info() -> Value {
    let part = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": part(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": part(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": part(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")),
    })
}

/// The greeting sent on connection. No capability is offered (`oob` needs a dedicated I/O thread).
pub fn greeting() -> Value {
    json!({"QMP": {"version": version_info(), "capabilities": []}})
}

/// An event with QEMU's timestamp shape (wall-clock seconds and microseconds, `qmp-event.c`).
pub fn event(name: &str, data: Option<Value>, at: SystemTime) -> Value {
    // A clock before 1970 is reported as the epoch, as QEMU's g_get_real_time() would wrap.
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut msg = Map::new();
    msg.insert("event".into(), Value::String(name.into()));
    if let Some(data) = data {
        msg.insert("data".into(), data);
    }
    msg.insert(
        "timestamp".into(),
        json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
    );
    Value::Object(msg)
}

/// serde_json formatting with QEMU's separators.
struct QemuFormatter;

/// `", "` before every element or member but the first.
fn separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Appends one message, as QEMU's monitor writes it, to an output buffer.
pub fn encode_into(value: &Value, out: &mut Vec<u8>) {
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, QemuFormatter);
    // Serializing a Value into a Vec cannot fail: every map key is a string and writes to a Vec
    // always succeed; if it ever did, the reply would be missing and the client would time out.
    if value.serialize(&mut ser).is_err() {
        log::error!("monitor: failed to encode a reply");
        return;
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn encode(value: &Value) -> String {
        let mut out = Vec::new();
        encode_into(value, &mut out);
        String::from_utf8(out).expect("JSON is UTF-8")
    }

    #[test]
    fn encoding_uses_qemu_spacing_and_crlf() {
        assert_eq!(
            encode(&success(json!({}), Some(json!("x")))),
            "{\"return\": {}, \"id\": \"x\"}\r\n"
        );
        assert_eq!(encode(&json!([1, 2])), "[1, 2]\r\n");
    }

    #[test]
    fn greeting_has_qemu_shape() {
        let g = greeting();
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
        assert!(g["QMP"]["version"]["qemu"]["minor"].is_u64());
        assert!(g["QMP"]["version"]["qemu"]["micro"].is_u64());
        assert_eq!(g["QMP"]["version"]["package"], json!("vmm 0.1.0"));
        assert_eq!(g["QMP"]["capabilities"], json!([]));
    }

    #[test]
    fn error_reply_shape() {
        let e = QmpError::command_not_found("The command x has not been found");
        assert_eq!(
            failure(&e, Some(json!(7))),
            json!({"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": 7})
        );
        assert_eq!(
            failure(&QmpError::device_not_found("vd9"), None),
            json!({"error": {"class": "DeviceNotFound", "desc": "Device 'vd9' not found"}})
        );
    }

    #[test]
    fn event_timestamp_shape() {
        let at = UNIX_EPOCH + Duration::new(1_267_020_223, 435_656_789);
        assert_eq!(
            event("STOP", None, at),
            json!({"event": "STOP", "timestamp": {"seconds": 1_267_020_223u64, "microseconds": 435_656}})
        );
        let e = event("SHUTDOWN", Some(json!({"guest": true})), at);
        assert_eq!(e["data"], json!({"guest": true}));
    }

    fn rejected(v: Value) -> Rejected {
        check_request(v).expect_err("must be rejected")
    }

    #[test]
    fn envelope_checks_match_qemu() {
        let r = rejected(json!([1]));
        assert_eq!(r.error.desc, "QMP input must be a JSON object");
        assert_eq!(r.id, None);
        let r = rejected(json!({"id": 3}));
        assert_eq!(r.error.desc, "QMP input lacks member 'execute'");
        assert_eq!(r.id, Some(json!(3)));
        let r = rejected(json!({"execute": 1, "id": "a"}));
        assert_eq!(r.error.desc, "QMP input member 'execute' must be a string");
        assert_eq!(r.id, Some(json!("a")));
        let r = rejected(json!({"execute": "stop", "arguments": []}));
        assert_eq!(
            r.error.desc,
            "QMP input member 'arguments' must be an object"
        );
        let r = rejected(json!({"exec-oob": "stop"}));
        assert_eq!(r.error.desc, "QMP input member 'exec-oob' is unexpected");
        assert!(matches!(r.error.class, ErrorClass::GenericError));
    }

    #[test]
    fn envelope_accepts_any_id() {
        let r = check_request(json!({"execute": "stop", "id": {"n": [1]}})).expect("valid");
        assert_eq!(r.command, "stop");
        assert!(r.arguments.is_empty());
        assert_eq!(r.id, Some(json!({"n": [1]})));
    }
}
