//! The metadata section's encoding: little-endian integers, counts and
//! lengths as u64, ranges as (start, end), permissions as a bit set.
//! Decoding bounds every count and length by the bytes left, so a crafted
//! section cannot make it allocate more than the section's size.

use super::format::{range, BaseRef, SnapshotKind, SnapshotMeta, VmaRecord};
use super::SnapshotError;
use crate::perms::Perms;
use crate::range::GuestRange;

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn range(&mut self, r: GuestRange) {
        self.u64(r.start());
        self.u64(r.end());
    }
    fn ranges(&mut self, rs: &[GuestRange]) {
        self.u64(rs.len() as u64);
        for r in rs {
            self.range(*r);
        }
    }
    fn perms(&mut self, p: Perms) {
        self.u8(p.read as u8 | (p.write as u8) << 1 | (p.execute as u8) << 2);
    }
}

/// Encodes `meta`.
pub(crate) fn encode(meta: &SnapshotMeta) -> Vec<u8> {
    let mut e = Enc(Vec::new());
    e.u8(match meta.kind {
        SnapshotKind::Full => 1,
        SnapshotKind::Diff => 2,
    });
    e.u64(meta.id);
    match &meta.base {
        None => e.u8(0),
        Some(b) => {
            e.u8(1);
            e.u64(b.id);
            e.bytes(b.file_name.as_bytes());
        }
    }
    e.u64(meta.space_size);
    e.u64(meta.vmas.len() as u64);
    for v in &meta.vmas {
        e.range(v.range);
        e.u8(v.private as u8);
        e.perms(v.max_perms);
        e.u8(v.object as u8);
        e.bytes(v.name.as_bytes());
        e.u64(v.protections.len() as u64);
        for (r, p) in &v.protections {
            e.range(*r);
            e.perms(*p);
        }
    }
    e.ranges(&meta.devices);
    e.u64(meta.vcpus.len() as u64);
    for blob in &meta.vcpus {
        e.bytes(blob);
    }
    e.bytes(&meta.vm_state);
    e.ranges(&meta.data);
    e.0
}

struct Dec<'a> {
    b: &'a [u8],
    at: usize,
}

type DecResult<T> = Result<T, String>;

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> DecResult<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(format!(
                "{n} bytes wanted at {}, {} left",
                self.at,
                self.b.len() - self.at
            ));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> DecResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> DecResult<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("flag {v} at {}", self.at - 1)),
        }
    }
    fn u64(&mut self) -> DecResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count of items each at least `min` bytes long, bounded by what is left.
    fn count(&mut self, min: usize) -> DecResult<usize> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) as u64;
        if n.checked_mul(min as u64).is_none_or(|need| need > left) {
            return Err(format!("count {n} at {} exceeds the section", self.at - 8));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> DecResult<Vec<u8>> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> DecResult<String> {
        String::from_utf8(self.bytes()?).map_err(|e| format!("name not UTF-8: {e}"))
    }
    fn range(&mut self) -> DecResult<GuestRange> {
        let (s, e) = (self.u64()?, self.u64()?);
        range(s, e)
    }
    fn ranges(&mut self) -> DecResult<Vec<GuestRange>> {
        let n = self.count(16)?;
        (0..n).map(|_| self.range()).collect()
    }
    fn perms(&mut self) -> DecResult<Perms> {
        let v = self.u8()?;
        if v & !7 != 0 {
            return Err(format!("permission bits {v:#x}"));
        }
        Ok(Perms::new(v & 1 != 0, v & 2 != 0, v & 4 != 0))
    }
}

/// Decodes a metadata section (its checksum already checked).
pub(crate) fn decode(bytes: &[u8]) -> Result<SnapshotMeta, SnapshotError> {
    decode_inner(bytes).map_err(|why| SnapshotError::Malformed {
        section: "metadata",
        why,
    })
}

fn decode_inner(bytes: &[u8]) -> DecResult<SnapshotMeta> {
    let mut d = Dec { b: bytes, at: 0 };
    let kind = match d.u8()? {
        1 => SnapshotKind::Full,
        2 => SnapshotKind::Diff,
        k => return Err(format!("unknown kind {k}")),
    };
    let id = d.u64()?;
    let base = if d.bool()? {
        Some(BaseRef {
            id: d.u64()?,
            file_name: d.string()?,
        })
    } else {
        None
    };
    let space_size = d.u64()?;
    // A vma is at least 16 + 3 + 8 + 8 bytes.
    let nvmas = d.count(35)?;
    let mut vmas = Vec::with_capacity(nvmas);
    for _ in 0..nvmas {
        let range = d.range()?;
        let private = d.bool()?;
        let max_perms = d.perms()?;
        let object = d.bool()?;
        let name = d.string()?;
        let nprot = d.count(17)?;
        let mut protections = Vec::with_capacity(nprot);
        for _ in 0..nprot {
            protections.push((d.range()?, d.perms()?));
        }
        vmas.push(VmaRecord {
            range,
            private,
            max_perms,
            protections,
            name,
            object,
        });
    }
    let devices = d.ranges()?;
    let nvcpus = d.count(8)?;
    let mut vcpus = Vec::with_capacity(nvcpus);
    for _ in 0..nvcpus {
        vcpus.push(d.bytes()?);
    }
    let vm_state = d.bytes()?;
    let data = d.ranges()?;
    if d.at != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - d.at));
    }
    Ok(SnapshotMeta {
        kind,
        id,
        base,
        space_size,
        vmas,
        devices,
        vcpus,
        vm_state,
        data,
    })
}
