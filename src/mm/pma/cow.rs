//! Page-granular copy-on-write: how much one write breaks
//! ([`AddressSpace::cow_unit`]: a page when the backend traps writes per
//! page, else the [`COW_CHUNK`](crate::mm::COW_CHUNK) around it), and
//! [`AddressSpace::break_cow_page`], the break of one trapped page with the
//! rules that collapse a densely or sequentially written chunk
//! ([`COW_COLLAPSE_PAGES`], [`COW_COLLAPSE_RUN_PAGES`]). The break itself
//! is [`AddressSpace::break_cow_locked`] (`mm/pma.rs`).

use crate::mm::{AddressSpace, MmError};
use crate::perms::Access;
use crate::range::{GuestRange, Range};

/// Pages of a [`COW_CHUNK`](crate::mm::COW_CHUNK) broken one at a time after
/// which [`AddressSpace::break_cow_page`] breaks the rest of the chunk at
/// once (64 pages: an eighth of the chunk, and at most 64 extra host
/// mappings per chunk).
pub const COW_COLLAPSE_PAGES: u64 = 64;

/// A run of this many broken pages ending right below the page being
/// broken is a sequential writer: [`AddressSpace::break_cow_page`] breaks
/// the rest of the chunk at once (it would write it all, one fault-thread
/// round trip per page, otherwise). The price: a writer that writes 4
/// adjacent pages in order and stops gets its 2 MiB chunk copied, as
/// the read-only slot mode always does. Measured with the `cow` bench
/// (half of a 256 MiB template written in order): the write pass ÷ the
/// host kernel's own `MAP_PRIVATE` copy-on-write is 1.93 with the 64-page
/// rule alone, 1.13 with runs of 8, 0.97 with runs of 4.
pub const COW_COLLAPSE_RUN_PAGES: u64 = 4;

/// What [`AddressSpace::break_cow_page`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageBreak {
    /// The range broken and installed writable: the page, the whole
    /// (clipped) chunk after a collapse, or empty if nothing was populated.
    pub broken: GuestRange,
    /// Bytes copied.
    pub cow_copied: u64,
    /// Bytes taken over without copying (sole owner).
    pub cow_taken_over: u64,
    /// Whether the chunk was collapsed (see [`COW_COLLAPSE_PAGES`]).
    pub collapsed: bool,
}

impl AddressSpace {
    /// The range one write fault breaks copy-on-write in around `gpa`:
    /// the [`COW_CHUNK`](crate::mm::COW_CHUNK) around it, or only its page
    /// when the backend traps writes per page
    /// ([`page_granular_cow`](crate::mm::AddressSpaceBackend::page_granular_cow)).
    pub(crate) fn cow_unit(&self, gpa: u64) -> GuestRange {
        let unit = if self.backend.page_granular_cow() {
            crate::PAGE_SIZE
        } else {
            crate::mm::COW_CHUNK
        };
        let start = crate::range::align_down(gpa, unit);
        Range::new_unchecked(start, start.saturating_add(unit))
    }

    /// Breaks copy-on-write for the one page holding `gpa` (a trapped
    /// guest write: see [`CowMode`](crate::kvm::CowMode)) and installs it
    /// writable, with the same pma code, locks and counters as a write
    /// fault. When the [`COW_CHUNK`](crate::mm::COW_CHUNK) around the page then
    /// holds at least [`COW_COLLAPSE_PAGES`] pages no longer copy-on-write
    /// while some still are, the rest of the chunk (within the vma and
    /// its protection region) is broken too, in the same call: page-granular
    /// breaks fragment pmas and host mappings (one mapping per broken page,
    /// under `vm.max_map_count`), and a chunk the guest writes densely is
    /// cheaper copied whole (Linux khugepaged's idea, done eagerly).
    ///
    /// A page that is no longer copy-on-write (a host write or another
    /// event broke it first) is installed again, which is harmless; a page
    /// with nothing populated is left alone (`broken` is empty).
    ///
    /// Errors: [`MmError::Fault`] with [`FaultError::Unmapped`](crate::mm::FaultError::Unmapped)
    /// or [`FaultError::Permission`](crate::mm::FaultError::Permission) (the
    /// protection no longer allows writes); allocation, copy and backend
    /// errors as for a fault.
    pub fn break_cow_page(&self, gpa: u64) -> Result<PageBreak, MmError> {
        use crate::mm::FaultError;
        let page = crate::range::page_round_down(gpa);
        let page_range = Range::new_unchecked(page, page + crate::PAGE_SIZE);
        let mapping = self.read_mapping();
        let Some((vr, vma)) = mapping.vmas.find_segment(page) else {
            return Err(FaultError::Unmapped {
                gpa,
                access: Access::Write,
            }
            .into());
        };
        let region = vma.protection.flags_at(vr, page);
        if !region.perms.write || !region.perms.read {
            return Err(FaultError::Permission {
                gpa,
                access: Access::Write,
                allowed: region.perms,
            }
            .into());
        }
        let mut active = self.lock_active();
        let mut out = PageBreak {
            broken: Range::new_unchecked(page, page),
            ..PageBreak::default()
        };
        if active.pmas.find_segment(page).is_none() {
            return Ok(out);
        }
        let report = self.break_cow_locked(&mut active, page_range)?;
        out.cow_copied += report.cow_copied;
        out.cow_taken_over += report.cow_taken_over;
        out.broken = page_range;
        let chunk = crate::range::align_down(page, crate::mm::COW_CHUNK);
        let chunk = Range::new_unchecked(chunk, chunk.saturating_add(crate::mm::COW_CHUNK))
            .intersect(region.range.intersect(vr));
        let (mut done, mut left) = (0, 0);
        for (pr, pma) in active.pmas.iter_range(chunk) {
            let len = pr.intersect(chunk).len();
            if pma.need_cow {
                left += len;
            } else {
                done += len;
            }
        }
        // Broken bytes contiguous with, and ending right below, `page`.
        let mut run = 0;
        let mut run_end = chunk.start();
        if page > chunk.start() {
            for (pr, pma) in active
                .pmas
                .iter_range(Range::new_unchecked(chunk.start(), page))
            {
                let part = pr.intersect(Range::new_unchecked(chunk.start(), page));
                run = match (pma.need_cow, part.start() == run_end) {
                    (true, _) => 0,
                    (false, true) => run + part.len(),
                    (false, false) => part.len(),
                };
                run_end = part.end();
            }
        }
        if run_end != page {
            run = 0;
        }
        let sequential = run >= COW_COLLAPSE_RUN_PAGES * crate::PAGE_SIZE;
        if left > 0 && (sequential || done >= COW_COLLAPSE_PAGES * crate::PAGE_SIZE) {
            let report = self.break_cow_locked(&mut active, chunk)?;
            out.cow_copied += report.cow_copied;
            out.cow_taken_over += report.cow_taken_over;
            out.broken = chunk;
            out.collapsed = true;
        }
        self.install_locked(&active, vr, vma, out.broken)?;
        self.recorder.push(out.broken, Access::Write);
        // The guest's write follows (logged by the backend); mark its page
        // here too. A collapse copies the rest of the chunk unchanged.
        self.mark_dirty(page_range);
        Ok(out)
    }
}
