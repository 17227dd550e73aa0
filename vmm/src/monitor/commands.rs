//! One client's QMP session without the socket: capabilities negotiation, then the commands, each
//! acting on the VM through [`MonitorBackend`]. Input is one framed JSON value (or the framer's
//! error); output is the reply plus the events the command caused, which go out before the reply:
//! that is the order QEMU 10's monitor shows for all four (`STOP`, `RESUME`, `POWERDOWN`, and
//! `SHUTDOWN` after `quit`).

use std::time::SystemTime;

use serde::Serialize;
use serde_json::{json, Value};

use super::args::Args;
use super::backend::{
    BlockDevice, HistogramBoundaries, HistogramChange, ImageDescription, MonitorBackend, RunState,
    SnapshotMode,
};
use super::events::{QmpEvent, ShutdownCause};
use super::framing::Frame;
use super::protocol::{self, QmpError};

/// The commands of command mode but the block jobs', as `query-commands` lists them.
pub const COMMANDS: [&str; 21] = [
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-name",
    "query-status",
    "stop",
    "cont",
    "system_powerdown",
    "quit",
    "query-iothreads",
    "query-block",
    "query-blockstats",
    "block-latency-histogram-set",
    "blockdev-snapshot-sync",
    "x-query-blockstats-stages",
    "x-block-stages-histogram-set",
    "block_resize",
    "query-named-block-nodes",
    "qom-list",
    "qom-get",
    "qom-set",
];

/// Every command of command mode: [`COMMANDS`], then the block jobs' (`jobs.rs`).
pub fn all_commands() -> impl Iterator<Item = &'static str> {
    COMMANDS.into_iter().chain(super::jobs::JOB_COMMANDS)
}

/// What handling one input produced.
#[derive(Debug)]
pub struct Outcome {
    /// Events for every client in command mode, sent before the reply.
    pub events: Vec<Value>,
    /// The reply for the requesting client.
    pub reply: Value,
}

impl Outcome {
    /// An error reply and no event.
    fn failed(error: &QmpError, id: Option<Value>) -> Self {
        Self {
            events: Vec::new(),
            reply: protocol::failure(error, id),
        }
    }
}

/// Protocol state of one connection.
#[derive(Debug, Default)]
pub struct Session {
    /// Left capabilities negotiation: commands run and events are delivered.
    negotiated: bool,
}

impl Session {
    /// Whether events go to this client (only in command mode, as in QEMU).
    pub fn receives_events(&self) -> bool {
        self.negotiated
    }

    /// Handles one unit of client input: a JSON value, or input the framer rejected (a
    /// `GenericError` with QEMU's text and no `id`).
    pub fn handle(&mut self, frame: Frame, backend: &mut dyn MonitorBackend) -> Outcome {
        let value = match frame {
            Frame::Value(value) => value,
            Frame::Error(e) => return Outcome::failed(&QmpError::generic(e.to_string()), None),
        };
        let request = match protocol::check_request(value) {
            Ok(r) => r,
            Err(rejected) => return Outcome::failed(&rejected.error, rejected.id),
        };
        let mut raised = Vec::new();
        let args = Args::new(request.arguments);
        let result = if !self.negotiated {
            if request.command == "qmp_capabilities" {
                negotiate(args).map(|()| {
                    self.negotiated = true;
                    json!({})
                })
            } else {
                Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            }
        } else {
            execute(&request.command, args, backend, &mut raised)
        };
        let now = SystemTime::now();
        Outcome {
            events: raised.into_iter().map(|e| e.to_message(now)).collect(),
            reply: match result {
                Ok(ret) => protocol::success(ret, request.id),
                Err(error) => protocol::failure(&error, request.id),
            },
        }
    }
}

/// `qmp_capabilities` in negotiation mode: no capability is offered, so `enable` may only be
/// empty.
fn negotiate(mut args: Args) -> Result<(), QmpError> {
    let enable = args.optional_str_list("enable")?.unwrap_or_default();
    args.finish()?;
    // QMPCapability has one value, `oob`; any other is refused by the argument check first.
    if let Some((i, cap)) = enable.iter().enumerate().find(|(_, c)| *c != "oob") {
        return Err(QmpError::generic(format!(
            "Parameter 'enable[{i}]' does not accept value '{cap}'"
        )));
    }
    if enable.is_empty() {
        Ok(())
    } else {
        Err(QmpError::generic("Capability 'oob' not available"))
    }
}

/// Serializes a reply value.
fn to_json<T: Serialize>(value: &T) -> Result<Value, QmpError> {
    serde_json::to_value(value).map_err(|e| QmpError::generic(format!("Cannot encode reply: {e}")))
}

/// Runs one command of command mode.
fn execute(
    command: &str,
    mut args: Args,
    backend: &mut dyn MonitorBackend,
    raised: &mut Vec<QmpEvent>,
) -> Result<Value, QmpError> {
    let backend_err = |e: super::backend::BackendError| QmpError::generic(e.0);
    match command {
        "qmp_capabilities" => {
            negotiate(args)?;
            Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ))
        }
        "query-commands" => {
            args.finish()?;
            Ok(Value::Array(
                all_commands().map(|name| json!({"name": name})).collect(),
            ))
        }
        "query-version" => {
            args.finish()?;
            Ok(protocol::version_info())
        }
        "query-name" => {
            args.finish()?;
            // QEMU leaves `name` out when the guest has none.
            Ok(match backend.guest_name() {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            })
        }
        "query-status" => {
            args.finish()?;
            let state = backend.run_state();
            Ok(json!({"running": state == RunState::Running, "status": state}))
        }
        "stop" => {
            args.finish()?;
            // As QEMU's vm_stop(): only a running VM stops and raises STOP.
            if backend.run_state() == RunState::Running {
                backend.pause().map_err(backend_err)?;
                raised.push(QmpEvent::Stop);
            }
            Ok(json!({}))
        }
        "cont" => {
            args.finish()?;
            match backend.run_state() {
                // A stop a disk asked for and that has not happened yet is cancelled, with the
                // STOP and RESUME it owes (QEMU's vm_prepare_start): BLOCK_IO_ERROR with
                // action stop is always followed by STOP.
                RunState::Running if backend.stop_requested() => {
                    backend.resume().map_err(backend_err)?;
                    raised.push(QmpEvent::Stop);
                    raised.push(QmpEvent::Resume);
                }
                RunState::Running => {}
                RunState::Shutdown => {
                    return Err(QmpError::generic(
                        "Resetting the Virtual Machine is required",
                    ))
                }
                RunState::Paused | RunState::Prelaunch | RunState::IoError => {
                    backend.resume().map_err(backend_err)?;
                    raised.push(QmpEvent::Resume);
                }
            }
            Ok(json!({}))
        }
        "system_powerdown" => {
            args.finish()?;
            backend.powerdown().map_err(backend_err)?;
            raised.push(QmpEvent::Powerdown);
            Ok(json!({}))
        }
        "quit" => {
            args.finish()?;
            backend.request_quit();
            raised.push(QmpEvent::Shutdown(ShutdownCause::HostQmpQuit));
            Ok(json!({}))
        }
        "query-iothreads" => {
            args.finish()?;
            to_json(&backend.iothreads())
        }
        "query-block" => {
            args.finish()?;
            Ok(Value::Array(
                backend.block_devices().iter().map(block_info).collect(),
            ))
        }
        "query-blockstats" => {
            let query_nodes = args.optional_bool("query-nodes")?;
            let with_stages = args.optional_bool("x-stages")?.unwrap_or(false);
            args.finish()?;
            if query_nodes == Some(true) {
                return Err(QmpError::generic(
                    "query-nodes is not supported: disks have no separate block nodes here",
                ));
            }
            backend
                .block_devices()
                .iter()
                .map(|dev| {
                    let stats = backend.block_stats(&dev.drive_id).map_err(backend_err)?;
                    let mut entry =
                        json!({"device": dev.drive_id, "qdev": dev.qdev, "stats": to_json(&stats)?});
                    // Our extension, only when asked, under a name QEMU will not take.
                    if with_stages {
                        let stages = backend.block_stages(&dev.drive_id).map_err(backend_err)?;
                        entry["x-stages"] = to_json(&stages)?;
                    }
                    Ok(entry)
                })
                .collect::<Result<Vec<_>, QmpError>>()
                .map(Value::Array)
        }
        "block-latency-histogram-set" => histogram_set(args, backend),
        "x-query-blockstats-stages" => {
            args.finish()?;
            backend
                .block_devices()
                .iter()
                .map(|dev| {
                    let stages = backend.block_stages(&dev.drive_id).map_err(backend_err)?;
                    let mut entry = to_json(&stages)?;
                    entry["device"] = dev.drive_id.clone().into();
                    entry["qdev"] = dev.qdev.clone().into();
                    Ok(entry)
                })
                .collect::<Result<Vec<_>, QmpError>>()
                .map(Value::Array)
        }
        "x-block-stages-histogram-set" => stages_histogram_set(args, backend),
        "blockdev-snapshot-sync" => snapshot_sync(args, backend),
        "block_resize" => block_resize(args, backend),
        "query-named-block-nodes" => {
            let flat = args.optional_bool("flat")?.unwrap_or(false);
            args.finish()?;
            Ok(Value::Array(named_block_nodes(
                &backend.block_devices(),
                flat,
            )))
        }
        "qom-list" | "qom-get" | "qom-set" => super::qom::execute(command, args, backend),
        c if super::jobs::JOB_COMMANDS.contains(&c) => super::jobs::execute(c, args, backend),
        _ => Err(QmpError::command_not_found(format!(
            "The command {command} has not been found"
        ))),
    }
}

/// `block-latency-histogram-set`, with QEMU's semantics: only `id` removes every histogram;
/// `boundaries` sets all kinds; a per-kind list takes precedence over `boundaries` for its kind.
/// Unlike QEMU, all lists are checked before any histogram changes, and `boundaries-zap` is
/// refused: no disk here has a zoned mode, so zone appends are never counted.
fn histogram_set(mut args: Args, backend: &mut dyn MonitorBackend) -> Result<Value, QmpError> {
    let id = args.required_str("id")?;
    let all = args.optional_u64_list("boundaries")?;
    let read = args.optional_u64_list("boundaries-read")?;
    let write = args.optional_u64_list("boundaries-write")?;
    let zap = args.optional_u64_list("boundaries-zap")?;
    let flush = args.optional_u64_list("boundaries-flush")?;
    args.finish()?;
    if zap.is_some() {
        return Err(QmpError::generic(
            "Parameter 'boundaries-zap' is not supported: no disk here has a zoned mode",
        ));
    }

    let device = find_device(backend, &id)?;

    let change = if [&all, &read, &write, &flush].iter().all(|b| b.is_none()) {
        HistogramChange::ClearAll
    } else {
        let pick = |own: Option<Vec<u64>>, what: &str| {
            let chosen = own.or_else(|| all.clone());
            match &chosen {
                Some(b) if !strictly_increasing(b) => Err(QmpError::generic(format!(
                    "Device '{id}' set {what} boundaries fail"
                ))),
                _ => Ok(chosen),
            }
        };
        HistogramChange::Set(HistogramBoundaries {
            read: pick(read, "read")?,
            write: pick(write, "write")?,
            flush: pick(flush, "flush")?,
        })
    };
    backend
        .set_latency_histograms(&device.drive_id, &change)
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

/// `x-block-stages-histogram-set`: `boundaries` for every stage histogram of every queue of the
/// disk (QEMU's rules for them, as `block-latency-histogram-set`), or without them the default
/// ones again. Stage timing cannot be switched off: it costs too little to need it.
fn stages_histogram_set(
    mut args: Args,
    backend: &mut dyn MonitorBackend,
) -> Result<Value, QmpError> {
    let id = args.required_str("id")?;
    let boundaries = args.optional_u64_list("boundaries")?;
    args.finish()?;
    let device = find_device(backend, &id)?;
    if boundaries
        .as_deref()
        .is_some_and(|b| !strictly_increasing(b))
    {
        return Err(QmpError::generic(format!(
            "Device '{id}' set stage boundaries fail"
        )));
    }
    backend
        .set_stage_histograms(&device.drive_id, boundaries.as_deref())
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

/// The disk a histogram command names: by its guest device's id, as in QEMU, or by its drive id.
fn find_device(backend: &dyn MonitorBackend, id: &str) -> Result<BlockDevice, QmpError> {
    let devices = backend.block_devices();
    devices
        .iter()
        .find(|d| d.qdev == id)
        .or_else(|| devices.iter().find(|d| d.drive_id == id))
        .cloned()
        .ok_or_else(|| QmpError::device_not_found(id))
}

/// `blockdev-snapshot-sync`, its arguments read and checked in QEMU's order (the schema's, then
/// the disk, then the format). The disk is found by drive id or by its top's node name. Only
/// qcow2 overlays are made; raw is refused with QEMU's words, other formats QEMU has by name.
fn snapshot_sync(mut args: Args, backend: &mut dyn MonitorBackend) -> Result<Value, QmpError> {
    let device = args.optional_str("device")?;
    let node = args.optional_str("node-name")?;
    let file = args.required_str("snapshot-file")?;
    let snapshot_node = args.optional_str("snapshot-node-name")?;
    let format = args.optional_str("format")?;
    let mode = match args.optional_str("mode")?.as_deref() {
        None | Some("absolute-paths") => SnapshotMode::AbsolutePaths,
        Some("existing") => SnapshotMode::Existing,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{other}'"
            )))
        }
    };
    args.finish()?;
    let devices = backend.block_devices();
    let found = device
        .as_deref()
        .and_then(|id| devices.iter().find(|d| d.drive_id == id))
        .or_else(|| {
            node.as_deref()
                .and_then(|n| devices.iter().find(|d| d.node_name == n))
        })
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.as_deref().unwrap_or_default(),
                node.as_deref().unwrap_or_default()
            ))
        })?;
    match format.as_deref() {
        None | Some("qcow2") => {}
        Some("raw") => {
            return Err(QmpError::generic(
                "Backing file not supported for file format 'raw'",
            ))
        }
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Snapshot format '{other}' is not supported: only qcow2"
            )))
        }
    }
    if let Some(name) = &snapshot_node {
        let taken = |d: &BlockDevice| d.nodes.iter().any(|n| &n.format == name || &n.file == name);
        if devices.iter().any(taken) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
    }
    let drive_id = found.drive_id.clone();
    backend
        .snapshot_sync(&drive_id, &file, mode, snapshot_node)
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

/// QEMU's largest image length (`BDRV_MAX_LENGTH`: `INT64_MAX` aligned down to its largest
/// request); a larger `block_resize` is refused before anything else is checked.
const MAX_LENGTH: u64 = 9_223_372_035_781_033_984;

/// `block_resize`, in QEMU's order: the arguments, the node (the disk's by drive id, else any
/// node by name), a negative size, QEMU's length limit; the rest (read-only, alignment,
/// shrinking) is the VM's to refuse. A disk grows by its top node or, for raw, by the file under
/// it (QEMU's raw driver lets its file grow); other nodes are refused with QEMU's words: a
/// backing node is busy, and a format node does not share the resizing of its file.
fn block_resize(mut args: Args, backend: &mut dyn MonitorBackend) -> Result<Value, QmpError> {
    let device = args.optional_str("device")?;
    let node = args.optional_str("node-name")?;
    let size = args.required_i64("size")?;
    args.finish()?;
    let devices = backend.block_devices();
    let by_device = device
        .as_deref()
        .and_then(|id| devices.iter().find(|d| d.drive_id == id));
    let by_node = || {
        let name = node.as_deref()?;
        devices.iter().find_map(|d| {
            let at = d
                .nodes
                .iter()
                .position(|n| n.format == name || n.file == name)?;
            Some((d, at, d.nodes[at].format != name))
        })
    };
    let (dev, at, protocol) = match by_device {
        Some(d) => (d, 0, false),
        None => by_node().ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.as_deref().unwrap_or_default(),
                node.as_deref().unwrap_or_default()
            ))
        })?,
    };
    let size =
        u64::try_from(size).map_err(|_| QmpError::generic("Parameter 'size' expects a >0 size"))?;
    if size > MAX_LENGTH {
        return Err(QmpError::generic(format!(
            "offset({size}) exceeds maximum({MAX_LENGTH})"
        )));
    }
    let nodes = &dev.nodes[at];
    if protocol && !(at == 0 && dev.image.format == "raw") {
        let file = &nodes.file;
        return Err(QmpError::generic(format!(
            "Permission conflict on node '{file}': permissions 'resize' are both required by an \
             unnamed block device (uses node '{file}' as 'root' child) and unshared by node \
             '{}' (uses node '{file}' as 'file' child).",
            nodes.format
        )));
    }
    if let Some(above) = at.checked_sub(1).and_then(|i| dev.nodes.get(i)) {
        return Err(QmpError::generic(format!(
            "Node '{}' is busy: node is used as backing hd of '{}'",
            nodes.format, above.format
        )));
    }
    let drive_id = dev.drive_id.clone();
    backend
        .block_resize(&drive_id, size)
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

/// `query-named-block-nodes`: every node of every disk's chain, newest first as QEMU lists
/// them, each image's format node before its protocol node; `flat` leaves out the backing
/// images nested in each `image`.
fn named_block_nodes(devices: &[BlockDevice], flat: bool) -> Vec<Value> {
    let mut images: Vec<(
        &BlockDevice,
        &ImageDescription,
        &super::backend::ImageNodes,
        bool,
    )> = devices
        .iter()
        .flat_map(|dev| {
            let chain = std::iter::successors(Some(&dev.image), |i| i.backing.as_deref());
            chain
                .zip(&dev.nodes)
                .enumerate()
                .map(move |(at, (image, nodes))| (dev, image, nodes, at == 0))
        })
        .collect();
    images.sort_by_key(|(_, _, nodes, _)| std::cmp::Reverse(nodes.opened));
    images
        .into_iter()
        .flat_map(|(dev, image, nodes, top)| {
            // Backing images are opened read-only.
            let ro = !top || dev.read_only;
            let format = node_info(dev, image, &nodes.format, ro, flat);
            let mut file = node_info(dev, &protocol_image(image), &nodes.file, ro, flat);
            file["drv"] = "file".into();
            [format, file]
        })
        .collect()
}

/// The image of `image`'s protocol node: the host file itself, QEMU's `file` driver.
fn protocol_image(image: &ImageDescription) -> ImageDescription {
    ImageDescription {
        filename: image.filename.clone(),
        format: "file".to_owned(),
        virtual_size: image.file_length.unwrap_or_default(),
        actual_size: image.actual_size,
        file_length: image.file_length,
        cluster_size: None,
        dirty_flag: Some(false),
        backing_name: None,
        backing: None,
    }
}

/// QEMU's rule for boundaries (`block_latency_histogram_set`): each above the one before, the
/// first above zero.
fn strictly_increasing(boundaries: &[u64]) -> bool {
    let mut prev = 0;
    boundaries.iter().all(|&b| {
        let ok = b > prev;
        prev = b;
        ok
    })
}

/// One image in `ImageInfo` form, its backing chain nested.
fn image_info(image: &ImageDescription) -> Value {
    let mut info = json!({
        "filename": image.filename,
        "format": image.format,
        "virtual-size": image.virtual_size,
    });
    let optional = [
        ("actual-size", image.actual_size.map(Value::from)),
        ("cluster-size", image.cluster_size.map(Value::from)),
        ("dirty-flag", image.dirty_flag.map(Value::from)),
        (
            "backing-filename",
            image.backing_name.clone().map(Value::from),
        ),
        (
            "backing-filename-format",
            image.backing.as_ref().map(|b| b.format.clone().into()),
        ),
        ("backing-image", image.backing.as_deref().map(image_info)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            info[key] = value;
        }
    }
    info
}

/// One node in `BlockDeviceInfo` form (query-block's `inserted`, query-named-block-nodes'
/// entries): `image` as node `node_name` of `dev`, `flat` without its nested backing images.
/// The constant members state what this VMM does: no throttling, no encryption, no write
/// threshold.
fn node_info(
    dev: &BlockDevice,
    image: &ImageDescription,
    node_name: &str,
    ro: bool,
    flat: bool,
) -> Value {
    let mut info = image_info(image);
    // QEMU counts the depth in the image info it returns: 0 once flattened.
    let depth = if flat {
        if let Some(i) = info.as_object_mut() {
            i.remove("backing-image");
        }
        0
    } else {
        std::iter::successors(image.backing.as_deref(), |i| i.backing.as_deref()).count()
    };
    let mut node = json!({
        "file": image.filename,
        "ro": ro,
        "drv": image.format,
        "backing_file_depth": depth,
        "active": true,
        "encrypted": false,
        "node-name": node_name,
        "detect_zeroes": dev.detect_zeroes,
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": info,
        "cache": dev.cache,
        "write_threshold": 0,
    });
    if let Some(backing) = &image.backing {
        node["backing_file"] = backing.filename.clone().into();
    }
    node
}

/// One disk in `BlockInfo` form: no removable media.
fn block_info(dev: &BlockDevice) -> Value {
    json!({
        "device": dev.drive_id,
        "qdev": dev.qdev,
        "locked": false,
        "removable": false,
        "io-status": dev.io_status,
        "type": "unknown",
        "inserted": node_info(dev, &dev.image, &dev.node_name, dev.read_only, false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::framing::JsonStreamer;
    use crate::monitor::protocol::ErrorClass;
    use crate::monitor::test_backend::RecordingBackend;

    struct Fixture {
        session: Session,
        backend: RecordingBackend,
    }

    impl Fixture {
        fn new(state: RunState) -> Self {
            Self {
                session: Session::default(),
                backend: RecordingBackend::new(state),
            }
        }

        fn negotiated(state: RunState) -> Self {
            let mut f = Self::new(state);
            assert_eq!(
                f.send(r#"{"execute": "qmp_capabilities"}"#)["return"],
                json!({})
            );
            f
        }

        /// The outcome of `text`, which must frame as exactly one unit of input.
        fn outcome(&mut self, text: &str) -> Outcome {
            let mut framer = JsonStreamer::default();
            framer.feed(text.as_bytes());
            framer.feed(b"\n");
            let frame = framer.next_frame().expect("one frame");
            assert_eq!(framer.next_frame(), None, "one frame in {text}");
            self.session.handle(frame, &mut self.backend)
        }

        fn send(&mut self, text: &str) -> Value {
            self.outcome(text).reply
        }

        /// The error class and description of a reply that must be an error.
        fn error(&mut self, text: &str) -> (String, String) {
            let reply = self.send(text);
            let class = reply["error"]["class"]
                .as_str()
                .expect("error reply")
                .to_owned();
            let desc = reply["error"]["desc"].as_str().expect("desc").to_owned();
            (class, desc)
        }

        fn calls(&self) -> Vec<String> {
            self.backend.calls.lock().expect("log").clone()
        }
    }

    fn class(c: ErrorClass) -> String {
        serde_json::to_value(c)
            .expect("class")
            .as_str()
            .expect("string")
            .to_owned()
    }

    #[test]
    fn negotiation_mode_refuses_commands() {
        let mut f = Fixture::new(RunState::Running);
        assert!(!f.session.receives_events());
        let (c, d) = f.error(r#"{"execute": "query-status", "id": 1}"#);
        assert_eq!(c, class(ErrorClass::CommandNotFound));
        assert_eq!(
            d,
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let (c, _) = f.error(r#"{"execute": "no-such-command"}"#);
        assert_eq!(c, class(ErrorClass::CommandNotFound));
        assert!(f.calls().is_empty());
    }

    #[test]
    fn capabilities_arguments_are_checked() {
        let mut f = Fixture::new(RunState::Running);
        let (c, d) =
            f.error(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("GenericError", "Capability 'oob' not available")
        );
        let (_, d) = f.error(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}"#);
        assert_eq!(d, "Parameter 'enable[0]' does not accept value 'x'");
        let (_, d) =
            f.error(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "y"]}}"#);
        assert_eq!(d, "Parameter 'enable[1]' does not accept value 'y'");
        let (_, d) = f.error(r#"{"execute": "qmp_capabilities", "arguments": {"x": 1}}"#);
        assert_eq!(d, "Parameter 'x' is unexpected");
        assert!(!f.session.receives_events());
        let reply =
            f.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}"#);
        assert_eq!(reply, json!({"return": {}, "id": "n"}));
        assert!(f.session.receives_events());
        let (c, d) = f.error(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(c, "CommandNotFound");
        assert_eq!(
            d,
            "Capabilities negotiation is already complete, command ignored"
        );
    }

    #[test]
    fn malformed_input_gets_generic_errors_without_id() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply = f.send(r#"{"execute": }"#);
        assert_eq!(reply["error"]["class"], "GenericError");
        assert!(reply["error"]["desc"]
            .as_str()
            .expect("desc")
            .starts_with("JSON parse error, "));
        assert!(reply.get("id").is_none());
        assert_eq!(
            f.send("}"),
            json!({"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}})
        );
        let (c, d) = f.error("[1, 2]");
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("GenericError", "QMP input must be a JSON object")
        );
        // Still usable.
        assert_eq!(
            f.send(r#"{"execute": "query-status"}"#)["return"]["status"],
            "running"
        );
    }

    #[test]
    fn unknown_command_and_bad_arguments() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply = f.send(r#"{"execute": "savevm", "id": [1]}"#);
        assert_eq!(
            reply,
            json!({"error": {"class": "CommandNotFound", "desc": "The command savevm has not been found"}, "id": [1]})
        );
        let (c, d) = f.error(r#"{"execute": "stop", "arguments": {"now": true}}"#);
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("GenericError", "Parameter 'now' is unexpected")
        );
        let (_, d) = f.error(r#"{"execute": "query-blockstats", "arguments": {"query-nodes": 1}}"#);
        assert_eq!(
            d,
            "Invalid parameter type for 'query-nodes', expected: boolean"
        );
        let (_, d) =
            f.error(r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}}"#);
        assert!(d.starts_with("query-nodes is not supported"));
        assert!(
            f.calls().is_empty(),
            "no command with bad arguments reached the VM"
        );
    }

    #[test]
    fn query_commands_lists_every_command_once() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply = f.send(r#"{"execute": "query-commands"}"#);
        let names: Vec<&str> = reply["return"]
            .as_array()
            .expect("list")
            .iter()
            .map(|c| c["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, all_commands().collect::<Vec<_>>());
        // Every listed command is known: none answers CommandNotFound except the negotiation one.
        for name in all_commands().filter(|n| *n != "qmp_capabilities") {
            let reply = f.send(&format!(
                r#"{{"execute": "{name}", "arguments": {{"zzz": 1}}}}"#
            ));
            assert_eq!(reply["error"]["class"], "GenericError", "{name}");
        }
    }

    #[test]
    fn version_matches_greeting() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply = f.send(r#"{"execute": "query-version"}"#);
        assert_eq!(reply["return"], protocol::greeting()["QMP"]["version"]);
    }

    #[test]
    fn query_name_gives_the_guest_name_or_nothing() {
        let mut f = Fixture::negotiated(RunState::Running);
        assert_eq!(f.send(r#"{"execute": "query-name"}"#)["return"], json!({}));
        f.backend.guest_name = Some("db1".into());
        assert_eq!(
            f.send(r#"{"execute": "query-name"}"#)["return"],
            json!({"name": "db1"})
        );
    }

    #[test]
    fn stop_and_cont_follow_qemu_run_states() {
        let mut f = Fixture::negotiated(RunState::Prelaunch);
        assert_eq!(
            f.send(r#"{"execute": "query-status"}"#)["return"],
            json!({"running": false, "status": "prelaunch"})
        );
        // Stopping a VM that is not running changes nothing and raises nothing.
        assert!(f.outcome(r#"{"execute": "stop"}"#).events.is_empty());
        let out = f.outcome(r#"{"execute": "cont", "id": 5}"#);
        assert_eq!(out.reply, json!({"return": {}, "id": 5}));
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0]["event"], "RESUME");
        assert_eq!(
            f.send(r#"{"execute": "query-status"}"#)["return"],
            json!({"running": true, "status": "running"})
        );
        // cont while running: no event.
        assert!(f.outcome(r#"{"execute": "cont"}"#).events.is_empty());
        let out = f.outcome(r#"{"execute": "stop"}"#);
        assert_eq!(out.events[0]["event"], "STOP");
        assert!(out.events[0]["timestamp"]["seconds"].is_u64());
        assert_eq!(
            f.send(r#"{"execute": "query-status"}"#)["return"]["status"],
            "paused"
        );
        assert_eq!(f.calls(), ["resume", "pause"]);
    }

    #[test]
    fn cont_after_an_io_error_stop_resumes() {
        let mut f = Fixture::negotiated(RunState::IoError);
        assert_eq!(
            f.send(r#"{"execute": "query-status"}"#)["return"],
            json!({"running": false, "status": "io-error"})
        );
        // stop leaves the io-error state as it is, as QEMU's vm_stop on a stopped VM does.
        assert!(f.outcome(r#"{"execute": "stop"}"#).events.is_empty());
        let out = f.outcome(r#"{"execute": "cont"}"#);
        assert_eq!(out.events.len(), 1);
        assert_eq!(out.events[0]["event"], "RESUME");
        assert_eq!(f.calls(), ["resume"]);
    }

    #[test]
    fn cont_cancels_a_stop_a_disk_asked_for_with_stop_and_resume() {
        let mut f = Fixture::negotiated(RunState::Running);
        f.backend.stop_requested = true;
        let out = f.outcome(r#"{"execute": "cont"}"#);
        let names: Vec<_> = out.events.iter().map(|e| e["event"].clone()).collect();
        assert_eq!(names, ["STOP", "RESUME"]);
        assert_eq!(f.calls(), ["resume"]);
        assert!(f.outcome(r#"{"execute": "cont"}"#).events.is_empty());
    }

    #[test]
    fn cont_after_shutdown_needs_a_reset() {
        let mut f = Fixture::negotiated(RunState::Shutdown);
        let (c, d) = f.error(r#"{"execute": "cont"}"#);
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("GenericError", "Resetting the Virtual Machine is required")
        );
        assert!(f.calls().is_empty());
    }

    #[test]
    fn backend_failures_become_generic_errors_without_events() {
        let mut f = Fixture::negotiated(RunState::Running);
        f.backend.fail_pause = Some("vCPU 1 did not stop".into());
        let out = f.outcome(r#"{"execute": "stop", "id": 1}"#);
        assert_eq!(
            out.reply,
            json!({"error": {"class": "GenericError", "desc": "vCPU 1 did not stop"}, "id": 1})
        );
        assert!(out.events.is_empty());
    }

    #[test]
    fn powerdown_and_quit_raise_their_events() {
        let mut f = Fixture::negotiated(RunState::Running);
        let out = f.outcome(r#"{"execute": "system_powerdown"}"#);
        assert_eq!(out.reply, json!({"return": {}}));
        assert_eq!(out.events[0]["event"], "POWERDOWN");
        let out = f.outcome(r#"{"execute": "quit"}"#);
        assert_eq!(out.events[0]["event"], "SHUTDOWN");
        assert_eq!(
            out.events[0]["data"],
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
        assert_eq!(f.calls(), ["powerdown", "quit"]);
    }

    #[test]
    fn iothreads_use_qemu_names() {
        let mut f = Fixture::negotiated(RunState::Running);
        assert_eq!(
            f.send(r#"{"execute": "query-iothreads"}"#)["return"],
            json!([{"id": "io0", "thread-id": 4242, "poll-max-ns": 32768, "poll-grow": 0,
                    "poll-shrink": 0, "aio-max-batch": 0}])
        );
    }

    #[test]
    fn qom_set_changes_what_qom_get_and_query_iothreads_read() {
        let mut f = Fixture::negotiated(RunState::Running);
        let get = |f: &mut Fixture, prop: &str| {
            f.send(&format!(
                r#"{{"execute": "qom-get", "arguments": {{"path": "/objects/io0", "property": "{prop}"}}}}"#
            ))["return"]
                .clone()
        };
        assert_eq!(get(&mut f, "poll-max-ns"), json!(32768));
        assert_eq!(get(&mut f, "type"), json!("iothread"));
        for (prop, value) in [
            ("poll-max-ns", 0u64),
            ("poll-grow", 3),
            ("poll-shrink", 9_223_372_036_854_775_807),
            ("aio-max-batch", 32),
        ] {
            let set = format!(
                r#"{{"execute": "qom-set", "arguments": {{"path": "/objects/io0/", "property": "{prop}", "value": {value}}}}}"#
            );
            assert_eq!(f.send(&set), json!({"return": {}}), "{set}");
            assert_eq!(get(&mut f, prop), json!(value));
        }
        assert_eq!(
            f.send(r#"{"execute": "query-iothreads"}"#)["return"],
            json!([{"id": "io0", "thread-id": 4242, "poll-max-ns": 0, "poll-grow": 3,
                    "poll-shrink": 9_223_372_036_854_775_807_u64, "aio-max-batch": 32}])
        );
        assert_eq!(
            f.calls(),
            [
                "set-poll io0 poll-max-ns 0",
                "set-poll io0 poll-grow 3",
                "set-poll io0 poll-shrink 9223372036854775807",
                "set-poll io0 aio-max-batch 32"
            ]
        );
        let list = f.send(r#"{"execute": "qom-list", "arguments": {"path": "/objects/io0"}}"#);
        let names: Vec<_> = list["return"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or(""),
                    p["type"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("type", "string"),
                ("aio-max-batch", "int"),
                ("poll-max-ns", "int"),
                ("poll-grow", "int"),
                ("poll-shrink", "int")
            ]
        );
    }

    #[test]
    fn qom_errors_are_qemu_s() {
        let mut f = Fixture::negotiated(RunState::Running);
        let generic = |d: &str| ("GenericError".to_owned(), d.to_owned());
        let cases: &[(&str, (String, String))] = &[
            (
                r#"{"path": "/objects/nope", "property": "poll-max-ns"}"#,
                (
                    "DeviceNotFound".into(),
                    "Device '/objects/nope' not found".into(),
                ),
            ),
            (
                r#"{"path": "/machine", "property": "type"}"#,
                (
                    "DeviceNotFound".into(),
                    "Device '/machine' not found".into(),
                ),
            ),
            (
                r#"{"path": "/objects/io0", "property": "nope"}"#,
                generic("Property 'iothread.nope' not found"),
            ),
            (
                r#"{"path": "/objects/io0"}"#,
                generic("Parameter 'property' is missing"),
            ),
            (
                r#"{"property": "type"}"#,
                generic("Parameter 'path' is missing"),
            ),
            (
                r#"{"path": "/objects/io0", "property": 5}"#,
                generic("Invalid parameter type for 'property', expected: string"),
            ),
            (
                r#"{"path": "/objects/io0", "property": "type", "x": 1}"#,
                generic("Parameter 'x' is unexpected"),
            ),
        ];
        for (args, want) in cases {
            let req = format!(r#"{{"execute": "qom-get", "arguments": {args}}}"#);
            assert_eq!(&f.error(&req), want, "{req}");
        }
        let set_cases: &[(&str, (String, String))] = &[
            (
                r#"{"path": "/objects/nope", "property": "nope", "value": "z"}"#,
                (
                    "DeviceNotFound".into(),
                    "Device '/objects/nope' not found".into(),
                ),
            ),
            (
                r#"{"path": "/objects/io0", "property": "type", "value": "x"}"#,
                generic("Property 'iothread.type' is not writable"),
            ),
            (
                r#"{"path": "/objects/io0", "property": "nope", "value": 7}"#,
                generic("Property 'iothread.nope' not found"),
            ),
            (
                r#"{"path": "/objects/io0", "property": "poll-grow"}"#,
                generic("Parameter 'value' is missing"),
            ),
            (
                r#"{"path": "/objects/io0", "property": "poll-max-ns", "value": -1}"#,
                generic("poll-max-ns value must be in range [0, 9223372036854775807]"),
            ),
            (
                r#"{"path": "/objects/io0", "property": "aio-max-batch", "value": -5}"#,
                generic("aio-max-batch value must be in range [0, 9223372036854775807]"),
            ),
            (
                r#"{"path": "/objects/io0", "property": "poll-max-ns", "value": 5, "x": 1}"#,
                generic("Parameter 'x' is unexpected"),
            ),
        ];
        for (args, want) in set_cases {
            let req = format!(r#"{{"execute": "qom-set", "arguments": {args}}}"#);
            assert_eq!(&f.error(&req), want, "{req}");
        }
        for value in [
            r#""5""#,
            "1.5",
            "9223372036854775808",
            "true",
            "null",
            "[1]",
        ] {
            let req = format!(
                r#"{{"execute": "qom-set", "arguments": {{"path": "/objects/io0", "property": "poll-max-ns", "value": {value}}}}}"#
            );
            assert_eq!(
                f.error(&req),
                generic("Invalid parameter type for 'poll-max-ns', expected: integer"),
                "{req}"
            );
        }
        assert_eq!(
            f.error(r#"{"execute": "qom-list", "arguments": {"path": "/objects/nope"}}"#),
            (
                "DeviceNotFound".into(),
                "Device '/objects/nope' not found".into()
            )
        );
        assert_eq!(
            f.error(r#"{"execute": "qom-list", "arguments": {}}"#),
            generic("Parameter 'path' is missing")
        );
        assert!(f.calls().is_empty(), "nothing was set: {:?}", f.calls());
    }

    #[test]
    fn query_block_describes_the_chain() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply = f.send(r#"{"execute": "query-block"}"#);
        let d0 = &reply["return"][0];
        assert_eq!(d0["device"], "d0");
        assert_eq!(d0["qdev"], "vd0");
        assert_eq!(d0["type"], "unknown");
        let ins = &d0["inserted"];
        assert_eq!(ins["file"], "/img/top.qcow2");
        assert_eq!(ins["drv"], "qcow2");
        assert_eq!(ins["backing_file"], "/img/base.raw");
        assert_eq!(ins["backing_file_depth"], 1);
        assert_eq!(
            ins["cache"],
            json!({"writeback": true, "direct": true, "no-flush": false})
        );
        assert_eq!(ins["image"]["virtual-size"], 1u64 << 30);
        assert_eq!(ins["image"]["cluster-size"], 65536);
        assert_eq!(ins["image"]["backing-filename-format"], "raw");
        assert_eq!(ins["image"]["backing-image"]["filename"], "/img/base.raw");
        assert!(ins["image"]["backing-image"].get("backing-image").is_none());
        assert_eq!(ins["detect_zeroes"], "off");
        assert_eq!(ins["node-name"], "#block0");
        assert_eq!(d0["io-status"], "nospace");
        assert_eq!(reply["return"][1]["io-status"], "ok");
        let d1 = &reply["return"][1]["inserted"];
        assert_eq!(d1["ro"], true);
        assert_eq!(d1["detect_zeroes"], "unmap");
        assert_eq!(d1["backing_file_depth"], 0);
        assert!(d1.get("backing_file").is_none());
    }

    #[test]
    fn query_blockstats_uses_qemu_names() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply =
            f.send(r#"{"execute": "query-blockstats", "arguments": {"query-nodes": false}}"#);
        let s = &reply["return"][0];
        assert_eq!(s["device"], "d0");
        assert_eq!(s["qdev"], "vd0");
        assert_eq!(s["stats"]["rd_operations"], 3);
        assert_eq!(s["stats"]["wr_highest_offset"], 0);
        assert_eq!(s["stats"]["timed_stats"], json!([]));
        assert_eq!(
            s["stats"]["rd_latency_histogram"],
            json!({"boundaries": [1000], "bins": [1, 2]})
        );
        assert!(s["stats"].get("wr_latency_histogram").is_none());
        assert!(s["stats"].get("idle_time_ns").is_none());
        assert_eq!(f.calls(), ["stats d0", "stats d1"]);
    }

    #[test]
    fn stage_timing_replies_per_disk_queue_and_stage() {
        let mut f = Fixture::negotiated(RunState::Running);
        let reply = f.send(r#"{"execute": "x-query-blockstats-stages"}"#);
        let disks = reply["return"].as_array().expect("list");
        assert_eq!(disks.len(), 2);
        assert_eq!(
            (&disks[0]["device"], &disks[0]["qdev"]),
            (&json!("d0"), &json!("vd0"))
        );
        let queues = disks[0]["queues"].as_array().expect("queues");
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[0]["queue"], 0);
        assert_eq!(queues[0]["chain-depth"], json!([]));
        let q1 = &queues[1];
        let names: Vec<&str> = q1["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .map(|s| s["stage"].as_str().expect("name"))
            .collect();
        assert_eq!(
            names,
            [
                "queue-wait",
                "submission",
                "backend",
                "backend-dispatch",
                "backend-metadata",
                "backend-data",
                "completion",
                "total"
            ]
        );
        let expect = [
            (200, 0),
            (300, 0),
            (52_000, 1),
            (2000, 1),
            (10_000, 1),
            (40_000, 1),
            (500, 0),
            (53_000, 1),
        ];
        for (stage, (ns, bin)) in q1["stages"].as_array().expect("stages").iter().zip(expect) {
            let mut bins = json!([0, 0, 0]);
            bins[bin] = 1.into();
            assert_eq!(
                stage,
                &json!({"stage": stage["stage"], "count": 1, "total-ns": ns, "mean-ns": ns,
                        "max-ns": ns, "histogram": {"boundaries": [1000, 100_000], "bins": bins}})
            );
        }
        assert_eq!(
            q1["chain-depth"],
            json!([{"depth": 1, "count": 1, "backend-mean-ns": 52_000}])
        );
        // Queue 0 timed nothing: zero means, not a division by zero.
        assert_eq!(queues[0]["stages"][0]["mean-ns"], 0);
        let reaps = |q: &Value| {
            (
                q["reaps"].clone(),
                q["reaped"].clone(),
                q["interrupts"].clone(),
            )
        };
        assert_eq!(reaps(q1), (json!(2), json!(3), json!(1)));
        // A reap that completed nothing of queue 0 counts nothing there.
        assert_eq!(reaps(&queues[0]), (json!(0), json!(0), json!(0)));
        assert_eq!(f.calls(), ["stages d0", "stages d1"]);

        // query-blockstats carries the same only when asked.
        let plain = f.send(r#"{"execute": "query-blockstats"}"#);
        assert!(plain["return"][0].get("x-stages").is_none());
        let asked = f.send(r#"{"execute": "query-blockstats", "arguments": {"x-stages": true}}"#);
        assert_eq!(asked["return"][1]["x-stages"]["queues"], disks[1]["queues"]);
        assert_eq!(asked["return"][1]["stats"]["rd_operations"], 3);
        let (_, d) = f.error(r#"{"execute": "query-blockstats", "arguments": {"x-stages": 1}}"#);
        assert!(d.contains("x-stages"), "{d}");
    }

    #[test]
    fn stage_histogram_set() {
        let mut f = Fixture::negotiated(RunState::Running);
        for request in [
            r#"{"execute": "x-block-stages-histogram-set", "arguments": {"id": "vd0", "boundaries": [10, 20]}}"#,
            r#"{"execute": "x-block-stages-histogram-set", "arguments": {"id": "d1"}}"#,
        ] {
            assert_eq!(f.send(request), json!({"return": {}}));
        }
        let (c, _) =
            f.error(r#"{"execute": "x-block-stages-histogram-set", "arguments": {"id": "nope"}}"#);
        assert_eq!(c, "DeviceNotFound");
        let (_, d) = f.error(r#"{"execute": "x-block-stages-histogram-set", "arguments": {"id": "vd0", "boundaries": [5, 5]}}"#);
        assert_eq!(d, "Device 'vd0' set stage boundaries fail");
        assert_eq!(
            f.calls(),
            [
                "stage histograms d0 Some([10, 20])",
                "stage histograms d1 None"
            ]
        );
    }

    #[test]
    fn histogram_set_semantics() {
        let mut f = Fixture::negotiated(RunState::Running);
        // By guest device id, only id: clear all.
        assert_eq!(
            f.send(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0"}}"#)
                ["return"],
            json!({})
        );
        // By drive id: boundaries for all kinds, a per-kind list taking precedence.
        f.send(
            r#"{"execute": "block-latency-histogram-set",
                   "arguments": {"id": "d1", "boundaries": [10, 20], "boundaries-flush": [5]}}"#,
        );
        f.send(
            r#"{"execute": "block-latency-histogram-set",
                   "arguments": {"id": "vd0", "boundaries-write": [1]}}"#,
        );
        let calls = f.calls();
        assert_eq!(calls[0], "histogram d0 ClearAll");
        assert_eq!(
            calls[1],
            format!(
                "histogram d1 {:?}",
                HistogramChange::Set(HistogramBoundaries {
                    read: Some(vec![10, 20]),
                    write: Some(vec![10, 20]),
                    flush: Some(vec![5]),
                })
            )
        );
        assert_eq!(
            calls[2],
            format!(
                "histogram d0 {:?}",
                HistogramChange::Set(HistogramBoundaries {
                    write: Some(vec![1]),
                    ..HistogramBoundaries::default()
                })
            )
        );
    }

    #[test]
    fn histogram_set_errors() {
        let mut f = Fixture::negotiated(RunState::Running);
        let (c, d) =
            f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "nope"}}"#);
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("DeviceNotFound", "Device 'nope' not found")
        );
        let (c, d) = f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {}}"#);
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("GenericError", "Parameter 'id' is missing")
        );
        let (_, d) = f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries": [0, 5]}}"#);
        assert_eq!(d, "Device 'vd0' set read boundaries fail");
        let (_, d) = f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries-write": [5, 5]}}"#);
        assert_eq!(d, "Device 'vd0' set write boundaries fail");
        let (_, d) = f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries-zap": [9]}}"#);
        assert_eq!(
            d,
            "Parameter 'boundaries-zap' is not supported: no disk here has a zoned mode"
        );
        // A bad flush list fails the whole command before anything changes.
        let (_, d) = f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries-read": [1], "boundaries-flush": [2, 1]}}"#);
        assert_eq!(d, "Device 'vd0' set flush boundaries fail");
        let (_, d) = f.error(r#"{"execute": "block-latency-histogram-set", "arguments": {"id": "vd0", "boundaries": [-1]}}"#);
        assert_eq!(d, "Parameter 'boundaries[0]' expects uint64");
        assert!(f.calls().is_empty());
    }

    #[test]
    fn snapshot_sync_arguments() {
        let mut f = Fixture::negotiated(RunState::Running);
        let ok = |f: &mut Fixture, args: &str| {
            let reply = f.send(&format!(
                r#"{{"execute": "blockdev-snapshot-sync", "arguments": {args}}}"#
            ));
            assert_eq!(reply["return"], json!({}), "{args}: {reply}");
        };
        ok(&mut f, r#"{"device": "d0", "snapshot-file": "/s1"}"#);
        // By the top's node name; the new node named.
        ok(
            &mut f,
            r##"{"node-name": "#block1", "snapshot-file": "/s2", "mode": "existing",
                 "format": "qcow2", "snapshot-node-name": "n2"}"##,
        );
        assert_eq!(
            f.calls(),
            [
                "snapshot d0 /s1 AbsolutePaths None",
                r#"snapshot d1 /s2 Existing Some("n2")"#
            ]
        );
        let err = |f: &mut Fixture, args: &str| {
            f.error(&format!(
                r#"{{"execute": "blockdev-snapshot-sync", "arguments": {args}}}"#
            ))
        };
        assert_eq!(
            err(&mut f, r#"{"device": "d0"}"#).1,
            "Parameter 'snapshot-file' is missing"
        );
        assert_eq!(
            err(
                &mut f,
                r#"{"device": "d0", "snapshot-file": "/s", "format": "vmdk"}"#
            )
            .1,
            "Snapshot format 'vmdk' is not supported: only qcow2"
        );
        assert_eq!(
            err(
                &mut f,
                r##"{"device": "d0", "snapshot-file": "/s", "snapshot-node-name": "#block1"}"##
            )
            .1,
            "Duplicate nodes with node-name='#block1'"
        );
        // A backing image's node, and a protocol node, are taken too.
        for taken in ["#block4", "#block5"] {
            assert_eq!(
                err(
                    &mut f,
                    &format!(r#"{{"device": "d0", "snapshot-file": "/s", "snapshot-node-name": "{taken}"}}"#)
                )
                .1,
                format!("Duplicate nodes with node-name='{taken}'")
            );
        }
        assert_eq!(
            err(&mut f, r#"{"device": "d0", "snapshot-file": 5}"#),
            (
                "GenericError".to_owned(),
                "Invalid parameter type for 'snapshot-file', expected: string".to_owned()
            )
        );
        assert_eq!(f.calls().len(), 2, "no failed request reached the VM");
    }

    #[test]
    fn block_resize_arguments_in_qemus_order() {
        let mut f = Fixture::negotiated(RunState::Running);
        let resize = |f: &mut Fixture, args: &str| {
            f.send(&format!(
                r#"{{"execute": "block_resize", "arguments": {args}}}"#
            ))
        };
        assert_eq!(
            resize(&mut f, r#"{"device": "d0", "size": 2097152}"#)["return"],
            json!({})
        );
        // By node name; the device wins when both are given, as in QEMU.
        resize(&mut f, r##"{"node-name": "#block1", "size": 4096}"##);
        resize(
            &mut f,
            r##"{"device": "d1", "node-name": "#block0", "size": 512}"##,
        );
        assert_eq!(
            f.calls(),
            ["resize d0 2097152", "resize d1 4096", "resize d1 512"]
        );
        let err = |f: &mut Fixture, args: &str| {
            f.error(&format!(
                r#"{{"execute": "block_resize", "arguments": {args}}}"#
            ))
            .1
        };
        for (args, desc) in [
            (r#"{"device": "d0"}"#, "Parameter 'size' is missing"),
            (
                r#"{"device": "d0", "size": "1"}"#,
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                r#"{"device": "nope", "size": 512}"#,
                "Cannot find device='nope' nor node-name=''",
            ),
            (r#"{"size": 512}"#, "Cannot find device='' nor node-name=''"),
            (
                r#"{"device": "d0", "size": -1}"#,
                "Parameter 'size' expects a >0 size",
            ),
            (
                r#"{"device": "d0", "size": 9223372036854775807}"#,
                "offset(9223372036854775807) exceeds maximum(9223372035781033984)",
            ),
            // The backing image's format node, and the qcow2 top's protocol node (QEMU 10's
            // words).
            (
                r##"{"node-name": "#block4", "size": 512}"##,
                "Node '#block4' is busy: node is used as backing hd of '#block0'",
            ),
            (
                r##"{"node-name": "#block2", "size": 512}"##,
                "Permission conflict on node '#block2': permissions 'resize' are both required \
                 by an unnamed block device (uses node '#block2' as 'root' child) and unshared \
                 by node '#block0' (uses node '#block2' as 'file' child).",
            ),
        ] {
            assert_eq!(err(&mut f, args), desc, "{args}");
        }
        assert_eq!(f.calls().len(), 3, "no refused request reached the VM");
    }

    #[test]
    fn named_block_nodes_list_every_node_newest_first() {
        let mut f = Fixture::negotiated(RunState::Running);
        let nodes = f.send(r#"{"execute": "query-named-block-nodes"}"#)["return"].clone();
        let names: Vec<_> = nodes
            .as_array()
            .expect("list")
            .iter()
            .map(|n| (n["node-name"].clone(), n["drv"].clone(), n["ro"].clone()))
            .collect();
        assert_eq!(
            names,
            [
                (json!("#block1"), json!("qcow2"), json!(true)),
                (json!("#block5"), json!("file"), json!(true)),
                (json!("#block4"), json!("raw"), json!(true)),
                (json!("#block3"), json!("file"), json!(true)),
                (json!("#block0"), json!("qcow2"), json!(false)),
                (json!("#block2"), json!("file"), json!(false)),
            ]
        );
        // The top's entry is query-block's `inserted`.
        let block = f.send(r#"{"execute": "query-block"}"#);
        assert_eq!(nodes[4], block["return"][0]["inserted"]);
        assert_eq!(nodes[4]["backing_file_depth"], 1);
        assert_eq!(nodes[5]["image"]["format"], "file");
        assert_eq!(nodes[5]["image"]["virtual-size"], 196_616);
        assert_eq!(nodes[5]["backing_file_depth"], 0);
        // Flat: no nested backing images, and so no depth.
        let flat = f.send(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#)
            ["return"]
            .clone();
        assert!(flat[4]["image"].get("backing-image").is_none());
        assert_eq!(flat[4]["image"]["backing-filename"], "/img/base.raw");
        assert_eq!(flat[4]["backing_file"], "/img/base.raw");
        assert_eq!(flat[4]["backing_file_depth"], 0);
        let (_, d) = f.error(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": 1}}"#);
        assert_eq!(d, "Invalid parameter type for 'flat', expected: boolean");
    }

    #[test]
    fn boundary_rule() {
        assert!(strictly_increasing(&[]));
        assert!(strictly_increasing(&[1, 2, 100]));
        assert!(!strictly_increasing(&[0]));
        assert!(!strictly_increasing(&[3, 3]));
    }
}
