//! The lines the inner half of the harness prints for the outer half to read back.
//!
//! Inside the nested host only text comes out (the script's framed output), so each finished case is
//! one line `RESULT pass|fail NAME SECS DETAIL`, and each boot measurement one line
//! `BOOT TARGET RUN USERSPACE_MS RSS_KIB GUEST_KIB`. Anything else (console transcripts of failed
//! cases) passes through for people to read.

/// Errors parsing a report line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `RESULT` or `BOOT` line without all its fields, or with a malformed number.
    #[error("malformed report line {0:?}")]
    Malformed(String),
}

/// A finished case, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Passed or not.
    pub passed: bool,
    /// Wall time in seconds.
    pub secs: f64,
    /// Figures or the failure.
    pub detail: String,
}

impl CaseResult {
    /// The report line.
    pub fn line(&self) -> String {
        let verdict = if self.passed { "pass" } else { "fail" };
        format!(
            "RESULT {verdict} {} {:.1} {}",
            self.name, self.secs, self.detail
        )
    }

    /// Parses a report line; `Ok(None)` for lines that are not `RESULT` lines.
    pub fn parse(line: &str) -> Result<Option<Self>, Error> {
        let Some(rest) = line.strip_prefix("RESULT ") else {
            return Ok(None);
        };
        let bad = || Error::Malformed(line.to_owned());
        let mut words = rest.splitn(4, ' ');
        let passed = match words.next() {
            Some("pass") => true,
            Some("fail") => false,
            _ => return Err(bad()),
        };
        let name = words.next().ok_or_else(bad)?.to_owned();
        let secs = words.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let detail = words.next().unwrap_or("").to_owned();
        Ok(Some(CaseResult {
            name,
            passed,
            secs,
            detail,
        }))
    }
}

/// One boot measurement, as reported.
#[derive(Debug, Clone, PartialEq)]
pub struct BootSample {
    /// `vmm` or `qemu`.
    pub target: String,
    /// 1-based run number.
    pub run: u32,
    /// From the VMM's start to the guest's first userspace line.
    pub userspace_ms: f64,
    /// Resident memory of the VMM with the guest at its shell prompt.
    pub rss_kib: u64,
    /// The part of it in guest RAM.
    pub guest_kib: u64,
}

impl BootSample {
    /// The report line.
    pub fn line(&self) -> String {
        format!(
            "BOOT {} {} {:.1} {} {}",
            self.target, self.run, self.userspace_ms, self.rss_kib, self.guest_kib
        )
    }

    /// Parses a report line; `Ok(None)` for lines that are not `BOOT` lines.
    pub fn parse(line: &str) -> Result<Option<Self>, Error> {
        let Some(rest) = line.strip_prefix("BOOT ") else {
            return Ok(None);
        };
        let bad = || Error::Malformed(line.to_owned());
        let w: Vec<&str> = rest.split_whitespace().collect();
        let [target, run, ms, rss, guest] = w.as_slice() else {
            return Err(bad());
        };
        Ok(Some(BootSample {
            target: (*target).to_owned(),
            run: run.parse().map_err(|_| bad())?,
            userspace_ms: ms.parse().map_err(|_| bad())?,
            rss_kib: rss.parse().map_err(|_| bad())?,
            guest_kib: guest.parse().map_err(|_| bad())?,
        }))
    }
}

/// The median of some values (the mean of the middle two for an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip() {
        let r = CaseResult {
            name: "qemu/pvh-smp2".into(),
            passed: true,
            secs: 5.25,
            detail: "userspace at 1.9 s, nproc 2".into(),
        };
        let back = CaseResult::parse(&r.line()).unwrap().unwrap();
        assert_eq!(back.name, r.name);
        assert!(back.passed);
        assert_eq!(back.detail, r.detail);
        assert!(CaseResult::parse("GUEST-USERSPACE-UP").unwrap().is_none());
        let err = CaseResult::parse("RESULT maybe x 1 y").unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
        let err = CaseResult::parse("RESULT pass x soon").unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
    }

    #[test]
    fn boot_samples_round_trip() {
        let s = BootSample {
            target: "qemu".into(),
            run: 3,
            userspace_ms: 1234.5,
            rss_kib: 90_000,
            guest_kib: 60_000,
        };
        assert_eq!(BootSample::parse(&s.line()).unwrap().unwrap(), s);
        let err = BootSample::parse("BOOT qemu 1 fast 2 3").unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
        let err = BootSample::parse("BOOT qemu 1").unwrap_err();
        assert!(matches!(err, Error::Malformed(_)));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
