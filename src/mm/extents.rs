//! What backs each guest range ([`AddressSpace::extents`]), and making what
//! host I/O populated visible to the guest
//! ([`AddressSpace::install_populated`]).
//!
//! An extent is the unit a vhost-user memory table, a sparse snapshot or a
//! core dump works with: a guest range, the file and offset behind it if it
//! is populated, and what may be done with it. Lazily populated memory has
//! no backing until something touches it: an unpopulated extent has no fd
//! (anonymous memory and objects allocate pages only when populated), and a
//! backing can change later (a copy-on-write break moves pages to new file
//! offsets, an unmap or decommit drops them). A listing is a snapshot, true
//! at the moment it was taken.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::mappable::File;
use super::{AddressSpace, MmError};
use crate::perms::Perms;
use crate::range::{FileRange, GuestRange, Range, RangeError};

/// The file pages behind a populated [`Extent`].
#[derive(Debug, Clone)]
pub struct ExtentBacking {
    /// The file holding the pages: the space's MemoryFile (a memfd), or a
    /// [`HostFile`](super::HostFile). Held, so [`fd`](Self::fd) stays open.
    pub file: Arc<dyn File>,
    /// File offset of the extent's first byte.
    pub offset: u64,
    /// The pages belong to the space's MemoryFile (anonymous memory, shared
    /// objects, copies), not to a host file.
    pub memfile: bool,
    /// The pages are shared copy-on-write (with a fork, or a private
    /// mapping's object): a guest write copies them first, and writing them
    /// through the fd would change what others see.
    pub cow: bool,
    /// Writing the pages through the fd is what a guest write would do: the
    /// object allows writing and they are not copy-on-write.
    pub writable: bool,
    /// Bytes of the extent resident in memory (`mincore`), for MemoryFile
    /// pages; `None` for a host file's (not scanned).
    pub committed: Option<u64>,
}

impl ExtentBacking {
    /// The descriptor to mmap (e.g. to pass to a vhost-user backend; `dup`
    /// it to keep it beyond the extent).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.fd()
    }
}

/// One guest range with uniform backing (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Extent {
    /// Guest-physical range (page aligned, non-empty).
    pub range: GuestRange,
    /// The guest's current protection over the range.
    pub perms: Perms,
    /// The most the vma may ever grant.
    pub max_perms: Perms,
    /// The vma is private (copy-on-write) rather than shared.
    pub private: bool,
    /// The vma's name.
    pub name: Arc<str>,
    /// The file pages behind the range, or `None` if it is not populated.
    pub backing: Option<ExtentBacking>,
}

impl Extent {
    /// Whether the range is populated.
    pub fn is_populated(&self) -> bool {
        self.backing.is_some()
    }

    /// The fd and file range behind the extent, if populated.
    pub fn file_range(&self) -> Option<(BorrowedFd<'_>, FileRange)> {
        self.backing.as_ref().map(|b| {
            (
                b.fd(),
                Range::new_unchecked(b.offset, b.offset + self.range.len()),
            )
        })
    }

    /// Whether `next` continues this extent (adjacent, same attributes,
    /// same file at the next offset).
    fn continued_by(&self, next: &Extent) -> bool {
        let backing = match (&self.backing, &next.backing) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                std::ptr::addr_eq(Arc::as_ptr(&a.file), Arc::as_ptr(&b.file))
                    && a.offset + self.range.len() == b.offset
                    && a.cow == b.cow
                    && a.writable == b.writable
            }
            _ => false,
        };
        backing
            && self.range.end() == next.range.start()
            && self.perms == next.perms
            && self.max_perms == next.max_perms
            && self.private == next.private
            && self.name == next.name
    }
}

impl AddressSpace {
    /// Checks an extent-style range argument: non-empty, page aligned,
    /// inside the space.
    fn check_extent_range(&self, range: GuestRange) -> Result<(), MmError> {
        if range.is_empty() {
            return Err(RangeError::Empty {
                start: range.start(),
            }
            .into());
        }
        if !range.is_page_aligned() {
            return Err(RangeError::Unaligned { range }.into());
        }
        self.check_in_space(range)
    }

    /// The extents of the mapped parts of `range`, in address order: one per
    /// maximal run with the same vma attributes, protection and backing
    /// (populated runs are contiguous in one file). Unmapped parts of
    /// `range` are left out. Populates nothing; counting committed bytes
    /// scans residency (`mincore`) of the populated MemoryFile pages.
    ///
    /// Errors: `range` is empty ([`RangeError::Empty`]), not page aligned
    /// ([`RangeError::Unaligned`]) or reaches past the space
    /// ([`MmError::OutOfSpace`]).
    pub fn extents(&self, range: GuestRange) -> Result<Vec<Extent>, MmError> {
        self.check_extent_range(range)?;
        let mapping = self.read_mapping();
        let active = self.lock_active();
        let memfile = Arc::as_ptr(&self.memfile) as *const u8;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(last) if last.continued_by(&e) => {
                last.range = Range::new_unchecked(last.range.start(), e.range.end())
            }
            _ => out.push(e),
        };
        for (vr, vma) in mapping.vmas.iter_range(range) {
            for region in vma.protection.regions(vr, vr.intersect(range)) {
                let extent = |range, backing| Extent {
                    range,
                    perms: region.perms,
                    max_perms: vma.max_perms,
                    private: vma.private,
                    name: vma.name.clone(),
                    backing,
                };
                // Pmas and the holes between them, in address order.
                let mut at = region.range.start();
                for (pr, pma) in active.pmas.iter_range(region.range) {
                    let part = pr.intersect(region.range);
                    if at < part.start() {
                        push(extent(Range::new_unchecked(at, part.start()), None));
                    }
                    let backing = ExtentBacking {
                        file: pma.file.clone(),
                        offset: pma.file_range(pr, part).start(),
                        memfile: std::ptr::addr_eq(Arc::as_ptr(&pma.file), memfile),
                        cow: pma.need_cow,
                        writable: pma.max_perms.write && !pma.need_cow,
                        committed: None,
                    };
                    push(extent(part, Some(backing)));
                    at = part.end();
                }
                if at < region.range.end() {
                    push(extent(Range::new_unchecked(at, region.range.end()), None));
                }
            }
        }
        drop(active);
        drop(mapping);
        // Residency is a property of the file pages, not of the locks: scan
        // after releasing them.
        for e in &mut out {
            let len = e.range.len();
            if let Some(b) = e.backing.as_mut().filter(|b| b.memfile) {
                let fr = Range::new_unchecked(b.offset, b.offset + len);
                b.committed = Some(self.memfile.committed_in(&[fr])?);
            }
        }
        Ok(out)
    }

    /// Makes every populated page in `range` visible to the guest through
    /// the backend (KVM memslots), with the writability each protection
    /// allows, as a fault on it would; unpopulated pages stay unpopulated
    /// and invisible, and nothing is allocated or copied. Returns the bytes
    /// handed to the backend (populated bytes whose protection allows
    /// reading; the rest stay invisible, as after a fault).
    ///
    /// Host I/O ([`write_with`](Self::write_with), vm-memory views, loaders)
    /// populates memory without installing it; call this before the first
    /// run so the guest does not fault on it again. Installing what is
    /// already installed is harmless.
    ///
    /// Errors: a bad `range` as for [`extents`](Self::extents); the backend
    /// refused (e.g. out of memslots): what was installed before stays.
    pub fn install_populated(&self, range: GuestRange) -> Result<u64, MmError> {
        self.check_extent_range(range)?;
        let mapping = self.read_mapping();
        let active = self.lock_active();
        let mut bytes = 0;
        for (vr, vma) in mapping.vmas.iter_range(range) {
            let part = vr.intersect(range);
            let populated: Vec<GuestRange> = active
                .pmas
                .iter_range(part)
                .map(|(pr, _)| pr.intersect(part))
                .collect();
            for p in populated {
                self.install_locked(&active, vr, vma, p)?;
                bytes += vma
                    .protection
                    .regions(vr, p)
                    .filter(|r| r.perms.read)
                    .map(|r| r.range.len())
                    .sum::<u64>();
            }
        }
        log::debug!(
            "space {}: installed {bytes:#x} populated bytes in {range}",
            self.id
        );
        Ok(bytes)
    }
}
