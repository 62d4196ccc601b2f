//! `HostFile`: a file from the VMM mapped into guests.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, Weak};

use super::mappable::{
    translation_window, File, FileError, Mappable, MapperList, MappingSpace, Translation,
};
use crate::memfile::HostSlice;
use crate::perms::{Access, Perms};
use crate::range::{FileRange, GuestRange, Range, PAGE_SIZE};

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
            return Err(FileError::BadSize { size });
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
        let want = translation_window(required, optional, self.size)?;
        let file: Arc<dyn File> = self.this.upgrade().expect("translate on a live HostFile");
        Ok(vec![Translation {
            source: want,
            file,
            offset: want.start(),
            perms: self.perms(),
        }])
    }
}
