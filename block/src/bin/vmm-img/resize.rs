//! `vmm-img resize [-f FMT] [--shrink] [-q] FILE [+|-]SIZE`: changes an image's virtual size,
//! as qemu-img does: a raw file grows or (with `--shrink`) is cut; a qcow2 image grows (its L1
//! table lengthened in place when the new size needs more entries) or, with `--shrink`, drops
//! the clusters past the new end and cuts the file after its last cluster in use.
//! The size comes last and may start with `-`, so it is taken before the flags are parsed.

use std::path::Path;

use block::Exclusive;

use crate::args::{self, Args};
use crate::{CliError, CmdResult};

const SHRINK_WARNING: &str = "warning: Shrinking an image will delete all data beyond the \
                              shrunken image's end. Before performing such an operation, make \
                              sure there is no important data there.";

/// The new size from `+N`, `-N` or `N` against the current size.
fn new_size(arg: &str, current: u64) -> Result<u64, CliError> {
    let positive = || CliError::Usage("New image size must be positive".into());
    if let Some(n) = arg.strip_prefix('+') {
        current.checked_add(args::size(n)?).ok_or_else(positive)
    } else if let Some(n) = arg.strip_prefix('-') {
        current
            .checked_sub(args::size(n)?)
            .filter(|&s| s > 0)
            .ok_or_else(positive)
    } else {
        args::size(arg)
    }
}

pub fn run(argv: &[String]) -> CmdResult {
    let Some((size_arg, flags)) = argv.split_last() else {
        return Err(CliError::Usage("expected FILE [+|-]SIZE".into()));
    };
    if size_arg == "-h" || size_arg == "--help" {
        return Err(CliError::Help);
    }
    let a = Args::parse(flags, &["f"])?;
    a.only(&["f", "shrink", "q"])?;
    let file = &a.positional(1, "FILE [+|-]SIZE")?[0];
    let format = a.value("f").map(args::format).transpose()?;
    let img = Exclusive::open(Path::new(file), format)?;
    // qemu-img counts whole sectors: a raw file of 1000 bytes is 1024 here.
    let current = img.size()?.next_multiple_of(512);
    let size = new_size(size_arg, current)?;
    if size < current && !a.has("shrink") {
        eprintln!("vmm-img: {SHRINK_WARNING}");
        return Err(CliError::Usage(
            "Use the --shrink option to perform a shrink operation.".into(),
        ));
    }
    if img.is_qcow2() && size % 512 != 0 {
        return Err(CliError::Usage(
            "The new size must be a multiple of 512".into(),
        ));
    }
    img.resize(size)?;
    if !a.has("q") {
        println!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn relative_sizes() {
        assert_eq!(new_size("+1M", 1 << 20).unwrap(), 2 << 20);
        assert_eq!(new_size("-1M", 3 << 20).unwrap(), 2 << 20);
        assert_eq!(new_size("5k", 1 << 20).unwrap(), 5120);
        assert!(new_size("-1M", 1 << 20).is_err());
        assert!(new_size("-2M", 1 << 20).is_err());
    }
}
