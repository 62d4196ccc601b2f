//! The snapshot memory writer over a RecordingBackend address space: what
//! it writes (guest memory at `data_offset + gpa`, holes elsewhere), what it
//! must not do (populate or commit anything), full and diff snapshots.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{setup, tempfile};
use guestmm::memfile::MemoryFile;
use guestmm::mm::{
    AddressSpace, HostFile, IoOpts, MapOpts, Mappable, RecordingBackend, SharedMemory,
};
use guestmm::snapshot::{save, BaseRef, DiffOf, SaveRequest, Snapshot, SnapshotKind, VmaRecord};
use guestmm::{Access, GuestRange, Perms, Range, PAGE_SIZE};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const ANON: u64 = 1 << 30;
const ANON_LEN: u64 = 16 * MIB;
const FILE: u64 = 2 << 30;
const FILE_LEN: u64 = MIB;
/// The host file's one zero page (object offset).
const FILE_ZERO_PAGE: u64 = 256 * KIB;

/// A file path in the temp dir, removed (with its `.tmp`) on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> TempPath {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TempPath(std::env::temp_dir().join(format!(
            "guestmm-snapmem-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let mut tmp = self.0.clone().into_os_string();
        tmp.push(".tmp");
        let _ = std::fs::remove_file(tmp);
    }
}

/// Non-zero bytes that depend on the address.
fn pattern(at: u64, len: u64, seed: u8) -> Vec<u8> {
    (at..at + len)
        .map(|a| ((a / 3 + seed as u64) % 255 + 1) as u8)
        .collect()
}

fn r(start: u64, end: u64) -> GuestRange {
    Range::new(start, end).unwrap()
}

struct Fixture {
    _mf: Arc<MemoryFile>,
    _be: Arc<RecordingBackend>,
    space: Arc<AddressSpace>,
    /// Non-zero guest bytes (what a full snapshot must write).
    nonzero: u64,
}

/// 16 MiB of private anonymous memory (a read-only MiB in the middle) with
/// 72 KiB of data, a populated zero page and an untouched fault window, and
/// a 1 MiB host file mapped privately, one page of it written by the guest.
fn fixture(tag: &str) -> Fixture {
    let (mf, be, space) = setup(tag);
    space
        .map(MapOpts::anonymous(ANON_LEN).fixed(ANON).name("ram"))
        .unwrap();
    space.protect(ANON + 8 * MIB, MIB, Perms::READ).unwrap();
    let mut f = tempfile("snapmem-image");
    let mut content = pattern(0, FILE_LEN, 9);
    content[FILE_ZERO_PAGE as usize..(FILE_ZERO_PAGE + PAGE_SIZE) as usize].fill(0);
    f.write_all(&content).unwrap();
    let hf = HostFile::new(f, false).unwrap();
    space
        .map(
            MapOpts::object(hf as Arc<dyn Mappable>, 0, FILE_LEN)
                .fixed(FILE)
                .perms(Perms::READ_WRITE)
                .name("image"),
        )
        .unwrap();
    let w = |gpa: u64, len: u64, seed: u8| {
        space
            .write_with(gpa, &pattern(gpa, len, seed), IoOpts::FORCE)
            .unwrap()
    };
    w(ANON, 64 * KIB, 1);
    w(ANON + 3 * MIB + PAGE_SIZE, 8 * KIB, 2);
    space
        .write_with(ANON + 5 * MIB, &[0u8; PAGE_SIZE as usize], IoOpts::FORCE)
        .unwrap();
    space.handle_fault(ANON + 10 * MIB, Access::Read).unwrap();
    w(FILE + 512 * KIB, PAGE_SIZE, 3);
    Fixture {
        _mf: mf,
        _be: be,
        space,
        nonzero: 72 * KIB + FILE_LEN - PAGE_SIZE,
    }
}

fn request(space: &AddressSpace) -> SaveRequest<'_> {
    SaveRequest {
        space,
        devices: vec![r(0xfee0_0000, 0xfee0_1000)],
        vcpus: vec![b"vcpu0 state".to_vec(), vec![0xAB; 5000]],
        vm_state: b"clock".to_vec(),
        diff: None,
    }
}

/// The file's data runs (SEEK_DATA / SEEK_HOLE) in the data area, as guest
/// ranges.
fn data_runs(snap: &Snapshot) -> Vec<GuestRange> {
    let fd = snap.file().as_raw_fd();
    let (base, end) = (snap.data_offset(), snap.data_offset() + snap.data_len());
    let mut out = Vec::new();
    let mut at = base;
    while at < end {
        // SAFETY: lseek on a descriptor owned by `snap`.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = (unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) } as u64).min(end);
        out.push(r(data as u64 - base, hole - base));
        at = hole;
    }
    out
}

/// Every byte of every vma: the file at `data_offset + gpa` equals guest
/// memory (read with host I/O, which populates: call last).
fn assert_file_matches_memory(snap: &Snapshot, space: &AddressSpace) {
    for v in space.layout() {
        let mut want = vec![0u8; v.range.len() as usize];
        space
            .read_with(v.range.start(), &mut want, IoOpts::FORCE)
            .unwrap();
        let mut got = vec![0u8; v.range.len() as usize];
        snap.file()
            .read_exact_at(&mut got, snap.data_offset() + v.range.start())
            .unwrap();
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "{}: byte at {:#x}: file has {:#x}, guest has {:#x}",
                v.name,
                v.range.start() + i as u64,
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn full_snapshot_roundtrip_populates_and_commits_nothing() {
    let fx = fixture("snap-full");
    let space = &fx.space;
    let path = TempPath::new("full");
    let usage = space.memfile().usage().unwrap();
    let stats = space.stats();
    let report = save(&path.0, request(space)).unwrap();
    assert_eq!(
        space.memfile().usage().unwrap(),
        usage,
        "saving changed the memory file"
    );
    let after = space.stats();
    assert_eq!(
        after.populated_bytes, stats.populated_bytes,
        "saving populated memory"
    );
    assert_eq!(
        after.committed_bytes, stats.committed_bytes,
        "saving committed memory"
    );
    assert_eq!(after.pmas, stats.pmas);

    let snap = Snapshot::open(&path.0).unwrap();
    let meta = snap.meta();
    assert_eq!(meta.kind, SnapshotKind::Full);
    assert_eq!(meta.id, report.id);
    assert_eq!(meta.base, None);
    assert_eq!(meta.space_size, space.options().size);
    let want_vmas: Vec<VmaRecord> = space
        .layout()
        .into_iter()
        .map(|v| VmaRecord {
            range: v.range,
            private: v.private,
            max_perms: v.max_perms,
            protections: v.protections,
            name: v.name,
            object: v.object.is_some(),
        })
        .collect();
    assert_eq!(meta.vmas, want_vmas);
    assert_eq!(meta.vmas.len(), 2);
    assert_eq!(
        meta.vmas[0].protections.len(),
        3,
        "read-only MiB splits the ram vma"
    );
    assert_eq!(
        meta.vmas[0].protections[1],
        (r(ANON + 8 * MIB, ANON + 9 * MIB), Perms::READ)
    );
    assert!(!meta.vmas[0].object && meta.vmas[1].object);
    assert_eq!(meta.devices, vec![r(0xfee0_0000, 0xfee0_1000)]);
    assert_eq!(meta.vcpus, vec![b"vcpu0 state".to_vec(), vec![0xAB; 5000]]);
    assert_eq!(meta.vm_state, b"clock".to_vec());
    assert_eq!(snap.data_len(), FILE + FILE_LEN);

    // Exactly the non-zero pages are written, and the index says so.
    assert_eq!(report.data_bytes_written, fx.nonzero);
    let indexed: u64 = meta.data.iter().map(|d| d.len()).sum();
    assert_eq!(indexed, report.data_bytes_written);
    assert!(
        !meta
            .data
            .iter()
            .any(|d| d.overlaps(r(ANON + 5 * MIB, ANON + 5 * MIB + PAGE_SIZE))),
        "the populated zero page was written"
    );
    assert!(
        !meta
            .data
            .iter()
            .any(|d| d.overlaps(r(FILE + FILE_ZERO_PAGE, FILE + FILE_ZERO_PAGE + PAGE_SIZE))),
        "the host file's zero page was written"
    );
    // Holes everywhere else: the file's data runs are the index.
    assert_eq!(data_runs(&snap), meta.data);
    // Blocks: the data, the header page and the metadata pages, give or
    // take a page per data range.
    let meta_pages = report.metadata_bytes.next_multiple_of(PAGE_SIZE);
    let floor = report.data_bytes_written + PAGE_SIZE + meta_pages;
    let slack = PAGE_SIZE * meta.data.len() as u64;
    assert!(
        report.file_blocks_bytes >= floor && report.file_blocks_bytes <= floor + slack,
        "file blocks {:#x}, want {floor:#x} (+ up to {slack:#x})",
        report.file_blocks_bytes
    );
    assert_eq!(
        std::fs::metadata(&path.0).unwrap().blocks() * 512,
        report.file_blocks_bytes
    );

    // The host file's unpopulated pages carry its content.
    let mut page = vec![0u8; PAGE_SIZE as usize];
    snap.file()
        .read_exact_at(&mut page, snap.data_offset() + FILE + 4 * PAGE_SIZE)
        .unwrap();
    assert_eq!(page, pattern(4 * PAGE_SIZE, PAGE_SIZE, 9));
    assert_file_matches_memory(&snap, space);
}

#[test]
fn diff_writes_exactly_the_dirty_pages_zeros_included() {
    let fx = fixture("snap-diff");
    let space = &fx.space;
    let base_path = TempPath::new("base");
    let base = save(&base_path.0, request(space)).unwrap();
    // Change a page after the base, so the diff must carry the new bytes.
    space
        .write_with(ANON + PAGE_SIZE, &pattern(0, PAGE_SIZE, 77), IoOpts::FORCE)
        .unwrap();
    let dirty = [
        r(ANON, ANON + 8 * KIB),
        r(ANON + 4 * KIB, ANON + 12 * KIB), // overlaps the first
        r(ANON + 5 * MIB, ANON + 5 * MIB + PAGE_SIZE), // populated zeros
        r(ANON + 12 * MIB, ANON + 12 * MIB + 8 * KIB), // never populated
        r(FILE + 128 * KIB, FILE + 128 * KIB + PAGE_SIZE), // host file page
        r(ANON + ANON_LEN, ANON + ANON_LEN + PAGE_SIZE), // unmapped: left out
    ];
    let usage = space.memfile().usage().unwrap();
    let populated = space.stats().populated_bytes;
    let path = TempPath::new("diff");
    let base_ref = Snapshot::open(&base_path.0).unwrap().base_ref();
    assert_eq!(
        base_ref,
        BaseRef {
            id: base.id,
            file_name: base_path.0.file_name().unwrap().to_string_lossy().into(),
        }
    );
    let report = save(
        &path.0,
        SaveRequest {
            diff: Some(DiffOf {
                base: base_ref.clone(),
                dirty: &dirty,
            }),
            ..request(space)
        },
    )
    .unwrap();
    assert_eq!(space.memfile().usage().unwrap(), usage);
    assert_eq!(space.stats().populated_bytes, populated);
    assert_ne!(report.id, base.id);

    let snap = Snapshot::open(&path.0).unwrap();
    assert_eq!(snap.meta().kind, SnapshotKind::Diff);
    assert_eq!(snap.meta().base, Some(base_ref));
    let want = vec![
        r(ANON, ANON + 12 * KIB),
        r(ANON + 5 * MIB, ANON + 5 * MIB + PAGE_SIZE),
        r(ANON + 12 * MIB, ANON + 12 * MIB + 8 * KIB),
        r(FILE + 128 * KIB, FILE + 128 * KIB + PAGE_SIZE),
    ];
    assert_eq!(snap.meta().data, want);
    assert_eq!(report.data_bytes_written, 28 * KIB);
    assert_eq!(
        data_runs(&snap),
        want,
        "the file holds exactly the dirty pages"
    );
    let meta_pages = report.metadata_bytes.next_multiple_of(PAGE_SIZE);
    let floor = 28 * KIB + PAGE_SIZE + meta_pages;
    assert!(
        report.file_blocks_bytes >= floor && report.file_blocks_bytes <= floor + 4 * PAGE_SIZE,
        "diff file blocks {:#x}, want about {floor:#x}",
        report.file_blocks_bytes
    );
    for d in &want {
        let mut got = vec![0u8; d.len() as usize];
        snap.file()
            .read_exact_at(&mut got, snap.data_offset() + d.start())
            .unwrap();
        let mut mem = vec![0u8; d.len() as usize];
        space.read_with(d.start(), &mut mem, IoOpts::FORCE).unwrap();
        assert!(got == mem, "diff bytes of {d} differ from guest memory");
    }
}

#[test]
fn bad_dirty_ranges_are_refused_and_leave_no_file() {
    let fx = fixture("snap-baddirty");
    let path = TempPath::new("baddirty");
    let dirty = [r(ANON + 1, ANON + PAGE_SIZE)];
    let err = save(
        &path.0,
        SaveRequest {
            diff: Some(DiffOf {
                base: BaseRef {
                    id: 1,
                    file_name: "base".into(),
                },
                dirty: &dirty,
            }),
            ..request(&fx.space)
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, guestmm::snapshot::SnapshotError::Request { .. }),
        "got {err:?}"
    );
    assert!(!Path::new(&path.0).exists());
}

#[test]
fn save_64_mib_timing() {
    let (_mf, _be, space) = setup("snap-64m");
    const LEN: u64 = 64 * MIB;
    space.map(MapOpts::anonymous(LEN).fixed(ANON)).unwrap();
    for at in (0..LEN).step_by(MIB as usize) {
        space
            .write_with(ANON + at, &pattern(at, MIB, 5), IoOpts::FORCE)
            .unwrap();
    }
    // And 1 GiB more, populated by faults but never touched: holes.
    space
        .map(MapOpts::anonymous(1 << 30).fixed(2 << 30))
        .unwrap();
    for at in (0..1u64 << 30).step_by(64 << 20) {
        space.handle_fault((2 << 30) + at, Access::Read).unwrap();
    }
    let stats = space.stats();
    let populated = stats.populated_bytes;
    let path = TempPath::new("64m");
    let report = save(&path.0, request(&space)).unwrap();
    assert_eq!(report.data_bytes_written, LEN);
    assert_eq!(space.stats().populated_bytes, populated);
    // Blocks = committed bytes + header + metadata, within a page per extent.
    let extents = space.extents(r(0, 3 << 30)).unwrap().len() as u64;
    let meta_pages = report.metadata_bytes.next_multiple_of(PAGE_SIZE);
    let data_blocks = report.file_blocks_bytes - PAGE_SIZE - meta_pages;
    assert!(
        data_blocks.abs_diff(stats.committed_bytes) <= PAGE_SIZE * extents,
        "data blocks {data_blocks:#x}, committed {:#x}, {extents} extents",
        stats.committed_bytes
    );
    eprintln!(
        "saved {} MiB of data ({} MiB populated) in {:?} ({:.0} MiB/s), file blocks {} KiB, metadata {} B",
        LEN / MIB,
        populated / MIB,
        report.elapsed,
        (LEN / MIB) as f64 / report.elapsed.as_secs_f64(),
        report.file_blocks_bytes / KIB,
        report.metadata_bytes
    );
    let snap = Snapshot::open(&path.0).unwrap();
    assert_eq!(snap.meta().data, vec![r(ANON, ANON + LEN)]);
}

#[test]
fn shared_object_pages_written_by_another_space_are_saved() {
    // Two spaces map one SharedMemory object; only the other one touched
    // the page, so this space has no pma there: the bytes come from the
    // object (translated), and nothing is committed by saving.
    let (mf, _be, space) = setup("snap-shared");
    let (_be2, other) = common::space_over(&mf);
    let obj = SharedMemory::new(mf.clone(), 4 * MIB).unwrap();
    for s in [&space, &other] {
        s.map(
            MapOpts::object(obj.clone() as Arc<dyn Mappable>, 0, 4 * MIB)
                .fixed(ANON)
                .shared()
                .name("shm"),
        )
        .unwrap();
    }
    other
        .write_with(ANON + MIB, &pattern(0, PAGE_SIZE, 42), IoOpts::FORCE)
        .unwrap();
    assert_eq!(space.stats().populated_bytes, 0);
    let committed = mf.usage().unwrap().total_committed();
    let path = TempPath::new("shared");
    let report = save(&path.0, request(&space)).unwrap();
    assert_eq!(mf.usage().unwrap().total_committed(), committed);
    assert_eq!(
        space.stats().populated_bytes,
        0,
        "saving populated the space"
    );
    assert_eq!(report.data_bytes_written, PAGE_SIZE);
    let snap = Snapshot::open(&path.0).unwrap();
    assert!(snap.meta().vmas[0].object && !snap.meta().vmas[0].private);
    assert_eq!(
        snap.meta().data,
        vec![r(ANON + MIB, ANON + MIB + PAGE_SIZE)]
    );
    assert_file_matches_memory(&snap, &space);
}

#[test]
fn a_snapshot_file_maps_as_a_host_file_and_shows_the_saved_memory() {
    // What a lazy restore does with the API: the opened file becomes a
    // HostFile and each saved vma maps it privately at data_offset + gpa.
    let fx = fixture("snap-remap");
    let path = TempPath::new("remap");
    save(&path.0, request(&fx.space)).unwrap();
    let snap = Snapshot::open(&path.0).unwrap();
    let (data_offset, meta) = (snap.data_offset(), snap.meta().clone());
    let hf = HostFile::new(snap.into_file(), false).unwrap();
    let (_mf, _be, restored) = setup("snap-remap-restored");
    for v in &meta.vmas {
        restored
            .map(
                MapOpts::object(
                    hf.clone() as Arc<dyn Mappable>,
                    data_offset + v.range.start(),
                    v.range.len(),
                )
                .fixed(v.range.start())
                .max_perms(v.max_perms)
                .perms(v.protections[0].1)
                .name(&v.name),
            )
            .unwrap();
        for (pr, p) in &v.protections {
            restored.protect(pr.start(), pr.len(), *p).unwrap();
        }
    }
    assert_eq!(
        restored.maps(),
        fx.space
            .maps()
            .iter()
            .map(|e| {
                // Offsets differ (object offsets into the snapshot file).
                let mut e = e.clone();
                e.offset = data_offset + e.range.start();
                e
            })
            .collect::<Vec<_>>()
    );
    for v in &meta.vmas {
        let mut want = vec![0u8; v.range.len() as usize];
        fx.space
            .read_with(v.range.start(), &mut want, IoOpts::FORCE)
            .unwrap();
        let mut got = vec![0u8; v.range.len() as usize];
        restored
            .read_with(v.range.start(), &mut got, IoOpts::FORCE)
            .unwrap();
        assert!(
            got == want,
            "restored {} differs from the saved memory",
            v.name
        );
    }
}
