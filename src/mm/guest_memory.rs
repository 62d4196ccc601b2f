//! vm-memory integration: [`SpaceMemory`], an address-space handle that
//! implements vm-memory 0.18's [`GuestMemory`], so `Bytes<GuestAddress>`
//! (from vm-memory's blanket impl) and rust-vmm device crates such as
//! virtio-queue work on lazily populated, copy-on-write aware memory.
//!
//! # How an access is served
//!
//! [`GuestMemory::get_slices`] goes through the same path as
//! [`AddressSpace::read_with`] / [`AddressSpace::write_with`]: the whole range
//! is checked first (mapped, and allowed by the guest's protections unless
//! the handle's [`IoOpts`] say otherwise), then populated for the access (a
//! write access breaks copy-on-write first, and re-installs the new pages
//! for the guest), and only then are the slices built. They point straight
//! into the host mappings of the files behind the pmas (the MemoryFile's
//! internal mappings, or a [`HostFile`](super::HostFile)'s): no copy, one
//! [`VolatileSlice`] per host-contiguous piece.
//!
//! # What a slice guarantees, and what it does not
//!
//! - **Memory safety.** A slice's host memory stays mapped for as long as the
//!   slice can exist (it borrows the handle): the handle holds an `Arc` to
//!   the address space, which holds the MemoryFile, whose internal mappings
//!   are only unmapped when it drops; and the handle keeps every other file
//!   it has handed out slices of (e.g. a host file mapped privately) alive
//!   until it is dropped or [`SpaceMemory::release_files`] is called.
//! - **Not stability.** Nothing stops another thread from unmapping,
//!   decommitting or re-protecting the guest range while a device holds a
//!   slice: the pages may then be freed and handed to another allocation, so
//!   a late write through the slice lands in memory the guest no longer sees
//!   there (or that now belongs to someone else). This is the contract of
//!   DMA without a pin, as on real hardware. A device that keeps slices
//!   across such events must [`pin`](SpaceMemory::pin) the range first: its
//!   pages then stay allocated until unpinned.
//! - **Permissions are a promise of the caller.** A slice obtained for
//!   [`Permissions::Read`] may point at copy-on-write pages shared with a
//!   fork or a host file; writing through it is a bug that corrupts them (and
//!   faults the process if the host file was opened read-only), as with a
//!   vm-memory region mapped `PROT_READ`. Ask for `Write` to write.
//! - **Dirty tracking.** The bitmap type is `()`: writes through slices are
//!   host writes into the MemoryFile and are not seen by KVM's dirty log.

use std::sync::{Arc, Mutex};

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryResult, Permissions,
    VolatileSlice,
};

use super::io::{IoOpts, Pin};
use super::mappable::File;
use super::{AddressSpace, MmError};
use crate::perms::Access;
use crate::range::{align_up, page_round_down, Range, PAGE_SIZE};

/// The guest memory of an [`AddressSpace`] as vm-memory sees it.
///
/// Accesses populate what they touch and break copy-on-write for writes,
/// exactly like [`AddressSpace::write_with`]; see the [module
/// docs](self) for what the returned slices guarantee.
///
/// ```
/// # use std::sync::Arc;
/// # use guestmm::memfile::{MemoryFile, MemoryFileOptions};
/// # use guestmm::mm::{AddressSpace, AddressSpaceOptions, MapOpts, NoopBackend};
/// use guestmm::mm::SpaceMemory;
/// use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let memfile = Arc::new(MemoryFile::new("doc", MemoryFileOptions::default())?);
/// # let space = AddressSpace::new(memfile, Arc::new(NoopBackend), AddressSpaceOptions::default())?;
/// let base = space.map(MapOpts::anonymous(4 << 20).fixed(1 << 30))?;
/// let mem = SpaceMemory::new(space.clone());
/// assert_eq!(space.stats().populated_bytes, 0, "nothing populated yet");
///
/// // A u64 that straddles a page boundary: populated on first touch.
/// let at = GuestAddress(base + 4096 - 4);
/// mem.write_obj(0x0123_4567_89ab_cdef_u64, at)?;
/// assert_eq!(mem.read_obj::<u64>(at)?, 0x0123_4567_89ab_cdef);
/// assert!(space.stats().populated_bytes > 0);
///
/// // Unmapped memory is an error, not a panic.
/// assert!(mem.read_obj::<u32>(GuestAddress(base + (4 << 20))).is_err());
/// assert!(!mem.check_range(GuestAddress(base + (4 << 20)), 4, Permissions::Read));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SpaceMemory {
    space: Arc<AddressSpace>,
    opts: IoOpts,
    /// Files other than the space's MemoryFile that slices were handed out
    /// of, kept alive (and so mapped) while those slices may exist: until
    /// the handle drops or `release_files` takes `&mut self`. A leaf lock,
    /// never held while calling anything else.
    files: Mutex<Vec<Arc<dyn File>>>,
}

impl Clone for SpaceMemory {
    /// A handle on the same space with the same options. The clone keeps
    /// its own files alive: slices borrow the handle they came from.
    fn clone(&self) -> Self {
        SpaceMemory::with_opts(self.space.clone(), self.opts)
    }
}

impl SpaceMemory {
    /// A handle whose accesses respect the guest's protections (what a
    /// device doing DMA should see).
    pub fn new(space: Arc<AddressSpace>) -> SpaceMemory {
        SpaceMemory::with_opts(space, IoOpts::default())
    }

    /// A handle with explicit I/O options (e.g. [`IoOpts::FORCE`] for a
    /// loader that writes read-only guest memory).
    pub fn with_opts(space: Arc<AddressSpace>, opts: IoOpts) -> SpaceMemory {
        SpaceMemory {
            space,
            opts,
            files: Mutex::new(Vec::new()),
        }
    }

    /// The address space behind the handle.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// The handle's I/O options.
    pub fn opts(&self) -> IoOpts {
        self.opts
    }

    /// Lets go of the files this handle kept alive for slices it handed out
    /// (`&mut self` proves no such slice is still borrowed).
    pub fn release_files(&mut self) {
        self.files
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Populates `count` bytes at `addr` for `access` and holds their pages
    /// until [`unpin`](Self::unpin), so slices of the range stay backed by
    /// the same pages even if the guest unmaps it (see
    /// [`AddressSpace::pin`]).
    pub fn pin(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<Pin> {
        self.space
            .pin(addr.0, count as u64, access_of(access), self.opts)
            .map_err(|e| guest_error(addr, e))
    }

    /// Releases a pin taken with [`pin`](Self::pin).
    pub fn unpin(&self, pin: Pin) -> GuestMemoryResult<()> {
        let at = GuestAddress(pin.range().start());
        self.space.unpin(pin).map_err(|e| guest_error(at, e))
    }

    /// Host pieces `(address, length)` of `count` bytes at `addr`,
    /// populated for `access`; the files behind them are kept alive by
    /// `self` (module docs).
    fn host_pieces(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Access,
    ) -> Result<Vec<(*mut u8, usize)>, MmError> {
        let mut pieces: Vec<(*mut u8, usize)> = Vec::new();
        let mut foreign: Vec<Arc<dyn File>> = Vec::new();
        let memfile = Arc::as_ptr(self.space.memfile()) as *const u8;
        self.space
            .with_pieces(addr.0, count, access, self.opts, |p| {
                // Called with the space's locks held: the pma holds the
                // pages and `p.file` is alive.
                if !std::ptr::addr_eq(Arc::as_ptr(&p.file), memfile)
                    && !foreign.iter().any(|f| Arc::ptr_eq(f, &p.file))
                {
                    foreign.push(p.file.clone());
                }
                for s in p.file.map_internal(p.file_range(), access)? {
                    match pieces.last_mut() {
                        // Host-contiguous with the previous piece: one slice.
                        Some((ptr, len)) if ptr.wrapping_add(*len) == s.as_ptr() => *len += s.len(),
                        _ => pieces.push((s.as_ptr(), s.len())),
                    }
                }
                Ok(())
            })?;
        if !foreign.is_empty() {
            let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            for f in foreign {
                if !files.iter().any(|g| Arc::ptr_eq(g, &f)) {
                    files.push(f);
                }
            }
        }
        Ok(pieces)
    }

    /// Whether `count` bytes at `addr` are mapped and allow `access`,
    /// populating nothing.
    fn check(&self, addr: GuestAddress, count: usize, access: Option<Access>) -> bool {
        let Ok(range) = Range::from_len(addr.0, count as u64) else {
            return false;
        };
        let Some(end) = align_up(range.end(), PAGE_SIZE) else {
            return false;
        };
        let pages = Range::new_unchecked(page_round_down(range.start()), end);
        if self.space.check_in_space(pages).is_err() {
            return false;
        }
        let mapping = self.space.read_mapping();
        match access {
            None => mapping.vmas.gaps(pages).next().is_none(),
            Some(access) => self
                .space
                .check_io_locked(&mapping, pages, range, access, self.opts)
                .is_ok(),
        }
    }
}

/// The access that populates for `perms`: anything that may write is a
/// write (it must break copy-on-write); `No` is treated as a read.
fn access_of(perms: Permissions) -> Access {
    if perms.has_write() {
        Access::Write
    } else {
        Access::Read
    }
}

/// Maps an mm error of an access at `addr` to vm-memory's error type.
pub(super) fn guest_error(addr: GuestAddress, e: MmError) -> GuestMemoryError {
    use std::io::{Error, ErrorKind};
    match e {
        MmError::NotMapped { range, gap } => {
            GuestMemoryError::InvalidGuestAddress(GuestAddress(gap.start().max(range.start())))
        }
        MmError::OutOfSpace { limit, .. } => {
            GuestMemoryError::InvalidGuestAddress(GuestAddress(limit.max(addr.0)))
        }
        MmError::Range(_) => GuestMemoryError::GuestAddressOverflow,
        MmError::Fault(super::FaultError::Unmapped { gpa, .. }) => {
            GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa))
        }
        e @ (MmError::Permission { .. } | MmError::Fault(super::FaultError::Permission { .. })) => {
            GuestMemoryError::IOError(Error::new(ErrorKind::PermissionDenied, e))
        }
        e => GuestMemoryError::IOError(Error::other(e)),
    }
}

/// The slices of one [`SpaceMemory::get_slices`] call. Every check and all
/// populating happen before it is returned, so its items are never errors.
#[derive(Debug)]
struct Slices<'a> {
    inner: std::vec::IntoIter<VolatileSlice<'a>>,
}

impl<'a> Iterator for Slices<'a> {
    type Item = GuestMemoryResult<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(Ok)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl std::iter::FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {}

impl GuestMemory for SpaceMemory {
    /// No vm-memory backend describes a lazily populated space:
    /// [`physical_memory`](GuestMemory::physical_memory) returns `None`.
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    /// True if every byte is mapped and (unless the handle ignores
    /// permissions) the protections allow `access` (`No`: mapped at all).
    /// Nothing is populated, so an object that has no page there (beyond
    /// its end) can still fail the access later.
    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if count == 0 {
            return true;
        }
        let access = match access {
            Permissions::No => None,
            p => Some(access_of(p)),
        };
        self.check(addr, count, access)
    }

    /// Populates the range for `access` (breaking copy-on-write for writes)
    /// and returns slices into the host mappings of the pages behind it.
    ///
    /// Errors (the whole range is checked before anything is populated):
    /// [`InvalidGuestAddress`](GuestMemoryError::InvalidGuestAddress) at the
    /// first unmapped byte, [`GuestAddressOverflow`](GuestMemoryError::GuestAddressOverflow),
    /// or [`IOError`](GuestMemoryError::IOError) (`PermissionDenied` when
    /// the guest's protection forbids the access; `Other` when populating
    /// failed).
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        let pieces = self
            .host_pieces(addr, count, access_of(access))
            .map_err(|e| guest_error(addr, e))?;
        let slices: Vec<VolatileSlice<'a>> = pieces
            .into_iter()
            .map(|(ptr, len)| {
                // SAFETY: `ptr..ptr + len` lies in host mappings of files
                // that stay mapped for `'a`: the space's MemoryFile unmaps
                // its internal mappings only when dropped, and `self` holds
                // the space (which holds it); any other file is kept alive by
                // `self.files`, which is only cleared through `&mut self`.
                // Every other access to guest memory (the guest itself,
                // host copies) is a raw, racy copy, never a Rust reference,
                // as VolatileSlice requires. The pages themselves may be
                // freed by a concurrent unmap: that is the unpinned-DMA
                // contract documented on the module, not a dangling mapping.
                unsafe { VolatileSlice::new(ptr, len) }
            })
            .collect();
        Ok(Slices {
            inner: slices.into_iter(),
        })
    }
}

impl AddressSpace {
    /// A vm-memory handle on this space (see [`SpaceMemory`]).
    pub fn guest_memory(self: &Arc<Self>, opts: IoOpts) -> SpaceMemory {
        SpaceMemory::with_opts(self.clone(), opts)
    }
}
