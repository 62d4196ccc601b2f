//! tinyvmm: runs guestmm's test guests on KVM with lazily populated RAM.
//!
//! ```text
//! tinyvmm [OPTIONS] [GUEST|all]...
//!   --ram-mib N              RAM size (default 64)
//!   --vcpus N                vCPUs (default: what the guest needs)
//!   --fault-around-kib N     first fault-around window (default 2048)
//!   --fault-around-max-kib N largest window (default 1048576)
//!   --eager                  RAM as one slot registered up front (baseline)
//!   --max-slots N            memslot cap
//!   --lazy-merge N           slot budget N (MergePolicy::Lazy, the default with 32):
//!                            new windows get their own slot below N live slots,
//!                            at N the smallest adjacent pair merges
//!   --eager-merge            every install merges with its neighbours (MergePolicy::Eager)
//!   --cow MODE               copy-on-write mode (CowMode): auto (default: userfaultfd
//!                            write protection where available), ro-slots or uffd-wp;
//!                            guests that need one (cowsmp) choose their own
//!   --memfile-max-mib N      guest memory cap (an even number of MiB)
//!   --timeout-s N            stop the guest after N seconds (default 120) and
//!                            report where each vCPU was
//!   --stats                  print maps(), the counters and KVM's own statistics
//!                            (KVM_GET_STATS_FD) after each guest
//!   --json                   one JSON object per guest instead of the summary line
//!                            (KVM's statistics under "kvm")
//!   --list                   list the guests
//!   -v, --verbose            log the library's debug messages to stderr (-vv: trace)
//!
//! Your own guest image (a flat binary built against guest/abi.h and
//! guest/guest.ld, loaded and entered like the built-in guests; NAME in the
//! summary line is the file name without its extension):
//!   --image FILE             run FILE (repeatable)
//!   --template-kib N         map an N KiB private template before start (r8/r9)
//!   --expect-violations N    N violations are part of a pass (default 0)
//!   --ends-in-violation      every vCPU must end stopped by a violation
//! ```
//!
//! An unmodified Linux kernel (an uncompressed `vmlinux` ELF; see README):
//!   --kernel FILE            boot FILE instead of test guests (console on stdout)
//!   --cmdline TEXT           kernel command line (default: guestmm::vmm::linux::DEFAULT_CMDLINE)
//!   --initrd FILE            initial ramdisk
//!   --pvh                    enter through PVH instead of the 64-bit boot protocol
//!   --stop-at TEXT           stop once the console printed TEXT
//!   --keep-cpuid             leave CX16 and SMAP in CPUID (see guestmm::vmm::linux)
//!   (--ram-mib defaults to 256, --timeout-s to 600; --eager and the
//!   fault-around options apply)
//!
//! Snapshot, restore and clone (see README, "Snapshots, restores and clones"):
//!   --snapshot-at MARK PATH  run GUEST (default lifecycle; one vCPU) to MARK, write a
//!                            snapshot to PATH, run the original on to its exit
//!   --diff-at MARK PATH      with --snapshot-at: track dirty pages from the snapshot on
//!                            and write a diff snapshot against it at MARK (a later MARK)
//!   --restore PATH           restore the snapshot at PATH (a diff: over its base, found
//!                            by file name next to it) and run it to its exit
//!                            (replaying PATH.wset, the working set, if there is one)
//!   --record-working-set     with --restore: record the windows the guest faults in
//!                            and save them to PATH.wset for later restores
//!   --clone N                run GUEST to MARK (--snapshot-at's, else 10), clone it
//!                            N times, run the original and every clone to their exit
//!   `all` (and no GUEST) ends with the lifecycle guest snapshotted, restored
//!   twice (recording, then replaying its working set) and cloned twice.
//!
//! Prints one summary line per guest (or kernel) and exits non-zero if any
//! failed (a kernel fails when it stopped on its own, or when `--stop-at`
//! was not reached).

use std::process::ExitCode;

use guestmm::kvm::{CloneOptions, WorkingSetMode};
use guestmm::vmm::guests::{self, Guest, GUESTS};
use guestmm::vmm::lifecycle;
use guestmm::vmm::linux::{boot_linux, BootProtocol, LinuxEnd, LinuxOptions};
use guestmm::vmm::runner::{run_guest, GuestReport, RunOptions};

struct Args {
    opts: RunOptions,
    stats: bool,
    json: bool,
    names: Vec<String>,
    images: Vec<String>,
    /// How `--image` guests run.
    template_size: u64,
    expected_violations: u32,
    ends_in_violation: bool,
    /// `--kernel` and its options.
    linux: Option<LinuxOptions>,
    /// `--snapshot-at MARK PATH`.
    snapshot_at: Option<(u32, std::path::PathBuf)>,
    /// `--diff-at MARK PATH`.
    diff_at: Option<(u32, std::path::PathBuf)>,
    /// `--restore PATH`.
    restore: Option<std::path::PathBuf>,
    /// `--record-working-set`.
    record_working_set: bool,
    /// `--clone N`.
    clone: Option<u32>,
    /// Run the lifecycle trio after the guests (`all`, or no guest named).
    lifecycle_all: bool,
    ram_given: bool,
    timeout_given: bool,
}

const USAGE: &str = "usage: tinyvmm [--ram-mib N] [--vcpus N] [--fault-around-kib N] \
[--fault-around-max-kib N] [--eager] [--max-slots N] [--lazy-merge N|--eager-merge] [--cow MODE] [--memfile-max-mib N] \
[--timeout-s N] [--image FILE [--template-kib N] [--expect-violations N] [--ends-in-violation]] \
[--stats] [--json] [--list] [-v|-vv] [GUEST|all]...
       tinyvmm [--snapshot-at MARK PATH [--diff-at MARK PATH]] [--restore PATH [--record-working-set]] \
[--clone N] [GUEST]
       tinyvmm --kernel VMLINUX [--cmdline TEXT] [--initrd FILE] [--pvh] [--stop-at TEXT] \
[--keep-cpuid] [--ram-mib N] [--eager] [--timeout-s N] [-v|-vv]";

fn parse() -> Result<Args, String> {
    let mut a = Args {
        opts: RunOptions::default(),
        stats: false,
        json: false,
        names: Vec::new(),
        images: Vec::new(),
        template_size: 0,
        expected_violations: 0,
        ends_in_violation: false,
        linux: None,
        snapshot_at: None,
        diff_at: None,
        restore: None,
        record_working_set: false,
        clone: None,
        lifecycle_all: false,
        ram_given: false,
        timeout_given: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |it: &mut dyn Iterator<Item = String>, flag: &str| -> Result<u64, String> {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--ram-mib" => {
                a.opts.ram_size = num(&mut it, &arg)? << 20;
                a.ram_given = true;
            }
            "--vcpus" => a.opts.vcpus = Some(num(&mut it, &arg)? as u32),
            "--fault-around-kib" => a.opts.fault_around = num(&mut it, &arg)? << 10,
            "--fault-around-max-kib" => a.opts.fault_around_max = num(&mut it, &arg)? << 10,
            "--eager" => a.opts.eager = true,
            "--max-slots" => a.opts.max_slots = Some(num(&mut it, &arg)? as usize),
            "--eager-merge" => a.opts.slot_merge = guestmm::kvm::MergePolicy::Eager,
            "--cow" => {
                let v = it.next().ok_or("--cow needs auto, ro-slots or uffd-wp")?;
                a.opts.cow = guestmm::kvm::CowMode::from_name(&v)
                    .ok_or(format!("--cow {v}: want auto, ro-slots or uffd-wp"))?;
            }
            "--lazy-merge" => {
                a.opts.slot_merge = guestmm::kvm::MergePolicy::Lazy {
                    max_slots: num(&mut it, &arg)? as usize,
                }
            }
            "--memfile-max-mib" => {
                let mib = num(&mut it, &arg)?;
                if mib == 0 || mib % 2 != 0 {
                    return Err(format!(
                        "--memfile-max-mib {mib}: must be a non-zero multiple of 2 (MiB)"
                    ));
                }
                a.opts.memfile_max = Some(mib << 20)
            }
            "--timeout-s" => {
                a.opts.timeout = std::time::Duration::from_secs(num(&mut it, &arg)?);
                a.timeout_given = true;
            }
            "--kernel" => {
                linux(&mut a).kernel = it.next().ok_or("--kernel needs a file")?.into();
            }
            "--cmdline" => linux(&mut a).cmdline = it.next().ok_or("--cmdline needs text")?,
            "--initrd" => {
                linux(&mut a).initrd = Some(it.next().ok_or("--initrd needs a file")?.into())
            }
            "--pvh" => linux(&mut a).protocol = BootProtocol::Pvh,
            "--stop-at" => linux(&mut a).stop_at = Some(it.next().ok_or("--stop-at needs text")?),
            "--keep-cpuid" => linux(&mut a).cpl0_workarounds = false,
            "--snapshot-at" => {
                let mark = num(&mut it, &arg)? as u32;
                let path = it.next().ok_or("--snapshot-at needs MARK and PATH")?;
                a.snapshot_at = Some((mark, path.into()));
            }
            "--diff-at" => {
                let mark = num(&mut it, &arg)? as u32;
                let path = it.next().ok_or("--diff-at needs MARK and PATH")?;
                a.diff_at = Some((mark, path.into()));
            }
            "--restore" => a.restore = Some(it.next().ok_or("--restore needs a PATH")?.into()),
            "--record-working-set" => a.record_working_set = true,
            "--clone" => a.clone = Some(num(&mut it, &arg)? as u32),
            "--image" => a
                .images
                .push(it.next().ok_or("--image needs a file")?.to_string()),
            "--template-kib" => a.template_size = num(&mut it, &arg)? << 10,
            "--expect-violations" => a.expected_violations = num(&mut it, &arg)? as u32,
            "--ends-in-violation" => a.ends_in_violation = true,
            "--stats" => a.stats = true,
            "--json" => a.json = true,
            "-v" | "--verbose" | "-vv" => {
                log::set_logger(&StderrLogger).map_err(|e| e.to_string())?;
                log::set_max_level(if arg == "-vv" {
                    log::LevelFilter::Trace
                } else {
                    log::LevelFilter::Debug
                });
            }
            "--list" => {
                for g in GUESTS {
                    println!("{:8} {}", g.name, g.description);
                }
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "all" => {
                a.names.extend(GUESTS.iter().map(|g| g.name.to_string()));
                a.lifecycle_all = true;
            }
            name if !name.starts_with('-') => a.names.push(name.to_string()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if let Some(l) = &a.linux {
        if l.kernel.as_os_str().is_empty() {
            return Err(format!("kernel options need --kernel FILE\n{USAGE}"));
        }
        if !a.names.is_empty() || !a.images.is_empty() {
            return Err("--kernel boots a kernel; it does not run test guests too".into());
        }
    }
    let lifecycle = a.snapshot_at.is_some() || a.restore.is_some() || a.clone.is_some();
    if a.diff_at.is_some() && a.snapshot_at.is_none() {
        return Err("--diff-at goes with --snapshot-at (its base)".into());
    }
    if a.record_working_set && a.restore.is_none() {
        return Err("--record-working-set goes with --restore PATH".into());
    }
    if lifecycle && (a.linux.is_some() || a.lifecycle_all || a.names.len() > 1) {
        return Err(
            "--snapshot-at, --restore and --clone take one guest (default lifecycle), not all"
                .into(),
        );
    }
    if a.names.is_empty() && a.images.is_empty() && a.linux.is_none() && !lifecycle {
        a.names.extend(GUESTS.iter().map(|g| g.name.to_string()));
        a.lifecycle_all = true;
    }
    Ok(a)
}

/// The kernel options, created on first use.
fn linux(a: &mut Args) -> &mut LinuxOptions {
    a.linux.get_or_insert_with(|| LinuxOptions {
        echo: true,
        ..LinuxOptions::default()
    })
}

/// Boots the `--kernel`; true if it ended as asked.
fn run_linux(kvm: &kvm_ioctls::Kvm, a: &Args) -> bool {
    let Some(base) = &a.linux else { return false };
    let mut opts = base.clone();
    if a.ram_given {
        opts.ram_size = a.opts.ram_size;
    }
    if a.timeout_given {
        opts.timeout = a.opts.timeout;
    }
    opts.eager = a.opts.eager;
    opts.fault_around = a.opts.fault_around;
    opts.fault_around_max = a.opts.fault_around_max;
    let r = match boot_linux(kvm, &opts) {
        Ok(r) => r,
        Err(e) => {
            println!("linux: FAIL could not boot: {e}");
            return false;
        }
    };
    let (ok, how) = match &r.end {
        LinuxEnd::Reached => (true, "reached the --stop-at text".to_string()),
        LinuxEnd::TimedOut => (opts.stop_at.is_none(), "timed out".to_string()),
        LinuxEnd::Stopped(why) => (false, format!("stopped: {why}")),
    };
    println!(
        "linux: {} {how} after {:.1} s: faults {} memory exits {} port exits {} slot adds {} \
         populated {} MiB #BP injected {} fwait skipped {}",
        if ok { "PASS" } else { "FAIL" },
        r.elapsed.as_secs_f64(),
        r.mm.faults,
        r.vm.memory_exits,
        r.port_exits,
        r.vm.slots.adds,
        r.populated_bytes >> 20,
        r.injected_breakpoints,
        r.skipped_fwaits,
    );
    if a.stats {
        println!("  mm: {:?}", r.mm);
        println!("  vm: {:?}", r.vm);
    }
    ok
}

/// A guest from an image file (`--image`), run as the options say. The
/// image and name live for the rest of the process.
fn image_guest(path: &str, a: &Args) -> Result<Guest, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("--image {path}: {e}"))?;
    let name = std::path::Path::new(path)
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or(format!("--image {path}: no file name"))?;
    if a.template_size % 4096 != 0 {
        return Err(format!(
            "--template-kib {}: must be a multiple of 4",
            a.template_size >> 10
        ));
    }
    Ok(Guest {
        name: Box::leak(name.to_string().into_boxed_str()),
        image: Box::leak(bytes.into_boxed_slice()),
        vcpus: 1,
        template_size: a.template_size,
        expected_violations: a.expected_violations,
        ends_in_violation: a.ends_in_violation,
        expected_console: "",
        unsupported_exit: None,
        description: "an image from --image",
        ..GUESTS[0]
    })
}

/// `--verbose`: every log record on stderr.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "{:5} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// KVM's counters as a JSON object: every scalar statistic by name (vCPU
/// values summed), plus `vcpus`, the number summed.
fn kvm_json(k: &guestmm::kvm::KvmStats) -> String {
    let mut fields: Vec<String> = k
        .scalars()
        .iter()
        .map(|(n, v)| format!("\"{n}\":{v}"))
        .collect();
    fields.push(format!("\"vcpus\":{}", k.vcpu_count));
    format!("{{{}}}", fields.join(","))
}

fn json(r: &GuestReport) -> String {
    format!(
        "{{\"guest\":\"{}\",\"pass\":{},\"exit\":{},\"faults\":{},\"exits\":{},\"memory_exits\":{},\"emulation_failures\":{},\
         \"slot_adds\":{},\"slot_deletes\":{},\"max_slots\":{},\"populated_kib\":{},\"violations\":{},\
         \"cow_copies\":{},\"cow_mode\":\"{}\",\"cow_wp_events\":{},\"cow_page_breaks\":{},\"cow_collapses\":{},\
         \"ms\":{},\"kvm\":{},\"failure\":{}}}",
        r.name,
        r.passed,
        r.exit_codes.first().copied().flatten().map_or("null".into(), |c| c.to_string()),
        r.mm.faults,
        r.vm.exits,
        r.vm.memory_exits,
        r.vm.emulation_failures,
        r.vm.slots.adds,
        r.vm.slots.deletes,
        r.vm.slots.max_live,
        r.mm.populated_bytes / 1024,
        r.violations.len(),
        r.mm.cow_copies,
        r.vm.cow_mode.name(),
        r.vm.cow.events,
        r.vm.cow.page_breaks,
        r.vm.cow.collapses,
        r.elapsed.as_millis(),
        r.kvm.as_ref().map_or("null".into(), kvm_json),
        r.failure.as_ref().map_or("null".into(), |f| format!("{f:?}")),
    )
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tinyvmm: {e}");
            return ExitCode::from(2);
        }
    };
    let kvm = match guestmm::kvm::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("tinyvmm: cannot open /dev/kvm: {e}");
            return ExitCode::from(2);
        }
    };
    if args.linux.is_some() {
        return if run_linux(&kvm, &args) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if args.snapshot_at.is_some() || args.restore.is_some() || args.clone.is_some() {
        return run_lifecycle(&kvm, &args);
    }
    let mut failed = 0;
    let mut to_run: Vec<Guest> = Vec::new();
    for name in &args.names {
        match guests::find(name) {
            Some(g) => to_run.push(*g),
            None => {
                eprintln!("tinyvmm: no guest named {name} (try --list)");
                failed += 1;
            }
        }
    }
    for path in &args.images {
        match image_guest(path, &args) {
            Ok(g) => to_run.push(g),
            Err(e) => {
                eprintln!("tinyvmm: {e}");
                return ExitCode::from(2);
            }
        }
    }
    for guest in &to_run {
        let name = guest.name;
        match run_guest(&kvm, guest, &args.opts) {
            Ok(report) => {
                if !args.json {
                    for line in report.console.lines() {
                        println!("[{}] {line}", report.name);
                    }
                }
                println!(
                    "{}",
                    if args.json {
                        json(&report)
                    } else {
                        report.summary_line()
                    }
                );
                if args.stats {
                    for m in &report.maps {
                        println!("  {m}");
                    }
                    println!("  mm: {:?}", report.mm);
                    println!("  vm: {:?}", report.vm);
                    match &report.kvm {
                        Some(k) => {
                            println!("  kvm vm: {}", k.vm.scalars_line());
                            println!(
                                "  kvm vcpus ({} summed): {}",
                                k.vcpu_count,
                                k.vcpus.scalars_line()
                            );
                        }
                        None => println!("  kvm: no binary statistics on this kernel"),
                    }
                }
                if !report.passed {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("guest {name}: FAIL could not start: {e}");
                failed += 1;
            }
        }
    }
    if args.lifecycle_all {
        for step in lifecycle::run_all(&kvm, &args.opts) {
            println!("{}", step.summary_line());
            if !step.passed {
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--snapshot-at`, `--restore`, `--clone`: one line per step.
fn run_lifecycle(kvm: &kvm_ioctls::Kvm, a: &Args) -> ExitCode {
    let name = a.names.first().map_or("lifecycle", String::as_str);
    let Some(guest) = guests::find(name) else {
        eprintln!("tinyvmm: no guest named {name} (try --list)");
        return ExitCode::from(2);
    };
    let mut steps = Vec::new();
    if let Some((mark, path)) = &a.snapshot_at {
        let diff = a.diff_at.as_ref().map(|(m, p)| (*m, p.as_path()));
        steps.push((
            "snapshot",
            lifecycle::snapshot_at(kvm, guest, &a.opts, *mark, path, diff),
        ));
    }
    if let Some(path) = &a.restore {
        let mode = if a.record_working_set {
            WorkingSetMode::Record
        } else {
            WorkingSetMode::Replay
        };
        steps.push(("restore", lifecycle::restore(kvm, path, &a.opts, mode)));
    }
    if let Some(n) = a.clone {
        let mark = a
            .snapshot_at
            .as_ref()
            .map_or(lifecycle::LIFECYCLE_MARK, |(m, _)| *m);
        steps.push((
            "clone",
            lifecycle::clone_at(kvm, guest, &a.opts, mark, n, &CloneOptions::default()),
        ));
    }
    let mut ok = true;
    for (step, r) in steps {
        match r {
            Ok(report) => {
                println!("{}", report.summary_line());
                ok &= report.passed;
            }
            Err(e) => {
                println!("guest {step}: FAIL could not run: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
