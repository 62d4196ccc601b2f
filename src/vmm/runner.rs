//! Runs one test guest on a guestmm-managed VM: the harness behind
//! `tinyvmm`, the KVM tests and the benchmarks.
//!
//! The boot region is a precommitted vma (page tables must be in a memslot:
//! KVM cannot walk guest page tables through an exit); RAM is a lazy private
//! anonymous vma, or a precommitted one in eager mode (the baseline: one
//! slot registered up front).
//!
//! The vCPU side (the hypercall handler, the vCPU threads) is in
//! `vmm/runner/vcpus.rs`; the template file and the decommit thread in
//! `vmm/runner/host.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::boot::{BootLayout, EntryArgs, DEFAULT_RAM_BASE};
use super::guests::Guest;
use crate::kvm::{
    CowMode, KvmStats, KvmStatsReader, MemoryViolation, MergePolicy, VcpuStop, Vm, VmOptions,
    VmStats,
};
use crate::memfile::{MemoryFile, MemoryFileOptions};
use crate::mm::{AddressSpaceOptions, MapOpts, Mappable, MapsEntry, Stats};
use crate::perms::Perms;
use crate::range::HUGE_PAGE_SIZE;

mod host;
mod vcpus;

use host::{first_pattern_mismatch, make_template, Decommitter};
use vcpus::{run_vcpus, Shared};

/// How to run a guest.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// RAM size (rounded up to the guest's minimum).
    pub ram_size: u64,
    /// vCPUs (default: what the guest needs).
    pub vcpus: Option<u32>,
    /// Fault-around window of a first fault.
    pub fault_around: u64,
    /// Largest fault-around window.
    pub fault_around_max: u64,
    /// Populate and register all RAM up front (the baseline).
    pub eager: bool,
    /// Memslot limit below KVM's.
    pub max_slots: Option<usize>,
    /// MemoryFile size limit: any multiple of 2 MiB (the memory file's
    /// chunk size is chosen to divide it).
    pub memfile_max: Option<u64>,
    /// When adjacent RAM installs share a memslot.
    pub slot_merge: MergePolicy,
    /// How long the guest may run: then every vCPU is stopped and the run
    /// fails, naming each vCPU's RIP (or that it never left `KVM_RUN`).
    pub timeout: Duration,
    /// Host interference: a thread decommits all of RAM
    /// ([`AddressSpace::decommit`](crate::mm::AddressSpace::decommit)) this
    /// often while the guest runs, as a balloon or a memory-pressure
    /// policy would. Only for guests that do not rely on RAM contents.
    pub decommit_every: Option<Duration>,
    /// The copy-on-write mode, for guests that do not ask for one
    /// ([`Guest::cow`](super::guests::Guest::cow)).
    pub cow: CowMode,
    /// Populate the template for write and fork the address space before
    /// the vCPUs start (the child, over a no-op backend, lives until they
    /// end): the guest's template pages are then copy-on-write after a
    /// fork, shared with the child, instead of fresh object pages.
    pub fork_template: bool,
    /// Populate all of RAM for write and fork the address space before the
    /// vCPUs start (with [`fork_template`](Self::fork_template), one fork
    /// for both): every RAM page the guest writes is then copy-on-write.
    pub fork_ram: bool,
    /// Put the template in an unlinked file under the temporary directory
    /// instead of a memfd (userfaultfd cannot write-protect a regular
    /// file's pages: copy-on-write there keeps read-only slots).
    pub template_on_disk: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(120),
            ram_size: 64 << 20,
            vcpus: None,
            fault_around: HUGE_PAGE_SIZE,
            fault_around_max: crate::mm::DEFAULT_FAULT_AROUND_MAX,
            eager: false,
            max_slots: None,
            memfile_max: None,
            slot_merge: MergePolicy::default(),
            decommit_every: None,
            cow: VmOptions::default().cow,
            fork_template: false,
            fork_ram: false,
            template_on_disk: false,
        }
    }
}

/// Errors that prevent a guest from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The boot layout or vCPU setup failed.
    #[error(transparent)]
    Boot(#[from] super::boot::BootError),
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] crate::kvm::VmError),
    /// Setting up memory failed.
    #[error(transparent)]
    Mm(#[from] crate::mm::MmError),
    /// The memory file could not be created.
    #[error(transparent)]
    MemoryFile(#[from] crate::memfile::MemoryFileError),
    /// The template file could not be made.
    #[error("template file: {0}")]
    Template(#[from] std::io::Error),
    /// The template could not be wrapped.
    #[error(transparent)]
    File(#[from] crate::mm::FileError),
    /// A snapshot, restore or clone failed.
    #[error(transparent)]
    Lifecycle(#[from] crate::kvm::LifecycleError),
}

/// What one guest run did.
#[derive(Debug, Clone)]
pub struct GuestReport {
    /// The guest's name.
    pub name: String,
    /// Every check held.
    pub passed: bool,
    /// Why not, when not.
    pub failure: Option<String>,
    /// EXIT code of each vCPU (`None`: it never exited).
    pub exit_codes: Vec<Option<u32>>,
    /// Console output.
    pub console: String,
    /// MARK hypercalls: (vCPU, phase, time since start).
    pub marks: Vec<(u32, u32, Duration)>,
    /// Violations reported (the handler continues; one that cannot be
    /// skipped, from an emulation failure, stops its vCPU).
    pub violations: Vec<MemoryViolation>,
    /// VM counters.
    pub vm: VmStats,
    /// Address-space counters at the end of the run.
    pub mm: Stats,
    /// KVM's own counters at the end of the run (vCPUs summed); `None` if
    /// this kernel has no binary statistics (logged).
    pub kvm: Option<KvmStats>,
    /// The address space's maps at the end of the run.
    pub maps: Vec<MapsEntry>,
    /// Wall time from the first vCPU start to the last vCPU stop.
    pub elapsed: Duration,
    /// MemoryFile bytes still allocated after teardown (must be 0).
    pub leaked_bytes: u64,
    /// Memslots still live after every vma was unmapped (must be 0).
    pub slots_after_unmap: u64,
    /// Decommits of all RAM made by [`RunOptions::decommit_every`].
    pub host_decommits: u64,
}

impl GuestReport {
    /// The summary line `tinyvmm` prints.
    pub fn summary_line(&self) -> String {
        let mut line = format!(
            "guest {}: {} exit={} faults={} exits={} slot_adds={} slot_deletes={} max_slots={} populated_kib={} ms={}",
            self.name,
            if self.passed { "PASS" } else { "FAIL" },
            self.exit_codes.first().copied().flatten().map_or("none".to_string(), |c| c.to_string()),
            self.mm.faults,
            self.vm.exits,
            self.vm.slots.adds,
            self.vm.slots.deletes,
            self.vm.slots.max_live,
            self.mm.populated_bytes / 1024,
            self.elapsed.as_millis(),
        );
        if let Some(f) = &self.failure {
            line.push(' ');
            line.push_str(f);
        }
        line
    }
}

/// Boots `guest` with `opts` on a fresh VM, runs every vCPU to its exit,
/// checks the result and tears everything down.
pub fn run_guest(kvm: &Kvm, guest: &Guest, opts: &RunOptions) -> Result<GuestReport, RunError> {
    let vcpus = opts.vcpus.unwrap_or(guest.vcpus);
    let GuestVm {
        vm,
        memfile,
        layout,
        ram_size,
        mut args,
    } = new_guest_vm(kvm, guest, opts)?;
    let space = vm.space().clone();
    let template = if guest.template_size > 0 {
        let (file, hf) = make_template(guest.template_size, opts.template_on_disk)?;
        args.template_base = layout.ram_base() + ram_size;
        args.template_size = guest.template_size;
        let map = MapOpts::object(hf.clone() as Arc<dyn Mappable>, 0, guest.template_size)
            .fixed(args.template_base)
            .perms(Perms::READ_WRITE)
            .name("template");
        space.map(map)?;
        Some((file, hf))
    } else {
        None
    };
    let fork_template = opts.fork_template && template.is_some();
    let forked = if fork_template || opts.fork_ram {
        if fork_template {
            space.populate(args.template_base, args.template_size, crate::Access::Write)?;
        }
        if opts.fork_ram {
            space.populate(layout.ram_base(), ram_size, crate::Access::Write)?;
        }
        Some(space.fork(Arc::new(crate::mm::NoopBackend))?)
    } else {
        None
    };

    let mut vcpu_list = Vec::new();
    for i in 0..vcpus {
        let vcpu = vm.create_vcpu(i)?;
        layout.setup_vcpu(vcpu.fd(), kvm, i, &args)?;
        vcpu_list.push(vcpu);
    }

    // Opened while the vCPUs are at hand; read after they are gone.
    let kvm_stats = KvmStatsReader::open(
        vm.vm_fd(),
        &vcpu_list.iter().map(|v| v.fd()).collect::<Vec<_>>(),
    )
    .map_err(|e| log::info!("no KVM statistics: {e}"))
    .ok();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let start = Instant::now();
    let interference = opts
        .decommit_every
        .map(|period| Decommitter::start(space.clone(), layout.ram_base(), ram_size, period));
    let (results, stuck) = run_vcpus(
        vcpu_list,
        &shared,
        start,
        template.as_ref().map(|(_, hf)| hf.clone()),
        opts.timeout,
    );
    let elapsed = start.elapsed();
    drop(forked);
    let host_decommits = interference.map_or(Ok(0), Decommitter::finish);
    let mut timeout_failures = Vec::new();
    if !stuck.is_empty() {
        timeout_failures.push(format!(
            "timed out after {:?}: {}",
            opts.timeout,
            stuck.join(", ")
        ));
    }

    let shared = std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()));
    let mut failures: Vec<String> = shared.errors.clone();
    failures.extend(timeout_failures);
    let host_decommits = host_decommits.unwrap_or_else(|e| {
        failures.push(format!("host decommit: {e}"));
        0
    });
    for (i, (_, r)) in results.iter().enumerate() {
        match r {
            Err(e) => failures.push(e.clone()),
            Ok(VcpuStop::Stopped) if stuck.is_empty() => failures.push(format!(
                "vcpu {i} stopped: {}",
                vm.stop_cause().map_or("?".to_string(), |c| c.to_string())
            )),
            _ => {}
        }
    }
    let exit_codes: Vec<Option<u32>> = results.iter().map(|(c, _)| *c).collect();
    for (i, (c, r)) in results.iter().enumerate() {
        let violation_stop = matches!(
            r,
            Ok(VcpuStop::Violation(_)) | Ok(VcpuStop::EmulationFailure(_))
        );
        match c {
            None if guest.ends_in_violation && violation_stop => {}
            None if guest.ends_in_violation && failures.is_empty() => {
                failures.push(format!("vcpu {i} did not stop on a violation"))
            }
            Some(code) if guest.ends_in_violation && Some(*code) != guest.unsupported_exit => {
                failures.push(format!("vcpu {i} exit code {code}, want a violation stop"))
            }
            Some(0) => {}
            Some(code) if Some(*code) == guest.unsupported_exit => {
                failures.push(format!("unsupported on this host (exit {code})"))
            }
            Some(code) => failures.push(format!("vcpu {i} exit code {code}")),
            None if failures.is_empty() => failures.push(match r {
                Ok(VcpuStop::EmulationFailure(f)) => {
                    format!("vcpu {i} stopped on an instruction it could not complete: {f}")
                }
                Ok(VcpuStop::Violation(v)) => format!("vcpu {i} stopped on a violation: {v}"),
                _ => format!("vcpu {i} never exited"),
            }),
            None => {}
        }
    }
    if shared.violations.len() != guest.expected_violations as usize {
        failures.push(format!(
            "{} violations, want {}",
            shared.violations.len(),
            guest.expected_violations
        ));
    }
    if !guest.expected_console.is_empty() && shared.console != guest.expected_console {
        failures.push(format!(
            "console {:?}, want {:?}",
            shared.console, guest.expected_console
        ));
    }
    if let Some((file, _)) = &template {
        if let Some(off) = first_pattern_mismatch(file, guest.template_size)? {
            failures.push(format!("template file changed at offset {off:#x}"));
        }
    }
    if let Err(e) = space.check_invariants() {
        failures.push(format!("mm invariants: {e}"));
    }
    if let Err(e) = vm.slots().check_invariants() {
        failures.push(format!("slot invariants: {e}"));
    }
    let vm_stats = vm.stats();
    let kvm = kvm_stats.and_then(|r| {
        r.read()
            .map_err(|e| log::info!("reading KVM statistics: {e}"))
            .ok()
    });
    let mm = space.stats();
    let maps = space.maps();
    space.unmap(0, space.options().size)?;
    let slots_after_unmap = vm.slots().stats().live;
    if slots_after_unmap != 0 {
        failures.push(format!(
            "{slots_after_unmap} memslots left after unmapping everything"
        ));
    }
    drop(space);
    drop(vm);
    drop(template);
    let leaked_bytes = memfile.allocated_bytes();
    if leaked_bytes != 0 {
        failures.push(format!(
            "{leaked_bytes} bytes of guest memory left after teardown"
        ));
    }
    Ok(GuestReport {
        name: guest.name.to_string(),
        passed: failures.is_empty(),
        failure: (!failures.is_empty()).then(|| failures.join("; ")),
        exit_codes,
        console: shared.console,
        marks: shared.marks,
        violations: shared.violations,
        vm: vm_stats,
        mm,
        kvm,
        maps,
        elapsed,
        leaked_bytes,
        slots_after_unmap,
        host_decommits,
    })
}

/// A VM set up for a test guest, its vCPUs not created yet.
pub(crate) struct GuestVm {
    pub vm: Arc<Vm>,
    pub memfile: Arc<MemoryFile>,
    pub layout: BootLayout,
    pub ram_size: u64,
    pub args: EntryArgs,
}

/// Creates the VM `run_guest` runs `guest` in: its memory file, the
/// precommitted boot region with the guest's image, and RAM.
pub(crate) fn new_guest_vm(
    kvm: &Kvm,
    guest: &Guest,
    opts: &RunOptions,
) -> Result<GuestVm, RunError> {
    let vcpus = opts.vcpus.unwrap_or(guest.vcpus);
    let ram_size = opts.ram_size.max(guest.min_ram);
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram_size, vcpus)?;
    let mut mf_opts = MemoryFileOptions::default();
    if let Some(max) = opts.memfile_max {
        mf_opts.max_size = max;
        // The largest chunk (≤ the default) that divides the limit.
        while mf_opts.chunk_size > HUGE_PAGE_SIZE && max % mf_opts.chunk_size != 0 {
            mf_opts.chunk_size /= 2;
        }
    }
    let memfile = Arc::new(MemoryFile::new(
        &format!("guestmm-{}", guest.name),
        mf_opts,
    )?);
    let space_opts = AddressSpaceOptions {
        fault_around: opts.fault_around,
        fault_around_max: opts.fault_around_max.max(opts.fault_around),
        ..VmOptions::default().space
    };
    let vm = Vm::new(
        kvm,
        memfile.clone(),
        VmOptions {
            space: space_opts,
            max_slots: opts.max_slots,
            slot_merge: opts.slot_merge,
            cow: guest.cow.unwrap_or(opts.cow),
            ..VmOptions::default()
        },
    )?;
    let space = vm.space();
    layout.map_boot_region(space, guest.image)?;
    let mut ram = MapOpts::anonymous(ram_size)
        .fixed(layout.ram_base())
        .perms(Perms::ALL)
        .name("ram");
    if opts.eager {
        ram = ram.precommit();
    }
    space.map(ram)?;

    let args = EntryArgs {
        cow_wp: vm.stats().cow_mode == CowMode::UserfaultfdWp,
        ..EntryArgs::default()
    };
    Ok(GuestVm {
        vm,
        memfile,
        layout,
        ram_size,
        args,
    })
}
