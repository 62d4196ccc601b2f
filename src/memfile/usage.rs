//! What the allocator knows about each allocated page (kind and reference
//! count), and committed-memory accounting with `mincore`.
//!
//! The accounting scheme is described in the [parent module](super)'s docs.

use std::ops::Range as StdRange;
use std::os::fd::AsFd;

use super::{Inner, MemoryFile, MemoryFileError};
use crate::range::{FileRange, Range, PAGE_SIZE};
use crate::segment::SegmentValue;

/// What an allocation is used for; committed memory is accounted per kind.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MemoryKind {
    /// Private guest memory (anonymous mappings, COW copies).
    Anonymous,
    /// Memory shared between address spaces (shared memory objects).
    Shared,
    /// Memory the VMM uses for itself (guest page tables, descriptors).
    System,
    /// Anything else.
    Other,
}

impl MemoryKind {
    /// Every kind, in [`index`](Self::index) order.
    pub const ALL: [MemoryKind; 4] = [
        MemoryKind::Anonymous,
        MemoryKind::Shared,
        MemoryKind::System,
        MemoryKind::Other,
    ];

    /// Position of the kind in [`ALL`](Self::ALL).
    pub const fn index(self) -> usize {
        match self {
            MemoryKind::Anonymous => 0,
            MemoryKind::Shared => 1,
            MemoryKind::System => 2,
            MemoryKind::Other => 3,
        }
    }
}

/// The value of an allocated segment: its kind and the reference count of
/// every page in it.
///
/// Invariant (checked by [`MemoryFile::check_invariants`]): `refs >= 1`;
/// a page whose count reaches zero leaves the set at once.
///
/// Maintenance note: a new field must be compared in `merge` and copied in
/// `split`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct PageInfo {
    pub(super) kind: MemoryKind,
    pub(super) refs: u64,
}

impl SegmentValue for PageInfo {
    fn merge(&self, _left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        (self == right_value).then_some(*self)
    }

    fn split(&self, _range: Range, _at: u64) -> (Self, Self) {
        (*self, *self)
    }
}

/// A snapshot of the memory file's size and committed memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Usage {
    committed: [u64; 4],
    /// Bytes of memory the file holds according to `fstat`
    /// (`st_blocks * 512`), allocated or not.
    pub total_file_blocks_bytes: u64,
    /// The file's size in bytes.
    pub file_size: u64,
    /// Bytes currently allocated (reference count at least one).
    pub allocated_bytes: u64,
}

impl Usage {
    /// Committed bytes of allocations of `kind`.
    pub const fn committed(&self, kind: MemoryKind) -> u64 {
        self.committed[kind.index()]
    }

    /// Committed bytes of every kind.
    pub fn total_committed(&self) -> u64 {
        self.committed.iter().sum()
    }
}

/// The last scan's result and what is needed to decide whether it is stale.
#[derive(Debug, Default)]
pub(super) struct UsageCache {
    /// Committed bytes per kind found by the last scan.
    committed: [u64; 4],
    /// `st_blocks` when the last scan started.
    blocks: u64,
    /// False until the first scan, and after any allocate, decommit or free.
    valid: bool,
}

impl UsageCache {
    /// Marks the cached result stale: allocation state or commitment changed.
    pub(super) fn invalidate(&mut self) {
        self.valid = false;
    }
}

impl MemoryFile {
    /// Committed bytes per [`MemoryKind`], plus the file's size, the bytes it
    /// holds (`fstat`) and the bytes allocated.
    ///
    /// Scans with `mincore` unless nothing changed since the last scan (see
    /// [Accounting](super#accounting)); holds `inner` for the scan.
    pub fn usage(&self) -> Result<Usage, MemoryFileError> {
        let mut inner = self.lock();
        let (_, blocks) =
            super::sys::fstat(self.fd.as_fd()).map_err(|source| MemoryFileError::Syscall {
                syscall: "fstat",
                source,
            })?;
        if !inner.cache.valid || inner.cache.blocks != blocks {
            let committed = self.scan_locked(&mut inner)?;
            inner.cache = UsageCache {
                committed,
                blocks,
                valid: true,
            };
        } else {
            inner.stats_scans_elided += 1;
        }
        Ok(Usage {
            committed: inner.cache.committed,
            total_file_blocks_bytes: blocks * 512,
            file_size: inner.file_size,
            allocated_bytes: inner.allocated,
        })
    }

    /// Counts committed bytes of every allocated segment, per kind.
    ///
    /// # Preconditions
    /// - `inner` is this file's locked state.
    fn scan_locked(&self, inner: &mut Inner) -> Result<[u64; 4], MemoryFileError> {
        let mut committed = [0u64; 4];
        inner.stats_scans += 1;
        let Some((last, _)) = inner.usage.last_segment() else {
            return Ok(committed);
        };
        // Map every chunk that may hold an allocation first, so the walk
        // below only reads `inner`.
        self.map_chunks_locked(inner, Range::new_unchecked(0, last.end()))?;

        let mut scan = ResidencyScan::default();
        for (r, info) in inner.usage.iter() {
            committed[info.kind.index()] += self.resident_locked(inner, r, &mut scan)?;
        }
        Ok(committed)
    }

    /// Bytes of `ranges` (allocated file ranges, in any order) that are
    /// resident: what a holder of those pages really commits.
    pub fn committed_in(&self, ranges: &[FileRange]) -> Result<u64, MemoryFileError> {
        let mut inner = self.lock();
        let Some(end) = ranges.iter().map(|r| r.end()).max() else {
            return Ok(0);
        };
        if end > inner.file_size {
            return Err(MemoryFileError::BeyondFile {
                offset: end,
                file_size: inner.file_size,
            });
        }
        self.map_chunks_locked(&mut inner, Range::new_unchecked(0, end))?;
        let mut scan = ResidencyScan::default();
        let mut total = 0;
        for r in ranges {
            total += self.resident_locked(&inner, *r, &mut scan)?;
        }
        Ok(total)
    }

    /// Resident bytes of `r`, reusing the `mincore` bits of the last chunk
    /// scanned.
    ///
    /// # Preconditions
    /// - `inner` is this file's locked state; every chunk under `r` is mapped.
    fn resident_locked(
        &self,
        inner: &Inner,
        r: FileRange,
        scan: &mut ResidencyScan,
    ) -> Result<u64, MemoryFileError> {
        let chunk_size = self.chunk_size;
        let mut resident = 0;
        let mut at = r.start();
        while at < r.end() {
            let chunk = at / chunk_size;
            let chunk_start = chunk * chunk_size;
            let piece_end = r.end().min(chunk_start + chunk_size);
            if scan.chunk != Some(chunk) {
                let addr = inner.chunks[chunk as usize]
                    .as_ref()
                    .expect("chunk mapped by the caller")
                    .addr();
                super::sys::mincore(addr, chunk_size as usize, &mut scan.bits).map_err(
                    |source| MemoryFileError::Syscall {
                        syscall: "mincore",
                        source,
                    },
                )?;
                scan.chunk = Some(chunk);
            }
            let pages: StdRange<usize> = ((at - chunk_start) / PAGE_SIZE) as usize
                ..((piece_end - chunk_start) / PAGE_SIZE) as usize;
            resident += scan.bits[pages].iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE;
            at = piece_end;
        }
        Ok(resident)
    }
}

/// `mincore` bits of the chunk scanned last.
#[derive(Default)]
struct ResidencyScan {
    bits: Vec<u8>,
    chunk: Option<u64>,
}
