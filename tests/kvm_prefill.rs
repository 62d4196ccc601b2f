//! The prefill policy on real KVM: a sequential guest gets its windows
//! filled (the SlotTable's `MADV_POPULATE_WRITE` really commits them), a
//! sparse stream through the mm API gets none and commits only what it
//! touches. Counts, never times.

mod common;
use common::{kvm_or_skip, memfile};

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::kvm::{Vm, VmOptions};
use guestmm::mm::{AddressSpaceOptions, MapOpts, Prefill, PREFILL_PROBE};
use guestmm::vmm::guests;
use guestmm::vmm::runner::{run_guest, RunOptions};
use guestmm::{Access, PAGE_SIZE};
use kvm_ioctls::Kvm;

const MIB: u64 = 1 << 20;
const GPA: u64 = 1 << 32;

fn vm_with(kvm: &Kvm, name: &str, prefill: Prefill) -> Arc<Vm> {
    let opts = VmOptions {
        space: AddressSpaceOptions {
            prefill,
            ..VmOptions::default().space
        },
        ..VmOptions::default()
    };
    Vm::new(kvm, memfile(name), opts).unwrap()
}

/// Touches `gpa` as the guest would: a fault only where no slot covers it
/// (KVM exits only there), then a store. Returns the fault's window and
/// prefilled bytes.
fn touch(vm: &Vm, gpa: u64) -> Option<(u64, u64)> {
    let faulted = vm.slots().slot_at(gpa).is_none().then(|| {
        let p = vm.space().handle_fault(gpa, Access::Write).unwrap();
        (p.window.len(), p.prefilled)
    });
    vm.space().write(gpa, &gpa.to_le_bytes()).unwrap();
    faulted
}

#[test]
fn the_touch_guest_gets_every_window_after_its_first_filled() {
    let Some(kvm) = kvm_or_skip() else { return };
    let guest = guests::find("touch").unwrap();
    let opts = RunOptions {
        ram_size: 128 * MIB,
        ..RunOptions::default()
    };
    let r = run_guest(&kvm, guest, &opts).unwrap();
    assert!(r.passed, "{}", r.summary_line());
    eprintln!("touch 128 MiB: mm {:?}", r.mm);
    eprintln!("touch 128 MiB: vm {:?}", r.vm);
    assert!(
        r.mm.prefilled_windows + 1 >= r.mm.windows && r.mm.prefilled_windows > 0,
        "{} of {} windows prefilled, want all but the first",
        r.mm.prefilled_windows,
        r.mm.windows
    );
    assert!(
        r.mm.prefilled_bytes >= 128 * MIB - 2 * MIB - r.mm.windows * PREFILL_PROBE,
        "prefilled {:#x} bytes of 128 MiB of RAM",
        r.mm.prefilled_bytes
    );
    assert!(
        r.vm.memory_exits <= r.mm.windows + 4,
        "{} memory exits for {} windows",
        r.vm.memory_exits,
        r.mm.windows
    );
    assert!(r.mm.committed_bytes <= r.mm.populated_bytes);
}

#[test]
fn a_prefilled_window_is_committed_before_the_guest_touches_it() {
    let Some(kvm) = kvm_or_skip() else { return };
    for prefill in [Prefill::default(), Prefill::Never] {
        let vm = vm_with(&kvm, "kvm-prefill-dense", prefill);
        let space = vm.space();
        space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
        let mut gpa = GPA;
        let mut faults = Vec::new();
        while gpa < GPA + 64 * MIB {
            let before = space.stats().committed_bytes;
            let (len, filled) = touch(&vm, gpa).expect("each window start faults");
            let after = space.stats().committed_bytes;
            faults.push((len / MIB, filled / MIB, (after - before) / PAGE_SIZE));
            // The guest writes the rest of the window.
            space.write(gpa, &vec![1u8; len as usize]).unwrap();
            gpa += len;
        }
        let st = space.stats();
        eprintln!("{prefill:?}: (window MiB, prefilled MiB, pages committed by the fault+first store) {faults:?}");
        assert_eq!(st.committed_bytes, 64 * MIB);
        match prefill {
            Prefill::Never => {
                assert_eq!(st.prefilled_windows, 0);
                for &(_, filled, pages) in &faults {
                    assert_eq!((filled, pages), (0, 1), "{faults:?}");
                }
            }
            _ => {
                assert_eq!(st.prefilled_windows, faults.len() as u64 - 1);
                assert_eq!(faults[0], (2, 0, 1), "the first window has no evidence");
                for &(len, filled, pages) in &faults[1..] {
                    // In MiB, rounded down: all but the 64 KiB probe.
                    assert_eq!(filled, len - 1, "{faults:?}");
                    assert_eq!(
                        pages,
                        (len * MIB - PREFILL_PROBE) / PAGE_SIZE,
                        "the fill committed the window but for its probe"
                    );
                }
            }
        }
        vm.slots().check_invariants().unwrap();
    }
}

#[test]
fn a_sparse_stream_over_1g_commits_only_what_it_touches() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = vm_with(&kvm, "kvm-prefill-sparse", Prefill::default());
    let space = vm.space();
    let len = 1 << 30;
    space.map(MapOpts::anonymous(len).fixed(GPA)).unwrap();
    let mut faults = 0;
    let mut touched = 0;
    for gpa in (GPA..GPA + len).step_by(2 * MIB as usize) {
        faults += u64::from(touch(&vm, gpa).is_some());
        touched += 1;
    }
    let st = space.stats();
    eprintln!("sparse 1 GiB: {touched} touches, {faults} faults, {st:?}");
    assert_eq!((st.prefilled_windows, st.prefilled_bytes), (0, 0));
    let window = space.options().fault_around_max;
    let limit = touched * PAGE_SIZE * 11 / 10 + window;
    assert!(
        st.committed_bytes <= limit,
        "committed {:#x} bytes for {touched} pages touched, want <= {limit:#x}",
        st.committed_bytes
    );
    assert_eq!(faults, st.windows, "one fault per window");
    assert!(
        faults <= touched,
        "{faults} faults for {touched} touched windows"
    );
    // The filler thread woke for each recorded window and found none
    // dense; nor does a call now.
    std::thread::sleep(Duration::from_millis(50));
    let rep = space.fill_dense(u64::MAX);
    assert_eq!(
        (rep.filled_windows, rep.pending as u64),
        (0, st.unfilled_windows)
    );
    let st = space.stats();
    assert_eq!((st.dense_fills, st.dense_filled_bytes), (0, 0));
    assert!(st.committed_bytes <= limit);
}

#[test]
fn a_stream_that_turns_sparse_commits_at_most_one_window_more_than_it_touches() {
    let Some(kvm) = kvm_or_skip() else { return };
    let vm = vm_with(&kvm, "kvm-prefill-turn", Prefill::default());
    let space = vm.space();
    let len = 1 << 30;
    space.map(MapOpts::anonymous(len).fixed(GPA)).unwrap();
    let mut touched = 0;
    for gpa in (GPA..GPA + 2 * MIB).step_by(PAGE_SIZE as usize) {
        touch(&vm, gpa);
        touched += 1;
    }
    for gpa in (GPA + 2 * MIB..GPA + len).step_by(2 * MIB as usize) {
        touch(&vm, gpa);
        touched += 1;
    }
    let st = space.stats();
    eprintln!("dense 2 MiB then sparse: {touched} touches, {st:?}");
    assert_eq!(
        st.prefilled_windows, 1,
        "only the window after the dense one"
    );
    let limit = touched * PAGE_SIZE * 11 / 10 + space.options().fault_around_max;
    assert!(
        st.committed_bytes <= limit,
        "committed {:#x} bytes for {touched} pages touched, want <= {limit:#x}",
        st.committed_bytes
    );
}

#[test]
fn the_scatter_guest_gets_its_windows_filled_once_they_prove_dense() {
    let Some(kvm) = kvm_or_skip() else { return };
    let guest = guests::find("scatter").unwrap();
    let lazy = RunOptions {
        ram_size: 128 * MIB,
        ..RunOptions::default()
    };
    let eager = RunOptions {
        eager: true,
        ..lazy.clone()
    };
    let r = run_guest(&kvm, guest, &lazy).unwrap();
    assert!(r.passed, "{}", r.summary_line());
    let e = run_guest(&kvm, guest, &eager).unwrap();
    assert!(e.passed, "{}", e.summary_line());
    eprintln!("scatter 128 MiB: mm {:?}", r.mm);
    // Random touches: no fault sees a dense neighbour, every window is
    // recorded, and the filler fills them as they pass 10 %.
    assert_eq!(r.mm.prefilled_windows, 0);
    assert_eq!(r.mm.unfilled_windows, r.mm.windows);
    assert!(
        r.mm.dense_fills > 0 && r.mm.dense_filled_bytes > 0,
        "nothing filled: {:?}",
        r.mm
    );
    assert!(r.mm.dense_filled_bytes <= r.mm.populated_bytes);
    assert_eq!(
        r.mm.committed_bytes, e.mm.committed_bytes,
        "the fills commit only what the guest touches anyway"
    );
}

/// A `Vm` whose filler thread runs every `period` (or not at all).
fn vm_with_filler(kvm: &Kvm, name: &str, period: Option<Duration>) -> Arc<Vm> {
    let opts = VmOptions {
        fill_dense: period,
        ..VmOptions::default()
    };
    Vm::new(kvm, memfile(name), opts).unwrap()
}

#[test]
fn the_filler_thread_commits_a_window_that_proves_dense_and_none_when_off() {
    let Some(kvm) = kvm_or_skip() else { return };
    for period in [Some(Duration::from_millis(2)), None] {
        let vm = vm_with_filler(&kvm, "kvm-filler", period);
        let space = vm.space();
        space.map(MapOpts::anonymous(64 * MIB).fixed(GPA)).unwrap();
        let w = GPA + 20 * MIB;
        let (len, filled) = touch(&vm, w).unwrap();
        assert_eq!((len, filled), (2 * MIB, 0));
        // 64 of 512 pages (12.5 %).
        for page in 1..64 {
            touch(&vm, w + page * 8 * PAGE_SIZE);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let wait = if period.is_some() {
            deadline
        } else {
            Instant::now() + Duration::from_millis(50)
        };
        while space.stats().dense_fills == 0 && Instant::now() < wait {
            std::thread::sleep(Duration::from_millis(2));
        }
        let st = space.stats();
        match period {
            Some(_) => {
                assert_eq!((st.dense_fills, st.dense_filled_bytes), (1, 2 * MIB));
                assert_eq!(
                    st.committed_bytes,
                    2 * MIB,
                    "MADV_POPULATE_WRITE committed the window"
                );
            }
            None => {
                assert_eq!((st.dense_fills, st.committed_bytes), (0, 64 * PAGE_SIZE));
                // A VMM without the thread calls it itself.
                let rep = space.fill_dense(u64::MAX);
                assert_eq!((rep.filled_windows, rep.filled_bytes), (1, 2 * MIB));
                assert_eq!(space.stats().committed_bytes, 2 * MIB);
            }
        }
        vm.slots().check_invariants().unwrap();
        space.check_invariants().unwrap();
    }
}
