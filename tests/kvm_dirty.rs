//! Dirty tracking on real KVM: a guest stores values where the test tells
//! it to, the host writes, protects, unmaps, decommits and forks, small
//! fault-around windows and a small slot budget force slot merges and
//! splits, and every `Vm::take_dirty` is compared with a model (the pages
//! written since the last take): no written page may be missing, and pages
//! nobody wrote may appear only where documented (decommit, unmap). Runs
//! in both copy-on-write modes and with both merge policies.

mod common;

use common::guest_vm::{boot_vm, GuestVm};
use common::kvm_or_skip;
use common::rng::Rng;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use guestmm::dirty::DirtyPages;
use guestmm::kvm::{CowMode, Exit, MergePolicy, Vcpu, Vm, VmOptions};
use guestmm::mm::{AddressSpace, AddressSpaceOptions, IoOpts, MapOpts, Prefill, RecordingBackend};
use guestmm::uffd::{Features, Userfaultfd};
use guestmm::vmm::boot::DEFAULT_RAM_BASE;
use guestmm::vmm::hypercall::{PORT_EXIT, PORT_MARK};
use guestmm::{Access, Perms, PAGE_SIZE};

/// The guest: `out MARK`; the test sets `rdi` (a GPA, or 0 to stop) and
/// `rsi` (a value); `mov [rdi], rsi`; again. Stops with `out EXIT`.
const STORE_LOOP: &[u8] = &[
    0xe6, 0x12, // loop: out 0x12, al
    0x48, 0x85, 0xff, // test rdi, rdi
    0x74, 0x05, // jz done
    0x48, 0x89, 0x37, // mov [rdi], rsi
    0xeb, 0xf4, // jmp loop
    0xe6, 0x11, // done: out 0x11, al
];

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;

fn wp_available() -> bool {
    match Userfaultfd::open(Features::SHMEM_WP) {
        Ok(_) => true,
        Err(e) if e.is_unavailable() => {
            eprintln!("skipping the userfaultfd runs: write protection unavailable ({e})");
            false
        }
        Err(e) => panic!("opening userfaultfd: {e}"),
    }
}

/// Runs the vCPU to its next MARK; false if the store in between was
/// refused (a violation: the write was dropped).
fn run_to_mark(vcpu: &mut Vcpu) -> bool {
    let mut stored = true;
    loop {
        match vcpu.run().expect("KVM_RUN") {
            Exit::Resolved => {}
            Exit::IoOut { port, .. } if port == PORT_MARK => return stored,
            Exit::Violation(_) => stored = false,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

/// Has the guest store `value` at `gpa`; true if it landed.
fn guest_store(vcpu: &mut Vcpu, gpa: u64, value: u64) -> bool {
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rdi = gpa;
    regs.rsi = value;
    vcpu.fd().set_regs(&regs).unwrap();
    run_to_mark(vcpu)
}

fn stop_guest(vcpu: &mut Vcpu) {
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rdi = 0;
    vcpu.fd().set_regs(&regs).unwrap();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            Exit::Resolved => {}
            Exit::IoOut { port, .. } if port == PORT_EXIT => return,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

fn boot(kvm: &kvm_ioctls::Kvm, cow: CowMode, merge: MergePolicy) -> (Arc<Vm>, Vcpu) {
    let opts = GuestVm {
        vm: VmOptions {
            cow,
            slot_merge: merge,
            fill_dense: None,
            space: AddressSpaceOptions {
                fault_around: PAGE_SIZE,
                fault_around_max: 16 * PAGE_SIZE,
                // Small reservations: the tests of this binary run at once.
                size: 4 << 30,
                ..AddressSpaceOptions::default()
            },
            ..VmOptions::default()
        },
        ..GuestVm::default()
    };
    let (vm, mut vcpus) = boot_vm(kvm, STORE_LOOP, 1, RAM, opts);
    let mut vcpu = vcpus.pop().unwrap();
    assert!(run_to_mark(&mut vcpu), "the guest reaches its first MARK");
    (vm, vcpu)
}

/// What a take must report (`must`: written since the last take) and may
/// report besides (`may`: documented extras), over RAM.
#[derive(Default)]
struct Model {
    must: BTreeSet<u64>,
    may: BTreeSet<u64>,
}

impl Model {
    fn wrote(&mut self, gpa: u64, len: u64) {
        let first = gpa - gpa % PAGE_SIZE;
        for p in (first..gpa + len).step_by(PAGE_SIZE as usize) {
            self.must.insert(p);
        }
    }
    fn may(&mut self, gpa: u64, len: u64) {
        for p in (gpa..gpa + len).step_by(PAGE_SIZE as usize) {
            self.may.insert(p);
        }
    }
    /// Compares a take over RAM (the boot region holds the guest's page
    /// tables, whose accessed/dirty bits the CPU writes: not modelled).
    fn check(&mut self, got: &DirtyPages, what: &str) {
        let ram = DEFAULT_RAM_BASE..DEFAULT_RAM_BASE + RAM;
        let got: BTreeSet<u64> = got.pages().filter(|p| ram.contains(p)).collect();
        let lost: Vec<_> = self.must.difference(&got).collect();
        assert!(lost.is_empty(), "{what}: lost {lost:x?}");
        let extra: Vec<_> = got
            .iter()
            .filter(|p| !self.must.contains(p) && !self.may.contains(p))
            .collect();
        assert!(extra.is_empty(), "{what}: undocumented extras {extra:x?}");
        self.must.clear();
        self.may.clear();
    }
}

#[derive(Default, Debug)]
struct Counts {
    guest: u64,
    refused: u64,
    host: u64,
    takes: u64,
    reported: u64,
}

fn model_run(kvm: &kvm_ioctls::Kvm, cow: CowMode, merge: MergePolicy, seed: u64, steps: usize) {
    let (vm, mut vcpu) = boot(kvm, cow, merge);
    let space = vm.space().clone();
    vm.start_dirty_tracking().unwrap();
    assert!(vm.is_dirty_tracking());
    let what = |step: usize| format!("{cow:?} {merge:?} seed {seed} step {step}");
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let mut n = Counts::default();
    let mut children: Vec<Arc<AddressSpace>> = Vec::new();
    let ram_page = |rng: &mut Rng| {
        // Mostly a dense 2 MiB (adjacent windows: merges), sometimes anywhere.
        let pages = if rng.chance(80) { 512 } else { RAM / PAGE_SIZE };
        DEFAULT_RAM_BASE + rng.below(pages) * PAGE_SIZE
    };
    for step in 0..steps {
        let gpa = ram_page(&mut rng);
        let len = (rng.range(1, 16) * PAGE_SIZE).min(DEFAULT_RAM_BASE + RAM - gpa);
        match rng.below(20) {
            0..=6 => {
                let at = gpa + rng.below(PAGE_SIZE / 8) * 8;
                if guest_store(&mut vcpu, at, step as u64 + 1) {
                    model.wrote(at, 8);
                    n.guest += 1;
                } else {
                    n.refused += 1;
                }
            }
            7 => {
                // A sequential burst: windows grow, neighbours merge.
                for i in 0..len / PAGE_SIZE {
                    let at = gpa + i * PAGE_SIZE;
                    if guest_store(&mut vcpu, at, !(step as u64)) {
                        model.wrote(at, 8);
                        n.guest += 1;
                    }
                }
            }
            8 | 9 => {
                let off = rng.below(PAGE_SIZE);
                let bytes = vec![step as u8; rng.range(1, 2 * PAGE_SIZE) as usize];
                let bytes = &bytes[..bytes
                    .len()
                    .min((DEFAULT_RAM_BASE + RAM - gpa - off) as usize)];
                if space
                    .write_with(gpa + off, bytes, IoOpts::default())
                    .is_ok()
                {
                    model.wrote(gpa + off, bytes.len() as u64);
                    n.host += 1;
                }
            }
            10 | 11 => {
                let perms = rng.pick(&[Perms::READ, Perms::NONE, Perms::ALL, Perms::ALL]);
                space.protect(gpa, len, perms).unwrap();
            }
            12 => {
                space.unmap(gpa, len).unwrap();
                space
                    .map(MapOpts::anonymous(len).fixed(gpa).perms(Perms::ALL))
                    .unwrap();
                model.may(gpa, len);
            }
            13 => {
                // Whole range must be mapped: it always is (unmap remaps).
                space.decommit(gpa, len).unwrap();
                model.may(gpa, len);
            }
            14 => {
                let child = space.fork(Arc::new(RecordingBackend::new())).unwrap();
                if rng.chance(50) {
                    let _ = child.write(gpa, b"child writes are its own");
                    children.push(child);
                }
                if children.len() > 2 {
                    children.remove(0);
                }
            }
            15 => {
                if space.handle_fault(gpa, Access::Write).is_ok() {
                    // Populating changes no content.
                }
            }
            _ => {
                let got = vm.take_dirty().unwrap();
                n.takes += 1;
                n.reported += got.page_count();
                model.check(&got, &what(step));
            }
        }
        space
            .check_invariants()
            .unwrap_or_else(|e| panic!("{}: {e}", what(step)));
        vm.slots()
            .check_invariants()
            .unwrap_or_else(|e| panic!("{}: {e}", what(step)));
    }
    let got = vm.take_dirty().unwrap();
    model.check(&got, &what(steps));
    let stats = vm.slots().stats();
    assert!(stats.dirty_harvests > 0);
    eprintln!(
        "{cow:?} {merge:?} seed {seed}: {n:?}, slots added {} deleted {} (harvested on delete {}), max live {}",
        stats.adds, stats.deletes, stats.dirty_harvests_on_delete, stats.max_live
    );
    vm.stop_dirty_tracking();
    assert!(!vm.is_dirty_tracking());
    // Stopped: a store (landing or refused) is not reported.
    let _ = guest_store(&mut vcpu, DEFAULT_RAM_BASE, 1);
    assert!(vm.take_dirty().unwrap().is_empty(), "stopped: nothing");
    stop_guest(&mut vcpu);
}

fn modes() -> Vec<CowMode> {
    let mut m = vec![CowMode::ReadOnlySlots];
    if wp_available() {
        m.push(CowMode::UserfaultfdWp);
    }
    m
}

#[test]
fn model_lazy_merges() {
    let Some(kvm) = kvm_or_skip() else { return };
    for cow in modes() {
        for seed in 1..=3 {
            model_run(&kvm, cow, MergePolicy::Lazy { max_slots: 6 }, seed, 250);
        }
    }
}

#[test]
fn model_eager_merges() {
    let Some(kvm) = kvm_or_skip() else { return };
    for cow in modes() {
        for seed in 11..=13 {
            model_run(&kvm, cow, MergePolicy::Eager, seed, 250);
        }
    }
}

/// The simplest case, spelled out: guest stores are reported exactly, and
/// a slot merged away between two takes keeps its bits.
#[test]
fn guest_stores_survive_a_merge() {
    let Some(kvm) = kvm_or_skip() else { return };
    for cow in modes() {
        let (vm, mut vcpu) = boot(&kvm, cow, MergePolicy::Lazy { max_slots: 2 });
        vm.start_dirty_tracking().unwrap();
        let a = DEFAULT_RAM_BASE + 64 * PAGE_SIZE;
        assert!(guest_store(&mut vcpu, a, 7));
        let deletes = vm.slots().stats().deletes;
        // Adjacent windows past the budget: the first one's slot merges.
        for i in 1..8 {
            assert!(guest_store(&mut vcpu, a + i * PAGE_SIZE, 8));
        }
        let stats = vm.slots().stats();
        assert!(stats.deletes > deletes, "a merge happened: {stats:?}");
        assert!(stats.dirty_harvests_on_delete > 0);
        let got = vm.take_dirty().unwrap();
        let ram: Vec<u64> = got.pages().filter(|&p| p >= DEFAULT_RAM_BASE).collect();
        let want: Vec<u64> = (0..8).map(|i| a + i * PAGE_SIZE).collect();
        assert_eq!(ram, want, "{cow:?}");
        stop_guest(&mut vcpu);
    }
}

/// What a take costs over 1 GiB of writable slots (KVM_GET_DIRTY_LOG per
/// slot), with nothing and with 256 scattered guest stores dirty.
#[test]
fn take_dirty_cost_over_1g_of_slots() {
    let Some(kvm) = kvm_or_skip() else { return };
    let opts = GuestVm {
        vm: VmOptions {
            cow: CowMode::ReadOnlySlots,
            fill_dense: None,
            space: AddressSpaceOptions {
                prefill: Prefill::Never,
                size: 4 << 30,
                ..AddressSpaceOptions::default()
            },
            ..VmOptions::default()
        },
        ..GuestVm::default()
    };
    const GIB: u64 = 1 << 30;
    let (vm, mut vcpus) = boot_vm(&kvm, STORE_LOOP, 1, GIB, opts);
    let mut vcpu = vcpus.pop().unwrap();
    assert!(run_to_mark(&mut vcpu));
    // Sequential faults grow windows to 1 GiB: the RAM is installed in a
    // few slots without committing it.
    let mut at = DEFAULT_RAM_BASE;
    while at < DEFAULT_RAM_BASE + GIB {
        let p = vm.space().handle_fault(at, Access::Write).unwrap();
        at = p.window.end();
    }
    let slots = vm.slots().slots();
    let covered: u64 = slots.iter().filter(|(_, w)| *w).map(|(r, _)| r.len()).sum();
    assert!(covered >= GIB, "{slots:?}");
    let t = Instant::now();
    vm.start_dirty_tracking().unwrap();
    let start = t.elapsed();
    let t = Instant::now();
    let empty = vm.take_dirty().unwrap();
    let take_empty = t.elapsed();
    assert!(empty.pages().all(|p| p < DEFAULT_RAM_BASE), "{empty:?}");
    let mut rng = Rng(7);
    let mut want = BTreeSet::new();
    for _ in 0..256 {
        let gpa = DEFAULT_RAM_BASE + rng.below(GIB / PAGE_SIZE) * PAGE_SIZE;
        assert!(guest_store(&mut vcpu, gpa, 1));
        want.insert(gpa);
    }
    let t = Instant::now();
    let got = vm.take_dirty().unwrap();
    let take_256 = t.elapsed();
    let ram: BTreeSet<u64> = got.pages().filter(|&p| p >= DEFAULT_RAM_BASE).collect();
    assert_eq!(ram, want);
    const ROUNDS: u32 = 20;
    let t = Instant::now();
    for _ in 0..ROUNDS {
        vm.take_dirty().unwrap();
    }
    let take_avg = t.elapsed() / ROUNDS;
    eprintln!(
        "dirty 1g: {} writable slots; start {start:?}, take (nothing dirty) {take_empty:?}, \
         take (256 pages) {take_256:?}, take avg of {ROUNDS} {take_avg:?}",
        slots.iter().filter(|(_, w)| *w).count()
    );
    vm.stop_dirty_tracking();
    stop_guest(&mut vcpu);
}

/// The guest for the concurrent check: lap after lap (`rax` = lap number)
/// it stores the lap in the first word of each of `rsi` pages from `rdi`,
/// spinning a while after each store. Never exits by itself.
const LAPS: &[u8] = &[
    0x48, 0xff, 0xc0, // outer: inc rax
    0x31, 0xc9, // xor ecx, ecx
    0x48, 0x89, 0xca, // inner: mov rdx, rcx
    0x48, 0xc1, 0xe2, 0x0c, // shl rdx, 12
    0x48, 0x89, 0x04, 0x17, // mov [rdi+rdx], rax
    0x41, 0xb8, 0x10, 0x27, 0x00, 0x00, // mov r8d, 10000
    0x49, 0xff, 0xc8, // d: dec r8
    0x75, 0xfb, // jnz d
    0x48, 0xff, 0xc1, // inc rcx
    0x48, 0x39, 0xf1, // cmp rcx, rsi
    0x72, 0xe2, // jb inner
    0xeb, 0xdb, // jmp outer
];

/// A vCPU writes on its own thread while the host takes, reads and
/// changes slots (protect splits, forks, installs that merge): every page
/// whose content changed between two reads is reported by the take between
/// them or by the next one (KVM's log is harvested without pausing, and
/// before each slot deletion with the vCPUs out).
#[test]
fn concurrent_takes_and_slot_changes_lose_nothing() {
    let Some(kvm) = kvm_or_skip() else { return };
    const PAGES: u64 = 64;
    const ROUNDS: usize = 100;
    for cow in modes() {
        let opts = GuestVm {
            vm: VmOptions {
                cow,
                slot_merge: MergePolicy::Lazy { max_slots: 4 },
                fill_dense: None,
                space: AddressSpaceOptions {
                    fault_around: PAGE_SIZE,
                    fault_around_max: 4 * PAGE_SIZE,
                    size: 4 << 30,
                    ..AddressSpaceOptions::default()
                },
                ..VmOptions::default()
            },
            ..GuestVm::default()
        };
        let (vm, mut vcpus) = boot_vm(&kvm, LAPS, 1, RAM, opts);
        let mut vcpu = vcpus.pop().unwrap();
        let base = DEFAULT_RAM_BASE + MIB;
        let mut regs = vcpu.fd().get_regs().unwrap();
        regs.rdi = base;
        regs.rsi = PAGES;
        regs.rax = 0;
        vcpu.fd().set_regs(&regs).unwrap();
        let space = vm.space().clone();
        vm.start_dirty_tracking().unwrap();
        let kicker = vcpu.kicker();
        let runner = std::thread::spawn(move || loop {
            match vcpu.run().expect("KVM_RUN") {
                Exit::Resolved | Exit::Violation(_) => {}
                Exit::Kicked | Exit::Stopped => return,
                other => panic!("unexpected exit {other:?}"),
            }
        });
        let read_all = || -> Vec<u64> {
            (0..PAGES)
                .map(|i| {
                    let mut b = [0u8; 8];
                    space
                        .read_with(base + i * PAGE_SIZE, &mut b, IoOpts::FORCE)
                        .unwrap();
                    u64::from_le_bytes(b)
                })
                .collect()
        };
        let mut rng = Rng(99);
        let mut takes: Vec<DirtyPages> = vec![vm.take_dirty().unwrap()];
        let mut reads: Vec<Vec<u64>> = vec![read_all()];
        let mut forks = 0;
        for _ in 0..ROUNDS {
            match rng.below(4) {
                0 => {
                    let p = base + rng.below(PAGES) * PAGE_SIZE;
                    space.protect(p, 2 * PAGE_SIZE, Perms::READ).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    space.protect(p, 2 * PAGE_SIZE, Perms::ALL).unwrap();
                }
                1 if forks < 10 => {
                    forks += 1;
                    drop(space.fork(Arc::new(RecordingBackend::new())).unwrap());
                }
                _ => {
                    // Installs beside the region: merges at the budget.
                    let p = base + (PAGES + rng.below(64)) * PAGE_SIZE;
                    space.handle_fault(p, Access::Write).unwrap();
                }
            }
            takes.push(vm.take_dirty().unwrap());
            reads.push(read_all());
        }
        takes.push(vm.take_dirty().unwrap());
        kicker.kick();
        runner.join().unwrap();
        let mut changes = 0;
        for k in 1..reads.len() {
            let pairs = reads[k - 1].iter().zip(&reads[k]).enumerate();
            for (i, (before, after)) in pairs.filter(|(_, (b, a))| b != a) {
                changes += 1;
                let p = base + i as u64 * PAGE_SIZE;
                assert!(
                    takes[k].contains(p) || takes[k + 1].contains(p),
                    "{cow:?} round {k}: page {p:#x} changed ({before} -> {after}) but neither take reports it"
                );
            }
        }
        let stats = vm.slots().stats();
        eprintln!(
            "{cow:?} concurrent: {changes} page changes over {ROUNDS} rounds, slot deletes {} (harvested {}), pauses {}",
            stats.deletes,
            stats.dirty_harvests_on_delete,
            vm.slots().pauses()
        );
        assert!(changes > ROUNDS, "the guest made progress: {changes}");
        space.check_invariants().unwrap();
        vm.slots().check_invariants().unwrap();
    }
}
