//! Opening a snapshot: every check before anything is returned.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{crc32c, BaseRef, Header, SnapshotKind, SnapshotMeta, HEADER_SIZE};
use super::{format_meta, SnapshotError};

/// An opened, validated snapshot file.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    file: std::fs::File,
    header: Header,
    meta: SnapshotMeta,
}

impl Snapshot {
    /// Opens `path` read-only and checks it: magic, version, header
    /// checksum, section geometry, the file's length against what the
    /// header declares, the metadata's checksum and encoding, and the
    /// layout (vmas sorted, disjoint, aligned and inside the space,
    /// protections covering their vma within its maximum, data inside the
    /// vmas, header and metadata agreeing).
    ///
    /// Errors: [`SnapshotError::Io`], [`BadMagic`](SnapshotError::BadMagic),
    /// [`Version`](SnapshotError::Version),
    /// [`Truncated`](SnapshotError::Truncated),
    /// [`Checksum`](SnapshotError::Checksum),
    /// [`Malformed`](SnapshotError::Malformed),
    /// [`Layout`](SnapshotError::Layout). Nothing larger than the file is
    /// allocated.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        let file = std::fs::File::open(path).map_err(|e| SnapshotError::io("opening", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| SnapshotError::io("fstat", path, e))?
            .len();
        if file_len < HEADER_SIZE {
            return Err(SnapshotError::Truncated {
                expected: HEADER_SIZE,
                found: file_len,
            });
        }
        let mut page = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut page, 0)
            .map_err(|e| SnapshotError::io("reading header of", path, e))?;
        let header = Header::decode(&page, file_len)?;
        // Bounded by the file's length (checked by decode).
        let mut bytes = vec![0u8; header.meta_len as usize];
        file.read_exact_at(&mut bytes, header.meta_offset)
            .map_err(|e| SnapshotError::io("reading metadata of", path, e))?;
        if crc32c(&bytes) != header.meta_crc {
            return Err(SnapshotError::Checksum {
                section: "metadata",
            });
        }
        let meta = format_meta::decode(&bytes)?;
        let base_id = meta.base.as_ref().map_or(0, |b| b.id);
        if meta.kind != header.kind || meta.id != header.id || base_id != header.base_id {
            return Err(SnapshotError::layout(format!(
                "header ({:?}, id {:#x}, base {:#x}) disagrees with the metadata ({:?}, id {:#x}, base {base_id:#x})",
                header.kind, header.id, header.base_id, meta.kind, meta.id
            )));
        }
        meta.validate(header.data_len)?;
        log::debug!(
            "opened snapshot {} ({:?}, id {:#x}): {} vmas, {} data ranges",
            path.display(),
            meta.kind,
            meta.id,
            meta.vmas.len(),
            meta.data.len()
        );
        Ok(Snapshot {
            path: path.to_path_buf(),
            file,
            header,
            meta,
        })
    }

    /// The metadata.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// The open file (read-only), e.g. to map guest memory from it.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// The open file, keeping nothing else.
    pub fn into_file(self) -> std::fs::File {
        self.file
    }

    /// File offset of guest-physical address 0.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// Length of the data area (the highest mapped guest address, page
    /// aligned): guest address `A < data_len` is at `data_offset + A`.
    pub fn data_len(&self) -> u64 {
        self.header.data_len
    }

    /// Whether this is a diff snapshot.
    pub fn is_diff(&self) -> bool {
        self.meta.kind == SnapshotKind::Diff
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What a diff taken against this snapshot records as its base: this
    /// snapshot's id and its file name (without the directory; a diff is
    /// expected to sit beside its base).
    pub fn base_ref(&self) -> BaseRef {
        BaseRef {
            id: self.meta.id,
            file_name: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}
