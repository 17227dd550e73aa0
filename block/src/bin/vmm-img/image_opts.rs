//! The image a command names: a file (`-f FMT` or probed), or with `--image-opts` an option
//! string as qemu-io and qemu-img take it, `driver=qcow2,file.filename=FILE,l2-cache-size=64K`.
//! The keys this engine has: `driver` (`raw` or `qcow2`; probed when absent), `file.filename`,
//! and qcow2's metadata cache sizes `l2-cache-size`, `refcount-cache-size` and `cache-size`
//! (sizes with k/M/G/T suffixes; rules in `block::qcow2::CacheSizes`). Any other key is refused
//! by name, as is `-f` beside `--image-opts` (qemu-io refuses both at once).

use std::path::Path;

use block::qcow2::{CacheSizeError, CacheSizes};
use block::{open_named, CacheMode, Format, Image, OpenOptions, WritableRaw};

use crate::args::{self, Args};
use crate::CliError;

/// A malformed `--image-opts` string.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageOptsError {
    /// `-f` and `--image-opts` together.
    #[error("mutually exclusive with -f")]
    WithFormat,
    /// A key this engine does not have.
    #[error("unsupported option '{0}' (supported: driver, file.filename, l2-cache-size, refcount-cache-size, cache-size)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("option '{0}' given twice")]
    Duplicate(String),
    /// An item without `=`.
    #[error("option '{0}' needs the form key=value")]
    NotKeyValue(String),
    /// No `file.filename=`.
    #[error("file.filename is required")]
    NoFilename,
    /// A `driver=` other than raw or qcow2.
    #[error("unsupported driver '{0}' (supported: raw, qcow2)")]
    Driver(String),
    /// A size that does not parse.
    #[error("option '{key}' has invalid size '{value}'")]
    Size {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Cache sizes that contradict each other.
    #[error(transparent)]
    CacheSize(#[from] CacheSizeError),
}

/// The image to open and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The file.
    pub path: String,
    /// The format; `None` probes.
    pub format: Option<Format>,
    /// qcow2 metadata cache sizes.
    pub cache_sizes: CacheSizes,
}

impl ImageSpec {
    /// A file with an optional format name.
    pub fn file(path: &str, fmt: Option<&str>) -> Result<ImageSpec, CliError> {
        Ok(ImageSpec {
            path: path.to_string(),
            format: fmt.map(args::format).transpose()?,
            cache_sizes: CacheSizes::default(),
        })
    }

    /// The image a command's positional argument names: a file with `-f`, or with
    /// `--image-opts` an option string.
    pub fn from_args(a: &Args, arg: &str) -> Result<ImageSpec, CliError> {
        if !a.has("image-opts") {
            return ImageSpec::file(arg, a.value("f"));
        }
        if a.value("f").is_some() {
            return Err(ImageOptsError::WithFormat.into());
        }
        Ok(parse(arg)?)
    }

    /// Opens the image (probed when no format is named: the user named the file; a writable
    /// image with no magic is guessed raw, as qemu-img does).
    pub fn open(&self, read_only: bool, cache: CacheMode, lock: bool) -> Result<Image, CliError> {
        let opts = OpenOptions {
            format: self.format,
            read_only,
            cache,
            lock,
            cache_sizes: self.cache_sizes,
        };
        Ok(open_named(Path::new(&self.path), opts, WritableRaw::Guess)?)
    }
}

/// Parses an `--image-opts` string.
fn parse(text: &str) -> Result<ImageSpec, ImageOptsError> {
    let mut path = None;
    let mut format = None;
    let mut sizes: [Option<u64>; 3] = [None; 3];
    let mut seen: Vec<&str> = Vec::new();
    for item in text.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| ImageOptsError::NotKeyValue(item.to_string()))?;
        if seen.contains(&key) {
            return Err(ImageOptsError::Duplicate(key.to_string()));
        }
        seen.push(key);
        let size = || {
            args::size(value).map_err(|_| ImageOptsError::Size {
                key: key.to_string(),
                value: value.to_string(),
            })
        };
        match key {
            "driver" => {
                format = Some(
                    Format::parse(value)
                        .ok_or_else(|| ImageOptsError::Driver(value.to_string()))?,
                );
            }
            "file.filename" => path = Some(value.to_string()),
            "l2-cache-size" => sizes[0] = Some(size()?),
            "refcount-cache-size" => sizes[1] = Some(size()?),
            "cache-size" => sizes[2] = Some(size()?),
            other => return Err(ImageOptsError::UnknownKey(other.to_string())),
        }
    }
    let [l2, refcount, total] = sizes;
    Ok(ImageSpec {
        path: path.ok_or(ImageOptsError::NoFilename)?,
        format,
        cache_sizes: CacheSizes::new(l2, refcount, total)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn qemu_io_forms_parse() {
        let s = parse(
            "driver=qcow2,file.filename=/t/a.qcow2,l2-cache-size=1k,refcount-cache-size=2048",
        )
        .unwrap();
        assert_eq!(
            s,
            ImageSpec {
                path: "/t/a.qcow2".into(),
                format: Some(Format::Qcow2),
                cache_sizes: CacheSizes::new(Some(1024), Some(2048), None).unwrap(),
            }
        );
        let probed = parse("file.filename=a,cache-size=1M").unwrap();
        assert_eq!(probed.format, None);
        assert_eq!(
            probed.cache_sizes,
            CacheSizes::new(None, None, Some(1 << 20)).unwrap()
        );
    }

    #[test]
    fn errors_by_variant() {
        for (text, want) in [
            (
                "driver=qcow2,file.filename=a,foo=1",
                ImageOptsError::UnknownKey("foo".into()),
            ),
            (
                "driver=qcow2,file.driver=file,file.filename=a",
                ImageOptsError::UnknownKey("file.driver".into()),
            ),
            ("driver=qcow2", ImageOptsError::NoFilename),
            (
                "driver=vmdk,file.filename=a",
                ImageOptsError::Driver("vmdk".into()),
            ),
            (
                "file.filename=a,file.filename=b",
                ImageOptsError::Duplicate("file.filename".into()),
            ),
            (
                "file.filename=a,on",
                ImageOptsError::NotKeyValue("on".into()),
            ),
            (
                "file.filename=a,l2-cache-size=1x",
                ImageOptsError::Size {
                    key: "l2-cache-size".into(),
                    value: "1x".into(),
                },
            ),
            (
                "file.filename=a,l2-cache-size=1k,refcount-cache-size=1k,cache-size=4k",
                ImageOptsError::CacheSize(CacheSizeError::AllThree),
            ),
            (
                "file.filename=a,l2-cache-size=8k,cache-size=4k",
                ImageOptsError::CacheSize(CacheSizeError::L2ExceedsTotal {
                    l2: 8192,
                    total: 4096,
                }),
            ),
        ] {
            assert_eq!(parse(text), Err(want), "{text}");
        }
        let argv: Vec<String> = ["--image-opts", "-f", "qcow2", "file.filename=a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = Args::parse(&argv, &["f"]).unwrap();
        assert!(matches!(
            ImageSpec::from_args(&a, "file.filename=a"),
            Err(CliError::ImageOpts(ImageOptsError::WithFormat))
        ));
    }
}
