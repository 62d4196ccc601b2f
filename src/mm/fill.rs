//! Filling installed windows once they prove dense, off the fault path
//! ([`AddressSpace::fill_dense`]).
//!
//! Under [`Prefill::Dense`] the fault path fills a window only when the
//! memory beside it is already dense. A guest that touches pages in a
//! random order (the `scatter` test guest) installs each window while its
//! neighbours are still empty, so no fault ever sees evidence and every
//! page costs a host page fault inside KVM. The fault path therefore
//! records each window it installs without filling (bounded, oldest
//! dropped first), and `fill_dense` later measures them: a window at least
//! `later_percent` committed is filled, the rest wait for the next call.
//!
//! ```text
//! fill_dense(max_bytes)
//!   mapping.read, active.lock
//!     for up to FILL_SCAN_MAX bytes of recorded windows (oldest first):
//!       pieces = the window's readable, writable, MemoryFile parts now
//!       none left (unmapped, decommitted, copy-on-write) ──► drop it
//!       committed share of a sample ≥ later_percent ──► plan its fill, drop it
//!       else ──► keep it (note whether it grew since the last look)
//!   (no lock)  backend.prefill(planned pieces)
//! ```
//!
//! What it buys, measured on the `scatter` guest (256 MiB, 1 vCPU, on a
//! loaded 2-core host): KVM page faults (`pf_taken`) fall from 65,744 to
//! about 30,000, as the filler thread zeroes memory at about the rate the
//! guest touches it, so the guest still faults on what it reaches first.
//! The run time does not fall measurably there: filling a shmem page costs
//! the host about what the guest's fault on it did, and it only moves to
//! another thread, which helps when a core is idle. The memory cost: a
//! guest that goes on to touch a window whole commits it anyway; one that
//! stops at `later_percent` commits `100 / later_percent` times what it
//! touched there.
//!
//! Only writable parts are filled or measured: the residency of a
//! copy-on-write part is its sharers' memory, not evidence of what this
//! guest touches, and filling it read-only saves the guest nothing when it
//! writes. A window is sampled, not scanned whole, so one measurement costs
//! at most [`FILL_SAMPLE_MAX`] bytes of `mincore` whatever the window's
//! size.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::fault::Prefill;
use super::{ActiveState, AddressSpace, Counters, MappingState};
use crate::range::{page_round_down, GuestRange, Range};

/// The most windows the fault path keeps recorded for
/// [`AddressSpace::fill_dense`]; past it the oldest is forgotten (its pages
/// then commit on the guest's touches, as without the fill).
pub const FILL_PENDING_MAX: usize = 4096;

/// The most window bytes one [`AddressSpace::fill_dense`] call examines
/// (at least one window), which bounds how long it holds the `active`
/// lock.
pub const FILL_SCAN_MAX: u64 = 64 << 20;

/// The most bytes of one window whose residency
/// [`AddressSpace::fill_dense`] measures: a larger window is sampled at 16
/// evenly spaced places.
pub const FILL_SAMPLE_MAX: u64 = 8 << 20;

/// How many places a window larger than [`FILL_SAMPLE_MAX`] is sampled at.
const SAMPLES: u64 = 16;

/// A window installed without a fill, waiting to prove dense.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unfilled {
    range: GuestRange,
    /// Committed bytes of its sample at the last look (`None`: not looked
    /// at yet).
    committed: Option<u64>,
}

/// The windows recorded for [`AddressSpace::fill_dense`] (in
/// `ActiveState`).
#[derive(Debug, Default)]
pub(crate) struct PendingFills {
    windows: VecDeque<Unfilled>,
}

impl PendingFills {
    /// Records `range`, forgetting windows inside it (a stream's window
    /// grows over windows installed by earlier jumps: one fill covers
    /// them) and the oldest window past [`FILL_PENDING_MAX`].
    pub(crate) fn record(&mut self, range: GuestRange) {
        self.windows.retain(|u| range.intersect(u.range) != u.range);
        if self.windows.len() >= FILL_PENDING_MAX {
            self.windows.pop_front();
        }
        self.windows.push_back(Unfilled {
            range,
            committed: None,
        });
    }

    /// How many windows are recorded.
    pub(crate) fn len(&self) -> usize {
        self.windows.len()
    }
}

/// What one [`AddressSpace::fill_dense`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillReport {
    /// Recorded windows examined.
    pub scanned: usize,
    /// Windows filled (each was at least `later_percent` committed).
    pub filled_windows: usize,
    /// Bytes filled.
    pub filled_bytes: u64,
    /// Windows forgotten without a fill: nothing writable of the
    /// MemoryFile is installed there any more (unmapped, decommitted,
    /// copy-on-write, other objects).
    pub dropped: usize,
    /// Windows still recorded after the call.
    pub pending: usize,
    /// Whether a window kept for later was seen for the first time or
    /// grew denser since it was last examined: the guest is still
    /// touching, so calling again soon may fill something.
    pub progress: bool,
}

/// What became of one examined window.
enum Verdict {
    Gone,
    Keep { committed: u64 },
    Fill(Vec<GuestRange>),
}

impl AddressSpace {
    /// Fills recorded windows that have proved dense since the fault path
    /// installed them without a fill, at most `max_bytes` (rounded down to
    /// pages) per call; see the [module docs](self) and
    /// [`Prefill::Dense`]'s `later_percent`. Does nothing under other
    /// policies (nothing is recorded).
    ///
    /// Examines at most [`FILL_SCAN_MAX`] bytes of windows (oldest first)
    /// with the mm locks held, then fills with no lock held; a window
    /// removed or re-protected meanwhile is filled less or not at all
    /// (logged at debug level). A VMM calls this from a thread of its own
    /// ([`kvm::VmOptions::fill_dense`](crate::kvm::VmOptions::fill_dense)
    /// does it for a `Vm`).
    pub fn fill_dense(&self, max_bytes: u64) -> FillReport {
        let mut report = FillReport::default();
        let Prefill::Dense { later_percent, .. } = self.opts.prefill else {
            return report;
        };
        let mut budget = page_round_down(max_bytes);
        let mut plan: Vec<GuestRange> = Vec::new();
        {
            let mapping = self.read_mapping();
            let mut active = self.lock_active();
            let mut scanned_bytes = 0u64;
            let mut kept = Vec::new();
            while budget > 0 && (report.scanned == 0 || scanned_bytes < FILL_SCAN_MAX) {
                let Some(w) = active.pending_fills.windows.pop_front() else {
                    break;
                };
                report.scanned += 1;
                scanned_bytes += w.range.len();
                match self.judge_locked(&mapping, &active, w.range, later_percent) {
                    Verdict::Gone => report.dropped += 1,
                    Verdict::Keep { committed } => {
                        report.progress |= w.committed != Some(committed);
                        kept.push(Unfilled {
                            range: w.range,
                            committed: Some(committed),
                        });
                    }
                    Verdict::Fill(pieces) => {
                        let mut rest = Vec::new();
                        for p in pieces {
                            if budget == 0 {
                                rest.push(p);
                                continue;
                            }
                            let len = p.len().min(budget);
                            budget -= len;
                            plan.push(Range::new_unchecked(p.start(), p.start() + len));
                            if len < p.len() {
                                rest.push(Range::new_unchecked(p.start() + len, p.end()));
                            }
                        }
                        report.filled_windows += 1;
                        // What the budget left over is looked at again
                        // next time (first, as it is dense already).
                        for r in rest.into_iter().rev() {
                            active.pending_fills.windows.push_front(Unfilled {
                                range: r,
                                committed: None,
                            });
                        }
                    }
                }
            }
            // Windows kept go to the back: the next call starts with the
            // ones not examined now.
            active.pending_fills.windows.extend(kept);
            report.pending = active.pending_fills.len();
        }
        for r in plan {
            match self.backend.prefill(r, true) {
                Ok(n) => report.filled_bytes += n,
                Err(e) => log::debug!("space {}: dense fill {r}: {e}", self.id),
            }
        }
        if report.filled_bytes > 0 {
            Counters::add(&self.counters.dense_fills, report.filled_windows as u64);
            Counters::add(&self.counters.dense_filled_bytes, report.filled_bytes);
        }
        log::trace!("space {}: fill_dense {report:?}", self.id);
        report
    }

    /// Whether recorded window `w` is gone, still sparse, or dense enough
    /// to fill (and then its pieces to fill).
    ///
    /// # Preconditions
    /// - `mapping` is read-locked and `active` locked.
    fn judge_locked(
        &self,
        mapping: &MappingState,
        active: &ActiveState,
        w: GuestRange,
        later_percent: u8,
    ) -> Verdict {
        // The window's installed, writable MemoryFile parts, now.
        let mut pieces: Vec<(GuestRange, crate::range::FileRange)> = Vec::new();
        for (vr, vma) in mapping.vmas.iter_range(w) {
            let part = vr.intersect(w);
            for region in vma.protection.regions(vr, part) {
                if !region.perms.read {
                    continue;
                }
                for (pr, pma) in active.pmas.iter_range(region.range) {
                    let same_file =
                        std::ptr::addr_eq(Arc::as_ptr(&pma.file), Arc::as_ptr(&self.memfile));
                    if !same_file || !pma.writable_under(region.perms) {
                        continue;
                    }
                    let r = pr.intersect(region.range);
                    pieces.push((r, pma.file_range(pr, r)));
                }
            }
        }
        if pieces.is_empty() {
            return Verdict::Gone;
        }
        let sample = sample_of(&pieces);
        let total: u64 = sample.iter().map(|r| r.len()).sum();
        let committed = self.memfile.committed_in(&sample).unwrap_or_else(|e| {
            log::debug!("space {}: dense fill evidence unknown: {e}", self.id);
            0
        });
        if committed * 100 >= total * u64::from(later_percent) {
            let mut ranges: Vec<GuestRange> = Vec::new();
            for (r, _) in pieces {
                match ranges.last_mut() {
                    Some(last) if last.end() == r.start() => {
                        *last = Range::new_unchecked(last.start(), r.end());
                    }
                    _ => ranges.push(r),
                }
            }
            Verdict::Fill(ranges)
        } else {
            Verdict::Keep { committed }
        }
    }
}

/// The file ranges whose residency stands for `pieces` (GPA-ordered guest
/// ranges and the file ranges behind them): all of them up to
/// [`FILL_SAMPLE_MAX`] bytes, else [`SAMPLES`] evenly spaced slices of
/// them, [`FILL_SAMPLE_MAX`] bytes in all.
fn sample_of(pieces: &[(GuestRange, crate::range::FileRange)]) -> Vec<crate::range::FileRange> {
    let total: u64 = pieces.iter().map(|(r, _)| r.len()).sum();
    if total <= FILL_SAMPLE_MAX {
        return pieces.iter().map(|&(_, f)| f).collect();
    }
    let slice = page_round_down(FILL_SAMPLE_MAX / SAMPLES).max(crate::PAGE_SIZE);
    let stride = page_round_down(total / SAMPLES).max(slice);
    let mut out = Vec::new();
    // Offsets into the pieces laid end to end.
    let mut want = (0..SAMPLES).map(|i| i * stride).peekable();
    let mut at = 0;
    for &(r, f) in pieces {
        while let Some(&o) = want.peek() {
            if o >= at + r.len() {
                break;
            }
            want.next();
            let start = f.start() + (o - at);
            let end = (start + slice).min(f.end());
            out.push(Range::new_unchecked(start, end));
        }
        at += r.len();
    }
    out
}

/// Default period of [`kvm::VmOptions::fill_dense`](crate::kvm::VmOptions::fill_dense)'s
/// thread while recorded windows are growing denser.
pub const DEFAULT_FILL_PERIOD: Duration = Duration::from_millis(5);

/// Default most bytes one call of that thread fills.
pub const DEFAULT_FILL_MAX_BYTES: u64 = 64 << 20;

/// Wakes a thread waiting for windows to examine
/// ([`AddressSpace::wait_fill_work`]): a generation that the fault path
/// bumps when it records a window. A leaf lock: held alone.
#[derive(Debug, Default)]
pub(crate) struct FillSignal {
    generation: std::sync::Mutex<u64>,
    wake: std::sync::Condvar,
}

impl FillSignal {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumps the generation and wakes the waiters.
    pub(crate) fn bump(&self) {
        *self.lock() += 1;
        self.wake.notify_all();
    }
}

impl AddressSpace {
    /// The fill-work generation: it changes whenever the fault path records
    /// a window for [`fill_dense`](Self::fill_dense) (and on
    /// [`wake_fill_waiters`](Self::wake_fill_waiters)).
    pub fn fill_generation(&self) -> u64 {
        *self.fill_signal.lock()
    }

    /// Waits until the fill-work generation differs from `seen` or
    /// `timeout` passes; returns the generation. For a thread that calls
    /// [`fill_dense`](Self::fill_dense): it sleeps while nothing is
    /// recorded and wakes when a fault records a window.
    pub fn wait_fill_work(&self, seen: u64, timeout: Duration) -> u64 {
        let g = self.fill_signal.lock();
        let (g, _) = self
            .fill_signal
            .wake
            .wait_timeout_while(g, timeout, |g| *g == seen)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    /// Bumps the fill-work generation and wakes every
    /// [`wait_fill_work`](Self::wait_fill_work) caller (to make a filler
    /// thread notice that it should end).
    pub fn wake_fill_waiters(&self) {
        self.fill_signal.bump();
    }
}
