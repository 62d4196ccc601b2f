//! Kicks, pauses and stops of running vCPUs, on real KVM with tiny guests
//! written as machine code here (64-bit, CPL3, the boot layout of
//! `guestmm::vmm::boot`).

mod common;

use common::guest_vm::{boot_vm, GuestVm};

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guestmm::kvm::{Action, ExitHandler, StopCause, Vcpu, VcpuStop, Vm, VmError, VmOptions};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{IoOpts, MapOpts};
use guestmm::vmm::boot::{
    BootLayout, EntryArgs, BOOT_SIZE, CODE_GPA, DEFAULT_RAM_BASE, HOLE_GPA, HOLE_SIZE,
};
use guestmm::{Perms, Range};
use kvm_ioctls::Kvm;

/// Each vCPU: `lock inc qword [rdi + rdx*8]` (its counter at RAM base +
/// 8 × index), forever.
const COUNT_FOREVER: &[u8] = &[
    0xf0, 0x48, 0xff, 0x04, 0xd7, // lock inc qword [rdi+rdx*8]
    0xeb, 0xf9, // jmp back
];

/// vCPU 0 writes one word per page over all of RAM, then spins; the others
/// spin (`pause`) from the start, forever.
const FILL_THEN_SPIN: &[u8] = &[
    0x48, 0x85, 0xd2, // test rdx, rdx
    0x75, 0x16, // jnz spin
    0x48, 0x89, 0xf9, // mov rcx, rdi
    0x4c, 0x8d, 0x04, 0x37, // lea r8, [rdi+rsi]
    0x48, 0x89, 0x09, // fill: mov [rcx], rcx
    0x48, 0x81, 0xc1, 0x00, 0x10, 0x00, 0x00, // add rcx, 0x1000
    0x4c, 0x39, 0xc1, // cmp rcx, r8
    0x72, 0xf1, // jb fill
    0xf3, 0x90, // spin: pause
    0xeb, 0xfc, // jmp spin
];

/// A VM running `code` on `vcpus` vCPUs over `ram` bytes of lazy RAM.
fn vm_with(
    kvm: &Kvm,
    code: &[u8],
    vcpus: u32,
    ram: u64,
    memfile_max: Option<u64>,
) -> (Arc<Vm>, Vec<Vcpu>) {
    let mut opts = GuestVm::default();
    if let Some(max) = memfile_max {
        opts.memfile.max_size = max;
    }
    boot_vm(kvm, code, vcpus, ram, opts)
}

fn counter(vm: &Vm, index: u64) -> u64 {
    let mut b = [0u8; 8];
    vm.space()
        .read_with(DEFAULT_RAM_BASE + 8 * index, &mut b, IoOpts::FORCE)
        .unwrap();
    u64::from_le_bytes(b)
}

/// Stops on a kick, counts kicks; everything else is unexpected.
#[derive(Default)]
struct Kickable {
    kicks: u32,
}

impl ExitHandler for Kickable {
    fn io_out(&mut self, _: &Vcpu, port: u16, _: &[u8]) -> Action {
        panic!("unexpected port write to {port:#x}");
    }
    fn kicked(&mut self, _: &Vcpu) -> Action {
        self.kicks += 1;
        Action::Stop
    }
}

#[test]
fn a_kick_gets_a_spinning_vcpu_out_promptly_and_it_can_run_again() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let (vm, mut vcpus) = vm_with(&kvm, COUNT_FOREVER, 1, 4 << 20, None);
    let mut vcpu = vcpus.pop().unwrap();
    for round in 0..3 {
        let kicker = vcpu.kicker();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            let at = Instant::now();
            kicker.kick();
            at
        });
        let mut h = Kickable::default();
        let stop = vcpu.run_with(&mut h).unwrap();
        let kicked_at = t.join().unwrap();
        let latency = kicked_at.elapsed();
        assert_eq!((stop, h.kicks), (VcpuStop::Handler, 1), "round {round}");
        assert!(
            latency < Duration::from_secs(2),
            "round {round}: run_with returned {latency:?} after the kick"
        );
        assert!(counter(&vm, 0) > 0, "round {round}: the guest ran");
    }
    // A kick while the vCPU is not running makes its next run return at once.
    vcpu.kicker().kick();
    let mut h = Kickable::default();
    assert_eq!(vcpu.run_with(&mut h).unwrap(), VcpuStop::Handler);
    assert_eq!(h.kicks, 1);
}

#[test]
fn a_pause_holds_every_vcpu_until_it_is_dropped() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let (vm, vcpus) = vm_with(&kvm, COUNT_FOREVER, 2, 4 << 20, None);
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut v| thread::spawn(move || v.run_with(&mut Kickable::default())))
        .collect();
    let wait_for_counts = |above: [u64; 2]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (0..2).any(|i| counter(&vm, i) <= above[i as usize]) {
            assert!(
                Instant::now() < deadline,
                "vCPUs did not count past {above:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for_counts([0, 0]);
    for round in 0..5 {
        let paused = vm.pause().unwrap();
        let before = [counter(&vm, 0), counter(&vm, 1)];
        thread::sleep(Duration::from_millis(50));
        let after = [counter(&vm, 0), counter(&vm, 1)];
        assert_eq!(before, after, "round {round}: a paused vCPU counted");
        drop(paused);
        wait_for_counts(after);
    }
    vm.stop();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), VcpuStop::Stopped);
    }
    assert_eq!(vm.stop_cause(), Some(StopCause::Requested));
}

#[test]
fn a_host_error_on_one_vcpu_stops_the_others() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    // 1 GiB of RAM over a 32 MiB memory file: vCPU 0 runs out of memory;
    // vCPU 1 would spin forever.
    let (vm, vcpus) = vm_with(&kvm, FILL_THEN_SPIN, 2, 1 << 30, Some(32 << 20));
    let started = Instant::now();
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut v| thread::spawn(move || v.run_with(&mut Kickable::default())))
        .collect();
    let results: Vec<Result<VcpuStop, VmError>> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    match &results[0] {
        Err(VmError::Fault { vcpu: 0, source }) => {
            assert!(source.to_string().contains("out of memory"), "got {source}")
        }
        other => panic!("vcpu 0: got {other:?}, want an out-of-memory fault"),
    }
    assert!(
        matches!(results[1], Ok(VcpuStop::Stopped)),
        "vcpu 1: got {:?}, want Stopped",
        results[1]
    );
    assert!(
        matches!(vm.stop_cause(), Some(StopCause::VcpuFailed { vcpu: 0, .. })),
        "got {:?}",
        vm.stop_cause()
    );
}

#[test]
fn bad_vm_options_and_device_ranges_are_refused() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let memfile = Arc::new(MemoryFile::new("opts", MemoryFileOptions::default()).unwrap());
    let zero_slots = VmOptions {
        max_slots: Some(0),
        ..VmOptions::default()
    };
    assert!(matches!(
        Vm::new(&kvm, memfile.clone(), zero_slots),
        Err(VmError::BadOption {
            option: "max_slots",
            ..
        })
    ));
    let zero_watchdog = VmOptions {
        watchdog: Some(Duration::ZERO),
        ..VmOptions::default()
    };
    assert!(matches!(
        Vm::new(&kvm, memfile.clone(), zero_watchdog),
        Err(VmError::BadOption {
            option: "watchdog",
            ..
        })
    ));
    let vm = Vm::new(&kvm, memfile, VmOptions::default()).unwrap();
    vm.space()
        .map(
            MapOpts::anonymous(2 << 20)
                .fixed(0x100_0000)
                .perms(Perms::ALL),
        )
        .unwrap();
    let r = |s: u64, e: u64| guestmm::Range::new(s, e).unwrap();
    let refused = |range| matches!(vm.add_device_range(range), Err(VmError::DeviceRange { .. }));
    assert!(refused(r(0x5000_0000, 0x5000_0000)), "empty");
    assert!(refused(r(0x10f_f000, 0x110_1000)), "overlaps the vma");
    vm.add_device_range(r(0x5000_0000, 0x5000_1000)).unwrap();
    assert!(
        refused(r(0x5000_0800, 0x5000_2000)),
        "overlaps another device range"
    );
    vm.add_device_range(r(0x5000_1000, 0x5000_2000)).unwrap();
    assert_eq!(vm.slots().host_addr(u64::MAX), None);
}

/// `mov eax, 0; out 0x11, eax` (the EXIT hypercall); `ud2`.
const EXIT_ZERO: &[u8] = &[0xb8, 0, 0, 0, 0, 0xe7, 0x11, 0x0f, 0x0b];

/// Stops at the first port write, noting the port.
#[derive(Default)]
struct FirstOut {
    port: Option<u16>,
    failure: Option<String>,
}

impl ExitHandler for FirstOut {
    fn io_out(&mut self, _: &Vcpu, port: u16, _: &[u8]) -> Action {
        self.port = Some(port);
        Action::Stop
    }
    fn emulation_failure(&mut self, _: &Vcpu, f: &guestmm::kvm::EmulationFailure) -> Action {
        self.failure = Some(f.to_string());
        Action::Stop
    }
    fn shutdown(&mut self, _: &Vcpu) -> Action {
        self.failure = Some("shutdown".into());
        Action::Stop
    }
}

#[test]
fn a_guest_with_no_memory_installed_at_all_starts() {
    // Boot region (page tables, GDT, TSS, code) in a host file mapped
    // shared and lazily: nothing is populated or installed at the first
    // KVM_RUN (KVM fails it with ENOSPC on PVM hosts; elsewhere it exits).
    common::log_from_env();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    use std::os::unix::fs::FileExt;
    let layout = BootLayout::new(DEFAULT_RAM_BASE, 4 << 20, 1).unwrap();
    let file = common::tempfile("lazy-boot");
    file.set_len(BOOT_SIZE).unwrap();
    for (gpa, bytes) in layout.boot_image(EXIT_ZERO).unwrap() {
        file.write_all_at(&bytes, gpa).unwrap();
    }
    let hf = guestmm::mm::HostFile::new(file, true).unwrap();
    let memfile = Arc::new(MemoryFile::new("lazy-boot", MemoryFileOptions::default()).unwrap());
    let vm = Vm::new(&kvm, memfile, VmOptions::default()).unwrap();
    vm.space()
        .map(
            MapOpts::object(hf, 0, BOOT_SIZE)
                .fixed(0)
                .shared()
                .perms(Perms::ALL)
                .name("boot"),
        )
        .unwrap();
    assert_eq!(
        vm.slots().stats().live,
        0,
        "nothing installed before the run"
    );
    let mut vcpu = vm.create_vcpu(0).unwrap();
    layout
        .setup_vcpu(vcpu.fd(), &kvm, 0, &EntryArgs::default())
        .unwrap();
    let mut h = FirstOut::default();
    vcpu.run_with(&mut h).unwrap();
    assert_eq!(
        (h.port, h.failure.as_deref()),
        (Some(0x11), None),
        "the guest reached its EXIT hypercall"
    );
}

#[test]
fn a_cr3_outside_the_address_space_is_a_violation_not_a_host_error() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let (vm, mut vcpus) = vm_with(&kvm, EXIT_ZERO, 1, 4 << 20, None);
    let vcpu = &mut vcpus[0];
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    let beyond = VmOptions::default().space.size + 0x1000;
    sregs.cr3 = beyond;
    vcpu.fd().set_sregs(&sregs).unwrap();
    let mut h = FirstOut::default();
    let stop = vcpu.run_with(&mut h).unwrap();
    match stop {
        VcpuStop::EmulationFailure(f) => {
            let v = f.violation.expect("a violation");
            assert_eq!(v.kind, guestmm::kvm::ViolationKind::Unmapped, "got {v}");
            assert_eq!(v.gpa, beyond, "got {v}");
        }
        other => panic!(
            "got {other:?} ({:?}), want an emulation failure with a violation",
            h.failure
        ),
    }
    assert_eq!(vm.stop_cause(), None, "a guest error does not stop the VM");
}

/// `vmovdqu [r10], ymm0` (r10 = HOLE_GPA, a device range here), then EXIT(0).
const AVX_STORE_TO_DEVICE: &[u8] = &[
    0xc4, 0xc1, 0x7e, 0x7f, 0x02, // vmovdqu [r10], ymm0
    0xb8, 0, 0, 0, 0, 0xe7, 0x11, 0x0f, 0x0b, // EXIT(0)
];

/// Skips an instruction guestmm could not get past, as a VMM emulating a
/// device access itself (or injecting an exception) would.
#[derive(Default)]
struct SkipFailures {
    failures: Vec<(u64, usize)>,
    exit_port: Option<u16>,
}

impl ExitHandler for SkipFailures {
    fn io_out(&mut self, _: &Vcpu, port: u16, _: &[u8]) -> Action {
        self.exit_port = Some(port);
        Action::Stop
    }
    fn emulation_failure(&mut self, vcpu: &Vcpu, f: &guestmm::kvm::EmulationFailure) -> Action {
        let len = f.instruction.bytes().len();
        self.failures.push((f.rip, len));
        let mut regs = vcpu.fd().get_regs().unwrap();
        regs.rip += 5; // the vmovdqu
        vcpu.fd().set_regs(&regs).unwrap();
        Action::Continue
    }
}

#[test]
fn an_instruction_kvm_cannot_run_reaches_the_handler_with_its_vcpu() {
    common::log_from_env();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let (vm, mut vcpus) = vm_with(&kvm, AVX_STORE_TO_DEVICE, 1, 2 << 20, None);
    vm.add_device_range(Range::from_len(HOLE_GPA, HOLE_SIZE).unwrap())
        .unwrap();
    let mut h = SkipFailures::default();
    let stop = vcpus[0].run_with(&mut h).unwrap();
    assert_eq!(stop, VcpuStop::Handler);
    eprintln!("emulation failures handled: {:?}", h.failures);
    assert_eq!(h.exit_port, Some(0x11), "the guest went on to its EXIT");
    match h.failures.as_slice() {
        // KVM cannot emulate a VEX store to a device: the handler got it.
        [(rip, _)] => assert_eq!(*rip, CODE_GPA),
        // A host that completes it as an MMIO write never fails it; the
        // handler (no mmio_write override) then accepted the write.
        [] => {}
        more => panic!("failures {more:?}"),
    }
}
