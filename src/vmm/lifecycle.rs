//! Snapshot, restore and clone of a test guest: tinyvmm's `--snapshot-at`,
//! `--restore`, `--record-working-set` and `--clone`, and the `guest
//! snapshot:`, `guest restore:` and `guest clone:` lines of `make run`.
//!
//! The guest is the `lifecycle` guest (`guest/lifecycle.S`) or any
//! single-vCPU guest with a MARK to stop at: it runs until MARK
//! [`LIFECYCLE_MARK`], is snapshotted or cloned there, and every copy runs on
//! to its EXIT, which checks that memory, registers and the counter survived.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::guests::Guest;
use super::hypercall::{self, Hypercall};
use super::runner::{new_guest_vm, GuestVm, RunError, RunOptions};
use crate::kvm::{
    CloneOptions, Exit, RestoreOptions, SnapshotMode, Vcpu, Vm, VmOptions, WorkingSetMode,
};
use crate::memfile::{MemoryFile, MemoryFileOptions};

/// The MARK the `lifecycle` guest reaches once its state is built.
pub const LIFECYCLE_MARK: u32 = 10;

/// What one step (`snapshot`, `restore`, `clone`) did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// `snapshot`, `restore` or `clone`.
    pub step: &'static str,
    /// Every check held.
    pub passed: bool,
    /// Why not, when not.
    pub failure: Option<String>,
    /// `key=value` figures for the summary line.
    pub figures: Vec<(&'static str, String)>,
}

impl StepReport {
    /// The summary line: `guest STEP: PASS|FAIL key=value...`.
    pub fn summary_line(&self) -> String {
        let mut line = format!(
            "guest {}: {}",
            self.step,
            if self.passed { "PASS" } else { "FAIL" }
        );
        for (k, v) in &self.figures {
            line.push_str(&format!(" {k}={v}"));
        }
        if let Some(f) = &self.failure {
            line.push(' ');
            line.push_str(f);
        }
        line
    }

    fn new(step: &'static str) -> StepReport {
        StepReport {
            step,
            passed: true,
            failure: None,
            figures: Vec::new(),
        }
    }

    fn fail(&mut self, why: String) {
        self.passed = false;
        self.failure = Some(match self.failure.take() {
            Some(f) => format!("{f}; {why}"),
            None => why,
        });
    }

    fn figure(&mut self, key: &'static str, value: impl ToString) {
        self.figures.push((key, value.to_string()));
    }
}

/// How a run of one vCPU ended ([`run_until`]).
#[derive(Debug, Clone, Default)]
pub struct RunOutcome {
    /// The EXIT code, if the guest exited.
    pub exit_code: Option<u32>,
    /// Whether it stopped at the MARK asked for.
    pub at_mark: bool,
    /// Console output.
    pub console: String,
    /// Why the run stopped otherwise (a violation, a timeout, an error).
    pub failure: Option<String>,
    /// Time spent running.
    pub elapsed: Duration,
}

impl RunOutcome {
    /// `None` if the guest exited with code 0, else what went wrong.
    pub fn exit_failure(&self) -> Option<String> {
        match (self.exit_code, &self.failure) {
            (_, Some(f)) => Some(f.clone()),
            (Some(0), None) => None,
            (Some(c), None) => Some(format!("exit code {c}")),
            (None, None) => Some("never exited".into()),
        }
    }
}

/// Runs `vcpu` (the test-guest hypercall ABI, single vCPU) until its EXIT,
/// until MARK `mark` (the vCPU is then just past the `out`, ready to be
/// snapshotted, cloned or run on), or until `timeout` (a kick).
pub fn run_until(vcpu: &mut Vcpu, mark: Option<u32>, timeout: Duration) -> RunOutcome {
    let start = Instant::now();
    let (done, timer) = mpsc::channel::<()>();
    let kicker = vcpu.kicker();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = timer.recv_timeout(timeout) {
            kicker.kick();
            true
        } else {
            false
        }
    });
    let mut out = RunOutcome::default();
    loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                out.failure = Some(format!("run: {e}"));
                break;
            }
        };
        match exit {
            Exit::Resolved => continue,
            Exit::IoOut { port, data } => {
                let data = data.to_vec();
                let regs = if hypercall::needs_regs(port) {
                    vcpu.fd().get_regs().unwrap_or_default()
                } else {
                    Default::default()
                };
                match hypercall::decode(port, &data, &regs) {
                    Ok(Hypercall::Console(b)) => out.console.push(char::from(b)),
                    Ok(Hypercall::Exit(code)) => {
                        out.exit_code = Some(code);
                        break;
                    }
                    Ok(Hypercall::Mark(n)) if Some(n) == mark => {
                        out.at_mark = true;
                        break;
                    }
                    Ok(Hypercall::Mark(_)) => {}
                    Ok(other) => {
                        out.failure = Some(format!("unsupported hypercall {other:?}"));
                        break;
                    }
                    Err(e) => {
                        out.failure = Some(e.to_string());
                        break;
                    }
                }
            }
            Exit::Kicked => {
                out.failure = Some(format!("timed out after {timeout:?}"));
                break;
            }
            other => {
                out.failure = Some(format!("unexpected exit {other:?}"));
                break;
            }
        }
    }
    if out.failure.is_some() {
        let rip = vcpu.fd().get_regs().map_or(u64::MAX, |r| r.rip);
        out.failure = out.failure.map(|f| format!("{f} (rip {rip:#x})"));
    }
    out.elapsed = start.elapsed();
    let _ = done.send(());
    let _ = watchdog.join();
    out
}

/// Boots `guest` (one vCPU) with `opts`, runs it to MARK `mark`, and
/// returns the VM, its vCPU, its memory file and how the run ended (check
/// [`RunOutcome::at_mark`]).
pub fn boot_to_mark(
    kvm: &Kvm,
    guest: &Guest,
    opts: &RunOptions,
    mark: u32,
) -> Result<Booted, RunError> {
    let GuestVm {
        vm,
        memfile,
        layout,
        args,
        ..
    } = new_guest_vm(kvm, &Guest { vcpus: 1, ..*guest }, opts)?;
    let mut vcpu = vm.create_vcpu(0)?;
    layout.setup_vcpu(vcpu.fd(), kvm, 0, &args)?;
    let outcome = run_until(&mut vcpu, Some(mark), opts.timeout);
    Ok((vm, vec![vcpu], memfile, outcome))
}

/// What [`boot_to_mark`] returns: the VM, its vCPU (one), its memory file
/// and how the run ended.
pub type Booted = (Arc<Vm>, Vec<Vcpu>, Arc<MemoryFile>, RunOutcome);

/// Checks the address space and slots of `vm`, unmaps everything, drops
/// it and, given `memfile` (once the last VM over it goes), checks that it
/// has nothing left; failures go to `report`.
fn teardown(vm: Arc<Vm>, memfile: Option<&MemoryFile>, report: &mut StepReport) {
    let space = vm.space().clone();
    if let Err(e) = space.check_invariants() {
        report.fail(format!("mm invariants: {e}"));
    }
    if let Err(e) = vm.slots().check_invariants() {
        report.fail(format!("slot invariants: {e}"));
    }
    if let Err(e) = space.unmap(0, space.options().size) {
        report.fail(format!("unmap: {e}"));
    }
    drop(space);
    drop(vm);
    let leaked = memfile.map_or(0, MemoryFile::allocated_bytes);
    if leaked != 0 {
        report.fail(format!(
            "{leaked} bytes of guest memory left after teardown"
        ));
    }
}

/// `guest snapshot:` — boots `guest`, runs it to MARK `mark`, writes a
/// full snapshot to `path`, then runs the original on to its EXIT; with
/// `diff` = `(MARK2, PATH2)`, dirty tracking runs from the full snapshot
/// on and a diff snapshot against it is written at MARK2.
pub fn snapshot_at(
    kvm: &Kvm,
    guest: &Guest,
    opts: &RunOptions,
    mark: u32,
    path: &Path,
    diff: Option<(u32, &Path)>,
) -> Result<StepReport, RunError> {
    let mut report = StepReport::new("snapshot");
    let (vm, mut vcpus, memfile, first) = boot_to_mark(kvm, guest, opts, mark)?;
    if !first.at_mark {
        report.fail(format!(
            "did not reach MARK {mark}: {}",
            first.exit_failure().unwrap_or_default()
        ));
        teardown(vm, Some(&memfile), &mut report);
        return Ok(report);
    }
    if diff.is_some() {
        vm.start_dirty_tracking()?;
    }
    let committed_before = vm.space().stats().committed_bytes;
    let saved = vm.snapshot(&mut vcpus, path, SnapshotMode::Full)?;
    let committed_after = vm.space().stats().committed_bytes;
    if committed_after != committed_before {
        report.fail(format!(
            "saving committed memory: {committed_before} -> {committed_after} bytes"
        ));
    }
    if let Some((mark2, diff_path)) = diff {
        let to = run_until(&mut vcpus[0], Some(mark2), opts.timeout);
        if to.at_mark {
            let base = path.to_path_buf();
            let d = vm.snapshot(&mut vcpus, diff_path, SnapshotMode::Diff { base })?;
            report.figure("diff_data_kib", d.data_bytes_written / 1024);
            report.figure("diff_file_kib", d.file_blocks_bytes / 1024);
        } else {
            report.fail(format!(
                "did not reach MARK {mark2} for the diff: {}",
                to.exit_failure().unwrap_or_default()
            ));
        }
    }
    let rest = run_until(&mut vcpus[0], None, opts.timeout);
    if let Some(f) = rest.exit_failure() {
        report.fail(format!("the original after the snapshot: {f}"));
    }
    report.figure(
        "exit",
        rest.exit_code.map_or("none".into(), |c| c.to_string()),
    );
    report.figure("committed_kib", committed_before / 1024);
    report.figure("data_kib", saved.data_bytes_written / 1024);
    report.figure("file_kib", saved.file_blocks_bytes / 1024);
    report.figure("save_ms", saved.elapsed.as_millis());
    report.figure("run_after_ms", rest.elapsed.as_millis());
    drop(vcpus);
    teardown(vm, Some(&memfile), &mut report);
    Ok(report)
}

/// `guest restore:` — restores the snapshot at `path` into a new VM (with
/// the working-set `mode`) and runs it to its EXIT; with
/// [`WorkingSetMode::Record`] the record is saved next to the snapshot.
pub fn restore(
    kvm: &Kvm,
    path: &Path,
    opts: &RunOptions,
    mode: WorkingSetMode,
) -> Result<StepReport, RunError> {
    let mut report = StepReport::new("restore");
    let memfile = Arc::new(MemoryFile::new(
        "guestmm-restore",
        MemoryFileOptions::default(),
    )?);
    let vm_opts = VmOptions {
        max_slots: opts.max_slots,
        slot_merge: opts.slot_merge,
        cow: opts.cow,
        ..VmOptions::default()
    };
    let mut restored = Vm::restore(
        kvm,
        memfile.clone(),
        path,
        RestoreOptions {
            vm: vm_opts,
            working_set: mode,
            ..RestoreOptions::default()
        },
    )?;
    let vm = restored.vm.clone();
    let maps_before = vm.stats().slots.maps;
    let kvm_stats = crate::kvm::KvmStatsReader::open(
        vm.vm_fd(),
        &restored.vcpus.iter().map(|v| v.fd()).collect::<Vec<_>>(),
    )
    .ok();
    let run = match restored.vcpus.first_mut() {
        Some(v) => run_until(v, None, opts.timeout),
        None => RunOutcome {
            failure: Some("the snapshot has no vCPU".into()),
            ..RunOutcome::default()
        },
    };
    if let Some(f) = run.exit_failure() {
        report.fail(format!("the restored guest: {f}"));
    }
    if mode == WorkingSetMode::Record {
        let n = vm.save_working_set(path)?;
        report.figure("recorded_windows", n);
    }
    let stats = vm.stats();
    report.figure(
        "exit",
        run.exit_code.map_or("none".into(), |c| c.to_string()),
    );
    report.figure("restore_ms", restored.elapsed.as_millis());
    report.figure("run_ms", run.elapsed.as_millis());
    report.figure("memory_exits", stats.memory_exits);
    report.figure("maps_during_run", stats.slots.maps - maps_before);
    if let Some(pf) = kvm_stats.and_then(|r| r.read().ok()?.pf_taken()) {
        report.figure("kvm_page_faults", pf);
    }
    report.figure("prefetched_kib", restored.prefetched_bytes / 1024);
    report.figure("copied_kib", memfile.allocated_bytes() / 1024);
    drop(restored);
    teardown(vm, Some(&memfile), &mut report);
    Ok(report)
}

/// `guest clone:` — boots `guest`, runs it to MARK `mark`, clones it `n`
/// times, and runs the original and every clone to their EXIT (one after
/// the other: each must pass on its own memory).
pub fn clone_at(
    kvm: &Kvm,
    guest: &Guest,
    opts: &RunOptions,
    mark: u32,
    n: u32,
    clone_opts: &CloneOptions,
) -> Result<StepReport, RunError> {
    let mut report = StepReport::new("clone");
    let (vm, mut vcpus, memfile, first) = boot_to_mark(kvm, guest, opts, mark)?;
    if !first.at_mark {
        report.fail(format!(
            "did not reach MARK {mark}: {}",
            first.exit_failure().unwrap_or_default()
        ));
        teardown(vm, Some(&memfile), &mut report);
        return Ok(report);
    }
    let mut clones = Vec::new();
    let mut clone_times = Vec::new();
    for _ in 0..n {
        let c = vm.clone_vm(kvm, &mut vcpus, clone_opts.clone())?;
        clone_times.push(c.elapsed);
        clones.push(c);
    }
    let before = memfile.allocated_bytes();
    let mut growth = Vec::new();
    for (i, c) in clones.iter_mut().enumerate() {
        let at = memfile.allocated_bytes();
        let run = run_until(&mut c.vcpus[0], None, opts.timeout);
        if let Some(f) = run.exit_failure() {
            report.fail(format!("clone {i}: {f}"));
        }
        growth.push(memfile.allocated_bytes().saturating_sub(at));
    }
    let rest = run_until(&mut vcpus[0], None, opts.timeout);
    if let Some(f) = rest.exit_failure() {
        report.fail(format!("the original: {f}"));
    }
    let first_clone = clone_times.first().copied();
    clone_times.sort();
    report.figure("clones", n);
    if let Some(t) = first_clone {
        report.figure("first_clone_us", t.as_micros());
    }
    report.figure(
        "exit",
        rest.exit_code.map_or("none".into(), |c| c.to_string()),
    );
    if let Some(t) = clone_times.get(clone_times.len() / 2) {
        report.figure("clone_us", t.as_micros());
    }
    report.figure("shared_kib", before / 1024);
    if let Some(g) = growth.iter().max() {
        report.figure("max_growth_kib", g / 1024);
    }
    for c in clones {
        drop(c.vcpus);
        let mut sub = StepReport::new("clone");
        teardown(c.vm, None, &mut sub);
        if let Some(f) = sub.failure {
            report.fail(format!("clone teardown: {f}"));
        }
    }
    drop(vcpus);
    teardown(vm, Some(&memfile), &mut report);
    Ok(report)
}

/// `make run`'s lifecycle: the `lifecycle` guest snapshotted at its MARK
/// into a temporary file (and a diff at the next MARK), restored twice
/// (recording its working set, then replaying it) and from the diff (one
/// `guest restore:` line for the three), and cloned twice.
/// The files are removed afterwards.
pub fn run_all(kvm: &Kvm, opts: &RunOptions) -> Vec<StepReport> {
    let guest = super::guests::find("lifecycle").copied();
    let path = std::env::temp_dir().join(format!("guestmm-lifecycle-{}.snap", std::process::id()));
    let or_fail = |step: &'static str, r: Result<StepReport, RunError>| {
        r.unwrap_or_else(|e| {
            let mut s = StepReport::new(step);
            s.fail(format!("could not run: {e}"));
            s
        })
    };
    let Some(guest) = guest else {
        let mut s = StepReport::new("snapshot");
        s.fail("no lifecycle guest".into());
        return vec![s];
    };
    let diff = path.with_extension("diff");
    let snap = or_fail(
        "snapshot",
        snapshot_at(
            kvm,
            &guest,
            opts,
            LIFECYCLE_MARK,
            &path,
            Some((LIFECYCLE_MARK + 1, &diff)),
        ),
    );
    let mut restored = or_fail("restore", restore(kvm, &path, opts, WorkingSetMode::Record));
    let replayed = or_fail("restore", restore(kvm, &path, opts, WorkingSetMode::Replay));
    // One line: the recording run's figures, then the replay's (suffixed).
    for (k, v) in replayed.figures {
        let key: &'static str = match k {
            "exit" => "replay_exit",
            "restore_ms" => "replay_restore_ms",
            "run_ms" => "replay_run_ms",
            "memory_exits" => "replay_memory_exits",
            "prefetched_kib" => "replay_prefetched_kib",
            "copied_kib" => "replay_copied_kib",
            other => other,
        };
        restored.figure(key, v);
    }
    if let Some(f) = replayed.failure {
        restored.fail(format!("replay: {f}"));
    }
    // The diff, over the full snapshot (found by its file name).
    let from_diff = or_fail("restore", restore(kvm, &diff, opts, WorkingSetMode::Off));
    if let Some((_, v)) = from_diff.figures.iter().find(|(k, _)| *k == "exit") {
        restored.figure("diff_exit", v.clone());
    }
    if let Some(f) = from_diff.failure {
        restored.fail(format!("diff: {f}"));
    }
    let cloned = or_fail(
        "clone",
        clone_at(
            kvm,
            &guest,
            opts,
            LIFECYCLE_MARK,
            2,
            &CloneOptions::default(),
        ),
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&diff);
    let _ = std::fs::remove_file(crate::snapshot::working_set_path(&path));
    vec![snap, restored, cloned]
}
