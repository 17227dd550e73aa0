//! The block job commands: `block-stream`, `block-commit`, `query-block-jobs` and `block-job-cancel`,
//! `-pause`, `-resume`, `-set-speed`, `-complete`, `-finalize`, `-dismiss` (and `job-finalize`,
//! `job-dismiss`, which name the job `id`), their arguments read and checked in QEMU's
//! order (the schema's, then the disk, then the values), errors in QEMU's classes and words.

use devices::virtio::block::ErrorPolicy;
use serde_json::{json, Value};

use super::args::Args;
use super::backend::{CommitArgs, JobCommand, JobEnd, JobError, Layer, MonitorBackend, StreamArgs};
use super::protocol::{ErrorClass, QmpError};

/// The commands this file handles, as `query-commands` lists them.
pub const JOB_COMMANDS: [&str; 12] = [
    "block-stream",
    "block-commit",
    "query-block-jobs",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-set-speed",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-finalize",
    "job-dismiss",
];

fn job_error(e: JobError) -> QmpError {
    let class = match e {
        JobError::NotFound(_) => ErrorClass::DeviceNotActive,
        _ => ErrorClass::GenericError,
    };
    QmpError {
        class,
        desc: e.to_string(),
    }
}

/// Runs one of [`JOB_COMMANDS`].
pub fn execute(
    command: &str,
    mut args: Args,
    backend: &mut dyn MonitorBackend,
) -> Result<Value, QmpError> {
    match command {
        "block-stream" => stream(args, backend),
        "block-commit" => commit(args, backend),
        "query-block-jobs" => {
            args.finish()?;
            serde_json::to_value(backend.block_jobs())
                .map_err(|e| QmpError::generic(format!("Cannot encode reply: {e}")))
        }
        "job-finalize" | "job-dismiss" | "block-job-finalize" | "block-job-dismiss" => {
            let id = args.required_str("id")?;
            args.finish()?;
            let job = if command.ends_with("finalize") {
                JobCommand::Finalize
            } else {
                JobCommand::Dismiss
            };
            match backend.block_job(&id, job) {
                Err(JobError::NotFound(_)) if command.starts_with("job-") => {
                    Err(QmpError::generic("Job not found"))
                }
                result => result.map(|()| json!({})).map_err(job_error),
            }
        }
        _ => {
            let device = args.required_str("device")?;
            let job = match command {
                "block-job-cancel" => JobCommand::Cancel {
                    force: args.optional_bool("force")?.unwrap_or(false),
                },
                "block-job-pause" => JobCommand::Pause,
                "block-job-resume" => JobCommand::Resume,
                "block-job-set-speed" => JobCommand::SetSpeed(
                    args.optional_i64("speed")?
                        .ok_or_else(|| QmpError::generic("Parameter 'speed' is missing"))?,
                ),
                _ => JobCommand::Complete,
            };
            args.finish()?;
            backend.block_job(&device, job).map_err(job_error)?;
            Ok(json!({}))
        }
    }
}

/// The drive id of the disk `device` names (its drive id or its top's node name).
fn find_disk(backend: &dyn MonitorBackend, device: &str) -> Result<String, QmpError> {
    backend
        .block_devices()
        .into_iter()
        .find(|d| d.drive_id == device || d.node_name == device)
        .map(|d| d.drive_id)
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            ))
        })
}

/// The depth in the chain of disk `drive_id` of the image whose format node is `node`, or
/// `None` for a node of another disk or a protocol node; an unknown node is QEMU's error.
fn node_depth(
    backend: &dyn MonitorBackend,
    drive_id: &str,
    node: &str,
) -> Result<Option<usize>, QmpError> {
    for disk in backend.block_devices() {
        for (depth, nodes) in disk.nodes.iter().enumerate() {
            if nodes.format == node {
                return Ok((disk.drive_id == drive_id).then_some(depth));
            }
            if nodes.file == node {
                return Ok(None);
            }
        }
    }
    Err(QmpError::generic(format!(
        "Cannot find device='' nor node-name='{node}'"
    )))
}

/// A commit's `top` or `base`, by file or (`-node`) node name, not both.
fn commit_layer(
    backend: &dyn MonitorBackend,
    drive_id: &str,
    (file, node): (Option<String>, Option<String>),
    what: &str,
) -> Result<Option<Layer>, QmpError> {
    match (file, node) {
        (Some(_), Some(_)) => Err(QmpError::generic(format!(
            "'{what}-node' and '{what}' are mutually exclusive"
        ))),
        (Some(file), None) => Ok(Some(Layer::File(file))),
        (None, Some(name)) => match node_depth(backend, drive_id, &name)? {
            Some(depth) => Ok(Some(Layer::Node { name, depth })),
            None => Err(QmpError::generic(format!(
                "'{name}' is not in this backing file chain"
            ))),
        },
        (None, None) => Ok(None),
    }
}

/// `on-error` (QEMU's `BlockdevOnError`), `report` when absent. A job's `auto` is `enospc`,
/// as QEMU's `block_job_error_action` treats it (it inherits no drive's policy).
fn parse_on_error(value: Option<String>) -> Result<ErrorPolicy, QmpError> {
    match value.as_deref() {
        None | Some("report") => Ok(ErrorPolicy::Report),
        Some("stop") => Ok(ErrorPolicy::Stop),
        Some("enospc" | "auto") => Ok(ErrorPolicy::Enospc),
        Some("ignore") => Ok(ErrorPolicy::Ignore),
        Some(other) => Err(QmpError::generic(format!(
            "Parameter 'on-error' does not accept value '{other}'"
        ))),
    }
}

/// `auto-finalize` and `auto-dismiss`, true when absent, and `on-error`.
fn job_end(
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
    on_error: ErrorPolicy,
) -> JobEnd {
    JobEnd {
        finalize: auto_finalize.unwrap_or(true),
        dismiss: auto_dismiss.unwrap_or(true),
        on_error,
    }
}

/// `block-commit`: the disk by drive id or by its top's node name.
fn commit(mut args: Args, backend: &mut dyn MonitorBackend) -> Result<Value, QmpError> {
    let job_id = args.optional_str("job-id")?;
    let device = args.required_str("device")?;
    let base_node = args.optional_str("base-node")?;
    let base = args.optional_str("base")?;
    let top_node = args.optional_str("top-node")?;
    let top = args.optional_str("top")?;
    let backing_file = args.optional_str("backing-file")?;
    let _mask_protocol = args.optional_bool("backing-mask-protocol")?;
    let speed = args.optional_i64("speed")?;
    let on_error_arg = args.optional_str("on-error")?;
    let _filter = args.optional_str("filter-node-name")?;
    let auto_finalize = args.optional_bool("auto-finalize")?;
    let auto_dismiss = args.optional_bool("auto-dismiss")?;
    args.finish()?;
    let on_error = parse_on_error(on_error_arg)?;
    // Unlike block-stream, QEMU's block-commit says DeviceNotFound.
    let drive_id = find_disk(backend, &device).map_err(|_| QmpError::device_not_found(&device))?;
    let top = commit_layer(backend, &drive_id, (top, top_node), "top")?;
    let base = commit_layer(backend, &drive_id, (base, base_node), "base")?;
    let args = CommitArgs {
        job_id,
        top,
        base,
        backing_file,
        end: job_end(auto_finalize, auto_dismiss, on_error),
        speed: speed.unwrap_or(0),
    };
    backend.block_commit(&drive_id, args).map_err(job_error)?;
    Ok(json!({}))
}

/// `block-stream`: the disk by drive id or by its top's node name.
fn stream(mut args: Args, backend: &mut dyn MonitorBackend) -> Result<Value, QmpError> {
    let job_id = args.optional_str("job-id")?;
    let device = args.required_str("device")?;
    let base = args.optional_str("base")?;
    let base_node = args.optional_str("base-node")?;
    let backing_file = args.optional_str("backing-file")?;
    let speed_arg = args.optional_i64("speed")?;
    let on_error_arg = args.optional_str("on-error")?;
    let auto_finalize = args.optional_bool("auto-finalize")?;
    let auto_dismiss = args.optional_bool("auto-dismiss")?;
    args.finish()?;
    let on_error = parse_on_error(on_error_arg)?;
    if base.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    let drive_id = find_disk(backend, &device)?;
    let base = match base_node {
        Some(name) => match node_depth(backend, &drive_id, &name)? {
            Some(depth) if depth > 0 => Some(Layer::Node { name, depth }),
            _ => {
                return Err(QmpError::generic(format!(
                    "Node '{name}' is not a backing image of '{device}'"
                )))
            }
        },
        None => base.map(Layer::File),
    };
    backend
        .block_stream(
            &drive_id,
            StreamArgs {
                job_id,
                base,
                backing_file,
                end: job_end(auto_finalize, auto_dismiss, on_error),
                speed: speed_arg.unwrap_or(0),
            },
        )
        .map_err(job_error)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::backend::RunState;
    use crate::monitor::test_backend::RecordingBackend;

    fn call(backend: &mut RecordingBackend, command: &str, args: Value) -> Value {
        let Value::Object(members) = args else {
            panic!("arguments are an object");
        };
        match execute(command, Args::new(members), backend) {
            Ok(v) => json!({"return": v}),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        }
    }

    #[test]
    fn job_commands_read_qemus_arguments() {
        let mut b = RecordingBackend::new(RunState::Running);
        let ok = json!({"return": {}});
        let stream = json!({"device": "d0", "job-id": "s", "base": "/b", "backing-file": "b",
                            "speed": 7, "on-error": "stop", "auto-finalize": false});
        assert_eq!(call(&mut b, "block-stream", stream), ok);
        // By the top's node name, the drive's id then reaches the VM.
        assert_eq!(
            call(&mut b, "block-stream", json!({"device": "#block1"})),
            ok
        );
        let commit = json!({"device": "d0", "job-id": "c", "top": "/m", "base": "/b",
                            "backing-file": "b", "speed": 9, "backing-mask-protocol": true,
                            "auto-dismiss": false, "on-error": "enospc"});
        assert_eq!(call(&mut b, "block-commit", commit), ok);
        // By node names: the images' depths in the disk's chain.
        let by_node = json!({"device": "d0", "base-node": "#block4"});
        assert_eq!(call(&mut b, "block-stream", by_node), ok);
        let by_node = json!({"device": "d0", "top-node": "#block0", "base-node": "#block4",
                             "on-error": "auto"});
        assert_eq!(call(&mut b, "block-commit", by_node), ok);
        for (command, args) in [
            ("block-job-cancel", json!({"device": "j0", "force": true})),
            ("block-job-pause", json!({"device": "j0"})),
            ("block-job-resume", json!({"device": "j0"})),
            ("block-job-set-speed", json!({"device": "j0", "speed": -3})),
            ("block-job-complete", json!({"device": "j0"})),
            ("job-finalize", json!({"id": "j0"})),
            ("block-job-dismiss", json!({"id": "j0"})),
        ] {
            assert_eq!(call(&mut b, command, args), ok, "{command}");
        }
        assert_eq!(
            call(&mut b, "query-block-jobs", json!({})),
            json!({"return": []})
        );
        let calls = b.calls.lock().expect("log").clone();
        assert_eq!(
            calls,
            [
                r#"stream d0 StreamArgs { job_id: Some("s"), base: Some(File("/b")), backing_file: Some("b"), end: JobEnd { finalize: false, dismiss: true, on_error: Stop }, speed: 7 }"#,
                "stream d1 StreamArgs { job_id: None, base: None, backing_file: None, end: JobEnd { finalize: true, dismiss: true, on_error: Report }, speed: 0 }",
                r#"commit d0 CommitArgs { job_id: Some("c"), top: Some(File("/m")), base: Some(File("/b")), backing_file: Some("b"), end: JobEnd { finalize: true, dismiss: false, on_error: Enospc }, speed: 9 }"#,
                r##"stream d0 StreamArgs { job_id: None, base: Some(Node { name: "#block4", depth: 1 }), backing_file: None, end: JobEnd { finalize: true, dismiss: true, on_error: Report }, speed: 0 }"##,
                r##"commit d0 CommitArgs { job_id: None, top: Some(Node { name: "#block0", depth: 0 }), base: Some(Node { name: "#block4", depth: 1 }), backing_file: None, end: JobEnd { finalize: true, dismiss: true, on_error: Enospc }, speed: 0 }"##,
                "job j0 Cancel { force: true }",
                "job j0 Pause",
                "job j0 Resume",
                "job j0 SetSpeed(-3)",
                "job j0 Complete",
                "job j0 Finalize",
                "job j0 Dismiss",
                "block_jobs",
            ]
        );
    }

    #[test]
    fn job_command_errors_have_qemus_classes() {
        let mut b = RecordingBackend::new(RunState::Running);
        let err = |class: &str, desc: &str| json!({"error": {"class": class, "desc": desc}});
        let cases = [
            (
                "block-job-pause",
                json!({"device": "x"}),
                err("DeviceNotActive", "Block job 'x' not found"),
            ),
            (
                "block-stream",
                json!({"device": "d0", "on-error": "bogus"}),
                err(
                    "GenericError",
                    "Parameter 'on-error' does not accept value 'bogus'",
                ),
            ),
            (
                "job-dismiss",
                json!({"id": "x"}),
                err("GenericError", "Job not found"),
            ),
            (
                "block-job-finalize",
                json!({"id": "x"}),
                err("DeviceNotActive", "Block job 'x' not found"),
            ),
            (
                "job-finalize",
                json!({"device": "j0"}),
                err("GenericError", "Parameter 'id' is missing"),
            ),
            (
                "block-job-pause",
                json!({}),
                err("GenericError", "Parameter 'device' is missing"),
            ),
            (
                "block-job-set-speed",
                json!({"device": "j0"}),
                err("GenericError", "Parameter 'speed' is missing"),
            ),
            (
                "block-job-set-speed",
                json!({"device": "j0", "speed": 1.5}),
                err(
                    "GenericError",
                    "Invalid parameter type for 'speed', expected: integer",
                ),
            ),
            (
                "block-stream",
                json!({"device": "d0", "base": "a", "base-node": "b"}),
                err(
                    "GenericError",
                    "'base' and 'base-node' cannot be specified at the same time",
                ),
            ),
            (
                "block-stream",
                json!({"device": "nope"}),
                err(
                    "GenericError",
                    "Cannot find device='nope' nor node-name='nope'",
                ),
            ),
            (
                "block-commit",
                json!({"device": "nope"}),
                err("DeviceNotFound", "Device 'nope' not found"),
            ),
            (
                "block-commit",
                json!({"device": "d0", "top-node": "n"}),
                err("GenericError", "Cannot find device='' nor node-name='n'"),
            ),
            (
                "block-stream",
                json!({"device": "d0", "base-node": "#block0"}),
                err(
                    "GenericError",
                    "Node '#block0' is not a backing image of 'd0'",
                ),
            ),
            (
                "block-stream",
                json!({"device": "d0", "base-node": "#block1"}),
                err(
                    "GenericError",
                    "Node '#block1' is not a backing image of 'd0'",
                ),
            ),
            (
                "block-stream",
                json!({"device": "d0", "base-node": "#block3"}),
                err(
                    "GenericError",
                    "Node '#block3' is not a backing image of 'd0'",
                ),
            ),
            (
                "block-commit",
                json!({"device": "d0", "top": "/t", "top-node": "#block0"}),
                err(
                    "GenericError",
                    "'top-node' and 'top' are mutually exclusive",
                ),
            ),
            (
                "block-commit",
                json!({"device": "d0", "base": "/b", "base-node": "#block4"}),
                err(
                    "GenericError",
                    "'base-node' and 'base' are mutually exclusive",
                ),
            ),
            (
                "block-commit",
                json!({"device": "d0", "top-node": "#block1"}),
                err(
                    "GenericError",
                    "'#block1' is not in this backing file chain",
                ),
            ),
            (
                "block-commit",
                json!({"device": "d0", "base-node": "#block2"}),
                err(
                    "GenericError",
                    "'#block2' is not in this backing file chain",
                ),
            ),
            (
                "block-stream",
                json!({"device": "d0", "bogus": 1}),
                err("GenericError", "Parameter 'bogus' is unexpected"),
            ),
        ];
        for (command, args, want) in cases {
            assert_eq!(
                call(&mut b, command, args.clone()),
                want,
                "{command} {args}"
            );
        }
        assert!(b.calls.lock().expect("log").is_empty());
    }
}
