//! `SharedMemory`: a memory object whose pages every mapper shares.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use super::mappable::{
    translation_window, File, FileError, Mappable, MapperList, MappingSpace, Translation,
};
use crate::memfile::{MemoryFile, MemoryKind};
use crate::perms::{Access, Perms};
use crate::range::{FileRange, GuestRange, Range, PAGE_SIZE};
use crate::segment::{SegmentSet, SegmentValue};

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
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(FileError::BadSize { size });
        }
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
            if !range.is_page_aligned() {
                return Err(crate::range::RangeError::Unaligned { range }.into());
            }
            if range.end() > s.size {
                return Err(FileError::BeyondEnd {
                    range,
                    size: s.size,
                });
            }
            (s.pages.remove_range(range), s.mappers.affected(range))
        };
        self.release(dropped, &affected)
    }

    /// Changes the object's size; pages past a smaller size are dropped and
    /// every mapping of them goes, private copy-on-write copies included
    /// (later accesses there are bus errors, as on Linux; growing again
    /// shows zeros). Unlike [`decommit`](Self::decommit), which keeps
    /// private copies as hole punching does.
    pub fn truncate(&self, new_size: u64) -> Result<(), FileError> {
        if new_size % PAGE_SIZE != 0 {
            return Err(FileError::BadSize { size: new_size });
        }
        // Shrink and drop the pages in one critical section, so a racing
        // translate cannot allocate past the new end in between.
        let (dropped, gone) = {
            let mut s = self.lock();
            let old = std::mem::replace(&mut s.size, new_size);
            if new_size >= old {
                return Ok(());
            }
            let gone = Range::new_unchecked(new_size, old);
            (s.pages.remove_range(gone), gone)
        };
        // Private copies past the end go too: each space drops what its
        // vmas of this object show past `new_size`, checked against its own
        // vmas (a mapper record may be stale by now). A space forked from
        // one before that one was told inherits its copies; fork records the
        // child as a mapper before the parent can be told, so asking again
        // until no new mapper appears reaches every copy.
        let mut told: Vec<(u64, GuestRange)> = Vec::new();
        loop {
            let fresh: Vec<_> = self
                .lock()
                .mappers
                .affected_by_id(gone)
                .into_iter()
                .filter(|(id, _, g)| !told.contains(&(*id, *g)))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for (id, space, guest) in fresh {
                if let Some(space) = space.upgrade() {
                    space.truncated(self, guest, new_size);
                }
                told.push((id, guest));
            }
        }
        self.drop_refs(dropped)
    }

    /// Invalidates the mappers of pages just removed from the object, then
    /// drops the object's references on them. Mapper pmas hold their own
    /// references, so either order is safe; invalidating first means no
    /// mapper keeps showing the old pages.
    ///
    /// Preconditions: the object's lock is not held.
    fn release(
        &self,
        dropped: Vec<(Range, Backing)>,
        affected: &[(Weak<dyn MappingSpace>, GuestRange)],
    ) -> Result<(), FileError> {
        invalidate_all(affected);
        self.drop_refs(dropped)
    }

    /// Drops the object's references on pages it no longer holds.
    fn drop_refs(&self, dropped: Vec<(Range, Backing)>) -> Result<(), FileError> {
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
        let want = translation_window(required, optional, s.size)?;
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
