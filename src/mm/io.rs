//! Host-side access to guest memory: reads, writes and zeroing that fault in
//! what they touch (and break copy-on-write for writes, as the guest's own
//! write would), and pins that hold pages for DMA-like access.

use std::sync::Arc;

use super::mappable::File;
use super::{ActiveState, AddressSpace, MappingState, MmError};
use crate::perms::Access;
use crate::range::{align_up, page_round_down, FileRange, GuestRange, Range, PAGE_SIZE};

/// Options of host-side I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoOpts {
    /// Access memory whatever the guest's protections say (the VMM may
    /// write read-only guest memory, e.g. to load an image).
    pub ignore_permissions: bool,
}

impl IoOpts {
    /// Ignore guest protections.
    pub const FORCE: IoOpts = IoOpts {
        ignore_permissions: true,
    };
}

/// Pages held for a device: they stay allocated (even if unmapped) until
/// [`AddressSpace::unpin`].
#[derive(Debug)]
#[must_use = "a pin holds pages until unpinned"]
pub struct Pin {
    id: u64,
    /// Id of the space that holds the pin.
    space: u64,
    range: GuestRange,
}

impl Pin {
    /// The guest range pinned (page aligned).
    pub fn range(&self) -> GuestRange {
        self.range
    }
}

/// One piece of a host I/O: file bytes backing part of the guest range.
pub(crate) struct Piece {
    pub file: Arc<dyn File>,
    pub file_offset: u64,
    /// Offset into the caller's buffer.
    pub buf_offset: usize,
    pub len: usize,
}

impl Piece {
    pub fn file_range(&self) -> FileRange {
        Range::new_unchecked(self.file_offset, self.file_offset + self.len as u64)
    }
}

impl AddressSpace {
    /// Reads guest memory at `gpa` into `buf`, respecting guest protections.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MmError> {
        self.read_with(gpa, buf, IoOpts::default())
    }

    /// Reads guest memory at `gpa` into `buf`.
    ///
    /// Errors: the range is not fully mapped, a protection forbids reading
    /// (unless `opts.ignore_permissions`), or populating failed. Unpopulated
    /// pages are populated (anonymous ones read as zeros).
    pub fn read_with(&self, gpa: u64, buf: &mut [u8], opts: IoOpts) -> Result<(), MmError> {
        self.with_pieces(gpa, buf.len(), Access::Read, opts, |p| {
            let mut at = p.buf_offset;
            for s in p.file.map_internal(p.file_range(), Access::Read)? {
                at += s.copy_to(&mut buf[at..p.buf_offset + p.len]);
            }
            Ok(())
        })
    }

    /// Writes `buf` to guest memory at `gpa`, respecting guest protections.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MmError> {
        self.write_with(gpa, buf, IoOpts::default())
    }

    /// Writes `buf` to guest memory at `gpa`, breaking copy-on-write first.
    ///
    /// Errors as for [`read_with`](Self::read_with).
    pub fn write_with(&self, gpa: u64, buf: &[u8], opts: IoOpts) -> Result<(), MmError> {
        self.with_pieces(gpa, buf.len(), Access::Write, opts, |p| {
            let mut at = p.buf_offset;
            for s in p.file.map_internal(p.file_range(), Access::Write)? {
                at += s.copy_from(&buf[at..p.buf_offset + p.len]);
            }
            Ok(())
        })
    }

    /// Writes zeros over `len` bytes at `gpa` (respecting protections unless
    /// `opts.ignore_permissions`).
    pub fn zero(&self, gpa: u64, len: u64, opts: IoOpts) -> Result<(), MmError> {
        // Check (and populate) the whole range first, so a bad range fails
        // before the first chunk is written.
        self.with_pieces(gpa, len as usize, Access::Write, opts, |_| Ok(()))?;
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_with(gpa + done, &zeros[..n], opts)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Populates `[gpa, gpa + len)` for `access` and holds a reference on its
    /// pages until [`unpin`](Self::unpin), even across unmap.
    pub fn pin(&self, gpa: u64, len: u64, access: Access, opts: IoOpts) -> Result<Pin, MmError> {
        let bytes = Range::from_len(gpa, len)?;
        if bytes.is_empty() {
            return Err(crate::range::RangeError::Empty { start: gpa }.into());
        }
        self.check_in_space(bytes)?;
        let range = Range::pages(
            page_round_down(gpa),
            align_up(gpa.saturating_add(len), PAGE_SIZE).unwrap_or(u64::MAX) - page_round_down(gpa),
        )?;
        let mut held = Vec::new();
        self.with_pieces(range.start(), range.len() as usize, access, opts, |p| {
            p.file.inc_ref(p.file_range())?;
            held.push((p.file.clone(), p.file_range()));
            Ok(())
        })?;
        let mut active = self.lock_active();
        let id = active.next_pin;
        active.next_pin += 1;
        active.pins.insert(id, held);
        Ok(Pin {
            id,
            space: self.id,
            range,
        })
    }

    /// Releases a pin. A pin of another space is refused with
    /// [`MmError::ForeignPin`] (that space releases it when dropped).
    pub fn unpin(&self, pin: Pin) -> Result<(), MmError> {
        if pin.space != self.id {
            return Err(MmError::ForeignPin {
                pin_space: pin.space,
                space: self.id,
            });
        }
        let held = self.lock_active().pins.remove(&pin.id).unwrap_or_default();
        for (file, fr) in held {
            file.dec_ref(fr)?;
        }
        Ok(())
    }

    /// Calls `f` on the file pieces backing `len` bytes at `gpa`, populated
    /// for `access`, with the locks held so no piece is freed meanwhile.
    ///
    /// Everything is checked before anything is populated: an unmapped or
    /// protected byte fails the whole call.
    pub(crate) fn with_pieces(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        opts: IoOpts,
        mut f: impl FnMut(&Piece) -> Result<(), MmError>,
    ) -> Result<(), MmError> {
        if len == 0 {
            return Ok(());
        }
        let range = Range::from_len(gpa, len as u64)?;
        let pages = Range::new_unchecked(
            page_round_down(range.start()),
            align_up(range.end(), PAGE_SIZE).ok_or(MmError::OutOfSpace {
                range,
                limit: self.opts.size,
            })?,
        );
        self.check_in_space(pages)?;
        let mapping = self.read_mapping();
        self.check_io_locked(&mapping, pages, range, access, opts)?;
        let mut active = self.lock_active();
        let mut out = Vec::new();
        for (vr, vma) in mapping.vmas.iter_range(pages) {
            let part = vr.intersect(pages);
            let report = self.ensure_pmas_locked(&mut active, vr, vma, part, access)?;
            if report.cow_copied + report.cow_taken_over > 0 {
                // The guest may see the old pages: show it the new ones.
                self.install_locked(&active, vr, vma, part)?;
            }
            collect_pieces_locked(&active, part.intersect(range), range.start(), &mut out);
        }
        out.iter().try_for_each(&mut f)
    }

    /// # Preconditions
    /// - `mapping` is locked.
    pub(super) fn check_io_locked(
        &self,
        mapping: &MappingState,
        pages: GuestRange,
        range: GuestRange,
        access: Access,
        opts: IoOpts,
    ) -> Result<(), MmError> {
        if let Some(gap) = mapping.vmas.gaps(pages).next() {
            return Err(MmError::NotMapped { range, gap });
        }
        if opts.ignore_permissions {
            return Ok(());
        }
        for (vr, vma) in mapping.vmas.iter_range(pages) {
            for region in vma.protection.regions(vr, vr.intersect(pages)) {
                if !region.perms.allows(access) {
                    let gpa = region.range.start().max(range.start());
                    return Err(MmError::Permission {
                        gpa,
                        access,
                        allowed: region.perms,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Appends the file pieces behind `bytes` (covered by pmas).
///
/// # Preconditions
/// - `active` is locked and pmas cover `bytes`.
fn collect_pieces_locked(active: &ActiveState, bytes: GuestRange, base: u64, out: &mut Vec<Piece>) {
    for (pr, pma) in active.pmas.iter_range(bytes) {
        let part = pr.intersect(bytes);
        let fr: FileRange = pma.file_range(pr, part);
        out.push(Piece {
            file: pma.file.clone(),
            file_offset: fr.start(),
            buf_offset: (part.start() - base) as usize,
            len: part.len() as usize,
        });
    }
}
