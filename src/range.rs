//! Half-open ranges of `u64` addresses: guest-physical addresses, file offsets
//! and host offsets, plus page-alignment arithmetic.
//!
//! A [`Range`] is always well formed (`start <= end`): the checked
//! constructors return a [`RangeError`] instead of building anything else, so
//! code that receives a `Range` never re-validates it.

use std::fmt;

/// The base page size of every address space guestmm manages.
pub const PAGE_SIZE: u64 = 4096;

/// The huge-page size: allocation unit for large allocations and the default
/// fault-around window.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Errors from building or checking a [`Range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `start + len` does not fit in a `u64`.
    #[error("range starting at {start:#x} with length {len:#x} overflows u64")]
    Overflow {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
    /// `start > end`.
    #[error("range start {start:#x} is after its end {end:#x}")]
    Inverted {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// An endpoint is not a multiple of the page size.
    #[error("range {range} is not page aligned")]
    Unaligned {
        /// The offending range.
        range: Range,
    },
    /// The range is empty where a non-empty one is required.
    #[error("range at {start:#x} is empty")]
    Empty {
        /// Start of the empty range.
        start: u64,
    },
}

/// A half-open range `[start, end)` over `u64`.
///
/// Invariant: `start <= end` (enforced by every constructor).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Range {
    start: u64,
    end: u64,
}

/// A range of guest-physical addresses.
pub type GuestRange = Range;

/// A range of offsets into a file (a `MemoryFile` or a host file).
pub type FileRange = Range;

impl Range {
    /// The empty range at 0.
    pub const EMPTY: Range = Range { start: 0, end: 0 };

    /// Builds `[start, end)`; fails if `start > end`.
    pub const fn new(start: u64, end: u64) -> Result<Range, RangeError> {
        if start > end {
            return Err(RangeError::Inverted { start, end });
        }
        Ok(Range { start, end })
    }

    /// Builds `[start, start + len)`; fails if the end overflows.
    pub const fn from_len(start: u64, len: u64) -> Result<Range, RangeError> {
        match start.checked_add(len) {
            Some(end) => Ok(Range { start, end }),
            None => Err(RangeError::Overflow { start, len }),
        }
    }

    /// Builds a non-empty, page-aligned `[start, start + len)`: the check every
    /// public entry point taking an address and a length wants.
    pub const fn pages(start: u64, len: u64) -> Result<Range, RangeError> {
        let r = match Range::from_len(start, len) {
            Ok(r) => r,
            Err(e) => return Err(e),
        };
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        if !r.is_page_aligned() {
            return Err(RangeError::Unaligned { range: r });
        }
        Ok(r)
    }

    /// Builds `[start, end)` without checking.
    ///
    /// # Preconditions
    /// - `start <= end` (debug-asserted).
    pub(crate) const fn new_unchecked(start: u64, end: u64) -> Range {
        debug_assert!(start <= end);
        Range { start, end }
    }

    /// First address in the range.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// One past the last address in the range.
    pub const fn end(&self) -> u64 {
        self.end
    }

    /// Number of addresses in the range.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True if the range holds no address.
    pub const fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// True if `x` lies in the range.
    pub const fn contains(&self, x: u64) -> bool {
        self.start <= x && x < self.end
    }

    /// True if the two ranges share at least one address (so never for an
    /// empty range).
    pub const fn overlaps(&self, other: Range) -> bool {
        !self.is_empty() && !other.is_empty() && self.start < other.end && other.start < self.end
    }

    /// The addresses in both ranges (empty, at some address, if none).
    pub fn intersect(&self, other: Range) -> Range {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        if start >= end {
            Range { start, end: start }
        } else {
            Range { start, end }
        }
    }

    /// True if every address of `other` lies in `self`. An empty `other`
    /// must still lie within `[start, end]`.
    pub const fn is_superset_of(&self, other: Range) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// True if splitting at `x` gives two non-empty ranges.
    pub const fn can_split_at(&self, x: u64) -> bool {
        self.start < x && x < self.end
    }

    /// True if both endpoints are multiples of [`PAGE_SIZE`].
    pub const fn is_page_aligned(&self) -> bool {
        is_page_aligned(self.start) && is_page_aligned(self.end)
    }

    /// The same range moved by `delta` (which may be negative through
    /// wrapping arithmetic is not allowed: the caller supplies a new start).
    ///
    /// # Preconditions
    /// - `new_start + len` does not overflow (debug-asserted).
    pub(crate) fn with_start(&self, new_start: u64) -> Range {
        Range::new_unchecked(new_start, new_start + self.len())
    }

    /// Splits at `x` into `[start, x)` and `[x, end)`.
    ///
    /// # Preconditions
    /// - `self.contains(x) || x == self.end` (debug-asserted).
    pub(crate) fn split_at(&self, x: u64) -> (Range, Range) {
        debug_assert!(self.start <= x && x <= self.end);
        (
            Range::new_unchecked(self.start, x),
            Range::new_unchecked(x, self.end),
        )
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// True if `x` is a multiple of [`PAGE_SIZE`].
pub const fn is_page_aligned(x: u64) -> bool {
    x % PAGE_SIZE == 0
}

/// Rounds `x` down to a multiple of `align` (a power of two).
pub const fn align_down(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    x & !(align - 1)
}

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub const fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    match x.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// Rounds `x` down to a page boundary.
pub const fn page_round_down(x: u64) -> u64 {
    align_down(x, PAGE_SIZE)
}

/// Rounds `x` up to a page boundary; `None` on overflow.
pub const fn page_round_up(x: u64) -> Option<u64> {
    align_up(x, PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_reject_bad_input() {
        assert_eq!(
            Range::new(5, 4),
            Err(RangeError::Inverted { start: 5, end: 4 })
        );
        assert_eq!(
            Range::from_len(u64::MAX, 2),
            Err(RangeError::Overflow {
                start: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            Range::pages(0x1000, 0),
            Err(RangeError::Empty { start: 0x1000 })
        );
        assert!(matches!(
            Range::pages(0x1001, 0x1000),
            Err(RangeError::Unaligned { .. })
        ));
        assert_eq!(
            Range::pages(0x1000, 0x2000).unwrap(),
            Range::new(0x1000, 0x3000).unwrap()
        );
    }

    #[test]
    fn set_operations() {
        let a = Range::new(10, 20).unwrap();
        let b = Range::new(15, 30).unwrap();
        let c = Range::new(20, 30).unwrap();
        assert!(a.overlaps(b) && !a.overlaps(c));
        assert!(
            !a.overlaps(Range::new(15, 15).unwrap()),
            "an empty range overlaps nothing"
        );
        assert_eq!(a.intersect(b), Range::new(15, 20).unwrap());
        assert!(a.intersect(c).is_empty());
        assert!(a.is_superset_of(Range::new(12, 20).unwrap()));
        assert!(!a.is_superset_of(b));
        assert!(a.contains(10) && !a.contains(20));
        assert!(a.can_split_at(11) && !a.can_split_at(10) && !a.can_split_at(20));
        assert_eq!(
            a.split_at(12),
            (Range::new(10, 12).unwrap(), Range::new(12, 20).unwrap())
        );
    }

    #[test]
    fn alignment() {
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
        assert_eq!(align_down(8191, 4096), 4096);
        assert_eq!(page_round_up(4096), Some(4096));
        assert!(is_page_aligned(0) && !is_page_aligned(7));
    }
}
