//! Walker tests over page tables built in a test address space
//! (RecordingBackend: no KVM needed), read through `read_with(FORCE)` as the
//! emulation path does.

use std::io::Write;
use std::sync::Arc;

use super::*;
use crate::memfile::{MemoryFile, MemoryFileOptions};
use crate::mm::{
    AddressSpace, AddressSpaceOptions, HostFile, IoOpts, MapOpts, MmError, RecordingBackend,
};
use crate::perms::Perms;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where the test tables live.
const TABLES: u64 = GIB;
const RWU: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER;

fn space() -> Arc<AddressSpace> {
    let mf = Arc::new(MemoryFile::new("walk-test", MemoryFileOptions::default()).unwrap());
    let space = AddressSpace::new(
        mf,
        Arc::new(RecordingBackend::new()),
        AddressSpaceOptions::default(),
    )
    .unwrap();
    space
        .map(
            MapOpts::anonymous(16 * MIB)
                .fixed(TABLES)
                .perms(Perms::READ_WRITE),
        )
        .unwrap();
    space
}

/// Reads an entry as the emulation path does.
fn reader(space: &AddressSpace) -> impl FnMut(u64) -> Result<u64, MmError> + '_ {
    |gpa| {
        let mut b = [0u8; 8];
        space.read_with(gpa, &mut b, IoOpts::FORCE)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Page tables built in host memory, then written to a space or a file.
/// Table `i` lives at `base + i * 4 KiB`; table 0 is the root.
struct Builder {
    base: u64,
    la57: bool,
    tables: Vec<[u64; 512]>,
}

impl Builder {
    fn new(base: u64, la57: bool) -> Builder {
        Builder {
            base,
            la57,
            tables: vec![[0; 512]],
        }
    }

    fn cr3(&self) -> u64 {
        self.base
    }

    fn mode(&self) -> PagingMode {
        if self.la57 {
            PagingMode::five_level(self.cr3())
        } else {
            PagingMode::four_level(self.cr3())
        }
    }

    /// Maps `gva` to `gpa` with a page of `size` and leaf `flags`;
    /// intermediate entries are present, writable and user.
    fn map(&mut self, gva: u64, gpa: u64, size: u64, flags: u64) {
        let leaf_level = match size {
            PAGE_4K => 1,
            PAGE_2M => 2,
            PAGE_1G => 3,
            _ => panic!("bad page size {size:#x}"),
        };
        let mut t = 0usize;
        let mut level = if self.la57 { 5 } else { 4 };
        loop {
            let idx = ((gva >> (12 + 9 * (level - 1))) & 0x1ff) as usize;
            if level == leaf_level {
                let ps = if level > 1 { PTE_PS } else { 0 };
                self.tables[t][idx] = gpa | flags | ps;
                return;
            }
            let e = self.tables[t][idx];
            t = if e & PTE_PRESENT != 0 {
                ((e & PTE_ADDR_MASK) - self.base) as usize / 4096
            } else {
                self.tables.push([0; 512]);
                let n = self.tables.len() - 1;
                self.tables[t][idx] = (self.base + n as u64 * 4096) | RWU;
                n
            };
            level -= 1;
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.tables
            .iter()
            .flat_map(|t| t.iter().flat_map(|e| e.to_le_bytes()))
            .collect()
    }

    fn write_to(&self, space: &AddressSpace) {
        space
            .write_with(self.base, &self.bytes(), IoOpts::FORCE)
            .unwrap();
    }
}

fn walk_in(space: &AddressSpace, b: &Builder, gva: u64, access: Access) -> Translation {
    walk(reader(space), &b.mode(), gva, access)
        .unwrap_or_else(|e| panic!("walk of {gva:#x}: got {e}, want a translation"))
}

#[test]
fn every_page_size_translates_with_its_offset() {
    let space = space();
    let mut b = Builder::new(TABLES, false);
    let cases: &[(u64, u64, u64)] = &[
        // gva, gpa, page size
        (0x7f00_0000_3000, 0x5000_7000, PAGE_4K),
        (0x7f00_0040_0000, 0x6000_0000, PAGE_2M),
        (0x0040_0000_0000, 0x80_0000_0000, PAGE_1G),
    ];
    for &(gva, gpa, size) in cases {
        b.map(gva, gpa, size, RWU);
    }
    b.write_to(&space);
    for &(gva, gpa, size) in cases {
        for off in [0, 8, size / 2 + 5, size - 1] {
            let t = walk_in(&space, &b, gva + off, Access::Write);
            assert_eq!(
                (t.gpa, t.page_size),
                (gpa + off, size),
                "gva {:#x}: got {:#x}/{:#x}, want {:#x}/{size:#x}",
                gva + off,
                t.gpa,
                t.page_size,
                gpa + off
            );
            assert!(t.writable && t.user && t.executable);
        }
    }
}

#[test]
fn not_present_is_reported_at_each_level() {
    let space = space();
    let g = 0x10_0000_0000u64; // PML4 0, PDPT 64, PD 0, PT 0
    for la57 in [false, true] {
        let mut b = Builder::new(TABLES, la57);
        b.map(g, 0x5000_0000, PAGE_4K, RWU);
        b.write_to(&space);
        let mut cases = vec![
            (g + PAGE_4K, 1u8),
            (g + PAGE_2M, 2),
            (g + PAGE_1G, 3),
            (g + (512 * GIB), 4),
        ];
        if la57 {
            cases.push((g + (1 << 48), 5));
        }
        for (gva, level) in cases {
            match walk(reader(&space), &b.mode(), gva, Access::Read) {
                Err(WalkError::NotPresent {
                    gva: got,
                    level: l,
                    entry,
                }) => {
                    assert_eq!((got, l), (gva, level), "la57 {la57}: gva {gva:#x}");
                    assert!(
                        (TABLES..TABLES + 16 * MIB).contains(&entry),
                        "entry {entry:#x} is not in the tables"
                    );
                }
                other => panic!(
                    "la57 {la57}: gva {gva:#x}: got {other:?}, want NotPresent at level {level}"
                ),
            }
        }
        walk_in(&space, &b, g, Access::Read);
    }
}

#[test]
fn five_level_uses_bits_56_to_48() {
    let space = space();
    let mut b = Builder::new(TABLES, true);
    let gva = 0x00ab_cdef_1234_5000u64; // not canonical with 4 levels
    b.map(gva, 0x4321_0000, PAGE_4K, RWU);
    b.write_to(&space);
    let t = walk_in(&space, &b, gva + 0x10, Access::Read);
    assert_eq!(t.gpa, 0x4321_0010);
    let four = PagingMode::four_level(TABLES);
    assert!(matches!(
        walk(reader(&space), &four, gva, Access::Read),
        Err(WalkError::NonCanonical { gva: g }) if g == gva
    ));
}

#[test]
fn non_canonical_addresses_are_refused_before_any_read() {
    for (mode, gva) in [
        (PagingMode::four_level(0), 0x0000_8000_0000_0000u64),
        (PagingMode::four_level(0), 0xffff_0000_0000_0000),
        (PagingMode::five_level(0), 0x0100_0000_0000_0000),
    ] {
        let r = walk(
            |_| -> Result<u64, MmError> { panic!("no read expected") },
            &mode,
            gva,
            Access::Read,
        );
        assert!(
            matches!(r, Err(WalkError::NonCanonical { .. })),
            "gva {gva:#x}: got {r:?}, want NonCanonical"
        );
    }
    assert!(PagingMode::four_level(0).is_canonical(0xffff_8000_0000_0000));
    assert!(PagingMode::five_level(0).is_canonical(0xff00_0000_0000_0000));
}

#[test]
fn permissions_accumulate_across_levels() {
    let space = space();
    let mut b = Builder::new(TABLES, false);
    let ro = 0x7f00_0000_0000u64;
    let kernel = 0x7f00_0000_1000u64;
    let nx = 0x7f00_0000_2000u64;
    b.map(ro, 0x1000_0000, PAGE_4K, PTE_PRESENT | PTE_USER);
    b.map(kernel, 0x1000_1000, PAGE_4K, PTE_PRESENT | PTE_WRITE);
    b.map(nx, 0x1000_2000, PAGE_4K, RWU | PTE_XD);
    b.write_to(&space);
    let user = b.mode();
    let sup_no_wp = PagingMode {
        user: false,
        write_protect: false,
        ..user
    };
    let no_nx = PagingMode { nx: false, ..user };
    let cases: &[(&PagingMode, u64, Access, bool)] = &[
        (&user, ro, Access::Read, true),
        (&user, ro, Access::Write, false),
        (&sup_no_wp, ro, Access::Write, true),
        (&user, kernel, Access::Read, false),
        (&sup_no_wp, kernel, Access::Write, true),
        (&user, nx, Access::Execute, false),
        (&user, nx, Access::Write, true),
        (&no_nx, nx, Access::Execute, true),
    ];
    for &(mode, gva, access, ok) in cases {
        let r = walk(reader(&space), mode, gva, access);
        match (&r, ok) {
            (Ok(_), true) | (Err(WalkError::Protection { .. }), false) => {}
            _ => panic!("{access} at {gva:#x} with {mode:?}: got {r:?}, want ok={ok}"),
        }
    }
}

#[test]
fn a_walk_through_lazy_table_pages_populates_them() {
    // The tables are a private mapping of a file: nothing is populated until
    // the walk reads them, and then only the pages it reads.
    let space = space();
    let file_gpa = 2 * GIB;
    let mut b = Builder::new(file_gpa, false);
    let gva = 0x7f00_0020_3000u64;
    b.map(gva, 0x5555_5000, PAGE_4K, RWU);
    b.map(0x10_0000_0000, 0x6000_0000, PAGE_2M, RWU); // tables the walk skips
    let mut f = tempfile();
    f.write_all(&b.bytes()).unwrap();
    let len = b.tables.len() as u64 * 4096;
    let hf = HostFile::new(f, false).unwrap();
    space
        .map(
            MapOpts::object(hf, 0, len)
                .fixed(file_gpa)
                .perms(Perms::READ),
        )
        .unwrap();
    let before = space.stats().populated_bytes;
    let t = walk_in(&space, &b, gva + 0x123, Access::Write);
    assert_eq!(t.gpa, 0x5555_5123);
    let got = space.stats().populated_bytes - before;
    assert_eq!(
        got,
        4 * 4096,
        "got {got} bytes populated, want the 4 tables on the walk's path"
    );
    space.check_invariants().unwrap();

    // An anonymous lazy root reads as zeros: not present, but populated.
    let before = space.stats().populated_bytes;
    let fresh = PagingMode::four_level(TABLES + 8 * MIB);
    assert!(matches!(
        walk(reader(&space), &fresh, gva, Access::Read),
        Err(WalkError::NotPresent { level: 4, .. })
    ));
    assert_eq!(space.stats().populated_bytes - before, 4096);
}

#[test]
fn an_entry_outside_every_vma_is_a_read_error() {
    let space = space();
    let mode = PagingMode::four_level(0x9000_0000);
    match walk(reader(&space), &mode, 0x1000, Access::Read) {
        Err(WalkError::Read {
            level: 4,
            entry: 0x9000_0000,
            source: MmError::NotMapped { .. },
            ..
        }) => {}
        other => panic!("got {other:?}, want a read error at the root"),
    }
}

#[test]
fn paging_mode_comes_from_sregs() {
    let mut s = kvm_sregs::default();
    assert_eq!(PagingMode::from_sregs(&s), None, "real mode");
    s.cr0 = CR0_PG | CR0_WP | 1;
    s.efer = EFER_LMA | EFER_NXE;
    s.cr4 = CR4_LA57;
    s.cr3 = 0x30_0000;
    s.cs.dpl = 3;
    assert_eq!(
        PagingMode::from_sregs(&s),
        Some(PagingMode::five_level(0x30_0000))
    );
}

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "guestmm-walk-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}
