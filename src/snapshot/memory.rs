//! Writing a snapshot ([`save`]): guest memory read through the backing
//! files, never through the address space's fault path, so saving
//! populates and commits nothing.
//!
//! Where each byte comes from:
//! - a populated extent: its backing file (the MemoryFile's memfd or a host
//!   file) read with `pread`, skipping the file's holes (`SEEK_DATA`) and
//!   pages that are entirely zero (a full snapshot), or every page (a diff);
//! - an unpopulated part of a vma that maps an object (a
//!   [`HostFile`](crate::mm::HostFile), a
//!   [`SharedMemory`](crate::mm::SharedMemory)): the object, translated
//!   with [`Mappable::translate`](crate::mm::Mappable::translate) and read
//!   the same way. Translating a `SharedMemory` allocates (without
//!   committing) MemoryFile pages for the object's holes, as a guest read
//!   would; they read as zeros and are not written. This is the price of
//!   reading pages another space of the object wrote;
//! - an unpopulated part of private anonymous memory: zeros, so nothing
//!   (a diff writes the zeros of its dirty pages).
//!
//! Each file range is referenced ([`File::inc_ref`](crate::mm::File)) while
//! it is read, so it cannot be freed and reused under the reader. The
//! caller pauses the guest; a host thread changing the space meanwhile
//! gets a snapshot of some moment during the save, or a typed error.

use std::os::fd::BorrowedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::{
    self, BaseRef, SnapshotKind, SnapshotMeta, VmaRecord, DATA_OFFSET, FORMAT_VERSION,
};
use super::{sys, SnapshotError};
use crate::mm::{AddressSpace, File, VmaLayout};
use crate::perms::Access;
use crate::range::{GuestRange, Range, PAGE_SIZE};

/// What a diff snapshot is taken against.
#[derive(Debug, Clone)]
pub struct DiffOf<'a> {
    /// The base snapshot (its id and file name, recorded in the diff).
    pub base: BaseRef,
    /// Guest ranges dirtied since the base (page aligned, any order,
    /// possibly overlapping). Parts outside every vma are left out.
    pub dirty: &'a [GuestRange],
}

/// What to save.
pub struct SaveRequest<'a> {
    /// The address space whose layout and memory are saved.
    pub space: &'a AddressSpace,
    /// Device (MMIO) ranges, recorded as given.
    pub devices: Vec<GuestRange>,
    /// One opaque state blob per vCPU.
    pub vcpus: Vec<Vec<u8>>,
    /// Opaque VM-wide state.
    pub vm_state: Vec<u8>,
    /// `Some` for a diff snapshot: only its dirty pages are written.
    pub diff: Option<DiffOf<'a>>,
}

/// What [`save`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveReport {
    /// The new snapshot's id.
    pub id: u64,
    /// Guest memory bytes written into the file.
    pub data_bytes_written: u64,
    /// The file's allocated blocks (`st_blocks * 512`): data, metadata and
    /// the header page.
    pub file_blocks_bytes: u64,
    /// Length of the metadata section.
    pub metadata_bytes: u64,
    /// Time the save took, sync and rename included.
    pub elapsed: Duration,
}

/// Bytes read per `pread`.
const CHUNK: usize = 1 << 20;

/// Saves `req` as a snapshot at `path`: written to `path.tmp`, synced and
/// renamed over `path`, so `path` is either the old file or a complete new
/// one (and VMs restored from an old file there keep mapping it). Populates and commits no guest memory: bytes are read from the
/// files behind the address space with `pread`, skipping their holes.
///
/// A full snapshot writes every non-zero page: populated pages, and the
/// unpopulated parts of vmas that map an object (a host file's content).
/// For a [`SharedMemory`](crate::mm::SharedMemory) object that means a
/// translation, which allocates MemoryFile pages (uncommitted, reading as
/// zeros, kept by the object as after a guest read) for the object's own
/// holes; private anonymous memory and host files allocate nothing. A diff
/// writes every page of its dirty ranges inside the vmas, zeros included.
///
/// The caller pauses whatever could change the space (vCPUs, host I/O)
/// for the duration: the layout and the memory are read one after the
/// other, not atomically.
///
/// Errors: a dirty range that is unaligned or outside the space
/// ([`SnapshotError::Request`]); metadata `Snapshot::open` would refuse,
/// e.g. a device range outside the space ([`SnapshotError::Layout`]);
/// file errors ([`SnapshotError::Io`]);
/// the address space or an object refusing ([`SnapshotError::Mm`],
/// [`SnapshotError::File`]). On error the temporary file is removed and
/// `path` is untouched.
pub fn save(path: &Path, req: SaveRequest<'_>) -> Result<SaveReport, SnapshotError> {
    let started = Instant::now();
    let space_size = req.space.options().size;
    let dirty = match &req.diff {
        Some(d) => Some(normalize(d.dirty, space_size)?),
        None => None,
    };
    let tmp = tmp_path(path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| SnapshotError::io("creating", &tmp, e))?;
    match write_all(&file, &tmp, req, dirty, space_size) {
        Ok((id, data_bytes_written, metadata_bytes)) => {
            file.sync_all()
                .map_err(|e| SnapshotError::io("fsync", &tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| SnapshotError::io("renaming", &tmp, e))?;
            sync_dir(path)?;
            let file_blocks_bytes = file
                .metadata()
                .map_err(|e| SnapshotError::io("fstat", path, e))?
                .blocks()
                * 512;
            let report = SaveReport {
                id,
                data_bytes_written,
                file_blocks_bytes,
                metadata_bytes,
                elapsed: started.elapsed(),
            };
            log::info!("saved snapshot {}: {report:?}", path.display());
            Ok(report)
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Makes the rename durable.
fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapshotError::io("fsync of the directory of", path, e))
}

/// Sorts and merges `dirty`, checking alignment and bounds.
fn normalize(dirty: &[GuestRange], space_size: u64) -> Result<Vec<GuestRange>, SnapshotError> {
    let mut v: Vec<GuestRange> = Vec::with_capacity(dirty.len());
    for r in dirty {
        if !r.is_page_aligned() || r.end() > space_size {
            return Err(SnapshotError::Request {
                why: format!("dirty range {r} unaligned or outside the space [0, {space_size:#x})"),
            });
        }
        if !r.is_empty() {
            v.push(*r);
        }
    }
    v.sort();
    let mut out: Vec<GuestRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if last.end() >= r.start() => {
                *last = Range::new_unchecked(last.start(), last.end().max(r.end()))
            }
            _ => out.push(r),
        }
    }
    Ok(out)
}

/// A random non-zero snapshot id.
fn random_id() -> Result<u64, SnapshotError> {
    let path = Path::new("/dev/urandom");
    let f = std::fs::File::open(path).map_err(|e| SnapshotError::io("opening", path, e))?;
    loop {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 0)
            .map_err(|e| SnapshotError::io("reading", path, e))?;
        let id = u64::from_le_bytes(b);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// Writes data, metadata and header into `file`; returns (id, data bytes,
/// metadata bytes).
fn write_all(
    file: &std::fs::File,
    path: &Path,
    req: SaveRequest<'_>,
    dirty: Option<Vec<GuestRange>>,
    space_size: u64,
) -> Result<(u64, u64, u64), SnapshotError> {
    let id = random_id()?;
    let layout = req.space.layout();
    let data_len = layout.last().map_or(0, |v| v.range.end());
    file.set_len(DATA_OFFSET + data_len)
        .map_err(|e| SnapshotError::io("extending", path, e))?;
    let mut w = Writer {
        file,
        path,
        dense: dirty.is_some(),
        buf: vec![0; CHUNK],
        written: 0,
        index: Vec::new(),
    };
    for vma in &layout {
        match &dirty {
            None => w.vma_part(req.space, vma, vma.range)?,
            Some(dirty) => {
                let first = dirty.partition_point(|d| d.end() <= vma.range.start());
                for d in dirty[first..]
                    .iter()
                    .take_while(|d| d.start() < vma.range.end())
                {
                    w.vma_part(req.space, vma, d.intersect(vma.range))?;
                }
            }
        }
    }
    let (kind, base) = match req.diff {
        Some(d) => (SnapshotKind::Diff, Some(d.base)),
        None => (SnapshotKind::Full, None),
    };
    let meta = SnapshotMeta {
        kind,
        id,
        base,
        space_size,
        vmas: layout.iter().map(record).collect(),
        devices: req.devices,
        vcpus: req.vcpus,
        vm_state: req.vm_state,
        data: std::mem::take(&mut w.index),
    };
    // What open would refuse is not written (devices given by the caller,
    // say): fail the save, not the restore.
    meta.validate(data_len)?;
    let meta_len =
        format::write_sections(file, path, &meta, DATA_OFFSET, data_len, FORMAT_VERSION)?;
    Ok((id, w.written, meta_len))
}

fn record(v: &VmaLayout) -> VmaRecord {
    VmaRecord {
        range: v.range,
        private: v.private,
        max_perms: v.max_perms,
        protections: v.protections.clone(),
        name: v.name.clone(),
        object: v.object.is_some(),
    }
}

/// Copies guest memory into the snapshot file.
struct Writer<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    /// Write every page asked for, zeros and holes included (a diff).
    dense: bool,
    buf: Vec<u8>,
    /// Guest bytes written.
    written: u64,
    /// The data index: written guest ranges, merged.
    index: Vec<GuestRange>,
}

impl Writer<'_> {
    /// Writes guest range `part` of `vma`.
    fn vma_part(
        &mut self,
        space: &AddressSpace,
        vma: &VmaLayout,
        part: GuestRange,
    ) -> Result<(), SnapshotError> {
        for e in space.extents(part)? {
            match (&e.backing, &vma.object) {
                (Some(b), _) => {
                    let fr = Range::new_unchecked(b.offset, b.offset + e.range.len());
                    self.copy_file(&b.file, fr, e.range.start())?;
                }
                (None, Some((object, offset))) => {
                    let objr = Range::new_unchecked(
                        offset + (e.range.start() - vma.range.start()),
                        offset + (e.range.end() - vma.range.start()),
                    );
                    for t in object.translate(objr, objr, Access::Read)? {
                        let gpa = e.range.start() + (t.source.start() - objr.start());
                        let fr = Range::new_unchecked(t.offset, t.offset + t.source.len());
                        self.copy_file(&t.file, fr, gpa)?;
                    }
                }
                (None, None) if self.dense => self.zeros(e.range)?,
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Copies file range `fr` of `file` to guest address `gpa`, holding a
    /// reference on the pages meanwhile.
    fn copy_file(
        &mut self,
        file: &Arc<dyn File>,
        fr: Range,
        gpa: u64,
    ) -> Result<(), SnapshotError> {
        file.inc_ref(fr)?;
        let copied = self.copy(file.fd(), fr, gpa);
        let released = file.dec_ref(fr);
        copied?;
        Ok(released?)
    }

    fn copy(&mut self, fd: BorrowedFd<'_>, fr: Range, gpa: u64) -> Result<(), SnapshotError> {
        if self.dense {
            return self.copy_run(fd, fr, gpa);
        }
        // Only the file's data runs: holes are zeros and reading them would
        // just be skipped.
        let mut at = fr.start();
        while at < fr.end() {
            let data = match sys::seek(fd, at, libc::SEEK_DATA) {
                Ok(Some(d)) => d - d % PAGE_SIZE,
                Ok(None) => break,
                // No SEEK_DATA on this file system: read it all.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => at,
                Err(e) => {
                    return Err(SnapshotError::io(
                        "SEEK_DATA in the backing of",
                        self.path,
                        e,
                    ))
                }
            }
            .max(at);
            if data >= fr.end() {
                break;
            }
            let hole = match sys::seek(fd, data, libc::SEEK_HOLE) {
                Ok(Some(h)) => h.next_multiple_of(PAGE_SIZE),
                Ok(None) | Err(_) => fr.end(),
            }
            .clamp(data + PAGE_SIZE, fr.end());
            self.copy_run(
                fd,
                Range::new_unchecked(data, hole),
                gpa + (data - fr.start()),
            )?;
            at = hole;
        }
        Ok(())
    }

    /// Reads `fr` chunk by chunk and writes it at `gpa`: every page when
    /// dense, else the runs of non-zero pages.
    fn copy_run(&mut self, fd: BorrowedFd<'_>, fr: Range, gpa: u64) -> Result<(), SnapshotError> {
        let mut off = fr.start();
        while off < fr.end() {
            let n = (fr.end() - off).min(CHUNK as u64) as usize;
            let mut buf = std::mem::take(&mut self.buf);
            let result = sys::pread_full(fd, &mut buf[..n], off)
                .map_err(|e| SnapshotError::io("reading guest memory for", self.path, e))
                .and_then(|()| self.put(&buf[..n], gpa + (off - fr.start())));
            self.buf = buf;
            result?;
            off += n as u64;
        }
        Ok(())
    }

    /// Writes `bytes` (whole pages) at guest address `gpa`, leaving zero
    /// pages out unless dense.
    fn put(&mut self, bytes: &[u8], gpa: u64) -> Result<(), SnapshotError> {
        let page = PAGE_SIZE as usize;
        let mut i = 0;
        while i < bytes.len() {
            if !self.dense && is_zero(&bytes[i..i + page]) {
                i += page;
                continue;
            }
            let mut j = i + page;
            while j < bytes.len() && (self.dense || !is_zero(&bytes[j..j + page])) {
                j += page;
            }
            self.write(&bytes[i..j], gpa + i as u64)?;
            i = j;
        }
        Ok(())
    }

    /// Writes zeros over guest range `r` (a diff's unpopulated dirty pages).
    fn zeros(&mut self, r: GuestRange) -> Result<(), SnapshotError> {
        let zero = vec![0u8; CHUNK.min(r.len() as usize)];
        let mut at = r.start();
        while at < r.end() {
            let n = (r.end() - at).min(CHUNK as u64) as usize;
            self.write(&zero[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8], gpa: u64) -> Result<(), SnapshotError> {
        self.file
            .write_all_at(bytes, DATA_OFFSET + gpa)
            .map_err(|e| SnapshotError::io("writing guest memory to", self.path, e))?;
        self.written += bytes.len() as u64;
        let r = Range::new_unchecked(gpa, gpa + bytes.len() as u64);
        match self.index.last_mut() {
            Some(last) if last.end() == r.start() => {
                *last = Range::new_unchecked(last.start(), r.end())
            }
            _ => self.index.push(r),
        }
        Ok(())
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}
