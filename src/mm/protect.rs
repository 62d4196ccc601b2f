//! Per-mapping protection ranges: the current permissions of every sub-range
//! of one vma (Zircon's `MappingProtectionRanges`).
//!
//! Changing the protection of part of a vma never splits the vma. Instead the
//! vma carries a [`ProtectionRanges`]: the permissions of its first region,
//! held inline, plus a sorted set of boundary nodes `(addr, perms)`, each
//! meaning "from `addr` on, the permissions are `perms`". A vma whose
//! protection was never changed in part holds no node and allocates nothing.
//!
//! Like Zircon, the structure does not store the vma's base and size: every
//! method that needs them receives the mapping's range, so the vma remains
//! the single owner of its bounds. The vma operations map onto the methods
//! here:
//!
//! | vma operation                      | method                                   |
//! |------------------------------------|------------------------------------------|
//! | `protect` of a sub-range           | [`ProtectionRanges::update`]             |
//! | fault: perms and fault-around cap  | [`ProtectionRanges::flags_at`]           |
//! | unmap of the vma's start           | [`ProtectionRanges::discard_below`]      |
//! | unmap of the vma's end             | [`ProtectionRanges::discard_above`]      |
//! | unmap of the middle (vma split)    | [`ProtectionRanges::split_at`], then `discard_below` on the right part |
//! | merge with the right neighbour vma | [`ProtectionRanges::merge_right_neighbor`] |
//!
//! Argument checks come in two tiers (see `STYLE.md`): [`update`] is the
//! entry point of a guest-visible `protect` and validates its range, returning
//! a [`ProtectError`] with the state unchanged; the other methods receive
//! values that the vma layer has already checked against its own bounds and
//! only `debug_assert!` them.
//!
//! [`update`]: ProtectionRanges::update

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::ops::ControlFlow;

use crate::perms::Perms;
use crate::range::{is_page_aligned, Range};

/// Errors from [`ProtectionRanges::update`]. On any of them the protection
/// ranges are left exactly as they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtectError {
    /// The range to protect holds no page.
    #[error("protection range at {start:#x} is empty")]
    Empty {
        /// Start of the empty range.
        start: u64,
    },
    /// The range to protect does not start and end on page boundaries.
    #[error("protection range {range} is not page aligned")]
    Unaligned {
        /// The offending range.
        range: Range,
    },
    /// The range to protect is not entirely inside the mapping.
    #[error("protection range {range} is not inside mapping {mapping}")]
    OutOfMapping {
        /// The offending range.
        range: Range,
        /// The mapping it should lie in.
        mapping: Range,
    },
}

/// A maximal run of pages with the same permissions, possibly clipped to the
/// mapping or to a requested range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// The addresses of the region.
    pub range: Range,
    /// Their current permissions.
    pub perms: Perms,
}

/// The current permissions of each sub-range of one mapping (vma).
///
/// The mapping's range is not stored: each method receives it, and the
/// caller must pass the same range the structure was last made consistent
/// with (the vma's current bounds).
///
/// # Invariants
/// For the mapping `[base, end)` this structure describes:
/// - every node address `a` satisfies `base < a < end` (a node at `base`
///   would duplicate `first`; a node at `end` would describe nothing);
/// - every node address is page aligned;
/// - node addresses are strictly increasing (guaranteed by the map);
/// - minimality: no two neighbouring regions have equal permissions, that
///   is, the first node's perms differ from `first`, and each node's perms
///   differ from the previous node's.
///
/// Together these make the representation canonical: two values describe
/// the same per-page permissions exactly when they compare equal.
/// [`check_invariants`](Self::check_invariants) verifies all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectionRanges {
    /// Permissions of the region that starts at the mapping's base.
    first: Perms,
    /// Boundary nodes: from the key on (up to the next key or the mapping's
    /// end), the permissions are the value. Absolute guest-physical
    /// addresses. An empty `BTreeMap` does not allocate.
    rest: BTreeMap<u64, Perms>,
}

impl ProtectionRanges {
    /// Protection ranges of a fresh mapping: one region with `perms`, no
    /// node, no allocation.
    pub const fn new(perms: Perms) -> Self {
        ProtectionRanges {
            first: perms,
            rest: BTreeMap::new(),
        }
    }

    /// Permissions of the region that starts at the mapping's base.
    pub fn first_region_perms(&self) -> Perms {
        self.first
    }

    /// True if the whole mapping has one set of permissions.
    pub fn is_single_region(&self) -> bool {
        self.rest.is_empty()
    }

    /// Number of regions (one more than the number of boundary nodes).
    pub fn region_count(&self) -> usize {
        self.rest.len() + 1
    }

    /// Heap bytes of the boundary nodes (0 for a single region); B-tree
    /// node overhead not counted.
    pub fn heap_bytes(&self) -> usize {
        self.rest.len() * (std::mem::size_of::<u64>() + std::mem::size_of::<Perms>())
    }

    /// The permissions at `addr` and the region holding it, clipped to
    /// `mapping`. The fault path uses the region to cap its fault-around
    /// window (Zircon's `FlagsRangeAtAddr`).
    ///
    /// # Preconditions
    /// - `mapping.contains(addr)` (debug-asserted; release builds clamp
    ///   `addr` into the mapping).
    ///
    /// O(log n).
    pub fn flags_at(&self, mapping: Range, addr: u64) -> Region {
        self.debug_check_mapping(mapping);
        debug_assert!(
            mapping.contains(addr),
            "address {addr:#x} outside mapping {mapping}"
        );
        let addr = addr.clamp(mapping.start(), mapping.end().saturating_sub(1));
        let (start, perms) = match self.rest.range(..=addr).next_back() {
            Some((&a, &p)) => (a, p),
            None => (mapping.start(), self.first),
        };
        let end = match self.rest.range((Excluded(addr), Unbounded)).next() {
            Some((&a, _)) => a,
            None => mapping.end(),
        };
        Region {
            range: Range::new_unchecked(start, end),
            perms,
        }
    }

    /// The regions overlapping `range`, clipped to it, in address order. An
    /// empty `range` yields nothing.
    ///
    /// # Preconditions
    /// - `mapping.is_superset_of(range)` (debug-asserted; release builds
    ///   clip `range` to the mapping).
    ///
    /// O(log n) to start, O(1) amortised per region.
    pub fn regions(&self, mapping: Range, range: Range) -> Regions<'_> {
        self.debug_check_mapping(mapping);
        debug_assert!(
            mapping.is_superset_of(range),
            "range {range} outside mapping {mapping}"
        );
        let range = mapping.intersect(range);
        if range.is_empty() {
            return Regions {
                nodes: None,
                cur_start: range.start(),
                cur_perms: self.first,
                end: range.end(),
            };
        }
        let cur_perms = self.perms_at(range.start());
        Regions {
            nodes: Some(
                self.rest
                    .range((Excluded(range.start()), Excluded(range.end()))),
            ),
            cur_start: range.start(),
            cur_perms,
            end: range.end(),
        }
    }

    /// Calls `f` on each region overlapping `range`, clipped to it, in
    /// address order, until `f` returns [`ControlFlow::Break`] (Zircon's
    /// `EnumerateProtectionRanges`). Returns what stopped the walk.
    ///
    /// # Preconditions
    /// As for [`regions`](Self::regions).
    pub fn enumerate(
        &self,
        mapping: Range,
        range: Range,
        mut f: impl FnMut(Region) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        for region in self.regions(mapping, range) {
            f(region)?;
        }
        ControlFlow::Continue(())
    }

    /// The union of the permissions over `range`: what some page of `range`
    /// allows. `Perms::NONE` for an empty range.
    ///
    /// # Preconditions
    /// As for [`regions`](Self::regions).
    pub fn max_perms_in(&self, mapping: Range, range: Range) -> Perms {
        self.regions(mapping, range)
            .fold(Perms::NONE, |acc, r| union(acc, r.perms))
    }

    /// Sets the permissions of `range` to `perms` (Zircon's
    /// `UpdateProtectionRange`).
    ///
    /// Before changing anything, calls `on_old(sub_range, old_perms)` once
    /// per maximal sub-range of `range` that had uniform permissions, in
    /// address order; the calls exactly cover `range`. The caller uses them
    /// to downgrade what is installed (ProtectOrUnmap); it is called even
    /// where `old_perms == perms`, so the caller skips those itself.
    ///
    /// Afterwards the representation is minimal again: protecting a range to
    /// the permissions of a neighbour removes the boundary between them, and
    /// protecting the whole mapping leaves no node.
    ///
    /// # Errors
    /// Checked in this order; on error nothing is called and the state is
    /// unchanged:
    /// - [`ProtectError::Empty`] if `range` is empty;
    /// - [`ProtectError::Unaligned`] if an endpoint is not page aligned;
    /// - [`ProtectError::OutOfMapping`] if `range` is not inside `mapping`.
    ///
    /// # Preconditions
    /// - `mapping` is the mapping's current range: non-empty, page aligned
    ///   (debug-asserted).
    ///
    /// O((1 + k) log n) for k nodes inside `range`; O(n) to protect the
    /// whole mapping.
    pub fn update(
        &mut self,
        mapping: Range,
        range: Range,
        perms: Perms,
        mut on_old: impl FnMut(Range, Perms),
    ) -> Result<(), ProtectError> {
        self.debug_check_mapping(mapping);
        if range.is_empty() {
            return Err(ProtectError::Empty {
                start: range.start(),
            });
        }
        if !range.is_page_aligned() {
            return Err(ProtectError::Unaligned { range });
        }
        if !mapping.is_superset_of(range) {
            return Err(ProtectError::OutOfMapping { range, mapping });
        }
        let (start, end) = (range.start(), range.end());

        // Prepare: everything the mutation needs, read before any change.
        // `before` is the perms of the region just left of `range` (unused
        // when `range` starts at the base); `after` is the old perms at
        // `end - 1`, which carry on past `end` unless a node sits at `end`.
        let before = self.perms_before(start);
        let after = self.perms_at(end - 1);
        for region in self.regions(mapping, range) {
            on_old(region.range, region.perms);
        }

        // Mutate. The whole mapping: one region, no node.
        if range == mapping {
            self.first = perms;
            self.rest.clear();
            return Ok(());
        }
        // Drop every boundary in [start, end): the inside of `range` becomes
        // one region.
        while let Some((&a, _)) = self.rest.range(start..end).next() {
            self.rest.remove(&a);
        }
        // Left edge.
        if start == mapping.start() {
            self.first = perms;
        } else if before != perms {
            self.rest.insert(start, perms);
        }
        // Right edge.
        if end != mapping.end() {
            match self.rest.get(&end) {
                Some(&next) if next == perms => {
                    self.rest.remove(&end);
                }
                Some(_) => {}
                None if after != perms => {
                    self.rest.insert(end, after);
                }
                None => {}
            }
        }
        self.debug_check_invariants(mapping);
        Ok(())
    }

    /// Splits for a vma split at `at`: `self` keeps `[mapping.start(), at)`
    /// and the returned value describes `[at, mapping.end())`. The right
    /// part's first-region perms are the perms at `at`; nodes at or after
    /// `at` move to it (a node exactly at `at` becomes its first perms).
    ///
    /// # Preconditions
    /// - `mapping.can_split_at(at)` and `at` is page aligned
    ///   (debug-asserted).
    ///
    /// O(log n + s), s the node count of the smaller part (std's
    /// `BTreeMap::split_off` counts it).
    pub fn split_at(&mut self, mapping: Range, at: u64) -> ProtectionRanges {
        self.debug_check_mapping(mapping);
        debug_assert!(
            mapping.can_split_at(at) && is_page_aligned(at),
            "bad split point {at:#x} for mapping {mapping}"
        );
        let right_first = self.perms_at(at);
        let mut right_rest = self.rest.split_off(&at);
        right_rest.remove(&at);
        let right = ProtectionRanges {
            first: right_first,
            rest: right_rest,
        };
        if cfg!(debug_assertions) {
            let (l, r) = mapping.split_at(at);
            self.debug_check_invariants(l);
            right.debug_check_invariants(r);
        }
        right
    }

    /// Drops everything below `new_base`: the vma now starts at `new_base`
    /// (its start was unmapped). The first-region perms become the perms at
    /// `new_base`.
    ///
    /// # Preconditions
    /// - `mapping.can_split_at(new_base)` and `new_base` is page aligned
    ///   (debug-asserted).
    ///
    /// O(log n + s), as for [`split_at`](Self::split_at).
    pub fn discard_below(&mut self, mapping: Range, new_base: u64) {
        self.debug_check_mapping(mapping);
        debug_assert!(
            mapping.can_split_at(new_base) && is_page_aligned(new_base),
            "bad new base {new_base:#x} for mapping {mapping}"
        );
        *self = self.split_at(mapping, new_base);
        self.debug_check_invariants(Range::new_unchecked(new_base, mapping.end()));
    }

    /// Drops everything at or above `new_end`: the vma now ends at `new_end`
    /// (its end was unmapped).
    ///
    /// # Preconditions
    /// - `mapping.can_split_at(new_end)` and `new_end` is page aligned
    ///   (debug-asserted).
    ///
    /// O(log n + s), as for [`split_at`](Self::split_at).
    pub fn discard_above(&mut self, mapping: Range, new_end: u64) {
        self.debug_check_mapping(mapping);
        debug_assert!(
            mapping.can_split_at(new_end) && is_page_aligned(new_end),
            "bad new end {new_end:#x} for mapping {mapping}"
        );
        drop(self.rest.split_off(&new_end));
        self.debug_check_invariants(Range::new_unchecked(mapping.start(), new_end));
    }

    /// Absorbs the protection ranges of the vma `right_mapping`, which starts
    /// where `mapping` ends (Zircon's `MergeRightNeighbor`). A node is added
    /// at the junction only if the perms on either side of it differ, so the
    /// result is minimal for `[mapping.start(), right_mapping.end())`.
    ///
    /// # Preconditions
    /// - `right_mapping.start() == mapping.end()` (debug-asserted);
    /// - `right` is consistent with `right_mapping`.
    ///
    /// O(m log(n + m)) with m the smaller node count of the two sides.
    pub fn merge_right_neighbor(
        &mut self,
        mapping: Range,
        right: ProtectionRanges,
        right_mapping: Range,
    ) {
        self.debug_check_mapping(mapping);
        right.debug_check_mapping(right_mapping);
        debug_assert_eq!(
            right_mapping.start(),
            mapping.end(),
            "right neighbour {right_mapping} does not start at end of {mapping}"
        );
        let junction = mapping.end();
        let left_last = self.perms_before(junction);
        let ProtectionRanges {
            first: right_first,
            rest: mut right_rest,
        } = right;
        if left_last != right_first {
            right_rest.insert(junction, right_first);
        }
        // Insert the smaller side into the larger one; the key sets are
        // disjoint (left keys < junction <= right keys).
        if right_rest.len() > self.rest.len() {
            std::mem::swap(&mut self.rest, &mut right_rest);
        }
        self.rest.extend(right_rest);
        self.debug_check_invariants(Range::new_unchecked(mapping.start(), right_mapping.end()));
    }

    /// Checks every invariant listed on the type against `mapping`; the
    /// error names the violated invariant and the values involved.
    pub fn check_invariants(&self, mapping: Range) -> Result<(), String> {
        if mapping.is_empty() || !mapping.is_page_aligned() {
            return Err(format!(
                "mapping {mapping} must be non-empty and page aligned"
            ));
        }
        let mut prev = self.first;
        for (&addr, &perms) in &self.rest {
            if !mapping.can_split_at(addr) {
                return Err(format!(
                    "node at {addr:#x} is not strictly inside mapping {mapping}"
                ));
            }
            if !is_page_aligned(addr) {
                return Err(format!("node at {addr:#x} is not page aligned"));
            }
            if perms == prev {
                return Err(format!(
                    "not minimal: node at {addr:#x} repeats the previous region's perms {perms}"
                ));
            }
            prev = perms;
        }
        Ok(())
    }

    /// Perms of the region holding `addr`.
    fn perms_at(&self, addr: u64) -> Perms {
        self.rest
            .range(..=addr)
            .next_back()
            .map_or(self.first, |(_, &p)| p)
    }

    /// Perms of the region just below `addr` (the region holding `addr - 1`
    /// when `addr` is above the base); `first` if no node is below `addr`.
    fn perms_before(&self, addr: u64) -> Perms {
        self.rest
            .range(..addr)
            .next_back()
            .map_or(self.first, |(_, &p)| p)
    }

    fn debug_check_mapping(&self, mapping: Range) {
        debug_assert!(
            !mapping.is_empty() && mapping.is_page_aligned(),
            "mapping {mapping} must be non-empty and page aligned"
        );
    }

    fn debug_check_invariants(&self, mapping: Range) {
        if cfg!(debug_assertions) {
            if let Err(e) = self.check_invariants(mapping) {
                panic!("protection ranges invariant broken: {e}");
            }
        }
    }
}

/// Iterator over the regions overlapping a range, clipped to it; returned by
/// [`ProtectionRanges::regions`].
#[derive(Debug, Clone)]
pub struct Regions<'a> {
    /// Nodes strictly inside the range; `None` once exhausted (or for an
    /// empty range).
    nodes: Option<std::collections::btree_map::Range<'a, u64, Perms>>,
    /// Start and perms of the region not yet yielded.
    cur_start: u64,
    cur_perms: Perms,
    /// End of the requested range.
    end: u64,
}

impl Iterator for Regions<'_> {
    type Item = Region;

    fn next(&mut self) -> Option<Region> {
        let nodes = self.nodes.as_mut()?;
        let (region_end, next_perms) = match nodes.next() {
            Some((&a, &p)) => (a, Some(p)),
            None => (self.end, None),
        };
        let region = Region {
            range: Range::new_unchecked(self.cur_start, region_end),
            perms: self.cur_perms,
        };
        match next_perms {
            Some(p) => {
                self.cur_start = region_end;
                self.cur_perms = p;
            }
            None => self.nodes = None,
        }
        Some(region)
    }
}

/// The permissions in either set.
fn union(a: Perms, b: Perms) -> Perms {
    Perms::new(a.read || b.read, a.write || b.write, a.execute || b.execute)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PAGE_SIZE;

    /// States that no public method can build, to see that
    /// `check_invariants` names each violation.
    #[test]
    fn check_invariants_names_each_violation() {
        let m = Range::new(0x10_000, 0x10_000 + 4 * PAGE_SIZE).unwrap();
        let with = |nodes: &[(u64, Perms)]| ProtectionRanges {
            first: Perms::READ,
            rest: nodes.iter().copied().collect(),
        };
        let cases = [
            (with(&[(0x10_000, Perms::ALL)]), "not strictly inside"),
            (with(&[(0x14_000, Perms::ALL)]), "not strictly inside"),
            (with(&[(0x20_000, Perms::ALL)]), "not strictly inside"),
            (with(&[(0x11_800, Perms::ALL)]), "not page aligned"),
            (with(&[(0x11_000, Perms::READ)]), "not minimal"),
            (
                with(&[(0x11_000, Perms::ALL), (0x12_000, Perms::ALL)]),
                "not minimal",
            ),
        ];
        for (pr, want) in cases {
            let got = pr.check_invariants(m);
            assert!(
                matches!(&got, Err(e) if e.contains(want)),
                "{pr:?}: got {got:?} want an error containing {want:?}"
            );
        }
        let ok = with(&[(0x11_000, Perms::ALL), (0x13_000, Perms::READ)]);
        assert_eq!(ok.check_invariants(m), Ok(()));
    }
}
