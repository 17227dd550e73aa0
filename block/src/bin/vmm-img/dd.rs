//! `vmm-img dd [-f FMT] [-O raw|qcow2] [-U] [bs=N] [count=N] [skip=N] if=IN of=OUT`: copies
//! part of an image into a new one, as qemu-img dd does: the output holds
//! `min(input size, count × bs) - skip × bs` bytes read from `skip × bs` (count applies before
//! skip, as in qemu-img), zeroes left unwritten.

use block::qcow2::create::CreateOptions;
use block::{CacheMode, DiskImage};

use crate::args::{self, Args};
use crate::chain::open_image;
use crate::progress::Progress;
use crate::{CliError, CmdResult};

/// The operands given.
#[derive(Debug, Default)]
struct Operands {
    bs: Option<u64>,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

fn parse(ops: &[String]) -> Result<Operands, CliError> {
    let mut o = Operands::default();
    for op in ops {
        let Some((k, v)) = op.split_once('=') else {
            return Err(CliError::Usage(format!("unrecognized operand {op}")));
        };
        match k {
            "bs" => {
                let bs = args::size(v)
                    .ok()
                    .filter(|b| (1..=2_147_483_647).contains(b));
                o.bs = Some(bs.ok_or_else(|| {
                    CliError::Usage(
                        "Invalid bs specified. Must be between 1 and 2147483647.".into(),
                    )
                })?);
            }
            "count" => o.count = Some(args::size(v)?),
            "skip" => o.skip = Some(args::size(v)?),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(CliError::Usage(format!("unrecognized operand {op}"))),
        }
    }
    Ok(o)
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "O"])?;
    a.only(&["f", "O", "U", "force-share"])?;
    let ops = parse(&a.positional)?;
    let (Some(input_path), Some(output_path)) = (&ops.input, &ops.output) else {
        return Err(CliError::Usage(
            "Must specify both input and output files".into(),
        ));
    };
    let out_fmt = args::format(a.value("O").unwrap_or("raw"))?;
    let lock = !(a.has("U") || a.has("force-share"));
    let input = open_image(input_path, a.value("f"), true, CacheMode::Writeback, lock)?;
    let bs = ops.bs.unwrap_or(512);
    let mut size = input.size();
    if let Some(count) = ops.count {
        size = size.min(count.saturating_mul(bs));
    }
    let skip = ops.skip.unwrap_or(0).saturating_mul(bs);
    let (from, len) = match size.checked_sub(skip) {
        Some(len) => (skip, len),
        None => {
            // qemu-img reports this, leaves an empty output and succeeds.
            eprintln!("vmm-img: {input_path}: cannot skip to specified offset");
            (0, 0)
        }
    };
    let o = CreateOptions {
        size: len,
        ..Default::default()
    };
    let output = crate::convert::new_target(&input, output_path, out_fmt, &o)?;
    if len > 0 {
        crate::convert::copy(&input, from, &output, len, None, &mut Progress::new(false))?;
    }
    Ok(0)
}
