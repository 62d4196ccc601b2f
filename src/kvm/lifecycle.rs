//! Snapshots of a VM and lazy restores from them (see `crate::snapshot`
//! for the file format).
//!
//! A snapshot is taken with the VM paused: every vCPU's state, the VM's
//! clock, the layout of the address space and the populated memory, read
//! through the files behind it (nothing is populated or committed to save
//! it). A restore maps the snapshot's memory privately (copy-on-write) into
//! a new VM: the guest runs before any of it is read; the page cache holds
//! what the guest reads, shared by every VM restored from the same file;
//! what it writes is copied into the VM's memory file.
//!
//! A restore may record the windows its guest faults in, in order
//! ([`WorkingSetMode::Record`], then [`Vm::save_working_set`]); later
//! restores prefetch them before the vCPUs start
//! ([`WorkingSetMode::Replay`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::vcpu_state::{StateError, VcpuState, VmState};
use super::{Vcpu, Vm, VmError, VmOptions};
use crate::memfile::MemoryFile;
use crate::mm::{HostFile, MapOpts, Mappable, MmError};
use crate::range::GuestRange;
use crate::snapshot::{
    self, working_set_path, DiffOf, SaveReport, SaveRequest, Snapshot, SnapshotError, SnapshotKind,
    WorkingSet,
};

/// Errors of snapshots, restores and clones.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The snapshot file (or working-set record) is unusable, or writing it
    /// failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VM could not be created, paused or set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU's or the VM's KVM state could not be read or set.
    #[error(transparent)]
    State(#[from] StateError),
    /// Rebuilding the address space failed.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// The vCPUs given are not all of this VM's.
    #[error("expected all {expected} vCPUs of this VM, got {given} ({why})")]
    Vcpus {
        /// The VM's vCPU count.
        expected: u32,
        /// How many were given.
        given: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A diff snapshot needs dirty tracking started at (or before) its base.
    #[error("a diff snapshot needs dirty tracking (Vm::start_dirty_tracking) since its base")]
    NotTracking,
    /// A diff was asked for against a snapshot that is not this VM's last
    /// full snapshot taken with dirty tracking on (tracking restarted since,
    /// or the base is another VM's, or a diff).
    #[error("{} (id {id:#x}) is not this VM's last full snapshot taken with dirty tracking on", path.display())]
    NotTrackedSince {
        /// The base asked for.
        path: PathBuf,
        /// Its id.
        id: u64,
    },
    /// The address space was mapped, unmapped or remapped since the diff's
    /// base: pages a diff does not hold would come from the base's layout.
    /// Take a full snapshot.
    #[error("the layout changed since the base snapshot {id:#x}: take a full snapshot")]
    LayoutChanged {
        /// The base's id.
        id: u64,
    },
    /// [`Vm::save_working_set`] on a VM that is not recording.
    #[error("the VM is not recording its working set (restore it with WorkingSetMode::Record)")]
    NotRecording,
    /// A diff snapshot's base is not the snapshot it was taken against.
    #[error("base snapshot {path} has id {found:#x}, the diff needs {expected:#x}")]
    WrongBase {
        /// The base file.
        path: PathBuf,
        /// The id the diff records.
        expected: u64,
        /// The id found.
        found: u64,
    },
}

/// The base of a VM's diff snapshots: its last full snapshot taken with
/// dirty tracking on (the pages dirtied since are the address space's:
/// [`AddressSpace::dirty_since_base`](crate::mm::AddressSpace::dirty_since_base)),
/// and its layout, which a diff must share.
#[derive(Debug)]
pub(crate) struct DiffBase {
    pub id: u64,
    pub layout: Vec<LayoutKey>,
}

/// What a vma maps, for comparing layouts: its range, privacy and object
/// (address and offset).
pub(crate) type LayoutKey = (GuestRange, bool, Option<(usize, u64)>);

/// The layout of `vm`'s address space, as [`LayoutKey`]s.
fn layout_keys(vm: &Vm) -> Vec<LayoutKey> {
    vm.space()
        .layout()
        .into_iter()
        .map(|v| {
            let object = v
                .object
                .as_ref()
                .map(|(m, off)| (Arc::as_ptr(m) as *const () as usize, *off));
            (v.range, v.private, object)
        })
        .collect()
}

impl Vm {
    /// The diff base (a leaf lock).
    pub(crate) fn diff_base_locked(&self) -> std::sync::MutexGuard<'_, Option<DiffBase>> {
        self.diff_base.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The base path of a diff `mode` (empty for a full snapshot).
fn mode_base(mode: &SnapshotMode) -> PathBuf {
    match mode {
        SnapshotMode::Diff { base } => base.clone(),
        SnapshotMode::Full => PathBuf::new(),
    }
}

/// Checks that `vcpus` are all of `vm`'s vCPUs, each once.
pub(crate) fn check_vcpus(vm: &Arc<Vm>, vcpus: &[Vcpu]) -> Result<(), LifecycleError> {
    let bad = |why| LifecycleError::Vcpus {
        expected: vm.vcpu_count(),
        given: vcpus.len(),
        why,
    };
    if vcpus.iter().any(|v| !Arc::ptr_eq(v.vm(), vm)) {
        return Err(bad("a vCPU of another VM"));
    }
    let mut ids: Vec<u32> = vcpus.iter().map(Vcpu::index).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != vcpus.len() || vcpus.len() != vm.vcpu_count() as usize {
        return Err(bad("each of the VM's vCPUs must be given once"));
    }
    Ok(())
}

/// What [`Vm::snapshot`] writes.
#[derive(Debug, Clone, Default)]
pub enum SnapshotMode {
    /// Every populated page.
    #[default]
    Full,
    /// Only the pages dirtied since the full snapshot at `base` was taken:
    /// it must be this VM's last full snapshot, taken with dirty tracking
    /// on ([`Vm::start_dirty_tracking`] before it) and tracking not
    /// restarted since. Diffs are cumulative: each holds every page dirtied
    /// since the base, so any one of them restores over the base alone.
    Diff {
        /// The base snapshot.
        base: PathBuf,
    },
}

/// What [`Vm::restore`] does with the working-set record next to the
/// snapshot ([`snapshot::working_set_path`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WorkingSetMode {
    /// Prefetch the record if there is one (populate and install its
    /// windows in large batches, host page tables filled, before the vCPUs
    /// start); otherwise nothing.
    #[default]
    Replay,
    /// Record the windows the guest faults in, in order, until
    /// [`Vm::save_working_set`].
    Record,
    /// Neither.
    Off,
}

/// Options of [`Vm::restore`].
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The new VM's options; the space size is the snapshot's.
    pub vm: VmOptions,
    /// For a diff snapshot: its base (default: the file name the diff
    /// records, in the diff's directory).
    pub base: Option<PathBuf>,
    /// The working-set record.
    pub working_set: WorkingSetMode,
}

/// A VM restored by [`Vm::restore`].
#[derive(Debug)]
pub struct Restored {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its vCPUs, in the snapshot's state, ready to run.
    pub vcpus: Vec<Vcpu>,
    /// Time from the call until the vCPUs were ready (the prefetch of a
    /// working set included).
    pub elapsed: Duration,
    /// Windows of the working set prefetched (0 without a record).
    pub prefetched_windows: usize,
    /// Bytes prefetched.
    pub prefetched_bytes: u64,
}

impl Vm {
    /// Writes a snapshot of this VM to `path` (atomically: a temporary
    /// file renamed into place): the state of `vcpus` and of the VM, the
    /// address-space layout and device ranges, and the memory `mode` asks
    /// for. The VM is paused meanwhile. With dirty tracking on, the dirty
    /// set restarts from this snapshot.
    ///
    /// Preconditions: `vcpus` are all of this VM's vCPUs.
    ///
    /// Errors: wrong `vcpus`, a diff without dirty tracking or with a bad
    /// base, KVM state that cannot be read, I/O errors writing the file
    /// (nothing is left at `path` then).
    pub fn snapshot(
        self: &Arc<Self>,
        vcpus: &mut [Vcpu],
        path: &Path,
        mode: SnapshotMode,
    ) -> Result<SaveReport, LifecycleError> {
        check_vcpus(self, vcpus)?;
        let base = match &mode {
            SnapshotMode::Full => None,
            SnapshotMode::Diff { base } => {
                if !self.space().is_dirty_tracking() {
                    return Err(LifecycleError::NotTracking);
                }
                let base_ref = Snapshot::open(base)?.base_ref();
                let tracked = self.diff_base_locked().as_ref().map(|b| b.id);
                if tracked != Some(base_ref.id) {
                    return Err(LifecycleError::NotTrackedSince {
                        path: base.clone(),
                        id: base_ref.id,
                    });
                }
                Some(base_ref)
            }
        };
        let _paused = self.pause()?;
        let states = vcpus
            .iter_mut()
            .map(Vcpu::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        let states: Vec<Vec<u8>> = states.iter().map(VcpuState::to_bytes).collect();
        let vm_state = VmState::save(self.vm_fd())?.to_bytes();
        let layout = layout_keys(self);
        let dirty = match &base {
            None => {
                // Now is the base of the next diffs (if tracking): what
                // the guest or host dirties from here on is theirs.
                *self.diff_base_locked() = None;
                self.space().mark_dirty_base()?;
                Vec::new()
            }
            Some(b) => {
                let same_layout = self
                    .diff_base_locked()
                    .as_ref()
                    .is_some_and(|d| d.layout == layout);
                if !same_layout {
                    return Err(LifecycleError::LayoutChanged { id: b.id });
                }
                match self.space().dirty_since_base()? {
                    Some(pages) => pages.ranges(),
                    None => {
                        return Err(LifecycleError::NotTrackedSince {
                            path: mode_base(&mode),
                            id: b.id,
                        })
                    }
                }
            }
        };
        let diff = base.as_ref().map(|base| DiffOf {
            base: base.clone(),
            dirty: &dirty,
        });
        let saved = snapshot::save(
            path,
            SaveRequest {
                space: self.space(),
                devices: self.device_ranges(),
                vcpus: states,
                vm_state,
                diff,
            },
        );
        if base.is_none() {
            // A full snapshot written while tracking is the base of the
            // next diffs; one that failed is the base of none.
            match &saved {
                Ok(r) if self.space().is_dirty_tracking() => {
                    *self.diff_base_locked() = Some(DiffBase { id: r.id, layout });
                }
                _ => self.space().clear_dirty_base(),
            }
        }
        // A working-set record next to `path` belongs to the file replaced.
        let _ = std::fs::remove_file(working_set_path(path));
        let report = saved?;
        log::info!(
            "snapshot {}: {} data bytes, {} file bytes",
            path.display(),
            report.data_bytes_written,
            report.file_blocks_bytes
        );
        Ok(report)
    }

    /// Restores the snapshot at `path` into a new VM over `memfile`: its
    /// memory becomes a private copy-on-write mapping of the snapshot
    /// file (nothing read before the guest touches it), the layout,
    /// protections and device ranges are rebuilt, and the vCPUs get their
    /// state. A diff snapshot is restored over its base (`opts.base`). With
    /// [`WorkingSetMode::Replay`] and a record next to the snapshot, the
    /// record's windows are prefetched before this returns.
    ///
    /// Restored memory is a private mapping of a regular file, which
    /// userfaultfd cannot write-protect: a first write to each 2 MiB chunk
    /// exits and is completed by the host (README, "Atomicity"); populate
    /// memory that vCPUs update with locked instructions for write first.
    ///
    /// Errors: the snapshot (or its base, or its record) is refused (see
    /// [`SnapshotError`]: bad magic, version, truncation, checksums,
    /// layout); KVM refuses the VM or a state. Nothing is left running.
    pub fn restore(
        kvm: &Kvm,
        memfile: Arc<MemoryFile>,
        path: &Path,
        opts: RestoreOptions,
    ) -> Result<Restored, LifecycleError> {
        let start = Instant::now();
        let snap = Snapshot::open(path)?;
        let meta = snap.meta().clone();
        let base = match (&meta.kind, &meta.base) {
            (SnapshotKind::Diff, Some(b)) => {
                let base_path = opts.base.clone().unwrap_or_else(|| {
                    path.parent()
                        .unwrap_or_else(|| Path::new("."))
                        .join(&b.file_name)
                });
                let base = Snapshot::open(&base_path)?;
                if base.meta().id != b.id {
                    return Err(LifecycleError::WrongBase {
                        path: base_path,
                        expected: b.id,
                        found: base.meta().id,
                    });
                }
                Some(base)
            }
            _ => None,
        };
        let mut vm_opts = opts.vm.clone();
        vm_opts.space.size = meta.space_size;
        let vm = Vm::new(kvm, memfile, vm_opts)?;
        let file_of = |s: &Snapshot| -> Result<(Arc<HostFile>, u64), LifecycleError> {
            let f = s.file().try_clone().map_err(|source| SnapshotError::Io {
                op: "dup",
                path: s.path().to_path_buf(),
                source,
            })?;
            let host = HostFile::new(f, false).map_err(MmError::from)?;
            Ok((host, s.data_offset()))
        };
        // The memory under the vmas: the base's (a full snapshot is its own
        // base), then a diff's data ranges over it.
        let (lower, lower_offset) = file_of(base.as_ref().unwrap_or(&snap))?;
        let space = vm.space();
        for v in &meta.vmas {
            let at = v.range.start();
            space.map(
                MapOpts::object(
                    lower.clone() as Arc<dyn Mappable>,
                    lower_offset + at,
                    v.range.len(),
                )
                .fixed(at)
                .perms(v.max_perms)
                .max_perms(v.max_perms)
                .name(&v.name),
            )?;
        }
        if base.is_some() {
            let (upper, upper_offset) = file_of(&snap)?;
            for v in &meta.vmas {
                for d in clip(&meta.data, v.range) {
                    space.map(
                        MapOpts::object(
                            upper.clone() as Arc<dyn Mappable>,
                            upper_offset + d.start(),
                            d.len(),
                        )
                        .fixed_replace(d.start())
                        .perms(v.max_perms)
                        .max_perms(v.max_perms)
                        .name(&v.name),
                    )?;
                }
            }
        }
        for v in &meta.vmas {
            for (r, perms) in &v.protections {
                if *perms != v.max_perms {
                    space.protect(r.start(), r.len(), *perms)?;
                }
            }
        }
        for &d in &meta.devices {
            vm.add_device_range(d)?;
        }
        // An in-kernel irqchip and PIT must exist before the vCPUs.
        let vm_state = VmState::from_bytes(&meta.vm_state)?;
        vm_state.create_devices(vm.vm_fd())?;
        let mut vcpus = Vec::with_capacity(meta.vcpus.len());
        for (i, bytes) in meta.vcpus.iter().enumerate() {
            let state = VcpuState::from_bytes(bytes)?;
            let mut v = vm.create_vcpu(i as u32)?;
            v.restore_state(&state)?;
            vcpus.push(v);
        }
        vm_state.restore(vm.vm_fd())?;
        let (mut prefetched_windows, mut prefetched_bytes) = (0, 0);
        match opts.working_set {
            WorkingSetMode::Replay => {
                let record = working_set_path(path);
                if record.exists() {
                    let ws = WorkingSet::load(&record)?;
                    prefetched_windows = ws.windows.len();
                    // A full snapshot's holes read as zeros: only its data
                    // is worth reading in ahead (a diff's holes are its
                    // base's data: fill everything).
                    let fill = (base.is_none()).then_some(meta.data.as_slice());
                    prefetched_bytes = space.prefetch(&ws.windows, fill);
                }
            }
            WorkingSetMode::Record => space.start_fault_record(),
            WorkingSetMode::Off => {}
        }
        let elapsed = start.elapsed();
        log::info!(
            "restored {} ({} vCPUs) in {elapsed:?}, {prefetched_windows} windows prefetched",
            path.display(),
            vcpus.len()
        );
        Ok(Restored {
            vm,
            vcpus,
            elapsed,
            prefetched_windows,
            prefetched_bytes,
        })
    }

    /// Stops recording faults ([`WorkingSetMode::Record`]) and saves the
    /// windows recorded, in order, next to the snapshot at `snapshot`
    /// ([`snapshot::working_set_path`]), for later restores to prefetch.
    /// Returns how many windows were saved.
    ///
    /// Errors: not recording ([`LifecycleError::NotRecording`]: an empty
    /// record would replace a good one); writing the record failed.
    pub fn save_working_set(&self, snapshot: &Path) -> Result<usize, LifecycleError> {
        if !self.space().is_recording_faults() {
            return Err(LifecycleError::NotRecording);
        }
        let windows = self.space().take_fault_record();
        let n = windows.len();
        WorkingSet { windows }.save(&working_set_path(snapshot))?;
        Ok(n)
    }
}

/// The guest ranges of `ranges` that overlap `within`, clipped.
fn clip(ranges: &[GuestRange], within: GuestRange) -> impl Iterator<Item = GuestRange> + '_ {
    ranges
        .iter()
        .map(move |r| r.intersect(within))
        .filter(|r| !r.is_empty())
}
