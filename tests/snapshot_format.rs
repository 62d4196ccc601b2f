//! The snapshot file format: a saved snapshot opens to what was saved, and
//! every kind of damage is refused with its own typed error (bad magic,
//! wrong version, truncation, checksum mismatch, impossible layout); the
//! working-set record likewise.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use common::setup;
use guestmm::mm::{IoOpts, MapOpts};
use guestmm::snapshot::{
    save, working_set_path, write_raw, RawSnapshot, SaveRequest, Snapshot, SnapshotError,
    SnapshotKind, SnapshotMeta, VmaRecord, WorkingSet, DATA_OFFSET, FORMAT_VERSION, HEADER_SIZE,
    MAX_METADATA,
};
use guestmm::{Access, GuestRange, Perms, Range, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const RAM: u64 = 1 << 30;

/// A file path in the temp dir, removed (with `.tmp` and `.wset`) on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> TempPath {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TempPath(std::env::temp_dir().join(format!(
            "guestmm-snapfmt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        for suffix in ["", ".tmp", ".wset", ".wset.tmp"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

fn r(start: u64, end: u64) -> GuestRange {
    Range::new(start, end).unwrap()
}

/// A small valid snapshot: 4 MiB of RAM with two written pages.
fn saved(tag: &str) -> TempPath {
    let (_mf, _be, space) = setup(tag);
    space
        .map(MapOpts::anonymous(4 * MIB).fixed(RAM).name("ram"))
        .unwrap();
    space.write_with(RAM, &[0x11; 4096], IoOpts::FORCE).unwrap();
    space
        .write_with(RAM + 3 * MIB, &[0x22; 4096], IoOpts::FORCE)
        .unwrap();
    let path = TempPath::new(tag);
    save(
        &path.0,
        SaveRequest {
            space: &space,
            devices: vec![],
            vcpus: vec![vec![1, 2, 3]],
            vm_state: vec![4, 5],
            diff: None,
        },
    )
    .unwrap();
    path
}

fn open_err(path: &TempPath) -> SnapshotError {
    Snapshot::open(&path.0).expect_err("a damaged snapshot opened")
}

fn flip(path: &TempPath, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path.0)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
}

fn file_len(path: &TempPath) -> u64 {
    std::fs::metadata(&path.0).unwrap().len()
}

/// The metadata's offset and length, from the header.
fn meta_section(path: &TempPath) -> (u64, u64) {
    let f = std::fs::File::open(&path.0).unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, 48).unwrap();
    (
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..].try_into().unwrap()),
    )
}

fn cut(path: &TempPath, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path.0)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_saved_snapshot_opens_with_its_data() {
    let path = saved("snapfmt-ok");
    let snap = Snapshot::open(&path.0).unwrap();
    assert_eq!(snap.path(), path.0.as_path());
    assert_eq!(snap.data_offset(), DATA_OFFSET);
    assert_eq!(snap.data_offset() % (2 * MIB), 0);
    assert_eq!(snap.meta().kind, SnapshotKind::Full);
    assert_eq!(snap.meta().vcpus, vec![vec![1, 2, 3]]);
    assert_eq!(snap.meta().vm_state, vec![4, 5]);
    assert_eq!(
        snap.meta().data,
        vec![
            r(RAM, RAM + PAGE_SIZE),
            r(RAM + 3 * MIB, RAM + 3 * MIB + PAGE_SIZE)
        ]
    );
    let mut b = [0u8; 2];
    snap.file()
        .read_exact_at(&mut b, DATA_OFFSET + RAM + 3 * MIB)
        .unwrap();
    assert_eq!(b, [0x22, 0x22]);
    // No temporary file is left behind.
    let mut tmp = path.0.clone().into_os_string();
    tmp.push(".tmp");
    assert!(!std::path::Path::new(&tmp).exists());
}

#[test]
fn bad_magic_is_refused() {
    let path = saved("snapfmt-magic");
    flip(&path, 0);
    assert!(
        matches!(open_err(&path), SnapshotError::BadMagic),
        "got {:?}",
        open_err(&path)
    );
}

#[test]
fn wrong_version_is_refused() {
    let path = saved("snapfmt-version");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path.0)
        .unwrap();
    f.write_all_at(&2u32.to_le_bytes(), 8).unwrap();
    match open_err(&path) {
        SnapshotError::Version { found, supported } => {
            assert_eq!((found, supported), (2, FORMAT_VERSION))
        }
        e => panic!("got {e:?}, want Version"),
    }
    // A file written whole by another version (valid checksums) too.
    let snap = Snapshot::open(&saved("snapfmt-version2").0).unwrap();
    let raw = TempPath::new("raw-version");
    write_raw(
        &raw.0,
        &RawSnapshot {
            version: 7,
            meta: snap.meta().clone(),
            data_len: snap.data_len(),
            pages: vec![],
        },
    )
    .unwrap();
    assert!(matches!(
        open_err(&raw),
        SnapshotError::Version { found: 7, .. }
    ));
}

#[test]
fn truncated_in_the_data_is_refused() {
    let path = saved("snapfmt-cutdata");
    let (offset, len) = meta_section(&path);
    let len = offset + len;
    cut(&path, DATA_OFFSET + RAM + MIB);
    match open_err(&path) {
        SnapshotError::Truncated { expected, found } => {
            assert_eq!((expected, found), (len, DATA_OFFSET + RAM + MIB))
        }
        e => panic!("got {e:?}, want Truncated"),
    }
}

#[test]
fn truncated_in_the_metadata_is_refused() {
    let path = saved("snapfmt-cutmeta");
    let (offset, len) = meta_section(&path);
    let end = offset + len;
    assert_eq!(
        file_len(&path),
        end.next_multiple_of(PAGE_SIZE),
        "padded to a page"
    );
    cut(&path, end - 10);
    assert!(
        matches!(open_err(&path), SnapshotError::Truncated { expected, found } if expected == end && found == end - 10)
    );
}

#[test]
fn empty_and_header_only_files_are_refused() {
    let path = saved("snapfmt-empty");
    cut(&path, 0);
    assert!(matches!(
        open_err(&path),
        SnapshotError::Truncated {
            expected: HEADER_SIZE,
            found: 0
        }
    ));
    let path = saved("snapfmt-halfheader");
    cut(&path, 100);
    assert!(matches!(
        open_err(&path),
        SnapshotError::Truncated { found: 100, .. }
    ));
    let path = saved("snapfmt-headeronly");
    cut(&path, HEADER_SIZE);
    assert!(matches!(
        open_err(&path),
        SnapshotError::Truncated {
            found: HEADER_SIZE,
            ..
        }
    ));
}

#[test]
fn metadata_checksum_mismatch_is_refused() {
    let path = saved("snapfmt-metacrc");
    let (offset, len) = meta_section(&path);
    flip(&path, offset + len - 3);
    assert!(matches!(
        open_err(&path),
        SnapshotError::Checksum {
            section: "metadata"
        }
    ));
}

#[test]
fn header_checksum_mismatch_is_refused() {
    let path = saved("snapfmt-headcrc");
    flip(&path, 17); // inside the snapshot id
    assert!(matches!(
        open_err(&path),
        SnapshotError::Checksum { section: "header" }
    ));
}

/// A raw snapshot whose metadata is `meta` with `f` applied, checksums right.
fn raw_with(tag: &str, f: impl FnOnce(&mut SnapshotMeta)) -> (TempPath, SnapshotError) {
    let snap = Snapshot::open(&saved(tag).0).unwrap();
    let mut meta = snap.meta().clone();
    f(&mut meta);
    let path = TempPath::new(tag);
    write_raw(
        &path.0,
        &RawSnapshot {
            version: FORMAT_VERSION,
            meta,
            data_len: snap.data_len() + 8 * MIB,
            pages: vec![],
        },
    )
    .unwrap();
    let err = open_err(&path);
    (path, err)
}

fn vma(start: u64, end: u64) -> VmaRecord {
    VmaRecord {
        range: r(start, end),
        private: true,
        max_perms: Perms::ALL,
        protections: vec![(r(start, end), Perms::READ_WRITE)],
        name: "crafted".into(),
        object: false,
    }
}

fn assert_layout(err: SnapshotError, what: &str) {
    match err {
        SnapshotError::Layout { why } => assert!(why.contains(what), "why {why:?} lacks {what:?}"),
        e => panic!("got {e:?}, want Layout({what})"),
    }
}

#[test]
fn overlapping_vmas_are_refused() {
    let (_p, err) = raw_with("snapfmt-overlap", |m| {
        m.vmas.push(vma(RAM + 2 * MIB, RAM + 6 * MIB));
    });
    assert_layout(err, "overlaps");
}

/// A change to metadata.
type Edit = Box<dyn FnOnce(&mut SnapshotMeta)>;

#[test]
fn impossible_layouts_are_refused() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "unaligned",
            Box::new(|m| m.vmas[0] = vma(RAM + 1, RAM + MIB)),
        ),
        (
            "outside the space",
            Box::new(|m| m.vmas.push(vma(m.space_size, m.space_size + MIB))),
        ),
        (
            "do not cover",
            Box::new(|m| m.vmas[0].protections = vec![(r(RAM, RAM + MIB), Perms::READ)]),
        ),
        (
            "exceeds",
            Box::new(|m| {
                m.vmas[0].max_perms = Perms::READ;
            }),
        ),
        (
            "outside the vmas",
            Box::new(|m| m.data.push(r(RAM + 5 * MIB, RAM + 5 * MIB + PAGE_SIZE))),
        ),
        ("kind", Box::new(|m| m.kind = SnapshotKind::Diff)),
        (
            "past the data length",
            Box::new(|m| m.vmas.push(vma(RAM + 64 * MIB, RAM + 65 * MIB))),
        ),
    ];
    for (i, (what, f)) in cases.into_iter().enumerate() {
        let (_p, err) = raw_with(&format!("snapfmt-layout{i}"), f);
        assert_layout(err, what);
    }
}

#[test]
fn a_crafted_count_cannot_allocate_past_the_file() {
    // Metadata whose first vma count is huge, with a matching checksum:
    // refused as malformed, not attempted.
    let path = saved("snapfmt-count");
    let (meta_offset, meta_len) = meta_section(&path);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path.0)
        .unwrap();
    let mut meta = vec![0u8; meta_len as usize];
    f.read_exact_at(&mut meta, meta_offset).unwrap();
    // kind (1) + id (8) + no base (1) + space size (8), then the vma count.
    meta[18..26].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    f.write_all_at(&meta, meta_offset).unwrap();
    // Fix the metadata checksum (header offset 64) and the header's own.
    f.write_all_at(&crc32c(&meta).to_le_bytes(), 64).unwrap();
    let mut head = [0u8; 68];
    f.read_exact_at(&mut head, 0).unwrap();
    f.write_all_at(&crc32c(&head).to_le_bytes(), 68).unwrap();
    match open_err(&path) {
        SnapshotError::Malformed { section, why } => {
            assert_eq!(section, "metadata");
            assert!(why.contains("count"), "{why}");
        }
        e => panic!("got {e:?}, want Malformed"),
    }
}

/// CRC-32C, bit by bit (independent of the library's table).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

fn working_set() -> WorkingSet {
    WorkingSet {
        windows: vec![
            (r(RAM, RAM + 2 * MIB), Access::Write),
            (r(0, PAGE_SIZE), Access::Execute),
            (r(RAM + 8 * MIB, RAM + 12 * MIB), Access::Read),
        ],
    }
}

fn saved_working_set(tag: &str) -> TempPath {
    let snap = TempPath::new(tag);
    let path = TempPath(working_set_path(&snap.0));
    std::mem::forget(snap);
    working_set().save(&path.0).unwrap();
    path
}

#[test]
fn working_set_roundtrip() {
    let snap = PathBuf::from("/some/dir/vm.snap");
    assert_eq!(
        working_set_path(&snap),
        PathBuf::from("/some/dir/vm.snap.wset")
    );
    let path = saved_working_set("wset-ok");
    assert_eq!(WorkingSet::load(&path.0).unwrap(), working_set());
    let empty = TempPath::new("wset-empty");
    WorkingSet::default().save(&empty.0).unwrap();
    assert_eq!(WorkingSet::load(&empty.0).unwrap(), WorkingSet::default());
}

#[test]
fn working_set_corruptions_are_refused() {
    let path = saved_working_set("wset-magic");
    flip(&path, 1);
    assert!(matches!(
        WorkingSet::load(&path.0),
        Err(SnapshotError::BadMagic)
    ));

    let path = saved_working_set("wset-version");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path.0)
        .unwrap()
        .write_all_at(&9u32.to_le_bytes(), 8)
        .unwrap();
    assert!(matches!(
        WorkingSet::load(&path.0),
        Err(SnapshotError::Version { found: 9, .. })
    ));

    let path = saved_working_set("wset-cut");
    let len = file_len(&path);
    cut(&path, len - 1);
    assert!(matches!(
        WorkingSet::load(&path.0),
        Err(SnapshotError::Truncated { expected, found }) if expected == len && found == len - 1
    ));
    cut(&path, 3);
    assert!(matches!(
        WorkingSet::load(&path.0),
        Err(SnapshotError::Truncated { .. })
    ));

    let path = saved_working_set("wset-crc");
    flip(&path, file_len(&path) - 5);
    assert!(matches!(
        WorkingSet::load(&path.0),
        Err(SnapshotError::Checksum {
            section: "working set"
        })
    ));

    let path = saved_working_set("wset-count");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path.0)
        .unwrap()
        .write_all_at(&u64::MAX.to_le_bytes(), 12)
        .unwrap();
    assert!(matches!(
        WorkingSet::load(&path.0),
        Err(SnapshotError::Truncated { .. })
    ));

    let bad = WorkingSet {
        windows: vec![(r(1, PAGE_SIZE), Access::Read)],
    };
    let path = TempPath::new("wset-bad");
    assert!(matches!(
        bad.save(&path.0),
        Err(SnapshotError::Request { .. })
    ));
    assert!(!path.0.exists());
}

#[test]
fn a_huge_declared_metadata_length_is_refused_without_reading_it() {
    // A sparse file as long as its (valid-checksum) header claims: the
    // length is refused before anything is allocated.
    let path = saved("snapfmt-hugemeta");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path.0)
        .unwrap();
    let mut head = [0u8; 68];
    f.read_exact_at(&mut head, 0).unwrap();
    let meta_offset = u64::from_le_bytes(head[48..56].try_into().unwrap());
    let huge = MAX_METADATA + PAGE_SIZE;
    head[56..64].copy_from_slice(&huge.to_le_bytes());
    f.write_all_at(&head, 0).unwrap();
    f.write_all_at(&crc32c(&head).to_le_bytes(), 68).unwrap();
    f.set_len(meta_offset + huge).unwrap();
    assert_layout(open_err(&path), "metadata length");
}
