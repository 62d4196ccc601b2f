//! The snapshot header, the metadata types and their encoding, CRC-32C.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::SnapshotError;
use crate::perms::Perms;
use crate::range::{GuestRange, Range, HUGE_PAGE_SIZE, PAGE_SIZE};

/// The first 8 bytes of a snapshot file.
pub(crate) const MAGIC: [u8; 8] = *b"GMMSNAP\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the header page at offset 0.
pub const HEADER_SIZE: u64 = PAGE_SIZE;
/// File offset of guest-physical address 0 in files this build writes
/// (2 MiB, so huge-page-aligned guest memory stays huge-page aligned in the
/// file).
pub const DATA_OFFSET: u64 = HUGE_PAGE_SIZE;

/// The largest metadata section `open` reads: far above what any layout
/// needs (vmas, blobs and the data index of a real VM take kilobytes to a
/// few megabytes), and a bound on what a crafted header in a large sparse
/// file can make `open` allocate.
pub const MAX_METADATA: u64 = 256 << 20;

/// Bytes of the header covered by its checksum (the checksum follows).
const HEADER_USED: usize = 68;

/// Whether a snapshot holds all of memory or what changed since a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All guest memory: a page outside the data index reads as zeros.
    Full,
    /// The pages dirtied since a base snapshot: a page outside the data
    /// index is the base's.
    Diff,
}

/// The snapshot a diff applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    /// The base's snapshot id.
    pub id: u64,
    /// The base's file name, as the caller gave it (typically relative to
    /// the diff's directory).
    pub file_name: String,
}

/// One vma of a saved address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmaRecord {
    /// Guest-physical range.
    pub range: GuestRange,
    /// Private (copy-on-write) or shared.
    pub private: bool,
    /// The most `protect` may grant.
    pub max_perms: Perms,
    /// Protection regions, in address order, covering `range`.
    pub protections: Vec<(GuestRange, Perms)>,
    /// The vma's name.
    pub name: String,
    /// The vma mapped an object (a host file, a shared memory object,
    /// shared anonymous memory) rather than private anonymous memory; its
    /// contents are in the snapshot either way.
    pub object: bool,
}

/// Everything a snapshot records besides the memory bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Full or diff.
    pub kind: SnapshotKind,
    /// This snapshot's id (random, non-zero).
    pub id: u64,
    /// A diff's base; `None` for a full snapshot.
    pub base: Option<BaseRef>,
    /// Size of the guest-physical space.
    pub space_size: u64,
    /// The vmas, in address order.
    pub vmas: Vec<VmaRecord>,
    /// Device (MMIO) ranges, as the caller gave them.
    pub devices: Vec<GuestRange>,
    /// One opaque state blob per vCPU.
    pub vcpus: Vec<Vec<u8>>,
    /// Opaque VM-wide state.
    pub vm_state: Vec<u8>,
    /// Guest ranges that hold data in this file, sorted, disjoint, page
    /// aligned (see the [module docs](super)).
    pub data: Vec<GuestRange>,
}

/// CRC-32C (Castagnoli), bitwise-reflected, table driven.
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The fixed-size header at offset 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub kind: SnapshotKind,
    pub id: u64,
    pub base_id: u64,
    pub data_offset: u64,
    pub data_len: u64,
    pub meta_offset: u64,
    pub meta_len: u64,
    pub meta_crc: u32,
}

impl Header {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        let kind: u32 = match self.kind {
            SnapshotKind::Full => 1,
            SnapshotKind::Diff => 2,
        };
        b.extend_from_slice(&kind.to_le_bytes());
        for v in [
            self.id,
            self.base_id,
            self.data_offset,
            self.data_len,
            self.meta_offset,
            self.meta_len,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.meta_crc.to_le_bytes());
        debug_assert_eq!(b.len(), HEADER_USED);
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(HEADER_SIZE as usize, 0);
        b
    }

    /// Decodes and checks a header: magic, then version (a later version
    /// may lay out the rest differently), then checksum, then the
    /// geometry, then the file length against what it declares.
    pub(crate) fn decode(page: &[u8], file_len: u64) -> Result<Header, SnapshotError> {
        if page.len() < HEADER_USED + 4 {
            return Err(SnapshotError::Truncated {
                expected: HEADER_SIZE,
                found: file_len,
            });
        }
        if page[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if crc32c(&page[..HEADER_USED]) != u32_at(HEADER_USED) {
            return Err(SnapshotError::Checksum { section: "header" });
        }
        let kind = match u32_at(12) {
            1 => SnapshotKind::Full,
            2 => SnapshotKind::Diff,
            k => return Err(SnapshotError::layout(format!("unknown kind {k}"))),
        };
        let h = Header {
            version,
            kind,
            id: u64_at(16),
            base_id: u64_at(24),
            data_offset: u64_at(32),
            data_len: u64_at(40),
            meta_offset: u64_at(48),
            meta_len: u64_at(56),
            meta_crc: u32_at(64),
        };
        h.check_geometry()?;
        let expected = h.meta_offset + h.meta_len;
        if file_len < expected {
            return Err(SnapshotError::Truncated {
                expected,
                found: file_len,
            });
        }
        Ok(h)
    }

    /// The sections are aligned, in order and do not overflow.
    fn check_geometry(&self) -> Result<(), SnapshotError> {
        let bad = |why: String| Err(SnapshotError::layout(why));
        if self.data_offset < HEADER_SIZE || self.data_offset % HUGE_PAGE_SIZE != 0 {
            return bad(format!("data offset {:#x} unaligned", self.data_offset));
        }
        if self.data_len % PAGE_SIZE != 0 {
            return bad(format!("data length {:#x} unaligned", self.data_len));
        }
        if self.meta_len > MAX_METADATA {
            return bad(format!(
                "metadata length {:#x} above the limit {MAX_METADATA:#x}",
                self.meta_len
            ));
        }
        let data_end = self.data_offset.checked_add(self.data_len);
        let meta_end = self.meta_offset.checked_add(self.meta_len);
        match (data_end, meta_end) {
            (Some(d), Some(_)) if d <= self.meta_offset => Ok(()),
            _ => bad(format!(
                "metadata [{:#x}, +{:#x}) overlaps or overflows the data [{:#x}, +{:#x})",
                self.meta_offset, self.meta_len, self.data_offset, self.data_len
            )),
        }
    }
}

/// Where the metadata goes: the first page boundary after the data.
pub(crate) fn meta_offset(data_offset: u64, data_len: u64) -> u64 {
    (data_offset + data_len).next_multiple_of(PAGE_SIZE)
}

/// Writes the metadata after the data, pads the file to a page multiple,
/// then writes the header (last, so a file cut short before it has no
/// valid header), with `version` in it.
/// Returns the metadata's length.
///
/// Preconditions: `file` is at least `data_offset + data_len` long.
pub(crate) fn write_sections(
    file: &std::fs::File,
    path: &Path,
    meta: &SnapshotMeta,
    data_offset: u64,
    data_len: u64,
    version: u32,
) -> Result<u64, SnapshotError> {
    let bytes = super::format_meta::encode(meta);
    let meta_offset = meta_offset(data_offset, data_len);
    file.write_all_at(&bytes, meta_offset)
        .map_err(|e| SnapshotError::io("writing metadata of", path, e))?;
    // A whole number of pages, so the file can be mapped as a HostFile
    // (which wants a page-multiple size) to restore from it.
    let end = (meta_offset + bytes.len() as u64).next_multiple_of(PAGE_SIZE);
    file.set_len(end)
        .map_err(|e| SnapshotError::io("padding", path, e))?;
    let header = Header {
        version,
        kind: meta.kind,
        id: meta.id,
        base_id: meta.base.as_ref().map_or(0, |b| b.id),
        data_offset,
        data_len,
        meta_offset,
        meta_len: bytes.len() as u64,
        meta_crc: crc32c(&bytes),
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(|e| SnapshotError::io("writing header of", path, e))?;
    Ok(bytes.len() as u64)
}

/// A snapshot file written as given, without looking at any address space
/// or checking the metadata: for tests that need files a correct writer
/// never produces (overlapping vmas, other versions) with valid checksums.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct RawSnapshot {
    /// The version written into the header.
    pub version: u32,
    /// The metadata, written as is.
    pub meta: SnapshotMeta,
    /// Data length declared in the header (page aligned).
    pub data_len: u64,
    /// `(gpa, bytes)` written at `DATA_OFFSET + gpa`.
    pub pages: Vec<(u64, Vec<u8>)>,
}

/// Writes `raw` to `path` (see [`RawSnapshot`]).
#[doc(hidden)]
pub fn write_raw(path: &Path, raw: &RawSnapshot) -> Result<(), SnapshotError> {
    let file = std::fs::File::create(path).map_err(|e| SnapshotError::io("creating", path, e))?;
    file.set_len(DATA_OFFSET + raw.data_len)
        .map_err(|e| SnapshotError::io("extending", path, e))?;
    for (gpa, bytes) in &raw.pages {
        file.write_all_at(bytes, DATA_OFFSET + gpa)
            .map_err(|e| SnapshotError::io("writing", path, e))?;
    }
    write_sections(
        &file,
        path,
        &raw.meta,
        DATA_OFFSET,
        raw.data_len,
        raw.version,
    )?;
    Ok(())
}

/// Checks that `ranges` are non-empty, page aligned, sorted and disjoint.
pub(crate) fn check_sorted(what: &str, ranges: &[GuestRange]) -> Result<(), SnapshotError> {
    let mut prev_end = 0;
    for (i, r) in ranges.iter().enumerate() {
        if r.is_empty() || !r.is_page_aligned() {
            return Err(SnapshotError::layout(format!(
                "{what} {r} is empty or unaligned"
            )));
        }
        if i > 0 && r.start() < prev_end {
            return Err(SnapshotError::layout(format!(
                "{what} {r} overlaps or precedes the one ending at {prev_end:#x}"
            )));
        }
        prev_end = r.end();
    }
    Ok(())
}

impl SnapshotMeta {
    /// Checks that the layout is one an address space can have and that the
    /// vmas and the data lie inside `data_len` bytes of data.
    pub(crate) fn validate(&self, data_len: u64) -> Result<(), SnapshotError> {
        let bad = |why: String| Err(SnapshotError::layout(why));
        if self.space_size == 0 || self.space_size % PAGE_SIZE != 0 {
            return bad(format!("space size {:#x}", self.space_size));
        }
        if self.id == 0 {
            return bad("snapshot id 0".into());
        }
        match (self.kind, &self.base) {
            (SnapshotKind::Full, None) | (SnapshotKind::Diff, Some(_)) => {}
            (k, b) => return bad(format!("kind {k:?} with base {b:?}")),
        }
        let vma_ranges: Vec<GuestRange> = self.vmas.iter().map(|v| v.range).collect();
        check_sorted("vma", &vma_ranges)?;
        for v in &self.vmas {
            if v.range.end() > self.space_size {
                return bad(format!("vma {} outside the space", v.range));
            }
            // A restore maps the data area for each vma: it must lie in the
            // file, or touching it would be a bus error.
            if v.range.end() > data_len {
                return bad(format!(
                    "vma {} past the data length {data_len:#x}",
                    v.range
                ));
            }
            let regions: Vec<GuestRange> = v.protections.iter().map(|p| p.0).collect();
            check_sorted("protection region", &regions)?;
            let covers = regions.first().map(|r| r.start()) == Some(v.range.start())
                && regions.last().map(|r| r.end()) == Some(v.range.end())
                && regions.windows(2).all(|w| w[0].end() == w[1].start());
            if !covers {
                return bad(format!("protections do not cover vma {} exactly", v.range));
            }
            if let Some((r, p)) = v
                .protections
                .iter()
                .find(|(_, p)| !v.max_perms.is_superset_of(*p) || (p.write && !p.read))
            {
                return bad(format!(
                    "protection {p} of {r} exceeds {} or is write-only",
                    v.max_perms
                ));
            }
        }
        for d in &self.devices {
            if d.is_empty() || !d.is_page_aligned() || d.end() > self.space_size {
                return bad(format!("device range {d}"));
            }
        }
        check_sorted("data range", &self.data)?;
        for d in &self.data {
            if d.end() > data_len {
                return bad(format!("data range {d} past the data length {data_len:#x}"));
            }
            if !covered(&vma_ranges, *d) {
                return bad(format!("data range {d} outside the vmas"));
            }
        }
        Ok(())
    }
}

/// Whether sorted, disjoint `ranges` cover all of `r`.
fn covered(ranges: &[GuestRange], r: GuestRange) -> bool {
    let mut at = r.start();
    let first = ranges.partition_point(|v| v.end() <= at);
    for v in &ranges[first..] {
        if v.start() > at {
            return false;
        }
        at = v.end();
        if at >= r.end() {
            return true;
        }
    }
    false
}

/// `r` as a range, for decoders.
pub(crate) fn range(start: u64, end: u64) -> Result<GuestRange, String> {
    Range::new(start, end).map_err(|e| e.to_string())
}
