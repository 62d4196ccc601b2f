//! The prefill policy and the copy-on-write cap of the fault path, through
//! the RecordingBackend: which windows get filled for a sequential, a
//! sparse and a backward fault stream, what one write fault copies.
//!
//! A "guest touch" here is a host write of the page (it commits the
//! MemoryFile page, as the guest's store through the memslot would); a
//! fault is taken only where the backend has nothing installed, as KVM
//! exits only there.

mod common;
use common::memfile;

use std::sync::Arc;

use guestmm::memfile::MemoryFile;
use guestmm::mm::{
    AddressSpace, AddressSpaceOptions, FillReport, MapOpts, Prefill, RecordingBackend,
    FILL_SCAN_MAX, PREFILL_PROBE,
};
use guestmm::{Access, Range, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const GPA: u64 = 1 << 30;

fn r(s: u64, e: u64) -> Range {
    Range::new(s, e).unwrap()
}

fn space_with(
    name: &str,
    opts: AddressSpaceOptions,
) -> (Arc<MemoryFile>, Arc<RecordingBackend>, Arc<AddressSpace>) {
    let mf = memfile(name);
    let be = Arc::new(RecordingBackend::new());
    let space = AddressSpace::new(mf.clone(), be.clone(), opts).unwrap();
    (mf, be, space)
}

/// Touches `gpa` as a guest would: a fault if nothing is installed there,
/// then a store. Returns the window and the bytes prefilled if it faulted.
fn touch(be: &RecordingBackend, space: &AddressSpace, gpa: u64) -> Option<(Range, u64)> {
    let faulted = if be.installed_at(gpa).is_none() {
        let p = space.handle_fault(gpa, Access::Write).unwrap();
        Some((p.window, p.prefilled))
    } else {
        None
    };
    space.write(gpa, &gpa.to_le_bytes()).unwrap();
    faulted
}

#[test]
fn a_sequential_stream_gets_every_window_after_its_first_filled() {
    let (_mf, be, space) = space_with("prefill-seq", AddressSpaceOptions::default());
    space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
    let mut windows = Vec::new();
    for gpa in (GPA..GPA + 64 * MIB).step_by(PAGE_SIZE as usize) {
        if let Some(w) = touch(&be, &space, gpa) {
            windows.push(w);
        }
    }
    let sizes: Vec<u64> = windows.iter().map(|(w, _)| w.len() / MIB).collect();
    assert_eq!(sizes, vec![2, 4, 8, 16, 32, 2], "window sizes in MiB");
    assert_eq!(windows[0].1, 0, "nothing shows the first window is dense");
    for &(w, filled) in &windows[1..] {
        assert_eq!(
            filled,
            w.len() - PREFILL_PROBE,
            "window {w} follows a dense one: filled but for its probe"
        );
    }
    let want: Vec<(Range, bool)> = windows[1..]
        .iter()
        .map(|&(w, _)| (r(w.start(), w.end() - PREFILL_PROBE), true))
        .collect();
    assert_eq!(be.prefills(), want);
    let st = space.stats();
    assert_eq!(st.prefilled_windows, 5);
    assert_eq!(st.prefilled_bytes, 62 * MIB - 5 * PREFILL_PROBE);
    assert_eq!(st.committed_bytes, 64 * MIB);
    space.check_invariants().unwrap();
}

#[test]
fn a_stream_that_turns_sparse_stops_being_filled_after_one_window() {
    let (_mf, be, space) = space_with("prefill-turn", AddressSpaceOptions::default());
    space.map(MapOpts::anonymous(256 * MIB).fixed(GPA)).unwrap();
    // Dense through the first 2 MiB window, then one page per 64 KiB.
    let mut windows = Vec::new();
    for gpa in (GPA..GPA + 2 * MIB).step_by(PAGE_SIZE as usize) {
        windows.extend(touch(&be, &space, gpa));
    }
    for gpa in (GPA + 2 * MIB..GPA + 256 * MIB).step_by(64 << 10) {
        windows.extend(touch(&be, &space, gpa));
    }
    // The 4 MiB window after the dense one is filled; its probe then shows
    // one page in 16 and nothing after it is.
    let filled = windows.iter().filter(|&&(_, f)| f > 0).count();
    assert_eq!(filled, 1, "{windows:?}");
    assert_eq!(
        windows[1],
        (r(GPA + 2 * MIB, GPA + 6 * MIB), 4 * MIB - PREFILL_PROBE)
    );
    let st = space.stats();
    // Touched: 512 pages, then one per 64 KiB (the recording backend's
    // fills commit nothing; kvm_prefill checks that real ones do).
    let sparse_pages = 254 * MIB / (64 << 10);
    assert_eq!(st.committed_bytes, (512 + sparse_pages) * PAGE_SIZE);
    assert_eq!(
        (st.prefilled_windows, st.prefilled_bytes),
        (1, 4 * MIB - PREFILL_PROBE)
    );
}

#[test]
fn a_sparse_stream_gets_nothing_filled_and_commits_what_it_touches() {
    let (_mf, be, space) = space_with("prefill-sparse", AddressSpaceOptions::default());
    let len = 1 << 30;
    space.map(MapOpts::anonymous(len).fixed(GPA)).unwrap();
    let mut faults = 0;
    let mut touched = 0;
    for gpa in (GPA..GPA + len).step_by(2 * MIB as usize) {
        faults += u64::from(touch(&be, &space, gpa).is_some());
        touched += 1;
    }
    assert!(be.prefills().is_empty(), "prefilled {:?}", be.prefills());
    let st = space.stats();
    assert_eq!((st.prefilled_windows, st.prefilled_bytes), (0, 0));
    assert_eq!(st.committed_bytes, touched * PAGE_SIZE);
    assert_eq!(
        st.populated_bytes, len,
        "windows still grow along the stride"
    );
    assert!(faults < 50, "{faults} faults for {touched} touches");
    // Its windows (up to 512 MiB, sampled) never prove dense.
    for _ in 0..3 {
        let rep = space.fill_dense(u64::MAX);
        assert_eq!(rep.filled_windows, 0, "{rep:?}");
        assert_eq!(rep.pending as u64, st.unfilled_windows);
    }
    assert!(be.prefills().is_empty());
}

#[test]
fn fill_dense_samples_a_large_window() {
    let opts = AddressSpaceOptions {
        fault_around: 64 * MIB,
        fault_around_max: 64 * MIB,
        ..AddressSpaceOptions::default()
    };
    let (_mf, be, space) = space_with("fill-sample", opts);
    space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
    touch(&be, &space, GPA).unwrap();
    // One page in 16 everywhere: under 10 % in every sample.
    for gpa in (GPA..GPA + 64 * MIB).step_by(16 * PAGE_SIZE as usize) {
        space.write(gpa, &[1]).unwrap();
    }
    assert_eq!(space.fill_dense(u64::MAX).filled_windows, 0);
    // One page in 8: 12.5 %.
    for gpa in (GPA + 8 * PAGE_SIZE..GPA + 64 * MIB).step_by(16 * PAGE_SIZE as usize) {
        space.write(gpa, &[1]).unwrap();
    }
    let rep = space.fill_dense(u64::MAX);
    assert_eq!((rep.filled_windows, rep.filled_bytes), (1, 64 * MIB));
    assert_eq!(be.prefills(), vec![(r(GPA, GPA + 64 * MIB), true)]);
}

#[test]
fn a_jump_next_to_dense_memory_is_filled_and_one_next_to_sparse_memory_is_not() {
    let (_mf, be, space) = space_with("prefill-jump", AddressSpaceOptions::default());
    space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
    // A dense 2 MiB window at the top, walked backwards: each new window
    // is a jump down (no stream), its upper neighbour fully committed.
    let top = GPA + 62 * MIB;
    assert_eq!(touch(&be, &space, top), Some((r(top, top + 2 * MIB), 0)));
    space.write(top, &vec![1u8; 2 * MIB as usize]).unwrap();
    let below = top - 2 * MIB;
    let (w, filled) = touch(&be, &space, below + 5 * PAGE_SIZE).unwrap();
    assert_eq!((w, filled), (r(below, top), 2 * MIB - PREFILL_PROBE));
    // A window at the bottom, touched once, then its neighbour: 1 page of
    // 2 MiB committed is no evidence of density.
    touch(&be, &space, GPA);
    assert_eq!(touch(&be, &space, GPA + 6 * MIB).map(|(_, f)| f), Some(0));
    assert_eq!(be.prefills(), vec![(r(below, top - PREFILL_PROBE), true)]);
}

#[test]
fn always_fills_up_to_the_budget_from_the_faulting_chunk_and_never_fills_nothing() {
    let opts = AddressSpaceOptions {
        fault_around: 32 * MIB,
        fault_around_max: 32 * MIB,
        prefill: Prefill::Always { max_bytes: 5 * MIB },
        ..AddressSpaceOptions::default()
    };
    let (_mf, be, space) = space_with("prefill-always", opts.clone());
    space.map(MapOpts::anonymous(32 * MIB).fixed(GPA)).unwrap();
    let p = space.handle_fault(GPA + 29 * MIB, Access::Read).unwrap();
    assert_eq!(p.window, r(GPA, GPA + 32 * MIB));
    assert_eq!(p.prefilled, 5 * MIB);
    assert_eq!(
        be.prefills(),
        vec![
            (r(GPA + 28 * MIB, GPA + 32 * MIB), true),
            (r(GPA, GPA + MIB), true)
        ],
        "the chunk holding the fault and what follows first, then the window's start"
    );

    let never = AddressSpaceOptions {
        prefill: Prefill::Never,
        ..opts
    };
    let (_mf, be, space) = space_with("prefill-never", never);
    space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
    for gpa in (GPA..GPA + 64 * MIB).step_by(PAGE_SIZE as usize) {
        touch(&be, &space, gpa);
    }
    assert!(be.prefills().is_empty());
    assert_eq!(space.stats().prefilled_windows, 0);
}

#[test]
fn copy_on_write_parts_are_filled_read_only() {
    let opts = AddressSpaceOptions {
        fault_around: 4 * MIB,
        fault_around_max: 4 * MIB,
        prefill: Prefill::Always {
            max_bytes: 64 * MIB,
        },
        ..AddressSpaceOptions::default()
    };
    let (_mf, _be, parent) = space_with("prefill-cow", opts);
    parent.map(MapOpts::anonymous(4 * MIB).fixed(GPA)).unwrap();
    parent.write(GPA, &vec![7u8; 4 * MIB as usize]).unwrap();
    let child_be = Arc::new(RecordingBackend::new());
    let child = parent.fork(child_be.clone()).unwrap();
    let p = child.handle_fault(GPA + MIB, Access::Read).unwrap();
    assert_eq!(p.prefilled, 4 * MIB);
    assert_eq!(child_be.prefills(), vec![(r(GPA, GPA + 4 * MIB), false)]);
}

/// A parent whose 32 MiB anonymous vma is populated (one 32 MiB window)
/// and written, then forked: all of it copy-on-write on both sides.
fn forked_32m() -> (Arc<RecordingBackend>, Arc<AddressSpace>, Arc<AddressSpace>) {
    let opts = AddressSpaceOptions {
        fault_around: 32 * MIB,
        fault_around_max: 32 * MIB,
        prefill: Prefill::Never,
        ..AddressSpaceOptions::default()
    };
    let (_mf, be, parent) = space_with("cow-cap", opts);
    parent.map(MapOpts::anonymous(32 * MIB).fixed(GPA)).unwrap();
    let p = parent.handle_fault(GPA, Access::Write).unwrap();
    assert_eq!(p.window.len(), 32 * MIB);
    for mib in 0..32 {
        parent.write(GPA + mib * MIB, &[mib as u8 + 1; 16]).unwrap();
    }
    let child = parent.fork(Arc::new(RecordingBackend::new())).unwrap();
    (be, parent, child)
}

#[test]
fn a_write_fault_in_a_32m_copy_on_write_window_copies_2m() {
    let (be, parent, child) = forked_32m();
    let p = parent
        .handle_fault(GPA + 13 * MIB + 12345, Access::Write)
        .unwrap();
    assert_eq!(
        p.window,
        r(GPA, GPA + 32 * MIB),
        "the window is still 32 MiB"
    );
    assert_eq!(p.cow_copied, 2 * MIB);
    let st = parent.stats();
    assert_eq!((st.cow_copies, st.cow_copied_bytes), (1, 2 * MIB));
    let (w, inst) = be.installed_at(GPA + 13 * MIB).unwrap();
    assert!(inst.writable);
    assert_eq!(
        w,
        r(GPA + 12 * MIB, GPA + 14 * MIB),
        "only the chunk is writable"
    );
    assert!(!be.installed_at(GPA).unwrap().1.writable);
    assert!(!be.installed_at(GPA + 14 * MIB).unwrap().1.writable);
    // The next write elsewhere copies its own chunk.
    let p = parent.handle_fault(GPA + 31 * MIB, Access::Write).unwrap();
    assert_eq!(p.cow_copied, 2 * MIB);
    assert_eq!(parent.stats().cow_copied_bytes, 4 * MIB);
    // Contents: both sides still see what was written before the fork.
    for mib in 0..32 {
        for space in [&parent, &child] {
            let mut b = [0u8; 16];
            space.read(GPA + mib * MIB, &mut b).unwrap();
            assert_eq!(b, [mib as u8 + 1; 16], "at {mib} MiB");
        }
    }
    parent.check_invariants().unwrap();
    child.check_invariants().unwrap();
}

#[test]
fn a_write_fault_copies_within_its_window_only() {
    // A window smaller than the chunk copies the window, not the chunk.
    let opts = AddressSpaceOptions {
        fault_around: 64 << 10,
        fault_around_max: 64 << 10,
        prefill: Prefill::Never,
        ..AddressSpaceOptions::default()
    };
    let (_mf, _be, parent) = space_with("cow-small", opts);
    parent.map(MapOpts::anonymous(4 * MIB).fixed(GPA)).unwrap();
    parent.write(GPA, &vec![3u8; 4 * MIB as usize]).unwrap();
    let _child = parent.fork(Arc::new(RecordingBackend::new())).unwrap();
    let p = parent.handle_fault(GPA + MIB, Access::Write).unwrap();
    assert_eq!(p.window.len(), 64 << 10);
    assert_eq!(p.cow_copied, 64 << 10);
}

/// Writes `pages` pages of the 2 MiB window at `start`, one every
/// `stride` pages, as the guest's stores through the memslot would.
fn touch_pages(space: &AddressSpace, start: u64, pages: u64, stride: u64) {
    for i in 0..pages {
        space
            .write(start + i * stride * PAGE_SIZE, &[1u8; 8])
            .unwrap();
    }
}

#[test]
fn fill_dense_fills_a_window_once_it_proves_dense_and_never_a_sparse_one() {
    let (_mf, be, space) = space_with("fill-dense", AddressSpaceOptions::default());
    space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
    // Two jumps: each window is installed with empty neighbours, so the
    // fault fills nothing and records it.
    let dense = GPA + 10 * MIB;
    let sparse = GPA + 40 * MIB;
    for w in [dense, sparse] {
        let (window, filled) = touch(&be, &space, w + 7 * PAGE_SIZE).unwrap();
        assert_eq!((window, filled), (r(w, w + 2 * MIB), 0));
    }
    assert_eq!(space.stats().unfilled_windows, 2);
    let first = space.fill_dense(u64::MAX);
    assert_eq!(
        (first.scanned, first.filled_windows, first.pending),
        (2, 0, 2)
    );
    assert!(first.progress, "windows seen for the first time");
    let again = space.fill_dense(u64::MAX);
    assert!(!again.progress, "nothing changed since the last look");

    // The dense window gets to 51 of 512 pages (just under 10 %), the
    // sparse one to one page in 16 (6.25 %), which it never passes.
    touch_pages(&space, dense, 50, 3);
    touch_pages(&space, sparse, 31, 16);
    let rep = space.fill_dense(u64::MAX);
    assert_eq!((rep.filled_windows, rep.pending), (0, 2), "{rep:?}");
    assert!(rep.progress);
    touch_pages(&space, dense + 2 * PAGE_SIZE, 1, 1);
    let rep = space.fill_dense(u64::MAX);
    assert_eq!(
        (rep.filled_windows, rep.filled_bytes, rep.pending),
        (1, 2 * MIB, 1),
        "{rep:?}"
    );
    assert_eq!(be.prefills(), vec![(r(dense, dense + 2 * MIB), true)]);
    for _ in 0..3 {
        let rep = space.fill_dense(u64::MAX);
        assert_eq!((rep.filled_windows, rep.pending), (0, 1));
    }
    let st = space.stats();
    assert_eq!((st.dense_fills, st.dense_filled_bytes), (1, 2 * MIB));
    assert_eq!((st.prefilled_windows, st.prefilled_bytes), (0, 0));
    space.check_invariants().unwrap();
}

#[test]
fn fill_dense_drops_windows_unmapped_decommitted_or_copy_on_write() {
    let (_mf, be, space) = space_with("fill-drop", AddressSpaceOptions::default());
    space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
    let windows = [GPA, GPA + 20 * MIB, GPA + 40 * MIB];
    for &w in &windows {
        touch(&be, &space, w + MIB).unwrap();
        touch_pages(&space, w, 512, 1);
    }
    space.unmap(windows[0], 2 * MIB).unwrap();
    space.decommit(windows[1], 2 * MIB).unwrap();
    let _child = space.fork(Arc::new(RecordingBackend::new())).unwrap();
    let rep = space.fill_dense(u64::MAX);
    assert_eq!(
        (rep.scanned, rep.dropped, rep.filled_windows, rep.pending),
        (3, 3, 0, 0),
        "{rep:?}"
    );
    assert!(be.prefills().is_empty(), "{:?}", be.prefills());
    space.check_invariants().unwrap();
}

#[test]
fn fill_dense_keeps_to_its_budget_and_scan_cap() {
    let (_mf, be, space) = space_with("fill-budget", AddressSpaceOptions::default());
    space.map(MapOpts::anonymous(256 * MIB).fixed(GPA)).unwrap();
    // 40 dense 2 MiB windows, every other one (no streams, no evidence).
    let windows: Vec<u64> = (0..40).map(|i| GPA + i * 4 * MIB + 2 * MIB).collect();
    for &w in &windows {
        let (_, filled) = touch(&be, &space, w).unwrap();
        assert_eq!(filled, 0);
        touch_pages(&space, w, 64, 8);
    }
    // 3 MiB of budget: one window whole, then half of the next.
    let rep = space.fill_dense(3 * MIB);
    assert_eq!((rep.filled_windows, rep.filled_bytes), (2, 3 * MIB));
    assert_eq!(
        be.prefills(),
        vec![
            (r(windows[0], windows[0] + 2 * MIB), true),
            (r(windows[1], windows[1] + MIB), true)
        ]
    );
    // The rest of that window is looked at first next time; one call
    // examines windows until FILL_SCAN_MAX bytes: the 1 MiB rest, then 32.
    let rep = space.fill_dense(u64::MAX);
    assert_eq!(rep.scanned as u64, 1 + FILL_SCAN_MAX / (2 * MIB));
    assert_eq!(
        be.prefills()[2],
        (r(windows[1] + MIB, windows[1] + 2 * MIB), true)
    );
    let rep = space.fill_dense(u64::MAX);
    assert_eq!(rep.pending, 0, "{rep:?}");
    assert_eq!(space.stats().dense_filled_bytes, 80 * MIB);
    space.check_invariants().unwrap();
}

#[test]
fn only_dense_records_windows_for_later() {
    for prefill in [Prefill::Never, Prefill::Always { max_bytes: 0 }] {
        let opts = AddressSpaceOptions {
            prefill,
            ..AddressSpaceOptions::default()
        };
        let (_mf, be, space) = space_with("fill-policies", opts);
        space.map(MapOpts::anonymous(16 * MIB).fixed(GPA)).unwrap();
        touch(&be, &space, GPA + 4 * MIB).unwrap();
        touch_pages(&space, GPA + 4 * MIB, 512, 1);
        assert_eq!(space.fill_dense(u64::MAX), FillReport::default());
        assert_eq!(space.stats().unfilled_windows, 0);
        assert!(be.prefills().is_empty());
    }
}

#[test]
fn fill_dense_runs_beside_faults_unmaps_decommits_and_protects() {
    let (_mf, be, space) = space_with("fill-concurrent", AddressSpaceOptions::default());
    let len = 64 * MIB;
    space.map(MapOpts::anonymous(len).fixed(GPA)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filler = {
        let (space, stop) = (space.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut filled = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                filled += space.fill_dense(4 * MIB).filled_bytes;
            }
            filled
        })
    };
    // A pseudo-random walk of touches (dense per window), with windows
    // unmapped and mapped again, decommitted and re-protected meanwhile.
    let mut x: u64 = 12345;
    let mut hole = 0;
    for i in 0..20_000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let gpa = GPA + ((x >> 20) % (len / PAGE_SIZE)) * PAGE_SIZE;
        let two = gpa & !(2 * MIB - 1);
        match i % 1000 {
            500 => {
                space.unmap(two, 2 * MIB).unwrap();
                hole = two;
            }
            // The hole is mapped again 100 touches later.
            600 => {
                space.map(MapOpts::anonymous(2 * MIB).fixed(hole)).unwrap();
            }
            700 => drop(space.decommit(two, 2 * MIB)),
            // Read-only for a while, then writable again (a window that
            // is not mapped refuses: fine).
            900 => drop(space.protect(two, 2 * MIB, guestmm::Perms::READ)),
            950 => drop(space.protect(two, 2 * MIB, guestmm::Perms::READ_WRITE)),
            _ => {
                if space
                    .maps()
                    .iter()
                    .any(|m| m.range.contains(gpa) && m.perms.write)
                {
                    touch(&be, &space, gpa);
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let filled = filler.join().unwrap();
    let st = space.stats();
    eprintln!("concurrent: filled {filled:#x}, {st:?}");
    assert_eq!(filled, st.dense_filled_bytes);
    assert!(st.dense_fills > 0, "{st:?}");
    space.check_invariants().unwrap();
}
