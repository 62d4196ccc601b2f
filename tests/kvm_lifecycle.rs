//! Snapshot, restore (with and without working-set replay), diff snapshots
//! and clones on real KVM, with the `lifecycle` guest: every restored or
//! cloned copy checks its memory, registers and counter and must EXIT 0.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use guestmm::kvm::{
    CloneOptions, LifecycleError, RestoreOptions, Restored, SnapshotMode, Vm, WorkingSetMode,
};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::snapshot::{working_set_path, Snapshot, SnapshotError, WorkingSet};
use guestmm::vmm::guests;
use guestmm::vmm::lifecycle::{boot_to_mark, run_until, LIFECYCLE_MARK};
use guestmm::vmm::runner::RunOptions;
use kvm_ioctls::Kvm;

const TIMEOUT: Duration = Duration::from_secs(60);

fn opts(ram_mib: u64) -> RunOptions {
    RunOptions {
        ram_size: ram_mib << 20,
        timeout: TIMEOUT,
        ..RunOptions::default()
    }
}

/// A snapshot path in the temp dir, removed (with its working set) on drop.
struct TempSnap(PathBuf);

impl TempSnap {
    fn new(tag: &str) -> TempSnap {
        TempSnap(
            std::env::temp_dir().join(format!("guestmm-test-{tag}-{}.snap", std::process::id())),
        )
    }
}

impl Drop for TempSnap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(working_set_path(&self.0));
    }
}

fn memfile() -> Arc<MemoryFile> {
    Arc::new(MemoryFile::new("lifecycle-test", MemoryFileOptions::default()).unwrap())
}

fn restore(kvm: &Kvm, path: &std::path::Path, mode: WorkingSetMode) -> Restored {
    Vm::restore(
        kvm,
        memfile(),
        path,
        RestoreOptions {
            working_set: mode,
            ..RestoreOptions::default()
        },
    )
    .unwrap()
}

/// Runs the only vCPU of `r` to its EXIT; panics unless it is 0.
fn run_to_exit(r: &mut Restored) {
    let out = run_until(&mut r.vcpus[0], None, TIMEOUT);
    assert_eq!(out.exit_failure(), None, "restored guest: {out:?}");
}

#[test]
fn snapshot_then_restore_record_and_replay() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let snap = TempSnap::new("restore");
    let (vm, mut vcpus, mf, out) = boot_to_mark(&kvm, guest, &opts(64), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark, "{out:?}");
    let usage_before = mf.allocated_bytes();
    let committed_before = vm.space().stats().committed_bytes;
    let report = vm
        .snapshot(&mut vcpus, &snap.0, SnapshotMode::Full)
        .unwrap();
    assert_eq!(
        mf.allocated_bytes(),
        usage_before,
        "saving allocated memory"
    );
    assert_eq!(
        vm.space().stats().committed_bytes,
        committed_before,
        "saving committed memory"
    );
    // The working set is 32 MiB of non-zero pages: the file holds those
    // (plus a few pages of metadata and boot memory), not 64 MiB.
    assert!(report.data_bytes_written >= 32 << 20, "{report:?}");
    assert!(report.file_blocks_bytes < 40 << 20, "{report:?}");
    // The original runs on unharmed.
    let rest = run_until(&mut vcpus[0], None, TIMEOUT);
    assert_eq!(rest.exit_failure(), None);
    drop(vcpus);
    drop(vm);

    let mut first = restore(&kvm, &snap.0, WorkingSetMode::Record);
    assert_eq!(first.prefetched_windows, 0);
    run_to_exit(&mut first);
    let first_exits = first.vm.stats().memory_exits;
    let recorded = first.vm.save_working_set(&snap.0).unwrap();
    assert!(recorded > 0, "no window recorded");
    assert_eq!(
        WorkingSet::load(&working_set_path(&snap.0))
            .unwrap()
            .windows
            .len(),
        recorded
    );
    first.vm.space().check_invariants().unwrap();

    let mut second = restore(&kvm, &snap.0, WorkingSetMode::Replay);
    assert_eq!(second.prefetched_windows, recorded);
    assert!(second.prefetched_bytes >= 32 << 20);
    run_to_exit(&mut second);
    let second_exits = second.vm.stats().memory_exits;
    assert!(
        second_exits * 4 < first_exits.max(1),
        "replay: {second_exits} memory exits, recording run {first_exits}"
    );
    second.vm.space().check_invariants().unwrap();
}

#[test]
fn diff_snapshot_restores_over_its_base() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let (base, diff) = (TempSnap::new("base"), TempSnap::new("diff"));
    let (vm, mut vcpus, _mf, out) = boot_to_mark(&kvm, guest, &opts(64), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark);
    // A diff without tracking since the base is refused.
    assert!(matches!(
        vm.snapshot(
            &mut vcpus,
            &diff.0,
            SnapshotMode::Diff {
                base: base.0.clone()
            }
        ),
        Err(LifecycleError::NotTracking)
    ));
    vm.start_dirty_tracking().unwrap();
    let full = vm
        .snapshot(&mut vcpus, &base.0, SnapshotMode::Full)
        .unwrap();
    // MARK 11: the counter (page 0 of RAM) went from 1 to 2.
    let out = run_until(&mut vcpus[0], Some(11), TIMEOUT);
    assert!(out.at_mark, "{out:?}");
    let d = vm
        .snapshot(
            &mut vcpus,
            &diff.0,
            SnapshotMode::Diff {
                base: base.0.clone(),
            },
        )
        .unwrap();
    assert!(d.data_bytes_written > 0, "the counter page is dirty");
    assert!(
        d.data_bytes_written <= 64 << 10,
        "diff wrote {} bytes (base {})",
        d.data_bytes_written,
        full.data_bytes_written
    );
    assert!(Snapshot::open(&diff.0).unwrap().is_diff());
    // The restored diff continues from MARK 11 and checks counter == 2 at
    // its end (exit 8 if the diff lost it), reading the rest from the base.
    let mut r = restore(&kvm, &diff.0, WorkingSetMode::Off);
    run_to_exit(&mut r);
    r.vm.space().check_invariants().unwrap();
    drop(r);

    // MARK 12: the guest wrote a quarter of its working set. A second diff
    // against the same base holds the first one's pages too (a host take
    // in between does not lose them): restored over the base alone, its
    // RAM equals the original's.
    let out = run_until(&mut vcpus[0], Some(12), TIMEOUT);
    assert!(out.at_mark, "{out:?}");
    // Even through the address space, a take does not rob the next diff.
    assert!(!vm.space().take_dirty().unwrap().is_empty());
    let diff2 = TempSnap::new("diff2");
    let d2 = vm
        .snapshot(
            &mut vcpus,
            &diff2.0,
            SnapshotMode::Diff {
                base: base.0.clone(),
            },
        )
        .unwrap();
    assert!(d2.data_bytes_written >= 8 << 20, "{d2:?}");
    let ram = |space: &guestmm::mm::AddressSpace| {
        let mut buf = vec![0u8; 64 << 20];
        space
            .read_with(1 << 30, &mut buf, guestmm::mm::IoOpts::FORCE)
            .unwrap();
        buf
    };
    let want = ram(vm.space());
    let r2 = restore(&kvm, &diff2.0, WorkingSetMode::Off);
    assert!(
        ram(r2.vm.space()) == want,
        "RAM restored from the second diff differs"
    );
    drop(r2);
    // Tracking restarted: the old base no longer qualifies.
    vm.stop_dirty_tracking();
    vm.start_dirty_tracking().unwrap();
    let err = vm.snapshot(
        &mut vcpus,
        &diff.0,
        SnapshotMode::Diff {
            base: base.0.clone(),
        },
    );
    assert!(
        matches!(err, Err(LifecycleError::NotTrackedSince { .. })),
        "{err:?}"
    );
}

#[test]
fn clones_run_on_their_own_memory() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let (vm, mut vcpus, mf, out) = boot_to_mark(&kvm, guest, &opts(64), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark);
    let shared = mf.allocated_bytes();
    let mut clones: Vec<_> = (0..3)
        .map(|_| {
            vm.clone_vm(&kvm, &mut vcpus, CloneOptions::default())
                .unwrap()
        })
        .collect();
    // Cloning copies no memory.
    assert!(
        mf.allocated_bytes() < shared + (4 << 20),
        "clones allocated {} bytes",
        mf.allocated_bytes() - shared
    );
    for c in &mut clones {
        let out = run_until(&mut c.vcpus[0], None, TIMEOUT);
        assert_eq!(out.exit_failure(), None, "clone: {out:?}");
        c.vm.space().check_invariants().unwrap();
    }
    // The parent still sees its own memory (counter 1, pattern) and passes.
    let out = run_until(&mut vcpus[0], None, TIMEOUT);
    assert_eq!(out.exit_failure(), None, "parent: {out:?}");
    // A clone of a VM with the wrong vCPU list is refused.
    let err = vm.clone_vm(&kvm, &mut [], CloneOptions::default());
    assert!(matches!(err, Err(LifecycleError::Vcpus { .. })), "{err:?}");
    drop(clones);
    drop(vcpus);
    vm.space().unmap(0, vm.space().options().size).unwrap();
    drop(vm);
    assert_eq!(mf.allocated_bytes(), 0, "memory left after teardown");
}

#[test]
fn restore_refuses_a_corrupt_snapshot_and_leaves_nothing() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let snap = TempSnap::new("corrupt");
    let (vm, mut vcpus, _mf, out) = boot_to_mark(&kvm, guest, &opts(8), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark);
    vm.snapshot(&mut vcpus, &snap.0, SnapshotMode::Full)
        .unwrap();
    drop(vcpus);
    drop(vm);
    let mut bytes = std::fs::read(&snap.0).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&snap.0, &bytes).unwrap();
    let mf = memfile();
    let err = Vm::restore(&kvm, mf.clone(), &snap.0, RestoreOptions::default());
    assert!(
        matches!(err, Err(LifecycleError::Snapshot(SnapshotError::BadMagic))),
        "{err:?}"
    );
    assert_eq!(mf.allocated_bytes(), 0);
    // Cut short: truncated.
    bytes[0] ^= 0xff;
    std::fs::write(&snap.0, &bytes[..bytes.len() / 2]).unwrap();
    let err = Vm::restore(&kvm, mf.clone(), &snap.0, RestoreOptions::default());
    assert!(
        matches!(
            err,
            Err(LifecycleError::Snapshot(SnapshotError::Truncated { .. }))
        ),
        "{err:?}"
    );
}

#[test]
fn a_parent_protected_by_read_only_slots_and_its_clone_both_pass() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let (vm, mut vcpus, _mf, out) = boot_to_mark(&kvm, guest, &opts(64), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark);
    let mut c = vm
        .clone_vm(
            &kvm,
            &mut vcpus,
            CloneOptions {
                parent: guestmm::mm::ParentProtection::ReadOnly,
                ..CloneOptions::default()
            },
        )
        .unwrap();
    // The parent first: its writes must not reach the clone.
    let out = run_until(&mut vcpus[0], None, TIMEOUT);
    assert_eq!(out.exit_failure(), None, "parent: {out:?}");
    let out = run_until(&mut c.vcpus[0], None, TIMEOUT);
    assert_eq!(out.exit_failure(), None, "clone: {out:?}");
    vm.space().check_invariants().unwrap();
    c.vm.space().check_invariants().unwrap();
}

#[test]
fn a_diff_across_a_layout_change_is_refused() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let (base, diff) = (TempSnap::new("lbase"), TempSnap::new("ldiff"));
    let (vm, mut vcpus, _mf, out) = boot_to_mark(&kvm, guest, &opts(8), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark);
    vm.start_dirty_tracking().unwrap();
    vm.snapshot(&mut vcpus, &base.0, SnapshotMode::Full)
        .unwrap();
    // A new vma since the base: pages the diff does not hold would read
    // the base's (nothing there) instead of the new mapping's.
    vm.space()
        .map(guestmm::mm::MapOpts::anonymous(2 << 20).fixed(8 << 30))
        .unwrap();
    let err = vm.snapshot(
        &mut vcpus,
        &diff.0,
        SnapshotMode::Diff {
            base: base.0.clone(),
        },
    );
    assert!(
        matches!(err, Err(LifecycleError::LayoutChanged { .. })),
        "{err:?}"
    );
    assert!(!diff.0.exists());
    // Saving a working set when not recording would replace a good record
    // with an empty one.
    assert!(matches!(
        vm.save_working_set(&base.0),
        Err(LifecycleError::NotRecording)
    ));
}

/// A VM with an in-kernel irqchip and PIT: a restore and a clone recreate
/// both before the vCPUs, with the saved PIC, IOAPIC, PIT and LAPIC state.
#[test]
fn an_irqchip_and_pit_travel_through_snapshots_and_clones() {
    use guestmm::kvm::{VcpuState, VmState};
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let snap = TempSnap::new("irqchip");
    let irq = Vm::new(&kvm, memfile(), guestmm::kvm::VmOptions::default()).unwrap();
    irq.vm_fd().create_irq_chip().unwrap();
    irq.vm_fd()
        .create_pit2(kvm_bindings::kvm_pit_config::default())
        .unwrap();
    irq.space()
        .map(
            guestmm::mm::MapOpts::anonymous(2 << 20)
                .fixed(0)
                .name("ram"),
        )
        .unwrap();
    let mut v = vec![irq.create_vcpu(0).unwrap()];
    // Distinctive state: the IOAPIC's first redirection entry, the PIT's
    // channel 0 count, the LAPIC's task priority.
    let mut ioapic = kvm_bindings::kvm_irqchip {
        chip_id: 2,
        ..Default::default()
    };
    irq.vm_fd().get_irqchip(&mut ioapic).unwrap();
    // SAFETY: chip 2 is the IOAPIC member of the union.
    unsafe { ioapic.chip.ioapic.redirtbl[0].bits = 0x1_0000_00a5 };
    irq.vm_fd().set_irqchip(&ioapic).unwrap();
    let mut pit = irq.vm_fd().get_pit2().unwrap();
    pit.channels[0].count = 0x1234;
    irq.vm_fd().set_pit2(&pit).unwrap();
    let mut lapic = v[0].fd().get_lapic().unwrap();
    lapic.regs[0x80] = 0x30; // TPR
    v[0].fd().set_lapic(&lapic).unwrap();

    let saved_vm = VmState::save(irq.vm_fd()).unwrap();
    assert!(saved_vm.has_irqchip() && saved_vm.has_pit());
    let saved_vcpu = v[0].save_state().unwrap();
    irq.snapshot(&mut v, &snap.0, SnapshotMode::Full).unwrap();
    let mut r = restore(&kvm, &snap.0, WorkingSetMode::Off);
    let c = irq.clone_vm(&kvm, &mut v, CloneOptions::default()).unwrap();
    for (what, vm, vcpu) in [
        ("restored", &r.vm, &mut r.vcpus[0]),
        ("clone", &c.vm, &mut { c.vcpus }[0]),
    ] {
        let got = VmState::save(vm.vm_fd()).unwrap();
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: 2,
            ..Default::default()
        };
        vm.vm_fd().get_irqchip(&mut chip).unwrap();
        // SAFETY: chip 2 is the IOAPIC member of the union.
        let entry = unsafe { chip.chip.ioapic.redirtbl[0].bits };
        assert_eq!(entry, 0x1_0000_00a5, "{what}: IOAPIC");
        assert_eq!(
            vm.vm_fd().get_pit2().unwrap().channels[0].count,
            0x1234,
            "{what}: PIT"
        );
        assert!(got.has_irqchip() && got.has_pit(), "{what}");
        let state: VcpuState = vcpu.save_state().unwrap();
        assert_eq!(state.lapic().unwrap().regs[0x80], 0x30, "{what}: LAPIC TPR");
        assert_eq!(state.regs(), saved_vcpu.regs(), "{what}: registers");
    }
}

#[test]
fn a_new_snapshot_drops_the_working_set_of_the_file_it_replaces() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let guest = guests::find("lifecycle").unwrap();
    let snap = TempSnap::new("stale");
    let (vm, mut vcpus, _mf, out) = boot_to_mark(&kvm, guest, &opts(8), LIFECYCLE_MARK).unwrap();
    assert!(out.at_mark);
    vm.snapshot(&mut vcpus, &snap.0, SnapshotMode::Full)
        .unwrap();
    let mut r = restore(&kvm, &snap.0, WorkingSetMode::Record);
    run_to_exit(&mut r);
    assert!(r.vm.save_working_set(&snap.0).unwrap() > 0);
    assert!(working_set_path(&snap.0).exists());
    vm.snapshot(&mut vcpus, &snap.0, SnapshotMode::Full)
        .unwrap();
    assert!(!working_set_path(&snap.0).exists());
}
