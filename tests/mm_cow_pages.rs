//! Page-granular copy-on-write breaks (`AddressSpace::break_cow_page`, what
//! the KVM fault thread calls in `CowMode::UserfaultfdWp`) and the collapse
//! of a 2 MiB chunk after `COW_COLLAPSE_PAGES` broken pages, against the
//! recording backend: invariants and file refcounts after every step.

mod common;
use common::setup;

use std::sync::Arc;

use guestmm::memfile::MemoryFile;
use guestmm::mm::pma::{COW_COLLAPSE_PAGES, COW_COLLAPSE_RUN_PAGES};
use guestmm::mm::{
    check_file_refs, AddressSpace, FaultError, MapOpts, MmError, RecordingBackend, COW_CHUNK,
};
use guestmm::{Perms, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const BASE: u64 = 1 << 30;

fn check(mf: &Arc<MemoryFile>, spaces: &[&AddressSpace]) {
    for s in spaces {
        s.check_invariants().expect("invariants");
    }
    check_file_refs(mf, spaces, &[]).expect("file refs");
}

fn fill(page: u64, salt: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (page as u8).wrapping_mul(31) ^ (i as u8) ^ salt)
        .collect()
}

/// A parent with 4 MiB of anonymous memory written page by page, and its
/// fork (the child's pages are copy-on-write, shared with the parent).
fn forked() -> (
    Arc<MemoryFile>,
    Arc<AddressSpace>,
    Arc<RecordingBackend>,
    Arc<AddressSpace>,
) {
    let (mf, _be, parent) = setup("cow-pages");
    let gpa = parent.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    assert_eq!(gpa, BASE);
    for p in 0..4 * MIB / PAGE_SIZE {
        parent.write(BASE + p * PAGE_SIZE, &fill(p, 0)).unwrap();
    }
    let be = Arc::new(RecordingBackend::new());
    let child = parent.fork(be.clone()).unwrap();
    check(&mf, &[&parent, &child]);
    (mf, parent, be, child)
}

#[test]
fn one_page_is_copied_per_break_and_installed_writable() {
    let (mf, parent, be, child) = forked();
    // Show the child its memory first (read faults: copy-on-write installs).
    child
        .handle_fault(BASE, guestmm::Access::Read)
        .expect("read fault");
    for (i, page) in [0u64, 5, 7, 300, 511].into_iter().enumerate() {
        let before = mf.allocated_bytes();
        let gpa = BASE + page * PAGE_SIZE;
        let b = child.break_cow_page(gpa + 123).unwrap();
        assert_eq!(b.broken.start(), gpa, "step {i}");
        assert_eq!(b.broken.len(), PAGE_SIZE, "step {i}");
        assert_eq!(
            b.cow_copied, PAGE_SIZE,
            "step {i}: the parent still owns it"
        );
        assert!(!b.collapsed);
        assert_eq!(mf.allocated_bytes() - before, PAGE_SIZE, "step {i}");
        let (r, inst) = be.installed_at(gpa).expect("installed");
        assert!(inst.writable, "step {i}: the copy is installed writable");
        assert!(r.contains(gpa));
        check(&mf, &[&parent, &child]);
        // Same contents; writes no longer reach the other space.
        let mut buf = vec![0; PAGE_SIZE as usize];
        child.read(gpa, &mut buf).unwrap();
        assert_eq!(buf, fill(page, 0), "step {i}: copy differs");
        child.write(gpa, &fill(page, 0x5a)).unwrap();
        parent.read(gpa, &mut buf).unwrap();
        assert_eq!(buf, fill(page, 0), "step {i}: parent saw the child's write");
        check(&mf, &[&parent, &child]);
    }
    // A page next to the broken ones is still copy-on-write (read-only
    // with the recording backend, which traps writes by read-only slots).
    let (_, inst) = be.installed_at(BASE + PAGE_SIZE).expect("installed");
    assert!(!inst.writable);
    // Breaking a broken page again copies nothing.
    let b = child.break_cow_page(BASE).unwrap();
    assert_eq!((b.cow_copied, b.cow_taken_over), (0, 0));
    check(&mf, &[&parent, &child]);
    drop(child);
    drop(parent);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn a_chunk_collapses_after_the_threshold() {
    let (mf, parent, _be, child) = forked();
    let n = COW_COLLAPSE_PAGES;
    let pages = COW_CHUNK / PAGE_SIZE;
    // Every other page, so the broken pages never touch.
    for k in 0..n {
        let gpa = BASE + 2 * k * PAGE_SIZE;
        let before = mf.allocated_bytes();
        let b = child.break_cow_page(gpa).unwrap();
        check(&mf, &[&parent, &child]);
        if k + 1 < n {
            assert!(!b.collapsed, "break {k}");
            assert_eq!(b.cow_copied, PAGE_SIZE, "break {k}");
            assert_eq!(mf.allocated_bytes() - before, PAGE_SIZE);
        } else {
            assert!(b.collapsed, "break {k} reaches the threshold");
            assert_eq!(b.broken.start(), BASE);
            assert_eq!(b.broken.len(), COW_CHUNK);
            assert_eq!(b.cow_copied, (pages - n + 1) * PAGE_SIZE);
            assert_eq!(mf.allocated_bytes() - before, (pages - n + 1) * PAGE_SIZE);
        }
    }
    // The whole chunk is private to the child now; the next chunk is not.
    for p in [1, 3, pages - 1] {
        let b = child.break_cow_page(BASE + p * PAGE_SIZE).unwrap();
        assert_eq!((b.cow_copied, b.cow_taken_over), (0, 0), "page {p}");
    }
    let b = child.break_cow_page(BASE + COW_CHUNK).unwrap();
    assert_eq!((b.cow_copied, b.broken.len()), (PAGE_SIZE, PAGE_SIZE));
    check(&mf, &[&parent, &child]);
    // Contents survived every step.
    let mut buf = vec![0; PAGE_SIZE as usize];
    for p in [0, 1, 2, 100, pages - 1, pages] {
        child.read(BASE + p * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(buf, fill(p, 0), "page {p}");
    }
    drop(parent);
    drop(child);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn a_sequential_writer_collapses_its_chunk_early() {
    let (mf, parent, _be, child) = forked();
    let run = COW_COLLAPSE_RUN_PAGES;
    let pages = COW_CHUNK / PAGE_SIZE;
    // A run of `run` pages from the chunk's start, written in order: the
    // break that sees `run` broken pages right below it collapses.
    for k in 0..=run {
        let b = child.break_cow_page(BASE + k * PAGE_SIZE).unwrap();
        check(&mf, &[&parent, &child]);
        if k < run {
            assert!(!b.collapsed, "break {k}");
            assert_eq!(b.cow_copied, PAGE_SIZE, "break {k}");
        } else {
            assert!(b.collapsed, "break {k} follows a run of {run}");
            assert_eq!(b.broken.len(), COW_CHUNK);
            assert_eq!(b.cow_copied, (pages - run) * PAGE_SIZE);
        }
    }
    // A run with a gap below the page does not count.
    let next = BASE + COW_CHUNK;
    for k in (0..run).chain([run + 1]) {
        let b = child.break_cow_page(next + k * PAGE_SIZE).unwrap();
        assert!(
            !b.collapsed,
            "page {k}: the run ends at page {run}, not here"
        );
    }
    check(&mf, &[&parent, &child]);
    let mut buf = vec![0; PAGE_SIZE as usize];
    for p in [0, run, pages - 1, pages + run + 1] {
        child.read(BASE + p * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(buf, fill(p, 0), "page {p}");
    }
    drop(parent);
    drop(child);
    assert_eq!(mf.allocated_bytes(), 0);
}

#[test]
fn the_sole_owner_takes_the_page_over() {
    let (mf, parent, _be, child) = forked();
    drop(parent);
    let before = mf.allocated_bytes();
    let b = child.break_cow_page(BASE + 9 * PAGE_SIZE).unwrap();
    assert_eq!((b.cow_copied, b.cow_taken_over), (0, PAGE_SIZE));
    assert_eq!(mf.allocated_bytes(), before);
    check(&mf, &[&child]);
}

#[test]
fn breaks_refuse_what_the_guest_may_not_write() {
    let (mf, parent, _be, child) = forked();
    child.protect(BASE, 2 * MIB, Perms::READ).unwrap();
    let got = child.break_cow_page(BASE + PAGE_SIZE);
    assert!(
        matches!(got, Err(MmError::Fault(FaultError::Permission { .. }))),
        "got {got:?}"
    );
    let got = child.break_cow_page(BASE + 64 * MIB);
    assert!(
        matches!(got, Err(MmError::Fault(FaultError::Unmapped { .. }))),
        "got {got:?}"
    );
    // Nothing changed: no copy was made.
    assert_eq!(child.stats().cow_copies, 0);
    check(&mf, &[&parent, &child]);
}
