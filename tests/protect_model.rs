//! Model-based property test of `mm::protect::ProtectionRanges`: a mapping
//! of `PAGES` pages against a plain per-page `Vec<Perms>`.
//!
//! Each case runs a random sequence of protects (valid and invalid), vma
//! splits merged back, shrinks from either side and middle unmaps (on
//! copies), and queries. After every step the invariants must hold and
//! `flags_at`, `regions`/`enumerate`, `max_perms_in` and `region_count`
//! must agree with the model; every protect must report exactly the model's
//! old runs over the protected range.

use std::ops::ControlFlow;

use guestmm::mm::protect::{ProtectError, ProtectionRanges, Region};
use guestmm::{Perms, Range, PAGE_SIZE};
use proptest::prelude::*;

const PAGES: u64 = 64;

/// A small palette so that neighbouring regions often end up equal and
/// boundaries must merge away.
const PALETTE: [Perms; 5] = [
    Perms::NONE,
    Perms::READ,
    Perms::READ_WRITE,
    Perms::READ_EXECUTE,
    Perms::ALL,
];

#[derive(Debug, Clone)]
enum Op {
    /// Protect pages `[start, start + len)` (clipped to the mapping).
    Update { start: u64, len: u64, perms: usize },
    /// A protect with a bad range; `kind` picks which error.
    BadUpdate { kind: u8, page: u64 },
    /// Split the vma at `at`, check both halves, merge them back.
    SplitMerge { at: u64 },
    /// Unmap the first `at` pages (on a copy).
    DiscardBelow { at: u64 },
    /// Unmap everything from page `at` on (on a copy).
    DiscardAbove { at: u64 },
    /// Unmap pages `[a, b)` from the middle (on a copy).
    UnmapMiddle { a: u64, b: u64 },
    /// Enumerate / max-perms over pages `[start, start + len)`.
    Query { start: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PAGES, 1..=PAGES, 0..PALETTE.len())
            .prop_map(|(start, len, perms)| Op::Update { start, len, perms }),
        1 => (0u8..4, 0..PAGES).prop_map(|(kind, page)| Op::BadUpdate { kind, page }),
        1 => (1..PAGES).prop_map(|at| Op::SplitMerge { at }),
        1 => (1..PAGES).prop_map(|at| Op::DiscardBelow { at }),
        1 => (1..PAGES).prop_map(|at| Op::DiscardAbove { at }),
        1 => (1..PAGES - 1, 1..PAGES - 1).prop_map(|(x, y)| {
            let (a, b) = if x <= y { (x, y + 1) } else { (y, x + 1) };
            Op::UnmapMiddle { a, b }
        }),
        1 => (0..PAGES, 0..=PAGES).prop_map(|(start, len)| Op::Query { start, len }),
    ]
}

/// Pages `[start, end)` of the mapping at `base`.
fn pages(base: u64, start: u64, end: u64) -> Range {
    Range::new(base + start * PAGE_SIZE, base + end * PAGE_SIZE).unwrap()
}

/// Maximal runs of equal perms in `model`, whose page 0 is at `first`:
/// the regions a minimal representation must show.
fn runs(model: &[Perms], first: Range) -> Vec<Region> {
    let mut out: Vec<Region> = Vec::new();
    for (i, &p) in model.iter().enumerate() {
        let a = first.start() + i as u64 * PAGE_SIZE;
        match out.last_mut() {
            Some(r) if r.perms == p => {
                r.range = Range::new(r.range.start(), a + PAGE_SIZE).unwrap();
            }
            _ => out.push(Region {
                range: Range::new(a, a + PAGE_SIZE).unwrap(),
                perms: p,
            }),
        }
    }
    out
}

/// Checks `pr` describing mapping `m` against `model` (one entry per page
/// of `m`).
fn check(pr: &ProtectionRanges, m: Range, model: &[Perms]) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.len(), model.len() as u64 * PAGE_SIZE);
    if let Err(e) = pr.check_invariants(m) {
        return Err(TestCaseError::fail(format!("invariants: {e}")));
    }
    let want = runs(model, m);
    let got: Vec<Region> = pr.regions(m, m).collect();
    prop_assert!(got == want, "regions: got {:?} want {:?}", got, want);
    prop_assert!(
        pr.region_count() == want.len(),
        "region_count: got {} want {}",
        pr.region_count(),
        want.len()
    );
    prop_assert!(pr.first_region_perms() == model[0]);
    for region in &want {
        for a in (region.range.start()..region.range.end()).step_by(PAGE_SIZE as usize) {
            let got = pr.flags_at(m, a);
            prop_assert!(
                got == *region,
                "flags_at({:#x}): got {:?} want {:?}",
                a,
                got,
                region
            );
        }
    }
    Ok(())
}

/// Checks `enumerate` and `max_perms_in` over pages `[s, e)` of `m`.
fn check_query(
    pr: &ProtectionRanges,
    m: Range,
    model: &[Perms],
    s: u64,
    e: u64,
) -> Result<(), TestCaseError> {
    let r = pages(m.start(), s, e);
    let want = runs(&model[s as usize..e as usize], r);
    let mut got = Vec::new();
    let flow = pr.enumerate(m, r, |region| {
        got.push(region);
        ControlFlow::Continue(())
    });
    prop_assert_eq!(flow, ControlFlow::Continue(()));
    prop_assert!(
        got == want,
        "enumerate({}): got {:?} want {:?}",
        r,
        got,
        want
    );
    let want_max = want.iter().fold(Perms::NONE, |acc, r| {
        Perms::new(
            acc.read || r.perms.read,
            acc.write || r.perms.write,
            acc.execute || r.perms.execute,
        )
    });
    let got_max = pr.max_perms_in(m, r);
    prop_assert!(
        got_max == want_max,
        "max_perms_in({}): got {} want {}",
        r,
        got_max,
        want_max
    );
    Ok(())
}

fn run(base_page: u64, init: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let base = base_page * PAGE_SIZE;
    let m = pages(base, 0, PAGES);
    let mut model = vec![PALETTE[init]; PAGES as usize];
    let mut pr = ProtectionRanges::new(PALETTE[init]);
    check(&pr, m, &model)?;
    for op in ops {
        match op {
            Op::Update { start, len, perms } => {
                let end = (start + len).min(PAGES);
                let r = pages(base, start, end);
                let perms = PALETTE[perms];
                let want_old = runs(&model[start as usize..end as usize], r);
                let mut got_old = Vec::new();
                let res = pr.update(m, r, perms, |range, perms| {
                    got_old.push(Region { range, perms })
                });
                prop_assert!(res.is_ok(), "update({}): got {:?} want Ok", r, res);
                prop_assert!(
                    got_old == want_old,
                    "on_old for {}: got {:?} want {:?}",
                    r,
                    got_old,
                    want_old
                );
                model[start as usize..end as usize].fill(perms);
            }
            Op::BadUpdate { kind, page } => {
                let a = base + page * PAGE_SIZE;
                let (r, want) = match kind {
                    0 => {
                        let r = Range::new(a + 8, a + PAGE_SIZE).unwrap();
                        (r, ProtectError::Unaligned { range: r })
                    }
                    1 => {
                        let r = Range::new(a, a).unwrap();
                        (r, ProtectError::Empty { start: a })
                    }
                    2 => {
                        let r = Range::new(a, m.end() + PAGE_SIZE).unwrap();
                        (
                            r,
                            ProtectError::OutOfMapping {
                                range: r,
                                mapping: m,
                            },
                        )
                    }
                    _ => {
                        let r = Range::new(base - PAGE_SIZE, a + PAGE_SIZE).unwrap();
                        (
                            r,
                            ProtectError::OutOfMapping {
                                range: r,
                                mapping: m,
                            },
                        )
                    }
                };
                let before = pr.clone();
                let mut calls = 0;
                let got = pr.update(m, r, Perms::ALL, |_, _| calls += 1);
                prop_assert!(
                    got == Err(want),
                    "update({}): got {:?} want {:?}",
                    r,
                    got,
                    want
                );
                prop_assert!(pr == before, "state changed by failed update({})", r);
                prop_assert!(calls == 0, "on_old called {} times on error", calls);
            }
            Op::SplitMerge { at } => {
                let (lm, rm) = (pages(base, 0, at), pages(base, at, PAGES));
                let before = pr.clone();
                let right = pr.split_at(m, lm.end());
                check(&pr, lm, &model[..at as usize])?;
                check(&right, rm, &model[at as usize..])?;
                pr.merge_right_neighbor(lm, right, rm);
                prop_assert!(pr == before, "split at page {} + merge differs", at);
            }
            Op::DiscardBelow { at } => {
                let mut c = pr.clone();
                c.discard_below(m, base + at * PAGE_SIZE);
                check(&c, pages(base, at, PAGES), &model[at as usize..])?;
            }
            Op::DiscardAbove { at } => {
                let mut c = pr.clone();
                c.discard_above(m, base + at * PAGE_SIZE);
                check(&c, pages(base, 0, at), &model[..at as usize])?;
            }
            Op::UnmapMiddle { a, b } => {
                let mut left = pr.clone();
                let mut right = left.split_at(m, base + a * PAGE_SIZE);
                right.discard_below(pages(base, a, PAGES), base + b * PAGE_SIZE);
                check(&left, pages(base, 0, a), &model[..a as usize])?;
                check(&right, pages(base, b, PAGES), &model[b as usize..])?;
                // Gluing the halves back over a re-protected hole gives the
                // same state as protecting the hole in place.
                let hole = model[b as usize];
                let mut mid = ProtectionRanges::new(hole);
                mid.merge_right_neighbor(pages(base, a, b), right, pages(base, b, PAGES));
                left.merge_right_neighbor(pages(base, 0, a), mid, pages(base, a, PAGES));
                let mut want = pr.clone();
                want.update(m, pages(base, a, b), hole, |_, _| {}).unwrap();
                prop_assert!(left == want, "unmap [{}, {}) + refill differs", a, b);
            }
            Op::Query { start, len } => {
                let end = (start + len).min(PAGES);
                check_query(&pr, m, &model, start, end)?;
            }
        }
        check(&pr, m, &model)?;
    }
    Ok(())
}

proptest! {
    // 96 cases of up to 80 operations: several thousand operations per run.
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn protection_ranges_match_per_page_model(
        base_page in 1u64..(1 << 24),
        init in 0..PALETTE.len(),
        ops in proptest::collection::vec(op(), 20..80),
    ) {
        run(base_page, init, ops)?;
    }
}

/// A fixed long sequence, so the operation count does not depend on the
/// random case sizes.
#[test]
fn long_deterministic_sequence_matches_model() {
    let mut ops = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for _ in 0..3000 {
        let op = match next(10) {
            0..=5 => Op::Update {
                start: next(PAGES),
                len: 1 + next(PAGES / 4),
                perms: next(PALETTE.len() as u64) as usize,
            },
            6 => Op::SplitMerge {
                at: 1 + next(PAGES - 1),
            },
            7 => Op::DiscardBelow {
                at: 1 + next(PAGES - 1),
            },
            8 => Op::DiscardAbove {
                at: 1 + next(PAGES - 1),
            },
            _ => Op::Query {
                start: next(PAGES),
                len: next(PAGES),
            },
        };
        ops.push(op);
    }
    run(0x100, 2, ops).unwrap();
}
