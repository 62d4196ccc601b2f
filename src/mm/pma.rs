//! Pmas: populated guest-physical ranges and the file pages behind them,
//! copy-on-write aware (gVisor `mm/pma.go`).
//!
//! A pma holds one file reference per page. A *private* pma's pages belong
//! to address spaces rather than to an object; [`PrivateRefs`] counts how many
//! address spaces (forks) hold each such page, so a write by the sole owner
//! of a copy-on-write page takes it over instead of copying it.
//!
//! Page-granular copy-on-write (how much one write breaks, one trapped page
//! at a time, and when a chunk collapses) is in `mm/pma/cow.rs`.

use std::sync::{Arc, Mutex};

use super::mappable::{file_copy, File, FileError, Mappable};
use super::vma::Vma;
use super::{ActiveState, AddressSpace, Counters, MappingState, MmError};
use crate::memfile::MemoryKind;
use crate::perms::{Access, Perms};
use crate::range::{FileRange, GuestRange, Range};
use crate::segment::{SegmentSet, SegmentValue};

mod cow;

pub use cow::{PageBreak, COW_COLLAPSE_PAGES, COW_COLLAPSE_RUN_PAGES};

/// One pma.
///
/// Maintenance note: a new field must be handled in `merge` and `split`.
#[derive(Clone, Debug)]
pub(crate) struct Pma {
    /// The file holding the pages.
    pub file: Arc<dyn File>,
    /// File offset of the pma's first page.
    pub offset: u64,
    /// The most the pages allow (an object's translation perms).
    pub max_perms: Perms,
    /// A write must copy (or take over) the pages first.
    pub need_cow: bool,
    /// The pages are owned by address spaces and counted in [`PrivateRefs`].
    pub private: bool,
}

impl Pma {
    /// The file range behind guest range `part` of pma range `range`.
    pub fn file_range(&self, range: GuestRange, part: GuestRange) -> FileRange {
        let start = self.offset + (part.start() - range.start());
        Range::new_unchecked(start, start + part.len())
    }

    /// Whether a pma may be installed writable under protection `prot`.
    pub fn writable_under(&self, prot: Perms) -> bool {
        prot.write && self.max_perms.write && !self.need_cow
    }
}

impl SegmentValue for Pma {
    fn merge(&self, left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        let same_file = std::ptr::addr_eq(Arc::as_ptr(&self.file), Arc::as_ptr(&right_value.file));
        (same_file
            && self.offset + left.len() == right_value.offset
            && self.max_perms == right_value.max_perms
            && self.need_cow == right_value.need_cow
            && self.private == right_value.private)
            .then(|| self.clone())
    }

    fn split(&self, range: Range, at: u64) -> (Self, Self) {
        let right = Pma {
            offset: self.offset + (at - range.start()),
            ..self.clone()
        };
        (self.clone(), right)
    }
}

/// A reference count (value of [`PrivateRefs`]' segment set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refs(u64);

impl SegmentValue for Refs {
    fn merge(&self, _: Range, right_value: &Self, _: Range) -> Option<Self> {
        (self.0 == right_value.0).then_some(*self)
    }
    fn split(&self, _: Range, _: u64) -> (Self, Self) {
        (*self, *self)
    }
}

/// How many address spaces hold each private page (MemoryFile offsets);
/// shared by an address space and its forks.
///
/// Lock order: below `AddressSpace.active`, above `MemoryFile.inner`.
#[derive(Default)]
pub struct PrivateRefs {
    refs: Mutex<SegmentSet<Refs>>,
}

impl std::fmt::Debug for PrivateRefs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateRefs")
            .field("pages", &(self.lock().span() / crate::PAGE_SIZE))
            .finish()
    }
}

impl PrivateRefs {
    fn lock(&self) -> std::sync::MutexGuard<'_, SegmentSet<Refs>> {
        self.refs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new owner of every page of `fr`.
    pub(crate) fn inc(&self, fr: FileRange) {
        let mut refs = self.lock();
        let holes: Vec<Range> = refs.gaps(fr).collect();
        for hole in holes {
            refs.insert_without_merging(hole, Refs(0))
                .expect("hole is free");
        }
        refs.apply_contiguous(fr, |_, r| r.0 += 1)
            .expect("range just filled");
        refs.merge_range(fr);
    }

    /// Drops an owner of every page of `fr`.
    pub(crate) fn dec(&self, fr: FileRange) {
        let mut refs = self.lock();
        let covered = refs.apply_contiguous(fr, |_, r| r.0 -= 1);
        debug_assert!(covered.is_ok(), "dec of uncounted private pages {fr}");
        let zero: Vec<Range> = refs
            .iter_range(fr)
            .filter(|(_, r)| r.0 == 0)
            .map(|(r, _)| r)
            .collect();
        for r in zero {
            refs.remove(r.start());
        }
        refs.merge_range(fr);
    }

    /// The sub-ranges of `fr` with their owner counts, in order.
    pub(crate) fn counts(&self, fr: FileRange) -> Vec<(FileRange, u64)> {
        self.lock()
            .iter_range(fr)
            .map(|(r, c)| (r.intersect(fr), c.0))
            .collect()
    }

    /// Heap bytes of the refcount segments (estimate, see
    /// [`SegmentSet::heap_bytes`]).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.lock().heap_bytes()
    }

    /// Every counted range (for invariant checks).
    pub(crate) fn all(&self) -> Vec<(FileRange, u64)> {
        self.lock().iter().map(|(r, c)| (r, c.0)).collect()
    }
}

/// Drops the references pma `pma` over `range` holds.
pub(crate) fn release(
    private_refs: &PrivateRefs,
    range: GuestRange,
    pma: &Pma,
) -> Result<(), FileError> {
    let fr = pma.file_range(range, range);
    if pma.private {
        private_refs.dec(fr);
    }
    pma.file.dec_ref(fr)
}

/// What populating a range did (summed over calls).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PopulateReport {
    /// Bytes that got new pmas.
    pub populated: u64,
    /// Bytes copied to break copy-on-write.
    pub cow_copied: u64,
    /// Bytes whose copy-on-write was resolved by taking the pages over.
    pub cow_taken_over: u64,
}

impl AddressSpace {
    /// Creates pmas for every unpopulated page of `range` and, for a write,
    /// breaks copy-on-write there.
    ///
    /// # Preconditions
    /// - `range` is page aligned, non-empty and inside vma `vr` (`vma`).
    /// - `mapping` is read- or write-locked; `active` is locked.
    pub(crate) fn ensure_pmas_locked(
        &self,
        active: &mut ActiveState,
        vr: GuestRange,
        vma: &Vma,
        range: GuestRange,
        access: Access,
    ) -> Result<PopulateReport, MmError> {
        self.ensure_pmas_cow_in_locked(active, vr, vma, range, access, range)
    }

    /// [`ensure_pmas_locked`](Self::ensure_pmas_locked), but a write breaks
    /// copy-on-write only in `cow` (the fault path caps what one write
    /// fault copies; the rest of `range` keeps its copy-on-write pmas and is
    /// installed read-only).
    ///
    /// # Preconditions
    /// - as for `ensure_pmas_locked`; `cow` is page aligned and inside `range`.
    pub(crate) fn ensure_pmas_cow_in_locked(
        &self,
        active: &mut ActiveState,
        vr: GuestRange,
        vma: &Vma,
        range: GuestRange,
        access: Access,
        cow: GuestRange,
    ) -> Result<PopulateReport, MmError> {
        debug_assert!(vr.is_superset_of(range) && range.is_page_aligned() && !range.is_empty());
        debug_assert!(range.is_superset_of(cow) && cow.is_page_aligned());
        let mut report = PopulateReport::default();
        let holes: Vec<GuestRange> = active.pmas.gaps(range).collect();
        for hole in holes {
            match &vma.mappable {
                None => {
                    let fr = self.memfile.allocate(hole.len(), MemoryKind::Anonymous)?;
                    self.private_refs.inc(fr);
                    let pma = Pma {
                        file: self.memfile.clone(),
                        offset: fr.start(),
                        max_perms: Perms::ALL,
                        need_cow: false,
                        private: true,
                    };
                    active.pmas.insert(hole, pma).expect("hole is free");
                }
                Some(m) => {
                    let required = Range::new_unchecked(
                        vma.object_offset(vr, hole.start()),
                        vma.object_offset(vr, hole.end()),
                    );
                    for t in m.translate(required, required, access)? {
                        // A third-party Mappable may misbehave: refuse what
                        // does not fit the hole rather than corrupt the pmas.
                        let fits = required.is_superset_of(t.source)
                            && !t.source.is_empty()
                            && t.source.is_page_aligned()
                            && t.offset % crate::PAGE_SIZE == 0;
                        if !fits {
                            return Err(FileError::BadTranslation {
                                required,
                                offending: t.source,
                            }
                            .into());
                        }
                        let guest_start = vr.start() + (t.source.start() - vma.offset);
                        let guest = Range::new_unchecked(guest_start, guest_start + t.source.len());
                        let pma = Pma {
                            file: t.file.clone(),
                            offset: t.offset,
                            max_perms: t.perms,
                            need_cow: vma.private,
                            private: false,
                        };
                        if active.pmas.insert(guest, pma).is_err() {
                            return Err(FileError::BadTranslation {
                                required,
                                offending: t.source,
                            }
                            .into());
                        }
                        t.file
                            .inc_ref(Range::new_unchecked(t.offset, t.offset + t.source.len()))?;
                    }
                    if let Some(gap) = active.pmas.gaps(hole).next() {
                        let missing = Range::new_unchecked(
                            vma.object_offset(vr, gap.start()),
                            vma.object_offset(vr, gap.end()),
                        );
                        return Err(FileError::BadTranslation {
                            required,
                            offending: missing,
                        }
                        .into());
                    }
                }
            }
            report.populated += hole.len();
        }
        if access == Access::Write && !cow.is_empty() {
            let cow = self.widen_unprotectable_cow_locked(active, range, cow);
            let cow = self.break_cow_locked(active, cow)?;
            report.cow_copied += cow.cow_copied;
            report.cow_taken_over += cow.cow_taken_over;
        }
        Counters::add(&self.counters.populated_bytes, report.populated);
        Ok(report)
    }

    /// `cow` (a page-granular break: see [`cow_unit`](Self::cow_unit), or
    /// a whole populate), widened to the [`COW_CHUNK`](super::COW_CHUNK)s
    /// around it (within `range`) when the backend cannot trap writes to the pages there per
    /// page (a regular file on disk under userfaultfd write protection):
    /// such pages stay in read-only slots, and copying one page per write
    /// exit would cost an exit per page.
    ///
    /// # Preconditions
    /// - `active` is locked; pmas cover `cow`, which lies in `range`.
    fn widen_unprotectable_cow_locked(
        &self,
        active: &ActiveState,
        range: GuestRange,
        cow: GuestRange,
    ) -> GuestRange {
        if !self.backend.page_granular_cow() {
            return cow;
        }
        let protectable = active
            .pmas
            .iter_range(cow)
            .all(|(_, p)| !p.need_cow || self.backend.page_granular_cow_for(p.file.fd()));
        if protectable {
            return cow;
        }
        // Whole chunks around `cow`, never less than `cow` (a populate for
        // write asks for more than a chunk).
        let start = crate::range::align_down(cow.start(), super::COW_CHUNK);
        let end = crate::range::align_up(cow.end(), super::COW_CHUNK).unwrap_or(u64::MAX);
        Range::new_unchecked(start, end).intersect(range)
    }

    /// Resolves copy-on-write on every pma page in `range`: the sole owner
    /// of private pages takes them over, everything else is copied into new
    /// anonymous pages. Does not touch the backend.
    ///
    /// # Preconditions
    /// - pmas cover `range`; `active` is locked.
    pub(crate) fn break_cow_locked(
        &self,
        active: &mut ActiveState,
        range: GuestRange,
    ) -> Result<PopulateReport, MmError> {
        let mut report = PopulateReport::default();
        let cow: Vec<(GuestRange, Pma)> = active
            .pmas
            .iter_range(range)
            .filter(|(_, p)| p.need_cow)
            .map(|(r, p)| (r, p.clone()))
            .collect();
        for (pr, pma) in cow {
            let part = pr.intersect(range);
            // Split the part by ownership: sole-owned private pages are taken
            // over, the rest copied.
            let pieces: Vec<(GuestRange, bool)> = if pma.private {
                self.private_refs
                    .counts(pma.file_range(pr, part))
                    .into_iter()
                    .map(|(fr, n)| {
                        let start = part.start() + (fr.start() - pma.file_range(pr, part).start());
                        (Range::new_unchecked(start, start + fr.len()), n == 1)
                    })
                    .collect()
            } else {
                vec![(part, false)]
            };
            for (piece, sole_owner) in pieces {
                active.pmas.isolate(piece.start(), piece);
                let (seg, old) = active
                    .pmas
                    .find_segment_mut(piece.start())
                    .expect("isolated pma");
                debug_assert_eq!(seg, piece);
                if sole_owner {
                    old.need_cow = false;
                    report.cow_taken_over += piece.len();
                    Counters::add(&self.counters.cow_takeovers, 1);
                    continue;
                }
                let old = old.clone();
                let old_fr = old.file_range(piece, piece);
                let new_fr = self.memfile.allocate(piece.len(), MemoryKind::Anonymous)?;
                if let Err(e) = file_copy(
                    old.file.as_ref(),
                    old_fr.start(),
                    self.memfile.as_ref(),
                    new_fr.start(),
                    piece.len(),
                ) {
                    self.memfile.dec_ref(new_fr)?;
                    return Err(e.into());
                }
                self.private_refs.inc(new_fr);
                let (_, slot) = active
                    .pmas
                    .find_segment_mut(piece.start())
                    .expect("isolated pma");
                *slot = Pma {
                    file: self.memfile.clone(),
                    offset: new_fr.start(),
                    max_perms: Perms::ALL,
                    need_cow: false,
                    private: true,
                };
                release(&self.private_refs, piece, &old)?;
                report.cow_copied += piece.len();
                Counters::add(&self.counters.cow_copies, 1);
                Counters::add(&self.counters.cow_copied_bytes, piece.len());
            }
        }
        active.pmas.merge_range(range);
        Ok(report)
    }

    /// Makes what pmas hold in `range` visible to the guest with the
    /// writability each protection region allows; regions without read stay
    /// invisible.
    ///
    /// # Preconditions
    /// - `range` lies in vma `vr` (`vma`) and pmas cover it; `active` is locked.
    pub(crate) fn install_locked(
        &self,
        active: &ActiveState,
        vr: GuestRange,
        vma: &Vma,
        range: GuestRange,
    ) -> Result<u64, MmError> {
        let mut installs = 0;
        for region in vma.protection.regions(vr, range) {
            if !region.perms.read {
                continue;
            }
            for (pr, pma) in active.pmas.iter_range(region.range) {
                let part = pr.intersect(region.range);
                let fr = pma.file_range(pr, part);
                // Copy-on-write the guest may write (the copy will be
                // writable whatever the object allows): the backend
                // decides how writes are trapped (read-only slot, or per
                // page).
                let cow_writable = pma.need_cow && region.perms.write;
                let installed = if cow_writable {
                    self.backend.install_cow(part, pma.file.fd(), fr.start())
                } else {
                    self.backend.install(
                        part,
                        pma.file.fd(),
                        fr.start(),
                        pma.writable_under(region.perms),
                    )
                };
                if let Err(e) = installed {
                    // What the backend still shows in `range` may be pages
                    // the pmas no longer hold (a copy-on-write just broke):
                    // hide it so the next access faults.
                    if let Err(e) = self.backend.remove(range) {
                        log::error!(
                            "space {}: removing {range} after a failed install: {e}",
                            self.id
                        );
                    }
                    return Err(e.into());
                }
                installs += 1;
            }
        }
        Counters::add(&self.counters.installs, installs);
        Ok(installs)
    }

    /// Drops the pmas in `range` (only those mapping objects, unless
    /// `private_too`) and removes them from the guest.
    ///
    /// # Preconditions
    /// - `active` is locked.
    pub(crate) fn invalidate_locked(
        &self,
        active: &mut ActiveState,
        range: GuestRange,
        private_too: bool,
    ) -> Result<(), MmError> {
        let victims: Vec<GuestRange> = active
            .pmas
            .iter_range(range)
            .filter(|(_, p)| private_too || !p.private)
            .map(|(r, _)| r.intersect(range))
            .collect();
        for part in victims {
            for (r, pma) in active.pmas.remove_range(part) {
                self.backend.remove(r)?;
                release(&self.private_refs, r, &pma)?;
                // Its content is gone (zeros, or the object's again).
                self.mark_dirty(r);
            }
        }
        Ok(())
    }

    /// Drops every pma in `range` whose vma maps `object` at an object
    /// offset at or past `size`, private copies included (the object was
    /// truncated). Takes `mapping` (read) and `active`.
    ///
    /// # Preconditions
    /// - neither `mapping` nor `active` is held by the caller.
    pub(crate) fn drop_past_object_end(
        &self,
        object: &dyn Mappable,
        range: GuestRange,
        size: u64,
    ) -> Result<(), MmError> {
        let mapping = self.read_mapping();
        let mut active = self.lock_active();
        let target = object as *const dyn Mappable;
        let mut gone = Vec::new();
        for (vr, vma) in mapping.vmas.iter_range(range) {
            let Some(m) = &vma.mappable else { continue };
            if !std::ptr::addr_eq(Arc::as_ptr(m), target) {
                continue;
            }
            // The first guest address of this vma past the object's end.
            let end = vr.start().saturating_add(size.saturating_sub(vma.offset));
            let part = vr.intersect(range);
            if end < part.end() {
                gone.push(Range::new_unchecked(end.max(part.start()), part.end()));
            }
        }
        for r in gone {
            self.invalidate_locked(&mut active, r, true)?;
        }
        Ok(())
    }

    /// Populates and installs all of vma `vr` (a precommitted mapping).
    ///
    /// # Preconditions
    /// - `mapping` is write-locked and holds vma `vr`; `active` is locked.
    pub(crate) fn precommit_locked(
        &self,
        mapping: &MappingState,
        active: &mut ActiveState,
        vr: GuestRange,
    ) -> Result<(), MmError> {
        let (vr, vma) = mapping
            .vmas
            .find_segment(vr.start())
            .expect("vma just mapped");
        // A read populates without copying private object pages; anonymous
        // pages are writable either way.
        self.ensure_pmas_locked(active, vr, vma, vr, Access::Read)?;
        self.install_locked(active, vr, vma, vr)?;
        Ok(())
    }
}
