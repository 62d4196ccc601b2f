//! Host-side access to guest memory: reads, writes and zeroing that fault in
//! what they touch (and break copy-on-write for writes, as the guest's own
//! write would), and pins that hold pages for DMA-like access.

use std::sync::Arc;

use super::mappable::{File, FileError};
use super::{ActiveState, AddressSpace, MappingState, MmError};
use crate::memfile::HostSlice;
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
    /// Pinned for writing: unpinning marks the range dirty (a device may
    /// have written it meanwhile).
    write: bool,
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
    /// Unpopulated pages are populated (anonymous ones read as zeros).
    ///
    /// Errors, checked before anything is populated (so nothing changes):
    /// the range is not fully mapped; a protection forbids reading (unless
    /// `opts.ignore_permissions`); part of it maps object offsets past the
    /// object's end; a shared mapping's object does not allow the access.
    /// Errors while populating (out of memory, a backend or object failure):
    /// the pages populated before the failure stay populated, and installed
    /// where their copy-on-write was broken; their contents are what they
    /// were, and no byte is read or written.
    pub fn read_with(&self, gpa: u64, buf: &mut [u8], opts: IoOpts) -> Result<(), MmError> {
        self.with_all_pieces(gpa, buf.len(), Access::Read, opts, |pieces| {
            // Map every piece before copying: a failure copies nothing.
            let mapped = map_pieces(pieces, Access::Read, usize::MAX)?;
            for (at, s) in mapped {
                s.copy_to(&mut buf[at..at + s.len()]);
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
    /// All or nothing: errors as for [`read_with`](Self::read_with), and on
    /// any error no byte is written. `opts.ignore_permissions` writes
    /// read-only guest memory, but not a shared mapping of an object that
    /// cannot be written (a read-only [`HostFile`](super::HostFile)).
    pub fn write_with(&self, gpa: u64, buf: &[u8], opts: IoOpts) -> Result<(), MmError> {
        self.with_all_pieces(gpa, buf.len(), Access::Write, opts, |pieces| {
            let mapped = map_pieces(pieces, Access::Write, usize::MAX)?;
            for (at, s) in mapped {
                s.copy_from(&buf[at..at + s.len()]);
            }
            Ok(())
        })
    }

    /// Writes zeros over `len` bytes at `gpa` (respecting protections unless
    /// `opts.ignore_permissions`). All or nothing, as
    /// [`write_with`](Self::write_with).
    pub fn zero(&self, gpa: u64, len: u64, opts: IoOpts) -> Result<(), MmError> {
        const CHUNK: usize = 1 << 20;
        let len = usize::try_from(len).map_err(|_| MmError::OutOfSpace {
            range: GuestRange::new_unchecked(gpa, gpa),
            limit: self.opts.size,
        })?;
        self.with_all_pieces(gpa, len, Access::Write, opts, |pieces| {
            let mapped = map_pieces(pieces, Access::Write, CHUNK)?;
            let zeros = vec![0u8; len.min(CHUNK)];
            for (_, s) in mapped {
                s.copy_from(&zeros[..s.len()]);
            }
            Ok(())
        })
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
        let mut held: super::PinnedPages = Vec::new();
        let pinned = self.with_pieces(range.start(), range.len() as usize, access, opts, |p| {
            p.file.inc_ref(p.file_range())?;
            held.push((p.file.clone(), p.file_range()));
            Ok(())
        });
        if let Err(e) = pinned {
            // Give back what was taken before the failure.
            for (file, fr) in held {
                if let Err(e) = file.dec_ref(fr) {
                    log::error!("space {}: releasing a failed pin's {fr}: {e}", self.id);
                }
            }
            return Err(e);
        }
        let mut active = self.lock_active();
        let id = active.next_pin;
        active.next_pin += 1;
        active.pins.insert(id, held);
        Ok(Pin {
            id,
            space: self.id,
            range,
            write: access == Access::Write,
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
        if pin.write {
            self.mark_dirty(pin.range);
        }
        let held = self.lock_active().pins.remove(&pin.id).unwrap_or_default();
        for (file, fr) in held {
            file.dec_ref(fr)?;
        }
        Ok(())
    }

    /// Calls `f` on each file piece backing `len` bytes at `gpa`, as
    /// [`with_all_pieces`](Self::with_all_pieces).
    pub(crate) fn with_pieces(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        opts: IoOpts,
        mut f: impl FnMut(&Piece) -> Result<(), MmError>,
    ) -> Result<(), MmError> {
        self.with_all_pieces(gpa, len, access, opts, |pieces| {
            pieces.iter().try_for_each(&mut f)
        })
    }

    /// Calls `f` once with the file pieces backing `len` bytes at `gpa`,
    /// populated for `access`, with the locks held so no piece is freed
    /// meanwhile.
    ///
    /// Everything [`check_io_locked`](Self::check_io_locked) checks is
    /// checked before anything is populated: an unmapped or protected byte,
    /// or one past its object's end, fails the whole call with nothing
    /// changed. Populating itself can still fail (out of memory, a backend
    /// or object failure); what populating did before that stays, and `f`
    /// is not called.
    pub(crate) fn with_all_pieces(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        opts: IoOpts,
        f: impl FnOnce(&[Piece]) -> Result<(), MmError>,
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
        let done = f(&out);
        if access == Access::Write {
            // After the bytes land, with `active` still held: a take that
            // empties the log first leaves the page for the next take.
            // Marked on failure too (a write may have landed in part).
            self.mark_dirty(range);
        }
        done
    }

    /// Checks everything about an access of `access` to `range` (bytes;
    /// `pages` is it rounded out to pages) that does not need populating:
    /// - every page is mapped (else [`MmError::NotMapped`]);
    /// - the protection allows `access`, unless `opts.ignore_permissions`
    ///   ([`MmError::Permission`]);
    /// - object pages lie inside the object
    ///   ([`FileError::BeyondEnd`]: a bus error for the guest);
    /// - a shared mapping's object allows `access`, whatever `opts` says
    ///   ([`FileError::Access`]: a read-only [`HostFile`](super::HostFile)
    ///   cannot be written through, even by a forced write).
    ///
    /// # Preconditions
    /// - `mapping` is locked; `active` is not held (object sizes are read).
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
        for (vr, vma) in mapping.vmas.iter_range(pages) {
            let part = vr.intersect(pages);
            if !opts.ignore_permissions {
                for region in vma.protection.regions(vr, part) {
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
            let Some(m) = &vma.mappable else { continue };
            let objr = Range::new_unchecked(
                vma.object_offset(vr, part.start()),
                vma.object_offset(vr, part.end()),
            );
            let size = m.size();
            if objr.end() > size {
                let beyond = Range::new_unchecked(objr.start().max(size), objr.end());
                return Err(FileError::BeyondEnd {
                    range: beyond,
                    size,
                }
                .into());
            }
            let allowed = m.max_perms();
            if !vma.private && !allowed.allows(access) {
                return Err(FileError::Access { access, allowed }.into());
            }
        }
        Ok(())
    }
}

/// Host slices of every piece (each at most `chunk` bytes), with the
/// buffer offset each starts at: everything that can fail before the first
/// byte is copied.
fn map_pieces(
    pieces: &[Piece],
    access: Access,
    chunk: usize,
) -> Result<Vec<(usize, HostSlice<'_>)>, MmError> {
    let mut out = Vec::new();
    for p in pieces {
        let mut done = 0;
        while done < p.len {
            let n = (p.len - done).min(chunk);
            let fr = Range::new_unchecked(
                p.file_offset + done as u64,
                p.file_offset + (done + n) as u64,
            );
            let mut at = p.buf_offset + done;
            for s in p.file.map_internal(fr, access)? {
                let len = s.len();
                out.push((at, s));
                at += len;
            }
            done += n;
        }
    }
    Ok(out)
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
