//! Invariant checks and size accounting of a [`SegmentSet`].

use super::{Entry, SegmentSet, SegmentValue};
use crate::range::Range;

impl<V: SegmentValue> SegmentSet<V> {
    /// An estimate of the heap bytes the set holds: one map entry (start,
    /// end, value) per segment plus the gap index's node arena. B-tree node
    /// overhead (about a third on top) is not counted.
    pub fn heap_bytes(&self) -> usize {
        self.map.len() * (std::mem::size_of::<u64>() + std::mem::size_of::<Entry<V>>())
            + self.gaps.heap_bytes()
    }

    /// True if no two adjacent segments could merge.
    pub fn is_maximally_merged(&self) -> bool {
        let mut prev: Option<(Range, &V)> = None;
        for (r, v) in self.iter() {
            if let Some((pr, pv)) = prev {
                if pr.end() == r.start() && pv.merge(pr, v, r).is_some() {
                    return false;
                }
            }
            prev = Some((r, v));
        }
        true
    }

    /// Checks the set's invariants; the error names the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut prev_end = 0u64;
        let mut expected_gaps = Vec::new();
        for (&s, e) in &self.map {
            if s >= e.end {
                return Err(format!("empty or inverted segment [{s:#x}, {:#x})", e.end));
            }
            if s < prev_end {
                return Err(format!(
                    "segment at {s:#x} overlaps previous ending {prev_end:#x}"
                ));
            }
            if s > prev_end {
                expected_gaps.push((prev_end, s - prev_end));
            }
            prev_end = e.end;
        }
        if prev_end < u64::MAX {
            expected_gaps.push((prev_end, u64::MAX - prev_end));
        }
        let got = self.gaps.to_vec();
        if got != expected_gaps {
            return Err(format!(
                "gap index {got:x?} != recomputed gaps {expected_gaps:x?}"
            ));
        }
        self.gaps.check_invariants()
    }
}
