//! The byte format of [`VcpuState`](super::VcpuState) and
//! [`VmState`](super::VmState): every named field of the KVM structures
//! written explicitly, little-endian (no struct is reinterpreted as bytes,
//! so compiler padding never reaches the output).
//!
//! ```text
//! magic [u8; 8] | version u16 | reserved u16 | sections u32
//! { tag u32 | len u32 | payload [u8; len] } × sections
//! checksum u64 (FNV-1a 64 of everything before it)
//! ```

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_lapic_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs,
};

use super::StateError;

/// The format version this code writes and reads.
pub(super) const VERSION: u16 = 1;

/// Builds one state's bytes.
pub(super) struct Writer {
    buf: Vec<u8>,
    sections: u32,
    /// Where the current section's length goes.
    open: Option<usize>,
}

impl Writer {
    pub(super) fn new(magic: &[u8; 8]) -> Self {
        let mut buf = Vec::with_capacity(8192);
        buf.extend_from_slice(magic);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&0u16.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // section count, patched in finish()
        Writer {
            buf,
            sections: 0,
            open: None,
        }
    }

    /// Writes one section: `tag`, then what `body` writes.
    pub(super) fn section(&mut self, tag: u32, body: impl FnOnce(&mut Self)) {
        debug_assert!(self.open.is_none(), "sections do not nest");
        self.u32(tag);
        self.open = Some(self.buf.len());
        self.u32(0);
        body(self);
        let at = self.open.take().expect("section open");
        let len = u32::try_from(self.buf.len() - at - 4).expect("a section is < 4 GiB");
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        self.sections += 1;
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.buf[12..16].copy_from_slice(&self.sections.to_le_bytes());
        let sum = fnv1a(&self.buf);
        self.buf.extend_from_slice(&sum.to_le_bytes());
        self.buf
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    pub(super) fn u64s(&mut self, v: &[u64]) {
        v.iter().for_each(|&x| self.u64(x));
    }
    /// A count of what follows (lengths of vectors this crate built).
    pub(super) fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("a count is < 2^32"));
    }
}

/// Reads bytes front to back; running out is [`StateError::Truncated`].
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// What is being read, for errors.
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader {
            bytes,
            pos: 0,
            what,
        }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let have = self.bytes.len() - self.pos;
        if n > have {
            return Err(StateError::Truncated {
                what: self.what,
                need: n,
                have,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(super) fn u64s<const N: usize>(&mut self) -> Result<[u64; N], StateError> {
        let mut a = [0u64; N];
        for x in &mut a {
            *x = self.u64()?;
        }
        Ok(a)
    }
    /// A count of items of `item_size` bytes each, at most `max`, that the
    /// rest of the section can hold.
    pub(super) fn count(&mut self, max: usize, item_size: usize) -> Result<usize, StateError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(malformed(format!(
                "{}: count {n} exceeds the maximum {max}",
                self.what
            )));
        }
        let have = self.bytes.len() - self.pos;
        if n * item_size > have {
            return Err(StateError::Truncated {
                what: self.what,
                need: n * item_size,
                have,
            });
        }
        Ok(n)
    }
    /// The section must be used up.
    pub(super) fn done(&self) -> Result<(), StateError> {
        match self.bytes.len() - self.pos {
            0 => Ok(()),
            n => Err(malformed(format!(
                "{}: {n} unexpected trailing bytes",
                self.what
            ))),
        }
    }
}

pub(super) fn malformed(why: String) -> StateError {
    StateError::Malformed { why }
}

/// One section of a parsed state.
pub(super) struct Section<'a> {
    pub(super) tag: u32,
    pub(super) body: &'a [u8],
}

impl<'a> Section<'a> {
    /// A reader over the body; errors name it `what`.
    pub(super) fn reader(&self, what: &'static str) -> Reader<'a> {
        Reader::new(self.body, what)
    }
}

/// Checks magic, version and checksum and splits `bytes` into sections
/// (each tag at most once).
pub(super) fn sections<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    what: &'static str,
) -> Result<Vec<Section<'a>>, StateError> {
    let mut r = Reader::new(bytes, what);
    let found: [u8; 8] = r.array()?;
    if &found != magic {
        return Err(StateError::BadMagic {
            found,
            want: *magic,
        });
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(StateError::BadVersion {
            found: version,
            supported: VERSION,
        });
    }
    let _reserved = r.u16()?;
    let count = r.u32()?;
    if bytes.len() < r.pos + 8 {
        return Err(StateError::Truncated {
            what,
            need: r.pos + 8,
            have: bytes.len(),
        });
    }
    let (data, sum) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
    let computed = fnv1a(data);
    if stored != computed {
        return Err(StateError::BadChecksum { stored, computed });
    }
    // The formats know a dozen sections: a count far above that is a
    // crafted file, refused before any per-section work (the duplicate
    // check below is quadratic).
    if count > MAX_SECTIONS {
        return Err(malformed(format!(
            "{what}: {count} sections (at most {MAX_SECTIONS})"
        )));
    }
    let mut r = Reader::new(&data[r.pos..], what);
    let mut out: Vec<Section<'a>> = Vec::new();
    for _ in 0..count {
        let tag = r.u32()?;
        let len = r.u32()? as usize;
        let body = r.take(len)?;
        if out.iter().any(|s| s.tag == tag) {
            return Err(malformed(format!("{what}: section {tag} appears twice")));
        }
        out.push(Section { tag, body });
    }
    r.done()?;
    Ok(out)
}

/// The most sections a state blob may have (the formats use fewer than 20).
const MAX_SECTIONS: u32 = 64;

/// FNV-1a, 64 bits: catches corruption; not a defence against tampering.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// Field-by-field encodings of the KVM structures.

pub(super) fn put_regs(w: &mut Writer, r: &kvm_regs) {
    w.u64s(&[
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]);
}

pub(super) fn get_regs(r: &mut Reader<'_>) -> Result<kvm_regs, StateError> {
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        r.u64s::<18>()?;
    Ok(kvm_regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rsp,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        rflags,
    })
}

fn put_segment(w: &mut Writer, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    w.bytes(&[
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable, s.padding,
    ]);
}

fn get_segment(r: &mut Reader<'_>) -> Result<kvm_segment, StateError> {
    let base = r.u64()?;
    let limit = r.u32()?;
    let selector = r.u16()?;
    let [type_, present, dpl, db, s, l, g, avl, unusable, padding] = r.array::<10>()?;
    Ok(kvm_segment {
        base,
        limit,
        selector,
        type_,
        present,
        dpl,
        db,
        s,
        l,
        g,
        avl,
        unusable,
        padding,
    })
}

fn put_dtable(w: &mut Writer, d: &kvm_dtable) {
    w.u64(d.base);
    w.u16(d.limit);
    d.padding.iter().for_each(|&p| w.u16(p));
}

fn get_dtable(r: &mut Reader<'_>) -> Result<kvm_dtable, StateError> {
    Ok(kvm_dtable {
        base: r.u64()?,
        limit: r.u16()?,
        padding: [r.u16()?, r.u16()?, r.u16()?],
    })
}

pub(super) fn put_sregs(w: &mut Writer, s: &kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(w, seg);
    }
    put_dtable(w, &s.gdt);
    put_dtable(w, &s.idt);
    w.u64s(&[s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base]);
    w.u64s(&s.interrupt_bitmap);
}

pub(super) fn get_sregs(r: &mut Reader<'_>) -> Result<kvm_sregs, StateError> {
    let mut segs = [kvm_segment::default(); 8];
    for s in &mut segs {
        *s = get_segment(r)?;
    }
    let [cs, ds, es, fs, gs, ss, tr, ldt] = segs;
    let gdt = get_dtable(r)?;
    let idt = get_dtable(r)?;
    let [cr0, cr2, cr3, cr4, cr8, efer, apic_base] = r.u64s::<7>()?;
    Ok(kvm_sregs {
        cs,
        ds,
        es,
        fs,
        gs,
        ss,
        tr,
        ldt,
        gdt,
        idt,
        cr0,
        cr2,
        cr3,
        cr4,
        cr8,
        efer,
        apic_base,
        interrupt_bitmap: r.u64s::<4>()?,
    })
}

pub(super) const CPUID_ENTRY_LEN: usize = 10 * 4;

pub(super) fn put_cpuid(w: &mut Writer, entries: &[kvm_cpuid_entry2]) {
    w.count(entries.len());
    for e in entries {
        for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            w.u32(v);
        }
        e.padding.iter().for_each(|&p| w.u32(p));
    }
}

pub(super) fn get_cpuid(r: &mut Reader<'_>) -> Result<Vec<kvm_cpuid_entry2>, StateError> {
    let n = r.count(kvm_bindings::KVM_MAX_CPUID_ENTRIES, CPUID_ENTRY_LEN)?;
    (0..n)
        .map(|_| {
            Ok(kvm_cpuid_entry2 {
                function: r.u32()?,
                index: r.u32()?,
                flags: r.u32()?,
                eax: r.u32()?,
                ebx: r.u32()?,
                ecx: r.u32()?,
                edx: r.u32()?,
                padding: [r.u32()?, r.u32()?, r.u32()?],
            })
        })
        .collect()
}

/// The XSAVE area as 32-bit words (KVM's `region` and `extra`).
pub(super) fn put_words(w: &mut Writer, words: &[u32]) {
    w.count(words.len());
    words.iter().for_each(|&x| w.u32(x));
}

pub(super) fn get_words(r: &mut Reader<'_>, max: usize) -> Result<Vec<u32>, StateError> {
    let n = r.count(max, 4)?;
    (0..n).map(|_| r.u32()).collect()
}

pub(super) fn put_xcrs(w: &mut Writer, x: &kvm_xcrs) {
    w.u32(x.nr_xcrs);
    w.u32(x.flags);
    for xcr in &x.xcrs {
        w.u32(xcr.xcr);
        w.u32(xcr.reserved);
        w.u64(xcr.value);
    }
    w.u64s(&x.padding);
}

pub(super) fn get_xcrs(r: &mut Reader<'_>) -> Result<kvm_xcrs, StateError> {
    let nr_xcrs = r.u32()?;
    let flags = r.u32()?;
    let mut xcrs = [kvm_xcr::default(); 16];
    if nr_xcrs as usize > xcrs.len() {
        return Err(malformed(format!(
            "xcrs: nr_xcrs {nr_xcrs} exceeds {}",
            xcrs.len()
        )));
    }
    for x in &mut xcrs {
        *x = kvm_xcr {
            xcr: r.u32()?,
            reserved: r.u32()?,
            value: r.u64()?,
        };
    }
    Ok(kvm_xcrs {
        nr_xcrs,
        flags,
        xcrs,
        padding: r.u64s::<16>()?,
    })
}

pub(super) fn put_debugregs(w: &mut Writer, d: &kvm_debugregs) {
    w.u64s(&d.db);
    w.u64s(&[d.dr6, d.dr7, d.flags]);
    w.u64s(&d.reserved);
}

pub(super) fn get_debugregs(r: &mut Reader<'_>) -> Result<kvm_debugregs, StateError> {
    let db = r.u64s::<4>()?;
    let [dr6, dr7, flags] = r.u64s::<3>()?;
    Ok(kvm_debugregs {
        db,
        dr6,
        dr7,
        flags,
        reserved: r.u64s::<9>()?,
    })
}

pub(super) fn put_events(w: &mut Writer, e: &kvm_vcpu_events) {
    let x = &e.exception;
    w.bytes(&[x.injected, x.nr, x.has_error_code, x.pending]);
    w.u32(x.error_code);
    let i = &e.interrupt;
    w.bytes(&[i.injected, i.nr, i.soft, i.shadow]);
    let n = &e.nmi;
    w.bytes(&[n.injected, n.pending, n.masked, n.pad]);
    w.u32(e.sipi_vector);
    w.u32(e.flags);
    let s = &e.smi;
    w.bytes(&[s.smm, s.pending, s.smm_inside_nmi, s.latched_init]);
    w.u8(e.triple_fault.pending);
    w.bytes(&e.reserved);
    w.u8(e.exception_has_payload);
    w.u64(e.exception_payload);
}

pub(super) fn get_events(r: &mut Reader<'_>) -> Result<kvm_vcpu_events, StateError> {
    let mut e = kvm_vcpu_events::default();
    let [injected, nr, has_error_code, pending] = r.array::<4>()?;
    e.exception.injected = injected;
    e.exception.nr = nr;
    e.exception.has_error_code = has_error_code;
    e.exception.pending = pending;
    e.exception.error_code = r.u32()?;
    let [injected, nr, soft, shadow] = r.array::<4>()?;
    e.interrupt.injected = injected;
    e.interrupt.nr = nr;
    e.interrupt.soft = soft;
    e.interrupt.shadow = shadow;
    let [injected, pending, masked, pad] = r.array::<4>()?;
    e.nmi.injected = injected;
    e.nmi.pending = pending;
    e.nmi.masked = masked;
    e.nmi.pad = pad;
    e.sipi_vector = r.u32()?;
    e.flags = r.u32()?;
    let [smm, pending, smm_inside_nmi, latched_init] = r.array::<4>()?;
    e.smi.smm = smm;
    e.smi.pending = pending;
    e.smi.smm_inside_nmi = smm_inside_nmi;
    e.smi.latched_init = latched_init;
    e.triple_fault.pending = r.u8()?;
    e.reserved = r.array()?;
    e.exception_has_payload = r.u8()?;
    e.exception_payload = r.u64()?;
    Ok(e)
}

pub(super) const LAPIC_LEN: usize = 1024;

pub(super) fn put_lapic(w: &mut Writer, l: &kvm_lapic_state) {
    l.regs.iter().for_each(|&b| w.bytes(&b.to_ne_bytes()));
}

pub(super) fn get_lapic(r: &mut Reader<'_>) -> Result<kvm_lapic_state, StateError> {
    let bytes = r.take(LAPIC_LEN)?;
    let mut regs = [0; LAPIC_LEN];
    for (d, &s) in regs.iter_mut().zip(bytes) {
        *d = std::os::raw::c_char::from_ne_bytes([s]);
    }
    Ok(kvm_lapic_state { regs })
}

pub(super) const MSR_LEN: usize = 16;

pub(super) fn put_msrs(w: &mut Writer, msrs: &[kvm_msr_entry]) {
    w.count(msrs.len());
    for m in msrs {
        w.u32(m.index);
        w.u32(m.reserved);
        w.u64(m.data);
    }
}

pub(super) fn get_msrs(r: &mut Reader<'_>, max: usize) -> Result<Vec<kvm_msr_entry>, StateError> {
    let n = r.count(max, MSR_LEN)?;
    (0..n)
        .map(|_| {
            Ok(kvm_msr_entry {
                index: r.u32()?,
                reserved: r.u32()?,
                data: r.u64()?,
            })
        })
        .collect()
}

/// Re-seals bytes whose body was changed, so that tests exercise parsing
/// past the checksum.
#[cfg(test)]
pub(super) fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 8;
    let sum = fnv1a(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"TESTMAGI";

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(MAGIC);
        w.section(1, |w| w.u64(0x1122_3344_5566_7788));
        w.section(2, |w| put_msrs(w, &[kvm_msr_entry::default(); 3]));
        w.finish()
    }

    #[test]
    fn sections_roundtrip() {
        let bytes = sample();
        let s = sections(&bytes, MAGIC, "test").unwrap();
        assert_eq!(s.len(), 2);
        let mut r = s[0].reader("one");
        assert_eq!(r.u64().unwrap(), 0x1122_3344_5566_7788);
        r.done().unwrap();
        let mut r = s[1].reader("msrs");
        assert_eq!(get_msrs(&mut r, 8).unwrap().len(), 3);
        r.done().unwrap();
    }

    #[test]
    fn resealed_corruption_is_an_error_or_parses_never_panics() {
        let good = sample();
        for i in 8..good.len() - 8 {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                reseal(&mut b);
                if let Ok(s) = sections(&b, MAGIC, "test") {
                    for sec in &s {
                        let _ = get_msrs(&mut sec.reader("msrs"), 8);
                    }
                }
            }
        }
    }

    #[test]
    fn counts_are_bounded_by_max_and_by_the_bytes_left() {
        let mut w = Writer::new(MAGIC);
        w.section(1, |w| w.u32(1000));
        let bytes = w.finish();
        let s = sections(&bytes, MAGIC, "test").unwrap();
        assert!(matches!(
            get_msrs(&mut s[0].reader("msrs"), 100),
            Err(StateError::Malformed { .. })
        ));
        assert!(matches!(
            get_msrs(&mut s[0].reader("msrs"), 2000),
            Err(StateError::Truncated { .. })
        ));
    }
}
