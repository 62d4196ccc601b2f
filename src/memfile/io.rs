//! Host-side access to the file through its internal mappings.
//!
//! The file is mapped `MAP_SHARED`, read-write, in `chunk_size` chunks, each
//! on first use and kept until the [`MemoryFile`] is dropped. Chunks are
//! separate mappings, so a byte range that crosses a chunk boundary is served
//! as several host slices.
//!
//! # Copies race with the guest, by design
//!
//! Guest vCPUs (and other mappings of the fd) may write the same bytes while
//! the host copies them. The copies here are raw pointer copies
//! (`ptr::copy_nonoverlapping`), like a device doing DMA: a byte read while
//! the guest writes it may be old or new, and no Rust reference (`&[u8]`) to
//! guest memory is ever created or held across such writes. Callers that need
//! a consistent view must arrange it with the guest, as hardware would.
//!
//! The mappings stay valid until drop, so a copy can never touch unmapped
//! memory, even if the range is freed concurrently. A caller should
//! nonetheless hold a reference on the range it accesses: a freed range may
//! be punched out or handed to another allocation under its feet.

use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use super::{sys, Inner, MemoryFile, MemoryFileError};
use crate::perms::Access;
use crate::range::{FileRange, Range};

/// One internal mapping of `chunk_size` bytes of the file.
///
/// Invariant: `addr` is the start of a live `MAP_SHARED` read-write mapping
/// of `chunk_size` bytes of the file at `index * chunk_size`, made by
/// `sys::mmap_shared`; only [`MemoryFile`]'s `Drop` unmaps it.
#[derive(Debug)]
pub(super) struct Chunk {
    addr: NonNull<u8>,
}

// SAFETY: a `Chunk` is an address of shared memory that lives until the
// MemoryFile is dropped; it is never dereferenced through `Chunk` itself, and
// every access goes through raw copies documented as racy (module docs), so
// moving it to another thread is sound.
unsafe impl Send for Chunk {}
// SAFETY: as for Send: `&Chunk` only exposes the address.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// The mapping's first byte.
    pub(super) fn addr(&self) -> NonNull<u8> {
        self.addr
    }
}

/// A host view of part of the file: `len` bytes at `ptr` inside an internal
/// mapping, valid for as long as the [`MemoryFile`] is borrowed.
///
/// The slice never hands out `&[u8]`: guest memory changes under the host's
/// feet, so reads and writes are raw copies (see [`copy_to`](Self::copy_to)).
#[derive(Clone, Copy, Debug)]
pub struct HostSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _mapping: PhantomData<&'a ()>,
}

/// A whole host file mapped shared into the VMM for host-side copies (used by
/// the mm layer's `HostFile`); unmapped on drop.
///
/// Invariant: `addr` is a live `MAP_SHARED` mapping of `len` bytes made by
/// `sys::mmap_shared_prot`, read-write if `writable`, owned by this value.
#[derive(Debug)]
pub struct HostMapping {
    addr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only
// reached through racy raw copies (module docs), so moving or sharing the
// address across threads is sound.
unsafe impl Send for HostMapping {}
// SAFETY: as for Send.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps the first `len` bytes of `fd`, read-write if `writable`.
    pub fn new(fd: BorrowedFd<'_>, len: u64, writable: bool) -> std::io::Result<HostMapping> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        let addr = sys::mmap_shared_prot(fd, 0, len, writable)?;
        Ok(HostMapping {
            addr,
            len,
            writable,
        })
    }

    /// The slice of `len` bytes at `offset`, or `None` if it does not fit
    /// or `write` is asked of a read-only mapping.
    pub fn slice(&self, offset: u64, len: usize, write: bool) -> Option<HostSlice<'_>> {
        let end = (offset as usize).checked_add(len)?;
        if end > self.len || (write && !self.writable) {
            return None;
        }
        // SAFETY: `offset + len <= self.len`, so the result stays inside the
        // mapping (type invariant).
        let ptr = unsafe { self.addr.add(offset as usize) };
        Some(HostSlice {
            ptr,
            len,
            _mapping: PhantomData,
        })
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours (type invariant) and no HostSlice
        // outlives `self` (their lifetime borrows it).
        if let Err(e) = unsafe { sys::munmap(self.addr, self.len) } {
            log::error!("munmap of a host file mapping failed: {e}");
        }
    }
}

impl<'a> HostSlice<'a> {
    /// The first byte's host address. Valid for `len()` bytes while the
    /// `MemoryFile` lives; accesses through it race with the guest.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the slice has no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `min(self.len(), buf.len())` bytes from the slice's start into
    /// `buf` and returns the count (a racy byte copy; see the module docs).
    pub fn copy_to(&self, buf: &mut [u8]) -> usize {
        let n = self.len.min(buf.len());
        // SAFETY: the slice's `len` bytes are mapped for the lifetime `'a`
        // (Chunk invariant); `buf` is a distinct Rust buffer of at least `n`
        // bytes, so the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), buf.as_mut_ptr(), n) };
        n
    }

    /// Copies `min(self.len(), buf.len())` bytes from `buf` to the slice's
    /// start and returns the count (a racy byte copy).
    pub fn copy_from(&self, buf: &[u8]) -> usize {
        let n = self.len.min(buf.len());
        // SAFETY: as in `copy_to`, with the direction reversed; the mapping
        // is writable.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr(), n) };
        n
    }
}

/// Copies the bytes of `srcs` into `dsts`, slice lists walked in step, as
/// far as both reach, and returns how many bytes were copied. A racy byte
/// copy like the others here (module docs); overlapping slices are copied as
/// by `memmove`.
pub fn copy_slices(srcs: &[HostSlice<'_>], dsts: &[HostSlice<'_>]) -> usize {
    let (mut si, mut so, mut di, mut d_off, mut done) = (0, 0, 0, 0, 0);
    while si < srcs.len() && di < dsts.len() {
        let (s, d) = (&srcs[si], &dsts[di]);
        let n = (s.len - so).min(d.len - d_off);
        // SAFETY: each slice is `len` bytes of a live mapping for its
        // lifetime (HostSlice invariant), so both `n`-byte pieces are in
        // bounds; `ptr::copy` allows them to overlap.
        unsafe { std::ptr::copy(s.ptr.as_ptr().add(so), d.ptr.as_ptr().add(d_off), n) };
        (so, d_off, done) = (so + n, d_off + n, done + n);
        if so == s.len {
            (si, so) = (si + 1, 0);
        }
        if d_off == d.len {
            (di, d_off) = (di + 1, 0);
        }
    }
    done
}

impl MemoryFile {
    /// Host slices covering the byte range `range`, in order.
    ///
    /// `range` need not be page aligned and may span chunks; it must lie in
    /// allocated memory (else [`MemoryFileError::NotAllocated`]). Every
    /// internal mapping is read-write, so `access` (the kind of access the
    /// caller means to make) is accepted for every value; it is kept for
    /// symmetry with the mm layer's APIs.
    pub fn map_internal(
        &self,
        range: FileRange,
        access: Access,
    ) -> Result<Vec<HostSlice<'_>>, MemoryFileError> {
        let _ = access;
        let mut inner = self.lock();
        Self::check_allocated_locked(&inner, range)?;
        self.slices_locked(&mut inner, range)
    }

    /// Copies the file's bytes at `offset` into `buf`.
    ///
    /// The bytes must be allocated. Reading a never-written page commits it
    /// (shmem allocates a page on any fault). Errors leave `buf` unchanged.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemoryFileError> {
        let range = Range::from_len(offset, buf.len() as u64)?;
        let mut done = 0;
        for s in self.map_internal(range, Access::Read)? {
            done += s.copy_to(&mut buf[done..]);
        }
        debug_assert_eq!(done, buf.len());
        Ok(())
    }

    /// Copies `buf` into the file at `offset`. The bytes must be allocated.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), MemoryFileError> {
        let range = Range::from_len(offset, buf.len() as u64)?;
        let mut done = 0;
        for s in self.map_internal(range, Access::Write)? {
            done += s.copy_from(&buf[done..]);
        }
        debug_assert_eq!(done, buf.len());
        Ok(())
    }

    /// Writes zeros over the byte range `range`, which must be allocated.
    ///
    /// This stores zeros (and so commits the pages); to zero whole pages and
    /// release their memory, use [`decommit`](Self::decommit).
    pub fn zero_at(&self, range: FileRange) -> Result<(), MemoryFileError> {
        for s in self.map_internal(range, Access::Write)? {
            // SAFETY: the slice's bytes are mapped and writable while `self`
            // is borrowed (Chunk invariant); a racy store, like a DMA write.
            unsafe { std::ptr::write_bytes(s.as_ptr(), 0, s.len()) };
        }
        Ok(())
    }

    /// Copies the bytes of `src` to `[dst_offset, dst_offset + src.len())`,
    /// e.g. a page range to a newly allocated range to break copy-on-write.
    ///
    /// Both ranges must be allocated and must not overlap
    /// ([`MemoryFileError::OverlappingCopy`]). Errors change nothing.
    pub fn copy_within(&self, src: FileRange, dst_offset: u64) -> Result<(), MemoryFileError> {
        Range::from_len(dst_offset, src.len())?;
        let dst = src.with_start(dst_offset);
        if src.overlaps(dst) {
            return Err(MemoryFileError::OverlappingCopy { src, dst });
        }
        let (srcs, dsts) = {
            let mut inner = self.lock();
            Self::check_allocated_locked(&inner, src)?;
            Self::check_allocated_locked(&inner, dst)?;
            (
                self.slices_locked(&mut inner, src)?,
                self.slices_locked(&mut inner, dst)?,
            )
        };
        copy_slices(&srcs, &dsts);
        Ok(())
    }

    /// The host address of file byte `offset` in its internal mapping,
    /// mapping the chunk if needed. The address is valid for the rest of the
    /// chunk while `self` lives.
    ///
    /// # Preconditions
    /// - `offset < self.file_size()`; it need not be allocated (the caller
    ///   decides what it may touch).
    #[allow(dead_code)] // For the mm and kvm layers.
    pub(crate) fn host_ptr(&self, offset: u64) -> Result<*mut u8, MemoryFileError> {
        let mut inner = self.lock();
        if offset >= inner.file_size {
            return Err(MemoryFileError::BeyondFile {
                offset,
                file_size: inner.file_size,
            });
        }
        let r = Range::new_unchecked(offset, offset + 1);
        Ok(self.slices_locked(&mut inner, r)?[0].as_ptr())
    }

    /// Maps every chunk overlapping `range` that is not mapped yet.
    ///
    /// # Preconditions
    /// - `range.end() <= inner.file_size` (debug-asserted).
    pub(super) fn map_chunks_locked(
        &self,
        inner: &mut Inner,
        range: FileRange,
    ) -> Result<(), MemoryFileError> {
        debug_assert!(range.end() <= inner.file_size, "{range} beyond file");
        if range.is_empty() {
            return Ok(());
        }
        let first = range.start() / self.chunk_size;
        let last = (range.end() - 1) / self.chunk_size;
        for c in first..=last {
            let slot = &mut inner.chunks[c as usize];
            if slot.is_none() {
                let addr = super::sys::mmap_shared(
                    self.fd.as_fd(),
                    c * self.chunk_size,
                    self.chunk_size as usize,
                )
                .map_err(|source| MemoryFileError::Syscall {
                    syscall: "mmap",
                    source,
                })?;
                *slot = Some(Chunk { addr });
            }
        }
        Ok(())
    }

    /// Host slices for the byte range `range`, one per chunk it touches.
    ///
    /// # Preconditions
    /// - `range.end() <= inner.file_size` (debug-asserted); allocation is
    ///   the caller's business.
    pub(super) fn slices_locked(
        &self,
        inner: &mut Inner,
        range: FileRange,
    ) -> Result<Vec<HostSlice<'_>>, MemoryFileError> {
        self.map_chunks_locked(inner, range)?;
        let mut out = Vec::new();
        let mut rest = range;
        while !rest.is_empty() {
            let at = rest.start();
            let chunk = at / self.chunk_size;
            let chunk_start = chunk * self.chunk_size;
            let (piece, tail) = rest.split_at(rest.end().min(chunk_start + self.chunk_size));
            rest = tail;
            let base = inner.chunks[chunk as usize]
                .as_ref()
                .expect("chunk mapped above")
                .addr;
            // SAFETY: `at - chunk_start < chunk_size`, so the pointer stays
            // inside the chunk's mapping.
            let ptr = unsafe { base.add((at - chunk_start) as usize) };
            out.push(HostSlice {
                ptr,
                len: piece.len() as usize,
                _mapping: PhantomData,
            });
        }
        Ok(out)
    }
}
