//! Sparse snapshot files: guest memory laid out by guest-physical address,
//! the address-space layout, opaque vCPU and VM state, and the working-set
//! record kept next to a snapshot.
//!
//! This layer sits above [`mm`](crate::mm) and below [`kvm`](crate::kvm):
//! it reads memory through an [`AddressSpace`](crate::mm::AddressSpace)
//! without populating or committing anything, and treats vCPU and VM state
//! as byte blobs it neither parses nor produces.
//!
//! # File layout
//!
//! One file per snapshot, all integers little endian:
//!
//! ```text
//!  0                 header (one 4 KiB page): magic "GMMSNAP\0", format
//!                    version, kind (full / diff), snapshot id, base id,
//!                    data offset, data length, metadata offset and length,
//!                    CRC-32C of the metadata, CRC-32C of the header
//!  4 KiB             hole
//!  data_offset       guest memory: the byte at guest-physical address A is at
//!  (2 MiB aligned)   data_offset + A. Only pages with data are written; the
//!                    rest are holes (the file is extended, never written
//!                    there), so SEEK_DATA finds the data and the file's
//!                    blocks are what was written.
//!  meta_offset       metadata (page aligned, after the data): space size,
//!                    vmas, device ranges, vCPU and VM blobs, the data index
//!                    (guest ranges that hold data in this file) and, for a
//!                    diff, its base's id and file name; zero padding to
//!                    a page multiple (so the file maps as a
//!                    [`HostFile`](crate::mm::HostFile) for a restore).
//! ```
//!
//! A full snapshot's data index lists what was written (populated, non-zero
//! pages, and non-zero pages of mapped objects); anything else reads as
//! zeros. A diff's lists the dirty pages, each written even when zero: a
//! page outside its index is taken from the base.
//!
//! The file is written to `PATH.tmp`, header last, then synced and renamed
//! to `PATH`: a crash leaves no file that passes [`Snapshot::open`].
//! `open` checks everything (magic, version, checksums, lengths against
//! the file's size, layout sanity) before it returns, so a corrupt or
//! truncated file is a [`SnapshotError`], never a panic or an allocation
//! larger than the file.

mod format;
mod format_meta;
mod memory;
mod reader;
mod sys;
pub mod working_set;

use std::path::PathBuf;

#[doc(hidden)]
pub use format::{write_raw, RawSnapshot};
pub use format::{
    BaseRef, SnapshotKind, SnapshotMeta, VmaRecord, DATA_OFFSET, FORMAT_VERSION, HEADER_SIZE,
    MAX_METADATA,
};
pub use memory::{save, DiffOf, SaveReport, SaveRequest};
pub use reader::Snapshot;
pub use working_set::{working_set_path, WorkingSet};

use crate::mm::MmError;

/// Errors from writing or opening snapshot and working-set files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not start with the expected magic.
    #[error("not a guestmm snapshot or working-set file (bad magic)")]
    BadMagic,
    /// The file was written by another format version.
    #[error("format version {found} is not supported (supported: {supported})")]
    Version {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file is shorter than its header says.
    #[error("file truncated: {expected} bytes expected, {found} found")]
    Truncated {
        /// Bytes the header declares (or a header needs).
        expected: u64,
        /// Bytes the file has.
        found: u64,
    },
    /// A section's checksum does not match its contents.
    #[error("{section} checksum mismatch")]
    Checksum {
        /// "header", "metadata" or "working set".
        section: &'static str,
    },
    /// A section whose checksum matches but whose contents cannot be
    /// decoded (a length past its end, an unknown tag).
    #[error("malformed {section}: {why}")]
    Malformed {
        /// The section.
        section: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The layout is not one an address space can have: vmas overlapping,
    /// unaligned or outside the space, protections outside their vma, data
    /// outside the vmas, a header that disagrees with the metadata.
    #[error("bad snapshot layout: {why}")]
    Layout {
        /// What is wrong.
        why: String,
    },
    /// A request that cannot be saved (e.g. unaligned dirty ranges).
    #[error("bad save request: {why}")]
    Request {
        /// What is wrong.
        why: String,
    },
    /// The address space refused.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// An object or file behind guest memory refused.
    #[error(transparent)]
    File(#[from] crate::mm::FileError),
}

impl SnapshotError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        SnapshotError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn layout(why: impl Into<String>) -> Self {
        SnapshotError::Layout { why: why.into() }
    }
}
