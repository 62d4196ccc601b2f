use super::*;

/// A test value: a label plus the offset of the segment start, mergeable
/// when labels agree and offsets are contiguous (like a file mapping).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Val {
    label: u8,
    offset: u64,
}

impl SegmentValue for Val {
    fn merge(&self, left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        (self.label == right_value.label && self.offset + left.len() == right_value.offset)
            .then(|| self.clone())
    }
    fn split(&self, range: Range, at: u64) -> (Self, Self) {
        let right = Val {
            label: self.label,
            offset: self.offset + (at - range.start()),
        };
        (self.clone(), right)
    }
}

fn r(s: u64, e: u64) -> Range {
    Range::new(s, e).unwrap()
}

fn v(label: u8, offset: u64) -> Val {
    Val { label, offset }
}

#[test]
fn insert_merges_contiguous_neighbours() {
    let mut set = SegmentSet::new();
    set.insert(r(0, 10), v(1, 0)).unwrap();
    set.insert(r(20, 30), v(1, 20)).unwrap();
    let merged = set.insert(r(10, 20), v(1, 10)).unwrap();
    assert_eq!(merged, r(0, 30), "got {merged}, want [0, 30)");
    assert_eq!(set.len(), 1);
    set.check_invariants().unwrap();
}

#[test]
fn insert_refuses_overlap_and_empty() {
    let mut set = SegmentSet::new();
    set.insert(r(10, 20), v(1, 0)).unwrap();
    assert_eq!(
        set.insert(r(15, 25), v(2, 0)),
        Err(SegmentError::Overlap {
            range: r(15, 25),
            existing: r(10, 20)
        })
    );
    assert_eq!(
        set.insert(r(5, 5), v(2, 0)),
        Err(SegmentError::Empty { start: 5 })
    );
    assert_eq!(set.len(), 1);
    set.check_invariants().unwrap();
}

#[test]
fn remove_range_splits_edges() {
    let mut set = SegmentSet::new();
    set.insert(r(0, 100), v(1, 0)).unwrap();
    let removed = set.remove_range(r(40, 60));
    assert_eq!(removed, vec![(r(40, 60), v(1, 40))]);
    let segs: Vec<_> = set.iter().map(|(r, v)| (r, v.clone())).collect();
    assert_eq!(segs, vec![(r(0, 40), v(1, 0)), (r(60, 100), v(1, 60))]);
    set.check_invariants().unwrap();
}

#[test]
fn apply_contiguous_refuses_gaps_without_change() {
    let mut set = SegmentSet::new();
    set.insert(r(0, 10), v(1, 0)).unwrap();
    set.insert(r(20, 30), v(1, 20)).unwrap();
    let err = set
        .apply_contiguous(r(5, 25), |_, v| v.label = 9)
        .unwrap_err();
    assert_eq!(
        err,
        SegmentError::NotCovered {
            range: r(5, 25),
            gap: r(10, 20)
        }
    );
    assert_eq!(set.len(), 2, "a failed apply must not split anything");
    set.apply_contiguous(r(22, 28), |_, v| v.label = 9).unwrap();
    assert_eq!(set.find_segment(25).unwrap(), (r(22, 28), &v(9, 22)));
    set.check_invariants().unwrap();
}

#[test]
fn find_and_bounds() {
    let mut set = SegmentSet::new();
    set.insert(r(10, 20), v(1, 0)).unwrap();
    set.insert(r(40, 50), v(2, 0)).unwrap();
    assert_eq!(set.find(15), Found::Segment(r(10, 20), &v(1, 0)));
    assert_eq!(set.find(25), Found::Gap(r(20, 40)));
    assert_eq!(set.find_gap(5), Some(r(0, 10)));
    assert_eq!(set.find_gap(60), Some(r(50, u64::MAX)));
    assert_eq!(set.lower_bound_segment(20).map(|s| s.0), Some(r(40, 50)));
    assert_eq!(set.upper_bound_segment(39).map(|s| s.0), Some(r(10, 20)));
    let gaps: Vec<_> = set.gaps(r(0, 60)).collect();
    assert_eq!(gaps, vec![r(0, 10), r(20, 40), r(50, 60)]);
    assert_eq!(set.span_range(r(15, 45)), 10);
}

#[test]
fn first_fit_honours_alignment_and_bounds() {
    let mut set = SegmentSet::new();
    set.insert(r(0, 0x1000), v(1, 0)).unwrap();
    set.insert(r(0x3000, 0x20_0000), v(2, 0)).unwrap();
    // The gap [0x1000, 0x3000) fits 0x2000 unaligned but not 2 MiB aligned.
    assert_eq!(
        set.first_fit(r(0, 1 << 40), 0x2000, 0x1000),
        Some(r(0x1000, 0x3000))
    );
    assert_eq!(
        set.first_fit(r(0, 1 << 40), 0x2000, 0x20_0000),
        Some(r(0x20_0000, 0x20_2000))
    );
    assert_eq!(set.first_fit(r(0, 0x20_1000), 0x2000, 0x20_0000), None);
    assert_eq!(
        set.first_fit(r(0x2000, 1 << 40), 0x1000, 0x1000),
        Some(r(0x2000, 0x3000))
    );
}

#[test]
fn isolate_leaves_neighbouring_segments_whole() {
    // `r` reaches from the key's segment into both neighbours; only the key's
    // segment may be split. Isolating used to split whatever segment held
    // `r.start` and `r.end`, cutting the neighbours too.
    let mut set = SegmentSet::new();
    set.insert(r(0, 10), v(1, 0)).unwrap();
    set.insert(r(10, 20), v(2, 10)).unwrap();
    set.insert(r(20, 30), v(3, 20)).unwrap();
    assert_eq!(set.isolate(15, r(5, 25)), Some(r(10, 20)));
    let segs: Vec<_> = set.iter().map(|(r, _)| r).collect();
    assert_eq!(segs, vec![r(0, 10), r(10, 20), r(20, 30)]);
    // And the key's segment is still cut where `r` ends inside it.
    assert_eq!(set.isolate(12, r(12, 25)), Some(r(12, 20)));
    let segs: Vec<_> = set.iter().map(|(r, _)| r).collect();
    assert_eq!(segs, vec![r(0, 10), r(10, 12), r(12, 20), r(20, 30)]);
    set.check_invariants().unwrap();
}

#[test]
fn apply_contiguous_on_empty_range_inside_segment_splits_nothing() {
    let mut set = SegmentSet::new();
    set.insert(r(0, 10), v(1, 0)).unwrap();
    let mut calls = 0;
    set.apply_contiguous(r(5, 5), |_, _| calls += 1).unwrap();
    assert_eq!(calls, 0);
    assert_eq!(set.len(), 1, "an empty apply must not split the segment");
    assert!(set.is_maximally_merged());
    set.check_invariants().unwrap();
}

#[test]
fn empty_range_inside_segment_overlaps_nothing() {
    // `Range::overlaps` calls [5, 5) and [0, 10) overlapping; the set must
    // not: an empty range holds no address.
    let mut set = SegmentSet::new();
    set.insert(r(0, 10), v(1, 0)).unwrap();
    assert!(set.is_empty_range(r(5, 5)));
    assert_eq!(set.iter_range(r(5, 5)).count(), 0);
    assert_eq!(set.iter_range_mut(r(5, 5)).count(), 0);
    assert_eq!(set.span_range(r(5, 5)), 0);
}
