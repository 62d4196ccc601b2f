//! A region-based vm-memory view of an address space: [`SpaceRegions`]
//! implements vm-memory 0.18's [`GuestMemoryBackend`] (and so, through
//! vm-memory's blanket impls, `GuestMemory` and `Bytes<GuestAddress>`), which
//! is what linux-loader's kernel loaders and boot configurators,
//! `load_cmdline`, and other rust-vmm crates that want "physical" memory ask
//! for. [`SpaceMemory`](super::SpaceMemory) implements only the slice-based
//! `GuestMemory` and does not satisfy them.
//!
//! # Regions
//!
//! Each region is one run of contiguous vmas at the time the view was built
//! (the layout is a snapshot: build a new view after `map`/`unmap`; an access
//! to a range unmapped since then fails). vm-memory wants each region to be
//! one host-contiguous block, while a lazily populated space has no host
//! address for memory nobody touched yet, and its populated pages sit
//! anywhere in the memory file. So each region reserves host address space
//! of its size (`PROT_NONE`, no memory), and an access maps the file pages
//! that back what it touches into the reservation at their guest offsets
//! (`MAP_SHARED | MAP_FIXED` of the file's fd) before handing out a slice.
//! Pages already shown there from the same file offsets are not mapped
//! again.
//!
//! # What an access populates
//!
//! vm-memory's region API does not say whether a slice will be read or
//! written, so every access through the view, read or write, is served as a
//! host **write** of the pages it touches (page granular, nothing around
//! them: no fault-around):
//!
//! - unpopulated pages are populated (anonymous ones zero-filled, objects'
//!   pages translated), exactly as [`AddressSpace::write_with`] would;
//! - copy-on-write is broken on them: a read through the view of a page
//!   shared with a fork or a private host-file mapping copies it;
//! - protections: with the default [`IoOpts`] the guest's current
//!   protections must allow **writing** the whole range (a read of
//!   read-only guest memory through the view is refused); with
//!   [`IoOpts::FORCE`] they are ignored, as a loader writing a ROM needs;
//! - nothing is installed in the backend (no memslot changes), except that
//!   breaking copy-on-write re-installs the new pages as a fault would. Use
//!   [`AddressSpace::install_populated`] before the first run so the guest
//!   does not fault again on what the view populated.
//!
//! Checks ([`GuestMemoryBackend::check_range`], `find_region`, `last_addr`)
//! populate nothing.
//!
//! # What a slice guarantees
//!
//! As for [`SpaceMemory`](super::SpaceMemory): the host memory behind a slice
//! stays mapped while the slice can exist (it borrows the view, which owns
//! the reservation), but nothing keeps the guest from unmapping or
//! decommitting the range meanwhile; a late access then sees pages the
//! guest no longer has there. The view shows the pages current at each
//! access: a slice taken earlier may keep showing pages a later
//! copy-on-write break replaced until the range is accessed through the
//! view again. Writes through slices are not seen by KVM's dirty log.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vm_memory::bitmap::BS;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestUsize, MemoryRegionAddress, VolatileSlice,
};

use super::guest_memory::guest_error;
use super::io::IoOpts;
use super::mappable::{File, FileError};
use super::{AddressSpace, MmError};
use crate::perms::Access;
use crate::range::{align_up, page_round_down, GuestRange, Range, PAGE_SIZE};
use crate::segment::{SegmentSet, SegmentValue};

/// File pages mapped at a place of a region's reservation.
#[derive(Clone, Debug)]
struct Shown {
    /// Kept alive so its identity (the `Arc` pointer) stays unique while
    /// the cache names it.
    file: Arc<dyn File>,
    /// File offset of the segment's start.
    offset: u64,
}

impl Shown {
    fn same_file(&self, file: &Arc<dyn File>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.file), Arc::as_ptr(file))
    }
}

impl SegmentValue for Shown {
    fn merge(&self, left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        (self.same_file(&right_value.file) && self.offset + left.len() == right_value.offset)
            .then(|| self.clone())
    }
    fn split(&self, range: Range, at: u64) -> (Self, Self) {
        let right = Shown {
            file: self.file.clone(),
            offset: self.offset + (at - range.start()),
        };
        (self.clone(), right)
    }
}

/// Host address space reserved for a region: `PROT_NONE`, no memory, until
/// file pages are mapped over parts of it.
#[derive(Debug)]
struct Reservation {
    /// Host address (as an integer: the region is shared between threads;
    /// every access goes through `VolatileSlice`).
    addr: usize,
    len: usize,
}

impl Reservation {
    fn new(len: u64) -> Result<Reservation, MmError> {
        let host_err = |source| {
            MmError::File(FileError::Host {
                op: "mmap (region reservation)",
                source,
            })
        };
        let len = usize::try_from(len).map_err(|_| host_err(std::io::Error::other("too large")))?;
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address the
        // kernel picks; it overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host_err(std::io::Error::last_os_error()));
        }
        Ok(Reservation {
            addr: p as usize,
            len,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the reservation was mapped by `new` and is only unmapped
        // here; slices into it borrow the region that owns it, so none is
        // alive.
        let rc = unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        if rc != 0 {
            log::error!(
                "munmap of a region reservation: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// One region of a [`SpaceRegions`] view: a run of contiguous vmas.
#[derive(Debug)]
pub struct SpaceRegion {
    space: Arc<AddressSpace>,
    opts: IoOpts,
    range: GuestRange,
    reservation: Reservation,
    /// What file pages the reservation shows, by region offset. A leaf
    /// lock below `AddressSpace.active`: taken only inside `with_pieces`
    /// (the space's `mapping` and `active` held), never held while calling
    /// anything else.
    shown: Mutex<SegmentSet<Shown>>,
}

impl SpaceRegion {
    /// The guest-physical range of the region.
    pub fn range(&self) -> GuestRange {
        self.range
    }

    /// Populates region offsets `[start, end)` for writing (whole pages)
    /// and maps the file pages behind them into the reservation.
    fn show(&self, start: u64, end: u64) -> Result<(), MmError> {
        let first = page_round_down(start);
        let last = align_up(end, PAGE_SIZE).expect("inside a page-aligned region");
        let gpa = self.range.start() + first;
        self.space.with_pieces(
            gpa,
            (last - first) as usize,
            Access::Write,
            self.opts,
            |p| {
                // Called with the space's locks held: the pma holds the
                // pages, and no other access can change them meanwhile, so
                // two accesses never map stale pages over fresh ones.
                let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
                let at = first + p.buf_offset as u64;
                let r = Range::new_unchecked(at, at + p.len as u64);
                let current = shown.gaps(r).next().is_none()
                    && shown.iter_range(r).all(|(sr, s)| {
                        let from = r.start().max(sr.start());
                        s.same_file(&p.file)
                            && s.offset + (from - sr.start()) == p.file_offset + (from - r.start())
                    });
                if current {
                    return Ok(());
                }
                self.map_file(r, &p.file, p.file_offset)?;
                shown.remove_range(r);
                shown
                    .insert(
                        r,
                        Shown {
                            file: p.file.clone(),
                            offset: p.file_offset,
                        },
                    )
                    .expect("range was just cleared");
                Ok(())
            },
        )
    }

    /// Maps `file` from `offset` over region offsets `r` (page aligned).
    fn map_file(&self, r: Range, file: &Arc<dyn File>, offset: u64) -> Result<(), MmError> {
        let host_err = |source| MmError::File(FileError::Host { op: "mmap", source });
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| host_err(std::io::Error::other("file offset too large")))?;
        let at = self.reservation.addr + r.start() as usize;
        // SAFETY: `at..at + len` lies inside our own reservation (`r` is a
        // sub-range of the region); MAP_FIXED replaces only pages of it.
        // Slices into the replaced pages stay valid memory (the new pages
        // are mapped in the same atomic call).
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                r.len() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.fd().as_raw_fd(),
                file_offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host_err(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl GuestMemoryRegion for SpaceRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.range.len()
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.range.start())
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    /// Populates `count` bytes at `offset` as a host write (module docs) and
    /// returns them as one slice of the region's host mapping.
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::GuestMemoryResult<VolatileSlice<'_, BS<'_, ()>>> {
        let start = offset.raw_value();
        let end = start
            .checked_add(count as u64)
            .filter(|&e| e <= self.range.len())
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        if count > 0 {
            self.show(start, end)
                .map_err(|e| guest_error(GuestAddress(self.range.start() + start), e))?;
        }
        // SAFETY: `start..end` lies in the reservation, which stays mapped
        // for as long as `self` (which the slice borrows) lives, and which
        // `show` just covered with file pages (writable, MAP_SHARED). Other
        // accesses to these pages (the guest, host copies, other slices)
        // are racy raw copies, never Rust references, as VolatileSlice
        // requires.
        Ok(unsafe {
            VolatileSlice::new((self.reservation.addr + start as usize) as *mut u8, count)
        })
    }
}

impl GuestMemoryRegionBytes for SpaceRegion {}

/// An [`AddressSpace`] as vm-memory's region-based
/// [`GuestMemoryBackend`]: what linux-loader and other rust-vmm crates that
/// want physical memory take. See the [module docs](self) for what an
/// access populates and whether protections are respected.
///
/// ```
/// # use std::sync::Arc;
/// # use guestmm::memfile::{MemoryFile, MemoryFileOptions};
/// # use guestmm::mm::{AddressSpace, AddressSpaceOptions, IoOpts, MapOpts, NoopBackend};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let memfile = Arc::new(MemoryFile::new("doc", MemoryFileOptions::default())?);
/// # let space = AddressSpace::new(memfile, Arc::new(NoopBackend), AddressSpaceOptions::default())?;
/// let base = space.map(MapOpts::anonymous(64 << 20).fixed(1 << 30))?;
/// let mem = space.regions(IoOpts::FORCE)?;
/// assert_eq!(mem.num_regions(), 1);
/// assert_eq!(mem.last_addr(), GuestAddress(base + (64 << 20) - 1));
/// mem.write_slice(b"hello", GuestAddress(base + 0x1234))?;
/// // One page populated, nothing else.
/// assert_eq!(space.stats().populated_bytes, 4096);
/// let mut buf = [0u8; 5];
/// mem.read_slice(&mut buf, GuestAddress(base + 0x1234))?;
/// assert_eq!(&buf, b"hello");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SpaceRegions {
    space: Arc<AddressSpace>,
    opts: IoOpts,
    /// Sorted, non-overlapping, non-adjacent.
    regions: Vec<SpaceRegion>,
}

impl SpaceRegions {
    /// A view of every vma of `space` as it is now, with I/O options
    /// `opts` ([`IoOpts::FORCE`] for a loader that writes read-only guest
    /// memory).
    ///
    /// Errors: reserving host address space for a region failed.
    pub fn new(space: Arc<AddressSpace>, opts: IoOpts) -> Result<SpaceRegions, MmError> {
        let runs: Vec<GuestRange> = {
            let mapping = space.read_mapping();
            let mut runs: Vec<GuestRange> = Vec::new();
            for (vr, _) in mapping.vmas.iter() {
                match runs.last_mut() {
                    Some(last) if last.end() == vr.start() => {
                        *last = Range::new_unchecked(last.start(), vr.end())
                    }
                    _ => runs.push(vr),
                }
            }
            runs
        };
        let regions = runs
            .into_iter()
            .map(|range| {
                Ok(SpaceRegion {
                    space: space.clone(),
                    opts,
                    range,
                    reservation: Reservation::new(range.len())?,
                    shown: Mutex::new(SegmentSet::new()),
                })
            })
            .collect::<Result<Vec<_>, MmError>>()?;
        Ok(SpaceRegions {
            space,
            opts,
            regions,
        })
    }

    /// The address space behind the view.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// The view's I/O options.
    pub fn opts(&self) -> IoOpts {
        self.opts
    }
}

impl GuestMemoryBackend for SpaceRegions {
    type R = SpaceRegion;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&SpaceRegion> {
        let i = self
            .regions
            .partition_point(|r| r.range.end() <= addr.raw_value());
        self.regions
            .get(i)
            .filter(|r| r.range.contains(addr.raw_value()))
    }

    fn iter(&self) -> impl Iterator<Item = &SpaceRegion> {
        self.regions.iter()
    }

    /// True if `[base, base + len)` lies in the view's regions, is mapped
    /// now and (unless the view ignores protections) may be written.
    /// Populates nothing.
    fn check_range(&self, base: GuestAddress, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let Ok(bytes) = Range::from_len(base.raw_value(), len as u64) else {
            return false;
        };
        if !self
            .find_region(base)
            .is_some_and(|r| r.range.is_superset_of(bytes))
        {
            return false;
        }
        let pages = Range::new_unchecked(
            page_round_down(bytes.start()),
            align_up(bytes.end(), PAGE_SIZE).expect("inside a page-aligned region"),
        );
        let mapping = self.space.read_mapping();
        self.space
            .check_io_locked(&mapping, pages, bytes, Access::Write, self.opts)
            .is_ok()
    }
}

impl AddressSpace {
    /// A region-based vm-memory view of this space (see [`SpaceRegions`]).
    pub fn regions(self: &Arc<Self>, opts: IoOpts) -> Result<SpaceRegions, MmError> {
        SpaceRegions::new(self.clone(), opts)
    }
}
