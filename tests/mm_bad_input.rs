//! Bad arguments to every public entry point of the mm core: each returns
//! its specific error and changes nothing (`maps()`, populated bytes, backend
//! calls, MemoryFile allocation and object pages are the same before and
//! after). Table-driven.

mod common;
use common::tempfile;

use std::io::Write;
use std::sync::Arc;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::backend::BackendCall;
use guestmm::mm::{
    AddressSpace, AddressSpaceOptions, FaultError, FileError, HostFile, IoOpts, MapOpts, Mappable,
    MapsEntry, MmError, RecordingBackend, SharedMemory,
};
use guestmm::{Access, Perms, Range, RangeError};

const PS: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Size of the fixture's space.
const SIZE: u64 = 1 << 32;
/// Anonymous rw vma, first page populated: `[ANON, ANON + 1 MiB)`, with its
/// last 64 KiB protected NONE.
const ANON: u64 = 16 * MIB;
/// Private read-only host-file vma (max perms READ) right after `ANON`.
const FILE: u64 = ANON + MIB;
/// A gap of 1 MiB, then a shared-memory vma of 1 MiB.
const SHM: u64 = FILE + 2 * MIB;
const WRITE_ONLY: Perms = Perms::new(false, true, false);
const NEAR_MAX: u64 = u64::MAX - 4095;

struct Fixture {
    mf: Arc<MemoryFile>,
    be: Arc<RecordingBackend>,
    space: Arc<AddressSpace>,
    file: Arc<HostFile>,
    obj: Arc<SharedMemory>,
}

fn opts() -> AddressSpaceOptions {
    AddressSpaceOptions {
        size: SIZE,
        map_floor: MIB,
        fault_around: 64 << 10,
        fault_around_max: MIB,
        ..AddressSpaceOptions::default()
    }
}

fn fixture() -> Fixture {
    let mf = Arc::new(MemoryFile::new("bad-input", MemoryFileOptions::default()).unwrap());
    let be = Arc::new(RecordingBackend::new());
    let space = AddressSpace::new(mf.clone(), be.clone(), opts()).unwrap();
    let mut f = tempfile("file");
    f.write_all(&vec![0x5A; MIB as usize]).unwrap();
    let file = HostFile::new(f, false).unwrap();
    let obj = SharedMemory::new(mf.clone(), 2 * MIB).unwrap();
    space.map(MapOpts::anonymous(MIB).fixed(ANON)).unwrap();
    space
        .protect(ANON + MIB - (64 << 10), 64 << 10, Perms::NONE)
        .unwrap();
    space
        .map(
            MapOpts::object(file.clone() as Arc<dyn Mappable>, 0, MIB)
                .fixed(FILE)
                .perms(Perms::READ)
                .max_perms(Perms::READ),
        )
        .unwrap();
    space
        .map(
            MapOpts::object(obj.clone() as Arc<dyn Mappable>, 0, MIB)
                .fixed(SHM)
                .shared(),
        )
        .unwrap();
    space.handle_fault(ANON, Access::Write).unwrap();
    space.handle_fault(FILE, Access::Read).unwrap();
    space.write(SHM, b"shared").unwrap();
    Fixture {
        mf,
        be,
        space,
        file,
        obj,
    }
}

/// Everything a failed call must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    maps: Vec<MapsEntry>,
    populated: u64,
    calls: Vec<BackendCall>,
    allocated: u64,
    obj_committed: u64,
    obj_size: u64,
    file_refs: u64,
}

fn snapshot(f: &Fixture) -> Snapshot {
    Snapshot {
        maps: f.space.maps(),
        populated: f.space.stats().populated_bytes,
        calls: f.be.calls(),
        allocated: f.mf.allocated_bytes(),
        obj_committed: f.obj.committed(),
        obj_size: f.obj.size(),
        file_refs: f.file.refs(),
    }
}

/// The error's variant, with the inner variant for wrapped errors.
fn mm_kind(e: &MmError) -> String {
    match e {
        MmError::Range(r) => format!("Range::{}", range_kind(r)),
        MmError::OutOfSpace { .. } => "OutOfSpace".into(),
        MmError::Overlap { .. } => "Overlap".into(),
        MmError::NoSpace { .. } => "NoSpace".into(),
        MmError::BadAlignment { .. } => "BadAlignment".into(),
        MmError::NotMapped { .. } => "NotMapped".into(),
        MmError::PermsExceedMax { .. } => "PermsExceedMax".into(),
        MmError::WriteWithoutRead { .. } => "WriteWithoutRead".into(),
        MmError::BadObjectRange { .. } => "BadObjectRange".into(),
        MmError::Permission { .. } => "Permission".into(),
        MmError::ForeignPin { .. } => "ForeignPin".into(),
        MmError::Fault(f) => format!("Fault::{}", fault_kind(f)),
        MmError::Backend(_) => "Backend".into(),
        MmError::Memory(_) => "Memory".into(),
        MmError::File(f) => format!("File::{}", file_kind(f)),
    }
}

fn range_kind(e: &RangeError) -> &'static str {
    match e {
        RangeError::Overflow { .. } => "Overflow",
        RangeError::Inverted { .. } => "Inverted",
        RangeError::Unaligned { .. } => "Unaligned",
        RangeError::Empty { .. } => "Empty",
    }
}

fn fault_kind(e: &FaultError) -> &'static str {
    match e {
        FaultError::Unmapped { .. } => "Unmapped",
        FaultError::Permission { .. } => "Permission",
        FaultError::Bus { .. } => "Bus",
        FaultError::OutOfMemory { .. } => "OutOfMemory",
        FaultError::Backend { .. } => "Backend",
    }
}

fn file_kind(e: &FileError) -> &'static str {
    match e {
        FileError::Memory(_) => "Memory",
        FileError::BeyondEnd { .. } => "BeyondEnd",
        FileError::BadSize { .. } => "BadSize",
        FileError::BadTranslation { .. } => "BadTranslation",
        FileError::Range(_) => "Range",
        FileError::Access { .. } => "Access",
        FileError::Host { .. } => "Host",
    }
}

type Call = fn(&Fixture) -> Result<(), String>;

fn mm<T>(r: Result<T, MmError>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| mm_kind(&e))
}

fn fault<T>(r: Result<T, FaultError>) -> Result<(), String> {
    r.map(|_| ())
        .map_err(|e| format!("Fault::{}", fault_kind(&e)))
}

fn file<T>(r: Result<T, FileError>) -> Result<(), String> {
    r.map(|_| ())
        .map_err(|e| format!("File::{}", file_kind(&e)))
}

fn anon(len: u64) -> MapOpts {
    MapOpts::anonymous(len)
}

fn file_opts(f: &Fixture, offset: u64, len: u64) -> MapOpts {
    MapOpts::object(f.file.clone() as Arc<dyn Mappable>, offset, len)
}

fn read(f: &Fixture, gpa: u64, len: usize, opts: IoOpts) -> Result<(), String> {
    let mut buf = vec![0u8; len];
    mm(f.space.read_with(gpa, &mut buf, opts))
}

fn write(f: &Fixture, gpa: u64, len: usize, opts: IoOpts) -> Result<(), String> {
    mm(f.space.write_with(gpa, &vec![7u8; len], opts))
}

fn pin(f: &Fixture, gpa: u64, len: u64, access: Access) -> Result<(), String> {
    let p = f
        .space
        .pin(gpa, len, access, IoOpts::default())
        .map_err(|e| mm_kind(&e))?;
    f.space.unpin(p).unwrap();
    Ok(())
}

/// `(scenario, call, the error it must return)`.
const CASES: &[(&str, Call, &str)] = &[
    // ---- map
    ("map_zero_len", |f| mm(f.space.map(anon(0))), "Range::Empty"),
    (
        "map_unaligned_len",
        |f| mm(f.space.map(anon(PS + 1))),
        "Range::Unaligned",
    ),
    (
        "map_align_zero",
        |f| mm(f.space.map(anon(PS).align(0))),
        "BadAlignment",
    ),
    (
        "map_align_three",
        |f| mm(f.space.map(anon(PS).align(3))),
        "BadAlignment",
    ),
    (
        "map_align_not_power_of_two",
        |f| mm(f.space.map(anon(PS).align(3 * PS))),
        "BadAlignment",
    ),
    (
        "map_align_below_page",
        |f| mm(f.space.map(anon(PS).align(2048))),
        "BadAlignment",
    ),
    (
        "map_fixed_unaligned_gpa",
        |f| mm(f.space.map(anon(PS).fixed(SHM + 4 * MIB + 1))),
        "BadAlignment",
    ),
    (
        "map_fixed_misaligned_to_align",
        |f| {
            mm(f.space
                .map(anon(PS).align(2 * MIB).fixed(SHM + 4 * MIB + PS)))
        },
        "BadAlignment",
    ),
    (
        "map_fixed_overflowing",
        |f| mm(f.space.map(anon(PS).fixed(NEAR_MAX))),
        "Range::Overflow",
    ),
    (
        "map_fixed_replace_overflowing",
        |f| mm(f.space.map(anon(2 * PS).fixed_replace(NEAR_MAX))),
        "Range::Overflow",
    ),
    (
        "map_fixed_beyond_space",
        |f| mm(f.space.map(anon(PS).fixed(SIZE))),
        "OutOfSpace",
    ),
    (
        "map_fixed_straddling_space_end",
        |f| mm(f.space.map(anon(2 * PS).fixed(SIZE - PS))),
        "OutOfSpace",
    ),
    (
        "map_fixed_replace_beyond_space",
        |f| mm(f.space.map(anon(PS).fixed_replace(NEAR_MAX - PS))),
        "OutOfSpace",
    ),
    (
        "map_fixed_over_existing_vma",
        |f| mm(f.space.map(anon(PS).fixed(ANON + PS))),
        "Overlap",
    ),
    (
        "map_fixed_over_vma_end",
        |f| mm(f.space.map(anon(2 * MIB).fixed(FILE + MIB - PS))),
        "Overlap",
    ),
    (
        "map_write_without_read",
        |f| mm(f.space.map(anon(PS).perms(WRITE_ONLY))),
        "WriteWithoutRead",
    ),
    (
        "map_perms_beyond_max",
        |f| {
            mm(f.space
                .map(anon(PS).perms(Perms::ALL).max_perms(Perms::READ)))
        },
        "PermsExceedMax",
    ),
    (
        "map_huge_len_anywhere",
        |f| mm(f.space.map(anon(SIZE))),
        "NoSpace",
    ),
    (
        "map_near_max_len",
        |f| mm(f.space.map(anon(NEAR_MAX))),
        "NoSpace",
    ),
    (
        "map_shared_anon_huge",
        |f| mm(f.space.map(anon(SIZE).shared())),
        "NoSpace",
    ),
    (
        "map_hint_beyond_space",
        |f| mm(f.space.map(anon(PS).hint(SIZE + PS))),
        "NoSpace",
    ),
    (
        "map_hint_overflowing",
        |f| mm(f.space.map(anon(PS).hint(u64::MAX))),
        "NoSpace",
    ),
    (
        "map_object_unaligned_offset",
        |f| mm(f.space.map(file_opts(f, 1, PS))),
        "BadObjectRange",
    ),
    (
        "map_object_beyond_end",
        |f| mm(f.space.map(file_opts(f, MIB - PS, 2 * PS))),
        "BadObjectRange",
    ),
    (
        "map_object_offset_overflowing",
        |f| mm(f.space.map(file_opts(f, NEAR_MAX, 2 * PS))),
        "BadObjectRange",
    ),
    (
        "map_shared_readonly_file_writable",
        |f| mm(f.space.map(file_opts(f, 0, PS).shared())),
        "PermsExceedMax",
    ),
    (
        "map_fixed_replace_perms_beyond_max",
        |f| {
            mm(f.space.map(
                anon(PS)
                    .fixed_replace(ANON)
                    .perms(Perms::ALL)
                    .max_perms(Perms::READ),
            ))
        },
        "PermsExceedMax",
    ),
    (
        "map_fixed_replace_bad_object_range",
        |f| mm(f.space.map(file_opts(f, MIB, PS).fixed_replace(ANON))),
        "BadObjectRange",
    ),
    // ---- unmap
    (
        "unmap_zero_len",
        |f| mm(f.space.unmap(ANON, 0)),
        "Range::Empty",
    ),
    (
        "unmap_unaligned_gpa",
        |f| mm(f.space.unmap(ANON + 1, PS)),
        "Range::Unaligned",
    ),
    (
        "unmap_unaligned_len",
        |f| mm(f.space.unmap(ANON, 1)),
        "Range::Unaligned",
    ),
    (
        "unmap_overflowing",
        |f| mm(f.space.unmap(NEAR_MAX, 2 * PS)),
        "Range::Overflow",
    ),
    (
        "unmap_beyond_space",
        |f| mm(f.space.unmap(SIZE, PS)),
        "OutOfSpace",
    ),
    (
        "unmap_straddling_space_end",
        |f| mm(f.space.unmap(SIZE - PS, 2 * PS)),
        "OutOfSpace",
    ),
    // ---- protect
    (
        "protect_zero_len",
        |f| mm(f.space.protect(ANON, 0, Perms::READ)),
        "Range::Empty",
    ),
    (
        "protect_unaligned",
        |f| mm(f.space.protect(ANON + 5, PS, Perms::READ)),
        "Range::Unaligned",
    ),
    (
        "protect_overflowing",
        |f| mm(f.space.protect(NEAR_MAX, 2 * PS, Perms::READ)),
        "Range::Overflow",
    ),
    (
        "protect_beyond_space",
        |f| mm(f.space.protect(SIZE - PS, 2 * PS, Perms::READ)),
        "OutOfSpace",
    ),
    (
        "protect_partly_unmapped",
        |f| mm(f.space.protect(FILE + MIB - PS, 2 * PS, Perms::READ)),
        "NotMapped",
    ),
    (
        "protect_unmapped",
        |f| mm(f.space.protect(MIB, PS, Perms::READ)),
        "NotMapped",
    ),
    (
        "protect_write_without_read",
        |f| mm(f.space.protect(ANON, PS, WRITE_ONLY)),
        "WriteWithoutRead",
    ),
    (
        "protect_beyond_max",
        |f| mm(f.space.protect(FILE, PS, Perms::READ_WRITE)),
        "PermsExceedMax",
    ),
    (
        "protect_two_vmas_second_beyond_max",
        |f| mm(f.space.protect(ANON, 2 * MIB, Perms::READ_WRITE)),
        "PermsExceedMax",
    ),
    // ---- decommit
    (
        "decommit_zero_len",
        |f| mm(f.space.decommit(ANON, 0)),
        "Range::Empty",
    ),
    (
        "decommit_unaligned",
        |f| mm(f.space.decommit(ANON, PS + 1)),
        "Range::Unaligned",
    ),
    (
        "decommit_overflowing",
        |f| mm(f.space.decommit(NEAR_MAX, 2 * PS)),
        "Range::Overflow",
    ),
    (
        "decommit_beyond_space",
        |f| mm(f.space.decommit(SIZE, PS)),
        "OutOfSpace",
    ),
    (
        "decommit_partly_unmapped",
        |f| mm(f.space.decommit(ANON, 3 * MIB)),
        "NotMapped",
    ),
    // ---- handle_fault
    (
        "fault_beyond_space",
        |f| fault(f.space.handle_fault(SIZE + 5, Access::Read)),
        "Fault::Unmapped",
    ),
    (
        "fault_at_u64_max",
        |f| fault(f.space.handle_fault(u64::MAX, Access::Write)),
        "Fault::Unmapped",
    ),
    (
        "fault_in_gap",
        |f| fault(f.space.handle_fault(SHM - 1, Access::Read)),
        "Fault::Unmapped",
    ),
    (
        "fault_write_read_only",
        |f| fault(f.space.handle_fault(FILE + PS, Access::Write)),
        "Fault::Permission",
    ),
    (
        "fault_read_none",
        |f| fault(f.space.handle_fault(ANON + MIB - 1, Access::Read)),
        "Fault::Permission",
    ),
    (
        "fault_execute_without_execute",
        |f| fault(f.space.handle_fault(ANON + 8 * PS, Access::Execute)),
        "Fault::Permission",
    ),
    // ---- read / write / zero
    (
        "read_overflowing",
        |f| read(f, u64::MAX - 10, 100, IoOpts::default()),
        "Range::Overflow",
    ),
    (
        "read_last_byte_of_u64",
        |f| read(f, u64::MAX - 1, 1, IoOpts::default()),
        "OutOfSpace",
    ),
    (
        "read_beyond_space",
        |f| read(f, SIZE - 10, 100, IoOpts::default()),
        "OutOfSpace",
    ),
    (
        "read_partly_unmapped",
        |f| read(f, FILE + MIB - 10, 100, IoOpts::default()),
        "NotMapped",
    ),
    (
        "read_forced_partly_unmapped",
        |f| read(f, FILE + MIB - 10, 100, IoOpts::FORCE),
        "NotMapped",
    ),
    (
        "read_into_none_protection",
        |f| read(f, ANON + MIB - (64 << 10) - 10, 100, IoOpts::default()),
        "Permission",
    ),
    (
        "write_overflowing",
        |f| write(f, u64::MAX - 10, 100, IoOpts::default()),
        "Range::Overflow",
    ),
    (
        "write_beyond_space",
        |f| write(f, SIZE, 1, IoOpts::default()),
        "OutOfSpace",
    ),
    (
        "write_partly_unmapped",
        |f| write(f, SHM - 10, 100, IoOpts::default()),
        "NotMapped",
    ),
    (
        "write_read_only",
        |f| write(f, FILE + 10, 100, IoOpts::default()),
        "Permission",
    ),
    (
        "write_anon_then_read_only",
        |f| write(f, FILE - 10, 100, IoOpts::default()),
        "Permission",
    ),
    (
        "write_plain_read_only",
        |f| mm(f.space.write(FILE, b"x")),
        "Permission",
    ),
    (
        "read_plain_none",
        |f| mm(f.space.read(ANON + MIB - 1, &mut [0u8; 1])),
        "Permission",
    ),
    (
        "zero_overflowing",
        |f| mm(f.space.zero(u64::MAX - 10, 100, IoOpts::default())),
        "Range::Overflow",
    ),
    (
        "zero_partly_unmapped",
        |f| mm(f.space.zero(ANON + PS, 3 * MIB, IoOpts::FORCE)),
        "NotMapped",
    ),
    (
        "zero_into_read_only",
        |f| mm(f.space.zero(ANON, 2 * MIB, IoOpts::default())),
        "Permission",
    ),
    (
        "zero_beyond_space",
        |f| mm(f.space.zero(SHM, SIZE, IoOpts::FORCE)),
        "OutOfSpace",
    ),
    // ---- pin
    (
        "pin_zero_len",
        |f| pin(f, ANON, 0, Access::Read),
        "Range::Empty",
    ),
    (
        "pin_zero_len_unaligned",
        |f| pin(f, ANON + 5, 0, Access::Read),
        "Range::Empty",
    ),
    (
        "pin_overflowing",
        |f| pin(f, u64::MAX - 10, 100, Access::Read),
        "Range::Overflow",
    ),
    (
        "pin_beyond_space",
        |f| pin(f, SIZE - PS, 2 * PS, Access::Read),
        "OutOfSpace",
    ),
    (
        "pin_partly_unmapped",
        |f| pin(f, FILE + MIB - PS, 2 * PS, Access::Read),
        "NotMapped",
    ),
    (
        "pin_write_read_only",
        |f| pin(f, FILE, PS, Access::Write),
        "Permission",
    ),
    // ---- SharedMemory and HostFile
    (
        "shm_new_zero",
        |f| file(SharedMemory::new(f.mf.clone(), 0)),
        "File::BadSize",
    ),
    (
        "shm_new_unaligned",
        |f| file(SharedMemory::new(f.mf.clone(), PS + 1)),
        "File::BadSize",
    ),
    (
        "shm_new_overflowing",
        |f| file(SharedMemory::new(f.mf.clone(), u64::MAX)),
        "File::BadSize",
    ),
    (
        "shm_decommit_unaligned",
        |f| file(f.obj.decommit(Range::new(1, PS).unwrap())),
        "File::Range",
    ),
    (
        "shm_decommit_beyond_size",
        |f| file(f.obj.decommit(Range::new(0, 4 * MIB).unwrap())),
        "File::BeyondEnd",
    ),
    (
        "shm_truncate_unaligned",
        |f| file(f.obj.truncate(MIB + 1)),
        "File::BadSize",
    ),
    (
        "host_file_empty",
        |_| file(HostFile::new(tempfile("empty"), false)),
        "File::BadSize",
    ),
    (
        "host_file_unaligned_size",
        |_| {
            let mut t = tempfile("odd");
            t.write_all(&[1; PS as usize + 1]).unwrap();
            file(HostFile::new(t, false))
        },
        "File::BadSize",
    ),
];

#[test]
fn bad_input_returns_its_error_and_changes_nothing() {
    let mut failures = Vec::new();
    for (name, call, want) in CASES {
        let f = fixture();
        let before = snapshot(&f);
        let got = call(&f);
        let after = snapshot(&f);
        match &got {
            Err(kind) if kind == want => {}
            _ => failures.push(format!("{name}: got {got:?}, want Err({want})")),
        }
        if before != after {
            failures.push(format!(
                "{name}: state changed:\n  before {before:?}\n  after  {after:?}"
            ));
        }
        if let Err(e) = f.space.check_invariants() {
            failures.push(format!("{name}: invariants: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bad_options_are_refused() {
    let mf = Arc::new(MemoryFile::new("bad-options", MemoryFileOptions::default()).unwrap());
    let with = |edit: fn(&mut AddressSpaceOptions)| {
        let mut o = opts();
        edit(&mut o);
        o
    };
    let cases: &[(&str, AddressSpaceOptions, &str)] = &[
        (
            "fault_around_zero",
            with(|o| o.fault_around = 0),
            "BadAlignment",
        ),
        (
            "fault_around_three",
            with(|o| o.fault_around = 3),
            "BadAlignment",
        ),
        (
            "fault_around_not_power_of_two",
            with(|o| o.fault_around = 3 * PS),
            "BadAlignment",
        ),
        (
            "fault_around_below_page",
            with(|o| o.fault_around = 2048),
            "BadAlignment",
        ),
        (
            "fault_around_max_below_initial",
            with(|o| o.fault_around_max = 32 << 10),
            "BadAlignment",
        ),
        (
            "fault_around_max_zero",
            with(|o| o.fault_around_max = 0),
            "BadAlignment",
        ),
        (
            "size_zero",
            with(|o| {
                o.size = 0;
                o.map_floor = 0
            }),
            "OutOfSpace",
        ),
        ("size_unaligned", with(|o| o.size = SIZE + 1), "OutOfSpace"),
        (
            "floor_at_size",
            with(|o| o.map_floor = o.size),
            "OutOfSpace",
        ),
    ];
    let mut failures = Vec::new();
    for (name, o, want) in cases {
        let got = AddressSpace::new(mf.clone(), Arc::new(RecordingBackend::new()), o.clone());
        let got = got.map(|_| ()).map_err(|e| mm_kind(&e));
        if got.as_ref().err().map(String::as_str) != Some(*want) {
            failures.push(format!("{name}: got {got:?}, want Err({want})"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn unpin_of_a_foreign_pin_is_refused() {
    let f = fixture();
    let other = fixture();
    let pin = other
        .space
        .pin(ANON, PS, Access::Read, IoOpts::default())
        .unwrap();
    let before = snapshot(&f);
    let got = f.space.unpin(pin).map_err(|e| mm_kind(&e));
    assert_eq!(got, Err("ForeignPin".to_string()), "got {got:?}");
    assert_eq!(snapshot(&f), before);
}
