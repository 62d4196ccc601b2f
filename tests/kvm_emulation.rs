//! Emulation failures on real KVM: instructions KVM's emulator cannot
//! complete against lazily populated memory (AVX moves, fetches from and
//! page walks through pages without a memslot) are resolved by guestmm, and
//! an instruction that can never complete is a violation, not a hang.

mod common;
use common::kvm_or_skip;

use std::time::Instant;

use guestmm::kvm::ViolationKind;
use guestmm::vmm::boot::HOLE_GPA;
use guestmm::vmm::guests::{self, Guest};
use guestmm::vmm::runner::{run_guest, GuestReport, RunOptions};

fn guest(name: &str) -> &'static Guest {
    guests::find(name).unwrap_or_else(|| panic!("no guest {name}"))
}

/// True if the guest said the host cannot run it (no AVX).
fn unsupported(g: &Guest, r: &GuestReport) -> bool {
    g.unsupported_exit.is_some() && r.exit_codes.first().copied().flatten() == g.unsupported_exit
}

/// Runs `name` 10 times in a row; every run must pass.
fn ten_runs(name: &str) -> Option<Vec<GuestReport>> {
    let kvm = kvm_or_skip()?;
    let g = guest(name);
    let start = Instant::now();
    let mut reports = Vec::new();
    for i in 0..10 {
        let r = run_guest(&kvm, g, &RunOptions::default())
            .unwrap_or_else(|e| panic!("{name} run {i}: could not start: {e}"));
        if unsupported(g, &r) {
            println!("skipping {name}: unsupported on this host");
            return None;
        }
        assert!(
            r.passed,
            "{name} run {i}: {}",
            r.failure.as_deref().unwrap_or("failed")
        );
        reports.push(r);
    }
    let last = &reports[9];
    println!(
        "{name}: 10 runs in {} ms; last run: {} exits, {} memory exits, {} emulation failures ({} as shutdown)",
        start.elapsed().as_millis(),
        last.vm.exits,
        last.vm.memory_exits,
        last.vm.emulation_failures,
        last.vm.emulation_shutdowns
    );
    Some(reports)
}

#[test]
fn simd_passes_ten_runs_through_emulation_failures() {
    let Some(reports) = ten_runs("simd") else {
        return;
    };
    for (i, r) in reports.iter().enumerate() {
        assert!(
            r.vm.emulation_failures > 0,
            "simd run {i}: no emulation failure resolved (vm {:?})",
            r.vm
        );
    }
}

#[test]
fn lazypt_passes_ten_runs() {
    ten_runs("lazypt");
}

#[test]
fn exec_passes_ten_runs() {
    let Some(reports) = ten_runs("exec") else {
        return;
    };
    for (i, r) in reports.iter().enumerate() {
        assert!(
            r.vm.emulation_failures >= 2,
            "exec run {i}: got {} emulation failures, want the two fetches from slot-less pages",
            r.vm.emulation_failures
        );
    }
}

#[test]
fn a_store_that_can_never_complete_is_a_violation_not_a_hang() {
    let Some(kvm) = kvm_or_skip() else {
        return;
    };
    let g = guest("badstore");
    let start = Instant::now();
    let r = run_guest(&kvm, g, &RunOptions::default()).expect("badstore starts");
    if unsupported(g, &r) {
        println!("skipping badstore: unsupported on this host");
        return;
    }
    let elapsed = start.elapsed();
    assert!(r.passed, "badstore: {}", r.failure.as_deref().unwrap_or(""));
    assert!(
        r.vm.exits < 64,
        "badstore took {} exits, want a bounded handful",
        r.vm.exits
    );
    assert_eq!(r.violations.len(), 2, "violations: {:?}", r.violations);
    for v in &r.violations {
        let insn = v
            .instruction
            .unwrap_or_else(|| panic!("violation without the instruction: {v}"));
        assert!(insn.decoded, "{v}: the store should decode");
        let op = insn.operand.unwrap_or_else(|| panic!("{v}: no operand"));
        assert_eq!(op.size, 32, "{v}: a ymm store is 32 bytes");
        assert_eq!(op.access, guestmm::Access::Write, "{v}");
        match v.vcpu {
            0 => {
                assert_eq!(op.gva, 0x7fff_0000_0000, "{v}");
                assert!(
                    matches!(
                        v.kind,
                        ViolationKind::NotInGuestPageTables {
                            gva: 0x7fff_0000_0000,
                            ..
                        }
                    ),
                    "{v}: want NotInGuestPageTables"
                );
            }
            _ => {
                assert_eq!((op.gva, v.gpa), (HOLE_GPA, HOLE_GPA), "{v}");
                assert_eq!(v.kind, ViolationKind::Unmapped, "{v}");
            }
        }
        println!("reported: {v}");
    }
    println!(
        "badstore: {} exits in {} ms",
        r.vm.exits,
        elapsed.as_millis()
    );
}
