//! `linux-tests`: the integration tests that boot real Linux guests, and the boot benchmark.
//!
//! It runs in two halves. The outer half (the commands `run`, `self-check`, `bench-boot`) starts
//! ONE host that can run Linux guests through `resources/nested-host` (direct KVM where the CPU
//! has VMX/SVM, else the nested KVM host under QEMU TCG, which costs a boot of its own) and has it
//! run the inner half (`inner-run`, `inner-bench`) of this same binary, which boots every guest of
//! the batch one after another and prints a report line per case. The outer half reads those lines
//! back, prints a verdict per case and closes with "N passed, N failed".
//!
//! ```text
//! linux-tests run [--targets vmm,qemu] [--filter TEXT] [--vmm PATH] [--nested|--direct] [--disks] [--qmp]
//! linux-tests self-check [--filter TEXT]           # the same cases under QEMU: proves the harness
//! linux-tests bench-boot [--targets qemu,vmm] [--runs N] [--mem MIB] [--smp N] [--vmm PATH]
//!                        [--vmm-variant NAME=ARGS]...   # vmm with ARGS appended: column vmm-NAME
//!                        [--guest initramfs|debian]     # Debian 12 to `running` (resources/debian)
//!                        [--disk none|pci]              # the initramfs with a virtio-blk-pci disk
//! ```

mod bench;
mod cases;
mod disks;
mod guest;
mod memory;
mod nested;
mod pci;
mod phases;
mod qmp;
mod report;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use report::CaseResult;
use target::Target;

/// Errors of the command line and of the outer half.
#[derive(Debug, thiserror::Error)]
enum Error {
    /// No command, or an unknown one.
    #[error("usage: linux-tests run|self-check|bench-boot [options] (see the file's header)")]
    Usage,
    /// An option this command does not take, or one without its value.
    #[error("bad option {0:?}")]
    Option(String),
    /// An option's value is malformed.
    #[error("bad value {value:?} for {option}")]
    Value {
        /// The option.
        option: String,
        /// Its value.
        value: String,
    },
    /// The `--targets` list names an unknown VMM.
    #[error(transparent)]
    Target(#[from] target::Error),
    /// The VMM under test is not an executable file.
    #[error("no vmm binary at {0} (build it: cargo build --release -p vmm)")]
    NoVmm(PathBuf),
    /// `--guest-dir` is missing in an inner command.
    #[error("--guest-dir is required")]
    NoGuestDir,
    /// A script of `resources/` that builds guest images could not be started.
    #[error("cannot run {path}")]
    Resource {
        /// The script.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A script of `resources/` that builds guest images failed.
    #[error("{path} failed with {status}")]
    ResourceFailed {
        /// The script.
        path: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// `--disk pci` with `--guest debian`, whose root disk is on virtio-mmio.
    #[error("--disk pci is for the initramfs guest (Debian has its root disk)")]
    DiskWithDebian,
    /// Running the outer host failed.
    #[error(transparent)]
    Nested(#[from] nested::Error),
    /// A boot of the benchmark failed.
    #[error(transparent)]
    Bench(#[from] bench::Error),
    /// Writing the benchmark's summary failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The options every command takes (each uses the ones it needs).
#[derive(Debug)]
struct Options {
    targets: Vec<Target>,
    filter: Option<String>,
    vmm: PathBuf,
    force: Option<&'static str>,
    guest_dir: Option<PathBuf>,
    runs: u32,
    mem_mib: u64,
    smp: u32,
    groups: cases::Groups,
    /// `--vmm-variant`: the bench's further columns, vmm with arguments appended.
    variants: Vec<bench::Column>,
    /// `--guest`: the bench's guest.
    guest: bench::GuestImage,
    /// `--disk`: the bench's disk for the initramfs guest.
    disk: bench::Disk,
    /// `--append`: words the bench adds to every guest kernel's command line.
    append: String,
}

fn parse_number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, Error> {
    value.parse().map_err(|_| Error::Value {
        option: option.to_owned(),
        value: value.to_owned(),
    })
}

fn parse_options(args: &[String], default_targets: &[Target]) -> Result<Options, Error> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let mut o = Options {
        targets: default_targets.to_vec(),
        filter: None,
        vmm: target_dir.join("release/vmm"),
        force: None,
        guest_dir: None,
        runs: 5,
        mem_mib: 512,
        smp: 2,
        groups: cases::Groups::default(),
        variants: Vec::new(),
        guest: bench::GuestImage::Initramfs,
        disk: bench::Disk::None,
        append: String::new(),
    };
    let mut it = args.iter();
    while let Some(opt) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| Error::Option(opt.clone()));
        match opt.as_str() {
            "--targets" => o.targets = Target::parse_list(&value()?)?,
            "--filter" => o.filter = Some(value()?),
            "--vmm" => o.vmm = PathBuf::from(value()?),
            "--guest-dir" => o.guest_dir = Some(PathBuf::from(value()?)),
            "--runs" => o.runs = parse_number(opt, &value()?)?,
            "--mem" => o.mem_mib = parse_number(opt, &value()?)?,
            "--smp" => o.smp = parse_number(opt, &value()?)?,
            "--disks" => o.groups.disks = true,
            "--qmp" => o.groups.qmp = true,
            "--vmm-variant" => {
                let spec = value()?;
                let v = bench::Column::variant(&spec).ok_or_else(|| Error::Value {
                    option: opt.clone(),
                    value: spec,
                })?;
                o.variants.push(v);
            }
            "--guest" => {
                let name = value()?;
                o.guest = bench::GuestImage::parse(&name).ok_or_else(|| Error::Value {
                    option: opt.clone(),
                    value: name,
                })?;
            }
            "--disk" => {
                let name = value()?;
                o.disk = bench::Disk::parse(&name).ok_or_else(|| Error::Value {
                    option: opt.clone(),
                    value: name,
                })?;
            }
            "--append" => o.append = value()?,
            "--nested" => o.force = Some("--nested"),
            "--direct" => o.force = Some("--direct"),
            _ => return Err(Error::Option(opt.clone())),
        }
    }
    if o.guest == bench::GuestImage::Debian && o.disk != bench::Disk::None {
        return Err(Error::DiskWithDebian);
    }
    Ok(o)
}

/// The outer host for these options: the VMM under test is copied in when it is a target.
fn host(o: &Options) -> Result<nested::Host, Error> {
    let mut bins = Vec::new();
    if o.targets.contains(&Target::Vmm) || !o.variants.is_empty() {
        if !o.vmm.is_file() {
            return Err(Error::NoVmm(o.vmm.clone()));
        }
        bins.push(o.vmm.clone());
    }
    let disk_dir = if o.groups.disks {
        Some(resource("rootfs")?.join("chain"))
    } else if o.guest == bench::GuestImage::Debian {
        Some(resource("debian")?)
    } else {
        None
    };
    Ok(nested::Host {
        resources: nested::default_resources(),
        bins,
        force: o.force,
        disk_dir,
        outer_append: None,
    })
}

/// Builds guest images with the script `resources/NAME` (`rootfs`: the root file system chain,
/// `debian`: Debian 12) and returns the folder it prints.
fn resource(name: &str) -> Result<PathBuf, Error> {
    let script = nested::default_resources().join(name);
    let out = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| Error::Resource {
            path: script.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::ResourceFailed {
            path: script,
            status: out.status,
        });
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The outer half of `run`: one host, every case, a verdict per case.
fn run(o: &Options) -> Result<bool, Error> {
    let expected = cases::cases(&o.targets, o.filter.as_deref(), o.groups);
    let targets: Vec<String> = o.targets.iter().map(Target::to_string).collect();
    let mut args = vec![
        "inner-run".to_owned(),
        "--targets".to_owned(),
        targets.join(","),
    ];
    if let Some(f) = &o.filter {
        args.extend(["--filter".to_owned(), f.clone()]);
    }
    if o.groups.disks {
        args.push("--disks".to_owned());
    }
    if o.groups.qmp {
        args.push("--qmp".to_owned());
    }
    println!("linux-tests: {} cases in one host", expected.len());
    let (code, output) = host(o)?.run_inner(&args)?;
    let mut results = Vec::new();
    for line in output.lines() {
        match CaseResult::parse(line) {
            Ok(Some(r)) => results.push(r),
            Ok(None) if !line.starts_with("RESULT") => println!("  {line}"),
            Ok(None) => {}
            Err(e) => println!("linux-tests: {e}"),
        }
    }
    let (mut passed, mut failed) = (0, 0);
    for case in &expected {
        match results.iter().find(|r| r.name == case.name) {
            Some(r) if r.passed => {
                passed += 1;
                println!("PASS {} ({:.1} s): {}", r.name, r.secs, r.detail);
            }
            Some(r) => {
                failed += 1;
                println!("FAIL {} ({:.1} s): {}", r.name, r.secs, r.detail);
            }
            None => {
                failed += 1;
                println!(
                    "FAIL {}: no result (the inner run ended with status {code})",
                    case.name
                );
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0 && code == 0)
}

/// The inner half of `run`: every case, one after another, a `RESULT` line each.
fn inner_run(o: &Options) -> Result<bool, Error> {
    let dir = o.guest_dir.as_ref().ok_or(Error::NoGuestDir)?;
    println!("{}", host_line());
    let mut ok = true;
    for case in cases::cases(&o.targets, o.filter.as_deref(), o.groups) {
        let outcome = cases::run(&case, dir);
        if let Some(t) = &outcome.transcript {
            println!("console of {}:", case.name);
            for l in t.lines() {
                println!("  | {l}");
            }
        }
        ok &= outcome.passed;
        let r = CaseResult {
            name: case.name,
            passed: outcome.passed,
            secs: outcome.secs,
            detail: outcome.detail,
        };
        println!("{}", r.line());
    }
    Ok(ok)
}

/// The outer half of `bench-boot`: one host, the summary printed and kept under results/boot/.
fn bench_boot(o: &Options) -> Result<bool, Error> {
    let targets: Vec<String> = o.targets.iter().map(Target::to_string).collect();
    let mut args = vec![
        "inner-bench".to_owned(),
        "--targets".to_owned(),
        targets.join(","),
        "--runs".to_owned(),
        o.runs.to_string(),
        "--mem".to_owned(),
        o.mem_mib.to_string(),
        "--smp".to_owned(),
        o.smp.to_string(),
        "--guest".to_owned(),
        o.guest.name().to_owned(),
        "--disk".to_owned(),
        o.disk.name().to_owned(),
    ];
    if !o.append.is_empty() {
        args.extend(["--append".to_owned(), o.append.clone()]);
    }
    for v in &o.variants {
        let name = v.name.strip_prefix("vmm-").unwrap_or(&v.name);
        args.extend([
            "--vmm-variant".to_owned(),
            format!("{name}={}", v.args.join(" ")),
        ]);
    }
    let mut outer = host(o)?;
    outer.outer_append = Some(bench::OUTER_APPEND);
    let (code, output) = outer.run_inner(&args)?;
    let host_line = output
        .lines()
        .find_map(|l| l.strip_prefix("HOST "))
        .unwrap_or("host unknown")
        .to_owned();
    let setup = bench::Setup {
        runs: o.runs,
        mem_mib: o.mem_mib,
        smp: o.smp,
        guest: o.guest,
        disk: o.disk,
    };
    let md = bench::summarize(&output, setup, &host_line);
    let dir = nested::repo_root().join("results/boot");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = dir.join(format!("{stamp}.md"));
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, format!("{md}\n```\n{output}```\n")))
        .map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    print!("{output}");
    println!("\n{md}\n(kept in {})", path.display());
    Ok(code == 0)
}

/// The `HOST` line the inner half prints first: which host (direct KVM or nested), its CPUs, and the
/// QEMU version, since timings are only comparable within one host.
fn host_line() -> String {
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output();
    let qemu = qemu.map_or_else(
        |_| "QEMU missing".to_owned(),
        |q| {
            String::from_utf8_lossy(&q.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        },
    );
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let where_ = std::env::var("NESTED_HOST").unwrap_or_else(|_| "unknown".to_owned());
    format!("HOST {where_} KVM host with {cpus} CPUs; {qemu}")
}

/// The inner half of `bench-boot`.
fn inner_bench(o: &Options) -> Result<bool, Error> {
    let dir = o.guest_dir.as_ref().ok_or(Error::NoGuestDir)?;
    println!("{}", host_line());
    let setup = bench::Setup {
        runs: o.runs,
        mem_mib: o.mem_mib,
        smp: o.smp,
        guest: o.guest,
        disk: o.disk,
    };
    let columns: Vec<bench::Column> = (o.targets.iter().copied().map(bench::Column::plain))
        .chain(o.variants.iter().cloned())
        .collect();
    // resources/nested-host's writable copy of --disk-dir: Debian's folder.
    let debian = std::env::var_os("DISK_DIR").map(PathBuf::from);
    bench::measure(&columns, setup, &o.append, dir, debian.as_deref())?;
    Ok(true)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = args
        .split_first()
        .map_or(("", &[][..]), |(c, r)| (c.as_str(), r));
    let result = match command {
        "run" => parse_options(rest, &[Target::Vmm]).and_then(|o| run(&o)),
        "self-check" => parse_options(rest, &[Target::Qemu]).and_then(|o| run(&o)),
        "bench-boot" => {
            parse_options(rest, &[Target::Qemu, Target::Vmm]).and_then(|o| bench_boot(&o))
        }
        "inner-run" => parse_options(rest, &[Target::Vmm]).and_then(|o| inner_run(&o)),
        "inner-bench" => parse_options(rest, &[Target::Qemu]).and_then(|o| inner_bench(&o)),
        _ => Err(Error::Usage),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let mut msg = format!("linux-tests: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_parse() {
        let o = parse_options(
            &strings(&["--targets", "qemu", "--runs", "7", "--nested"]),
            &[Target::Vmm],
        )
        .unwrap();
        assert_eq!(o.targets, [Target::Qemu]);
        assert_eq!(o.runs, 7);
        assert_eq!(o.force, Some("--nested"));
        assert_eq!(o.guest, bench::GuestImage::Initramfs);
        assert_eq!(o.disk, bench::Disk::None);
        let o = parse_options(&strings(&["--guest", "debian"]), &[]).unwrap();
        assert_eq!(o.guest, bench::GuestImage::Debian);
        let o = parse_options(&strings(&["--disk", "pci"]), &[]).unwrap();
        assert_eq!(o.disk, bench::Disk::Pci);
        let o = parse_options(
            &strings(&["--vmm-variant", "nosandbox=-sandbox  off"]),
            &[Target::Vmm],
        )
        .unwrap();
        assert_eq!(
            o.variants,
            [bench::Column {
                name: "vmm-nosandbox".to_owned(),
                target: Target::Vmm,
                args: strings(&["-sandbox", "off"]),
            }]
        );
    }

    #[test]
    fn bad_options_are_named() {
        let err = parse_options(&strings(&["--runs", "many"]), &[]).unwrap_err();
        assert!(
            matches!(err, Error::Value { ref option, ref value } if option == "--runs" && value == "many")
        );
        let err = parse_options(&strings(&["--fast"]), &[]).unwrap_err();
        assert!(matches!(err, Error::Option(ref o) if o == "--fast"));
        let err = parse_options(&strings(&["--filter"]), &[]).unwrap_err();
        assert!(matches!(err, Error::Option(ref o) if o == "--filter"));
        for (opt, bad) in [("--guest", "fedora"), ("--disk", "scsi")] {
            let err = parse_options(&strings(&[opt, bad]), &[]).unwrap_err();
            assert!(
                matches!(err, Error::Value { ref option, ref value } if option == opt && value == bad),
                "{err}"
            );
        }
        let err =
            parse_options(&strings(&["--guest", "debian", "--disk", "pci"]), &[]).unwrap_err();
        assert!(matches!(err, Error::DiskWithDebian), "{err}");
        let err = parse_options(&strings(&["--targets", "xen"]), &[]).unwrap_err();
        assert!(matches!(err, Error::Target(_)));
        // A variant's name becomes part of a column's name: a lowercase word, and some arguments.
        for bad in [
            "no-sandbox=-sandbox off",
            "9=-sandbox off",
            "nosandbox=",
            "nosandbox",
            "=x",
        ] {
            let err = parse_options(&strings(&["--vmm-variant", bad]), &[]).unwrap_err();
            assert!(
                matches!(err, Error::Value { ref option, ref value } if option == "--vmm-variant" && value == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_missing_vmm_is_reported_before_any_host_starts() {
        let o = parse_options(&strings(&["--vmm", "/nonexistent/vmm"]), &[Target::Vmm]).unwrap();
        assert!(matches!(host(&o), Err(Error::NoVmm(_))));
        assert!(matches!(inner_run(&o), Err(Error::NoGuestDir)));
    }
}
