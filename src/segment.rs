//! An ordered set of non-overlapping ranges, each carrying a value (the
//! segment set of gVisor's `memmap`/`segment` packages).
//!
//! Vmas, pmas, memslots and the allocator's usage map are all segment sets.
//! A value decides how it merges with an adjacent value and how it splits
//! ([`SegmentValue`]), so the set can keep itself maximally merged without
//! knowing what it stores.
//!
//! Storage is a `BTreeMap` keyed by segment start, so lookups, inserts and
//! removals are `O(log n)`. Beside it a gap index (a treap augmented with the
//! largest gap length of each subtree) answers "the lowest gap of at least
//! `len` bytes at or above `x`" in `O(log n)` expected, which makes
//! [`SegmentSet::first_fit`] sublinear.
//!
//! Gaps are the maximal ranges of `[0, u64::MAX)` covered by no segment.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::range::{align_up, Range};

mod check;
mod gaps;
use gaps::GapIndex;

/// How values of a [`SegmentSet`] merge and split.
///
/// Maintenance note: a value type with several fields must handle every field
/// in both methods, or merged and split segments silently lose state.
pub trait SegmentValue: Clone {
    /// Returns the value for the union of `left` (holding `self`) and the
    /// adjacent `right` (holding `right_value`), or `None` if the two must
    /// stay separate segments.
    fn merge(&self, left: Range, right_value: &Self, right: Range) -> Option<Self>;

    /// Returns the values for `[range.start, at)` and `[at, range.end)`.
    ///
    /// Preconditions: `range.can_split_at(at)`.
    fn split(&self, range: Range, at: u64) -> (Self, Self);
}

/// Errors from [`SegmentSet`] mutations given bad ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// An empty range was given where a segment must cover something.
    #[error("empty range at {start:#x}")]
    Empty {
        /// Start of the empty range.
        start: u64,
    },
    /// The range overlaps a segment already in the set.
    #[error("range {range} overlaps existing segment {existing}")]
    Overlap {
        /// The range being inserted.
        range: Range,
        /// The segment it collides with.
        existing: Range,
    },
    /// Part of the range is not covered by any segment.
    #[error("range {range} is not fully covered: gap at {gap}")]
    NotCovered {
        /// The range that had to be covered.
        range: Range,
        /// The first uncovered part of it.
        gap: Range,
    },
}

/// What lies at a key: a segment with its value, or a gap.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a, V> {
    /// The key is inside this segment.
    Segment(Range, &'a V),
    /// The key is inside this gap.
    Gap(Range),
}

#[derive(Clone, Debug)]
struct Entry<V> {
    end: u64,
    value: V,
}

/// An ordered set of non-overlapping, non-empty ranges with values.
///
/// Invariants:
/// - every segment is non-empty and segments do not overlap;
/// - `gaps` holds exactly the non-empty gaps between segments (including the
///   one before the first and after the last segment).
#[derive(Clone)]
pub struct SegmentSet<V> {
    map: BTreeMap<u64, Entry<V>>,
    gaps: GapIndex,
}

impl<V: SegmentValue> Default for SegmentSet<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: SegmentValue> SegmentSet<V> {
    /// An empty set: one gap covering `[0, u64::MAX)`.
    pub fn new() -> Self {
        let mut gaps = GapIndex::default();
        gaps.insert(0, u64::MAX);
        SegmentSet {
            map: BTreeMap::new(),
            gaps,
        }
    }

    /// True if the set has no segment.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Removes every segment.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// All segments in address order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Range, &V)> + '_ {
        self.map
            .iter()
            .map(|(&s, e)| (Range::new_unchecked(s, e.end), &e.value))
    }

    /// The segments overlapping `r`, unclipped, in address order.
    pub fn iter_range(&self, r: Range) -> impl Iterator<Item = (Range, &V)> + '_ {
        let from = self.first_overlapping_start(r);
        self.map
            .range(from..)
            .take_while(move |(&s, _)| s < r.end())
            .map(|(&s, e)| (Range::new_unchecked(s, e.end), &e.value))
            .filter(move |(sr, _)| sr.overlaps(r))
    }

    /// The segments overlapping `r`, unclipped, with mutable values.
    ///
    /// The caller must not change a value in a way that makes it mergeable
    /// with a neighbour without calling [`merge_range`](Self::merge_range).
    pub fn iter_range_mut(&mut self, r: Range) -> impl Iterator<Item = (Range, &mut V)> + '_ {
        let from = self.first_overlapping_start(r);
        self.map
            .range_mut(from..)
            .take_while(move |(&s, _)| s < r.end())
            .map(|(&s, e)| (Range::new_unchecked(s, e.end), &mut e.value))
            .filter(move |(sr, _)| sr.overlaps(r))
    }

    /// The gaps inside `r`, clipped to it, in address order.
    pub fn gaps(&self, r: Range) -> impl Iterator<Item = Range> + '_ {
        let mut cursor = r.start();
        let mut segs = self.iter_range(r);
        let mut done = r.is_empty();
        std::iter::from_fn(move || {
            while !done {
                match segs.next() {
                    Some((sr, _)) => {
                        let gap = Range::new_unchecked(cursor, sr.start().max(cursor));
                        cursor = sr.end().min(r.end());
                        if !gap.is_empty() {
                            return Some(gap);
                        }
                    }
                    None => {
                        done = true;
                        if cursor < r.end() {
                            return Some(Range::new_unchecked(cursor, r.end()));
                        }
                    }
                }
            }
            None
        })
    }

    /// What lies at `key`: the segment containing it, or the gap.
    pub fn find(&self, key: u64) -> Found<'_, V> {
        match self.find_segment(key) {
            Some((r, v)) => Found::Segment(r, v),
            None => Found::Gap(self.gap_around(key)),
        }
    }

    /// The segment containing `key`.
    pub fn find_segment(&self, key: u64) -> Option<(Range, &V)> {
        let (&s, e) = self.map.range(..=key).next_back()?;
        (key < e.end).then(|| (Range::new_unchecked(s, e.end), &e.value))
    }

    /// The segment containing `key`, with a mutable value (same caveat as
    /// [`iter_range_mut`](Self::iter_range_mut)).
    pub fn find_segment_mut(&mut self, key: u64) -> Option<(Range, &mut V)> {
        let (&s, e) = self.map.range_mut(..=key).next_back()?;
        (key < e.end).then(|| (Range::new_unchecked(s, e.end), &mut e.value))
    }

    /// The gap containing `key`, or `None` if a segment does.
    pub fn find_gap(&self, key: u64) -> Option<Range> {
        match self.find_segment(key) {
            Some(_) => None,
            None => Some(self.gap_around(key)),
        }
    }

    /// The first segment that contains `min` or starts after it.
    pub fn lower_bound_segment(&self, min: u64) -> Option<(Range, &V)> {
        if let Some(found) = self.find_segment(min) {
            return Some(found);
        }
        self.map
            .range((Bound::Excluded(min), Bound::Unbounded))
            .next()
            .map(|(&s, e)| (Range::new_unchecked(s, e.end), &e.value))
    }

    /// The last segment that contains `max` or ends at or before it.
    pub fn upper_bound_segment(&self, max: u64) -> Option<(Range, &V)> {
        self.map
            .range(..=max)
            .next_back()
            .map(|(&s, e)| (Range::new_unchecked(s, e.end), &e.value))
    }

    /// The lowest segment.
    pub fn first_segment(&self) -> Option<(Range, &V)> {
        self.iter().next()
    }

    /// The highest segment.
    pub fn last_segment(&self) -> Option<(Range, &V)> {
        self.iter().next_back()
    }

    /// True if no segment overlaps `r`.
    pub fn is_empty_range(&self, r: Range) -> bool {
        self.iter_range(r).next().is_none()
    }

    /// Total length covered by segments.
    pub fn span(&self) -> u64 {
        self.iter().map(|(r, _)| r.len()).sum()
    }

    /// Length of `r` covered by segments.
    pub fn span_range(&self, r: Range) -> u64 {
        self.iter_range(r)
            .map(|(sr, _)| sr.intersect(r).len())
            .sum()
    }

    /// Inserts `value` over `r`, merging with adjacent segments whose values
    /// agree. Returns the range of the segment that now holds `r`.
    ///
    /// Errors (set unchanged): `r` empty, or overlapping a segment.
    pub fn insert(&mut self, r: Range, value: V) -> Result<Range, SegmentError> {
        self.insert_without_merging(r, value)?;
        Ok(self.merge_around(r))
    }

    /// Inserts `value` over `r` as its own segment.
    ///
    /// Errors (set unchanged): `r` empty, or overlapping a segment.
    pub fn insert_without_merging(&mut self, r: Range, value: V) -> Result<(), SegmentError> {
        if r.is_empty() {
            return Err(SegmentError::Empty { start: r.start() });
        }
        // The last segment starting before `r.end` overlaps `r` iff any does.
        let last_before = self.map.range(..r.end()).next_back();
        if last_before.is_some_and(|(_, e)| e.end > r.start()) {
            let (existing, _) = self.iter_range(r).next().expect("an overlapping segment");
            return Err(SegmentError::Overlap { range: r, existing });
        }
        self.raw_insert(r, value);
        Ok(())
    }

    /// Splits the segment containing `x` into `[start, x)` and `[x, end)`.
    /// Returns false if no segment has `x` strictly inside it.
    pub fn split_at(&mut self, x: u64) -> bool {
        let Some((r, _)) = self.find_segment(x) else {
            return false;
        };
        if !r.can_split_at(x) {
            return false;
        }
        let entry = self.map.get_mut(&r.start()).expect("segment just found");
        let (left, right) = entry.value.split(r, x);
        entry.end = x;
        entry.value = left;
        self.map.insert(
            x,
            Entry {
                end: r.end(),
                value: right,
            },
        );
        true
    }

    /// Splits the segment containing `key` so that its part inside `r` is a
    /// segment of its own, and returns that part's range.
    ///
    /// Returns `None` if no segment contains `key` or `key` is outside `r`.
    pub fn isolate(&mut self, key: u64, r: Range) -> Option<Range> {
        if !r.contains(key) {
            return None;
        }
        let (seg, _) = self.find_segment(key)?;
        // Split only this segment: `r` may reach into its neighbours, which
        // must be left whole.
        if seg.can_split_at(r.start()) {
            self.split_at(r.start());
        }
        if seg.can_split_at(r.end()) {
            self.split_at(r.end());
        }
        Some(seg.intersect(r))
    }

    /// Removes the segment containing `key` and returns it.
    pub fn remove(&mut self, key: u64) -> Option<(Range, V)> {
        let (r, _) = self.find_segment(key)?;
        Some(self.raw_remove(r.start()))
    }

    /// Removes everything inside `r`, splitting segments that cross its
    /// edges, and returns the removed pieces in address order.
    pub fn remove_range(&mut self, r: Range) -> Vec<(Range, V)> {
        if r.is_empty() {
            return Vec::new();
        }
        self.split_at(r.start());
        self.split_at(r.end());
        let starts: Vec<u64> = self
            .map
            .range(r.start()..r.end())
            .map(|(&s, _)| s)
            .collect();
        let Some(&first) = starts.first() else {
            return Vec::new();
        };
        // One pass over the gap index for the whole run (rather than a merge
        // per segment): the gaps between removed segments go, and the gap
        // that replaces them all reuses a neighbouring gap's node in place
        // (see `GapIndex::adjust`).
        let prev_end = self
            .map
            .range(..first)
            .next_back()
            .map_or(0, |(_, e)| e.end);
        let mut cursor = prev_end;
        let mut out = Vec::with_capacity(starts.len());
        for start in starts {
            if cursor < start && cursor != prev_end {
                self.gaps.remove(cursor);
            }
            let entry = self.map.remove(&start).expect("segment just listed");
            cursor = entry.end;
            out.push((Range::new_unchecked(start, entry.end), entry.value));
        }
        let next_start = self
            .map
            .range(cursor..)
            .next()
            .map_or(u64::MAX, |(&s, _)| s);
        let len = next_start - prev_end;
        match (prev_end < first, cursor < next_start) {
            (true, true) => {
                self.gaps.remove(cursor);
                self.gaps.adjust(prev_end, prev_end, len);
            }
            (true, false) => self.gaps.adjust(prev_end, prev_end, len),
            (false, true) => self.gaps.adjust(cursor, prev_end, len),
            (false, false) => self.gaps.insert(prev_end, len),
        }
        out
    }

    /// Applies `f` to every segment inside `r` after isolating the segments
    /// that cross its edges. `r` must be fully covered; if it is not, returns
    /// [`SegmentError::NotCovered`] and changes nothing (prepare, then
    /// mutate). Does not merge afterwards; see [`merge_range`](Self::merge_range).
    pub fn apply_contiguous(
        &mut self,
        r: Range,
        mut f: impl FnMut(Range, &mut V),
    ) -> Result<(), SegmentError> {
        if let Some(gap) = self.gaps(r).next() {
            return Err(SegmentError::NotCovered { range: r, gap });
        }
        if r.is_empty() {
            // Nothing to apply to; splitting at `r.start` would only leave
            // an unmerged boundary inside the segment holding it.
            return Ok(());
        }
        self.split_at(r.start());
        self.split_at(r.end());
        for (sr, v) in self.iter_range_mut(r) {
            f(sr, v);
        }
        Ok(())
    }

    /// Merges every pair of adjacent segments overlapping `r` (or touching
    /// its edges) whose values agree.
    pub fn merge_range(&mut self, r: Range) {
        let widened = Range::new_unchecked(r.start().saturating_sub(1), r.end().saturating_add(1));
        let starts: Vec<u64> = self.iter_range(widened).map(|(sr, _)| sr.start()).collect();
        // Walk right to left so each start stays valid as its right neighbour
        // is absorbed.
        for &s in starts.iter().rev() {
            if let Some(end) = self.map.get(&s).map(|e| e.end) {
                self.try_merge_at(end);
            }
        }
    }

    /// Merges at the two edges of `r` only: the segment ending at `r.start`
    /// with the one starting there, and likewise at `r.end`.
    pub fn merge_adjacent(&mut self, r: Range) {
        self.try_merge_at(r.end());
        self.try_merge_at(r.start());
    }

    /// Merges every mergeable pair in the set.
    pub fn merge_all(&mut self) {
        self.merge_range(Range::new_unchecked(0, u64::MAX));
    }

    /// The lowest range of `len` bytes starting at a multiple of `align` (a
    /// power of two) that lies in a gap and inside `within`.
    ///
    /// Complexity: `O(log n)` expected per candidate gap. A candidate is a gap
    /// of at least `len` bytes at or above `within.start`; it is rejected only
    /// when alignment pushes the range past its end, so for page-sized
    /// alignment or gaps much longer than `len` the first candidate fits.
    pub fn first_fit(&self, within: Range, len: u64, align: u64) -> Option<Range> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let fit = |gap: Range| -> Option<Range> {
            let g = gap.intersect(within);
            let start = align_up(g.start(), align)?;
            let end = start.checked_add(len)?;
            (end <= g.end()).then(|| Range::new_unchecked(start, end))
        };
        let mut from = within.start();
        if let Some(gap) = self.find_gap(from) {
            if let Some(found) = fit(gap) {
                return Some(found);
            }
            from = gap.end();
        }
        while from < within.end() {
            let (start, gap_len) = self.gaps.first_at_least(from, len)?;
            if start >= within.end() {
                return None;
            }
            if let Some(found) = fit(Range::new_unchecked(start, start + gap_len)) {
                return Some(found);
            }
            from = start + 1;
        }
        None
    }

    // ---- internals ----

    /// Start key from which segments overlapping `r` can be found.
    fn first_overlapping_start(&self, r: Range) -> u64 {
        match self.map.range(..=r.start()).next_back() {
            Some((&s, e)) if e.end > r.start() => s,
            _ => r.start(),
        }
    }

    /// The gap around `key`, which no segment contains.
    fn gap_around(&self, key: u64) -> Range {
        let start = self.map.range(..=key).next_back().map_or(0, |(_, e)| e.end);
        let end = self
            .map
            .range((Bound::Excluded(key), Bound::Unbounded))
            .next()
            .map_or(u64::MAX, |(&s, _)| s);
        Range::new_unchecked(start, end)
    }

    /// Inserts a segment into a gap, keeping the gap index in step.
    ///
    /// Preconditions: `r` is non-empty and inside one gap.
    fn raw_insert(&mut self, r: Range, value: V) {
        let gap = self.gap_around(r.start());
        debug_assert!(gap.is_superset_of(r), "{r} not inside gap {gap}");
        // Reuse the gap's node for what is left of it (in place, see
        // `GapIndex::adjust`); only a gap split in two needs an insert.
        match (gap.start() < r.start(), r.end() < gap.end()) {
            (true, true) => {
                self.gaps
                    .adjust(gap.start(), gap.start(), r.start() - gap.start());
                self.gaps.insert(r.end(), gap.end() - r.end());
            }
            (true, false) => self
                .gaps
                .adjust(gap.start(), gap.start(), r.start() - gap.start()),
            (false, true) => self.gaps.adjust(gap.start(), r.end(), gap.end() - r.end()),
            (false, false) => self.gaps.remove(gap.start()),
        }
        self.map.insert(
            r.start(),
            Entry {
                end: r.end(),
                value,
            },
        );
    }

    /// Removes the segment starting at `start`, keeping the gap index in step.
    ///
    /// Preconditions: a segment starts at `start`.
    fn raw_remove(&mut self, start: u64) -> (Range, V) {
        let entry = self
            .map
            .remove(&start)
            .expect("raw_remove of a missing segment");
        let r = Range::new_unchecked(start, entry.end);
        let gap = self.gap_around(start);
        // Grow a neighbouring gap's node in place (see `GapIndex::adjust`).
        match (gap.start() < start, r.end() < gap.end()) {
            (true, true) => {
                self.gaps.remove(r.end());
                self.gaps.adjust(gap.start(), gap.start(), gap.len());
            }
            (true, false) => self.gaps.adjust(gap.start(), gap.start(), gap.len()),
            (false, true) => self.gaps.adjust(r.end(), gap.start(), gap.len()),
            (false, false) => self.gaps.insert(gap.start(), gap.len()),
        }
        (r, entry.value)
    }

    /// Merges the segment ending at `at` with the one starting at `at`, if
    /// both exist and their values agree. Returns true if they merged.
    fn try_merge_at(&mut self, at: u64) -> bool {
        let Some((left, lv)) = at.checked_sub(1).and_then(|k| self.find_segment(k)) else {
            return false;
        };
        if left.end() != at {
            return false;
        }
        let Some(right_entry) = self.map.get(&at) else {
            return false;
        };
        let right = Range::new_unchecked(at, right_entry.end);
        let Some(merged) = lv.merge(left, &right_entry.value, right) else {
            return false;
        };
        // Adjacent segments share no gap, so the gap index is unaffected.
        self.map.remove(&at);
        let entry = self.map.get_mut(&left.start()).expect("left segment");
        entry.end = right.end();
        entry.value = merged;
        true
    }

    /// Merges the segment holding `r` with its neighbours and returns the
    /// merged range.
    fn merge_around(&mut self, r: Range) -> Range {
        self.try_merge_at(r.end());
        self.try_merge_at(r.start());
        self.find_segment(r.start())
            .map(|(sr, _)| sr)
            .expect("segment just inserted")
    }
}

impl<V: SegmentValue + std::fmt::Debug> std::fmt::Debug for SegmentSet<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests;
