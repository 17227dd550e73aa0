//! `vmm-img`: create, inspect, check, convert, map, benchmark and edit disk images, with
//! qemu-img's subcommand and flag names (and qemu-io's command syntax for `io`), so the same
//! script runs against our engine and QEMU's. Exit codes are decided here, from one `Result`.

mod amend;
mod args;
mod bench;
mod chain;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod image_opts;
mod info;
mod io;
mod map;
mod measure;
mod progress;
mod rebase;
mod resize;
mod snapshot;

use std::process::ExitCode;

/// A command-line failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage: unknown subcommand or flag, missing or malformed argument.
    #[error("{0}")]
    Usage(String),
    /// `-h` or `--help` among a subcommand's flags: its usage is printed instead of running it.
    #[error("help requested")]
    Help,
    /// A malformed `--image-opts` string.
    #[error("--image-opts")]
    ImageOpts(#[from] image_opts::ImageOptsError),
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
    /// A failure that exits with a command's own code (`compare`: 2 when an image cannot be
    /// opened, 3 when a block status fails, 4 when a read fails).
    #[error("{error}")]
    Exit {
        /// The exit code.
        code: u8,
        /// The failure (its causes are printed after it).
        error: Box<CliError>,
    },
    /// `snapshot -c|-a|-d` failed.
    #[error("Could not {verb} snapshot '{name}'")]
    Snapshot {
        /// "create", "apply" or "delete".
        verb: &'static str,
        /// The snapshot named.
        name: String,
        /// Why.
        #[source]
        source: block::Error,
    },
    /// `check` on an image format without checks.
    #[error("this image format does not support checks")]
    NoChecks,
}

/// Result of a subcommand: the process exit code on success.
pub type CmdResult = Result<u8, CliError>;

/// A subcommand: its name, its entry point and its usage (`CMD --help`).
struct Command {
    name: &'static str,
    run: fn(&[String]) -> CmdResult,
    usage: &'static str,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "amend",
        run: amend::run,
        usage: "Change the options of a qcow2 image.\n\n  vmm-img amend [-f qcow2] [-p] [-q] \
                -o compat=0.10|1.1,lazy_refcounts=on|off FILENAME",
    },
    Command {
        name: "create",
        run: create::run,
        usage:
            "Create and format a new image file.\n\n  vmm-img create [-f raw|qcow2] [-o FMT_OPTS] \
                [-b BACKING_FILENAME -F BACKING_FMT [-u]] [-q] FILENAME [SIZE[kMGT]]",
    },
    Command {
        name: "dd",
        run: dd::run,
        usage:
            "Copy part of an image to a new image.\n\n  vmm-img dd [-f FMT] [-O raw|qcow2] [-U] \
                [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT",
    },
    Command {
        name: "info",
        run: info::run,
        usage: "Display information about an image.\n\n  vmm-img info [-f FMT] [--backing-chain] \
                [-U] [--output human|json] FILENAME",
    },
    Command {
        name: "check",
        run: check::run,
        usage: "Check an image's integrity (and repair it with -r).\n\n  vmm-img check [-f FMT] \
                [-r leaks|all] [-q] [-U] [--output human|json] FILENAME",
    },
    Command {
        name: "convert",
        run: convert::run,
        usage: "Copy an image (its whole chain, flattened) to a new image.\n\n  vmm-img convert \
                [-c] [-f SRC_FMT] [-O raw|qcow2] [-o TGT_OPTS] [-p] [-q] [-U] [-S SIZE] [-m N] \
                [-W] FILENAME OUTPUT_FILENAME\n\n  -S SIZE  runs of zeroes in the data at least \
                SIZE long (default 4k) are left unwritten; -S 0 writes every byte (a fully \
                allocated output)\n  -m N, -W  accepted as qemu-img takes them (1 to 16 \
                coroutines, out-of-order writes); they change nothing here: the copy runs in \
                order and its output is the same",
    },
    Command {
        name: "commit",
        run: commit::run,
        usage:
            "Commit an image into its backing file.\n\n  vmm-img commit [-f FMT] [-b BASE] [-d] \
                [-p] [-q] FILENAME",
    },
    Command {
        name: "compare",
        run: compare::run,
        usage: "Check whether two images have the same contents.\n\n  vmm-img compare [-f FMT] \
                [-F FMT] [-s] [-p] [-q] [-U] FILENAME1 FILENAME2",
    },
    Command {
        name: "map",
        run: map::run,
        usage: "Show where each range of the virtual disk is stored.\n\n  vmm-img map [-f FMT] \
                [-U] [--output human|json] FILENAME",
    },
    Command {
        name: "measure",
        run: measure::run,
        usage:
            "Calculate the file size a new image needs.\n\n  vmm-img measure [--output human|json] \
                [-O raw|qcow2] [-o OPTIONS] (--size SIZE | [-f FMT] [-U] FILENAME)",
    },
    Command {
        name: "rebase",
        run: rebase::run,
        usage: "Change the backing file of an image.\n\n  vmm-img rebase [-f FMT] [-p] [-q] [-U] \
                [-u] -b BACKING_FILENAME [-F BACKING_FMT] FILENAME",
    },
    Command {
        name: "resize",
        run: resize::run,
        usage:
            "Resize an image.\n\n  vmm-img resize [-f FMT] [--shrink] [-q] FILENAME [+|-]SIZE[kMGT]",
    },
    Command {
        name: "snapshot",
        run: snapshot::run,
        usage: "List, create, apply or delete the internal snapshots of an image.\n\n  \
                vmm-img snapshot [-f FMT] [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] \
                FILENAME",
    },
    Command {
        name: "bench",
        run: bench::run,
        usage: "Run a simple image benchmark.\n\n  vmm-img bench [-f FMT | --image-opts] \
                [-t none|writeback] \
                [-c COUNT] [-d DEPTH] [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] \
                [-w [--pattern PATTERN]] [-q] [-U] FILENAME",
    },
    Command {
        name: "io",
        run: io::run,
        usage:
            "Run qemu-io commands on an image.\n\n  vmm-img io [-f FMT | --image-opts] [-t CACHE] \
                [-r [-U] | -C] -c 'read|write|discard|flush ...' [-c ...] FILENAME\n\n  -C \
                (--copy-on-read): every read copies what the backing chain gave into the image, \
                over the read's whole clusters.\n\n  With --image-opts, FILENAME is driver=raw|qcow2,file.filename=FILE[,l2-cache-size=SIZE]\
                [,refcount-cache-size=SIZE][,cache-size=SIZE].",
    },
];

const USAGE: &str = "usage: vmm-img [--version] COMMAND [--help | options] FILE...\n\
                     commands: amend create dd info check commit compare convert map measure rebase resize snapshot bench io";

/// `vmm-img --version`, in qemu-img's shape.
fn version() -> String {
    format!(
        "vmm-img version {}\nThe disk image tool of the vmm project",
        env!("CARGO_PKG_VERSION")
    )
}

/// Runs `argv`; a usage error comes back with the subcommand it belongs to, for the hint.
fn run(argv: &[String]) -> (CmdResult, Option<&'static str>) {
    let Some((cmd, rest)) = argv.split_first() else {
        return (Err(CliError::Usage(USAGE.into())), None);
    };
    match cmd.as_str() {
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            return (Ok(0), None);
        }
        "--version" | "-V" => {
            println!("{}", version());
            return (Ok(0), None);
        }
        _ => {}
    }
    let Some(c) = COMMANDS.iter().find(|c| c.name == cmd) else {
        return (
            Err(CliError::Usage(format!("unknown command '{cmd}'\n{USAGE}"))),
            None,
        );
    };
    match (c.run)(rest) {
        Err(CliError::Help) => {
            println!("Usage:\n{}", c.usage);
            (Ok(0), Some(c.name))
        }
        r => (r, Some(c.name)),
    }
}

fn main() -> ExitCode {
    // Output into a closed pipe (`vmm-img info x | head -1`) ends the process quietly, as it ends
    // qemu-img and every C tool, instead of failing a print.
    // SAFETY: resets one signal's disposition to the default before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (result, cmd) = run(&argv);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let (code, e) = match e {
                CliError::Exit { code, error } => (Some(code), *error),
                e => (None, e),
            };
            // The cause chain, once, on one line.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            eprintln!("vmm-img: {msg}");
            if let (CliError::Usage(_), Some(cmd)) = (&e, cmd) {
                eprintln!("Try 'vmm-img {cmd} --help' for more info");
            }
            // qemu-img: 1 for errors; check uses 63 for "no checks", 1 for a failed check;
            // compare has codes of its own.
            ExitCode::from(match (code, e) {
                (Some(code), _) => code,
                (None, CliError::NoChecks) => 63,
                (None, _) => 1,
            })
        }
    }
}
