//! The memfd-backed page allocator that owns all guest memory
//! (gVisor's filemem, rewritten).
//!
//! One [`MemoryFile`] wraps one memfd. Callers allocate page ranges of it,
//! share them by reference counting, and release memory early by
//! decommitting; the KVM layer maps the fd itself ([`MemoryFile::fd`]), and
//! the host reads and writes it through internal mappings
//! ([`MemoryFile::read_at`] and friends).
//!
//! # Page states
//!
//! ```text
//!                 allocate (refs = 1)                write / fault (any mapping)
//!   free (hole) ───────────────────► allocated, ───────────────────────────► allocated,
//!        ▲                            uncommitted ◄───────────────────────── committed
//!        │                                │            decommit (punch hole)     │
//!        │   dec_ref to 0: punch hole     │                                      │
//!        └────────────────────────────────┴──────────────────────────────────────┘
//! ```
//!
//! - *free*: in no allocation; a hole in the file (never written, or
//!   punched when freed), so a later allocation of it reads as zeros.
//! - *allocated*: reference count ≥ 1; `inc_ref`/`dec_ref` move the count.
//!   When it reaches zero the page is reclaimed synchronously inside
//!   `dec_ref`: its memory is punched out (`fallocate(PUNCH_HOLE)`) and it is
//!   free again.
//! - *committed*: memory backs the page; see [Accounting](#accounting).
//!
//! # Allocation policy
//!
//! Lowest-offset first fit; allocations of 2 MiB or more are 2 MiB aligned.
//! When nothing fits below the file size, the file grows (`ftruncate`) by
//! doubling, in whole chunks, up to `max_size`. The file never shrinks (it is
//! sealed with `F_SEAL_SHRINK`).
//!
//! # Accounting
//!
//! A page is *committed* when the memfd has a page of memory behind it: the
//! page was written (or read-faulted, which allocates a page for shmem)
//! through any mapping of the file. [`MemoryFile::usage`] finds committed
//! pages by calling `mincore` over the internal mapping of every chunk that
//! holds an allocation. Because the internal mappings are `MAP_SHARED`, the
//! kernel answers from the file's page cache, so pages touched only through
//! another mapping of [`MemoryFile::fd`] (the KVM layer's) count too.
//!
//! A scan costs one `mincore` per chunk plus a walk over the allocated
//! segments, so it is elided (filemem's trick) when nothing can have
//! changed: no allocation, decommit or free happened since the last scan and
//! the file's `st_blocks` is the same. Pages become committed only by a
//! fault or write through some mapping, which raises `st_blocks`; through
//! this type they stop being committed only by decommit or free, which mark
//! the cache stale. Not noticed until the next change: holes punched in the
//! fd by someone else while other pages get committed (no net change in
//! `st_blocks`), and pages swapped out after a scan (their blocks stay
//! counted in `st_blocks`).

mod io;
mod options;
mod sys;
mod usage;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::range::{align_up, FileRange, Range, RangeError, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::segment::SegmentSet;

pub use io::{copy_slices, HostMapping, HostSlice};
pub use options::MemoryFileOptions;
pub use usage::{MemoryKind, Usage};

use io::Chunk;
use usage::{PageInfo, UsageCache};

/// Errors from [`MemoryFile`] operations. A failing operation leaves the
/// allocation map, reference counts and file size unchanged.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// An allocation length that is zero or not a multiple of the page size.
    #[error("allocation length {len:#x} is not a non-zero multiple of the page size")]
    InvalidLength {
        /// The requested length.
        len: u64,
    },
    /// A range that must be non-empty and page aligned is not.
    #[error("file range {range} is not a non-empty page-aligned range")]
    InvalidRange {
        /// The offending range.
        range: FileRange,
    },
    /// An offset and length that do not form a range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Part of the range is not allocated (or was already freed).
    #[error("file range {range} is not allocated: {gap} is free")]
    NotAllocated {
        /// The range the operation was given.
        range: FileRange,
        /// The first free part of it.
        gap: FileRange,
    },
    /// The allocation does not fit below the maximum file size.
    #[error("cannot allocate {requested:#x} bytes: memory file is limited to {max_size:#x} bytes")]
    OutOfMemory {
        /// The requested length.
        requested: u64,
        /// The file's maximum size.
        max_size: u64,
    },
    /// A reference count would overflow `u64`.
    #[error("reference count overflow in {range}")]
    RefCountOverflow {
        /// The segment whose count is saturated.
        range: FileRange,
    },
    /// `copy_within` was given overlapping source and destination.
    #[error("copy source {src} overlaps destination {dst}")]
    OverlappingCopy {
        /// Source range.
        src: FileRange,
        /// Destination range.
        dst: FileRange,
    },
    /// An offset at or past the end of the file.
    #[error("offset {offset:#x} is beyond the file size {file_size:#x}")]
    BeyondFile {
        /// The offending offset.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// [`MemoryFileOptions`] that cannot work.
    #[error("invalid memory file options {options:?}: {reason}")]
    InvalidOptions {
        /// The options given.
        options: MemoryFileOptions,
        /// What is wrong with them.
        reason: &'static str,
    },
    /// A system call failed.
    #[error("{syscall} failed: {source}")]
    Syscall {
        /// The system call's name.
        syscall: &'static str,
        /// The error it returned.
        #[source]
        source: std::io::Error,
    },
}

/// The allocator's mutable state, guarded by [`MemoryFile`]'s `inner` lock.
struct Inner {
    /// Allocated pages → kind and reference count; gaps are free pages.
    /// Invariants: maximally merged; every value has `refs >= 1`; every
    /// segment ends at or below `file_size`.
    usage: SegmentSet<PageInfo>,
    /// Bytes covered by `usage` (kept in step by allocate and reclaim).
    allocated: u64,
    /// Current file size: a multiple of `chunk_size`, at most `max_size`.
    file_size: u64,
    /// Internal mappings by chunk index; `len() == file_size / chunk_size`.
    /// A chunk is mapped on first use and unmapped only on drop.
    chunks: Vec<Option<Chunk>>,
    /// The last usage scan (see the module docs' Accounting section).
    cache: UsageCache,
    /// Observability: usage scans done and elided.
    stats_scans: u64,
    stats_scans_elided: u64,
}

/// A memfd-backed allocator of file pages with reference counts,
/// decommit, and committed-memory accounting. See the [module docs](self).
///
/// Locking: one mutex, `inner`, guards the allocation map, the reference
/// counts, the file size and the internal mappings table. It is the lowest
/// lock in guestmm's lock order: code holding it calls nothing that takes
/// another guestmm lock. Host copies (`read_at`, …) run after it is released.
///
/// `MemoryFile` is `Send + Sync`.
pub struct MemoryFile {
    fd: OwnedFd,
    name: String,
    max_size: u64,
    chunk_size: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFile")
            .field("name", &self.name)
            .field("max_size", &self.max_size)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

impl MemoryFile {
    /// Creates a memory file backed by a new memfd called `name`
    /// (`MFD_CLOEXEC`, sealed against shrinking) and sized
    /// `opts.initial_size` rounded up to the chunk size.
    pub fn new(name: &str, opts: MemoryFileOptions) -> Result<MemoryFile, MemoryFileError> {
        let initial = opts.validate()?;
        let sc = |syscall| move |source| MemoryFileError::Syscall { syscall, source };
        let fd = sys::memfd_create(name).map_err(sc("memfd_create"))?;
        if initial > 0 {
            sys::ftruncate(fd.as_fd(), initial).map_err(sc("ftruncate"))?;
        }
        sys::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK).map_err(sc("fcntl(F_ADD_SEALS)"))?;
        let chunks = (0..initial / opts.chunk_size).map(|_| None).collect();
        Ok(MemoryFile {
            fd,
            name: name.to_owned(),
            max_size: opts.max_size,
            chunk_size: opts.chunk_size,
            inner: Mutex::new(Inner {
                usage: SegmentSet::new(),
                allocated: 0,
                file_size: initial,
                chunks,
                cache: UsageCache::default(),
                stats_scans: 0,
                stats_scans_elided: 0,
            }),
        })
    }

    /// Allocates `len` bytes (a non-zero multiple of the page size) at the
    /// lowest offset that fits, 2 MiB aligned if `len >= 2 MiB`, growing the
    /// file if needed. The new range reads as zeros and has reference
    /// count 1.
    ///
    /// Errors (state unchanged): [`InvalidLength`](MemoryFileError::InvalidLength),
    /// [`OutOfMemory`](MemoryFileError::OutOfMemory), or a failed `ftruncate`.
    pub fn allocate(&self, len: u64, kind: MemoryKind) -> Result<FileRange, MemoryFileError> {
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(MemoryFileError::InvalidLength { len });
        }
        let oom = MemoryFileError::OutOfMemory {
            requested: len,
            max_size: self.max_size,
        };
        if len > self.max_size {
            return Err(oom);
        }
        let align = if len >= HUGE_PAGE_SIZE {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        };
        let mut inner = self.lock();
        let in_file = Range::new_unchecked(0, inner.file_size);
        let fr = match inner.usage.first_fit(in_file, len, align) {
            Some(fr) => fr,
            None => {
                let all = Range::new_unchecked(0, self.max_size);
                let fr = inner.usage.first_fit(all, len, align).ok_or(oom)?;
                self.grow_locked(&mut inner, fr.end())?;
                fr
            }
        };
        inner
            .usage
            .insert(fr, PageInfo { kind, refs: 1 })
            .expect("first_fit returned a range inside a gap");
        inner.allocated += len;
        inner.cache.invalidate();
        log::trace!("memfile {}: allocated {fr} ({kind:?})", self.name);
        Ok(fr)
    }

    /// Adds one reference to every page of `range`, which must be non-empty,
    /// page aligned and allocated.
    ///
    /// Errors (state unchanged): [`InvalidRange`](MemoryFileError::InvalidRange),
    /// [`NotAllocated`](MemoryFileError::NotAllocated),
    /// [`RefCountOverflow`](MemoryFileError::RefCountOverflow).
    pub fn inc_ref(&self, range: FileRange) -> Result<(), MemoryFileError> {
        Self::check_pages(range)?;
        let mut inner = self.lock();
        Self::check_allocated_locked(&inner, range)?;
        if let Some((r, _)) = inner
            .usage
            .iter_range(range)
            .find(|(_, v)| v.refs == u64::MAX)
        {
            return Err(MemoryFileError::RefCountOverflow { range: r });
        }
        inner
            .usage
            .apply_contiguous(range, |_, v| v.refs += 1)
            .expect("coverage checked above");
        inner.usage.merge_range(range);
        Ok(())
    }

    /// Drops one reference from every page of `range`, which must be
    /// non-empty, page aligned and allocated. Pages left without references
    /// are reclaimed before this returns: their memory is released and they
    /// may be allocated again (reading as zeros).
    ///
    /// Errors (state unchanged): [`InvalidRange`](MemoryFileError::InvalidRange),
    /// [`NotAllocated`](MemoryFileError::NotAllocated) (including a double
    /// free).
    pub fn dec_ref(&self, range: FileRange) -> Result<(), MemoryFileError> {
        Self::check_pages(range)?;
        let mut inner = self.lock();
        Self::check_allocated_locked(&inner, range)?;
        inner
            .usage
            .apply_contiguous(range, |_, v| v.refs -= 1)
            .expect("coverage checked above");
        // Coalesce the pages that reached zero into maximal runs.
        let mut freed: Vec<Range> = Vec::new();
        for (r, v) in inner.usage.iter_range(range) {
            if v.refs != 0 {
                continue;
            }
            match freed.last_mut() {
                Some(last) if last.end() == r.start() => {
                    *last = Range::new_unchecked(last.start(), r.end())
                }
                _ => freed.push(r),
            }
        }
        for &r in &freed {
            inner.usage.remove_range(r);
            inner.allocated -= r.len();
            self.reclaim_locked(&mut inner, r);
        }
        inner.usage.merge_range(range);
        if !freed.is_empty() {
            inner.cache.invalidate();
        }
        Ok(())
    }

    /// Releases the memory behind `range` (punches a hole): its pages read
    /// as zeros afterwards and stop counting as committed. The range stays
    /// allocated with its reference counts.
    ///
    /// Errors (state unchanged): [`InvalidRange`](MemoryFileError::InvalidRange),
    /// [`NotAllocated`](MemoryFileError::NotAllocated), or a failed
    /// `fallocate` (some pages may then be released already).
    pub fn decommit(&self, range: FileRange) -> Result<(), MemoryFileError> {
        Self::check_pages(range)?;
        let mut inner = self.lock();
        Self::check_allocated_locked(&inner, range)?;
        inner.cache.invalidate();
        sys::punch_hole(self.fd.as_fd(), range.start(), range.len()).map_err(|source| {
            MemoryFileError::Syscall {
                syscall: "fallocate(PUNCH_HOLE)",
                source,
            }
        })
    }

    /// The reference count of the page containing `offset`, or `None` if it
    /// is free.
    pub fn refs(&self, offset: u64) -> Option<u64> {
        self.lock().usage.find_segment(offset).map(|(_, v)| v.refs)
    }

    /// Every allocated run with its reference count, in offset order (for
    /// cross-layer reference audits).
    pub fn ref_counts(&self) -> Vec<(FileRange, u64)> {
        self.lock().usage.iter().map(|(r, v)| (r, v.refs)).collect()
    }

    /// The kind of the allocation containing `offset`, or `None` if free.
    pub fn kind(&self, offset: u64) -> Option<MemoryKind> {
        self.lock().usage.find_segment(offset).map(|(_, v)| v.kind)
    }

    /// Bytes currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.lock().allocated
    }

    /// Number of segments in the allocation map (allocated runs with
    /// distinct kind or reference count); for observability and tests.
    pub fn segment_count(&self) -> usize {
        self.lock().usage.len()
    }

    /// `(scans, elided)`: how many [`usage`](Self::usage) calls scanned with
    /// `mincore` and how many reused the last scan.
    pub fn usage_scan_stats(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.stats_scans, inner.stats_scans_elided)
    }

    /// The file's current size in bytes.
    pub fn file_size(&self) -> u64 {
        self.lock().file_size
    }

    /// The size past which the file never grows.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Size of each internal mapping.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The memfd, for mapping it elsewhere (the KVM layer maps it
    /// `MAP_SHARED` into its host VA reservation). Do not resize it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Checks every invariant: the allocation map is maximally merged and
    /// valid, every allocated page has a reference, allocations lie inside
    /// the file, and the cached counters match values recomputed from the
    /// map and from `fstat`. The error names the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let inner = self.lock();
        inner.usage.check_invariants()?;
        if !inner.usage.is_maximally_merged() {
            return Err(format!(
                "allocation map not maximally merged: {:?}",
                inner.usage
            ));
        }
        if let Some((r, v)) = inner.usage.iter().find(|(_, v)| v.refs == 0) {
            return Err(format!("segment {r} has {v:?} with no reference"));
        }
        if let Some((last, _)) = inner.usage.last_segment() {
            if last.end() > inner.file_size {
                return Err(format!(
                    "segment {last} ends past file size {:#x}",
                    inner.file_size
                ));
            }
        }
        let span = inner.usage.span();
        if span != inner.allocated {
            return Err(format!(
                "allocated counter {:#x}, want span {span:#x}",
                inner.allocated
            ));
        }
        if inner.file_size % self.chunk_size != 0 || inner.file_size > self.max_size {
            return Err(format!("bad file size {:#x}", inner.file_size));
        }
        let want_chunks = (inner.file_size / self.chunk_size) as usize;
        if inner.chunks.len() != want_chunks {
            return Err(format!(
                "{} chunk slots, want {want_chunks}",
                inner.chunks.len()
            ));
        }
        let (size, _) = sys::fstat(self.fd.as_fd()).map_err(|e| format!("fstat: {e}"))?;
        if size != inner.file_size {
            return Err(format!("fstat size {size:#x}, want {:#x}", inner.file_size));
        }
        Ok(())
    }

    // ---- internals ----

    /// Locks `inner`. A panic while it was held cannot leave a half-applied
    /// mutation that matters for memory safety, so a poisoned lock is used
    /// as is (tests still catch inconsistencies with `check_invariants`).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails unless `range` is non-empty and page aligned.
    fn check_pages(range: FileRange) -> Result<(), MemoryFileError> {
        if range.is_empty() || !range.is_page_aligned() {
            return Err(MemoryFileError::InvalidRange { range });
        }
        Ok(())
    }

    /// Fails with the first free part of `range`, if any.
    fn check_allocated_locked(inner: &Inner, range: FileRange) -> Result<(), MemoryFileError> {
        match inner.usage.gaps(range).next() {
            Some(gap) => Err(MemoryFileError::NotAllocated { range, gap }),
            None => Ok(()),
        }
    }

    /// Grows the file so that it covers `[0, needed)`: to the larger of
    /// double its size and `needed` rounded up to a chunk.
    ///
    /// # Preconditions
    /// - `inner.file_size < needed <= self.max_size` (debug-asserted).
    fn grow_locked(&self, inner: &mut Inner, needed: u64) -> Result<(), MemoryFileError> {
        debug_assert!(inner.file_size < needed && needed <= self.max_size);
        let wanted = align_up(needed, self.chunk_size).unwrap_or(u64::MAX);
        let new_size = wanted.max(inner.file_size * 2).min(self.max_size);
        sys::ftruncate(self.fd.as_fd(), new_size).map_err(|source| MemoryFileError::Syscall {
            syscall: "ftruncate",
            source,
        })?;
        log::debug!(
            "memfile {}: grew from {:#x} to {new_size:#x} bytes",
            self.name,
            inner.file_size
        );
        inner.file_size = new_size;
        inner
            .chunks
            .resize_with((new_size / self.chunk_size) as usize, || None);
        Ok(())
    }

    /// Releases the memory of the just-freed run `r` so that it reads as
    /// zeros when allocated again. If the hole cannot be punched, the pages
    /// are zeroed by hand instead (memory is not released, but reuse stays
    /// correct), as filemem does.
    ///
    /// # Preconditions
    /// - `r` is free in `inner.usage` and inside the file.
    fn reclaim_locked(&self, inner: &mut Inner, r: Range) {
        debug_assert!(inner.usage.is_empty_range(r));
        let Err(e) = sys::punch_hole(self.fd.as_fd(), r.start(), r.len()) else {
            return;
        };
        log::warn!("memfile {}: cannot punch {r}: {e}; zeroing it", self.name);
        match self.slices_locked(inner, r) {
            Ok(slices) => {
                for s in slices {
                    // SAFETY: the slice lies in a live internal mapping
                    // (Chunk invariant) and the range is free, so only a
                    // misbehaving caller still touches it.
                    unsafe { std::ptr::write_bytes(s.as_ptr(), 0, s.len()) };
                }
            }
            Err(e) => log::error!("memfile {}: cannot zero {r}: {e}", self.name),
        }
    }
}

impl Drop for MemoryFile {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        for chunk in inner.chunks.drain(..).flatten() {
            // SAFETY: every chunk is a mapping of `chunk_size` bytes made by
            // `sys::mmap_shared`; `&mut self` means no HostSlice (which
            // borrows `self`) is alive, so nothing uses it afterwards.
            if let Err(e) = unsafe { sys::munmap(chunk.addr(), self.chunk_size as usize) } {
                log::error!("memfile {}: munmap failed: {e}", self.name);
            }
        }
        // `fd` closes when the OwnedFd drops.
    }
}

#[cfg(test)]
mod tests;
