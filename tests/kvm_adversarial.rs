//! The adversarial guests (`guest/adv_*.S`, issue 9) on real KVM: every
//! instruction class that reaches the lazy-memory exit path (AVX loops,
//! straddles, masked stores, gathers, XSAVE, locked RMWs, lzcnt/tzcnt,
//! string and stack ops, self-modifying code, racing vCPUs, page tables
//! next to slot merges). Each guest must pass lazily, with `eager: true`
//! and with 4 KiB fault-around windows (W4), with the same exit codes and
//! console output. The multi-vCPU guests run `GUESTMM_STRESS_RUNS` times in
//! a row (default 3; `make stress` runs 20).

mod common;
use common::kvm_or_skip;

use std::time::Duration;

use guestmm::kvm::CowMode;
use guestmm::vmm::guests;
use guestmm::vmm::runner::{run_guest, GuestReport, RunOptions};
use kvm_ioctls::Kvm;

/// Runs of each multi-vCPU guest: `GUESTMM_STRESS_RUNS`, default 3.
fn stress_runs() -> u32 {
    std::env::var("GUESTMM_STRESS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn lazy() -> RunOptions {
    RunOptions {
        timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

fn eager() -> RunOptions {
    RunOptions {
        eager: true,
        ..lazy()
    }
}

/// 4 KiB fault-around windows: one exit per page, slots merged constantly.
fn w4() -> RunOptions {
    RunOptions {
        fault_around: 4096,
        fault_around_max: 4096,
        ..lazy()
    }
}

fn run(kvm: &Kvm, name: &str, opts: &RunOptions) -> GuestReport {
    let guest = guests::find(name).unwrap_or_else(|| panic!("no guest {name}"));
    run_guest(kvm, guest, opts).unwrap_or_else(|e| panic!("{name}: could not start: {e}"))
}

/// Whether `r` stopped with the guest's "this host cannot run it" code.
fn unsupported(r: &GuestReport) -> bool {
    let code = guests::find(&r.name).and_then(|g| g.unsupported_exit);
    code.is_some() && r.exit_codes.first().copied().flatten() == code
}

/// Runs `name` in every mode of `modes`; each must pass with the same exit
/// codes and console output as the first. A host that lacks the
/// instructions (the guest's unsupported exit, in every mode) skips.
fn passes_in_every_mode(name: &str, modes: &[(&str, RunOptions)]) {
    let Some(kvm) = kvm_or_skip() else { return };
    let mut first: Option<GuestReport> = None;
    for (mode, opts) in modes {
        let r = run(&kvm, name, opts);
        eprintln!("{mode:5} {}", r.summary_line());
        if let Some(f) = &first {
            assert_eq!(
                r.exit_codes, f.exit_codes,
                "{name} {mode}: exit codes differ from {}",
                modes[0].0
            );
            assert_eq!(
                r.console, f.console,
                "{name} {mode}: console differs from {}",
                modes[0].0
            );
        }
        if unsupported(&r) {
            if first.is_none() {
                eprintln!("skipping {name}: this host lacks the instructions it needs");
            }
        } else {
            assert!(r.passed, "{name} {mode}: {}", r.summary_line());
            assert_eq!(r.leaked_bytes, 0, "{name} {mode}: leaked guest memory");
            assert_eq!(r.slots_after_unmap, 0, "{name} {mode}: memslots left");
        }
        first.get_or_insert(r);
    }
}

fn all_modes() -> Vec<(&'static str, RunOptions)> {
    vec![("lazy", lazy()), ("eager", eager()), ("w4", w4())]
}

#[test]
fn avx_memset_over_fresh_ram() {
    // W4 costs one emulated AVX store per 4 KiB page of 72 MiB (~5 s here):
    // only in `make stress`.
    let mut modes = vec![("lazy", lazy()), ("eager", eager())];
    if stress_runs() >= 10 {
        modes.push(("w4", w4()));
    }
    passes_in_every_mode("adv_memset", &modes);
}

#[test]
fn avx512_stores_masks_scatter_gather() {
    passes_in_every_mode("adv_avx512", &all_modes());
}

#[test]
fn straddling_accesses() {
    passes_in_every_mode("adv_straddle", &all_modes());
}

#[test]
fn masked_stores_past_the_end_of_ram() {
    passes_in_every_mode("adv_masked", &all_modes());
}

#[test]
fn gathers_from_fresh_and_slotless_pages() {
    passes_in_every_mode("adv_gather", &all_modes());
}

#[test]
fn xsave_family_to_and_from_lazy_memory() {
    passes_in_every_mode("adv_xsave", &all_modes());
}

/// An XSAVE area whose AVX state lies in the next fresh window: the operand
/// must be sized from the XCR0 the CPU runs the guest with (under PVM the
/// host's), not only the one the VMM set.
#[test]
fn xsave_area_straddling_a_window_boundary() {
    passes_in_every_mode("adv_xsavewide", &all_modes());
}

#[test]
fn locked_rmws_on_fresh_and_slotless_pages() {
    passes_in_every_mode("adv_locked", &all_modes());
}

#[test]
fn bit_scans_of_never_touched_pages_are_exact() {
    passes_in_every_mode("adv_bitscan", &all_modes());
}

#[test]
fn string_ops_across_fresh_windows_both_directions() {
    passes_in_every_mode("adv_strings", &all_modes());
}

#[test]
fn stack_ops_with_rsp_in_fresh_ram() {
    passes_in_every_mode("adv_stack", &all_modes());
}

#[test]
fn self_modifying_code_in_lazy_ram() {
    passes_in_every_mode("adv_smc", &all_modes());
}

/// Runs `name` with `vcpus` vCPUs `stress_runs()` times lazily and with W4
/// (and once eagerly); every run must pass.
fn stress(name: &str, vcpus: u32) {
    let Some(kvm) = kvm_or_skip() else { return };
    let runs = stress_runs();
    let mut failures = Vec::new();
    let mut modes = vec![("eager", eager())];
    for _ in 0..runs {
        modes.push(("lazy", lazy()));
        modes.push(("w4", w4()));
    }
    for (mode, opts) in &modes {
        let opts = RunOptions {
            vcpus: Some(vcpus),
            ..opts.clone()
        };
        let r = run(&kvm, name, &opts);
        if unsupported(&r) {
            eprintln!("skipping {name}: this host lacks the instructions it needs");
            return;
        }
        if !r.passed || r.leaked_bytes != 0 {
            failures.push(format!("{mode}: {}", r.summary_line()));
        }
    }
    eprintln!(
        "stress {name} x{vcpus}: {} runs ({runs} lazy, {runs} w4, 1 eager), {} failed",
        modes.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{name} x{vcpus}: {failures:#?}");
}

#[test]
fn racing_avx_stores_2_vcpus() {
    stress("adv_smpavx", 2);
}

#[test]
fn racing_avx_stores_4_vcpus() {
    stress("adv_smpavx", 4);
}

#[test]
fn page_tables_next_to_slot_merges_2_vcpus() {
    stress("adv_smppt", 2);
}

#[test]
fn page_tables_next_to_slot_merges_4_vcpus() {
    stress("adv_smppt", 4);
}

/// `lock inc` on copy-on-write template pages. With userfaultfd
/// write-protect (`CowMode::UserfaultfdWp`, the default where available)
/// the instructions run natively on the broken page: no update may be
/// lost. With read-only slots KVM emulates them against the old page and
/// updates are lost (the documented limitation of that mode): the count
/// is printed, and every run must complete. (4 KiB windows are left to
/// `make stress`: with 4 vCPUs on 2 cores each write-protect fault waits
/// for every spinning vCPU to be scheduled, seconds per run.)
fn cowsmp(vcpus: u32) {
    let Some(kvm) = kvm_or_skip() else { return };
    let runs = stress_runs();
    let ro_slots = RunOptions {
        cow: CowMode::ReadOnlySlots,
        ..lazy()
    };
    let mut modes = vec![("lazy", lazy()), ("ro-slots", ro_slots)];
    if runs > 3 {
        modes.push(("w4", w4()));
    }
    let mut lost = Vec::new();
    for (mode, opts) in modes {
        for _ in 0..runs {
            let opts = RunOptions {
                vcpus: Some(vcpus),
                ..opts.clone()
            };
            let r = run(&kvm, "adv_cowsmp", &opts);
            assert!(r.passed, "{mode}: {}", r.summary_line());
            let n: u64 = r
                .console
                .strip_prefix("lost ")
                .and_then(|s| s.trim_end().parse().ok())
                .unwrap_or_else(|| panic!("{mode}: console {:?}", r.console));
            if r.vm.cow_mode == CowMode::UserfaultfdWp {
                assert_eq!(n, 0, "{mode}: updates lost with write-protected COW");
            }
            lost.push((mode, r.vm.cow_mode, n));
        }
    }
    let total = 16 * 4096 * u64::from(vcpus);
    eprintln!(
        "cowsmp x{vcpus}: lost updates per run (of {total} increments): {:?}",
        lost
    );
}

#[test]
fn cow_lock_inc_2_vcpus_completes() {
    cowsmp(2);
}

#[test]
fn cow_lock_inc_4_vcpus_completes() {
    cowsmp(4);
}

/// AVX stores streaming over RAM that a host thread decommits every 2 ms
/// (slots deleted, pages dropped under the vCPUs): no healthy vCPU is ever
/// stopped, with the default windows and with 64 KiB ones (with 4 KiB
/// windows every store is an exit and a decommit every 2 ms undoes them
/// faster than they are made: it is slow, not wrong), `stress_runs()`
/// times each.
fn decommit_interference(vcpus: u32) {
    let Some(kvm) = kvm_or_skip() else { return };
    let w64 = RunOptions {
        fault_around: 64 << 10,
        fault_around_max: 64 << 10,
        ..lazy()
    };
    for (mode, base) in [("lazy", lazy()), ("w64", w64)] {
        for _ in 0..stress_runs() {
            let opts = RunOptions {
                vcpus: Some(vcpus),
                decommit_every: Some(Duration::from_millis(2)),
                ..base.clone()
            };
            let r = run(&kvm, "adv_decommit", &opts);
            eprintln!(
                "{mode:5} {} host_decommits={}",
                r.summary_line(),
                r.host_decommits
            );
            if unsupported(&r) {
                return;
            }
            assert!(r.passed, "{mode}: {}", r.summary_line());
            assert!(r.violations.is_empty(), "{mode}: {:?}", r.violations);
            assert!(
                r.host_decommits >= 3,
                "{mode}: only {} decommits happened while the guest ran",
                r.host_decommits
            );
        }
    }
}

#[test]
fn avx_stores_while_the_host_decommits_2_vcpus() {
    decommit_interference(2);
}

#[test]
fn avx_stores_while_the_host_decommits_4_vcpus() {
    decommit_interference(4);
}
