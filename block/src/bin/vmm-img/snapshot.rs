//! `vmm-img snapshot [-l] [-f FMT] [-U] FILE`: lists a qcow2 image's internal snapshots in
//! qemu-img's table (dates in local time). Creating, applying and deleting them (`-c`, `-a`,
//! `-d`) is refused by name: the engine never writes the snapshot table.

use block::{CacheMode, Image};

use crate::args::Args;
use crate::chain::open_image;
use crate::{CliError, CmdResult};

/// `secs` since the epoch as local `YYYY-MM-DD HH:MM:SS`.
fn local_date(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r writes only into `tm`.
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    if !ok {
        return String::new();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The guest clock as qemu-img shows it: `HHHH:MM:SS.mmm`.
fn vm_clock(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    let secs = ms / 1000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

fn row(id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str) -> String {
    format!("{id:<7} {tag:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}")
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "c", "a", "d"])?;
    a.only(&["f", "l", "c", "a", "d", "q", "U", "force-share"])?;
    for op in ["c", "a", "d"] {
        if a.value(op).is_some() {
            return Err(CliError::Usage(format!(
                "snapshot -{op} is not supported (the engine never writes the snapshot table); \
                 qemu-img snapshot -{op} does it"
            )));
        }
    }
    let file = &a.positional(1, "one image file")?[0];
    let lock = !(a.has("U") || a.has("force-share"));
    let img = open_image(file, a.value("f"), true, CacheMode::Writeback, lock)?;
    let Image::Qcow2(q) = &img else {
        // Raw images have no snapshots: qemu-img lists nothing.
        return Ok(0);
    };
    let snaps = block::qcow2::snapshot::list(q.file(), &q.header())?;
    if snaps.is_empty() {
        return Ok(0);
    }
    println!("Snapshot list:");
    println!(
        "{}",
        row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
    );
    for s in &snaps {
        let icount = s.icount.map(|n| n.to_string()).unwrap_or_default();
        println!(
            "{}",
            row(
                &s.id,
                &s.name,
                &crate::info::human_size(s.vm_state_size),
                &local_date(s.date.0),
                &vm_clock(s.vm_clock_nsec),
                &icount
            )
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_as_qemu_img_prints_it() {
        assert_eq!(vm_clock(0), "0000:00:00.000");
        assert_eq!(vm_clock(3_723_456_000_000), "0001:02:03.456");
    }
}
