//! `vmm-img check [-f FMT] [-r leaks|all] [--output=human|json] [-q] FILE`, with qemu-img's
//! report and exit codes: 0 clean, 2 corruptions, 3 leaks (1 when the check cannot run, 63 for a
//! format without checks).

use block::qcow2::check::{CheckReport, Repair};
use block::{CacheMode, Image};
use serde_json::json;

use crate::args::{Args, Output};
use crate::chain::open_image;
use crate::{CliError, CmdResult};

fn print_human(r: &CheckReport, quiet: bool) {
    if quiet {
        return;
    }
    for m in &r.messages {
        println!("{m}");
    }
    if r.messages_omitted > 0 {
        println!("({} more problems not listed)", r.messages_omitted);
    }
    if r.corruptions == 0 && r.leaks == 0 {
        println!("No errors were found on the image.");
    }
    if r.leaks > 0 {
        println!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    if r.corruptions > 0 {
        println!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    let pct = |n: u64| {
        if r.total_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.total_clusters as f64
        }
    };
    let of_alloc = |n: u64| {
        if r.allocated_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.allocated_clusters as f64
        }
    };
    println!(
        "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
        r.allocated_clusters,
        r.total_clusters,
        pct(r.allocated_clusters),
        of_alloc(r.fragmented_clusters),
        of_alloc(r.compressed_clusters)
    );
    println!("Image end offset: {}", r.image_end_offset);
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "r", "output"])?;
    a.only(&["f", "r", "output", "q", "U", "force-share"])?;
    let json = a.output()? == Output::Json;
    let file = &a.positional(1, "one image file")?[0];
    let repair = match a.value("r") {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(o) => return Err(CliError::Usage(format!("invalid -r value '{o}'"))),
    };
    let lock = !(a.has("U") || a.has("force-share"));
    let img = open_image(
        file,
        a.value("f"),
        repair == Repair::None,
        CacheMode::Writeback,
        lock,
    )?;
    let Image::Qcow2(q) = &img else {
        return Err(CliError::NoChecks);
    };
    let mut r = q.check(repair)?;
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        if !a.has("q") && !json {
            println!("The following inconsistencies were found and repaired:\n");
            println!(
                "    {} leaked clusters\n    {} corruptions\n",
                r.leaks_fixed, r.corruptions_fixed
            );
            println!("Double checking the fixed image now...");
        }
        let again = q.check(Repair::None)?;
        r = CheckReport {
            leaks_fixed: r.leaks_fixed,
            corruptions_fixed: r.corruptions_fixed,
            ..again
        };
    }
    if json {
        let mut v = json!({
            "image-end-offset": r.image_end_offset,
            "total-clusters": r.total_clusters,
            "check-errors": 0,
            "allocated-clusters": r.allocated_clusters,
            "filename": file,
            "format": "qcow2",
        });
        for (k, n) in [
            ("fragmented-clusters", r.fragmented_clusters),
            ("compressed-clusters", r.compressed_clusters),
            ("corruptions", r.corruptions),
            ("leaks", r.leaks),
            ("corruptions-fixed", r.corruptions_fixed),
            ("leaks-fixed", r.leaks_fixed),
        ] {
            if n > 0 {
                v[k] = json!(n);
            }
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print_human(&r, a.has("q"));
    }
    Ok(if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}
