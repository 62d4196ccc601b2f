//! The test guests on real KVM through the library's runner, with the
//! counters the memslot and fault-around policies promise.

mod common;
use common::kvm_or_skip;

use guestmm::kvm::{MergePolicy, ViolationKind, DEFAULT_SLOT_BUDGET};
use guestmm::vmm::boot::{DEFAULT_RAM_BASE, HOLE_GPA};
use guestmm::vmm::guests;
use guestmm::vmm::runner::{run_guest, GuestReport, RunOptions};
use guestmm::{Access, Perms};
use kvm_ioctls::Kvm;

const MIB: u64 = 1 << 20;

fn run(kvm: &Kvm, name: &str, opts: &RunOptions) -> GuestReport {
    let guest = guests::find(name).unwrap_or_else(|| panic!("no guest {name}"));
    run_guest(kvm, guest, opts).unwrap_or_else(|e| panic!("{name}: could not start: {e}"))
}

fn assert_pass(r: &GuestReport) {
    assert!(r.passed, "{}", r.summary_line());
    assert_eq!(r.leaked_bytes, 0, "teardown leaves no guest memory");
    assert_eq!(
        r.slots_after_unmap, 0,
        "unmapping everything leaves no memslot"
    );
}

#[test]
fn hello_prints_its_line() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(&kvm, "hello", &RunOptions::default());
    assert_pass(&r);
    assert_eq!(r.console, "hello from guestmm\n");
}

#[test]
fn sequential_touch_with_2m_fault_around_and_eager_merges_needs_few_exits_and_slots() {
    let Some(kvm) = kvm_or_skip() else { return };
    let opts = RunOptions {
        ram_size: 64 * MIB,
        fault_around: 2 * MIB,
        fault_around_max: 2 * MIB,
        slot_merge: MergePolicy::Eager,
        ..Default::default()
    };
    let r = run(&kvm, "touch", &opts);
    assert_pass(&r);
    assert!(
        r.vm.memory_exits <= 40,
        "got {} memory exits, want <= 40",
        r.vm.memory_exits
    );
    assert!(
        r.vm.slots.live <= 4,
        "got {} live slots at the end, want <= 4",
        r.vm.slots.live
    );
    assert_eq!(
        r.mm.populated_bytes,
        68 * MIB,
        "boot region + all RAM populated"
    );
}

#[test]
fn sequential_touch_under_the_default_slot_budget_deletes_no_slot() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(
        &kvm,
        "touch",
        &RunOptions {
            ram_size: 256 * MIB,
            ..Default::default()
        },
    );
    assert_pass(&r);
    // Geometric windows, one slot each: no merge re-faults anything.
    assert_eq!(r.vm.slots.deletes, 0, "{:?}", r.vm.slots);
    assert!(
        r.vm.slots.max_live <= DEFAULT_SLOT_BUDGET as u64,
        "{:?}",
        r.vm.slots
    );
    assert!(r.vm.memory_exits <= 40, "{:?}", r.vm);
}

#[test]
fn adaptive_fault_around_grows_the_window() {
    let Some(kvm) = kvm_or_skip() else { return };
    let fixed = run(
        &kvm,
        "touch",
        &RunOptions {
            fault_around_max: 2 * MIB,
            ..Default::default()
        },
    );
    let adaptive = run(&kvm, "touch", &RunOptions::default());
    assert_pass(&fixed);
    assert_pass(&adaptive);
    assert!(
        adaptive.vm.memory_exits * 3 < fixed.vm.memory_exits,
        "adaptive {} exits vs fixed {}",
        adaptive.vm.memory_exits,
        fixed.vm.memory_exits
    );
}

#[test]
fn scatter_with_4k_windows_exits_once_per_page() {
    let Some(kvm) = kvm_or_skip() else { return };
    let opts = RunOptions {
        ram_size: 4 * MIB,
        fault_around: 4096,
        fault_around_max: 4096,
        ..Default::default()
    };
    let r = run(&kvm, "scatter", &opts);
    assert_pass(&r);
    assert_eq!(r.vm.memory_exits, 1024, "one exit per 4 KiB page of 4 MiB");
}

#[test]
fn cow_guest_breaks_cow_and_leaves_the_file() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(&kvm, "cow", &RunOptions::default());
    assert_pass(&r);
    assert!(
        r.mm.cow_copies >= 1,
        "got {} COW copies, want >= 1",
        r.mm.cow_copies
    );
}

#[test]
fn protect_guest_yields_exactly_two_violations() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(&kvm, "protect", &RunOptions::default());
    assert_pass(&r);
    let got: Vec<(u64, Access, ViolationKind)> = r
        .violations
        .iter()
        .map(|v| (v.gpa, v.access, v.kind))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                DEFAULT_RAM_BASE,
                Access::Write,
                ViolationKind::Permission {
                    allowed: Perms::READ
                }
            ),
            (HOLE_GPA, Access::Read, ViolationKind::Unmapped),
        ]
    );
}

#[test]
fn exec_runs_code_from_lazy_memory() {
    let Some(kvm) = kvm_or_skip() else { return };
    assert_pass(&run(&kvm, "exec", &RunOptions::default()));
}

#[test]
fn lazypt_uses_page_tables_in_lazy_memory() {
    let Some(kvm) = kvm_or_skip() else { return };
    assert_pass(&run(&kvm, "lazypt", &RunOptions::default()));
}

#[test]
fn smp_passes_20_runs_in_a_row() {
    let Some(kvm) = kvm_or_skip() else { return };
    for i in 0..20 {
        let r = run(&kvm, "smp", &RunOptions::default());
        assert!(r.passed, "run {i}: {}", r.summary_line());
        assert_eq!(r.leaked_bytes, 0);
    }
}

#[test]
fn slot_exhaustion_stops_the_guest_with_a_clear_error() {
    let Some(kvm) = kvm_or_skip() else { return };
    let opts = RunOptions {
        fault_around: 4096,
        fault_around_max: 4096,
        max_slots: Some(8),
        ..Default::default()
    };
    let r = run(&kvm, "scatter", &opts);
    assert!(!r.passed, "must fail: {}", r.summary_line());
    let why = r.failure.clone().unwrap_or_default();
    assert!(
        why.contains("out of memory slots: all 8 are in use"),
        "got failure {why:?}"
    );
    assert!(r.vm.slots.max_live <= 8);
    assert_eq!(r.leaked_bytes, 0);
    assert_eq!(r.slots_after_unmap, 0);
}

#[test]
fn memory_file_cap_stops_the_guest_with_a_clear_error() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(
        &kvm,
        "touch",
        &RunOptions {
            memfile_max: Some(16 * MIB),
            ..Default::default()
        },
    );
    assert!(!r.passed, "must fail: {}", r.summary_line());
    let why = r.failure.clone().unwrap_or_default();
    assert!(
        why.contains("out of memory") && why.contains("limited to 0x1000000"),
        "got failure {why:?}"
    );
    assert_eq!(r.leaked_bytes, 0);
}

#[test]
fn eager_mode_registers_ram_up_front() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(
        &kvm,
        "touch",
        &RunOptions {
            eager: true,
            ..Default::default()
        },
    );
    assert_pass(&r);
    assert_eq!(r.vm.memory_exits, 0, "eager RAM never exits");
    assert_eq!(r.vm.slots.adds, 2, "one slot for boot, one for RAM");
}

#[test]
fn sgdt_and_sidt_into_fresh_pages_are_rescued_by_the_watchdog() {
    let Some(kvm) = kvm_or_skip() else { return };
    let r = run(&kvm, "sgdt", &RunOptions::default());
    assert_pass(&r);
    // Whether KVM exits for these depends on the host; where it does not,
    // only the watchdog populates the operand, once per fresh window.
    if r.vm.memory_exits + r.vm.emulation_failures == 0 {
        assert!(
            r.vm.watchdog_populated >= 3,
            "no exits and {} watchdog populates: {:?}",
            r.vm.watchdog_populated,
            r.vm
        );
    }
}
