//! [`MemoryFileOptions`]: how large a memory file may grow and how it is
//! mapped internally.

use super::MemoryFileError;
use crate::range::{align_up, HUGE_PAGE_SIZE};

/// How to size a [`MemoryFile`](super::MemoryFile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFileOptions {
    /// The file never grows past this many bytes (a multiple of
    /// `chunk_size`). The file is sparse, so a large value costs nothing.
    /// Default 1 TiB.
    pub max_size: u64,
    /// Size of each internal mapping: a power of two and a multiple of
    /// 2 MiB. The file size is always a multiple of it. Default 16 MiB.
    pub chunk_size: u64,
    /// File size at creation, rounded up to `chunk_size`; at most
    /// `max_size`. Default 0.
    pub initial_size: u64,
}

impl Default for MemoryFileOptions {
    fn default() -> Self {
        MemoryFileOptions {
            max_size: 1 << 40,
            chunk_size: 16 << 20,
            initial_size: 0,
        }
    }
}

impl MemoryFileOptions {
    /// Checks the options and returns the initial file size.
    pub(super) fn validate(&self) -> Result<u64, MemoryFileError> {
        let bad = |reason| MemoryFileError::InvalidOptions {
            options: *self,
            reason,
        };
        if !self.chunk_size.is_power_of_two() || self.chunk_size % HUGE_PAGE_SIZE != 0 {
            return Err(bad("chunk_size must be a power of two multiple of 2 MiB"));
        }
        if self.chunk_size > isize::MAX as u64 {
            return Err(bad("chunk_size does not fit the host address space"));
        }
        if self.max_size == 0 || self.max_size % self.chunk_size != 0 {
            return Err(bad("max_size must be a non-zero multiple of chunk_size"));
        }
        if self.max_size > i64::MAX as u64 {
            return Err(bad("max_size must fit in off_t"));
        }
        match align_up(self.initial_size, self.chunk_size) {
            Some(size) if size <= self.max_size => Ok(size),
            _ => Err(bad("initial_size must not exceed max_size")),
        }
    }
}
