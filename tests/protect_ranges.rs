//! Table-driven tests of `mm::protect::ProtectionRanges` on the cases Zircon's
//! `MappingProtectionRanges` handles: protect at the start, end, middle and
//! across regions, merging boundaries away, errors, and the vma
//! split / shrink / merge operations.
//!
//! States are written as one character per page:
//! `-` none, `r` read, `w` read-write, `x` read-execute, `a` all.

use std::ops::ControlFlow;

use guestmm::mm::protect::{ProtectError, ProtectionRanges, Region};
use guestmm::{Perms, Range, PAGE_SIZE};

/// Base of every test mapping: not zero, so absolute addresses matter.
const BASE: u64 = 0x40_0000;

fn perms_of(c: char) -> Perms {
    match c {
        '-' => Perms::NONE,
        'r' => Perms::READ,
        'w' => Perms::READ_WRITE,
        'x' => Perms::READ_EXECUTE,
        'a' => Perms::ALL,
        _ => panic!("bad perms char {c:?}"),
    }
}

fn char_of(p: Perms) -> char {
    ['-', 'r', 'w', 'x', 'a']
        .into_iter()
        .find(|&c| perms_of(c) == p)
        .unwrap_or('?')
}

fn addr(page: u64) -> u64 {
    BASE + page * PAGE_SIZE
}

/// Pages `[start, end)` counted from `BASE`.
fn pages(start: u64, end: u64) -> Range {
    Range::new(addr(start), addr(end)).unwrap()
}

/// The mapping of `n` pages at `BASE`.
fn mapping(n: usize) -> Range {
    pages(0, n as u64)
}

/// Builds protection ranges with the per-page permissions of `state`.
fn build(state: &str) -> ProtectionRanges {
    let chars: Vec<char> = state.chars().collect();
    let m = mapping(chars.len());
    let mut pr = ProtectionRanges::new(perms_of(chars[0]));
    for (i, &c) in chars.iter().enumerate().skip(1) {
        let r = pages(i as u64, i as u64 + 1);
        pr.update(m, r, perms_of(c), |_, _| {}).unwrap();
    }
    pr.check_invariants(m).unwrap();
    pr
}

/// The per-page permissions of `pr` over `m`, from `regions`, checked
/// against `flags_at` on every page.
fn describe(pr: &ProtectionRanges, m: Range) -> String {
    pr.check_invariants(m)
        .unwrap_or_else(|e| panic!("invariants: {e}"));
    let mut s = String::new();
    let mut next = m.start();
    for region in pr.regions(m, m) {
        assert_eq!(region.range.start(), next, "regions leave a gap");
        next = region.range.end();
        for a in (region.range.start()..region.range.end()).step_by(PAGE_SIZE as usize) {
            let at = pr.flags_at(m, a);
            assert_eq!(at, region, "flags_at({a:#x}): got {at:?} want {region:?}");
            s.push(char_of(region.perms));
        }
    }
    assert_eq!(next, m.end(), "regions stop short of the mapping end");
    s
}

/// Expected `on_old` call: pages `[start, end)` had perms `c`.
type Old = (u64, u64, char);

fn olds(list: &[Old]) -> Vec<(Range, Perms)> {
    list.iter()
        .map(|&(s, e, c)| (pages(s, e), perms_of(c)))
        .collect()
}

struct UpdateCase {
    name: &'static str,
    init: &'static str,
    range: (u64, u64),
    perms: char,
    want: &'static str,
    want_regions: usize,
    want_old: &'static [Old],
}

#[test]
fn update_table() {
    let cases = [
        UpdateCase {
            name: "whole mapping, one region",
            init: "wwwwwwww",
            range: (0, 8),
            perms: 'r',
            want: "rrrrrrrr",
            want_regions: 1,
            want_old: &[(0, 8, 'w')],
        },
        UpdateCase {
            name: "whole mapping over several regions leaves zero nodes",
            init: "wwrrxxaa",
            range: (0, 8),
            perms: '-',
            want: "--------",
            want_regions: 1,
            want_old: &[(0, 2, 'w'), (2, 4, 'r'), (4, 6, 'x'), (6, 8, 'a')],
        },
        UpdateCase {
            name: "at the start",
            init: "wwwwwwww",
            range: (0, 2),
            perms: 'r',
            want: "rrwwwwww",
            want_regions: 2,
            want_old: &[(0, 2, 'w')],
        },
        UpdateCase {
            name: "at the end",
            init: "wwwwwwww",
            range: (6, 8),
            perms: 'r',
            want: "wwwwwwrr",
            want_regions: 2,
            want_old: &[(6, 8, 'w')],
        },
        UpdateCase {
            name: "in the middle creates two nodes",
            init: "wwwwwwww",
            range: (3, 5),
            perms: 'r',
            want: "wwwrrwww",
            want_regions: 3,
            want_old: &[(3, 5, 'w')],
        },
        UpdateCase {
            name: "across several nodes",
            init: "wwrrxxaa",
            range: (1, 7),
            perms: '-',
            want: "w------a",
            want_regions: 3,
            want_old: &[(1, 2, 'w'), (2, 4, 'r'), (4, 6, 'x'), (6, 7, 'a')],
        },
        UpdateCase {
            name: "back to the neighbours' perms merges both nodes away",
            init: "wwwrrwww",
            range: (3, 5),
            perms: 'w',
            want: "wwwwwwww",
            want_regions: 1,
            want_old: &[(3, 5, 'r')],
        },
        UpdateCase {
            name: "to the right neighbour's perms moves its node left",
            init: "wwrrxxaa",
            range: (2, 4),
            perms: 'x',
            want: "wwxxxxaa",
            want_regions: 3,
            want_old: &[(2, 4, 'r')],
        },
        UpdateCase {
            name: "to the left neighbour's perms, aligned to nodes",
            init: "wwrrxxaa",
            range: (2, 6),
            perms: 'w',
            want: "wwwwwwaa",
            want_regions: 2,
            want_old: &[(2, 4, 'r'), (4, 6, 'x')],
        },
        UpdateCase {
            name: "ending on a node with the same perms drops it",
            init: "wwrrxxaa",
            range: (4, 6),
            perms: 'a',
            want: "wwrraaaa",
            want_regions: 3,
            want_old: &[(4, 6, 'x')],
        },
        UpdateCase {
            name: "grows a region into both neighbours",
            init: "wwwrrwww",
            range: (2, 6),
            perms: 'r',
            want: "wwrrrrww",
            want_regions: 3,
            want_old: &[(2, 3, 'w'), (3, 5, 'r'), (5, 6, 'w')],
        },
        UpdateCase {
            name: "same perms changes nothing but still reports",
            init: "wwwrrwww",
            range: (3, 5),
            perms: 'r',
            want: "wwwrrwww",
            want_regions: 3,
            want_old: &[(3, 5, 'r')],
        },
        UpdateCase {
            name: "start of the mapping to the next region's perms",
            init: "rrrrwwww",
            range: (0, 4),
            perms: 'w',
            want: "wwwwwwww",
            want_regions: 1,
            want_old: &[(0, 4, 'r')],
        },
        UpdateCase {
            name: "single page inside a region carries the old perms after it",
            init: "rrrrwwww",
            range: (1, 2),
            perms: 'a',
            want: "rarrwwww",
            want_regions: 4,
            want_old: &[(1, 2, 'r')],
        },
    ];
    for case in &cases {
        let m = mapping(case.init.len());
        let mut pr = build(case.init);
        let mut got_old = Vec::new();
        pr.update(
            m,
            pages(case.range.0, case.range.1),
            perms_of(case.perms),
            |r, p| got_old.push((r, p)),
        )
        .unwrap_or_else(|e| panic!("{}: unexpected error {e}", case.name));
        let got = describe(&pr, m);
        assert_eq!(
            got, case.want,
            "{}: got {got} want {}",
            case.name, case.want
        );
        assert_eq!(
            pr.region_count(),
            case.want_regions,
            "{}: got {} regions want {}",
            case.name,
            pr.region_count(),
            case.want_regions
        );
        let want_old = olds(case.want_old);
        assert_eq!(
            got_old, want_old,
            "{}: on_old got {got_old:?} want {want_old:?}",
            case.name
        );
        // Canonical form: equal to the same state built from scratch.
        assert_eq!(pr, build(case.want), "{}: not canonical", case.name);
    }
}

#[test]
fn protect_everything_back_leaves_zero_nodes() {
    let m = mapping(16);
    let mut pr = ProtectionRanges::new(Perms::READ_WRITE);
    for (s, e, c) in [(3, 5, 'r'), (7, 12, 'x'), (1, 2, '-'), (10, 16, 'a')] {
        pr.update(m, pages(s, e), perms_of(c), |_, _| {}).unwrap();
    }
    assert_eq!(describe(&pr, m), "w-wrrwwxxxaaaaaa");
    pr.update(m, m, Perms::READ_WRITE, |_, _| {}).unwrap();
    assert!(
        pr.is_single_region(),
        "got {} regions want 1",
        pr.region_count()
    );
    assert_eq!(pr, ProtectionRanges::new(Perms::READ_WRITE));
}

#[test]
fn update_errors_leave_state_unchanged() {
    let m = mapping(8);
    let unaligned = Range::new(addr(1) + 1, addr(3)).unwrap();
    let unaligned_end = Range::new(addr(1), addr(3) - 8).unwrap();
    let empty = Range::new(addr(2), addr(2)).unwrap();
    let below = Range::new(addr(0) - PAGE_SIZE, addr(2)).unwrap();
    let above = pages(6, 9);
    let far = pages(20, 21);
    let cases = [
        (unaligned, ProtectError::Unaligned { range: unaligned }),
        (
            unaligned_end,
            ProtectError::Unaligned {
                range: unaligned_end,
            },
        ),
        (empty, ProtectError::Empty { start: addr(2) }),
        (
            below,
            ProtectError::OutOfMapping {
                range: below,
                mapping: m,
            },
        ),
        (
            above,
            ProtectError::OutOfMapping {
                range: above,
                mapping: m,
            },
        ),
        (
            far,
            ProtectError::OutOfMapping {
                range: far,
                mapping: m,
            },
        ),
    ];
    for (range, want) in cases {
        let mut pr = build("wwrrxxaa");
        let before = pr.clone();
        let mut calls = 0;
        let got = pr.update(m, range, Perms::NONE, |_, _| calls += 1);
        assert_eq!(got, Err(want), "update({range}): got {got:?} want {want:?}");
        assert_eq!(pr, before, "update({range}) changed state on error");
        assert_eq!(
            calls, 0,
            "update({range}) called on_old {calls} times on error"
        );
    }
}

#[test]
fn error_messages_name_the_values() {
    let m = mapping(2);
    let r = pages(1, 3);
    let msg = ProtectError::OutOfMapping {
        range: r,
        mapping: m,
    }
    .to_string();
    assert!(
        msg.contains("0x401000") && msg.contains("0x403000") && msg.contains("0x400000"),
        "got {msg:?} want it to name range and mapping"
    );
    let msg = ProtectError::Empty { start: addr(1) }.to_string();
    assert!(msg.contains("0x401000"), "got {msg:?} want the start");
}

#[test]
fn flags_at_table() {
    let m = mapping(8);
    let pr = build("wwrrxxaa");
    let cases = [
        (addr(0), pages(0, 2), 'w'),
        (addr(1) + 0x123, pages(0, 2), 'w'),
        (addr(2), pages(2, 4), 'r'),
        (addr(3) + 0xfff, pages(2, 4), 'r'),
        (addr(7), pages(6, 8), 'a'),
        (addr(8) - 1, pages(6, 8), 'a'),
    ];
    for (a, range, c) in cases {
        let got = pr.flags_at(m, a);
        let want = Region {
            range,
            perms: perms_of(c),
        };
        assert_eq!(got, want, "flags_at({a:#x}): got {got:?} want {want:?}");
    }
    let single = ProtectionRanges::new(Perms::READ);
    let got = single.flags_at(m, addr(5));
    let want = Region {
        range: m,
        perms: Perms::READ,
    };
    assert_eq!(got, want, "single region: got {got:?} want {want:?}");
}

#[test]
fn enumerate_clips_and_stops() {
    let m = mapping(8);
    let pr = build("wwrrxxaa");
    let mut got = Vec::new();
    let flow = pr.enumerate(m, pages(1, 5), |r| {
        got.push((r.range, r.perms));
        ControlFlow::Continue(())
    });
    let want = olds(&[(1, 2, 'w'), (2, 4, 'r'), (4, 5, 'x')]);
    assert_eq!(got, want, "got {got:?} want {want:?}");
    assert_eq!(flow, ControlFlow::Continue(()));

    let mut got = Vec::new();
    let flow = pr.enumerate(m, m, |r| {
        got.push((r.range, r.perms));
        if r.perms == Perms::READ {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let want = olds(&[(0, 2, 'w'), (2, 4, 'r')]);
    assert_eq!(got, want, "break: got {got:?} want {want:?}");
    assert_eq!(flow, ControlFlow::Break(()));

    let empty = Range::new(addr(3), addr(3)).unwrap();
    assert_eq!(
        pr.regions(m, empty).count(),
        0,
        "empty range yields regions"
    );
}

#[test]
fn max_perms_in_table() {
    let m = mapping(8);
    let pr = build("-rr-xx-w");
    let cases = [
        ((0, 1), '-'),
        ((0, 3), 'r'),
        ((1, 6), 'x'),
        ((6, 8), 'w'),
        ((0, 8), 'a'),
    ];
    for ((s, e), c) in cases {
        let got = pr.max_perms_in(m, pages(s, e));
        assert_eq!(got, perms_of(c), "pages {s}..{e}: got {got} want {c}");
    }
}

#[test]
fn split_at_table() {
    // (init, split page, left, right)
    let cases = [
        ("wwwwwwww", 3, "www", "wwwww"),
        ("wwrrxxaa", 3, "wwr", "rxxaa"),
        ("wwrrxxaa", 4, "wwrr", "xxaa"),
        ("wwrrxxaa", 1, "w", "wrrxxaa"),
        ("wwrrxxaa", 7, "wwrrxxa", "a"),
        ("wwrrxxaa", 6, "wwrrxx", "aa"),
    ];
    for (init, at, want_l, want_r) in cases {
        let m = mapping(init.len());
        let mut left = build(init);
        let right = left.split_at(m, addr(at));
        let (lm, rm) = (pages(0, at), pages(at, init.len() as u64));
        let (got_l, got_r) = (describe(&left, lm), describe(&right, rm));
        assert_eq!(
            got_l, want_l,
            "{init} at {at}: left got {got_l} want {want_l}"
        );
        assert_eq!(
            got_r, want_r,
            "{init} at {at}: right got {got_r} want {want_r}"
        );
        // Merging back restores the original exactly.
        left.merge_right_neighbor(lm, right, rm);
        assert_eq!(left, build(init), "{init} at {at}: split + merge differs");
    }
}

#[test]
fn discard_below_and_above_table() {
    // (init, page, kept after discard_below, kept after discard_above)
    let cases = [
        ("wwrrxxaa", 1, "wrrxxaa", "w"),
        ("wwrrxxaa", 2, "rrxxaa", "ww"),
        ("wwrrxxaa", 5, "xaa", "wwrrx"),
        ("wwrrxxaa", 6, "aa", "wwrrxx"),
        ("rrrrrrrr", 4, "rrrr", "rrrr"),
    ];
    for (init, at, want_below, want_above) in cases {
        let n = init.len() as u64;
        let m = mapping(init.len());
        let mut pr = build(init);
        pr.discard_below(m, addr(at));
        let got = describe(&pr, pages(at, n));
        assert_eq!(
            got, want_below,
            "{init} below {at}: got {got} want {want_below}"
        );
        assert_eq!(
            pr,
            build_at(want_below, at),
            "{init} below {at}: not canonical"
        );

        let mut pr = build(init);
        pr.discard_above(m, addr(at));
        let got = describe(&pr, pages(0, at));
        assert_eq!(
            got, want_above,
            "{init} above {at}: got {got} want {want_above}"
        );
    }
}

/// Like `build`, for a mapping starting at page `first_page`.
fn build_at(state: &str, first_page: u64) -> ProtectionRanges {
    let chars: Vec<char> = state.chars().collect();
    let m = pages(first_page, first_page + chars.len() as u64);
    let mut pr = ProtectionRanges::new(perms_of(chars[0]));
    for (i, &c) in chars.iter().enumerate().skip(1) {
        let p = first_page + i as u64;
        pr.update(m, pages(p, p + 1), perms_of(c), |_, _| {})
            .unwrap();
    }
    pr
}

#[test]
fn unmap_middle_of_mapping_with_several_regions() {
    // Unmap pages [3, 6) of "wwrrxxaa" (two nodes fall inside the hole):
    // the vma splits at 3, and the right part loses its first 3 pages.
    let m = mapping(8);
    let mut left = build("wwrrxxaa");
    let mut right = left.split_at(m, addr(3));
    right.discard_below(pages(3, 8), addr(6));
    let (got_l, got_r) = (describe(&left, pages(0, 3)), describe(&right, pages(6, 8)));
    assert_eq!(got_l, "wwr", "left: got {got_l} want wwr");
    assert_eq!(got_r, "aa", "right: got {got_r} want aa");
    assert!(
        right.is_single_region(),
        "right: got {} regions want 1",
        right.region_count()
    );
    assert_eq!(
        left.region_count(),
        2,
        "left: got {} regions want 2",
        left.region_count()
    );

    // Zircon's order (split at the hole's end, then shrink the left part)
    // gives the same two halves.
    let mut zl = build("wwrrxxaa");
    let zr = zl.split_at(m, addr(6));
    zl.discard_above(pages(0, 6), addr(3));
    assert_eq!(
        (zl, zr),
        (left, right),
        "got Zircon order differing want equal"
    );
}

#[test]
fn merge_right_neighbor_table() {
    // (left, right, merged, regions)
    let cases = [
        ("wwrr", "rrxx", "wwrrrrxx", 3),
        ("wwrr", "xxrr", "wwrrxxrr", 4),
        ("rrrr", "rrrr", "rrrrrrrr", 1),
        ("rrrr", "wwww", "rrrrwwww", 2),
        ("w", "rwrwrw", "wrwrwrw", 7),
        ("wrwrwr", "r", "wrwrwrr", 6),
    ];
    for (l, r, want, want_regions) in cases {
        let (ln, rn) = (l.len() as u64, r.len() as u64);
        let (lm, rm) = (pages(0, ln), pages(ln, ln + rn));
        let mut left = build(l);
        left.merge_right_neighbor(lm, build_at(r, ln), rm);
        let m = pages(0, ln + rn);
        let got = describe(&left, m);
        assert_eq!(got, want, "{l}+{r}: got {got} want {want}");
        assert_eq!(
            left.region_count(),
            want_regions,
            "{l}+{r}: got {} regions want {want_regions}",
            left.region_count()
        );
    }
}

#[test]
fn fresh_mapping_has_one_region() {
    let pr = ProtectionRanges::new(Perms::READ_EXECUTE);
    assert!(pr.is_single_region());
    assert_eq!(pr.region_count(), 1);
    assert_eq!(pr.first_region_perms(), Perms::READ_EXECUTE);
    assert_eq!(pr.check_invariants(mapping(1)), Ok(()));
    assert!(
        pr.check_invariants(Range::new(addr(0), addr(0) + 1).unwrap())
            .is_err(),
        "an unaligned mapping must be reported"
    );
}
