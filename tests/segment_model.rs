//! Model-based property test of [`SegmentSet`].
//!
//! Random operation sequences are applied both to a `SegmentSet` and to a
//! naive model: one cell per unit of a small key space (`UNITS` units of
//! `unit` keys each), holding the label and offset the set should hold there.
//! After every step the set's invariants, its contents, and its merging are
//! compared with the model; mutations are also checked structurally against
//! the segment list taken before the step (what was split, removed, merged),
//! and every query is answered from the model and compared.
//!
//! Each model test runs batches of random sequences until it has applied at
//! least `MIN_TOTAL_OPS` operations. A failure panics with the step and
//! operation that went wrong and the shrunk sequence (`minimal failing input:
//! [...]`), which replays it from an empty set; proptest also records the
//! seed in `tests/segment_model.proptest-regressions` so the next run
//! retries it first.
//!
//! `first_fit_matches_linear_scan_on_100k_segments` checks the gap index at
//! scale against a linear scan of an independently kept segment list.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

use guestmm::range::align_up;
use guestmm::segment::{Found, SegmentError, SegmentSet, SegmentValue};
use guestmm::Range;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};

/// Units in the model's key space.
const UNITS: u64 = 256;
/// Cases per proptest batch, each of up to `MAX_OPS` operations (any length,
/// so a failure shrinks to a short sequence).
const CASES: u32 = 50;
const MAX_OPS: usize = 400;
/// Each model test keeps running batches until it has applied this many.
const MIN_TOTAL_OPS: usize = 10_000;

fn r(start: u64, end: u64) -> Range {
    Range::new(start, end).unwrap()
}

/// What the model stores per unit: label and the offset at the unit's start.
type Cell = (u8, u64);

/// A segment value the harness can build, relabel and read back per unit.
trait TestValue: SegmentValue + Debug + PartialEq {
    fn make(label: u8, offset: u64) -> Self;
    fn set_label(&mut self, label: u8);
    /// The model cell for `key` in segment `seg` holding `self`.
    fn cell_at(&self, seg: Range, key: u64) -> Cell;
}

/// Mergeable when labels agree and offsets are contiguous (a file mapping).
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

impl TestValue for Val {
    fn make(label: u8, offset: u64) -> Self {
        Val { label, offset }
    }
    fn set_label(&mut self, label: u8) {
        self.label = label;
    }
    fn cell_at(&self, seg: Range, key: u64) -> Cell {
        (self.label, self.offset + (key - seg.start()))
    }
}

/// Mergeable whenever labels agree, so merging happens often.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Label(u8);

impl SegmentValue for Label {
    fn merge(&self, _left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        (self.0 == right_value.0).then(|| self.clone())
    }
    fn split(&self, _range: Range, _at: u64) -> (Self, Self) {
        (self.clone(), self.clone())
    }
}

impl TestValue for Label {
    fn make(label: u8, _offset: u64) -> Self {
        Label(label)
    }
    fn set_label(&mut self, label: u8) {
        self.0 = label;
    }
    fn cell_at(&self, _seg: Range, _key: u64) -> Cell {
        (self.0, 0)
    }
}

// ---- operations ----

/// A unit-aligned range `[start, start + len)` in units, clipped to the key
/// space when applied.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u16,
    len: u16,
}

/// A query range in keys: starts `sub_start % unit` keys into unit `start`,
/// runs `len` units plus `sub_len % unit` keys; may extend past the key space.
#[derive(Clone, Copy, Debug)]
struct Query {
    start: u16,
    len: u16,
    sub_start: u16,
    sub_len: u16,
}

#[derive(Clone, Debug)]
enum Op {
    Insert {
        at: Span,
        label: u8,
        shift: u8,
    },
    InsertWithoutMerging {
        at: Span,
        label: u8,
        shift: u8,
    },
    Remove {
        key: u16,
        sub: u16,
    },
    RemoveRange {
        at: Span,
    },
    SplitAt {
        key: u16,
    },
    /// `isolate(key, within)` with key `within.start + key_off % (len + 2)`.
    Isolate {
        within: Span,
        key_off: u16,
        sub: u16,
    },
    Apply {
        at: Span,
        label: u8,
    },
    MergeRange {
        at: Query,
    },
    /// `merge_range` over the whole key space (or over `[0, u64::MAX)`).
    MergeWhole {
        to_max: bool,
    },
    MergeAdjacent {
        at: Span,
    },
    MergeAll,
    Point {
        key: u16,
        sub: u16,
    },
    Ranges {
        at: Query,
    },
    FirstFit {
        within: Query,
        to_max: bool,
        len: u16,
        sub: u16,
        align_shift: u8,
        bad_align: bool,
    },
}

fn len_units() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 0u16..8, 3 => 0u16..48, 1 => 0u16..=UNITS as u16]
}

fn span() -> impl Strategy<Value = Span> {
    (0..=UNITS as u16, len_units()).prop_map(|(start, len)| Span { start, len })
}

fn query() -> impl Strategy<Value = Query> {
    (0..=UNITS as u16, len_units(), sub(), sub()).prop_map(|(start, len, sub_start, sub_len)| {
        Query {
            start,
            len,
            sub_start,
            sub_len,
        }
    })
}

/// A sub-unit offset (taken modulo the unit): zero half the time, so exact
/// fits and unit boundaries come up often with page-sized units too.
fn sub() -> impl Strategy<Value = u16> {
    prop_oneof![Just(0u16), any::<u16>()]
}

fn key() -> impl Strategy<Value = u16> {
    0..=UNITS as u16 + 4
}

fn op() -> impl Strategy<Value = Op> {
    let label = 0u8..3;
    let shift = prop_oneof![3 => Just(0u8), 1 => 0u8..4];
    prop_oneof![
        8 => (span(), label.clone(), shift.clone())
            .prop_map(|(at, label, shift)| Op::Insert { at, label, shift }),
        2 => (span(), label.clone(), shift)
            .prop_map(|(at, label, shift)| Op::InsertWithoutMerging { at, label, shift }),
        2 => (key(), sub()).prop_map(|(key, sub)| Op::Remove { key, sub }),
        2 => span().prop_map(|at| Op::RemoveRange { at }),
        2 => key().prop_map(|key| Op::SplitAt { key }),
        2 => (span(), any::<u16>(), sub())
            .prop_map(|(within, key_off, sub)| Op::Isolate { within, key_off, sub }),
        2 => (span(), label).prop_map(|(at, label)| Op::Apply { at, label }),
        1 => query().prop_map(|at| Op::MergeRange { at }),
        1 => any::<bool>().prop_map(|to_max| Op::MergeWhole { to_max }),
        1 => span().prop_map(|at| Op::MergeAdjacent { at }),
        1 => Just(Op::MergeAll),
        2 => (key(), sub()).prop_map(|(key, sub)| Op::Point { key, sub }),
        2 => query().prop_map(|at| Op::Ranges { at }),
        3 => (
            query(),
            prop::bool::weighted(0.125),
            prop_oneof![2 => 0u16..4, 2 => 0u16..32, 1 => 0u16..=UNITS as u16],
            sub(),
            0u8..23,
            prop::bool::weighted(0.05),
        )
            .prop_map(|(within, to_max, len, sub, align_shift, bad_align)| Op::FirstFit {
                within,
                to_max,
                len,
                sub,
                align_shift,
                bad_align,
            }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..=MAX_OPS)
}

// ---- helpers over segment lists ----

type Segs<V> = Vec<(Range, V)>;

fn split_piece<V: SegmentValue>(seg: Range, v: &V, at: u64) -> [(Range, V); 2] {
    let (a, b) = v.split(seg, at);
    [(r(seg.start(), at), a), (r(at, seg.end()), b)]
}

/// `segs` with every segment (or only the one equal to `only`) split at each
/// of `points` that falls strictly inside it.
fn cut<V: SegmentValue>(segs: &[(Range, V)], points: &[u64], only: Option<Range>) -> Segs<V> {
    let mut out = Vec::new();
    for (seg, v) in segs {
        let mut pieces = vec![(*seg, v.clone())];
        if only.is_none_or(|o| o == *seg) {
            for &p in points {
                let (last, lv) = pieces.pop().unwrap();
                if last.can_split_at(p) {
                    pieces.extend(split_piece(last, &lv, p));
                } else {
                    pieces.push((last, lv));
                }
            }
        }
        out.extend(pieces);
    }
    out
}

/// The maximally merged form of `segs` (values here merge transitively, so
/// it is unique).
fn merged<V: SegmentValue>(segs: &[(Range, V)]) -> Segs<V> {
    let mut out: Segs<V> = Vec::new();
    for (seg, v) in segs {
        if let Some((lr, lv)) = out.last_mut() {
            if lr.end() == seg.start() {
                if let Some(m) = lv.merge(*lr, v, *seg) {
                    *lr = r(lr.start(), seg.end());
                    *lv = m;
                    continue;
                }
            }
        }
        out.push((*seg, v.clone()));
    }
    out
}

/// Boundaries between adjacent segments, with whether the pair could merge.
fn junctions<V: SegmentValue>(segs: &[(Range, V)]) -> Vec<(u64, bool)> {
    segs.windows(2)
        .filter(|w| w[0].0.end() == w[1].0.start())
        .map(|w| {
            (
                w[0].0.end(),
                w[0].1.merge(w[0].0, &w[1].1, w[1].0).is_some(),
            )
        })
        .collect()
}

fn overlaps_nonempty(a: Range, b: Range) -> bool {
    !a.intersect(b).is_empty()
}

// ---- the harness ----

struct Harness<V> {
    unit: u64,
    set: SegmentSet<V>,
    model: Vec<Option<Cell>>,
    /// The API promises the set is maximally merged right now.
    merged: bool,
}

impl<V: TestValue> Harness<V> {
    fn new(unit: u64) -> Self {
        Harness {
            unit,
            set: SegmentSet::new(),
            model: vec![None; UNITS as usize],
            merged: true,
        }
    }

    fn segs(&self) -> Segs<V> {
        self.set.iter().map(|(r, v)| (r, v.clone())).collect()
    }

    fn span_range(&self, s: Span) -> Range {
        let start = u64::from(s.start).min(UNITS);
        let end = (start + u64::from(s.len)).min(UNITS);
        r(start * self.unit, end * self.unit)
    }

    fn query_range(&self, q: Query) -> Range {
        let start = u64::from(q.start) * self.unit + u64::from(q.sub_start) % self.unit;
        let len = u64::from(q.len) * self.unit + u64::from(q.sub_len) % self.unit;
        r(start, start + len)
    }

    fn key(&self, k: u16, sub: u16) -> u64 {
        u64::from(k) * self.unit + u64::from(sub) % self.unit
    }

    fn occupied(&self, key: u64) -> bool {
        let u = key / self.unit;
        u < UNITS && self.model[u as usize].is_some()
    }

    /// Units overlapping keys `[s, e)`, clipped to the key space.
    fn units_of(&self, s: u64, e: u64) -> std::ops::Range<usize> {
        let u0 = (s / self.unit).min(UNITS);
        let u1 = (e / self.unit + u64::from(e % self.unit != 0)).min(UNITS);
        u0 as usize..u1.max(u0) as usize
    }

    fn model_write(&mut self, seg: Range, v: &V) {
        for u in self.units_of(seg.start(), seg.end()) {
            self.model[u] = Some(v.cell_at(seg, u as u64 * self.unit));
        }
    }

    fn model_clear(&mut self, seg: Range) {
        for u in self.units_of(seg.start(), seg.end()) {
            self.model[u] = None;
        }
    }

    /// The model's gaps: maximal free key ranges of `[0, u64::MAX)`.
    fn model_gaps(&self) -> Vec<Range> {
        let mut out = Vec::new();
        let mut open: Option<u64> = None;
        for (u, cell) in self.model.iter().enumerate() {
            let key = u as u64 * self.unit;
            match (cell, open) {
                (None, None) => open = Some(key),
                (Some(_), Some(s)) => {
                    out.push(r(s, key));
                    open = None;
                }
                _ => {}
            }
        }
        out.push(r(open.unwrap_or(UNITS * self.unit), u64::MAX));
        out
    }

    /// Keys of `q` covered by the model.
    fn model_span(&self, q: Range) -> u64 {
        self.units_of(q.start(), q.end())
            .filter(|&u| self.model[u].is_some())
            .map(|u| {
                let unit = r(u as u64 * self.unit, (u as u64 + 1) * self.unit);
                unit.intersect(q).len()
            })
            .sum()
    }

    /// Brute force: the lowest `align`-aligned start `s` with `[s, s + len)`
    /// free and inside `within`. Every unit past the key space is free.
    ///
    /// Only starts `align_up(x)` need trying, for `x` = `within.start` or a
    /// unit boundary inside `within`: for the answer `s`, the larger of
    /// `within.start` and the start of the free run holding `s` is such an
    /// `x`, and `align_up(x) <= s` fits too, so it is `s`.
    fn model_first_fit(&self, within: Range, len: u64, align: u64) -> Option<Range> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let mut prefix = vec![0u32; UNITS as usize + 1];
        for (u, cell) in self.model.iter().enumerate() {
            prefix[u + 1] = prefix[u] + u32::from(cell.is_some());
        }
        let free = |s: u64, e: u64| {
            let us = self.units_of(s, e);
            prefix[us.end] == prefix[us.start]
        };
        let boundaries = (0..=UNITS)
            .map(|u| u * self.unit)
            .filter(|&x| within.start() < x && x < within.end());
        std::iter::once(within.start())
            .chain(boundaries)
            .filter_map(|x| {
                let s = align_up(x, align)?;
                let e = s.checked_add(len)?;
                (e <= within.end() && free(s, e)).then(|| r(s, e))
            })
            .min()
    }

    /// Compares the set with the model after a step.
    fn check(&self, step: usize, op: &Op) -> Result<(), TestCaseError> {
        if let Err(e) = self.set.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "step {step} {op:?}: invariants broken: {e}\nset: {:?}",
                self.set
            )));
        }
        let segs = self.segs();
        let mut seen = vec![None; UNITS as usize];
        for (seg, v) in &segs {
            prop_assert!(
                seg.start() % self.unit == 0
                    && seg.end() % self.unit == 0
                    && seg.end() <= UNITS * self.unit,
                "step {} {:?}: segment {} off the unit grid or key space",
                step,
                op,
                seg
            );
            for u in self.units_of(seg.start(), seg.end()) {
                seen[u] = Some(v.cell_at(*seg, u as u64 * self.unit));
            }
        }
        if seen != self.model {
            let u = (0..seen.len()).find(|&u| seen[u] != self.model[u]).unwrap();
            return Err(TestCaseError::fail(format!(
                "step {step} {op:?}: contents differ first at unit {u} (key {:#x}): set {:?}, \
                 model {:?}\nset: {:?}",
                u as u64 * self.unit,
                seen[u],
                self.model[u],
                self.set
            )));
        }
        let pairwise = junctions(&segs).iter().all(|&(_, m)| !m);
        prop_assert_eq!(self.set.is_maximally_merged(), pairwise);
        if self.merged {
            prop_assert!(
                pairwise,
                "step {} {:?}: set should be maximally merged: {:?}",
                step,
                op,
                self.set
            );
        }
        prop_assert_eq!(self.set.len(), segs.len());
        prop_assert_eq!(self.set.is_empty(), segs.is_empty());
        let covered = self.model.iter().filter(|c| c.is_some()).count() as u64;
        prop_assert_eq!(self.set.span(), covered * self.unit);
        prop_assert_eq!(
            self.set.first_segment().map(|(r, v)| (r, v.clone())),
            segs.first().cloned()
        );
        prop_assert_eq!(
            self.set.last_segment().map(|(r, v)| (r, v.clone())),
            segs.last().cloned()
        );
        Ok(())
    }

    /// Expected result of an insert into `before`: the error, or the
    /// segment list after it and the range of the segment holding `at`.
    fn expect_insert(
        &self,
        before: &[(Range, V)],
        at: Range,
        v: &V,
        merge: bool,
    ) -> Result<(Segs<V>, Range), SegmentError> {
        if at.is_empty() {
            return Err(SegmentError::Empty { start: at.start() });
        }
        if let Some((existing, _)) = before.iter().find(|(s, _)| overlaps_nonempty(*s, at)) {
            return Err(SegmentError::Overlap {
                range: at,
                existing: *existing,
            });
        }
        let mut cur = (at, v.clone());
        let mut drop = Vec::new();
        if merge {
            if let Some((rr, rv)) = before.iter().find(|(s, _)| s.start() == at.end()) {
                if let Some(m) = cur.1.merge(cur.0, rv, *rr) {
                    cur = (r(cur.0.start(), rr.end()), m);
                    drop.push(*rr);
                }
            }
            if let Some((lr, lv)) = before.iter().find(|(s, _)| s.end() == at.start()) {
                if let Some(m) = lv.merge(*lr, &cur.1, cur.0) {
                    cur = (r(lr.start(), cur.0.end()), m);
                    drop.push(*lr);
                }
            }
        }
        let holder = cur.0;
        let mut after: Segs<V> = before
            .iter()
            .filter(|(s, _)| !drop.contains(s))
            .cloned()
            .collect();
        after.push(cur);
        after.sort_by_key(|(s, _)| s.start());
        Ok((after, holder))
    }

    fn apply(&mut self, step: usize, op: &Op) -> Result<(), TestCaseError> {
        let before = self.segs();
        let ctx = |what: &str| format!("step {step} {op:?}: {what}");
        match *op {
            Op::Insert { at, label, shift } | Op::InsertWithoutMerging { at, label, shift } => {
                let merge = matches!(op, Op::Insert { .. });
                let at_r = self.span_range(at);
                let v = V::make(label, (u64::from(at.start) + u64::from(shift)) * self.unit);
                let want = self.expect_insert(&before, at_r, &v, merge);
                let got = if merge {
                    self.set.insert(at_r, v.clone())
                } else {
                    self.set
                        .insert_without_merging(at_r, v.clone())
                        .map(|()| at_r)
                };
                // Error iff the model has something there (or the range is empty).
                let model_busy = self.model_span(at_r) > 0;
                prop_assert_eq!(
                    got.is_err(),
                    at_r.is_empty() || model_busy,
                    "{}",
                    ctx("error iff empty or overlapping")
                );
                match want {
                    Err(e) => {
                        prop_assert_eq!(got, Err(e), "{}", ctx("insert error"));
                        prop_assert_eq!(
                            self.segs(),
                            before,
                            "{}",
                            ctx("failed insert changed the set")
                        );
                    }
                    Ok((after, holder)) => {
                        prop_assert_eq!(got, Ok(holder), "{}", ctx("insert result"));
                        prop_assert_eq!(self.segs(), after, "{}", ctx("segments after insert"));
                        self.model_write(at_r, &v);
                        if !merge {
                            self.merged = false;
                        }
                    }
                }
            }
            Op::Remove { key, sub } => {
                let k = self.key(key, sub);
                let want = before.iter().find(|(s, _)| s.contains(k)).cloned();
                prop_assert_eq!(want.is_some(), self.occupied(k), "{}", ctx("model"));
                let got = self.set.remove(k);
                prop_assert_eq!(&got, &want, "{}", ctx("removed segment"));
                if let Some((seg, _)) = got {
                    self.model_clear(seg);
                }
                let after: Segs<V> = before
                    .iter()
                    .filter(|(s, _)| !s.contains(k))
                    .cloned()
                    .collect();
                prop_assert_eq!(self.segs(), after, "{}", ctx("segments after remove"));
            }
            Op::RemoveRange { at } => {
                let at_r = self.span_range(at);
                let (want, after): (Segs<V>, Segs<V>) = if at_r.is_empty() {
                    (Vec::new(), before.clone())
                } else {
                    cut(&before, &[at_r.start(), at_r.end()], None)
                        .into_iter()
                        .partition(|(s, _)| at_r.is_superset_of(*s))
                };
                let got = self.set.remove_range(at_r);
                prop_assert_eq!(got, want, "{}", ctx("removed pieces"));
                prop_assert_eq!(self.segs(), after, "{}", ctx("segments after remove_range"));
                self.model_clear(at_r);
            }
            Op::SplitAt { key } => {
                let k = self.key(key, 0);
                let want = before.iter().any(|(s, _)| s.can_split_at(k));
                prop_assert_eq!(self.set.split_at(k), want, "{}", ctx("split result"));
                prop_assert_eq!(
                    self.segs(),
                    cut(&before, &[k], None),
                    "{}",
                    ctx("segments after split")
                );
                if want {
                    self.merged = false;
                }
            }
            Op::Isolate {
                within,
                key_off,
                sub,
            } => {
                let w = self.span_range(within);
                let units = w.len() / self.unit;
                let k = w.start()
                    + (u64::from(key_off) % (units + 2)) * self.unit
                    + u64::from(sub) % self.unit;
                let seg = before.iter().find(|(s, _)| s.contains(k)).map(|(s, _)| *s);
                let want = seg.filter(|_| w.contains(k));
                let got = self.set.isolate(k, w);
                prop_assert_eq!(
                    got,
                    want.map(|s| s.intersect(w)),
                    "{}",
                    ctx("isolate result")
                );
                let after = match want {
                    Some(s) => cut(&before, &[w.start(), w.end()], Some(s)),
                    None => before.clone(),
                };
                let split = after.len() != before.len();
                prop_assert_eq!(
                    self.segs(),
                    after,
                    "{}",
                    ctx("isolate must split only the segment holding the key")
                );
                if split {
                    self.merged = false;
                }
            }
            Op::Apply { at, label } => {
                let at_r = self.span_range(at);
                let first_gap = self
                    .model_gaps()
                    .into_iter()
                    .map(|g| g.intersect(at_r))
                    .find(|g| !g.is_empty());
                let mut calls = Vec::new();
                let got = self.set.apply_contiguous(at_r, |seg, v| {
                    calls.push(seg);
                    v.set_label(label);
                });
                match first_gap {
                    Some(gap) => {
                        prop_assert_eq!(
                            got,
                            Err(SegmentError::NotCovered { range: at_r, gap }),
                            "{}",
                            ctx("apply over a gap")
                        );
                        prop_assert!(calls.is_empty(), "{}", ctx("f called on failure"));
                        prop_assert_eq!(
                            self.segs(),
                            before,
                            "{}",
                            ctx("failed apply changed the set")
                        );
                    }
                    None => {
                        prop_assert_eq!(got, Ok(()), "{}", ctx("apply result"));
                        let mut after = if at_r.is_empty() {
                            before.clone()
                        } else {
                            cut(&before, &[at_r.start(), at_r.end()], None)
                        };
                        let mut want_calls = Vec::new();
                        for (s, v) in &mut after {
                            if at_r.is_superset_of(*s) && !s.is_empty() && !at_r.is_empty() {
                                want_calls.push(*s);
                                v.set_label(label);
                            }
                        }
                        prop_assert_eq!(&calls, &want_calls, "{}", ctx("ranges passed to f"));
                        prop_assert_eq!(self.segs(), after, "{}", ctx("segments after apply"));
                        for u in self.units_of(at_r.start(), at_r.end()) {
                            self.model[u].as_mut().unwrap().0 = label;
                        }
                        if !at_r.is_empty() {
                            self.merged = false;
                        }
                    }
                }
            }
            Op::MergeRange { at } => {
                let q = self.query_range(at);
                self.set.merge_range(q);
                self.check_merge(&before, q.start(), q.end(), false, &ctx("merge_range"))?;
            }
            Op::MergeWhole { to_max } => {
                let q = r(0, if to_max { u64::MAX } else { UNITS * self.unit });
                self.set.merge_range(q);
                self.check_merge(
                    &before,
                    q.start(),
                    q.end(),
                    true,
                    &ctx("merge_range (whole)"),
                )?;
                self.merged = true;
            }
            Op::MergeAdjacent { at } => {
                let at_r = self.span_range(at);
                self.set.merge_adjacent(at_r);
                let after = self.segs();
                for (j, m) in junctions(&after) {
                    prop_assert!(
                        !(m && (j == at_r.start() || j == at_r.end())),
                        "{}",
                        ctx(&format!("mergeable pair left at edge {j:#x}"))
                    );
                }
                self.check_merge(&before, 1, 0, false, &ctx("merge_adjacent"))?;
            }
            Op::MergeAll => {
                self.set.merge_all();
                self.check_merge(&before, 0, u64::MAX, true, &ctx("merge_all"))?;
                self.merged = true;
            }
            Op::Point { key, sub } => {
                self.check_point(self.key(key, sub), &before, &ctx("query"))?
            }
            Op::Ranges { at } => self.check_ranges(self.query_range(at), &before, &ctx("query"))?,
            Op::FirstFit {
                within,
                to_max,
                len,
                sub,
                align_shift,
                bad_align,
            } => {
                let mut w = self.query_range(within);
                if to_max {
                    w = r(w.start(), u64::MAX);
                }
                let len = u64::from(len) * self.unit + u64::from(sub) % self.unit;
                let shift = if self.unit == 1 {
                    align_shift % 10
                } else {
                    align_shift
                };
                let align = if bad_align {
                    (3u64 << shift) * u64::from(shift % 2)
                } else {
                    1u64 << shift
                };
                let want = self.model_first_fit(w, len, align);
                let got = self.set.first_fit(w, len, align);
                prop_assert_eq!(
                    got,
                    want,
                    "{}",
                    ctx(&format!("first_fit({w}, {len:#x}, {align:#x})"))
                );
            }
        }
        if self.set.len() <= 1 {
            self.merged = true;
        }
        self.check(step, op)
    }

    /// After a merge: contents unchanged (checked by `check`), no boundary
    /// created, no mergeable pair left with its boundary in `[lo, hi]`, and
    /// with `whole` the set equals the maximally merged `before`.
    fn check_merge(
        &self,
        before: &[(Range, V)],
        lo: u64,
        hi: u64,
        whole: bool,
        ctx: &str,
    ) -> Result<(), TestCaseError> {
        let after = self.segs();
        let old: Vec<u64> = junctions(before).iter().map(|&(j, _)| j).collect();
        for (j, m) in junctions(&after) {
            prop_assert!(old.contains(&j), "{}: new boundary at {:#x}", ctx, j);
            prop_assert!(
                !(m && lo <= j && j <= hi),
                "{}: mergeable pair left at {:#x}",
                ctx,
                j
            );
        }
        if whole {
            prop_assert_eq!(&after, &merged(before), "{}: segments", ctx);
            prop_assert!(self.set.is_maximally_merged(), "{}", ctx);
        }
        Ok(())
    }

    fn check_point(&self, k: u64, segs: &[(Range, V)], ctx: &str) -> Result<(), TestCaseError> {
        let seg = segs.iter().find(|(s, _)| s.contains(k));
        prop_assert_eq!(seg.is_some(), self.occupied(k), "{}: model", ctx);
        let gap = self.model_gaps().into_iter().find(|g| g.contains(k));
        prop_assert_eq!(seg.is_none(), gap.is_some(), "{}: model gaps", ctx);
        let as_ref = |o: Option<&(Range, V)>| o.map(|(s, v)| (*s, v.clone()));
        let own = |o: Option<(Range, &V)>| o.map(|(s, v)| (s, v.clone()));
        prop_assert_eq!(
            own(self.set.find_segment(k)),
            as_ref(seg),
            "{}: find_segment({:#x})",
            ctx,
            k
        );
        prop_assert_eq!(self.set.find_gap(k), gap, "{}: find_gap({:#x})", ctx, k);
        let want_found = match (seg, gap) {
            (Some((s, v)), _) => Found::Segment(*s, v),
            (None, g) => Found::Gap(g.unwrap()),
        };
        prop_assert_eq!(self.set.find(k), want_found, "{}: find({:#x})", ctx, k);
        prop_assert_eq!(
            own(self.set.lower_bound_segment(k)),
            as_ref(segs.iter().find(|(s, _)| s.end() > k)),
            "{}: lower_bound_segment({:#x})",
            ctx,
            k
        );
        prop_assert_eq!(
            own(self.set.upper_bound_segment(k)),
            as_ref(segs.iter().rev().find(|(s, _)| s.start() <= k)),
            "{}: upper_bound_segment({:#x})",
            ctx,
            k
        );
        Ok(())
    }

    fn check_ranges(&self, q: Range, segs: &[(Range, V)], ctx: &str) -> Result<(), TestCaseError> {
        let want_gaps: Vec<Range> = self
            .model_gaps()
            .into_iter()
            .map(|g| g.intersect(q))
            .filter(|g| !g.is_empty())
            .collect();
        prop_assert_eq!(
            self.set.gaps(q).collect::<Vec<_>>(),
            want_gaps,
            "{}: gaps({})",
            ctx,
            q
        );
        let span = self.model_span(q);
        prop_assert_eq!(self.set.span_range(q), span, "{}: span_range({})", ctx, q);
        prop_assert_eq!(
            self.set.is_empty_range(q),
            span == 0,
            "{}: is_empty_range({})",
            ctx,
            q
        );
        let want_iter: Segs<V> = segs
            .iter()
            .filter(|(s, _)| overlaps_nonempty(*s, q))
            .cloned()
            .collect();
        let got_iter: Segs<V> = self
            .set
            .iter_range(q)
            .map(|(s, v)| (s, v.clone()))
            .collect();
        prop_assert_eq!(got_iter, want_iter, "{}: iter_range({})", ctx, q);
        Ok(())
    }
}

fn run<V: TestValue>(unit: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::<V>::new(unit);
    h.check(0, &Op::MergeAll)?;
    for (step, op) in ops.iter().enumerate() {
        h.apply(step, op)?;
    }
    Ok(())
}

/// Runs random operation sequences against the model until at least
/// `MIN_TOTAL_OPS` operations have been applied, in batches of `CASES` cases.
/// A failure panics with the shrunk operation sequence.
fn check_model<V: TestValue>(unit: u64) {
    let config = ProptestConfig {
        cases: CASES,
        max_shrink_iters: 50_000,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    };
    let applied = AtomicUsize::new(0);
    while applied.load(Ordering::Relaxed) < MIN_TOTAL_OPS {
        // A runner counts its passed cases, so each batch needs a fresh one.
        let mut runner = TestRunner::new(config.clone());
        let result = runner.run(&ops(), |ops| {
            applied.fetch_add(ops.len(), Ordering::Relaxed);
            run::<V>(unit, &ops)
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
    eprintln!(
        "{} ops applied (unit {unit})",
        applied.load(Ordering::Relaxed)
    );
}

/// Offset-carrying values, one key per unit.
#[test]
fn model_offset_values_unit_keys() {
    check_model::<Val>(1);
}

/// Offset-carrying values over page-sized units, with sub-page queries.
#[test]
fn model_offset_values_page_keys() {
    check_model::<Val>(4096);
}

/// Values that merge whenever labels agree, so merging is frequent.
#[test]
fn model_label_values() {
    check_model::<Label>(1);
}

// ---- scaling sanity ----

/// A value that never merges.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Id(u32);

impl SegmentValue for Id {
    fn merge(&self, _: Range, _: &Self, _: Range) -> Option<Self> {
        None
    }
    fn split(&self, _: Range, _: u64) -> (Self, Self) {
        (self.clone(), self.clone())
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// First fit by walking every gap of `segs` (start -> end) in order.
fn linear_first_fit(
    segs: &BTreeMap<u64, u64>,
    within: Range,
    len: u64,
    align: u64,
) -> Option<Range> {
    let mut gap_start = 0;
    let ends = segs
        .iter()
        .map(|(&s, &e)| (s, e))
        .chain([(u64::MAX, u64::MAX)]);
    for (s, e) in ends {
        if gap_start < s {
            let g = r(gap_start, s).intersect(within);
            if let Some(start) = align_up(g.start(), align) {
                if start.checked_add(len).is_some_and(|end| end <= g.end()) {
                    return Some(r(start, start + len));
                }
            }
        }
        gap_start = e;
    }
    None
}

#[test]
fn first_fit_matches_linear_scan_on_100k_segments() {
    const PAGE: u64 = 4096;
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut set = SegmentSet::new();
    let mut segs = BTreeMap::new();
    let mut cursor = 0u64;
    for i in 0..100_000u32 {
        let hole = match rng.below(100) {
            0..=29 => 0,
            30..=69 => 1 + rng.below(3),
            70..=89 => 4 + rng.below(60),
            90..=98 => 64 + rng.below(960),
            _ => 1024 + rng.below(15_360),
        };
        cursor += hole * PAGE;
        let len = (1 + rng.below(16)) * PAGE;
        set.insert(r(cursor, cursor + len), Id(i)).unwrap();
        segs.insert(cursor, cursor + len);
        cursor += len;
    }
    assert_eq!(set.len(), 100_000);
    set.check_invariants().unwrap();
    let top = cursor;

    let query = |set: &SegmentSet<Id>, segs: &BTreeMap<u64, u64>, rng: &mut XorShift| {
        let start = rng.below(top);
        let end = match rng.below(4) {
            0 => u64::MAX,
            _ => start + rng.below(top - start + PAGE),
        };
        let len = match rng.below(10) {
            0 => 1 + rng.below(PAGE),
            1..=5 => (1 + rng.below(8)) * PAGE,
            6..=8 => (1 + rng.below(1024)) * PAGE,
            _ => (1 + rng.below(20_000)) * PAGE,
        };
        let align = [1, PAGE, 2 * PAGE, 16 * PAGE, 2 << 20, 1 << 30][rng.below(6) as usize];
        let within = r(start, end);
        let got = set.first_fit(within, len, align);
        let want = linear_first_fit(segs, within, len, align);
        assert_eq!(got, want, "first_fit({within}, {len:#x}, {align:#x})");
        got
    };
    for _ in 0..300 {
        query(&set, &segs, &mut rng);
    }

    // Punch holes (merging neighbouring gaps in the index), then allocate
    // from the front the way an allocator would, checking as we go.
    let starts: Vec<u64> = segs.keys().copied().collect();
    for &s in starts.iter().step_by(7) {
        assert!(set.remove(s).is_some());
        segs.remove(&s);
    }
    set.check_invariants().unwrap();
    for i in 0..200u32 {
        let len = (1 + rng.below(32)) * PAGE;
        let align = [PAGE, 4 * PAGE, 2 << 20][rng.below(3) as usize];
        let within = r(rng.below(top / 2), u64::MAX);
        let got = set.first_fit(within, len, align);
        assert_eq!(got, linear_first_fit(&segs, within, len, align));
        let got = got.expect("the top gap always fits");
        set.insert(got, Id(1_000_000 + i)).unwrap();
        segs.insert(got.start(), got.end());
        query(&set, &segs, &mut rng);
    }
    set.check_invariants().unwrap();
}
