//! A small option parser for qemu-img-style command lines: short flags with or without values,
//! `--long` and `--long=value`, positional arguments; sizes with k/M/G/T suffixes; `-o key=value`
//! lists.

use std::collections::HashMap;

use crate::CliError;

/// Parsed arguments.
#[derive(Debug, Default)]
pub struct Args {
    /// Flags with values (the last one wins), by name without dashes.
    values: HashMap<String, Vec<String>>,
    /// Flags without values.
    switches: Vec<String>,
    /// Positional arguments.
    pub positional: Vec<String>,
}

impl Args {
    /// Parses `argv`: `with_value` lists the flags (without dashes) that take a value.
    pub fn parse(argv: &[String], with_value: &[&str]) -> Result<Args, CliError> {
        let mut a = Args::default();
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            if arg == "-h" || arg == "--help" {
                return Err(CliError::Help);
            }
            if let Some(long) = arg.strip_prefix("--") {
                if let Some((k, v)) = long.split_once('=') {
                    a.values.entry(k.into()).or_default().push(v.into());
                } else if with_value.contains(&long) {
                    let v = it
                        .next()
                        .ok_or_else(|| CliError::Usage(format!("--{long} needs a value")))?;
                    a.values.entry(long.into()).or_default().push(v.clone());
                } else {
                    a.switches.push(long.into());
                }
            } else if let Some(short) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
                if with_value.contains(&short) {
                    let v = it
                        .next()
                        .ok_or_else(|| CliError::Usage(format!("-{short} needs a value")))?;
                    a.values.entry(short.into()).or_default().push(v.clone());
                } else {
                    a.switches.push(short.into());
                }
            } else {
                a.positional.push(arg.clone());
            }
        }
        Ok(a)
    }

    /// Refuses flags outside `known` (a flag we do not support is an error, never ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), CliError> {
        for k in self.values.keys().chain(&self.switches) {
            if !known.contains(&k.as_str()) {
                return Err(CliError::Usage(format!("unsupported option '{k}'")));
            }
        }
        Ok(())
    }

    /// The last value of a flag.
    pub fn value(&self, k: &str) -> Option<&str> {
        self.values
            .get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// Every value of a repeated flag.
    pub fn values(&self, k: &str) -> &[String] {
        self.values.get(k).map_or(&[], Vec::as_slice)
    }

    /// Whether a switch is present.
    pub fn has(&self, k: &str) -> bool {
        self.switches.iter().any(|s| s == k)
    }

    /// Exactly `n` positional arguments.
    pub fn positional(&self, n: usize, what: &str) -> Result<&[String], CliError> {
        if self.positional.len() != n {
            return Err(CliError::Usage(format!("expected {what}")));
        }
        Ok(&self.positional)
    }
}

/// qemu-img's `--output` formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Text for people (the default).
    Human,
    /// JSON.
    Json,
}

impl Args {
    /// The `--output` format: `human` (the default) or `json`, anything else refused.
    pub fn output(&self) -> Result<Output, CliError> {
        match self.value("output") {
            None | Some("human") => Ok(Output::Human),
            Some("json") => Ok(Output::Json),
            Some(o) => Err(CliError::Usage(format!(
                "--output expects 'human' or 'json' not '{o}'"
            ))),
        }
    }
}

/// Parses a plain number, decimal or `0x` hexadecimal (qemu-io's patterns).
pub fn number(s: &str) -> Result<u64, CliError> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| CliError::Usage(format!("invalid number '{s}'")))
}

/// Parses a size with an optional k/M/G/T suffix (binary units, as qemu-img and qemu-io).
pub fn size(s: &str) -> Result<u64, CliError> {
    let bad = || CliError::Usage(format!("invalid size '{s}'"));
    if s.starts_with("0x") {
        return number(s);
    }
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(bad()),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Parses an image format name.
pub fn format(s: &str) -> Result<block::Format, CliError> {
    block::Format::parse(s).ok_or_else(|| CliError::Usage(format!("unknown format '{s}'")))
}

/// Parses a `-o key=value,key=value` list.
pub fn options(s: &str) -> Result<Vec<(String, String)>, CliError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| CliError::Usage(format!("invalid option '{p}'")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_and_flags() {
        assert_eq!(size("4k").unwrap(), 4096);
        assert_eq!(size("1G").unwrap(), 1 << 30);
        assert_eq!(size("512").unwrap(), 512);
        assert!(matches!(size("12q"), Err(CliError::Usage(_))));
        assert!(matches!(size("99999999999999T"), Err(CliError::Usage(_))));
        let argv: Vec<String> = ["-f", "qcow2", "--output=json", "-U", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = Args::parse(&argv, &["f"]).unwrap();
        assert_eq!(a.value("f"), Some("qcow2"));
        assert_eq!(a.value("output"), Some("json"));
        assert!(a.has("U"));
        assert_eq!(a.positional, vec!["x"]);
        assert!(matches!(a.only(&["f", "output"]), Err(CliError::Usage(_))));
        assert_eq!(a.output().unwrap(), Output::Json);
        let yaml = Args::parse(&["--output".to_string(), "yaml".to_string()], &["output"]);
        assert!(matches!(yaml.unwrap().output(), Err(CliError::Usage(_))));
        // -h is help, unless it is the value of a flag.
        let help =
            |v: &[&str]| Args::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &["c"]);
        assert!(matches!(help(&["x", "--help"]), Err(CliError::Help)));
        assert!(matches!(help(&["-h"]), Err(CliError::Help)));
        assert_eq!(help(&["-c", "-h", "x"]).unwrap().value("c"), Some("-h"));
        assert_eq!(options("a=1,b=2").unwrap().len(), 2);
        assert!(matches!(options("a"), Err(CliError::Usage(_))));
    }
}
