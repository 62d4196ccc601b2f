use std::os::fd::AsFd;

use super::*;
use crate::segment::SegmentValue;

#[test]
fn page_info_merges_only_equal_values() {
    let r = |s, e| Range::new(s, e).unwrap();
    let a = PageInfo {
        kind: MemoryKind::Anonymous,
        refs: 1,
    };
    let more = PageInfo { refs: 2, ..a };
    let sys = PageInfo {
        kind: MemoryKind::System,
        ..a
    };
    assert_eq!(a.merge(r(0, 1), &a, r(1, 2)), Some(a));
    assert_eq!(a.merge(r(0, 1), &more, r(1, 2)), None);
    assert_eq!(a.merge(r(0, 1), &sys, r(1, 2)), None);
    assert_eq!(more.split(r(0, 8), 4), (more, more));
}

#[test]
fn options_validate_and_round_initial_size() {
    let ok = MemoryFileOptions {
        initial_size: 1,
        ..MemoryFileOptions::default()
    };
    assert_eq!(ok.validate().unwrap(), 16 << 20);
    let too_big = MemoryFileOptions {
        max_size: 1 << 63,
        ..MemoryFileOptions::default()
    };
    let msg = too_big.validate().unwrap_err().to_string();
    assert!(msg.contains("off_t"), "{msg}");
}

#[test]
fn the_file_is_sealed_against_shrinking_but_grows() {
    let f = MemoryFile::new("seal", MemoryFileOptions::default()).unwrap();
    f.allocate(PAGE_SIZE, MemoryKind::Other).unwrap();
    assert!(sys::ftruncate(f.fd.as_fd(), 0).is_err(), "shrink must fail");
    f.allocate(32 << 20, MemoryKind::Other).unwrap();
    assert_eq!(f.file_size(), 48 << 20);
    f.check_invariants().unwrap();
}

#[test]
fn host_ptr_points_into_the_internal_mapping() {
    let f = MemoryFile::new("ptr", MemoryFileOptions::default()).unwrap();
    let r = f.allocate(2 * PAGE_SIZE, MemoryKind::Anonymous).unwrap();
    f.write_at(r.start() + 5, &[42]).unwrap();
    let p = f.host_ptr(r.start() + 5).unwrap();
    // SAFETY: the byte is inside a live internal mapping of an allocated page.
    assert_eq!(unsafe { p.read_volatile() }, 42);
    assert!(matches!(
        f.host_ptr(f.file_size()),
        Err(MemoryFileError::BeyondFile { .. })
    ));
}

#[test]
fn reclaim_is_synchronous_and_invalidates_the_usage_cache() {
    let f = MemoryFile::new("reclaim", MemoryFileOptions::default()).unwrap();
    let r = f.allocate(4 * PAGE_SIZE, MemoryKind::Shared).unwrap();
    f.write_at(r.start(), &[1; 4 * PAGE_SIZE as usize]).unwrap();
    assert_eq!(
        f.usage().unwrap().committed(MemoryKind::Shared),
        4 * PAGE_SIZE
    );
    f.inc_ref(r).unwrap();
    f.dec_ref(r).unwrap();
    assert_eq!(f.usage_scan_stats(), (1, 0));
    assert_eq!(
        f.usage().unwrap().committed(MemoryKind::Shared),
        4 * PAGE_SIZE
    );
    assert_eq!(f.usage_scan_stats(), (1, 1), "inc+dec changes nothing");
    f.dec_ref(r).unwrap();
    let u = f.usage().unwrap();
    assert_eq!((u.total_committed(), u.total_file_blocks_bytes), (0, 0));
    assert_eq!(f.usage_scan_stats().0, 2);
}
