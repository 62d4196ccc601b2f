//! What a vma maps (the seeds' memmap `File`, `Mappable`, `MappingSpace`):
//!
//! - a [`File`] is something whose pages a pma can point at and a backend can
//!   mmap: the [`MemoryFile`] itself, or a [`HostFile`];
//! - a [`Mappable`] turns offsets of a mapped object into file pages
//!   ([`Translation`]s) and tracks who maps it: [`SharedMemory`] and
//!   [`HostFile`];
//! - a [`MappingSpace`] is told when pages it maps go away (an address space).

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, Weak};

use crate::memfile::{HostSlice, MemoryFile, MemoryFileError, MemoryKind};
use crate::perms::{Access, Perms};
use crate::range::{FileRange, GuestRange, Range, PAGE_SIZE};
use crate::segment::{SegmentSet, SegmentValue};

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
/// through both files' internal mappings (the COW copy).
pub fn file_copy(
    src: &dyn File,
    src_offset: u64,
    dst: &dyn File,
    dst_offset: u64,
    len: u64,
) -> Result<(), FileError> {
    let mut buf = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file_read(src, src_offset + done, &mut buf[..n])?;
        file_write(dst, dst_offset + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

fn byte_range(offset: u64, len: usize) -> Result<FileRange, FileError> {
    Range::from_len(offset, len as u64).map_err(|_| FileError::BeyondEnd {
        range: Range::EMPTY,
        size: u64::MAX,
    })
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

/// Something an address space is told about when pages it maps go away.
pub trait MappingSpace: Send + Sync {
    /// Drops the pmas of `range` (guest-physical) that map the object, so the
    /// next access translates again. Private (copied) pages stay unless
    /// `private_too`.
    fn invalidate(&self, range: GuestRange, private_too: bool);
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
struct Mapper {
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

/// Tracks who maps an object; shared by [`SharedMemory`] and [`HostFile`].
#[derive(Default)]
struct MapperList {
    mappers: Vec<Mapper>,
}

impl MapperList {
    fn add(
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
    fn remove(&mut self, space_id: u64, guest: GuestRange) {
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
    fn affected(&self, objr: Range) -> Vec<(Weak<dyn MappingSpace>, GuestRange)> {
        self.mappers
            .iter()
            .filter_map(|m| m.guest_range_of(objr).map(|g| (m.space.clone(), g)))
            .collect()
    }

    fn count(&self) -> usize {
        self.mappers.len()
    }
}

/// A page of a [`SharedMemory`] object: the MemoryFile offset backing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Backing {
    file_offset: u64,
}

impl SegmentValue for Backing {
    fn merge(&self, left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        (self.file_offset + left.len() == right_value.file_offset).then_some(*self)
    }
    fn split(&self, range: Range, at: u64) -> (Self, Self) {
        (
            *self,
            Backing {
                file_offset: self.file_offset + (at - range.start()),
            },
        )
    }
}

struct SharedState {
    size: u64,
    pages: SegmentSet<Backing>,
    mappers: MapperList,
}

/// A shared memory object whose pages come from the [`MemoryFile`]: every
/// address space that maps it shared sees the same bytes. Pages are
/// allocated on first translation and hold one MemoryFile reference each
/// while the object has them.
///
/// Lock: `state` sits below `AddressSpace.active` (translate is called with
/// it held) and above `MemoryFile.inner`; it is never held while calling an
/// address space.
pub struct SharedMemory {
    memfile: Arc<MemoryFile>,
    state: Mutex<SharedState>,
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("SharedMemory")
            .field("size", &s.size)
            .field("committed_pages", &(s.pages.span() / PAGE_SIZE))
            .field("mappers", &s.mappers.count())
            .finish()
    }
}

impl SharedMemory {
    /// A zero-filled object of `size` bytes (a non-zero multiple of the page
    /// size); nothing is allocated until it is touched.
    pub fn new(memfile: Arc<MemoryFile>, size: u64) -> Result<Arc<SharedMemory>, FileError> {
        Range::pages(0, size).map_err(|_| FileError::BeyondEnd {
            range: Range::EMPTY,
            size,
        })?;
        Ok(Arc::new(SharedMemory {
            memfile,
            state: Mutex::new(SharedState {
                size,
                pages: SegmentSet::new(),
                mappers: MapperList::default(),
            }),
        }))
    }

    /// Bytes of the object that have pages.
    pub fn committed(&self) -> u64 {
        self.lock().pages.span()
    }

    /// Drops the pages of object offsets `range`: every mapper is
    /// invalidated and the range reads as zeros afterwards.
    pub fn decommit(&self, range: Range) -> Result<(), FileError> {
        let (dropped, affected) = {
            let mut s = self.lock();
            if !range.is_page_aligned() || range.end() > s.size {
                return Err(FileError::BeyondEnd {
                    range,
                    size: s.size,
                });
            }
            (s.pages.remove_range(range), s.mappers.affected(range))
        };
        // Mapper pmas hold their own references, so dropping ours after
        // invalidating is safe in either order; invalidate first so no
        // mapper keeps showing the old pages.
        invalidate_all(&affected);
        for (r, b) in dropped {
            self.memfile
                .dec_ref(Range::new_unchecked(b.file_offset, b.file_offset + r.len()))?;
        }
        Ok(())
    }

    /// Changes the object's size; pages past a smaller size are dropped and
    /// their mappers invalidated (later accesses there are bus errors).
    pub fn truncate(&self, new_size: u64) -> Result<(), FileError> {
        if new_size % PAGE_SIZE != 0 {
            return Err(FileError::BeyondEnd {
                range: Range::EMPTY,
                size: new_size,
            });
        }
        // Shrink and drop the pages in one critical section, so a racing
        // translate cannot allocate past the new end in between.
        let (dropped, affected) = {
            let mut s = self.lock();
            let old = std::mem::replace(&mut s.size, new_size);
            if new_size >= old {
                return Ok(());
            }
            let gone = Range::new_unchecked(new_size, old);
            (s.pages.remove_range(gone), s.mappers.affected(gone))
        };
        invalidate_all(&affected);
        for (r, b) in dropped {
            self.memfile
                .dec_ref(Range::new_unchecked(b.file_offset, b.file_offset + r.len()))?;
        }
        Ok(())
    }

    /// MemoryFile references this object holds, as `(file range, refs)`.
    pub fn file_refs(&self) -> Vec<FileRange> {
        self.lock()
            .pages
            .iter()
            .map(|(r, b)| Range::new_unchecked(b.file_offset, b.file_offset + r.len()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (r, b) in s.pages.iter() {
            let fr = Range::new_unchecked(b.file_offset, b.file_offset + r.len());
            if let Err(e) = self.memfile.dec_ref(fr) {
                log::error!("SharedMemory drop: dec_ref {fr} failed: {e}");
            }
        }
    }
}

fn invalidate_all(affected: &[(Weak<dyn MappingSpace>, GuestRange)]) {
    for (space, guest) in affected {
        if let Some(space) = space.upgrade() {
            space.invalidate(*guest, false);
        }
    }
}

impl Mappable for SharedMemory {
    fn size(&self) -> u64 {
        self.lock().size
    }

    fn max_perms(&self) -> Perms {
        Perms::ALL
    }

    fn add_mapping(
        &self,
        space: Weak<dyn MappingSpace>,
        space_id: u64,
        range: GuestRange,
        offset: u64,
    ) {
        self.lock().mappers.add(space, space_id, range, offset);
    }

    fn remove_mapping(&self, space_id: u64, range: GuestRange, _offset: u64) {
        self.lock().mappers.remove(space_id, range);
    }

    fn translate(
        &self,
        required: Range,
        optional: Range,
        _access: Access,
    ) -> Result<Vec<Translation>, FileError> {
        let mut s = self.lock();
        if required.end() > s.size {
            return Err(FileError::BeyondEnd {
                range: required,
                size: s.size,
            });
        }
        let want = optional.intersect(Range::new_unchecked(0, s.size));
        let want = if want.is_superset_of(required) {
            want
        } else {
            required
        };
        // Allocate every hole of `want` (one allocation per hole).
        let holes: Vec<Range> = s.pages.gaps(want).collect();
        for hole in holes {
            let fr = self.memfile.allocate(hole.len(), MemoryKind::Shared)?;
            s.pages
                .insert(
                    hole,
                    Backing {
                        file_offset: fr.start(),
                    },
                )
                .expect("hole is free");
        }
        let file: Arc<dyn File> = self.memfile.clone();
        Ok(s.pages
            .iter_range(want)
            .map(|(r, b)| {
                let source = r.intersect(want);
                Translation {
                    source,
                    file: file.clone(),
                    offset: b.file_offset + (source.start() - r.start()),
                    perms: Perms::ALL,
                }
            })
            .collect())
    }
}

/// A host file (a guest image, a snapshot template, a memfd from the VMM)
/// mapped into guests: privately for copy-on-write, or shared so guest
/// writes reach the file.
///
/// The whole file is mapped once into the VMM for host-side copies. Its
/// pages are the file's own, so references are only counted (for
/// invariant checks), never freed.
pub struct HostFile {
    file: std::fs::File,
    size: u64,
    writable: bool,
    map: crate::memfile::HostMapping,
    refs: Mutex<u64>,
    mappers: Mutex<MapperList>,
    this: Weak<HostFile>,
}

impl fmt::Debug for HostFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostFile")
            .field("size", &self.size)
            .field("writable", &self.writable)
            .finish()
    }
}

impl HostFile {
    /// Wraps an open file. Its size must be a non-zero multiple of the page
    /// size; `writable` says whether it was opened for writing (shared
    /// writable mappings need it).
    pub fn new(file: std::fs::File, writable: bool) -> Result<Arc<HostFile>, FileError> {
        let size = file
            .metadata()
            .map_err(|source| FileError::Host {
                op: "fstat",
                source,
            })?
            .len();
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(FileError::BeyondEnd {
                range: Range::EMPTY,
                size,
            });
        }
        let map = crate::memfile::HostMapping::new(file.as_fd(), size, writable)
            .map_err(|source| FileError::Host { op: "mmap", source })?;
        Ok(Arc::new_cyclic(|this| HostFile {
            file,
            size,
            writable,
            map,
            refs: Mutex::new(0),
            mappers: Mutex::new(MapperList::default()),
            this: this.clone(),
        }))
    }

    /// Page references pmas hold on the file now.
    pub fn refs(&self) -> u64 {
        *self.refs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn perms(&self) -> Perms {
        Perms::new(true, self.writable, true)
    }
}

impl File for HostFile {
    fn inc_ref(&self, range: FileRange) -> Result<(), FileError> {
        *self.refs.lock().unwrap_or_else(|e| e.into_inner()) += range.len() / PAGE_SIZE;
        Ok(())
    }
    fn dec_ref(&self, range: FileRange) -> Result<(), FileError> {
        let mut refs = self.refs.lock().unwrap_or_else(|e| e.into_inner());
        *refs = refs.saturating_sub(range.len() / PAGE_SIZE);
        Ok(())
    }
    fn map_internal(
        &self,
        range: FileRange,
        access: Access,
    ) -> Result<Vec<HostSlice<'_>>, FileError> {
        if range.end() > self.size {
            return Err(FileError::BeyondEnd {
                range,
                size: self.size,
            });
        }
        if access == Access::Write && !self.writable {
            return Err(FileError::Access {
                access,
                allowed: self.perms(),
            });
        }
        let slice = self
            .map
            .slice(range.start(), range.len() as usize, access == Access::Write);
        Ok(vec![slice.ok_or(FileError::BeyondEnd {
            range,
            size: self.size,
        })?])
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Mappable for HostFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn max_perms(&self) -> Perms {
        self.perms()
    }
    fn add_mapping(
        &self,
        space: Weak<dyn MappingSpace>,
        space_id: u64,
        range: GuestRange,
        offset: u64,
    ) {
        self.mappers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(space, space_id, range, offset);
    }
    fn remove_mapping(&self, space_id: u64, range: GuestRange, _offset: u64) {
        self.mappers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(space_id, range);
    }
    fn translate(
        &self,
        required: Range,
        optional: Range,
        _access: Access,
    ) -> Result<Vec<Translation>, FileError> {
        if required.end() > self.size {
            return Err(FileError::BeyondEnd {
                range: required,
                size: self.size,
            });
        }
        let want = optional.intersect(Range::new_unchecked(0, self.size));
        let want = if want.is_superset_of(required) {
            want
        } else {
            required
        };
        let file: Arc<dyn File> = self.this.upgrade().expect("translate on a live HostFile");
        Ok(vec![Translation {
            source: want,
            file,
            offset: want.start(),
            perms: self.perms(),
        }])
    }
}
