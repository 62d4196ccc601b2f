//! Recording the windows guest faults install, in order: the working set a
//! restored VM touches first, which later restores of the same snapshot
//! prefetch ([`AddressSpace::prefetch`]) instead of faulting in.

use std::sync::Mutex;

use super::AddressSpace;
use crate::perms::Access;
use crate::range::GuestRange;

/// Windows a recording keeps at most (a guest faulting more than this is
/// not replaying a working set; the record stops growing, logged once).
pub const FAULT_RECORD_MAX: usize = 1 << 20;

/// The fault recording of an address space (a leaf lock: held only to
/// push or take).
#[derive(Debug, Default)]
pub(crate) struct FaultRecorder {
    windows: Mutex<Option<Vec<(GuestRange, Access)>>>,
}

impl FaultRecorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<(GuestRange, Access)>>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `window`, installed for `access`, if recording.
    pub(crate) fn push(&self, window: GuestRange, access: Access) {
        let mut w = self.lock();
        if let Some(list) = w.as_mut() {
            if list.len() < FAULT_RECORD_MAX {
                list.push((window, access));
            } else if list.len() == FAULT_RECORD_MAX {
                log::warn!(
                    "fault record full ({FAULT_RECORD_MAX} windows): later faults are not recorded"
                );
                list.push((window, access));
            }
        }
    }
}

impl AddressSpace {
    /// Starts recording the window each resolved guest fault installs (and
    /// each page a copy-on-write break gives the guest), with the access
    /// that faulted, in order. Restarting drops what was recorded.
    pub fn start_fault_record(&self) {
        *self.recorder.lock() = Some(Vec::new());
    }

    /// Stops recording and returns the windows recorded since
    /// [`start_fault_record`](Self::start_fault_record) (empty if it was
    /// not recording).
    pub fn take_fault_record(&self) -> Vec<(GuestRange, Access)> {
        let mut list = self.recorder.lock().take().unwrap_or_default();
        list.truncate(FAULT_RECORD_MAX);
        list
    }

    /// Whether faults are being recorded.
    pub fn is_recording_faults(&self) -> bool {
        self.recorder.lock().is_some()
    }

    /// Populates and installs each of `windows` for its access, then fills
    /// the host page tables of its parts inside `fill` (all of it if
    /// `None`; the backend's prefill), so the guest touches them without a
    /// fault or a host page fault: the replay of a recorded working set.
    /// Adjacent windows of one access are merged into one batch first.
    /// A restore passes the snapshot's data ranges as `fill`: filling a
    /// hole of the snapshot file would only read zeros into the page
    /// cache. Returns the bytes prefetched.
    ///
    /// A record is advice: a window that cannot be populated for its
    /// access (unmapped or protected since it was recorded, out of
    /// memory) is skipped and logged, and the guest faults it in as usual.
    pub fn prefetch(&self, windows: &[(GuestRange, Access)], fill: Option<&[GuestRange]>) -> u64 {
        let mut bytes = 0;
        for (range, access) in coalesce(windows) {
            if let Err(e) = self.populate(range.start(), range.len(), access) {
                log::info!(
                    "space {}: prefetch of {range} ({access}) skipped: {e}",
                    self.id
                );
                continue;
            }
            let writable = access == Access::Write;
            let parts: Vec<GuestRange> = match fill {
                None => vec![range],
                Some(fill) => {
                    let from = fill.partition_point(|f| f.end() <= range.start());
                    fill[from..]
                        .iter()
                        .take_while(|f| f.start() < range.end())
                        .map(|f| f.intersect(range))
                        .filter(|p| !p.is_empty())
                        .collect()
                }
            };
            for part in parts {
                if let Err(e) = self.backend.prefill(part, writable) {
                    log::debug!("space {}: prefetch fill {part}: {e}", self.id);
                }
            }
            bytes += range.len();
        }
        bytes
    }
}

/// `windows` sorted by address, overlaps and adjacent runs of one access
/// merged; a write wins over a read where windows of both overlap (the
/// read part before and after is kept as reads).
pub fn coalesce(windows: &[(GuestRange, Access)]) -> Vec<(GuestRange, Access)> {
    use crate::segment::{SegmentSet, SegmentValue};
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    struct Kind(bool);
    impl SegmentValue for Kind {
        fn merge(
            &self,
            _: crate::range::Range,
            other: &Self,
            _: crate::range::Range,
        ) -> Option<Self> {
            (self == other).then_some(*self)
        }
        fn split(&self, _: crate::range::Range, _: u64) -> (Self, Self) {
            (*self, *self)
        }
    }
    let mut set: SegmentSet<Kind> = SegmentSet::new();
    // Reads first, then writes over them.
    for want_write in [false, true] {
        for &(r, access) in windows {
            let write = access == Access::Write;
            if write != want_write || r.is_empty() {
                continue;
            }
            if write {
                set.remove_range(r);
                let _ = set.insert(r, Kind(true));
            } else {
                let gaps: Vec<GuestRange> = set.gaps(r).collect();
                for g in gaps {
                    let _ = set.insert(g, Kind(false));
                }
            }
        }
    }
    set.merge_all();
    set.iter()
        .map(|(r, k)| (r, if k.0 { Access::Write } else { Access::Read }))
        .collect()
}
