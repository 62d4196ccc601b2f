//! The fault path: a guest access to an unpopulated (or copy-on-write, or
//! uninstalled) page becomes pmas for a fault-around window and backend
//! installs.
//!
//! ```text
//! handle_fault(gpa, access)
//!   mapping.read ── vma at gpa? ── no ──► FaultError::Unmapped
//!                   protection region at gpa allows access? ── no ──► FaultError::Permission
//!   active.lock ── window = FaultAround::window(gpa, vma ∩ region)
//!                  ensure_pmas_locked(window, access)   allocate / translate / break COW
//!                  install_locked(window)               backend: memslots
//! ```

use std::collections::VecDeque;

use super::{AddressSpace, BackendError, Counters, FileError, MmError};
use crate::memfile::MemoryFileError;
use crate::perms::{Access, Perms};
use crate::range::{align_down, page_round_down, GuestRange, Range};

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
}

/// A run of faults walking forward: the next address it expects and its
/// current window size.
#[derive(Debug, Clone, Copy)]
struct Stream {
    next: u64,
    window: u64,
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

    /// The window for a fault at `gpa`, clipped to `bounds` (the vma and the
    /// protection region holding `gpa`).
    ///
    /// # Preconditions
    /// - `bounds` is page aligned and contains `gpa`.
    pub(crate) fn window(&mut self, gpa: u64, bounds: GuestRange) -> GuestRange {
        debug_assert!(bounds.contains(gpa));
        let hit = self
            .streams
            .iter()
            .position(|s| s.next <= gpa && gpa - s.next < s.window);
        let (start, size) = match hit {
            Some(i) => {
                let s = self.streams.remove(i).expect("position is valid");
                let size = (s.window * 2).min(self.max);
                (s.next, size)
            }
            None => (align_down(gpa, self.initial), self.initial),
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
            next: clipped.end(),
            window: size,
        });
        self.streams.truncate(MAX_STREAMS);
        clipped
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
        let window = active.fault_around.window(gpa, bounds);
        Counters::add(&self.counters.windows, 1);
        let report = self
            .ensure_pmas_locked(&mut active, vr, vma, window, access)
            .map_err(|e| FaultError::from_mm(e, gpa, access))?;
        self.install_locked(&active, vr, vma, window)
            .map_err(|e| FaultError::from_mm(e, gpa, access))?;
        log::trace!(
            "space {}: {access} fault at {gpa:#x} -> {window} {report:?}",
            self.id
        );
        Ok(Populated {
            window,
            populated: report.populated,
            cow_copied: report.cow_copied,
            cow_taken_over: report.cow_taken_over,
            perms: region.perms,
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
