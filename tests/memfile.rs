//! Scenario tests for the memfd page allocator.

use std::os::fd::AsRawFd;

use guestmm::memfile::{MemoryFile, MemoryFileError, MemoryFileOptions, MemoryKind, Usage};
use guestmm::{Access, FileRange, Range, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;

fn small_file(max_size: u64) -> MemoryFile {
    MemoryFile::new(
        "test",
        MemoryFileOptions {
            max_size,
            chunk_size: 2 * MIB,
            initial_size: 0,
        },
    )
    .expect("create memory file")
}

fn pages(start_page: u64, n: u64) -> FileRange {
    Range::pages(start_page * P, n * P).unwrap()
}

fn check(f: &MemoryFile) {
    if let Err(e) = f.check_invariants() {
        panic!("invariants broken: {e}");
    }
}

/// A separate `MAP_SHARED` mapping of the memfd, as the KVM layer makes.
struct ExternalMap {
    addr: *mut u8,
    len: usize,
}

impl ExternalMap {
    fn new(f: &MemoryFile, len: u64) -> ExternalMap {
        // SAFETY: a fresh shared mapping of the memfd at a kernel-chosen
        // address; it affects no existing memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.fd().as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap of fd");
        ExternalMap {
            addr: addr.cast(),
            len: len as usize,
        }
    }

    fn write(&self, offset: u64, byte: u8) {
        assert!((offset as usize) < self.len);
        // SAFETY: offset is inside the mapping, which lies inside the file.
        unsafe { self.addr.add(offset as usize).write_volatile(byte) };
    }

    /// mincore residency of the page at `offset`.
    fn resident(&self, offset: u64) -> bool {
        let mut v = [0u8; 1];
        // SAFETY: the address is page aligned and inside our mapping;
        // mincore writes one byte for one page.
        let rc = unsafe {
            libc::mincore(
                self.addr.add(offset as usize).cast(),
                P as usize,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore");
        v[0] & 1 != 0
    }
}

impl Drop for ExternalMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; nothing uses it afterwards.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[test]
fn small_allocations_pack_at_lowest_offsets_and_reuse_holes() {
    let f = small_file(64 * MIB);
    let a = f.allocate(P, MemoryKind::Anonymous).unwrap();
    let b = f.allocate(P, MemoryKind::Anonymous).unwrap();
    let c = f.allocate(2 * P, MemoryKind::System).unwrap();
    assert_eq!((a, b, c), (pages(0, 1), pages(1, 1), pages(2, 2)));

    let huge = f.allocate(2 * MIB, MemoryKind::Anonymous).unwrap();
    assert_eq!(huge, Range::new(2 * MIB, 4 * MIB).unwrap(), "2 MiB aligned");
    let odd = f.allocate(2 * MIB + P, MemoryKind::Anonymous).unwrap();
    assert_eq!(odd.start() % (2 * MIB), 0, "got {odd}, want 2 MiB aligned");

    f.dec_ref(b).unwrap();
    check(&f);
    let two = f.allocate(2 * P, MemoryKind::Anonymous).unwrap();
    assert_eq!(
        two,
        pages(4, 2),
        "a 2-page request must skip the 1-page hole"
    );
    let one = f.allocate(P, MemoryKind::Anonymous).unwrap();
    assert_eq!(one, b, "the freed hole is reused first");
    check(&f);
}

#[test]
fn file_grows_by_doubling_in_chunks() {
    let f = small_file(64 * MIB);
    assert_eq!(f.file_size(), 0);
    let mut sizes = Vec::new();
    for _ in 0..9 {
        f.allocate(2 * MIB, MemoryKind::Anonymous).unwrap();
        sizes.push(f.file_size() / MIB);
    }
    assert_eq!(sizes, [2, 4, 8, 8, 16, 16, 16, 16, 32]);
    // 18 MiB are used: 48 more do not fit under 64 MiB.
    assert!(matches!(
        f.allocate(48 * MIB, MemoryKind::Anonymous),
        Err(MemoryFileError::OutOfMemory { .. })
    ));
    assert_eq!(f.file_size(), 32 * MIB, "a failed allocation does not grow");
    // A request larger than double the file grows straight to fit it.
    let g = small_file(64 * MIB);
    g.allocate(2 * MIB, MemoryKind::Anonymous).unwrap();
    g.allocate(10 * MIB, MemoryKind::Anonymous).unwrap();
    assert_eq!(g.file_size(), 12 * MIB);
    check(&f);
    check(&g);
}

#[test]
fn initial_size_rounds_up_to_a_chunk() {
    let f = MemoryFile::new(
        "init",
        MemoryFileOptions {
            max_size: 16 * MIB,
            chunk_size: 4 * MIB,
            initial_size: 5 * MIB,
        },
    )
    .unwrap();
    assert_eq!(f.file_size(), 8 * MIB);
    check(&f);
}

#[test]
fn invalid_options_are_rejected() {
    let table = [
        (3 * MIB, 16 * MIB, 0),      // chunk not a power of two
        (MIB, 16 * MIB, 0),          // chunk below 2 MiB
        (2 * MIB, 3 * MIB, 0),       // max not a chunk multiple
        (2 * MIB, 0, 0),             // zero max
        (2 * MIB, 4 * MIB, 5 * MIB), // initial above max
    ];
    for (chunk_size, max_size, initial_size) in table {
        let opts = MemoryFileOptions {
            max_size,
            chunk_size,
            initial_size,
        };
        match MemoryFile::new("bad", opts) {
            Err(MemoryFileError::InvalidOptions { .. }) => {}
            other => panic!("{opts:?}: got {other:?}, want InvalidOptions"),
        }
    }
}

#[test]
fn reference_counts_split_and_remerge() {
    let f = small_file(16 * MIB);
    let r = f.allocate(8 * P, MemoryKind::Shared).unwrap();
    assert_eq!(f.segment_count(), 1);
    f.inc_ref(pages(2, 2)).unwrap();
    check(&f);
    assert_eq!(f.segment_count(), 3);
    assert_eq!(
        (0..8).map(|p| f.refs(p * P)).collect::<Vec<_>>(),
        [1, 1, 2, 2, 1, 1, 1, 1].map(Some)
    );
    f.inc_ref(pages(3, 3)).unwrap();
    check(&f);
    assert_eq!(f.segment_count(), 5, "refs 1 1 | 2 | 3 3 | 2 | 1 1");
    f.dec_ref(pages(3, 3)).unwrap();
    check(&f);
    f.dec_ref(pages(2, 2)).unwrap();
    check(&f);
    assert_eq!(f.segment_count(), 1, "counts agree again, so one segment");

    f.dec_ref(pages(0, 2)).unwrap();
    check(&f);
    assert_eq!(f.refs(0), None);
    assert_eq!(f.refs(2 * P), Some(1));
    assert_eq!(f.allocated_bytes(), 6 * P);
    f.dec_ref(Range::new(2 * P, r.end()).unwrap()).unwrap();
    check(&f);
    assert_eq!(f.allocated_bytes(), 0);
    assert_eq!(f.segment_count(), 0);
}

#[test]
fn different_kinds_never_merge() {
    let f = small_file(16 * MIB);
    f.allocate(P, MemoryKind::Anonymous).unwrap();
    f.allocate(P, MemoryKind::System).unwrap();
    f.allocate(P, MemoryKind::System).unwrap();
    assert_eq!(f.segment_count(), 2);
    assert_eq!(f.kind(P), Some(MemoryKind::System));
    check(&f);
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    allocated: u64,
    segments: usize,
    refs: Vec<Option<u64>>,
    usage: Usage,
    content: Vec<u8>,
}

fn snapshot(f: &MemoryFile) -> Snapshot {
    let content = (0..8)
        .map(|p| {
            if f.refs(p * P).is_none() {
                return 0xee;
            }
            let mut b = [0u8];
            f.read_at(p * P + 7, &mut b).unwrap();
            b[0]
        })
        .collect();
    Snapshot {
        allocated: f.allocated_bytes(),
        segments: f.segment_count(),
        refs: (0..16).map(|p| f.refs(p * P)).collect(),
        usage: f.usage().unwrap(),
        content,
    }
}

#[test]
fn bad_requests_fail_with_their_error_and_change_nothing() {
    let f = small_file(16 * MIB);
    let a = f.allocate(4 * P, MemoryKind::Anonymous).unwrap();
    let freed = f.allocate(2 * P, MemoryKind::Anonymous).unwrap();
    f.allocate(2 * P, MemoryKind::Other).unwrap();
    f.dec_ref(freed).unwrap();
    assert_eq!(freed, pages(4, 2));
    f.inc_ref(pages(1, 1)).unwrap();
    for p in 0..4 {
        f.write_at(p * P + 7, &[p as u8 + 1]).unwrap();
    }
    let unaligned = Range::new(P + 1, 2 * P).unwrap();
    let empty = Range::new(P, P).unwrap();
    let partly = pages(3, 2); // page 4 was freed

    type Op<'a> = Box<dyn Fn(&MemoryFile) -> Result<(), MemoryFileError> + 'a>;
    type Want = fn(&MemoryFileError) -> bool;
    let table: Vec<(&str, Op, Want)> = vec![
        (
            "zero length",
            Box::new(|f| f.allocate(0, MemoryKind::Anonymous).map(drop)),
            |e| matches!(e, MemoryFileError::InvalidLength { len: 0 }),
        ),
        (
            "unaligned length",
            Box::new(|f| f.allocate(P + 8, MemoryKind::Anonymous).map(drop)),
            |e| matches!(e, MemoryFileError::InvalidLength { len } if *len == P + 8),
        ),
        (
            "inc_ref unaligned",
            Box::new(move |f| f.inc_ref(unaligned)),
            |e| matches!(e, MemoryFileError::InvalidRange { .. }),
        ),
        ("dec_ref empty", Box::new(move |f| f.dec_ref(empty)), |e| {
            matches!(e, MemoryFileError::InvalidRange { .. })
        }),
        (
            "double free",
            Box::new(move |f| f.dec_ref(freed)),
            |e| matches!(e, MemoryFileError::NotAllocated { gap, .. } if *gap == pages(4, 2)),
        ),
        (
            "dec_ref never allocated",
            Box::new(|f| f.dec_ref(pages(100, 1))),
            |e| matches!(e, MemoryFileError::NotAllocated { .. }),
        ),
        (
            "dec_ref partly freed",
            Box::new(move |f| f.dec_ref(partly)),
            |e| matches!(e, MemoryFileError::NotAllocated { gap, .. } if *gap == pages(4, 1)),
        ),
        (
            "inc_ref partly freed",
            Box::new(move |f| f.inc_ref(partly)),
            |e| matches!(e, MemoryFileError::NotAllocated { .. }),
        ),
        ("decommit free", Box::new(move |f| f.decommit(freed)), |e| {
            matches!(e, MemoryFileError::NotAllocated { .. })
        }),
        (
            "decommit unaligned",
            Box::new(move |f| f.decommit(unaligned)),
            |e| matches!(e, MemoryFileError::InvalidRange { .. }),
        ),
        (
            "write to free page",
            Box::new(|f| f.write_at(4 * P + 3, &[1, 2])),
            |e| matches!(e, MemoryFileError::NotAllocated { .. }),
        ),
        (
            "copy overlapping",
            Box::new(move |f| f.copy_within(a, P)),
            |e| matches!(e, MemoryFileError::OverlappingCopy { .. }),
        ),
        (
            "copy into free",
            Box::new(move |f| f.copy_within(pages(0, 1), 4 * P)),
            |e| matches!(e, MemoryFileError::NotAllocated { .. }),
        ),
        (
            "offset overflow",
            Box::new(|f| f.read_at(u64::MAX, &mut [0; 2])),
            |e| matches!(e, MemoryFileError::Range(_)),
        ),
    ];
    for (name, op, want) in table {
        let before = snapshot(&f);
        match op(&f) {
            Err(e) if want(&e) => {}
            other => panic!("{name}: got {other:?}"),
        }
        assert_eq!(snapshot(&f), before, "{name}: state changed");
        check(&f);
    }
}

#[test]
fn out_of_memory_past_max_size() {
    let f = small_file(4 * MIB);
    f.allocate(4 * MIB - P, MemoryKind::Anonymous).unwrap();
    f.allocate(P, MemoryKind::Anonymous).unwrap();
    let before = snapshot(&f);
    for len in [P, 8 * MIB] {
        match f.allocate(len, MemoryKind::Anonymous) {
            Err(MemoryFileError::OutOfMemory {
                requested,
                max_size,
            }) => assert_eq!((requested, max_size), (len, 4 * MIB)),
            other => panic!("len {len:#x}: got {other:?}, want OutOfMemory"),
        }
    }
    assert_eq!(snapshot(&f), before);
    let msg = f
        .allocate(P, MemoryKind::Anonymous)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("0x400000"), "message names max size: {msg}");
    check(&f);
}

#[test]
fn decommit_releases_host_memory_and_reads_zeros() {
    let f = small_file(16 * MIB);
    let r = f.allocate(8 * P, MemoryKind::Anonymous).unwrap();
    for p in 0..8 {
        f.write_at(r.start() + p * P, &[0xab; 64]).unwrap();
    }
    let ext = ExternalMap::new(&f, f.file_size());
    let before = f.usage().unwrap();
    assert_eq!(before.committed(MemoryKind::Anonymous), 8 * P);
    assert!(ext.resident(2 * P));

    f.decommit(pages(2, 4)).unwrap();
    let after = f.usage().unwrap();
    assert_eq!(
        before.total_file_blocks_bytes - after.total_file_blocks_bytes,
        4 * P,
        "st_blocks must drop by the decommitted pages"
    );
    assert_eq!(after.committed(MemoryKind::Anonymous), 4 * P);
    assert!(!ext.resident(2 * P) && !ext.resident(5 * P));
    assert!(ext.resident(P) && ext.resident(6 * P));
    assert_eq!(after.allocated_bytes, 8 * P, "allocation unchanged");
    let mut buf = [1u8; 64];
    f.read_at(3 * P, &mut buf).unwrap();
    assert_eq!(buf, [0; 64]);
    f.read_at(6 * P, &mut buf).unwrap();
    assert_eq!(buf, [0xab; 64]);
    check(&f);
}

#[test]
fn freed_then_reallocated_range_reads_zeros() {
    let f = small_file(16 * MIB);
    let r = f.allocate(4 * P, MemoryKind::Anonymous).unwrap();
    f.write_at(r.start(), &vec![0x5a; (4 * P) as usize])
        .unwrap();
    f.dec_ref(r).unwrap();
    assert_eq!(f.usage().unwrap().total_file_blocks_bytes, 0);
    let again = f.allocate(4 * P, MemoryKind::Shared).unwrap();
    assert_eq!(again, r);
    let mut buf = vec![1u8; (4 * P) as usize];
    f.read_at(again.start(), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn usage_counts_internal_and_external_writes_per_kind() {
    let f = small_file(16 * MIB);
    let anon = f.allocate(8 * P, MemoryKind::Anonymous).unwrap();
    let shared = f.allocate(8 * P, MemoryKind::Shared).unwrap();
    let system = f.allocate(4 * P, MemoryKind::System).unwrap();
    let ext = ExternalMap::new(&f, f.file_size());
    assert_eq!(f.usage().unwrap().total_committed(), 0);

    for p in [0, 3, 7] {
        f.write_at(anon.start() + p * P + 100, &[1]).unwrap();
    }
    for p in [1, 2] {
        ext.write(shared.start() + p * P + 5, 2);
    }
    ext.write(system.start(), 3);
    let u = f.usage().unwrap();
    assert_eq!(u.committed(MemoryKind::Anonymous), 3 * P);
    assert_eq!(u.committed(MemoryKind::Shared), 2 * P);
    assert_eq!(u.committed(MemoryKind::System), P);
    assert_eq!(u.committed(MemoryKind::Other), 0);
    assert_eq!(u.total_committed(), 6 * P);
    assert_eq!(u.total_file_blocks_bytes, 6 * P);
    assert_eq!(u.file_size, 2 * MIB);
    assert_eq!(u.allocated_bytes, 20 * P);

    // Nothing changed: the scan is elided.
    let (scans, elided) = f.usage_scan_stats();
    assert_eq!(f.usage().unwrap(), u);
    assert_eq!(f.usage_scan_stats(), (scans, elided + 1));
    // An external write changes st_blocks, so the next call rescans.
    ext.write(shared.start() + 6 * P, 9);
    assert_eq!(f.usage().unwrap().committed(MemoryKind::Shared), 3 * P);
    assert_eq!(f.usage_scan_stats().0, scans + 1);
}

#[test]
fn internal_mappings_span_chunks() {
    let f = small_file(16 * MIB);
    let r = f.allocate(4 * MIB, MemoryKind::Anonymous).unwrap();
    assert_eq!(r.start(), 0);
    let dst = f.allocate(4 * MIB, MemoryKind::Anonymous).unwrap();
    let across = Range::new(2 * MIB - 10, 2 * MIB + 20).unwrap();
    let slices = f.map_internal(across, Access::Write).unwrap();
    assert_eq!(slices.iter().map(|s| s.len()).collect::<Vec<_>>(), [10, 20]);

    let data: Vec<u8> = (0..30).collect();
    f.write_at(across.start(), &data).unwrap();
    let mut back = [0u8; 30];
    f.read_at(across.start(), &mut back).unwrap();
    assert_eq!(&back[..], &data[..]);

    // Copy a range whose source and destination chunk boundaries differ.
    let src = Range::new(MIB, 3 * MIB).unwrap();
    f.copy_within(src, dst.start() + P).unwrap();
    let mut got = [0u8; 30];
    f.read_at(dst.start() + P + (across.start() - MIB), &mut got)
        .unwrap();
    assert_eq!(&got[..], &data[..]);

    f.zero_at(across).unwrap();
    f.read_at(across.start(), &mut back).unwrap();
    assert_eq!(back, [0; 30]);
    check(&f);
}

#[test]
fn memory_file_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MemoryFile>();
}

#[test]
fn two_threads_allocate_write_and_free_concurrently() {
    let f = small_file(64 * MIB);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let f = &f;
            s.spawn(move || {
                let kind = [MemoryKind::Anonymous, MemoryKind::Shared][t as usize];
                let mut live: Vec<(FileRange, u8)> = Vec::new();
                let mut rng = 0x1234_5678_9abc_def1u64 ^ t;
                for i in 0..10_000u64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if live.len() < 32 && (rng % 3 != 0 || live.is_empty()) {
                        let r = f.allocate((1 + rng % 4) * P, kind).unwrap();
                        let tag = (i as u8) | 1;
                        f.write_at(r.start(), &[tag]).unwrap();
                        f.write_at(r.end() - 1, &[tag]).unwrap();
                        live.push((r, tag));
                    } else {
                        let (r, tag) = live.swap_remove((rng as usize / 3) % live.len());
                        let (mut a, mut b) = ([0u8], [0u8]);
                        f.read_at(r.start(), &mut a).unwrap();
                        f.read_at(r.end() - 1, &mut b).unwrap();
                        assert_eq!((a[0], b[0]), (tag, tag), "thread {t}: {r} clobbered");
                        if rng % 5 == 0 {
                            f.inc_ref(r).unwrap();
                            f.dec_ref(r).unwrap();
                        }
                        f.dec_ref(r).unwrap();
                    }
                }
                for (r, _) in live {
                    f.dec_ref(r).unwrap();
                }
            });
        }
    });
    check(&f);
    let u = f.usage().unwrap();
    assert_eq!(u.allocated_bytes, 0);
    assert_eq!(u.total_committed(), 0);
    assert_eq!(u.total_file_blocks_bytes, 0);
}
