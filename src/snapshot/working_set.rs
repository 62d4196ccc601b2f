//! The working-set record: the guest windows a restored VM faulted, in
//! order, saved next to its snapshot so later restores can prefetch them.
//!
//! File layout (little endian): magic `"GMMWSET\0"`, version (u32), window
//! count (u64), CRC-32C of the windows (u32), then per window its start and
//! end (u64 each) and its access (u8: 0 read, 1 write, 2 execute).

use std::path::{Path, PathBuf};

use super::format::crc32c;
use super::SnapshotError;
use crate::perms::Access;
use crate::range::{GuestRange, Range};

const MAGIC: [u8; 8] = *b"GMMWSET\0";
/// The working-set format version this build writes and reads.
pub const WORKING_SET_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 4;
const ENTRY: usize = 17;

/// Guest windows in the order they were first touched, each with the
/// access that touched it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// The windows (page aligned, non-empty), in order.
    pub windows: Vec<(GuestRange, Access)>,
}

/// Where the working set of the snapshot at `snapshot` is kept: the same
/// path with `.wset` appended.
pub fn working_set_path(snapshot: &Path) -> PathBuf {
    let mut s = snapshot.as_os_str().to_owned();
    s.push(".wset");
    PathBuf::from(s)
}

impl WorkingSet {
    /// Writes the record to `path` (through `path.tmp`, synced and renamed).
    ///
    /// Errors: a window that is empty or unaligned
    /// ([`SnapshotError::Request`]); file errors.
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        let mut body = Vec::with_capacity(self.windows.len() * ENTRY);
        for (r, a) in &self.windows {
            if r.is_empty() || !r.is_page_aligned() {
                return Err(SnapshotError::Request {
                    why: format!("working-set window {r} is empty or unaligned"),
                });
            }
            body.extend_from_slice(&r.start().to_le_bytes());
            body.extend_from_slice(&r.end().to_le_bytes());
            body.push(match a {
                Access::Read => 0,
                Access::Write => 1,
                Access::Execute => 2,
            });
        }
        let mut bytes = Vec::with_capacity(HEADER + body.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(self.windows.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(SnapshotError::io("writing", &tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| SnapshotError::io("renaming", &tmp, e))
    }

    /// Reads and checks a record: magic, version, length, checksum, windows.
    ///
    /// Errors: [`SnapshotError::BadMagic`], [`Version`](SnapshotError::Version),
    /// [`Truncated`](SnapshotError::Truncated),
    /// [`Checksum`](SnapshotError::Checksum),
    /// [`Malformed`](SnapshotError::Malformed), file errors.
    pub fn load(path: &Path) -> Result<WorkingSet, SnapshotError> {
        let bytes = std::fs::read(path).map_err(|e| SnapshotError::io("reading", path, e))?;
        let found = bytes.len() as u64;
        if bytes.len() < HEADER {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                return Err(SnapshotError::BadMagic);
            }
            return Err(SnapshotError::Truncated {
                expected: HEADER as u64,
                found,
            });
        }
        if bytes[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != WORKING_SET_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                supported: WORKING_SET_VERSION,
            });
        }
        let count = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        let expected = count
            .checked_mul(ENTRY as u64)
            .and_then(|b| b.checked_add(HEADER as u64))
            .unwrap_or(u64::MAX);
        if found < expected {
            return Err(SnapshotError::Truncated { expected, found });
        }
        let malformed = |why: String| SnapshotError::Malformed {
            section: "working set",
            why,
        };
        if found > expected {
            return Err(malformed(format!("{} trailing bytes", found - expected)));
        }
        let body = &bytes[HEADER..];
        if crc32c(body) != crc {
            return Err(SnapshotError::Checksum {
                section: "working set",
            });
        }
        let mut windows = Vec::with_capacity(count as usize);
        for e in body.chunks_exact(ENTRY) {
            let start = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
            let end = u64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            let r = Range::new(start, end)
                .ok()
                .filter(|r| !r.is_empty() && r.is_page_aligned())
                .ok_or_else(|| malformed(format!("window [{start:#x}, {end:#x})")))?;
            let a = match e[16] {
                0 => Access::Read,
                1 => Access::Write,
                2 => Access::Execute,
                v => return Err(malformed(format!("access {v}"))),
            };
            windows.push((r, a));
        }
        Ok(WorkingSet { windows })
    }
}
