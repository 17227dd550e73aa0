//! `vmm-img snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT] [-U] FILE`: lists a qcow2
//! image's internal snapshots in qemu-img's table (dates in local time), or creates one (the
//! next numeric id, the current time, no VM state), applies one (by id, else by name) or
//! deletes one (by name), as qemu-img does (see the engine's `qcow2/snapshot_ops.rs`).

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

/// What a change does, for its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Create,
    Apply,
    Delete,
}

impl Change {
    fn verb(self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Apply => "apply",
            Change::Delete => "delete",
        }
    }
}

/// Creates, applies or deletes snapshot `name` of `file`.
fn change(file: &str, fmt: Option<&str>, op: Change, name: &str) -> CmdResult {
    let failed = |source: block::Error| CliError::Snapshot {
        verb: op.verb(),
        name: name.to_string(),
        source,
    };
    let img = open_image(file, fmt, false, CacheMode::Writeback, true)?;
    let Image::Qcow2(q) = &img else {
        return Err(CliError::Usage(format!(
            "Could not {} snapshot '{name}': Operation not supported",
            op.verb()
        )));
    };
    let r = match op {
        Change::Create => {
            // Microseconds, as qemu-img records them.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let secs = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
            q.snapshot_create(name, (secs, now.subsec_micros() * 1000))
        }
        Change::Apply => q.snapshot_apply(name),
        Change::Delete => q.snapshot_delete(name),
    };
    r.map_err(failed)?;
    Ok(0)
}

pub fn run(argv: &[String]) -> CmdResult {
    let a = Args::parse(argv, &["f", "c", "a", "d"])?;
    a.only(&["f", "l", "c", "a", "d", "q", "U", "force-share"])?;
    let ops = [
        ("c", Change::Create),
        ("a", Change::Apply),
        ("d", Change::Delete),
    ];
    let asked: Vec<(Change, &str)> = ops
        .iter()
        .filter_map(|&(flag, op)| a.value(flag).map(|name| (op, name)))
        .collect();
    if asked.len() + usize::from(a.has("l")) > 1 {
        return Err(CliError::Usage("Cannot mix '-l', '-a', '-c', '-d'".into()));
    }
    let file = &a.positional(1, "one image file")?[0];
    if let Some(&(op, name)) = asked.first() {
        return change(file, a.value("f"), op, name);
    }
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
