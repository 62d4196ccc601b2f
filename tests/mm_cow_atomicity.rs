//! The hard case of the atomicity policy: locked read-modify-writes from
//! several vCPUs on a copy-on-write page. What follows is the mechanism as
//! KVM drives it, step by step, and the guarantee guestmm does give.
//!
//! KVM emulates an instruction whose write hits a read-only slot: it reads
//! the old page natively, computes the result, and exits with a plain
//! store of that result. A vCPU whose exit is handled after another vCPU
//! broke the COW therefore stores a value computed from the old page.

mod common;
use common::setup;

use guestmm::mm::{AddressSpace, RecordingBackend};
use guestmm::Access;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const GPA: u64 = 1 << 30;

/// The counter as a vCPU running natively sees it: through what the
/// backend has installed.
fn native_read(be: &RecordingBackend, mf: &guestmm::memfile::MemoryFile) -> u64 {
    let (r, inst) = be.installed_at(GPA).expect("installed");
    let mut buf = [0u8; 8];
    mf.read_at(inst.file_offset + (GPA - r.start()), &mut buf)
        .unwrap();
    u64::from_le_bytes(buf)
}

fn native_write(be: &RecordingBackend, mf: &guestmm::memfile::MemoryFile, v: u64) {
    let (r, inst) = be.installed_at(GPA).expect("installed");
    assert!(inst.writable, "a native store needs a writable slot");
    mf.write_at(inst.file_offset + (GPA - r.start()), &v.to_le_bytes())
        .unwrap();
}

/// A parent with a counter of 10 in a private page, forked (so the page is
/// copy-on-write and installed read-only in the parent).
fn forked_counter() -> (
    Arc<guestmm::memfile::MemoryFile>,
    Arc<RecordingBackend>,
    Arc<AddressSpace>,
    Arc<AddressSpace>,
) {
    let (mf, be, parent) = setup("cow-atomicity");
    parent
        .map(guestmm::mm::MapOpts::anonymous(2 * MIB).fixed(GPA))
        .unwrap();
    parent.write(GPA, &10u64.to_le_bytes()).unwrap();
    parent.handle_fault(GPA, Access::Read).unwrap();
    let child = parent.fork(Arc::new(RecordingBackend::new())).unwrap();
    assert!(
        !be.installed_at(GPA).unwrap().1.writable,
        "forked page is read-only in the parent"
    );
    (mf, be, parent, child)
}

#[test]
fn a_locked_increment_computed_before_another_vcpus_cow_break_lands_stale() {
    let (mf, be, parent, _child) = forked_counter();
    // vCPUs A and B both start `lock inc [counter]`: KVM reads 10 natively.
    let a_read = native_read(&be, &mf);
    let b_read = native_read(&be, &mf);
    assert_eq!((a_read, b_read), (10, 10));
    // A's write exit: the fault breaks COW, the run loop stores A's result.
    let p = parent.handle_fault(GPA, Access::Write).unwrap();
    assert!(p.cow_copied > 0, "A's exit copies the page: {p:?}");
    parent.write(GPA, &(a_read + 1).to_le_bytes()).unwrap();
    // A goes on natively on the now writable copy: 12, 13.
    native_write(&be, &mf, 12);
    native_write(&be, &mf, 13);
    // B's exit is handled only now: nothing left to copy, and the store it
    // carries was computed from the old page.
    let p = parent.handle_fault(GPA, Access::Write).unwrap();
    assert_eq!(p.cow_copied, 0);
    parent.write(GPA, &(b_read + 1).to_le_bytes()).unwrap();
    // A's two later increments are gone: this is the limit the README states.
    assert_eq!(native_read(&be, &mf), 11);
    parent.check_invariants().unwrap();
}

#[test]
fn populate_for_write_before_the_vcpus_run_leaves_no_cow_slot() {
    let (mf, be, parent, child) = forked_counter();
    // The guarantee: populate the range for write first, and every locked
    // instruction runs natively on a writable page (no exit, no stale store).
    parent.populate(GPA, 2 * MIB, Access::Write).unwrap();
    let (r, inst) = be.installed_at(GPA).unwrap();
    assert!(inst.writable && r.len() == 2 * MIB, "got {r} {inst:?}");
    let p = parent.handle_fault(GPA, Access::Write).unwrap();
    assert_eq!(
        (p.cow_copied, p.cow_taken_over),
        (0, 0),
        "nothing left to break"
    );
    native_write(&be, &mf, native_read(&be, &mf) + 1);
    assert_eq!(native_read(&be, &mf), 11);
    // The child still sees the snapshot.
    let mut buf = [0u8; 8];
    child.read(GPA, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 10);
    parent.check_invariants().unwrap();
    child.check_invariants().unwrap();
}

#[test]
fn populate_refuses_what_the_guest_could_not_do_and_changes_nothing() {
    let (_mf, be, space) = setup("cow-atomicity");
    space
        .map(
            guestmm::mm::MapOpts::anonymous(2 * MIB)
                .fixed(GPA)
                .perms(guestmm::Perms::READ),
        )
        .unwrap();
    let got = space.populate(GPA, 2 * MIB, Access::Write);
    assert!(
        matches!(got, Err(guestmm::mm::MmError::Permission { .. })),
        "got {got:?}"
    );
    let got = space.populate(GPA, 4 * MIB, Access::Read);
    assert!(
        matches!(got, Err(guestmm::mm::MmError::NotMapped { .. })),
        "got {got:?}"
    );
    assert!(be.calls().is_empty() && space.stats().populated_bytes == 0);
    space.populate(GPA, 2 * MIB, Access::Read).unwrap();
    assert!(
        !be.installed_at(GPA).unwrap().1.writable,
        "read-only protection installs read-only"
    );
}
