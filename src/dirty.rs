//! Dirty page sets: which 4 KiB pages of a guest-physical space were
//! written. [`DirtyPages`] is the set (sparse: a guest-physical space may be
//! up to 1 TiB and more, and a take usually holds a few megabytes);
//! [`DirtyLog`] is the thread-safe sink the mm core (host writes) and the
//! KVM slot table (harvested `KVM_GET_DIRTY_LOG` bitmaps) both mark.
//!
//! Names no other guestmm module but [`range`](crate::range).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::range::{GuestRange, Range, RangeError, PAGE_SIZE};

/// Pages per chunk of the sparse map: 512 × 4 KiB = 2 MiB, 8 words.
const CHUNK_PAGES: u64 = 512;
const CHUNK_WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// A set of 4 KiB guest-physical pages.
///
/// Stored as a map from 2 MiB chunk index to a 512-bit bitmap: memory
/// grows with the number of distinct 2 MiB chunks touched (72 bytes each
/// plus the map's node), not with the size of the space.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    chunks: BTreeMap<u64, [u64; CHUNK_WORDS]>,
    pages: u64,
}

impl std::fmt::Debug for DirtyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyPages")
            .field("pages", &self.pages)
            .field("ranges", &self.ranges())
            .finish()
    }
}

impl DirtyPages {
    /// An empty set.
    pub fn new() -> DirtyPages {
        DirtyPages::default()
    }

    /// Number of pages in the set.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// Bytes covered by the set (`page_count() * PAGE_SIZE`).
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// True if no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Adds every page `range` touches (rounded out to whole pages; an
    /// empty range adds nothing).
    pub fn mark(&mut self, range: GuestRange) {
        if range.is_empty() {
            return;
        }
        let first = range.start() / PAGE_SIZE;
        let end = range.end().div_ceil(PAGE_SIZE);
        let mut page = first;
        while page < end {
            let chunk = page / CHUNK_PAGES;
            let chunk_end = ((chunk + 1) * CHUNK_PAGES).min(end);
            let words = self.chunks.entry(chunk).or_insert([0; CHUNK_WORDS]);
            while page < chunk_end {
                let in_chunk = page % CHUNK_PAGES;
                let word = (in_chunk / 64) as usize;
                let bit = in_chunk % 64;
                let n = (chunk_end - page).min(64 - bit);
                let mask = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << bit
                };
                self.pages += u64::from((mask & !words[word]).count_ones());
                words[word] |= mask;
                page += n;
            }
        }
    }

    /// Adds the page holding `gpa`.
    pub fn mark_page(&mut self, gpa: u64) {
        let page = gpa / PAGE_SIZE;
        self.or_word(page - page % 64, 1 << (page % 64));
    }

    /// Adds the pages of a KVM dirty bitmap (`KVM_GET_DIRTY_LOG`: bit `i`
    /// of word `w` is page `w * 64 + i` of the slot) of a slot starting at
    /// guest-physical `base`.
    ///
    /// Errors ([`RangeError`], nothing added): `base` is not page aligned,
    /// or the bitmap reaches past the end of the 64-bit space.
    pub fn mark_bitmap(&mut self, base: u64, bitmap: &[u64]) -> Result<(), RangeError> {
        let bits = bitmap.len() as u64 * 64;
        let len = bits.checked_mul(PAGE_SIZE).ok_or(RangeError::Overflow {
            start: base,
            len: u64::MAX,
        })?;
        let range = Range::from_len(base, len)?;
        if !crate::range::is_page_aligned(base) {
            return Err(RangeError::Unaligned { range });
        }
        let first = base / PAGE_SIZE;
        let shift = first % 64;
        let aligned = first - shift;
        for (w, &word) in bitmap.iter().enumerate() {
            if word == 0 {
                continue;
            }
            let at = aligned + w as u64 * 64;
            if shift == 0 {
                self.or_word(at, word);
            } else {
                self.or_word(at, word << shift);
                self.or_word(at + 64, word >> (64 - shift));
            }
        }
        Ok(())
    }

    /// ORs `bits` into the 64 pages starting at page number `page` (a
    /// multiple of 64).
    fn or_word(&mut self, page: u64, bits: u64) {
        if bits == 0 {
            return;
        }
        let words = self
            .chunks
            .entry(page / CHUNK_PAGES)
            .or_insert([0; CHUNK_WORDS]);
        let word = &mut words[((page % CHUNK_PAGES) / 64) as usize];
        self.pages += u64::from((bits & !*word).count_ones());
        *word |= bits;
    }

    /// True if the page holding `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        let page = gpa / PAGE_SIZE;
        self.chunks.get(&(page / CHUNK_PAGES)).is_some_and(|words| {
            let in_chunk = page % CHUNK_PAGES;
            words[(in_chunk / 64) as usize] & (1 << (in_chunk % 64)) != 0
        })
    }

    /// Adds every page of `other`.
    pub fn union(&mut self, other: &DirtyPages) {
        for (&chunk, words) in &other.chunks {
            for (w, &bits) in words.iter().enumerate() {
                self.or_word(chunk * CHUNK_PAGES + w as u64 * 64, bits);
            }
        }
    }

    /// Empties the set and returns what it held.
    pub fn take(&mut self) -> DirtyPages {
        std::mem::take(self)
    }

    /// Replaces the set with `other` and returns what it held.
    pub fn swap(&mut self, other: DirtyPages) -> DirtyPages {
        std::mem::replace(self, other)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.pages = 0;
    }

    /// The set as maximal runs of pages, in address order.
    pub fn ranges(&self) -> Vec<GuestRange> {
        let mut out: Vec<GuestRange> = Vec::new();
        for (&chunk, words) in &self.chunks {
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                let base = chunk * CHUNK_PAGES + w as u64 * 64;
                while bits != 0 {
                    let lo = u64::from(bits.trailing_zeros());
                    let run = u64::from((bits >> lo).trailing_ones());
                    let start = (base + lo) * PAGE_SIZE;
                    let end = start + run * PAGE_SIZE;
                    match out.last_mut() {
                        Some(last) if last.end() == start => {
                            *last = Range::new_unchecked(last.start(), end)
                        }
                        _ => out.push(Range::new_unchecked(start, end)),
                    }
                    bits = if lo + run >= 64 {
                        0
                    } else {
                        bits & !((1u64 << (lo + run)) - 1)
                    };
                }
            }
        }
        out
    }

    /// Every page address in the set, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().flat_map(|(&chunk, words)| {
            words.iter().enumerate().flat_map(move |(w, &word)| {
                let base = chunk * CHUNK_PAGES + w as u64 * 64;
                (0..64u64)
                    .filter(move |b| word & (1 << b) != 0)
                    .map(move |b| (base + b) * PAGE_SIZE)
            })
        })
    }

    /// Heap bytes the set uses (about; for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        // A B-tree entry: key, value and a share of node overhead.
        self.chunks.len() * (8 + 8 * CHUNK_WORDS + 16)
    }
}

/// The shared sink of dirty pages: a [`DirtyPages`] behind a mutex, marked
/// by host-side writes (the mm core) and by harvests of KVM's dirty log
/// (the slot table), emptied by a take.
///
/// Lock: a leaf. Callers may hold any guestmm lock while marking it
/// (`AddressSpace.active`, `SlotTable.state`); nothing is called with it
/// held.
#[derive(Debug, Default)]
pub struct DirtyLog {
    pages: Mutex<DirtyPages>,
}

impl DirtyLog {
    /// An empty log.
    pub fn new() -> DirtyLog {
        DirtyLog::default()
    }

    /// Adds every page `range` touches.
    pub fn mark(&self, range: GuestRange) {
        self.lock().mark(range);
    }

    /// Adds a KVM dirty bitmap of a slot at `base` (see
    /// [`DirtyPages::mark_bitmap`]).
    pub fn mark_bitmap(&self, base: u64, bitmap: &[u64]) -> Result<(), RangeError> {
        self.lock().mark_bitmap(base, bitmap)
    }

    /// Empties the log and returns what it held.
    pub fn take(&self) -> DirtyPages {
        self.lock().take()
    }

    /// Empties the log.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Pages in the log now.
    pub fn page_count(&self) -> u64 {
        self.lock().page_count()
    }

    /// A copy of what the log holds now (it keeps it).
    pub fn peek(&self) -> DirtyPages {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, DirtyPages> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> GuestRange {
        Range::new_unchecked(s, e)
    }

    #[test]
    fn mark_rounds_out_and_counts_once() {
        let mut d = DirtyPages::new();
        d.mark(r(0x1001, 0x2001));
        assert_eq!(d.page_count(), 2);
        assert_eq!(d.ranges(), vec![r(0x1000, 0x3000)]);
        d.mark(r(0x2000, 0x3000));
        assert_eq!(d.page_count(), 2);
        d.mark(r(0x3000, 0x3000));
        assert_eq!(d.page_count(), 2);
    }

    #[test]
    fn runs_cross_words_and_chunks() {
        let mut d = DirtyPages::new();
        let a = (2 << 20) - 3 * PAGE_SIZE;
        d.mark(r(a, a + 70 * PAGE_SIZE));
        d.mark(r(1 << 40, (1 << 40) + PAGE_SIZE));
        assert_eq!(d.page_count(), 71);
        assert_eq!(
            d.ranges(),
            vec![r(a, a + 70 * PAGE_SIZE), r(1 << 40, (1 << 40) + PAGE_SIZE)]
        );
        assert!(d.contains(a) && d.contains(1 << 40) && !d.contains(a - 1));
        assert_eq!(d.pages().count(), 71);
    }

    #[test]
    fn bitmap_at_any_page_offset_matches_per_page_marks() {
        let bitmap = [0x8000_0000_0000_0001u64, 0, u64::MAX, 0x10];
        for base_page in [0u64, 1, 63, 64, 511, 512, 1000] {
            let base = base_page * PAGE_SIZE;
            let mut d = DirtyPages::new();
            d.mark_bitmap(base, &bitmap).unwrap();
            let mut want = DirtyPages::new();
            for (w, word) in bitmap.iter().enumerate() {
                for b in 0..64 {
                    if word & (1 << b) != 0 {
                        want.mark_page(base + (w as u64 * 64 + b) * PAGE_SIZE);
                    }
                }
            }
            assert_eq!(d, want, "base page {base_page}");
            assert_eq!(d.page_count(), 2 + 64 + 1);
        }
    }

    #[test]
    fn bad_bitmap_base_is_refused() {
        let mut d = DirtyPages::new();
        assert!(d.mark_bitmap(0x800, &[1]).is_err());
        assert!(d.mark_bitmap(u64::MAX - PAGE_SIZE + 1, &[1]).is_err());
        assert!(d.is_empty());
    }

    #[test]
    fn union_and_take() {
        let mut a = DirtyPages::new();
        a.mark(r(0, 0x2000));
        let mut b = DirtyPages::new();
        b.mark(r(0x1000, 0x4000));
        a.union(&b);
        assert_eq!(a.page_count(), 4);
        let t = a.take();
        assert!(a.is_empty());
        assert_eq!(t.ranges(), vec![r(0, 0x4000)]);
    }
}
