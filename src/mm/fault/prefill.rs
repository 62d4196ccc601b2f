//! Prefill planning: the [`Prefill`] policy and how a fault applies it to
//! the window it just installed, from the evidence beside the window (see
//! the [fault module docs](super#prefill) for the design), and the fill
//! itself, run after the mm locks are released.

use std::sync::Arc;

use super::Window;
use crate::mm::vma::Vma;
use crate::mm::{ActiveState, AddressSpace, Counters};
use crate::range::{align_down, page_round_down, GuestRange, Range, HUGE_PAGE_SIZE};

/// The most bytes next to a window whose residency [`Prefill::Dense`]
/// measures (bounds the `mincore` work of one fault).
pub const PREFILL_EVIDENCE_MAX: u64 = 8 << 20;

/// The tail of a window that [`Prefill::Dense`] leaves unfilled: a filled
/// window is committed whatever the guest does, so when the stream's next
/// fault comes, this tail (which the guest walked through just before)
/// is the only part that still tells whether the guest touches densely.
/// It costs the guest a host page fault per page of it (16 per window).
pub const PREFILL_PROBE: u64 = 64 << 10;

/// When the fault path fills the host page tables of a window it just
/// installed ([`AddressSpaceBackend::prefill`](crate::mm::AddressSpaceBackend::prefill)).
///
/// Filling makes the guest's first access to each page cheap (no host page
/// fault inside KVM) and commits every page filled. See the
/// [module docs](super#prefill) for the trade-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// Never fill: every page commits on the guest's first access to it.
    Never,
    /// Fill a window when the memory beside it (the stream's previous
    /// window, or the neighbouring windows) is at least `min_percent`
    /// committed; fill a window installed without a fill later, off the
    /// fault path ([`AddressSpace::fill_dense`]), once it is itself at
    /// least `later_percent` committed. Values above 100 never fill.
    Dense {
        /// Committed share of the evidence, in percent, that makes a
        /// window worth filling at the fault.
        min_percent: u8,
        /// The most one fault fills (rounded down to pages).
        max_bytes: u64,
        /// Committed share of an installed, unfilled window, in percent,
        /// that makes it worth filling later. A guest that touches one
        /// page in N of a window commits at most `100 / later_percent`
        /// times what it touches there (N ≤ that) or only what it
        /// touches (N above it).
        later_percent: u8,
    },
    /// Fill every window a fault installs, up to `max_bytes` per fault.
    Always {
        /// The most one fault fills (rounded down to pages).
        max_bytes: u64,
    },
}

impl Default for Prefill {
    /// `Dense` at 50 %, at most 1 GiB per fault: enough for the largest
    /// windows a sequential stream grows to, so none is left half filled;
    /// the probe, not the budget, is what keeps a sparse stream cheap. The
    /// budget bounds how long one fault zeroes memory (~50 ms per GiB).
    /// Later fills at 10 %: a random but dense guest has its windows
    /// filled from a tenth on (the `scatter` guest, 256 MiB: half of its
    /// KVM page faults go, the rest are pages it touches while the filler
    /// works; 5 % saves little more), a guest touching one page in ten or
    /// fewer commits at most ten times what it touches.
    fn default() -> Self {
        Prefill::Dense {
            min_percent: 50,
            max_bytes: 1 << 30,
            later_percent: 10,
        }
    }
}

impl AddressSpace {
    /// The pieces of the window just installed to fill, as `(range,
    /// writable)`, per the [`Prefill`] policy: the installed (readable)
    /// parts of `chosen.range`, from the chunk holding `gpa` on, up to the
    /// policy's budget.
    ///
    /// # Preconditions
    /// - `chosen.range` lies in vma `vr` (`vma`), populated and installed;
    ///   `mapping` is read-locked and `active` locked.
    pub(super) fn plan_prefill_locked(
        &self,
        active: &mut ActiveState,
        vr: GuestRange,
        vma: &Vma,
        gpa: u64,
        chosen: Window,
    ) -> Vec<(GuestRange, bool)> {
        let mut window = chosen.range;
        let budget = match self.opts.prefill {
            Prefill::Never => return Vec::new(),
            Prefill::Always { max_bytes } => max_bytes,
            Prefill::Dense {
                min_percent,
                max_bytes,
                ..
            } => {
                let (committed, total) = self.evidence_locked(active, vr, window, chosen);
                if total == 0 || committed * 100 < total * u64::from(min_percent) {
                    return Vec::new();
                }
                // Leave the probe unfilled: the next fault of this stream
                // measures it.
                if window.len() > PREFILL_PROBE {
                    window = Range::new_unchecked(window.start(), window.end() - PREFILL_PROBE);
                    active.fault_around.mark_filled();
                }
                max_bytes
            }
        };
        let mut budget = page_round_down(budget);
        // What install_locked installed: readable regions, per pma, with
        // their writability; GPA-adjacent pieces of one writability joined.
        let mut pieces: Vec<(GuestRange, bool)> = Vec::new();
        for region in vma.protection.regions(vr, window) {
            if !region.perms.read {
                continue;
            }
            for (pr, pma) in active.pmas.iter_range(region.range) {
                let part = pr.intersect(region.range);
                let writable = pma.writable_under(region.perms);
                match pieces.last_mut() {
                    Some((r, w)) if *w == writable && r.end() == part.start() => {
                        *r = Range::new_unchecked(r.start(), part.end());
                    }
                    _ => pieces.push((part, writable)),
                }
            }
        }
        // The chunk holding the fault first (the guest is about to touch
        // it), then forward, then what lies before it.
        let split = align_down(gpa, HUGE_PAGE_SIZE).max(window.start());
        let after = Range::new_unchecked(split, window.end());
        let before = Range::new_unchecked(window.start(), split);
        let mut out = Vec::new();
        for part in [after, before] {
            for &(r, w) in &pieces {
                let r = r.intersect(part);
                if r.is_empty() || budget == 0 {
                    continue;
                }
                let len = r.len().min(budget);
                budget -= len;
                out.push((Range::new_unchecked(r.start(), r.start() + len), w));
            }
        }
        out
    }

    /// The committed bytes and the total bytes of the evidence beside
    /// `window`: the stream's previous window if there is one (only its
    /// probe if it was filled), else the window-sized ranges on both sides
    /// inside the vma; each at most [`PREFILL_EVIDENCE_MAX`] bytes,
    /// nearest the window. Only MemoryFile pages can count as committed
    /// (other files' residency is not guestmm's memory).
    ///
    /// # Preconditions
    /// - `active` is locked.
    fn evidence_locked(
        &self,
        active: &ActiveState,
        vr: GuestRange,
        window: GuestRange,
        chosen: Window,
    ) -> (u64, u64) {
        let cap = |len: u64| len.min(PREFILL_EVIDENCE_MAX);
        let ranges: Vec<GuestRange> = match chosen.previous {
            Some(p) if chosen.previous_filled => {
                vec![Range::new_unchecked(
                    p.end() - p.len().min(PREFILL_PROBE),
                    p.end(),
                )]
            }
            Some(p) => vec![Range::new_unchecked(p.end() - cap(p.len()), p.end())],
            None => {
                let n = cap(window.len());
                vec![
                    Range::new_unchecked(
                        window.start().saturating_sub(n).max(vr.start()),
                        window.start(),
                    ),
                    Range::new_unchecked(
                        window.end(),
                        window.end().saturating_add(n).min(vr.end()),
                    ),
                ]
            }
        };
        let total: u64 = ranges.iter().map(|r| r.len()).sum();
        let file_ranges: Vec<crate::range::FileRange> = ranges
            .iter()
            .filter(|r| !r.is_empty())
            .flat_map(|&r| {
                active
                    .pmas
                    .iter_range(r)
                    .filter(|(_, p)| {
                        std::ptr::addr_eq(Arc::as_ptr(&p.file), Arc::as_ptr(&self.memfile))
                    })
                    .map(move |(pr, p)| p.file_range(pr, pr.intersect(r)))
            })
            .collect();
        let committed = self.memfile.committed_in(&file_ranges).unwrap_or_else(|e| {
            log::debug!("space {}: prefill evidence unknown: {e}", self.id);
            0
        });
        (committed, total)
    }

    /// Fills `pieces` through the backend (no lock held); returns the bytes
    /// filled. Failures (a concurrent remove or re-protection) are logged
    /// and ignored: the guest's accesses fault the pages in as usual.
    pub(super) fn prefill(&self, pieces: &[(GuestRange, bool)]) -> u64 {
        let mut filled = 0;
        for &(range, writable) in pieces {
            match self.backend.prefill(range, writable) {
                Ok(n) => filled += n,
                Err(e) => log::debug!("space {}: prefill {range}: {e}", self.id),
            }
        }
        if filled > 0 {
            Counters::add(&self.counters.prefilled_windows, 1);
            Counters::add(&self.counters.prefilled_bytes, filled);
        }
        filled
    }
}
