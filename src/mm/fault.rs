//! The fault path: a guest access to an unpopulated (or copy-on-write, or
//! uninstalled) page becomes pmas for a fault-around window and backend
//! installs.
//!
//! ```text
//! handle_fault(gpa, access)
//!   mapping.read ── vma at gpa? ── no ──► FaultError::Unmapped
//!                   protection region at gpa allows access? ── no ──► FaultError::Permission
//!   active.lock ── window = FaultAround::window(gpa, vma ∩ region)
//!                  ensure_pmas(window, access)     allocate / translate; a write breaks
//!                                                  COW in the 2 MiB chunk around gpa only
//!                  install_locked(window)          backend: memslots
//!                  plan the prefill                the Prefill policy, from what the
//!                                                  stream's previous window committed
//!                  or record the window unfilled   for AddressSpace::fill_dense
//!   (no lock)      backend.prefill(pieces)         fill host page tables
//! ```
//!
//! # Prefill
//!
//! An installed window is only *mapped*: with KVM, each 4 KiB page of it
//! still takes a host page fault (inside KVM, no exit) on its first guest
//! access. [`AddressSpaceBackend::prefill`](super::AddressSpaceBackend::prefill)
//! fills the host page tables of a window in one call
//! (`MADV_POPULATE_WRITE` / `_READ`), after which KVM maps pages without
//! faulting the host; for a 256 MiB sequential touch that is about 9× fewer
//! KVM page faults. But filling commits every page of the window, so
//! filling blindly turns a sparse guest into a memory hog. [`Prefill`]
//! decides, per fault:
//!
//! - [`Prefill::Dense`] (the default) fills a window when the evidence
//!   beside it is dense: for a fault that continues a sequential stream,
//!   the stream's previous window; otherwise the windows' worth of memory
//!   on both sides of it (within the vma). Evidence is measured as the
//!   committed (resident) share of the MemoryFile pages there (`mincore`),
//!   over at most [`PREFILL_EVIDENCE_MAX`] bytes next to the window. A
//!   sequential toucher gets every window after its first filled; a
//!   strided or random sparse guest never does (its windows stay a page
//!   or so committed), so it commits what it touches plus nothing.
//! - [`Prefill::Always`] fills every window (a VMM that knows its guest is
//!   dense, or benchmarks), [`Prefill::Never`] none.
//!
//! Each fault fills at most the policy's `max_bytes`, starting at the 2 MiB
//! chunk holding the fault. The fill runs after the mm locks are released
//! (zeroing costs ~100 µs per 2 MiB); a concurrent `remove` or
//! re-protection of the window makes the backend fail or fill less, which
//! is logged at debug level and otherwise ignored.
//!
//! A filled window is committed whatever the guest does with it, so under
//! `Dense` the last [`PREFILL_PROBE`] bytes of a window stay unfilled: when
//! the stream's next fault comes, the probe's residency is its evidence,
//! and a stream that turns sparse stops getting fills after one window.
//!
//! A guest that touches pages at random (the `scatter` test guest)
//! installs every window while the memory beside it is still empty, so no
//! fault sees evidence. Under `Dense` the fault path therefore records each
//! window it installs without a fill, and
//! [`AddressSpace::fill_dense`] (called off the fault path: a `Vm`'s filler
//! thread, see [`kvm::VmOptions::fill_dense`](crate::kvm::VmOptions::fill_dense))
//! fills a recorded window once it is `later_percent` committed: a random
//! but dense guest gets its windows filled after touching a tenth of them,
//! a sparse one (a page or two per window) never does. See
//! [`fill`](super::fill).
//!
//! The policy and the planning live in `mm/fault/prefill.rs`.
//!
//! # Copy-on-write
//!
//! A write fault breaks copy-on-write only in the [`COW_CHUNK`]-aligned
//! chunk around the fault, not in the whole window: fault-around windows
//! grow to tens of MiB, and copying all of one on the first write after a
//! fork would copy far more than the guest writes. The rest of the window
//! is populated and installed read-only; a later write there faults again.

use std::collections::VecDeque;

use super::{AddressSpace, BackendError, Counters, FileError, MmError};
use crate::memfile::MemoryFileError;
use crate::perms::{Access, Perms};
use crate::range::{align_down, page_round_down, GuestRange, Range, HUGE_PAGE_SIZE};

mod prefill;

pub use prefill::{Prefill, PREFILL_EVIDENCE_MAX, PREFILL_PROBE};

/// The most one write fault copies to break copy-on-write: the aligned
/// chunk of this size around the fault (see the [module docs](self)).
pub const COW_CHUNK: u64 = HUGE_PAGE_SIZE;

/// Why a fault could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// No vma contains the address: a guest bug or a device range.
    #[error("{access} at {gpa:#x}: no mapping there")]
    Unmapped {
        /// The address.
        gpa: u64,
        /// The access.
        access: Access,
    },
    /// The protection at the address does not allow the access.
    #[error("{access} at {gpa:#x} not allowed (protection {allowed})")]
    Permission {
        /// The address.
        gpa: u64,
        /// The access.
        access: Access,
        /// What the protection allows.
        allowed: Perms,
    },
    /// The object behind the vma has no page there (beyond its end).
    #[error("{access} at {gpa:#x}: the mapped object has no page there: {source}")]
    Bus {
        /// The address.
        gpa: u64,
        /// The access.
        access: Access,
        /// The object's error.
        source: FileError,
    },
    /// Memory could not be allocated.
    #[error("{access} at {gpa:#x}: out of memory: {source}")]
    OutOfMemory {
        /// The address.
        gpa: u64,
        /// The access.
        access: Access,
        /// The allocator's error.
        source: MemoryFileError,
    },
    /// The backend could not install the memory (e.g. out of memslots).
    #[error("{access} at {gpa:#x}: backend refused: {source}")]
    Backend {
        /// The address.
        gpa: u64,
        /// The access.
        access: Access,
        /// The backend's error.
        source: BackendError,
    },
}

/// True if `e` is the memory file running out of room.
fn is_out_of_memory(e: &MmError) -> bool {
    matches!(e, MmError::Memory(_) | MmError::File(FileError::Memory(_)))
}

impl FaultError {
    /// True for faults the guest caused (as opposed to host resource limits).
    pub fn is_guest_violation(&self) -> bool {
        matches!(
            self,
            FaultError::Unmapped { .. } | FaultError::Permission { .. } | FaultError::Bus { .. }
        )
    }

    fn from_mm(e: MmError, gpa: u64, access: Access) -> FaultError {
        match e {
            MmError::Memory(source) | MmError::File(FileError::Memory(source)) => {
                FaultError::OutOfMemory {
                    gpa,
                    access,
                    source,
                }
            }
            MmError::Backend(source) => FaultError::Backend {
                gpa,
                access,
                source,
            },
            MmError::File(source) => FaultError::Bus {
                gpa,
                access,
                source,
            },
            MmError::Fault(f) => f,
            other => FaultError::Bus {
                gpa,
                access,
                source: FileError::Host {
                    op: "fault",
                    source: std::io::Error::other(other.to_string()),
                },
            },
        }
    }
}

/// What a resolved fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Populated {
    /// The window installed.
    pub window: GuestRange,
    /// Bytes that got new pmas.
    pub populated: u64,
    /// Bytes copied to break copy-on-write.
    pub cow_copied: u64,
    /// Bytes whose copy-on-write was resolved without copying.
    pub cow_taken_over: u64,
    /// The protection at the address (what was installed is at most this).
    pub perms: Perms,
    /// Bytes of the window whose host page tables were filled
    /// ([`Prefill`]).
    pub prefilled: u64,
}

/// A run of faults walking forward: its last window (`start..next`), the
/// next address it expects, its current window size, and whether the last
/// window was filled (all but its probe, see [`PREFILL_PROBE`]).
#[derive(Debug, Clone, Copy)]
struct Stream {
    start: u64,
    next: u64,
    window: u64,
    filled: bool,
}

/// What [`FaultAround::choose`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// The window to populate and install.
    pub range: GuestRange,
    /// The previous window of the stream this fault continues, if any.
    pub previous: Option<GuestRange>,
    /// Whether `previous` was filled (all but its probe).
    pub previous_filled: bool,
}

/// The fault-around policy: the aligned window of `initial` bytes around a
/// fault; a fault just past the previous window of a stream doubles that
/// stream's window, up to `max`.
#[derive(Debug)]
pub(crate) struct FaultAround {
    initial: u64,
    max: u64,
    /// Recent streams, most recent first (a few vCPUs walk at once).
    streams: VecDeque<Stream>,
}

const MAX_STREAMS: usize = 8;

impl FaultAround {
    pub(crate) fn new(initial: u64, max: u64) -> FaultAround {
        FaultAround {
            initial,
            max,
            streams: VecDeque::new(),
        }
    }

    /// `choose(gpa, bounds).range` (the unit tests' shorthand).
    #[cfg(test)]
    pub(crate) fn window(&mut self, gpa: u64, bounds: GuestRange) -> GuestRange {
        self.choose(gpa, bounds).range
    }

    /// The window for a fault at `gpa`, clipped to `bounds` (the vma and the
    /// protection region holding `gpa`), and the previous window of the
    /// stream the fault continues.
    ///
    /// # Preconditions
    /// - `bounds` is page aligned and contains `gpa`.
    pub(crate) fn choose(&mut self, gpa: u64, bounds: GuestRange) -> Window {
        debug_assert!(bounds.contains(gpa));
        let hit = self
            .streams
            .iter()
            .position(|s| s.next <= gpa && gpa - s.next < s.window);
        let (start, size, previous, previous_filled) = match hit {
            Some(i) => {
                let s = self.streams.remove(i).expect("position is valid");
                let size = (s.window * 2).min(self.max);
                let previous = Range::new_unchecked(s.start, s.next);
                (s.next, size, Some(previous), s.filled)
            }
            None => (align_down(gpa, self.initial), self.initial, None, false),
        };
        let end = start.saturating_add(size);
        let clipped = Range::new_unchecked(start.max(bounds.start()), end.min(bounds.end()));
        // A stream whose window was clipped away from gpa restarts at gpa.
        let clipped = if clipped.contains(gpa) {
            clipped
        } else {
            let start = page_round_down(gpa);
            Range::new_unchecked(start, (start + crate::PAGE_SIZE).min(bounds.end()))
        };
        self.streams.push_front(Stream {
            start: clipped.start(),
            next: clipped.end(),
            window: size,
            filled: false,
        });
        self.streams.truncate(MAX_STREAMS);
        Window {
            range: clipped,
            previous,
            previous_filled,
        }
    }

    /// Records that the window [`choose`](Self::choose) just returned was
    /// filled.
    pub(crate) fn mark_filled(&mut self) {
        if let Some(s) = self.streams.front_mut() {
            s.filled = true;
        }
    }
}

impl AddressSpace {
    /// Resolves a guest access to `gpa`: populates the fault-around window
    /// holding it and installs it in the backend.
    ///
    /// Safe to call for an address that is already populated and installed
    /// (another vCPU got there first): it installs again and succeeds.
    pub fn handle_fault(&self, gpa: u64, access: Access) -> Result<Populated, FaultError> {
        Counters::add(&self.counters.faults, 1);
        let mapping = self.read_mapping();
        let Some((vr, vma)) = mapping.vmas.find_segment(gpa) else {
            return Err(FaultError::Unmapped { gpa, access });
        };
        let region = vma.protection.flags_at(vr, gpa);
        if !region.perms.allows(access) || !region.perms.read {
            return Err(FaultError::Permission {
                gpa,
                access,
                allowed: region.perms,
            });
        }
        // Fault-around stops at the object's end: pages past it are bus
        // errors of their own and must not fail a fault inside it.
        let mut bounds = region.range.intersect(vr);
        if let Some(m) = &vma.mappable {
            let size = m.size();
            let end = vr.start().saturating_add(size.saturating_sub(vma.offset));
            if gpa >= end {
                let offset = vma.object_offset(vr, page_round_down(gpa));
                return Err(FaultError::Bus {
                    gpa,
                    access,
                    source: FileError::BeyondEnd {
                        range: Range::new_unchecked(offset, offset + crate::PAGE_SIZE),
                        size,
                    },
                });
            }
            bounds = Range::new_unchecked(bounds.start(), bounds.end().min(end));
        }
        let mut active = self.lock_active();
        let mut chosen = active.fault_around.choose(gpa, bounds);
        Counters::add(&self.counters.windows, 1);
        let chunk = self.cow_unit(gpa);
        let report = match self.ensure_pmas_cow_in_locked(
            &mut active,
            vr,
            vma,
            chosen.range,
            access,
            chosen.range.intersect(chunk),
        ) {
            // A grown window may not fit under the memory file's limit
            // while the page does: the guest must not die of fault-around.
            Err(e) if is_out_of_memory(&e) && chosen.range.len() > crate::PAGE_SIZE => {
                let page = page_round_down(gpa);
                chosen.range = Range::new_unchecked(page, page + crate::PAGE_SIZE);
                log::debug!(
                    "space {}: window at {gpa:#x} out of memory, one page",
                    self.id
                );
                let cow = chosen.range.intersect(chunk);
                self.ensure_pmas_cow_in_locked(&mut active, vr, vma, chosen.range, access, cow)
            }
            r => r,
        }
        .map_err(|e| FaultError::from_mm(e, gpa, access))?;
        let window = chosen.range;
        self.install_locked(&active, vr, vma, window)
            .map_err(|e| FaultError::from_mm(e, gpa, access))?;
        let fill = self.plan_prefill_locked(&mut active, vr, vma, gpa, chosen);
        // A window the policy did not fill may prove dense later.
        let record = fill.is_empty() && matches!(self.opts.prefill, Prefill::Dense { .. });
        if record {
            active.pending_fills.record(window);
            Counters::add(&self.counters.unfilled_windows, 1);
        }
        drop(active);
        drop(mapping);
        if record {
            self.fill_signal.bump();
        }
        let prefilled = self.prefill(&fill);
        self.recorder.push(window, access);
        log::trace!(
            "space {}: {access} fault at {gpa:#x} -> {window} {report:?} prefilled {prefilled:#x}",
            self.id
        );
        Ok(Populated {
            window,
            populated: report.populated,
            cow_copied: report.cow_copied,
            cow_taken_over: report.cow_taken_over,
            perms: region.perms,
            prefilled,
        })
    }
}

impl AddressSpace {
    /// Populates and installs `[gpa, gpa + len)` now, as guest accesses of
    /// kind `access` would (`MADV_POPULATE_READ` / `MADV_POPULATE_WRITE`): a
    /// write breaks copy-on-write, so afterwards no guest access there exits.
    ///
    /// Use it before starting vCPUs that update copy-on-write memory with
    /// locked instructions: see the atomicity note in the crate README.
    ///
    /// Errors, checked before anything is populated (nothing changes): a bad
    /// range, a part of it unmapped, a protection that forbids `access`,
    /// object offsets past the object's end, or a shared mapping whose
    /// object does not allow `access`. Errors while populating (out of
    /// memory, out of slots, a failing object): vmas before the failing one
    /// stay populated and installed, the failing one keeps the pages
    /// populated (and copy-on-write copies made) before the failure,
    /// uninstalled; contents are unchanged either way.
    pub fn populate(&self, gpa: u64, len: u64, access: Access) -> Result<(), MmError> {
        let range = Range::pages(gpa, len)?;
        self.check_in_space(range)?;
        let mapping = self.read_mapping();
        self.check_io_locked(&mapping, range, range, access, super::IoOpts::default())?;
        let mut active = self.lock_active();
        for (vr, vma) in mapping.vmas.iter_range(range) {
            let part = vr.intersect(range);
            self.ensure_pmas_locked(&mut active, vr, vma, part, access)?;
            self.install_locked(&active, vr, vma, part)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> GuestRange {
        Range::new(s, e).unwrap()
    }

    #[test]
    fn window_is_aligned_and_clipped() {
        let mut fa = FaultAround::new(2 << 20, 32 << 20);
        assert_eq!(fa.window(0x30_1234, r(0, 1 << 30)), r(0x20_0000, 0x40_0000));
        let mut fa = FaultAround::new(2 << 20, 32 << 20);
        assert_eq!(
            fa.window(0x30_1234, r(0x30_0000, 0x31_0000)),
            r(0x30_0000, 0x31_0000)
        );
    }

    #[test]
    fn sequential_faults_double_up_to_the_cap() {
        let mut fa = FaultAround::new(2 << 20, 8 << 20);
        let bounds = r(0, 1 << 30);
        let mut got = Vec::new();
        let mut gpa = 0;
        for _ in 0..5 {
            let w = fa.window(gpa, bounds);
            got.push(w.len() >> 20);
            gpa = w.end();
        }
        assert_eq!(got, vec![2, 4, 8, 8, 8], "window sizes in MiB");
    }

    #[test]
    fn a_jump_restarts_at_the_initial_size() {
        let mut fa = FaultAround::new(2 << 20, 32 << 20);
        let bounds = r(0, 1 << 30);
        let w = fa.window(0, bounds);
        let w2 = fa.window(w.end(), bounds);
        assert_eq!(w2.len(), 4 << 20);
        let far = fa.window(512 << 20, bounds);
        assert_eq!(far, r(512 << 20, 514 << 20));
    }
}
