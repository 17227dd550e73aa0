//! `qom-list`, `qom-get` and `qom-set` on the iothreads, the only objects this VMM has in QEMU's
//! object tree: `/objects/ID` (a trailing `/` allowed) for `-object iothread,id=ID`, with QEMU's
//! properties `type` (read-only, "iothread") and the polling settings `poll-max-ns`,
//! `poll-grow`, `poll-shrink` and `aio-max-batch` (QOM `int`: 0 to 2^63-1). A set reaches the
//! iothread at once (it wakes and restarts its polling window). Errors are QEMU 10's, class and
//! text: a path that names no iothread is `DeviceNotFound`; an unknown property, a value of the
//! wrong type or out of range, and a write to `type` are `GenericError`s. Other paths of
//! QEMU's tree (`/machine`, partial paths) name nothing here.

use devices::context::PollSetting;
use serde_json::{json, Value};

use super::args::Args;
use super::backend::{IoThreadInfo, MonitorBackend};
use super::protocol::QmpError;

/// The one property that is not a polling setting.
const TYPE: &str = "type";

/// Runs `qom-list`, `qom-get` or `qom-set`.
pub fn execute(
    command: &str,
    mut args: Args,
    backend: &mut dyn MonitorBackend,
) -> Result<Value, QmpError> {
    let path = args.required_str("path")?;
    if command == "qom-list" {
        args.finish()?;
        find(backend, &path)?;
        let mut props = vec![json!({"name": TYPE, "type": "string"})];
        props.extend(PollSetting::ALL.map(|s| json!({"name": s.name(), "type": "int"})));
        return Ok(Value::Array(props));
    }
    let property = args.required_str("property")?;
    let value = if command == "qom-set" {
        Some(args.required_value("value")?)
    } else {
        None
    };
    args.finish()?;
    let info = find(backend, &path)?;
    let setting = match (property.as_str(), PollSetting::from_name(&property)) {
        (_, Some(setting)) => setting,
        (TYPE, None) if value.is_none() => return Ok(json!("iothread")),
        (TYPE, None) => {
            return Err(QmpError::generic(format!(
                "Property 'iothread.{TYPE}' is not writable"
            )))
        }
        (_, None) => {
            return Err(QmpError::generic(format!(
                "Property 'iothread.{property}' not found"
            )))
        }
    };
    let Some(value) = value else {
        return Ok(json!(info.poll.get(setting)));
    };
    let name = setting.name();
    // QOM `int`: any JSON integer that fits in 64 signed bits, then the iothread's own range.
    let n = match &value {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .ok_or_else(|| {
        QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: integer"
        ))
    })?;
    let n = u64::try_from(n).map_err(|_| {
        QmpError::generic(format!("{name} value must be in range [0, {}]", i64::MAX))
    })?;
    backend
        .set_iothread_poll(&info.id, setting, n)
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

/// The iothread at `path`.
fn find(backend: &dyn MonitorBackend, path: &str) -> Result<IoThreadInfo, QmpError> {
    let id = path
        .strip_prefix("/objects/")
        .map(|id| id.strip_suffix('/').unwrap_or(id));
    id.and_then(|id| backend.iothreads().into_iter().find(|t| t.id == id))
        .ok_or_else(|| QmpError::device_not_found(path))
}
