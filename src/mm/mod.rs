//! The memory manager: a guest-physical address space with gVisor's
//! vma/pma model and Zircon's per-mapping protection ranges.
//!
//! - [`vma`]: what the guest-physical space maps (`map`, `unmap`, `protect`);
//! - [`protect`]: the per-vma protection ranges;
//! - [`pma`]: what is populated, copy-on-write aware;
//! - [`fault`]: the fault path (`handle_fault`) and the fault-around policy;
//! - [`fill`]: filling installed windows once they prove dense
//!   (`fill_dense`, off the fault path);
//! - [`io`]: host-side reads and writes, pins;
//! - [`guest_memory`]: vm-memory's `GuestMemory` over an address space;
//! - [`regions`]: vm-memory's region-based `GuestMemoryBackend` over an
//!   address space (for linux-loader and other crates that want regions);
//! - `layout`: the vmas and protections as plain values ([`VmaLayout`]);
//! - [`extents`]: what backs each guest range (fd, offset, populated), and
//!   installing what host I/O populated;
//! - [`fork`]: cloning an address space;
//! - `dirty`: dirty tracking ([`AddressSpace::start_dirty_tracking`],
//!   [`AddressSpace::take_dirty`]);
//! - [`mappable`]: what a vma can map;
//! - [`backend`]: how populated memory reaches the guest (KVM, or a test
//!   recorder).
//!
//! # Locks
//!
//! `mapping` (an `RwLock` over the vmas) is taken before `active` (a `Mutex`
//! over the pmas and the fault-around state); backend calls, mappable
//! translation, the shared private-page refcounts and the MemoryFile are all
//! reached with `active` held and never call back up. Functions that need a
//! lock take the guarded state as a parameter and end in `_locked`.

pub mod backend;
mod dirty;
pub mod extents;
pub mod fault;
pub mod fill;
pub mod fork;
pub mod guest_memory;
mod hostfile;
pub mod io;
mod layout;
pub mod mappable;
pub mod pma;
pub mod protect;
pub mod record;
pub mod regions;
mod shared;
pub mod vma;

mod check;
mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use crate::memfile::{MemoryFile, MemoryFileError};
use crate::perms::{Access, Perms};
use crate::range::{GuestRange, RangeError, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::segment::SegmentSet;

pub use backend::{AddressSpaceBackend, BackendError, NoopBackend, RecordingBackend};
pub use check::check_file_refs;
pub use extents::{Extent, ExtentBacking};
pub use fault::{FaultError, Populated, Prefill, COW_CHUNK, PREFILL_EVIDENCE_MAX, PREFILL_PROBE};
pub use fill::{
    FillReport, DEFAULT_FILL_MAX_BYTES, DEFAULT_FILL_PERIOD, FILL_PENDING_MAX, FILL_SAMPLE_MAX,
    FILL_SCAN_MAX,
};
pub use fork::ParentProtection;
pub use guest_memory::SpaceMemory;
pub use hostfile::HostFile;
pub use io::{IoOpts, Pin};
pub use layout::VmaLayout;
pub use mappable::{File, FileError, Mappable, MappingSpace, Translation};
pub use pma::PrivateRefs;
pub use protect::{ProtectError, ProtectionRanges, Region};
pub use regions::{SpaceRegion, SpaceRegions};
pub use shared::SharedMemory;
pub use stats::{MapsEntry, Stats};
pub use vma::{MapOpts, MapSource, Placement};

use fault::FaultAround;
use pma::Pma;
use vma::Vma;

/// Errors from address-space operations other than faults.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// A range argument is empty, unaligned or overflows.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The range reaches past the end of the guest-physical space.
    #[error("range {range} is outside the address space [0, {limit:#x})")]
    OutOfSpace {
        /// The offending range.
        range: GuestRange,
        /// Size of the address space.
        limit: u64,
    },
    /// A fixed mapping that must not replace anything overlaps a vma.
    #[error("fixed mapping {range} overlaps existing vma {existing}")]
    Overlap {
        /// The requested range.
        range: GuestRange,
        /// The vma in the way.
        existing: GuestRange,
    },
    /// No gap of the requested size and alignment exists.
    #[error("no free guest-physical range of {len:#x} bytes aligned to {align:#x}")]
    NoSpace {
        /// Requested length.
        len: u64,
        /// Requested alignment.
        align: u64,
    },
    /// The alignment is not a power of two of at least a page.
    #[error("alignment {align:#x} is not a power of two >= the page size")]
    BadAlignment {
        /// The offending alignment.
        align: u64,
    },
    /// Part of the range has no vma.
    #[error("range {range} is not fully mapped: nothing at {gap}")]
    NotMapped {
        /// The range asked for.
        range: GuestRange,
        /// The first unmapped part.
        gap: GuestRange,
    },
    /// Permissions exceed what the vma (or its object) allows.
    #[error("permissions {perms} exceed the maximum {max} of the vma at {range}")]
    PermsExceedMax {
        /// The vma (or requested) range.
        range: GuestRange,
        /// Requested permissions.
        perms: Perms,
        /// Maximum allowed.
        max: Perms,
    },
    /// Write without read cannot be expressed in memslots.
    #[error("permissions {perms} grant write without read")]
    WriteWithoutRead {
        /// The offending permissions.
        perms: Perms,
    },
    /// The object offsets are unaligned or beyond the object's size.
    #[error("object offsets [{offset:#x}, +{len:#x}) do not fit an object of size {size:#x}")]
    BadObjectRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The object's size.
        size: u64,
    },
    /// The access is not allowed at `gpa` (host I/O that respects guest
    /// permissions).
    #[error("{access} at {gpa:#x} not allowed (allowed: {allowed})")]
    Permission {
        /// Address.
        gpa: u64,
        /// The access.
        access: Access,
        /// What the protection allows.
        allowed: Perms,
    },
    /// A pin was handed to another space's `unpin`.
    #[error("pin of space {pin_space} cannot be released by space {space}")]
    ForeignPin {
        /// The space holding the pin.
        pin_space: u64,
        /// The space asked to release it.
        space: u64,
    },
    /// Populating memory failed.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// The backend refused.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The memory file refused.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// An object refused.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Tunables of an [`AddressSpace`].
#[derive(Debug, Clone)]
pub struct AddressSpaceOptions {
    /// Size of the guest-physical space: every vma lies in `[0, size)`.
    pub size: u64,
    /// Lowest address non-fixed placements use.
    pub map_floor: u64,
    /// Fault-around window of a first fault (a power of two, ≥ a page).
    pub fault_around: u64,
    /// Largest window sequential faults grow to (≥ `fault_around`;
    /// default [`DEFAULT_FAULT_AROUND_MAX`]).
    pub fault_around_max: u64,
    /// When a fault also fills the host page tables of the window it
    /// installs (commits it; see [`Prefill`]), and whether windows it did
    /// not fill are recorded for [`AddressSpace::fill_dense`]. Default:
    /// [`Prefill::Dense`] at 50 %, at most 1 GiB per fault, later fills
    /// at 10 %.
    pub prefill: Prefill,
}

/// The default largest fault-around window: 1 GiB. Windows double along a
/// sequential stream, so a run of S bytes takes O(log S) faults and (under
/// the default slot policy) O(log S) memslots; a window only maps memory,
/// it commits nothing the guest does not touch (unless prefilled, see
/// [`Prefill`]), and a write fault copies at most 2 MiB of copy-on-write
/// memory whatever the window.
pub const DEFAULT_FAULT_AROUND_MAX: u64 = 1 << 30;

impl Default for AddressSpaceOptions {
    fn default() -> Self {
        AddressSpaceOptions {
            size: 1 << 46,
            map_floor: 1 << 20,
            fault_around: HUGE_PAGE_SIZE,
            fault_around_max: DEFAULT_FAULT_AROUND_MAX,
            prefill: Prefill::default(),
        }
    }
}

/// Counters of an address space (monotonic; see [`Stats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults: AtomicU64,
    pub windows: AtomicU64,
    pub populated_bytes: AtomicU64,
    pub cow_copies: AtomicU64,
    pub cow_copied_bytes: AtomicU64,
    pub cow_takeovers: AtomicU64,
    pub installs: AtomicU64,
    pub prefilled_windows: AtomicU64,
    pub prefilled_bytes: AtomicU64,
    pub unfilled_windows: AtomicU64,
    pub dense_fills: AtomicU64,
    pub dense_filled_bytes: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The vmas (protected by `AddressSpace.mapping`).
pub(crate) struct MappingState {
    pub vmas: SegmentSet<Vma>,
}

/// The file pages one pin holds a reference on.
pub(crate) type PinnedPages = Vec<(Arc<dyn File>, crate::range::FileRange)>;

/// The pmas and fault-around state (protected by `AddressSpace.active`).
pub(crate) struct ActiveState {
    pub pmas: SegmentSet<Pma>,
    pub fault_around: FaultAround,
    /// Windows installed without a fill, for `fill_dense`.
    pub pending_fills: fill::PendingFills,
    /// Pinned file ranges, by pin id, released by `unpin`.
    pub pins: std::collections::HashMap<u64, PinnedPages>,
    pub next_pin: u64,
}

static NEXT_SPACE_ID: AtomicU64 = AtomicU64::new(1);

/// A guest-physical address space.
///
/// Invariants (checked by [`check_invariants`](Self::check_invariants)):
/// pmas lie only inside vmas; a pma's installed permissions never exceed its
/// vma's; every private pma page is counted once in `private_refs`; every
/// pma holds one file reference per page; protection ranges are minimal.
pub struct AddressSpace {
    id: u64,
    this: Weak<AddressSpace>,
    memfile: Arc<MemoryFile>,
    backend: Arc<dyn AddressSpaceBackend>,
    opts: AddressSpaceOptions,
    /// Vmas. Lock order: first.
    mapping: RwLock<MappingState>,
    /// Pmas. Lock order: after `mapping`.
    active: Mutex<ActiveState>,
    /// Owners of private pages, shared with forks. Lock order: after `active`.
    private_refs: Arc<PrivateRefs>,
    counters: Counters,
    /// Wakes a `fill_dense` caller when a window is recorded. A leaf lock.
    fill_signal: fill::FillSignal,
    /// The fault recording ([`start_fault_record`](Self::start_fault_record)). A leaf lock.
    recorder: record::FaultRecorder,
    /// Dirty tracking: the sink host writes mark, and whether it is on.
    dirty: dirty::Tracking,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("id", &self.id)
            .field("opts", &self.opts)
            .finish()
    }
}

impl AddressSpace {
    /// An empty address space carving memory from `memfile` and showing it
    /// to the guest through `backend`.
    pub fn new(
        memfile: Arc<MemoryFile>,
        backend: Arc<dyn AddressSpaceBackend>,
        opts: AddressSpaceOptions,
    ) -> Result<Arc<AddressSpace>, MmError> {
        Self::validate_options(&opts)?;
        Ok(Self::with_private_refs(
            memfile,
            backend,
            opts,
            Arc::new(PrivateRefs::default()),
        ))
    }

    fn validate_options(opts: &AddressSpaceOptions) -> Result<(), MmError> {
        for align in [opts.fault_around, opts.fault_around_max] {
            if !align.is_power_of_two() || align < PAGE_SIZE {
                return Err(MmError::BadAlignment { align });
            }
        }
        if opts.fault_around_max < opts.fault_around {
            return Err(MmError::BadAlignment {
                align: opts.fault_around_max,
            });
        }
        if opts.size % PAGE_SIZE != 0 || opts.size == 0 || opts.map_floor >= opts.size {
            return Err(MmError::OutOfSpace {
                range: GuestRange::new_unchecked(opts.map_floor, opts.map_floor),
                limit: opts.size,
            });
        }
        Ok(())
    }

    pub(crate) fn with_private_refs(
        memfile: Arc<MemoryFile>,
        backend: Arc<dyn AddressSpaceBackend>,
        opts: AddressSpaceOptions,
        private_refs: Arc<PrivateRefs>,
    ) -> Arc<AddressSpace> {
        let fault_around = FaultAround::new(opts.fault_around, opts.fault_around_max);
        Arc::new_cyclic(|this| AddressSpace {
            id: NEXT_SPACE_ID.fetch_add(1, Ordering::Relaxed),
            this: this.clone(),
            memfile,
            backend,
            opts,
            mapping: RwLock::new(MappingState {
                vmas: SegmentSet::new(),
            }),
            active: Mutex::new(ActiveState {
                pmas: SegmentSet::new(),
                fault_around,
                pending_fills: Default::default(),
                pins: Default::default(),
                next_pin: 1,
            }),
            private_refs,
            counters: Counters::default(),
            fill_signal: Default::default(),
            recorder: Default::default(),
            dirty: Default::default(),
        })
    }

    /// The memory file pages come from.
    pub fn memfile(&self) -> &Arc<MemoryFile> {
        &self.memfile
    }

    /// The options this space was built with.
    pub fn options(&self) -> &AddressSpaceOptions {
        &self.opts
    }

    /// A unique id (for mappables' bookkeeping and logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Checks that `range` lies inside the space.
    fn check_in_space(&self, range: GuestRange) -> Result<(), MmError> {
        if range.end() > self.opts.size {
            return Err(MmError::OutOfSpace {
                range,
                limit: self.opts.size,
            });
        }
        Ok(())
    }

    fn read_mapping(&self) -> RwLockReadGuard<'_, MappingState> {
        self.mapping.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_mapping(&self) -> RwLockWriteGuard<'_, MappingState> {
        self.mapping.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_active(&self) -> MutexGuard<'_, ActiveState> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn as_mapping_space(&self) -> Weak<dyn MappingSpace> {
        self.this.clone() as Weak<dyn MappingSpace>
    }
}

impl MappingSpace for AddressSpace {
    fn invalidate(&self, range: GuestRange, private_too: bool) {
        // The object dropped pages mapped here (a decommit): they read as
        // zeros now, populated here or not.
        self.mark_dirty(range);
        let mut active = self.lock_active();
        if let Err(e) = self.invalidate_locked(&mut active, range, private_too) {
            log::error!("invalidate {range} of space {}: {e}", self.id);
        }
    }

    fn truncated(&self, object: &dyn Mappable, range: GuestRange, size: u64) {
        if let Err(e) = self.drop_past_object_end(object, range, size) {
            log::error!("truncation of {range} in space {}: {e}", self.id);
        }
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        let mapping = self.mapping.get_mut().unwrap_or_else(|e| e.into_inner());
        for (r, vma) in mapping.vmas.iter() {
            if let Some(m) = &vma.mappable {
                m.remove_mapping(self.id, r, vma.offset);
            }
        }
        let active = self.active.get_mut().unwrap_or_else(|e| e.into_inner());
        let pmas: Vec<_> = active.pmas.iter().map(|(r, p)| (r, p.clone())).collect();
        for (r, pma) in pmas {
            if let Err(e) = pma::release(&self.private_refs, r, &pma) {
                log::error!("space {} drop: releasing pma {r}: {e}", self.id);
            }
        }
        for (_, pinned) in active.pins.drain() {
            for (file, fr) in pinned {
                if let Err(e) = file.dec_ref(fr) {
                    log::error!("space {} drop: unpinning {fr}: {e}", self.id);
                }
            }
        }
        if let Err(e) = self
            .backend
            .remove(GuestRange::new_unchecked(0, self.opts.size))
        {
            log::warn!("space {} drop: backend remove: {e}", self.id);
        }
    }
}
