//! The disk flags, with QEMU's syntax: `-object iothread,id=ID,poll-max-ns=,...`,
//! `-drive file=...,if=none|virtio,...` and `-device virtio-blk-device,drive=ID,...`, parsed into
//! typed specifications and paired into the list of disks the VM gets ([`plan`]). `-object` and
//! `-device` also take QEMU's JSON form (`-object '{"qom-type":"iothread","id":"io0"}'`), read
//! into the same options ([`Options::parse_json_or_keyval`]). `-global DRIVER.PROPERTY=VALUE`
//! (or `driver=,property=,value=`) gives every device of a driver, `if=virtio`'s too, a default
//! for one of its properties, which the device's own value overrides, as in QEMU; unlike QEMU,
//! which only warns about a driver it has no class for, an unknown driver or property is refused.
//!
//! Everything that can be checked without touching a file is checked here, before the VM exists:
//! unknown keys and values, an unknown drive or iothread id, a drive given to two devices, ids
//! given twice. What needs the files (a missing file, a lock held by another writer, a read-write
//! disk on a read-only file, a format that would have to be guessed unsafely) is checked when the
//! images are opened (`crate::disks`), still before the guest starts, and so is a host without
//! io_uring for `aio=io_uring`. Values QEMU has and this VMM does not implement (`aio=native`,
//! `if=ide`, ...) are refused by name, never silently taken as something else.

use std::path::PathBuf;

use block::aio::Engine;
use block::qcow2::{CacheSizeError, CacheSizes};
use block::{CacheMode, DetectZeroes, Format, WritePolicy};
use devices::context::{PollSetting, PollSettings};
use devices::virtio::block::mapping::{self, MappingError, VqMapping};
use devices::virtio::block::ErrorPolicy;

use crate::options::{JsonType, MemorySize, OptionError, OptionValue, Options};

/// Errors in the disk flags.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveError {
    /// An option string that does not parse.
    #[error("Invalid {flag}")]
    Option {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        #[source]
        source: OptionError,
    },
    /// `-object` of a type other than iothread.
    #[error("-object: unsupported object type '{0}' (only iothread)")]
    ObjectType(String),
    /// A key the flag cannot do without.
    #[error("{flag} needs {key}=")]
    MissingKey {
        /// The flag.
        flag: &'static str,
        /// The key.
        key: &'static str,
    },
    /// A value QEMU knows that this VMM does not implement.
    #[error("-drive {key}={value} is not supported (supported: {supported})")]
    Unsupported {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What is.
        supported: &'static str,
    },
    /// A `-device` driver other than virtio-blk-device.
    #[error("-device: unsupported driver '{0}' (only virtio-blk-device and virtio-blk-pci)")]
    DeviceDriver(String),
    /// Two objects of one kind with the same id.
    #[error("Duplicate {kind} id '{id}'")]
    DuplicateId {
        /// `iothread`, `drive` or `device`.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// `-device drive=` names no `-drive`.
    #[error("-device: no drive with id '{0}'")]
    UnknownDrive(String),
    /// `-device iothread=` names no `-object iothread`.
    #[error("-device: no iothread with id '{0}'")]
    UnknownIothread(String),
    /// `iothread=` beside `iothread-vq-mapping` (QEMU's words).
    #[error("-device: iothread and iothread-vq-mapping properties cannot be set at the same time")]
    IothreadWithMapping,
    /// An `iothread-vq-mapping` QEMU refuses.
    #[error("-device")]
    VqMapping(#[from] MappingError),
    /// Two devices given the same drive (or a device given an `if=virtio` drive).
    #[error("Drive '{0}' is already in use by another device")]
    DriveInUse(String),
    /// `-global` for a driver other than virtio-blk's (QEMU's words; QEMU only warns).
    #[error("-global: global {driver}.{property} has invalid class name (only virtio-blk-device and virtio-blk-pci)")]
    GlobalDriver {
        /// The driver.
        driver: String,
        /// The property.
        property: String,
    },
    /// `-global` for a property the driver does not have (QEMU's words).
    #[error("-global: can't apply global {driver}.{property}={value}: Property '{driver}.{property}' not found")]
    GlobalProperty {
        /// The driver.
        driver: String,
        /// The property.
        property: String,
        /// The value.
        value: String,
    },
    /// `-global driver=,property=,value=` without one of the three (QEMU's words).
    #[error("-global: options 'driver', 'property', and 'value' are required")]
    GlobalIncomplete,
    /// A `-global` value that its property cannot take, found when a device of its driver
    /// applies it (QEMU's words).
    #[error("-device: can't apply global {}.{}={}", global.driver, global.property, global.value)]
    GlobalValue {
        /// The global.
        global: Box<GlobalProperty>,
        /// What is wrong.
        #[source]
        source: OptionError,
    },
    /// qcow2 cache sizes that contradict each other.
    #[error("-drive")]
    CacheSize(#[from] CacheSizeError),
}

/// `-drive cache=`: QEMU's five modes as the host page cache (`cache.direct`: O_DIRECT or not)
/// and what happens to writes and flushes on top (`cache.writeback` off: every write durable
/// before it completes; `cache.no-flush`: flushes dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSetting {
    /// O_DIRECT (`none`, `directsync`) or the host page cache.
    pub host: CacheMode,
    /// Write-through (`writethrough`, `directsync`), flushes ignored (`unsafe`), or neither.
    pub policy: WritePolicy,
}

impl Default for CacheSetting {
    /// QEMU's default, `cache=writeback`.
    fn default() -> Self {
        CacheSetting {
            host: CacheMode::Writeback,
            policy: WritePolicy::WriteBack,
        }
    }
}

impl OptionValue for CacheSetting {
    const EXPECTED: &'static str = "none, writeback, writethrough, directsync or unsafe";
    fn parse(text: &str) -> Option<Self> {
        let (host, policy) = match text {
            "writeback" => (CacheMode::Writeback, WritePolicy::WriteBack),
            "none" => (CacheMode::None, WritePolicy::WriteBack),
            "writethrough" => (CacheMode::Writeback, WritePolicy::WriteThrough),
            "directsync" => (CacheMode::None, WritePolicy::WriteThrough),
            "unsafe" => (CacheMode::Writeback, WritePolicy::IgnoreFlush),
            _ => return None,
        };
        Some(CacheSetting { host, policy })
    }
}

/// `-drive format=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FormatValue(Format);

impl OptionValue for FormatValue {
    const EXPECTED: &'static str = "raw or qcow2";
    fn parse(text: &str) -> Option<Self> {
        Format::parse(text).map(Self)
    }
}

/// `-drive stats-intervals=`: seconds, several separated by `:` (QEMU's legacy list form).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Intervals(Vec<u32>);

impl OptionValue for Intervals {
    const EXPECTED: &'static str = "seconds, e.g. 60 or 1:60";
    fn parse(text: &str) -> Option<Self> {
        text.split(':')
            .map(|s| s.parse::<u32>().ok().filter(|&n| n > 0))
            .collect::<Option<Vec<_>>>()
            .map(Self)
    }
}

/// `-drive l2-cache-size=` and the other cache sizes: bytes, with an optional K, M, G, T, P or E
/// suffix (QEMU's size options: a bare number is bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bytes(u64);

impl OptionValue for Bytes {
    const EXPECTED: &'static str = "a size in bytes such as 1048576, 64K or 1M";
    fn parse(text: &str) -> Option<Self> {
        match text.parse::<u64>() {
            Ok(n) => Some(Bytes(n)),
            Err(_) if text.ends_with(|c: char| c.is_ascii_alphabetic()) => {
                MemorySize::parse(text).map(|m| Bytes(m.0))
            }
            Err(_) => None,
        }
    }
}

/// A QOM integer property of an iothread (`poll-max-ns` and the others): QEMU keeps them as
/// signed 64-bit numbers that must not be negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QomInt(pub u64);

impl QomInt {
    /// The largest value QEMU takes.
    pub const MAX: u64 = 0x7fff_ffff_ffff_ffff;
}

impl OptionValue for QomInt {
    const EXPECTED: &'static str = "a number from 0 to 9223372036854775807";
    const JSON: JsonType = JsonType::Integer;
    fn parse(text: &str) -> Option<Self> {
        text.parse().ok().filter(|&n| n <= Self::MAX).map(QomInt)
    }
}

/// One `-object iothread`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoThreadSpec {
    /// `id=`.
    pub id: String,
    /// `poll-max-ns=`, `poll-grow=`, `poll-shrink=` and `aio-max-batch=`, QEMU's defaults where
    /// not given.
    pub poll: PollSettings,
}

/// One `-drive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// `id=` (for `if=virtio` without one, QEMU's `virtioN`).
    pub id: String,
    /// `file=`.
    pub file: PathBuf,
    /// `format=`; `None` means probe, which is refused where unsafe.
    pub format: Option<Format>,
    /// `if=virtio`: the drive brings its own virtio-blk device.
    pub virtio: bool,
    /// `cache=`.
    pub cache: CacheSetting,
    /// `readonly=`.
    pub read_only: bool,
    /// `discard=unmap` (QEMU's default is `ignore`).
    pub discard: bool,
    /// `detect-zeroes=` (QEMU's default is `off`).
    pub detect_zeroes: DetectZeroes,
    /// `aio=`: the engine doing the image I/O (QEMU's default is `threads`).
    pub aio: Engine,
    /// `stats-intervals=` in seconds.
    pub stats_intervals: Vec<u32>,
    /// `rerror=` (QEMU's default is `report`).
    pub on_read_error: ErrorPolicy,
    /// `werror=` (QEMU's default is `enospc`: stop on a full host disk, report other errors).
    pub on_write_error: ErrorPolicy,
    /// `l2-cache-size=`, `refcount-cache-size=`, `cache-size=` (qcow2 only).
    pub cache_sizes: CacheSizes,
    /// `node-name=`: the image's (format) node name in QMP; automatic without it.
    pub node_name: Option<String>,
}

/// The transport a virtio-blk device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `virtio-blk-device`: virtio-mmio, one interrupt line.
    Mmio,
    /// `virtio-blk-pci`: virtio-pci on the PCI root bus, an MSI-X vector per queue.
    Pci,
}

/// One `-device virtio-blk-device` or `virtio-blk-pci`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The driver: which transport.
    pub transport: Transport,
    /// `drive=`.
    pub drive: String,
    /// `id=`, the guest device's name (for `block-latency-histogram-set`).
    pub id: Option<String>,
    /// `iothread=`; `None` means the main loop.
    pub iothread: Option<String>,
    /// `serial=` (GET_ID).
    pub serial: String,
    /// `num-queues=`; without it, QEMU's default for the transport ([`DeviceSpec::queues`]).
    pub num_queues: Option<u16>,
    /// `iothread-vq-mapping` (JSON form only): the iothreads that serve the queues.
    pub vq_mapping: Option<Vec<VqMapping>>,
    /// `queue-size=`.
    pub queue_size: u16,
    /// `x-stage-timing=` (default on): the per-stage request timing of `x-query-blockstats-stages`;
    /// off only to measure what it costs.
    pub stage_timing: bool,
}

impl DeviceSpec {
    /// The number of queues: `num-queues=`, else one on virtio-mmio and one per vCPU on
    /// virtio-pci (QEMU 5.2 and later).
    pub fn queues(&self, vcpus: u8) -> u16 {
        self.num_queues.unwrap_or(match self.transport {
            Transport::Mmio => DEFAULT_NUM_QUEUES,
            Transport::Pci => u16::from(vcpus.max(1)),
        })
    }
}

/// One `-global DRIVER.PROPERTY=VALUE`: a default for one property of every device of a driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalProperty {
    /// The driver (`virtio-blk-device` or `virtio-blk-pci`).
    pub driver: String,
    /// One of the device's properties (`x-stage-timing`, `num-queues`, ...).
    pub property: String,
    /// The value, read as the property's type when a device applies it.
    pub value: String,
}

/// Queues of a disk served in one context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueGroup {
    /// The iothread; `None` means the main loop.
    pub iothread: Option<String>,
    /// The queues it serves.
    pub queues: Vec<u16>,
}

/// A disk the guest gets: a drive and the device presenting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image side.
    pub drive: DriveSpec,
    /// The guest side.
    pub device: DeviceSpec,
    /// Where its queues are served: one group (`iothread=` or the main loop), or one per
    /// `iothread-vq-mapping` entry.
    pub groups: Vec<QueueGroup>,
}

/// `iothread-vq-mapping`'s value: a JSON list of `{"iothread": ID, "vqs": [N, ...]}`, `vqs`
/// optional.
struct VqMappingList(Vec<VqMapping>);

/// One entry as it is written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VqMappingEntry {
    iothread: String,
    vqs: Option<Vec<u16>>,
}

impl OptionValue for VqMappingList {
    const EXPECTED: &'static str =
        r#"a list of {"iothread": ID, "vqs": [N, ...]} ("vqs" optional)"#;
    const JSON: JsonType = JsonType::Array;
    fn parse(text: &str) -> Option<Self> {
        let entries: Vec<VqMappingEntry> = serde_json::from_str(text).ok()?;
        Some(VqMappingList(
            entries
                .into_iter()
                .map(|e| VqMapping {
                    iothread: e.iothread,
                    vqs: e.vqs,
                })
                .collect(),
        ))
    }
}

/// The `-device` drivers and the transport of each.
const DEVICE_DRIVERS: [(&str, Transport); 2] = [
    ("virtio-blk-device", Transport::Mmio),
    ("virtio-blk-pci", Transport::Pci),
];

/// A virtio-blk device's properties: what `-device` sets beside `driver` and `id`, and what
/// `-global` can give every device of a driver.
const DEVICE_PROPERTIES: [&str; 6] = [
    "drive",
    "iothread",
    "serial",
    "num-queues",
    "queue-size",
    "x-stage-timing",
];

/// QEMU's defaults for virtio-blk.
const DEFAULT_NUM_QUEUES: u16 = 1;
const DEFAULT_QUEUE_SIZE: u16 = 256;

fn option_err(flag: &'static str) -> impl Fn(OptionError) -> DriveError {
    move |source| DriveError::Option { flag, source }
}

/// `-object iothread,id=ID,...`, or its JSON form.
pub fn parse_object(value: &str) -> Result<IoThreadSpec, DriveError> {
    let flag = "-object";
    let err = option_err(flag);
    let mut known = vec!["qom-type", "id"];
    known.extend(PollSetting::ALL.map(PollSetting::name));
    let opts = Options::parse_json_or_keyval(value, Some("qom-type"), &known).map_err(&err)?;
    let kind: String = opts.get("qom-type").map_err(&err)?.unwrap_or_default();
    if kind != "iothread" {
        return Err(DriveError::ObjectType(kind));
    }
    let id = opts
        .get("id")
        .map_err(&err)?
        .ok_or(DriveError::MissingKey { flag, key: "id" })?;
    let mut poll = PollSettings::default();
    for setting in PollSetting::ALL {
        if let Some(QomInt(n)) = opts.get(setting.name()).map_err(&err)? {
            poll.set(setting, n);
        }
    }
    Ok(IoThreadSpec { id, poll })
}

/// `-drive ...`; `index` numbers the drives, for the implicit id of `if=virtio`.
pub fn parse_drive(value: &str, index: usize) -> Result<DriveSpec, DriveError> {
    let flag = "-drive";
    let err = option_err(flag);
    let opts = Options::parse(
        value,
        None,
        &[
            "file",
            "format",
            "if",
            "id",
            "cache",
            "readonly",
            "aio",
            "discard",
            "detect-zeroes",
            "stats-intervals",
            "werror",
            "rerror",
            "node-name",
            "l2-cache-size",
            "refcount-cache-size",
            "cache-size",
        ],
    )
    .map_err(&err)?;
    // `node-name=`, checked by QEMU's rules: the image's node name in QMP.
    let node_name = opts.get::<String>("node-name").map_err(&err)?;
    if let Some(name) = node_name.clone() {
        let valid = name.len() <= 31
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !valid {
            return Err(DriveError::Unsupported {
                key: "node-name",
                value: name,
                supported: "up to 31 letters, digits, '-', '.' or '_', starting with a letter",
            });
        }
    }
    let file: String = opts
        .get("file")
        .map_err(&err)?
        .ok_or(DriveError::MissingKey { flag, key: "file" })?;
    let virtio = match opts.get::<String>("if").map_err(&err)?.as_deref() {
        None | Some("none") => false,
        Some("virtio") => true,
        Some(other) => {
            return Err(DriveError::Unsupported {
                key: "if",
                value: other.to_owned(),
                supported: "none, virtio",
            })
        }
    };
    let cache = match opts.get::<String>("cache").map_err(&err)? {
        None => CacheSetting::default(),
        Some(v) => match CacheSetting::parse(&v) {
            Some(c) => c,
            None => {
                return Err(DriveError::Unsupported {
                    key: "cache",
                    value: v,
                    supported: CacheSetting::EXPECTED,
                })
            }
        },
    };
    let aio = match opts.get::<String>("aio").map_err(&err)?.as_deref() {
        None | Some("threads") => Engine::Threads,
        Some("io_uring") => Engine::IoUring,
        Some(other) => {
            return Err(DriveError::Unsupported {
                key: "aio",
                value: other.to_owned(),
                supported: "threads, io_uring",
            })
        }
    };
    let discard = match opts.get::<String>("discard").map_err(&err)?.as_deref() {
        None | Some("ignore" | "off") => false,
        Some("unmap" | "on") => true,
        Some(other) => {
            return Err(DriveError::Unsupported {
                key: "discard",
                value: other.to_owned(),
                supported: "ignore, unmap",
            })
        }
    };
    let detect_zeroes = match opts
        .get::<String>("detect-zeroes")
        .map_err(&err)?
        .as_deref()
    {
        None | Some("off") => DetectZeroes::Off,
        Some("on") => DetectZeroes::On,
        // As in QEMU, unmapping needs discard=unmap too; without it, zeroes stay allocated.
        Some("unmap") if discard => DetectZeroes::Unmap,
        Some("unmap") => DetectZeroes::On,
        Some(other) => {
            return Err(DriveError::Unsupported {
                key: "detect-zeroes",
                value: other.to_owned(),
                supported: "off, on, unmap",
            })
        }
    };
    let on_write_error = match opts.get::<String>("werror").map_err(&err)?.as_deref() {
        None => ErrorPolicy::WRITE_DEFAULT,
        Some("enospc") => ErrorPolicy::Enospc,
        Some(other) => error_policy(other).ok_or_else(|| DriveError::Unsupported {
            key: "werror",
            value: other.to_owned(),
            supported: "enospc, stop, report, ignore",
        })?,
    };
    // As in QEMU, `enospc` is for writes only.
    let on_read_error = match opts.get::<String>("rerror").map_err(&err)?.as_deref() {
        None => ErrorPolicy::READ_DEFAULT,
        Some(other) => error_policy(other).ok_or_else(|| DriveError::Unsupported {
            key: "rerror",
            value: other.to_owned(),
            supported: "stop, report, ignore",
        })?,
    };
    let size = |key| opts.get::<Bytes>(key).map(|b| b.map(|b| b.0)).map_err(&err);
    let cache_sizes = CacheSizes::new(
        size("l2-cache-size")?,
        size("refcount-cache-size")?,
        size("cache-size")?,
    )?;
    let id = match opts.get::<String>("id").map_err(&err)? {
        Some(id) => id,
        None if virtio => format!("virtio{index}"),
        None => return Err(DriveError::MissingKey { flag, key: "id" }),
    };
    Ok(DriveSpec {
        id,
        file: PathBuf::from(file),
        format: opts
            .get::<FormatValue>("format")
            .map_err(&err)?
            .map(|f| f.0),
        virtio,
        cache,
        read_only: opts.get("readonly").map_err(&err)?.unwrap_or(false),
        discard,
        detect_zeroes,
        aio,
        stats_intervals: opts
            .get::<Intervals>("stats-intervals")
            .map_err(&err)?
            .map_or_else(Vec::new, |i| i.0),
        on_read_error,
        on_write_error,
        cache_sizes,
        node_name,
    })
}

/// The error policies `werror=` and `rerror=` share.
fn error_policy(text: &str) -> Option<ErrorPolicy> {
    match text {
        "stop" => Some(ErrorPolicy::Stop),
        "report" => Some(ErrorPolicy::Report),
        "ignore" => Some(ErrorPolicy::Ignore),
        _ => None,
    }
}

/// `-device virtio-blk-device,drive=ID,...` or `-device virtio-blk-pci,drive=ID,...`, or their
/// JSON form, with the `globals` for its driver as defaults.
pub fn parse_device(value: &str, globals: &[GlobalProperty]) -> Result<DeviceSpec, DriveError> {
    let mut known = vec!["driver", "id", "iothread-vq-mapping"];
    known.extend(DEVICE_PROPERTIES);
    let opts = Options::parse_json_or_keyval(value, Some("driver"), &known)
        .map_err(option_err("-device"))?;
    device(&opts, globals)
}

/// The device `opts` describe, a property they do not give taken from the last of `globals`
/// for the device's driver that gives it.
fn device(opts: &Options, globals: &[GlobalProperty]) -> Result<DeviceSpec, DriveError> {
    let flag = "-device";
    let driver: String = opts
        .get("driver")
        .map_err(option_err(flag))?
        .unwrap_or_default();
    let Some(&(_, transport)) = DEVICE_DRIVERS.iter().find(|(d, _)| *d == driver) else {
        return Err(DriveError::DeviceDriver(driver));
    };
    let props = Properties {
        opts,
        driver: &driver,
        globals,
    };
    let iothread = props.get("iothread")?;
    let vq_mapping = opts
        .get::<VqMappingList>("iothread-vq-mapping")
        .map_err(option_err(flag))?
        .map(|list| list.0);
    if iothread.is_some() && vq_mapping.is_some() {
        return Err(DriveError::IothreadWithMapping);
    }
    Ok(DeviceSpec {
        transport,
        drive: props
            .get("drive")?
            .ok_or(DriveError::MissingKey { flag, key: "drive" })?,
        id: opts.get("id").map_err(option_err(flag))?,
        iothread,
        serial: props.get("serial")?.unwrap_or_default(),
        num_queues: props.get("num-queues")?,
        vq_mapping,
        queue_size: props.get("queue-size")?.unwrap_or(DEFAULT_QUEUE_SIZE),
        stage_timing: props.get("x-stage-timing")?.unwrap_or(true),
    })
}

/// A device's properties: its own options, then the `-global`s for its driver.
struct Properties<'a> {
    opts: &'a Options,
    driver: &'a str,
    globals: &'a [GlobalProperty],
}

impl Properties<'_> {
    /// The value of `key`: the device's own, else the last `-global` for its driver's.
    fn get<T: OptionValue>(&self, key: &str) -> Result<Option<T>, DriveError> {
        if let Some(value) = self.opts.get(key).map_err(option_err("-device"))? {
            return Ok(Some(value));
        }
        let Some(global) = self
            .globals
            .iter()
            .rev()
            .find(|g| g.driver == self.driver && g.property == key)
        else {
            return Ok(None);
        };
        Options::from_pairs([(key, global.value.as_str())])
            .get(key)
            .map_err(|source| DriveError::GlobalValue {
                global: Box::new(global.clone()),
                source,
            })
    }
}

/// `-global DRIVER.PROPERTY=VALUE` or `-global driver=DRIVER,property=PROPERTY,value=VALUE`.
/// The first form is read as QEMU reads it: the driver ends at the first `.` or `=`, which must
/// be a `.`, the property at the next `=`; anything else is taken as the second form.
pub fn parse_global(text: &str) -> Result<GlobalProperty, DriveError> {
    let dotted = text
        .find(['.', '='])
        .filter(|&i| i > 0 && text[i..].starts_with('.'))
        .and_then(|i| {
            let (property, value) = text[i + 1..].split_once('=')?;
            (!property.is_empty()).then(|| (&text[..i], property, value))
        });
    let (driver, property, value) = match dotted {
        Some((d, p, v)) => (d.to_owned(), p.to_owned(), v.to_owned()),
        None => {
            let err = option_err("-global");
            let opts =
                Options::parse(text, None, &["driver", "property", "value"]).map_err(&err)?;
            let get = |key| opts.get::<String>(key).map_err(&err);
            match (get("driver")?, get("property")?, get("value")?) {
                (Some(d), Some(p), Some(v)) => (d, p, v),
                _ => return Err(DriveError::GlobalIncomplete),
            }
        }
    };
    if !DEVICE_DRIVERS.iter().any(|(d, _)| *d == driver) {
        return Err(DriveError::GlobalDriver { driver, property });
    }
    if !DEVICE_PROPERTIES.contains(&property.as_str()) {
        return Err(DriveError::GlobalProperty {
            driver,
            property,
            value,
        });
    }
    Ok(GlobalProperty {
        driver,
        property,
        value,
    })
}

/// Which context serves which of `device`'s queues on a machine with `vcpus` vCPUs: one group
/// (its `iothread`, else the main loop), or one per `iothread-vq-mapping` entry.
fn queue_groups(
    device: &DeviceSpec,
    vcpus: u8,
    iothreads: &[String],
) -> Result<Vec<QueueGroup>, DriveError> {
    let queues = device.queues(vcpus);
    Ok(match &device.vq_mapping {
        None => vec![QueueGroup {
            iothread: device.iothread.clone(),
            queues: (0..queues).collect(),
        }],
        Some(list) => mapping::assign(list, queues, |id| iothreads.iter().any(|t| t == id))?
            .into_iter()
            .zip(list)
            .map(|(queues, entry)| QueueGroup {
                iothread: Some(entry.iothread.clone()),
                queues,
            })
            .collect(),
    })
}

/// Refuses a second `id` of `kind` among `ids`.
fn unique<'a>(kind: &'static str, ids: impl Iterator<Item = &'a str>) -> Result<(), DriveError> {
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(DriveError::DuplicateId {
                kind,
                id: id.to_owned(),
            });
        }
    }
    Ok(())
}

/// Pairs drives with devices: every `-device` takes the drive it names, every `if=virtio` drive
/// gets a device of its own (on the main loop), in command-line order (devices first), and
/// says which context serves which of its queues (`iothread-vq-mapping` checked for a machine
/// with `vcpus` vCPUs). A drive with `if=none` and no device is left out, as QEMU leaves it
/// unused.
pub fn plan(
    iothreads: &[String],
    drives: &[DriveSpec],
    devices: &[DeviceSpec],
    globals: &[GlobalProperty],
    vcpus: u8,
) -> Result<Vec<DiskSpec>, DriveError> {
    unique("iothread", iothreads.iter().map(String::as_str))?;
    unique("drive", drives.iter().map(|d| d.id.as_str()))?;
    unique("device", devices.iter().filter_map(|d| d.id.as_deref()))?;
    let mut used = vec![false; drives.len()];
    let mut disks = Vec::with_capacity(drives.len());
    for device in devices {
        let index = drives
            .iter()
            .position(|d| d.id == device.drive)
            .ok_or_else(|| DriveError::UnknownDrive(device.drive.clone()))?;
        if used[index] || drives[index].virtio {
            return Err(DriveError::DriveInUse(device.drive.clone()));
        }
        used[index] = true;
        disks.push(DiskSpec {
            drive: drives[index].clone(),
            groups: queue_groups(device, vcpus, iothreads)?,
            device: device.clone(),
        });
    }
    for drive in drives.iter().filter(|d| d.virtio) {
        let opts = Options::from_pairs([("driver", "virtio-blk-device"), ("drive", &drive.id)]);
        let device = device(&opts, globals)?;
        disks.push(DiskSpec {
            drive: drive.clone(),
            groups: queue_groups(&device, vcpus, iothreads)?,
            device,
        });
    }
    for disk in &disks {
        if let Some(t) = &disk.device.iothread {
            if !iothreads.contains(t) {
                return Err(DriveError::UnknownIothread(t.clone()));
            }
        }
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(s: &str) -> DriveSpec {
        parse_drive(s, 0).expect("parses")
    }

    #[test]
    fn qemu_forms_parse() {
        assert_eq!(
            parse_object("iothread,id=io0"),
            Ok(IoThreadSpec {
                id: "io0".to_owned(),
                poll: PollSettings::default()
            })
        );
        let d = drive(
            "file=top.qcow2,format=qcow2,if=none,id=d0,cache=none,readonly=on,aio=threads,\
             discard=unmap,detect-zeroes=off,stats-intervals=1:60",
        );
        assert_eq!(
            d,
            DriveSpec {
                id: "d0".into(),
                file: "top.qcow2".into(),
                format: Some(Format::Qcow2),
                virtio: false,
                cache: CacheSetting {
                    host: CacheMode::None,
                    policy: WritePolicy::WriteBack,
                },
                read_only: true,
                discard: true,
                detect_zeroes: DetectZeroes::Off,
                aio: Engine::Threads,
                stats_intervals: vec![1, 60],
                on_read_error: ErrorPolicy::Report,
                on_write_error: ErrorPolicy::Enospc,
                cache_sizes: CacheSizes::default(),
                node_name: None,
            }
        );
        assert_eq!(
            drive("file=f,id=d,format=raw,node-name=top").node_name,
            Some("top".to_owned())
        );
        for (opts, l2, refcount, total) in [
            ("l2-cache-size=64K", Some(65536), None, None),
            ("refcount-cache-size=2048", None, Some(2048), None),
            (
                "cache-size=1M,l2-cache-size=512k",
                Some(512 << 10),
                None,
                Some(1 << 20),
            ),
            (
                "cache-size=1.5M,refcount-cache-size=1024",
                None,
                Some(1024),
                Some(3 << 19),
            ),
        ] {
            let d = drive(&format!("file=f,id=d,format=qcow2,{opts}"));
            assert_eq!(
                d.cache_sizes,
                CacheSizes::new(l2, refcount, total).expect("consistent"),
                "{opts}"
            );
        }
        for (opts, read, write) in [
            (
                "werror=stop,rerror=stop",
                ErrorPolicy::Stop,
                ErrorPolicy::Stop,
            ),
            (
                "werror=report,rerror=ignore",
                ErrorPolicy::Ignore,
                ErrorPolicy::Report,
            ),
            ("werror=ignore", ErrorPolicy::Report, ErrorPolicy::Ignore),
            (
                "werror=enospc,rerror=report",
                ErrorPolicy::Report,
                ErrorPolicy::Enospc,
            ),
        ] {
            let d = drive(&format!("file=f,id=d,{opts}"));
            assert_eq!((d.on_read_error, d.on_write_error), (read, write), "{opts}");
        }
        let v = parse_drive("file=a,,b.img,format=raw,if=virtio", 3).expect("parses");
        assert_eq!(
            (v.id.as_str(), v.file.to_str()),
            ("virtio3", Some("a,b.img"))
        );
        assert_eq!(
            (v.cache, v.read_only, v.discard, v.aio),
            (CacheSetting::default(), false, false, Engine::Threads)
        );
        assert_eq!(drive("file=f,id=d,aio=io_uring").aio, Engine::IoUring);
        assert_eq!(drive("file=f,id=d,aio=threads").aio, Engine::Threads);
        for (mode, host, policy) in [
            ("writeback", CacheMode::Writeback, WritePolicy::WriteBack),
            ("none", CacheMode::None, WritePolicy::WriteBack),
            (
                "writethrough",
                CacheMode::Writeback,
                WritePolicy::WriteThrough,
            ),
            ("directsync", CacheMode::None, WritePolicy::WriteThrough),
            ("unsafe", CacheMode::Writeback, WritePolicy::IgnoreFlush),
        ] {
            let d = drive(&format!("file=f,id=d,cache={mode}"));
            assert_eq!(d.cache, CacheSetting { host, policy }, "{mode}");
        }
        for (opts, expected) in [
            ("detect-zeroes=off", DetectZeroes::Off),
            ("detect-zeroes=on", DetectZeroes::On),
            ("detect-zeroes=unmap", DetectZeroes::On),
            ("detect-zeroes=unmap,discard=unmap", DetectZeroes::Unmap),
        ] {
            let d = drive(&format!("file=f,id=d,{opts}"));
            assert_eq!(d.detect_zeroes, expected, "{opts}");
        }
        let dev = parse_device(
            "virtio-blk-device,drive=d0,id=vd0,iothread=io0,serial=S1,num-queues=2,queue-size=128",
            &[],
        )
        .expect("parses");
        assert_eq!(
            dev,
            DeviceSpec {
                transport: Transport::Mmio,
                drive: "d0".into(),
                id: Some("vd0".into()),
                iothread: Some("io0".into()),
                serial: "S1".into(),
                num_queues: Some(2),
                vq_mapping: None,
                queue_size: 128,
                stage_timing: true,
            }
        );
        let untimed =
            parse_device("virtio-blk-device,drive=d0,x-stage-timing=off", &[]).expect("parses");
        assert!(!untimed.stage_timing);
        assert_eq!(dev.queues(4), 2);
        let plain = parse_device("virtio-blk-device,drive=d0", &[]).expect("parses");
        assert_eq!((plain.queues(4), plain.queue_size), (1, 256));
        // virtio-blk-pci: a queue per vCPU unless told.
        let pci = parse_device("virtio-blk-pci,drive=d0,iothread=io0", &[]).expect("parses");
        assert_eq!(
            (pci.transport, pci.queues(4), pci.queues(1)),
            (Transport::Pci, 4, 1)
        );
        let pci = parse_device("virtio-blk-pci,drive=d0,num-queues=2", &[]).expect("parses");
        assert_eq!(pci.queues(4), 2);
    }

    #[test]
    fn iothread_polling_settings_in_both_forms() {
        let want = IoThreadSpec {
            id: "io0".to_owned(),
            poll: PollSettings {
                max_ns: 0,
                grow: 4,
                shrink: 9_223_372_036_854_775_807,
                aio_max_batch: 16,
            },
        };
        assert_eq!(
            parse_object(
                "iothread,id=io0,poll-max-ns=0,poll-grow=4,\
                 poll-shrink=9223372036854775807,aio-max-batch=16"
            ),
            Ok(want.clone())
        );
        assert_eq!(
            parse_object(
                r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": 0, "poll-grow": 4,
                    "poll-shrink": 9223372036854775807, "aio-max-batch": 16}"#
            ),
            Ok(want)
        );
        let partial = parse_object(r#"{"qom-type":"iothread","id":"io1","poll-grow":3}"#);
        assert_eq!(
            partial.map(|s| s.poll),
            Ok(PollSettings {
                grow: 3,
                ..PollSettings::default()
            })
        );
    }

    #[test]
    fn json_device_is_the_key_value_device() {
        assert_eq!(
            parse_device(
                r#"{"driver": "virtio-blk-device", "drive": "d0", "id": "vd0",
                    "iothread": "io0", "serial": "S1", "num-queues": 2, "queue-size": 128}"#,
                &[]
            ),
            parse_device(
                "virtio-blk-device,drive=d0,id=vd0,iothread=io0,serial=S1,num-queues=2,\
                 queue-size=128",
                &[]
            )
        );
    }

    #[test]
    fn json_forms_refuse_what_qemu_refuses() {
        let object_err = |text| match parse_object(text) {
            Err(DriveError::Option {
                flag: "-object",
                source,
            }) => source,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            object_err(r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": "0"}"#),
            OptionError::JsonType {
                key: "poll-max-ns".into(),
                expected: "integer"
            }
        );
        assert!(matches!(
            object_err(r#"{"qom-type": "iothread", "id": "io0", "poll-max-ns": -1}"#),
            OptionError::BadValue { .. }
        ));
        assert!(matches!(
            object_err(r#"{"qom-type": "iothread", "id": "io0""#),
            OptionError::Json { .. }
        ));
        assert_eq!(
            parse_object(r#"{"qom-type": "memory-backend-ram", "id": "m"}"#),
            Err(DriveError::ObjectType("memory-backend-ram".into()))
        );
        let device_err = |text: &str| match parse_device(text, &[]) {
            Err(DriveError::Option {
                flag: "-device",
                source,
            }) => source,
            other => panic!("{text}: {other:?}"),
        };
        // A mapping entry with a key QEMU does not know, or not a list of entries.
        for bad in [
            r#"[{"iothread": "io0", "queues": [0]}]"#,
            r#"[{"vqs": [0]}]"#,
            r#"[{"iothread": "io0", "vqs": [-1]}]"#,
            r#"["io0"]"#,
        ] {
            let e = device_err(&format!(
                r#"{{"driver": "virtio-blk-pci", "drive": "d0", "iothread-vq-mapping": {bad}}}"#
            ));
            assert!(
                matches!(&e, OptionError::BadValue { key, .. } if key == "iothread-vq-mapping"),
                "{bad}: {e:?}"
            );
        }
        // The key=value form cannot give a list, as in QEMU.
        assert_eq!(
            device_err("virtio-blk-pci,drive=d0,iothread-vq-mapping=io0"),
            OptionError::NeedsJson {
                key: "iothread-vq-mapping".into()
            }
        );
        assert_eq!(
            device_err(r#"{"driver": "virtio-blk-device", "drive": "d0", "num-queues": "2"}"#),
            OptionError::JsonType {
                key: "num-queues".into(),
                expected: "integer"
            }
        );
        assert_eq!(
            device_err(r#"{"driver": "virtio-blk-device", "drive": "d0", "drive": "d1"}"#),
            OptionError::Duplicate {
                key: "drive".into()
            }
        );
    }

    #[test]
    fn iothread_vq_mapping_is_read_and_planned_with_qemus_rules() {
        let dev = parse_device(
            r#"{"driver": "virtio-blk-pci", "drive": "d0",
                "iothread-vq-mapping": [{"iothread": "io0"}, {"iothread": "io1", "vqs": [1]}]}"#,
            &[],
        )
        .expect("parses");
        assert_eq!(
            dev.vq_mapping,
            Some(vec![
                VqMapping {
                    iothread: "io0".into(),
                    vqs: None
                },
                VqMapping {
                    iothread: "io1".into(),
                    vqs: Some(vec![1])
                },
            ])
        );
        assert_eq!(
            parse_device(
                r#"{"driver": "virtio-blk-pci", "drive": "d0", "iothread": "io0",
                    "iothread-vq-mapping": [{"iothread": "io1"}]}"#,
                &[]
            ),
            Err(DriveError::IothreadWithMapping)
        );
        let io = vec!["io0".to_owned(), "io1".to_owned()];
        let drives = vec![drive("file=a,format=raw,id=d0")];
        let planned = |device: &str, vcpus| {
            let device = parse_device(device, &[]).expect("parses");
            plan(&io, &drives, &[device], &[], vcpus).map(|disks| {
                disks[0]
                    .groups
                    .iter()
                    .map(|g| (g.iothread.clone().unwrap_or_default(), g.queues.clone()))
                    .collect::<Vec<_>>()
            })
        };
        let group = |id: &str, queues: &[u16]| (id.to_owned(), queues.to_vec());
        // Round-robin over num-queues, which defaults to the vCPUs on virtio-pci.
        let round_robin = r#"{"driver": "virtio-blk-pci", "drive": "d0",
            "iothread-vq-mapping": [{"iothread": "io0"}, {"iothread": "io1"}]}"#;
        assert_eq!(
            planned(round_robin, 4),
            Ok(vec![group("io0", &[0, 2]), group("io1", &[1, 3])])
        );
        let explicit = r#"{"driver": "virtio-blk-pci", "drive": "d0", "num-queues": 3,
            "iothread-vq-mapping": [{"iothread": "io1", "vqs": [0, 2]}, {"iothread": "io0", "vqs": [1]}]}"#;
        assert_eq!(
            planned(explicit, 1),
            Ok(vec![group("io1", &[0, 2]), group("io0", &[1])])
        );
        // Without a mapping, one group: the iothread's or the main loop's.
        assert_eq!(
            planned("virtio-blk-pci,drive=d0,iothread=io1,num-queues=2", 4),
            Ok(vec![group("io1", &[0, 1])])
        );
        // The rules (each message in devices' mapping.rs) refuse the plan.
        let unknown = r#"{"driver": "virtio-blk-pci", "drive": "d0",
            "iothread-vq-mapping": [{"iothread": "io0"}, {"iothread": "io9"}]}"#;
        let e = planned(unknown, 2);
        assert_eq!(
            e,
            Err(DriveError::VqMapping(MappingError::UnknownIothread(
                "io9".into()
            )))
        );
        let missing = r#"{"driver": "virtio-blk-pci", "drive": "d0",
            "iothread-vq-mapping": [{"iothread": "io0", "vqs": [0]}, {"iothread": "io1", "vqs": [2]}]}"#;
        assert_eq!(
            planned(missing, 3),
            Err(DriveError::VqMapping(MappingError::Missing(1)))
        );
    }

    #[test]
    fn parse_errors_by_variant() {
        assert_eq!(
            parse_object("memory-backend-ram,id=m"),
            Err(DriveError::ObjectType("memory-backend-ram".into()))
        );
        assert_eq!(
            parse_object("iothread"),
            Err(DriveError::MissingKey {
                flag: "-object",
                key: "id"
            })
        );
        assert!(matches!(
            parse_object("iothread,id=a,thread-pool-max=4"),
            Err(DriveError::Option {
                flag: "-object",
                source: OptionError::UnknownKey { .. }
            })
        ));
        for bad in ["-1", "9223372036854775808", "1k"] {
            assert!(
                matches!(
                    parse_object(&format!("iothread,id=a,poll-max-ns={bad}")),
                    Err(DriveError::Option {
                        flag: "-object",
                        source: OptionError::BadValue { .. }
                    })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse_drive("format=raw,id=d", 0),
            Err(DriveError::MissingKey {
                flag: "-drive",
                key: "file"
            })
        );
        assert_eq!(
            parse_drive("file=f,format=raw", 0),
            Err(DriveError::MissingKey {
                flag: "-drive",
                key: "id"
            })
        );
        for (line, key, value) in [
            ("file=f,id=d,cache=directio", "cache", "directio"),
            ("file=f,id=d,aio=native", "aio", "native"),
            ("file=f,id=d,detect-zeroes=yes", "detect-zeroes", "yes"),
            ("file=f,id=d,discard=maybe", "discard", "maybe"),
            ("file=f,id=d,if=ide", "if", "ide"),
            ("file=f,id=d,werror=pause", "werror", "pause"),
            ("file=f,id=d,rerror=enospc", "rerror", "enospc"),
        ] {
            assert!(
                matches!(parse_drive(line, 0), Err(DriveError::Unsupported { key: k, value: v, .. }) if k == key && v == value),
                "{line}"
            );
        }
        for (line, want) in [
            (
                "file=f,id=d,l2-cache-size=1k,refcount-cache-size=1k,cache-size=4k",
                CacheSizeError::AllThree,
            ),
            (
                "file=f,id=d,l2-cache-size=8k,cache-size=4k",
                CacheSizeError::L2ExceedsTotal {
                    l2: 8192,
                    total: 4096,
                },
            ),
            (
                "file=f,id=d,refcount-cache-size=8k,cache-size=4k",
                CacheSizeError::RefcountExceedsTotal {
                    refcount: 8192,
                    total: 4096,
                },
            ),
        ] {
            assert_eq!(
                parse_drive(line, 0),
                Err(DriveError::CacheSize(want)),
                "{line}"
            );
        }
        for line in [
            "file=f,id=d,l2-cache-size=1x",
            "file=f,id=d,cache-size=-1",
            "file=f,id=d,format=vmdk",
            "file=f,id=d,readonly=maybe",
            "file=f,id=d,stats-intervals=0",
            "file=f,id=d,stats-intervals=1:x",
        ] {
            assert!(
                matches!(
                    parse_drive(line, 0),
                    Err(DriveError::Option {
                        flag: "-drive",
                        source: OptionError::BadValue { .. }
                    })
                ),
                "{line}"
            );
        }
        assert_eq!(
            parse_device("virtio-scsi-pci,drive=d", &[]),
            Err(DriveError::DeviceDriver("virtio-scsi-pci".into()))
        );
        assert_eq!(
            parse_device("virtio-blk-device", &[]),
            Err(DriveError::MissingKey {
                flag: "-device",
                key: "drive"
            })
        );
        assert!(matches!(
            parse_device("virtio-blk-device,drive=d,queue-size=70000", &[]),
            Err(DriveError::Option {
                flag: "-device",
                source: OptionError::BadValue { .. }
            })
        ));
    }

    #[test]
    fn plan_pairs_and_checks_ids() {
        let io = vec!["io0".to_owned(), "io1".to_owned()];
        let drives = vec![
            drive("file=a,format=raw,id=d0"),
            drive("file=b,format=raw,id=d1"),
            drive("file=c,format=raw,if=virtio"),
            drive("file=e,format=raw,id=unused"),
        ];
        let dev = |s: &str| parse_device(s, &[]).expect("parses");
        let disks = plan(
            &io,
            &drives,
            &[
                dev("virtio-blk-device,drive=d1,iothread=io1"),
                dev("virtio-blk-device,drive=d0"),
            ],
            &[],
            1,
        )
        .expect("plans");
        let names: Vec<_> = disks
            .iter()
            .map(|d| (d.drive.id.as_str(), d.device.iothread.as_deref()))
            .collect();
        assert_eq!(
            names,
            [("d1", Some("io1")), ("d0", None), ("virtio0", None)]
        );

        let one = [dev("virtio-blk-device,drive=d0")];
        /// iothreads, drives, devices, and the error they make.
        type Case = (Vec<String>, Vec<DriveSpec>, Vec<DeviceSpec>, DriveError);
        let cases: Vec<Case> = vec![
            (
                vec!["x".into(), "x".into()],
                vec![],
                vec![],
                DriveError::DuplicateId {
                    kind: "iothread",
                    id: "x".into(),
                },
            ),
            (
                vec![],
                vec![drives[0].clone(), drives[0].clone()],
                vec![],
                DriveError::DuplicateId {
                    kind: "drive",
                    id: "d0".into(),
                },
            ),
            (
                vec![],
                drives.clone(),
                vec![
                    dev("virtio-blk-device,drive=d0,id=v"),
                    dev("virtio-blk-device,drive=d1,id=v"),
                ],
                DriveError::DuplicateId {
                    kind: "device",
                    id: "v".into(),
                },
            ),
            (
                vec![],
                vec![],
                one.to_vec(),
                DriveError::UnknownDrive("d0".into()),
            ),
            (
                vec![],
                drives.clone(),
                vec![one[0].clone(), one[0].clone()],
                DriveError::DriveInUse("d0".into()),
            ),
            (
                vec![],
                drives.clone(),
                vec![dev("virtio-blk-device,drive=virtio0")],
                DriveError::DriveInUse("virtio0".into()),
            ),
            (
                vec![],
                drives.clone(),
                vec![dev("virtio-blk-device,drive=d0,iothread=io9")],
                DriveError::UnknownIothread("io9".into()),
            ),
        ];
        for (io, drives, devices, want) in cases {
            let text = want.to_string();
            assert_eq!(plan(&io, &drives, &devices, &[], 1), Err(want), "{text}");
        }
    }

    #[test]
    fn globals_are_defaults_that_the_device_overrides() {
        let global = |s: &str| parse_global(s).expect("parses");
        let off = global("virtio-blk-device.x-stage-timing=off");
        assert_eq!(
            off,
            GlobalProperty {
                driver: "virtio-blk-device".into(),
                property: "x-stage-timing".into(),
                value: "off".into(),
            }
        );
        assert_eq!(
            global("driver=virtio-blk-device,property=x-stage-timing,value=off"),
            off
        );
        // The value is everything after the property's '=', commas and dots included.
        assert_eq!(
            global("virtio-blk-pci.serial=a.b,c=d").value,
            "a.b,c=d".to_owned()
        );
        let dev = |s: &str, globals: &[GlobalProperty]| parse_device(s, globals).expect("parses");
        let globals = [off.clone()];
        assert!(!dev("virtio-blk-device,drive=d0", &globals).stage_timing);
        assert!(!dev(r#"{"driver":"virtio-blk-device","drive":"d0"}"#, &globals).stage_timing);
        // The device's own value wins; another driver's global does not apply.
        assert!(dev("virtio-blk-device,drive=d0,x-stage-timing=on", &globals).stage_timing);
        assert!(dev("virtio-blk-pci,drive=d0", &globals).stage_timing);
        let pci = [global("virtio-blk-pci.x-stage-timing=off")];
        assert!(!dev("virtio-blk-pci,drive=d0", &pci).stage_timing);
        assert!(dev("virtio-blk-device,drive=d0", &pci).stage_timing);
        // Of two globals for one property, the later one.
        let twice = [
            global("virtio-blk-pci.num-queues=2"),
            global("virtio-blk-pci.queue-size=64"),
            global("virtio-blk-pci.num-queues=3"),
        ];
        let d = dev("virtio-blk-pci,drive=d0", &twice);
        assert_eq!((d.queues(8), d.queue_size), (3, 64));
        // Any property, drive= included, as in QEMU.
        let d = dev("virtio-blk-device", &[global("virtio-blk-device.drive=d7")]);
        assert_eq!(d.drive, "d7");
        // An if=virtio drive's device is a virtio-blk-device: its globals apply.
        let drives = [drive("file=c,format=raw,if=virtio")];
        let io = ["io0".to_owned()];
        let globals = [off, global("virtio-blk-device.iothread=io0")];
        let disks = plan(&io, &drives, &[], &globals, 1).expect("plans");
        assert!(!disks[0].device.stage_timing);
        assert_eq!(disks[0].device.iothread.as_deref(), Some("io0"));
        assert_eq!(
            disks[0].groups,
            [QueueGroup {
                iothread: Some("io0".into()),
                queues: vec![0],
            }]
        );
        assert_eq!(
            plan(&[], &drives, &[], &globals, 1),
            Err(DriveError::UnknownIothread("io0".into()))
        );
        // An iothread given by a -global is an iothread= like any other: not with a mapping.
        assert_eq!(
            parse_device(
                r#"{"driver": "virtio-blk-pci", "drive": "d0",
                    "iothread-vq-mapping": [{"iothread": "io1"}]}"#,
                &[global("virtio-blk-pci.iothread=io0")]
            ),
            Err(DriveError::IothreadWithMapping)
        );
    }

    #[test]
    fn global_errors_by_variant() {
        assert_eq!(
            parse_global("virtio-net-pci.mq=on"),
            Err(DriveError::GlobalDriver {
                driver: "virtio-net-pci".into(),
                property: "mq".into(),
            })
        );
        let unknown = parse_global("virtio-blk-device.foo=bar");
        assert_eq!(
            unknown,
            Err(DriveError::GlobalProperty {
                driver: "virtio-blk-device".into(),
                property: "foo".into(),
                value: "bar".into(),
            })
        );
        assert_eq!(
            unknown.map_err(|e| e.to_string()),
            Err("-global: can't apply global virtio-blk-device.foo=bar: \
                 Property 'virtio-blk-device.foo' not found"
                .into())
        );
        // Not a device property here: the device's name.
        assert!(matches!(
            parse_global("virtio-blk-pci.id=x"),
            Err(DriveError::GlobalProperty { .. })
        ));
        for incomplete in [
            "driver=virtio-blk-device,property=x-stage-timing",
            "virtio-blk-device.x-stage-timing",
        ] {
            let want: Result<GlobalProperty, DriveError> = if incomplete.contains('=') {
                Err(DriveError::GlobalIncomplete)
            } else {
                Err(DriveError::Option {
                    flag: "-global",
                    source: OptionError::NotKeyValue {
                        item: incomplete.into(),
                    },
                })
            };
            assert_eq!(parse_global(incomplete), want, "{incomplete}");
        }
        assert!(matches!(
            parse_global("driver=virtio-blk-device,property=serial,value=s,x=1"),
            Err(DriveError::Option {
                flag: "-global",
                source: OptionError::UnknownKey { key, .. }
            }) if key == "x"
        ));
        // A value the property cannot take is refused by the device that would apply it, and
        // not by one that sets the property itself.
        let bad = [parse_global("virtio-blk-device.num-queues=x").expect("parses")];
        assert_eq!(
            parse_device("virtio-blk-device,drive=d0", &bad),
            Err(DriveError::GlobalValue {
                global: Box::new(bad[0].clone()),
                source: OptionError::BadValue {
                    key: "num-queues".into(),
                    value: "x".into(),
                    expected: "a number from 0 to 65535",
                },
            })
        );
        assert!(parse_device("virtio-blk-device,drive=d0,num-queues=2", &bad).is_ok());
        assert!(parse_device("virtio-blk-pci,drive=d0", &bad).is_ok());
    }
}
