//! What a vma maps (the seeds' memmap `File`, `Mappable`, `MappingSpace`):
//!
//! - a [`File`] is something whose pages a pma can point at and a backend can
//!   mmap: the [`MemoryFile`] itself, or a [`HostFile`](super::HostFile);
//! - a [`Mappable`] turns offsets of a mapped object into file pages
//!   ([`Translation`]s) and tracks who maps it:
//!   [`SharedMemory`](super::SharedMemory) (in `shared.rs`) and
//!   [`HostFile`](super::HostFile) (in `hostfile.rs`);
//! - a [`MappingSpace`] is told when pages it maps go away (an address space).

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Weak};

use crate::memfile::{copy_slices, HostSlice, MemoryFile, MemoryFileError};
use crate::perms::{Access, Perms};
use crate::range::{FileRange, GuestRange, Range};

/// Errors from [`File`] and [`Mappable`] operations.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The memory file refused.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// The offsets lie beyond the end of the object (a bus error for the guest).
    #[error("offsets {range} are beyond the object's size {size:#x}")]
    BeyondEnd {
        /// Requested object offsets.
        range: Range,
        /// The object's size.
        size: u64,
    },
    /// An object size that is zero or not a multiple of the page size.
    #[error("object size {size:#x} is not a non-zero multiple of the page size")]
    BadSize {
        /// The offending size.
        size: u64,
    },
    /// A range argument is malformed (unaligned or overflowing).
    #[error(transparent)]
    Range(#[from] crate::range::RangeError),
    /// A [`Mappable::translate`] result that does not fit what was asked:
    /// outside `required`, unaligned, overlapping, or leaving part of it
    /// untranslated (`offending` names them).
    #[error("translation of {offending} does not fit the required offsets {required}")]
    BadTranslation {
        /// The object offsets asked for.
        required: Range,
        /// The offending (or missing) offsets.
        offending: Range,
    },
    /// The object does not allow this access.
    #[error("{access} access not allowed by the object (allows {allowed})")]
    Access {
        /// The access asked for.
        access: Access,
        /// What the object allows.
        allowed: Perms,
    },
    /// A host call failed.
    #[error("{op} failed: {source}")]
    Host {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A file whose pages pmas point at and backends map.
pub trait File: Send + Sync + fmt::Debug {
    /// Takes one more reference on every page of `range`.
    ///
    /// Preconditions: at least one reference is held on every page.
    fn inc_ref(&self, range: FileRange) -> Result<(), FileError>;

    /// Drops one reference on every page of `range`.
    fn dec_ref(&self, range: FileRange) -> Result<(), FileError>;

    /// Host mappings of `range` for a copy with `access`; they stay valid
    /// while a reference is held on the pages.
    fn map_internal(
        &self,
        range: FileRange,
        access: Access,
    ) -> Result<Vec<HostSlice<'_>>, FileError>;

    /// The descriptor a backend mmaps.
    fn fd(&self) -> BorrowedFd<'_>;
}

/// Reads `buf.len()` bytes of `file` at `offset`.
pub fn file_read(file: &dyn File, offset: u64, buf: &mut [u8]) -> Result<(), FileError> {
    if buf.is_empty() {
        return Ok(());
    }
    let range = byte_range(offset, buf.len())?;
    let mut done = 0;
    for s in file.map_internal(range, Access::Read)? {
        s.copy_to(&mut buf[done..done + s.len()]);
        done += s.len();
    }
    Ok(())
}

/// Writes `buf` to `file` at `offset`.
pub fn file_write(file: &dyn File, offset: u64, buf: &[u8]) -> Result<(), FileError> {
    if buf.is_empty() {
        return Ok(());
    }
    let range = byte_range(offset, buf.len())?;
    let mut done = 0;
    for s in file.map_internal(range, Access::Write)? {
        s.copy_from(&buf[done..done + s.len()]);
        done += s.len();
    }
    Ok(())
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset`
/// (the COW copy): through the files' descriptors (`pread` into a buffer,
/// `pwrite` out of it), which touches no page table, so a fresh
/// destination page is neither faulted in nor cleared before it is
/// overwritten (for a 2 MiB copy on this project's nested hosts, about a
/// third of the time of copying between the internal mappings); through
/// the internal mappings if a descriptor refuses.
pub fn file_copy(
    src: &dyn File,
    src_offset: u64,
    dst: &dyn File,
    dst_offset: u64,
    len: u64,
) -> Result<(), FileError> {
    if len == 0 {
        return Ok(());
    }
    match copy_through_fds(src.fd(), src_offset, dst.fd(), dst_offset, len) {
        Ok(()) => return Ok(()),
        Err(e) => log::debug!("copy through descriptors failed ({e}); copying through mappings"),
    }
    let srcs = src.map_internal(Range::from_len(src_offset, len)?, Access::Read)?;
    let dsts = dst.map_internal(Range::from_len(dst_offset, len)?, Access::Write)?;
    let copied = copy_slices(&srcs, &dsts);
    debug_assert_eq!(copied as u64, len, "internal mappings cover the ranges");
    Ok(())
}

/// Bytes moved per `pread`/`pwrite` pair of [`file_copy`].
const COPY_BUFFER: usize = 1 << 20;

thread_local! {
    static COPY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` with
/// `pread`/`pwrite` through a per-thread buffer. A short read (past the
/// end of `src`) is an error: the caller's ranges lie inside both files.
fn copy_through_fds(
    src: BorrowedFd<'_>,
    src_offset: u64,
    dst: BorrowedFd<'_>,
    dst_offset: u64,
    len: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    COPY_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < COPY_BUFFER {
            buf.resize(COPY_BUFFER, 0);
        }
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(COPY_BUFFER as u64) as usize;
            let mut got = 0;
            while got < want {
                // SAFETY: `buf[got..want]` is a live, writable buffer of
                // that many bytes; `src` is an open descriptor.
                let n = unsafe {
                    libc::pread(
                        src.as_raw_fd(),
                        buf[got..].as_mut_ptr().cast(),
                        want - got,
                        (src_offset + done + got as u64) as libc::off_t,
                    )
                };
                match n {
                    n if n > 0 => got += n as usize,
                    0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                    _ => {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
            let mut put = 0;
            while put < want {
                // SAFETY: `buf[put..want]` is initialised and live; `dst`
                // is an open descriptor.
                let n = unsafe {
                    libc::pwrite(
                        dst.as_raw_fd(),
                        buf[put..].as_ptr().cast(),
                        want - put,
                        (dst_offset + done + put as u64) as libc::off_t,
                    )
                };
                match n {
                    n if n > 0 => put += n as usize,
                    0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                    _ => {
                        let e = std::io::Error::last_os_error();
                        if e.kind() != std::io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
            done += want as u64;
        }
        Ok(())
    })
}

fn byte_range(offset: u64, len: usize) -> Result<FileRange, FileError> {
    Ok(Range::from_len(offset, len as u64)?)
}

impl File for MemoryFile {
    fn inc_ref(&self, range: FileRange) -> Result<(), FileError> {
        Ok(MemoryFile::inc_ref(self, range)?)
    }
    fn dec_ref(&self, range: FileRange) -> Result<(), FileError> {
        Ok(MemoryFile::dec_ref(self, range)?)
    }
    fn map_internal(
        &self,
        range: FileRange,
        access: Access,
    ) -> Result<Vec<HostSlice<'_>>, FileError> {
        Ok(MemoryFile::map_internal(self, range, access)?)
    }
    fn fd(&self) -> BorrowedFd<'_> {
        MemoryFile::fd(self)
    }
}

/// Object offsets mapped to file pages: one result of [`Mappable::translate`].
#[derive(Debug, Clone)]
pub struct Translation {
    /// The object offsets this translation covers (page aligned).
    pub source: Range,
    /// The file holding the pages.
    pub file: Arc<dyn File>,
    /// File offset of `source.start()`.
    pub offset: u64,
    /// The most the object allows on these pages.
    pub perms: Perms,
}

/// The object offsets a translation covers: `optional` clipped to the
/// object's `size` if that still holds `required`, else `required` alone.
///
/// Errors: `required` reaches past `size` (a bus error for the guest).
pub(crate) fn translation_window(
    required: Range,
    optional: Range,
    size: u64,
) -> Result<Range, FileError> {
    if required.end() > size {
        return Err(FileError::BeyondEnd {
            range: required,
            size,
        });
    }
    let want = optional.intersect(Range::new_unchecked(0, size));
    Ok(if want.is_superset_of(required) {
        want
    } else {
        required
    })
}

/// Something an address space is told about when pages it maps go away.
pub trait MappingSpace: Send + Sync {
    /// Drops the pmas of `range` (guest-physical) that map the object, so the
    /// next access translates again. Private (copied) pages stay unless
    /// `private_too`.
    fn invalidate(&self, range: GuestRange, private_too: bool);

    /// `object`, mapped somewhere in `range` (guest-physical), shrank to
    /// `size` bytes: drops every pma there whose object offset is at or past
    /// `size`, private copy-on-write copies included, so later accesses are
    /// bus errors (Linux's truncate unmaps private copies past the new end
    /// too; hole punching keeps them, see [`invalidate`](Self::invalidate)).
    ///
    /// The default drops everything in `range`, private pages included.
    fn truncated(&self, object: &dyn Mappable, range: GuestRange, size: u64) {
        let _ = (object, size);
        self.invalidate(range, true);
    }
}

/// An object a vma can map (other than anonymous memory).
///
/// Offsets are object offsets; every range is page aligned and non-empty.
pub trait Mappable: Send + Sync + fmt::Debug {
    /// Object size in bytes.
    fn size(&self) -> u64;

    /// The most a shared mapping of the object may allow (private mappings
    /// may always write: they copy).
    fn max_perms(&self) -> Perms;

    /// Records that `space` maps object offsets `offset..offset+range.len()`
    /// at guest range `range`.
    fn add_mapping(
        &self,
        space: Weak<dyn MappingSpace>,
        space_id: u64,
        range: GuestRange,
        offset: u64,
    );

    /// Forgets (part of) a mapping recorded by [`add_mapping`](Self::add_mapping).
    fn remove_mapping(&self, space_id: u64, range: GuestRange, offset: u64);

    /// The file pages backing `required` (and as much of `optional`, a
    /// superset, as is cheap) for `access`. Each translation holds no
    /// reference: the caller takes its own with [`File::inc_ref`] before the
    /// object's lock is released, which `translate` guarantees by returning
    /// only pages the object holds a reference on.
    fn translate(
        &self,
        required: Range,
        optional: Range,
        access: Access,
    ) -> Result<Vec<Translation>, FileError>;
}

/// One recorded mapping of an object.
#[derive(Clone)]
pub(crate) struct Mapper {
    space: Weak<dyn MappingSpace>,
    space_id: u64,
    guest: GuestRange,
    offset: u64,
}

impl Mapper {
    /// The guest range of this mapper that shows object offsets `objr`.
    fn guest_range_of(&self, objr: Range) -> Option<GuestRange> {
        let mine = Range::new_unchecked(self.offset, self.offset + self.guest.len());
        let both = mine.intersect(objr);
        (!both.is_empty()).then(|| {
            let start = self.guest.start() + (both.start() - self.offset);
            Range::new_unchecked(start, start + both.len())
        })
    }
}

/// Tracks who maps an object; used by [`SharedMemory`](super::SharedMemory)
/// and [`HostFile`](super::HostFile).
#[derive(Default)]
pub(crate) struct MapperList {
    mappers: Vec<Mapper>,
}

impl MapperList {
    pub(crate) fn add(
        &mut self,
        space: Weak<dyn MappingSpace>,
        space_id: u64,
        guest: GuestRange,
        offset: u64,
    ) {
        self.mappers.push(Mapper {
            space,
            space_id,
            guest,
            offset,
        });
    }

    /// Removes `guest` of space `space_id`, splitting records that cross it.
    pub(crate) fn remove(&mut self, space_id: u64, guest: GuestRange) {
        let mut kept = Vec::with_capacity(self.mappers.len());
        for m in self.mappers.drain(..) {
            if m.space_id != space_id || !m.guest.overlaps(guest) {
                kept.push(m);
                continue;
            }
            if m.guest.start() < guest.start() {
                let left = Range::new_unchecked(m.guest.start(), guest.start());
                kept.push(Mapper {
                    guest: left,
                    ..m.clone()
                });
            }
            if guest.end() < m.guest.end() {
                let right = Range::new_unchecked(guest.end(), m.guest.end());
                let offset = m.offset + (guest.end() - m.guest.start());
                kept.push(Mapper {
                    guest: right,
                    offset,
                    ..m.clone()
                });
            }
        }
        self.mappers = kept;
    }

    /// The (space, guest range) pairs that show object offsets `objr`.
    pub(crate) fn affected(&self, objr: Range) -> Vec<(Weak<dyn MappingSpace>, GuestRange)> {
        self.affected_by_id(objr)
            .into_iter()
            .map(|(_, space, g)| (space, g))
            .collect()
    }

    /// As [`affected`](Self::affected), with each space's id.
    pub(crate) fn affected_by_id(
        &self,
        objr: Range,
    ) -> Vec<(u64, Weak<dyn MappingSpace>, GuestRange)> {
        self.mappers
            .iter()
            .filter_map(|m| {
                m.guest_range_of(objr)
                    .map(|g| (m.space_id, m.space.clone(), g))
            })
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.mappers.len()
    }
}
