//! Vmas: what each guest-physical range maps, and the operations that change
//! them (`map`, `unmap`, `protect`).

use std::sync::Arc;

use super::mappable::Mappable;
use super::protect::ProtectionRanges;
use super::{AddressSpace, MmError};
use crate::perms::Perms;
use crate::range::{align_up, GuestRange, Range, PAGE_SIZE};
use crate::segment::{SegmentError, SegmentValue};

/// One vma: a guest-physical range mapped to anonymous memory or an object.
///
/// Maintenance note: a new field must be handled in `merge` and `split`.
#[derive(Clone, Debug)]
pub(crate) struct Vma {
    /// The object mapped, or `None` for anonymous memory.
    pub mappable: Option<Arc<dyn Mappable>>,
    /// Object offset of the vma's start (0 for anonymous memory).
    pub offset: u64,
    /// Private (copy-on-write) or shared.
    pub private: bool,
    /// The most `protect` may grant.
    pub max_perms: Perms,
    /// Current permissions of each sub-range.
    pub protection: ProtectionRanges,
    /// A name for `maps()`.
    pub name: Arc<str>,
}

impl Vma {
    /// True if the vma maps the same thing as `other` would at `right`
    /// (ignoring protections).
    fn same_mapping(&self, left: Range, other: &Vma) -> bool {
        let same_object = match (&self.mappable, &other.mappable) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
                    && self.offset + left.len() == other.offset
            }
            _ => false,
        };
        same_object
            && self.private == other.private
            && self.max_perms == other.max_perms
            && self.name == other.name
    }

    /// Object offset of guest address `gpa` inside vma `range`.
    pub fn object_offset(&self, range: GuestRange, gpa: u64) -> u64 {
        self.offset + (gpa - range.start())
    }
}

impl SegmentValue for Vma {
    fn merge(&self, left: Range, right_value: &Self, right: Range) -> Option<Self> {
        if !self.same_mapping(left, right_value) {
            return None;
        }
        let mut merged = self.clone();
        merged
            .protection
            .merge_right_neighbor(left, right_value.protection.clone(), right);
        Some(merged)
    }

    fn split(&self, range: Range, at: u64) -> (Self, Self) {
        let mut left = self.clone();
        let right_protection = left.protection.split_at(range, at);
        let right = Vma {
            offset: if self.mappable.is_some() {
                self.offset + (at - range.start())
            } else {
                0
            },
            protection: right_protection,
            ..self.clone()
        };
        (left, right)
    }
}

/// Where a new mapping goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The lowest fitting gap at or above the space's floor.
    Anywhere,
    /// The lowest fitting gap at or above this address.
    Hint(u64),
    /// Exactly here; fail if anything is mapped there.
    Fixed(u64),
    /// Exactly here, unmapping whatever is there first.
    FixedReplace(u64),
}

/// What a new mapping shows.
#[derive(Debug, Clone)]
pub enum MapSource {
    /// Zero-filled memory. Shared anonymous memory becomes a fresh
    /// [`SharedMemory`](super::SharedMemory) object.
    Anonymous,
    /// An object, from `offset` on.
    Object {
        /// The object.
        mappable: Arc<dyn Mappable>,
        /// Object offset of the mapping's start (page aligned).
        offset: u64,
    },
}

/// Arguments of [`AddressSpace::map`]. Build with [`MapOpts::anonymous`] or
/// [`MapOpts::object`] and the builder methods.
#[derive(Debug, Clone)]
pub struct MapOpts {
    /// Length in bytes (non-zero, page aligned).
    pub len: u64,
    /// Where the mapping goes.
    pub placement: Placement,
    /// Alignment of the start (a power of two, at least a page).
    pub align: u64,
    /// Initial permissions.
    pub perms: Perms,
    /// The most `protect` may later grant.
    pub max_perms: Perms,
    /// Private (copy-on-write) or shared.
    pub private: bool,
    /// What the mapping shows.
    pub source: MapSource,
    /// Populate and install everything now (page tables, boot memory).
    pub precommit: bool,
    /// Name shown by `maps()`.
    pub name: String,
}

impl MapOpts {
    /// Private, read-write, lazily populated anonymous memory anywhere.
    pub fn anonymous(len: u64) -> MapOpts {
        MapOpts {
            len,
            placement: Placement::Anywhere,
            align: PAGE_SIZE,
            perms: Perms::READ_WRITE,
            max_perms: Perms::ALL,
            private: true,
            source: MapSource::Anonymous,
            precommit: false,
            name: "anon".into(),
        }
    }

    /// A private read-write mapping of `mappable` from `offset` on.
    pub fn object(mappable: Arc<dyn Mappable>, offset: u64, len: u64) -> MapOpts {
        MapOpts {
            source: MapSource::Object { mappable, offset },
            name: "object".into(),
            ..MapOpts::anonymous(len)
        }
    }

    /// Places the mapping exactly at `gpa`, failing on overlap.
    pub fn fixed(mut self, gpa: u64) -> Self {
        self.placement = Placement::Fixed(gpa);
        self
    }

    /// Places the mapping exactly at `gpa`, replacing what is there.
    pub fn fixed_replace(mut self, gpa: u64) -> Self {
        self.placement = Placement::FixedReplace(gpa);
        self
    }

    /// Places the mapping in the lowest fitting gap at or above `gpa`.
    pub fn hint(mut self, gpa: u64) -> Self {
        self.placement = Placement::Hint(gpa);
        self
    }

    /// Aligns the start to `align`.
    pub fn align(mut self, align: u64) -> Self {
        self.align = align;
        self
    }

    /// Sets the initial permissions.
    pub fn perms(mut self, perms: Perms) -> Self {
        self.perms = perms;
        self
    }

    /// Sets the maximum permissions.
    pub fn max_perms(mut self, max: Perms) -> Self {
        self.max_perms = max;
        self
    }

    /// Makes the mapping shared.
    pub fn shared(mut self) -> Self {
        self.private = false;
        self
    }

    /// Populates everything at map time.
    pub fn precommit(mut self) -> Self {
        self.precommit = true;
        self
    }

    /// Names the mapping.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
}

impl AddressSpace {
    /// Maps a new vma and returns its start.
    ///
    /// Errors (nothing changes): bad length, alignment or permissions;
    /// object offsets outside the object; no room; a fixed range overlapping
    /// a vma without replace. A precommit that fails (out of memory or
    /// slots) leaves the vma mapped with whatever was populated.
    pub fn map(&self, opts: MapOpts) -> Result<u64, MmError> {
        if opts.align < PAGE_SIZE || !opts.align.is_power_of_two() {
            return Err(MmError::BadAlignment { align: opts.align });
        }
        Range::pages(0, opts.len)?;
        check_perms(opts.perms)?;
        if !opts.max_perms.is_superset_of(opts.perms) {
            let range = Range::new_unchecked(0, opts.len);
            return Err(MmError::PermsExceedMax {
                range,
                perms: opts.perms,
                max: opts.max_perms,
            });
        }
        let (mappable, offset) = self.resolve_source(&opts)?;

        let mut mapping = self.write_mapping();
        let range = self.place_locked(&mapping, &opts)?;
        if let Placement::FixedReplace(_) = opts.placement {
            self.unmap_locked(&mut mapping, range)?;
        }
        if let Some(m) = &mappable {
            m.add_mapping(self.as_mapping_space(), self.id, range, offset);
        }
        let vma = Vma {
            mappable,
            offset,
            private: opts.private,
            max_perms: opts.max_perms,
            protection: ProtectionRanges::new(opts.perms),
            name: opts.name.as_str().into(),
        };
        mapping.vmas.insert(range, vma).map_err(|e| match e {
            SegmentError::Overlap { existing, .. } => MmError::Overlap { range, existing },
            _ => MmError::NoSpace {
                len: opts.len,
                align: opts.align,
            },
        })?;
        log::debug!(
            "space {}: map {range} {} {}",
            self.id,
            opts.perms,
            opts.name
        );
        if opts.precommit {
            let mut active = self.lock_active();
            self.precommit_locked(&mapping, &mut active, range)?;
        }
        Ok(range.start())
    }

    /// Checks the object range, or turns shared anonymous memory into a new
    /// shared memory object.
    fn resolve_source(&self, opts: &MapOpts) -> Result<(Option<Arc<dyn Mappable>>, u64), MmError> {
        match &opts.source {
            MapSource::Anonymous if opts.private => Ok((None, 0)),
            MapSource::Anonymous => {
                let obj = super::SharedMemory::new(self.memfile.clone(), opts.len)?;
                Ok((Some(obj), 0))
            }
            MapSource::Object { mappable, offset } => {
                let size = mappable.size();
                let fits = offset % PAGE_SIZE == 0
                    && offset.checked_add(opts.len).is_some_and(|end| end <= size);
                if !fits {
                    return Err(MmError::BadObjectRange {
                        offset: *offset,
                        len: opts.len,
                        size,
                    });
                }
                if !opts.private && !mappable.max_perms().is_superset_of(opts.max_perms) {
                    let range = Range::new_unchecked(0, opts.len);
                    return Err(MmError::PermsExceedMax {
                        range,
                        perms: opts.max_perms,
                        max: mappable.max_perms(),
                    });
                }
                Ok((Some(mappable.clone()), *offset))
            }
        }
    }

    /// Chooses the range of a new mapping.
    ///
    /// # Preconditions
    /// - `mapping` is the write-locked vma state.
    fn place_locked(
        &self,
        mapping: &super::MappingState,
        opts: &MapOpts,
    ) -> Result<GuestRange, MmError> {
        let limit = Range::new_unchecked(0, self.opts.size);
        let floor = match opts.placement {
            Placement::Fixed(gpa) | Placement::FixedReplace(gpa) => {
                if gpa % opts.align != 0 {
                    return Err(MmError::BadAlignment { align: opts.align });
                }
                let range = Range::pages(gpa, opts.len)?;
                self.check_in_space(range)?;
                if let Placement::Fixed(_) = opts.placement {
                    if let Some((existing, _)) = mapping.vmas.iter_range(range).next() {
                        return Err(MmError::Overlap { range, existing });
                    }
                }
                return Ok(range);
            }
            Placement::Hint(gpa) => gpa,
            Placement::Anywhere => self.opts.map_floor,
        };
        let floor = align_up(floor, PAGE_SIZE)
            .unwrap_or(u64::MAX)
            .min(limit.end());
        let within = Range::new_unchecked(floor, limit.end());
        mapping
            .vmas
            .first_fit(within, opts.len, opts.align)
            .ok_or(MmError::NoSpace {
                len: opts.len,
                align: opts.align,
            })
    }

    /// Unmaps every vma part inside `range` (page aligned, inside the space;
    /// holes are fine), dropping its pmas and telling the backend.
    pub fn unmap(&self, gpa: u64, len: u64) -> Result<(), MmError> {
        let range = Range::pages(gpa, len)?;
        self.check_in_space(range)?;
        let mut mapping = self.write_mapping();
        self.unmap_locked(&mut mapping, range)
    }

    /// # Preconditions
    /// - `mapping` is the write-locked vma state; `range` is page aligned.
    pub(crate) fn unmap_locked(
        &self,
        mapping: &mut super::MappingState,
        range: GuestRange,
    ) -> Result<(), MmError> {
        if mapping.vmas.is_empty_range(range) {
            return Ok(());
        }
        let removed = mapping.vmas.remove_range(range);
        for (r, vma) in &removed {
            if let Some(m) = &vma.mappable {
                m.remove_mapping(self.id, *r, vma.offset);
            }
        }
        let mut active = self.lock_active();
        self.invalidate_locked(&mut active, range, true)?;
        log::debug!(
            "space {}: unmap {range} ({} vma parts)",
            self.id,
            removed.len()
        );
        Ok(())
    }

    /// Drops the populated pages of `[gpa, gpa + len)` (`MADV_DONTNEED`):
    /// private anonymous memory reads as zeros next time, shared mappings
    /// lose their pmas but the object keeps its data. The whole range must be
    /// mapped (else nothing changes).
    pub fn decommit(&self, gpa: u64, len: u64) -> Result<(), MmError> {
        let range = Range::pages(gpa, len)?;
        self.check_in_space(range)?;
        let mapping = self.read_mapping();
        if let Some(gap) = mapping.vmas.gaps(range).next() {
            return Err(MmError::NotMapped { range, gap });
        }
        let mut active = self.lock_active();
        self.invalidate_locked(&mut active, range, true)
    }

    /// Sets the permissions of `range`, which may span several vmas.
    ///
    /// Errors (nothing changes): bad range; part of it unmapped; `perms`
    /// beyond a vma's maximum; write without read. Installed memory that
    /// loses write becomes read-only, memory that loses read is removed from
    /// the guest; gaining permissions installs nothing (the next access
    /// faults).
    pub fn protect(&self, gpa: u64, len: u64, perms: Perms) -> Result<(), MmError> {
        let range = Range::pages(gpa, len)?;
        self.check_in_space(range)?;
        check_perms(perms)?;
        let mut mapping = self.write_mapping();
        if let Some(gap) = mapping.vmas.gaps(range).next() {
            return Err(MmError::NotMapped { range, gap });
        }
        for (vr, vma) in mapping.vmas.iter_range(range) {
            if !vma.max_perms.is_superset_of(perms) {
                return Err(MmError::PermsExceedMax {
                    range: vr,
                    perms,
                    max: vma.max_perms,
                });
            }
        }
        // Everything is checked: from here on nothing can fail but the
        // backend's downgrades.
        let mut downgrades = Vec::new();
        for (vr, vma) in mapping.vmas.iter_range_mut(range) {
            let part = vr.intersect(range);
            vma.protection
                .update(vr, part, perms, |old_range, old| {
                    if old.read && !perms.read {
                        downgrades.push((old_range, false));
                    } else if old.write && !perms.write {
                        downgrades.push((old_range, true));
                    }
                })
                .expect("range checked against the vma");
        }
        let _active = self.lock_active();
        for (r, keep_readable) in downgrades {
            if keep_readable {
                self.backend.write_protect(r)?;
            } else {
                self.backend.remove(r)?;
            }
        }
        log::debug!("space {}: protect {range} {perms}", self.id);
        Ok(())
    }
}

/// Rejects permissions memslots cannot express.
fn check_perms(perms: Perms) -> Result<(), MmError> {
    if perms.write && !perms.read {
        return Err(MmError::WriteWithoutRead { perms });
    }
    Ok(())
}
