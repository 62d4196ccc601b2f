//! Observability: a `/proc/pid/maps`-like listing and counters.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::AddressSpace;
use crate::perms::Perms;
use crate::range::GuestRange;

/// One line of [`AddressSpace::maps`]: a vma, or one protection region of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    /// Guest-physical range.
    pub range: GuestRange,
    /// Current permissions.
    pub perms: Perms,
    /// Private (copy-on-write) or shared.
    pub private: bool,
    /// Object offset of `range.start()` (0 for anonymous memory).
    pub offset: u64,
    /// The vma's name.
    pub name: String,
}

impl fmt::Display for MapsEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:012x}-{:012x} {}{} {:08x} {}",
            self.range.start(),
            self.range.end(),
            self.perms,
            if self.private { 'p' } else { 's' },
            self.offset,
            self.name
        )
    }
}

/// A snapshot of an address space's sizes and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Number of vmas.
    pub vmas: usize,
    /// Number of pmas.
    pub pmas: usize,
    /// Bytes covered by vmas.
    pub mapped_bytes: u64,
    /// Bytes covered by pmas (populated).
    pub populated_bytes: u64,
    /// Bytes of populated private pages (this space's own memory, possibly
    /// shared copy-on-write with forks).
    pub private_bytes: u64,
    /// Bytes of MemoryFile pages under this space's pmas that are resident
    /// (a page populated but never touched commits nothing).
    pub committed_bytes: u64,
    /// Faults handled (including refused ones).
    pub faults: u64,
    /// Fault-around windows installed.
    pub windows: u64,
    /// Bytes that got pmas over the space's life.
    pub populated_total: u64,
    /// Copy-on-write breaks that copied.
    pub cow_copies: u64,
    /// Bytes copied by those.
    pub cow_copied_bytes: u64,
    /// Copy-on-write breaks resolved by taking the pages over.
    pub cow_takeovers: u64,
    /// Backend install calls.
    pub installs: u64,
    /// Fault-around windows whose host page tables were (partly) filled
    /// ([`Prefill`](super::Prefill)).
    pub prefilled_windows: u64,
    /// Bytes filled by those (committed by the fill, not by the guest).
    pub prefilled_bytes: u64,
    /// Windows the fault path installed without a fill and recorded for
    /// [`fill_dense`](AddressSpace::fill_dense).
    pub unfilled_windows: u64,
    /// Recorded windows [`fill_dense`](AddressSpace::fill_dense) filled
    /// once they proved dense.
    pub dense_fills: u64,
    /// Bytes filled by those.
    pub dense_filled_bytes: u64,
}

impl AddressSpace {
    /// One entry per protection region of every vma, in address order.
    pub fn maps(&self) -> Vec<MapsEntry> {
        let mapping = self.read_mapping();
        let mut out = Vec::new();
        for (vr, vma) in mapping.vmas.iter() {
            for region in vma.protection.regions(vr, vr) {
                out.push(MapsEntry {
                    range: region.range,
                    perms: region.perms,
                    private: vma.private,
                    offset: if vma.mappable.is_some() {
                        vma.object_offset(vr, region.range.start())
                    } else {
                        0
                    },
                    name: vma.name.to_string(),
                });
            }
        }
        out
    }

    /// An estimate of the heap bytes of this space's bookkeeping: vma and
    /// pma entries, protection-range nodes, and the private-page refcounts
    /// (shared with forks, counted in full here). Counts entries times their
    /// sizes plus the segment sets' gap arenas; B-tree node overhead, vma
    /// names and mappables' own state are not counted.
    pub fn metadata_bytes(&self) -> usize {
        let mapping = self.read_mapping();
        let active = self.lock_active();
        let protection: usize = mapping
            .vmas
            .iter()
            .map(|(_, v)| v.protection.heap_bytes())
            .sum();
        mapping.vmas.heap_bytes()
            + protection
            + active.pmas.heap_bytes()
            + self.private_refs.heap_bytes()
    }

    /// Sizes and counters. Counting committed bytes scans residency
    /// (`mincore`) of this space's memory.
    pub fn stats(&self) -> Stats {
        let mapping = self.read_mapping();
        let active = self.lock_active();
        let c = &self.counters;
        let memfile_ranges: Vec<crate::range::FileRange> = active
            .pmas
            .iter()
            .filter(|(_, p)| std::ptr::addr_eq(Arc::as_ptr(&p.file), Arc::as_ptr(&self.memfile)))
            .map(|(r, p)| p.file_range(r, r))
            .collect();
        let committed_bytes = self
            .memfile
            .committed_in(&memfile_ranges)
            .unwrap_or_else(|e| {
                log::warn!("space {}: committed bytes unknown: {e}", self.id);
                0
            });
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            vmas: mapping.vmas.len(),
            pmas: active.pmas.len(),
            mapped_bytes: mapping.vmas.span(),
            populated_bytes: active.pmas.span(),
            private_bytes: active
                .pmas
                .iter()
                .filter(|(_, p)| p.private)
                .map(|(r, _)| r.len())
                .sum(),
            committed_bytes,
            faults: load(&c.faults),
            windows: load(&c.windows),
            populated_total: load(&c.populated_bytes),
            cow_copies: load(&c.cow_copies),
            cow_copied_bytes: load(&c.cow_copied_bytes),
            cow_takeovers: load(&c.cow_takeovers),
            installs: load(&c.installs),
            prefilled_windows: load(&c.prefilled_windows),
            prefilled_bytes: load(&c.prefilled_bytes),
            unfilled_windows: load(&c.unfilled_windows),
            dense_fills: load(&c.dense_fills),
            dense_filled_bytes: load(&c.dense_filled_bytes),
        }
    }
}
