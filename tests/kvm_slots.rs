//! SlotTable against a real KVM VM: the slot policy (merge, split, limit).

mod common;
use common::kvm_or_skip;

use std::sync::Arc;

use guestmm::kvm::{MergePolicy, SlotTable};
use guestmm::memfile::{MemoryFile, MemoryFileOptions, MemoryKind};
use guestmm::mm::{AddressSpaceBackend, BackendError};
use guestmm::Range;

const MIB: u64 = 1 << 20;

struct Fixture {
    mf: MemoryFile,
    table: SlotTable,
}

fn fixture(limit: usize) -> Option<Fixture> {
    fixture_with(limit, MergePolicy::Eager)
}

fn fixture_with(limit: usize, policy: MergePolicy) -> Option<Fixture> {
    let kvm = kvm_or_skip()?;
    let vm = Arc::new(kvm.create_vm().expect("create_vm"));
    let mf = MemoryFile::new("slots", MemoryFileOptions::default()).unwrap();
    mf.allocate(64 * MIB, MemoryKind::Anonymous).unwrap();
    let table = SlotTable::with_policy(vm, 1 << 32, limit, policy).unwrap();
    Some(Fixture { mf, table })
}

fn r(s: u64, e: u64) -> Range {
    Range::new(s, e).unwrap()
}

impl Fixture {
    fn install(&self, start: u64, len: u64, writable: bool) -> Result<(), BackendError> {
        self.table.install(
            r(start, start + len),
            self.mf.fd(),
            start % (64 * MIB),
            writable,
        )
    }
}

#[test]
fn adjacent_installs_merge_into_one_slot() {
    let Some(f) = fixture(32) else { return };
    f.install(0, 2 * MIB, true).unwrap();
    f.install(4 * MIB, 2 * MIB, true).unwrap();
    assert_eq!(f.table.slots().len(), 2);
    f.install(2 * MIB, 2 * MIB, true).unwrap();
    assert_eq!(
        f.table.slots(),
        vec![(r(0, 6 * MIB), true)],
        "got {:?}",
        f.table.slots()
    );
    f.table.check_invariants().unwrap();
    let s = f.table.stats();
    assert_eq!((s.adds, s.deletes, s.live, s.max_live), (3, 2, 1, 2));
}

#[test]
fn lazy_merge_extends_runs_with_new_slots_then_merges_the_cheapest_pair() {
    let Some(f) = fixture_with(32, MergePolicy::Lazy { max_slots: 4 }) else {
        return;
    };
    // A geometric stream: 2, 4 and 8 MiB windows, each its own slot.
    f.install(0, 2 * MIB, true).unwrap();
    f.install(2 * MIB, 4 * MIB, true).unwrap();
    f.install(6 * MIB, 8 * MIB, true).unwrap();
    let three = vec![
        (r(0, 2 * MIB), true),
        (r(2 * MIB, 6 * MIB), true),
        (r(6 * MIB, 14 * MIB), true),
    ];
    assert_eq!(
        f.table.slots(),
        three,
        "three adjacent installs, three slots"
    );
    f.table.check_invariants().unwrap();
    // A same-writability replacement inside one slot changes no slot.
    f.install(2 * MIB, MIB, true).unwrap();
    assert_eq!(f.table.slots(), three);
    // The fourth window still fits the budget: no slot is deleted.
    f.install(14 * MIB, 16 * MIB, true).unwrap();
    assert_eq!(f.table.stats().deletes, 0);
    assert_eq!(f.table.stats().live, 4);
    // At the budget the fifth merges the cheapest adjacent pair, the two
    // smallest early windows, not the large ones the stream is in.
    f.install(30 * MIB, 32 * MIB, true).unwrap();
    assert_eq!(
        f.table.slots(),
        vec![
            (r(0, 6 * MIB), true),
            (r(6 * MIB, 14 * MIB), true),
            (r(14 * MIB, 30 * MIB), true),
            (r(30 * MIB, 62 * MIB), true),
        ]
    );
    f.table.check_invariants().unwrap();
    let s = f.table.stats();
    assert_eq!((s.adds, s.deletes, s.live, s.max_live), (6, 2, 4, 4));
    // A sparse install elsewhere still makes room by the cheapest merge.
    f.install(100 * MIB, 2 * MIB, true).unwrap();
    assert_eq!(f.table.stats().live, 4);
    assert_eq!(f.table.slots()[0], (r(0, 14 * MIB), true));
    f.table.check_invariants().unwrap();
    // Read-only pieces still split off, and removal still works.
    f.table.write_protect(r(2 * MIB, 4 * MIB)).unwrap();
    f.table.check_invariants().unwrap();
    f.table.remove(r(0, 128 * MIB)).unwrap();
    assert!(f.table.slots().is_empty());
    f.table.check_invariants().unwrap();
}

#[test]
fn lazy_merge_budget_is_soft_when_nothing_is_adjacent() {
    let Some(f) = fixture_with(8, MergePolicy::Lazy { max_slots: 2 }) else {
        return;
    };
    for i in 0..4 {
        f.install(i * 10 * MIB, 2 * MIB, true).unwrap();
    }
    let s = f.table.stats();
    assert_eq!(
        (s.live, s.deletes),
        (4, 0),
        "isolated installs: one slot each"
    );
    f.table.check_invariants().unwrap();
    // The table's limit stays hard.
    for i in 4..8 {
        f.install(i * 10 * MIB, 2 * MIB, true).unwrap();
    }
    assert!(matches!(
        f.install(80 * MIB, 2 * MIB, true),
        Err(BackendError::OutOfSlots { .. })
    ));
    assert_eq!(f.table.stats().live, 8);
    f.table.check_invariants().unwrap();
}

#[test]
fn different_writability_stays_apart_and_write_protect_splits() {
    let Some(f) = fixture(32) else { return };
    f.install(0, 2 * MIB, true).unwrap();
    f.install(2 * MIB, 2 * MIB, false).unwrap();
    assert_eq!(
        f.table.slots(),
        vec![(r(0, 2 * MIB), true), (r(2 * MIB, 4 * MIB), false)]
    );
    f.table.write_protect(r(MIB, 2 * MIB)).unwrap();
    assert_eq!(
        f.table.slots(),
        vec![(r(0, MIB), true), (r(MIB, 4 * MIB), false)],
        "read-only parts merge"
    );
    f.table.remove(r(0, 4 * MIB)).unwrap();
    assert!(f.table.slots().is_empty());
    f.table.check_invariants().unwrap();
}

#[test]
fn removing_the_middle_splits_a_slot() {
    let Some(f) = fixture(32) else { return };
    f.install(0, 6 * MIB, true).unwrap();
    f.table.remove(r(2 * MIB, 4 * MIB)).unwrap();
    assert_eq!(
        f.table.slots(),
        vec![(r(0, 2 * MIB), true), (r(4 * MIB, 6 * MIB), true)]
    );
    f.table.check_invariants().unwrap();
}

#[test]
fn installs_past_the_limit_fail_and_change_nothing() {
    let Some(f) = fixture(2) else { return };
    f.install(0, MIB, true).unwrap();
    f.install(4 * MIB, MIB, true).unwrap();
    let before = (f.table.slots(), f.table.stats());
    match f.install(8 * MIB, MIB, true) {
        Err(BackendError::OutOfSlots { limit: 2 }) => {}
        other => panic!("got {other:?}, want OutOfSlots {{ limit: 2 }}"),
    }
    assert_eq!(
        (f.table.slots(), f.table.stats()),
        before,
        "a refused install changes nothing"
    );
    // Filling the gap merges and needs no new slot.
    f.install(MIB, 3 * MIB, true).unwrap();
    assert_eq!(f.table.slots(), vec![(r(0, 5 * MIB), true)]);
    f.table.check_invariants().unwrap();
}

#[test]
fn splits_past_the_limit_remove_whole_runs_instead() {
    let Some(f) = fixture(1) else { return };
    f.install(0, 6 * MIB, true).unwrap();
    // Protecting the middle would need three slots: the run goes away.
    f.table.write_protect(r(2 * MIB, 4 * MIB)).unwrap();
    assert!(f.table.slots().is_empty(), "got {:?}", f.table.slots());
    f.install(0, 6 * MIB, true).unwrap();
    f.table.remove(r(2 * MIB, 4 * MIB)).unwrap();
    assert!(f.table.slots().is_empty(), "got {:?}", f.table.slots());
    f.table.check_invariants().unwrap();
}

#[test]
fn an_identical_install_is_a_no_op() {
    let Some(f) = fixture(8) else { return };
    f.install(0, 4 * MIB, true).unwrap();
    f.install(MIB, MIB, true).unwrap();
    let s = f.table.stats();
    assert_eq!((s.adds, s.maps, s.redundant_installs), (1, 1, 1));
}

#[test]
fn out_of_range_installs_are_errors() {
    let Some(f) = fixture(8) else { return };
    match f
        .table
        .install(r(1 << 32, (1 << 32) + MIB), f.mf.fd(), 0, true)
    {
        Err(BackendError::OutOfRange { .. }) => {}
        other => panic!("got {other:?}, want OutOfRange"),
    }
}
