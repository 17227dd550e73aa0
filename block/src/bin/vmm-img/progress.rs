//! qemu-img's `-p` progress line: `    (P.PP/100%)` rewritten in place with a carriage return,
//! printed when the hundredths change, ended by a newline.

use std::io::Write;

/// A progress line that prints only when enabled.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    last: Option<u64>,
}

impl Progress {
    /// A progress line, shown when `enabled` (`-p` without `-q`).
    pub fn new(enabled: bool) -> Progress {
        let p = Progress {
            enabled,
            last: None,
        };
        p.show(0);
        p
    }

    fn show(&self, hundredths: u64) {
        if self.enabled {
            print!("    ({}.{:02}/100%)\r", hundredths / 100, hundredths % 100);
            // A progress line that cannot be flushed is only late, never wrong.
            let _ = std::io::stdout().flush();
        }
    }

    /// `done` of `total` units are done.
    pub fn update(&mut self, done: u64, total: u64) {
        let h = u64::try_from(u128::from(done) * 10000 / u128::from(total.max(1))).unwrap_or(10000);
        if self.last != Some(h) {
            self.show(h);
            self.last = Some(h);
        }
    }

    /// Ends the line.
    pub fn finish(&self) {
        if self.enabled {
            println!();
        }
    }
}
