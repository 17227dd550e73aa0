//! `vmm-img`: create, inspect, check, convert, map, benchmark and edit disk images, with
//! qemu-img's subcommand and flag names (and qemu-io's command syntax for `io`), so the same
//! script runs against our engine and QEMU's. Exit codes are decided here, from one `Result`.

mod args;
mod bench;
mod chain;
mod check;
mod convert;
mod create;
mod info;
mod io;
mod map;

use std::process::ExitCode;

/// A command-line failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage: unknown subcommand or flag, missing or malformed argument.
    #[error("{0}")]
    Usage(String),
    /// The block layer failed.
    #[error(transparent)]
    Block(#[from] block::Error),
    /// `io`: a `read -P` found other bytes.
    #[error("pattern verification failed at offset {offset}, {len} bytes")]
    Pattern {
        /// Start of the read.
        offset: u64,
        /// Length of the read.
        len: u64,
    },
    /// `convert` onto the image it reads, or onto one of its backing files.
    #[error("cannot convert onto {target}: it is {image}, which the conversion reads")]
    ConvertOntoInput {
        /// The output named.
        target: String,
        /// The input image (or backing file) that is the same file.
        image: String,
    },
    /// `check` on an image format without checks.
    #[error("this image format does not support checks")]
    NoChecks,
}

/// Result of a subcommand: the process exit code on success.
pub type CmdResult = Result<u8, CliError>;

const USAGE: &str = "usage: vmm-img create|info|check|convert|map|bench|io [options] FILE...";

fn run(argv: &[String]) -> CmdResult {
    let Some((cmd, rest)) = argv.split_first() else {
        return Err(CliError::Usage(USAGE.into()));
    };
    match cmd.as_str() {
        "create" => create::run(rest),
        "info" => info::run(rest),
        "check" => check::run(rest),
        "convert" => convert::run(rest),
        "map" => map::run(rest),
        "bench" => bench::run(rest),
        "io" => io::run(rest),
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(CliError::Usage(format!(
            "unknown command '{other}'\n{USAGE}"
        ))),
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The cause chain, once, on one line.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            eprintln!("vmm-img: {msg}");
            // qemu-img: 1 for errors; check uses 63 for "no checks", 1 for a failed check.
            ExitCode::from(match e {
                CliError::NoChecks => 63,
                _ => 1,
            })
        }
    }
}
