//! vCPU and VM state save/restore (`guestmm::kvm::vcpu_state`) on real KVM:
//! a guest stopped at a MARK continues in a second VM exactly where it left
//! off; the byte format roundtrips and refuses corrupt input.

mod common;

use common::guest_vm::{boot_vm, GuestVm};

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::kvm::vcpu_state::FORMAT_VERSION;
use guestmm::kvm::{Exit, StateError, Vcpu, VcpuState, Vm, VmOptions, VmState};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::IoOpts;
use guestmm::vmm::boot::{CODE_GPA, DEFAULT_RAM_BASE};
use guestmm::vmm::hypercall::PORT_MARK;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

/// Distinctive values in every GPR but rax/rdi/rsp, XMM0 = [rbx, r8],
/// XMM7 = [r12, r12], MXCSR rounding toward zero (bits 13-14).
const PROLOGUE: &[u8] = &[
    0x48, 0xbb, 0x44, 0x44, 0x33, 0x33, 0x22, 0x22, 0x11, 0x11, // mov rbx, 0x1111222233334444
    0x48, 0xbd, 0x88, 0x88, 0x77, 0x77, 0x66, 0x66, 0x55, 0x55, // mov rbp, 0x5555666677778888
    0x48, 0xbe, 0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01, // mov rsi, 0x0123456789abcdef
    0x48, 0xb9, 0x91, 0x57, 0x13, 0x79, 0x35, 0x91, 0x57, 0x13, // mov rcx, 0x1357913579135791
    0x48, 0xba, 0x02, 0x68, 0x24, 0x80, 0x46, 0x02, 0x68, 0x24, // mov rdx, 0x2468024680246802
    0x49, 0xb8, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x88, 0x88, // mov r8, 0x8888000000000008
    0x49, 0xb9, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x99, 0x99, // mov r9, 0x9999000000000009
    0x49, 0xba, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0xaa, 0xaa, // mov r10, 0xaaaa00000000000a
    0x49, 0xbb, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0xbb, 0xbb, // mov r11, 0xbbbb00000000000b
    0x49, 0xbc, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0xcc, 0xcc, // mov r12, 0xcccc00000000000c
    0x49, 0xbd, 0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, 0xdd, 0xdd, // mov r13, 0xdddd00000000000d
    0x49, 0xbe, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, 0xee, 0xee, // mov r14, 0xeeee00000000000e
    0x49, 0xbf, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, // mov r15, 0xffff00000000000f
    0x66, 0x48, 0x0f, 0x6e, 0xc3, // movq xmm0, rbx
    0x66, 0x49, 0x0f, 0x6e, 0xc8, // movq xmm1, r8
    0x66, 0x0f, 0x6c, 0xc1, // punpcklqdq xmm0, xmm1
    0x66, 0x49, 0x0f, 0x6e, 0xfc, // movq xmm7, r12
    0x66, 0x0f, 0x70, 0xff, 0x44, // pshufd xmm7, xmm7, 0x44
    0x0f, 0xae, 0x5f, 0x08, // stmxcsr [rdi+8]
    0x81, 0x4f, 0x08, 0x00, 0x60, 0x00, 0x00, // or dword [rdi+8], 0x6000
    0x0f, 0xae, 0x57, 0x08, // ldmxcsr [rdi+8]
];

/// ZMM5 = r9 × 8, ZMM17 = r10 × 8, ZMM30 = r14 × 8 (through memory at
/// rdi + 0x100 with vmovdqu64), YMM9 = [r12; 4], k3 = 0xa5a5.
const AVX512_PROLOGUE: &[u8] = &[
    0x62, 0xd2, 0xfd, 0x48, 0x7c, 0xe9, // vpbroadcastq zmm5, r9
    0x62, 0xc2, 0xfd, 0x48, 0x7c, 0xca, // vpbroadcastq zmm17, r10
    0x62, 0xd2, 0xfd, 0x48, 0x7c, 0xd6, // vpbroadcastq zmm2, r14
    0x62, 0xf1, 0xfe, 0x48, 0x7f, 0x57, 0x04, // vmovdqu64 [rdi+0x100], zmm2
    0x62, 0x61, 0xfe, 0x48, 0x6f, 0x77, 0x04, // vmovdqu64 zmm30, [rdi+0x100]
    0xc4, 0x62, 0x7d, 0x59, 0xcf, // vpbroadcastq ymm9, xmm7
    0xb8, 0xa5, 0xa5, 0x00, 0x00, // mov eax, 0xa5a5
    0xc5, 0xf8, 0x92, 0xd8, // kmovw k3, eax
];

/// CF and DF set (kept: the loop only uses inc, lea and vector adds).
const FLAGS: &[u8] = &[
    0xf9, // stc
    0xfd, // std
];

/// Loop start: count in RAM, evolve registers (no flags touched but inc's).
const LOOP_HEAD: &[u8] = &[
    0x48, 0xff, 0x07, // inc qword [rdi]
    0x4a, 0x8d, 0x5c, 0x43, 0x07, // lea rbx, [rbx + r8*2 + 7]
    0x4d, 0x8d, 0x3c, 0x1f, // lea r15, [r15 + rbx]
    0x66, 0x0f, 0xd4, 0xc7, // paddq xmm0, xmm7
];

const AVX512_LOOP: &[u8] = &[
    0x62, 0xb1, 0xd5, 0x48, 0xd4, 0xe9, // vpaddq zmm5, zmm5, zmm17
    0x62, 0x61, 0x8d, 0x40, 0xd4, 0xf5, // vpaddq zmm30, zmm30, zmm5
    0xc4, 0x41, 0x35, 0xd4, 0xc9, // vpaddq ymm9, ymm9, ymm9
];

/// MARK(counter), then back to the loop head (a `jmp rel32` appended).
const LOOP_TAIL: &[u8] = &[
    0x8b, 0x07, // mov eax, [rdi]
    0xe7, 0x12, // out 0x12, eax
];

/// The guest: prologue, then forever { counter += 1; evolve; MARK(counter) }.
fn guest(avx512: bool) -> Vec<u8> {
    let mut code = PROLOGUE.to_vec();
    if avx512 {
        code.extend_from_slice(AVX512_PROLOGUE);
    }
    code.extend_from_slice(FLAGS);
    let head = code.len();
    code.extend_from_slice(LOOP_HEAD);
    if avx512 {
        code.extend_from_slice(AVX512_LOOP);
    }
    code.extend_from_slice(LOOP_TAIL);
    let rel = head as i64 - (code.len() as i64 + 5);
    code.push(0xe9); // jmp rel32
    code.extend_from_slice(&i32::try_from(rel).unwrap().to_le_bytes());
    code
}

/// The host has AVX-512F (and AVX2) and KVM lets a guest's XCR0 enable its
/// state components (CPUID leaf 0xD). KVM's CPUID leaf 7 need not list
/// AVX-512 (this host's does not): XCR0, not CPUID, enables the
/// instructions, which run natively.
fn avx512_available(kvm: &Kvm) -> bool {
    if !(std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2"))
    {
        return false;
    }
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let xcr0 = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| e.eax);
    xcr0 & 0xe4 == 0xe4
}

/// Offset in the (standard-format) XSAVE area of state component `c`.
fn xsave_offset(kvm: &Kvm, c: u32) -> usize {
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let e = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == c)
        .unwrap_or_else(|| panic!("no CPUID leaf 0xd.{c}"));
    e.ebx as usize
}

/// Bytes `[off, off + len)` of a state's XSAVE area.
fn xsave_bytes(s: &VcpuState, off: usize, len: usize) -> Vec<u8> {
    let bytes: Vec<u8> = s
        .xsave_words()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    bytes[off..off + len].to_vec()
}

/// Runs until the guest MARKs `want` (resolving memory exits); every MARK
/// on the way must count up by one from `from`.
fn run_to_mark(vcpu: &mut Vcpu, from: u32, want: u32) {
    let mut next = from + 1;
    for _ in 0..10_000 {
        match vcpu.run().unwrap() {
            Exit::Resolved => continue,
            Exit::IoOut { port, data } if port == PORT_MARK => {
                let mark = u32::from_le_bytes(data.try_into().unwrap());
                assert_eq!(mark, next, "got MARK {mark}, want {next}");
                if mark == want {
                    return;
                }
                next += 1;
            }
            other => panic!("unexpected exit {other:?} before MARK {want}"),
        }
    }
    panic!("no MARK {want} after 10000 exits");
}

fn read_ram(vm: &Vm, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    vm.space()
        .read_with(DEFAULT_RAM_BASE, &mut b, IoOpts::FORCE)
        .unwrap();
    b
}

const RAM: u64 = 4 << 20;
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_DF: u64 = 1 << 10;

#[test]
fn a_vcpu_restored_in_a_second_vm_continues_exactly_where_the_first_left_off() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    common::log_from_env();
    let avx512 = avx512_available(&kvm);
    if !avx512 {
        eprintln!("AVX-512 not offered: the ZMM/k-register part of this test is skipped");
    }
    let code = guest(avx512);

    // VM 1 runs to MARK 2 and is saved there.
    let (vm1, mut v1) = boot_vm(&kvm, &code, 1, RAM, GuestVm::default());
    let mut v1 = v1.pop().unwrap();
    if avx512 {
        let mut xcrs = v1.fd().get_xcrs().unwrap();
        // x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM.
        xcrs.xcrs[0].value = 0xe7;
        v1.fd().set_xcrs(&xcrs).unwrap();
    }
    run_to_mark(&mut v1, 0, 2);
    let state = v1.save_state().unwrap();
    let vm_state = VmState::save(vm1.vm_fd()).unwrap();
    let saved_at = Instant::now();
    let ram = read_ram(&vm1, 4096);

    // What was saved: past the `out` (the exit was completed), the
    // distinctive registers, flags, vector state.
    let r = state.regs();
    // Past the `out`: on the `jmp` that ends the code.
    assert_eq!(r.rip, CODE_GPA + code.len() as u64 - 5);
    assert_eq!(r.rax, 2);
    assert_eq!(r.rbp, 0x5555_6666_7777_8888);
    assert_eq!(r.rsi, 0x0123_4567_89ab_cdef);
    assert_eq!(r.r14, 0xeeee_0000_0000_000e);
    assert_eq!(r.rdi, DEFAULT_RAM_BASE);
    assert_eq!(r.rflags & (RFLAGS_CF | RFLAGS_DF), RFLAGS_CF | RFLAGS_DF);
    let mxcsr = state.xsave_words()[6];
    assert_eq!(mxcsr & 0x6000, 0x6000, "MXCSR {mxcsr:#x}");
    let xmm7 = xsave_bytes(&state, 160 + 7 * 16, 16);
    assert_eq!(xmm7, [0xcccc_0000_0000_000cu64.to_le_bytes(); 2].concat());
    if avx512 {
        // Hi16_ZMM (component 7): ZMM16..31, 64 bytes each.
        let zmm17 = xsave_bytes(&state, xsave_offset(&kvm, 7) + 64, 64);
        assert_eq!(zmm17, [0xaaaa_0000_0000_000au64.to_le_bytes(); 8].concat());
        // Opmask (component 5): k0..k7, 8 bytes each.
        let k3 = xsave_bytes(&state, xsave_offset(&kvm, 5) + 3 * 8, 8);
        assert_eq!(k3, 0xa5a5u64.to_le_bytes());
    }
    assert!(
        state.msrs().iter().any(|m| m.index == 0x10),
        "IA32_TSC saved: {:?}",
        state.msrs()
    );
    assert!(!state.cpuid().is_empty());

    // The bytes roundtrip.
    let bytes = state.to_bytes();
    assert_eq!(VcpuState::from_bytes(&bytes).unwrap(), state);
    let state = VcpuState::from_bytes(&bytes).unwrap();

    // VM 1 continues to MARK 3.
    run_to_mark(&mut v1, 2, 3);
    let next1 = v1.save_state().unwrap();

    // VM 2: same code, RAM as VM 1 had it at MARK 2, the saved state.
    std::thread::sleep(Duration::from_millis(50));
    let (vm2, mut v2) = boot_vm(&kvm, &code, 1, RAM, GuestVm::default());
    let mut v2 = v2.pop().unwrap();
    vm2.space()
        .write_with(DEFAULT_RAM_BASE, &ram, IoOpts::FORCE)
        .unwrap();
    let restored = VmState::from_bytes(&vm_state.to_bytes()).unwrap();
    assert_eq!(restored, vm_state);
    // The kvm-clock continues from the saved value: it advances by the
    // time since the restore, not by the (≥ 50 ms) since the save.
    let restoring = Instant::now();
    restored.restore(vm2.vm_fd()).unwrap();
    let clock2 = vm2.vm_fd().get_clock().unwrap().clock;
    let since_restore = restoring.elapsed();
    let since_save = saved_at.elapsed();
    let advanced = Duration::from_nanos(clock2.saturating_sub(vm_state.clock_ns()));
    assert!(
        clock2 >= vm_state.clock_ns() && advanced <= since_restore + Duration::from_millis(1),
        "kvm-clock advanced {advanced:?} past the saved value within {since_restore:?} of restoring ({since_save:?} since saving)"
    );
    v2.restore_state(&state).unwrap();
    run_to_mark(&mut v2, 2, 3);
    let next2 = v2.save_state().unwrap();

    assert_eq!(next2.regs(), next1.regs(), "registers at MARK 3");
    assert_eq!(next2.sregs(), next1.sregs(), "special registers at MARK 3");
    let (x1, x2) = (next1.xsave_words(), next2.xsave_words());
    assert_eq!(x2.len(), x1.len());
    if let Some(i) = (0..x1.len()).find(|&i| x1[i] != x2[i]) {
        panic!(
            "XSAVE area at MARK 3, byte {}: got {:#010x}, want {:#010x}",
            4 * i,
            x2[i],
            x1[i]
        );
    }
    assert_eq!(read_ram(&vm2, 4096), read_ram(&vm1, 4096), "RAM at MARK 3");
    assert_ne!(next1.regs().rbx, state.regs().rbx, "the guest moved on");
    if avx512 {
        let off = xsave_offset(&kvm, 7) + 14 * 64; // ZMM30
        assert_ne!(xsave_bytes(&next2, off, 64), xsave_bytes(&state, off, 64));
    }

    // Timing: save + restore of one vCPU (v2 has run; its CPUID is the
    // saved one, so KVM takes it again).
    const ROUNDS: u32 = 200;
    let (mut save, mut restore, mut codec) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let s = v2.save_state().unwrap();
        save += t.elapsed();
        let t = Instant::now();
        let s = VcpuState::from_bytes(&s.to_bytes()).unwrap();
        codec += t.elapsed();
        let t = Instant::now();
        v2.restore_state(&s).unwrap();
        restore += t.elapsed();
    }
    eprintln!(
        "vcpu state: {} bytes, {} MSRs, xsave {} bytes; save {:?}, restore {:?}, to_bytes + from_bytes {:?} per vCPU (mean of {ROUNDS})",
        bytes.len(),
        state.msrs().len(),
        state.xsave_words().len() * 4,
        save / ROUNDS,
        restore / ROUNDS,
        codec / ROUNDS
    );
}

#[test]
fn restore_onto_a_vcpu_that_ran_takes_only_its_own_cpuid() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let code = guest(false);
    // vCPUs 0 and 1 differ in CPUID (their APIC ids).
    let (_vm, mut vcpus) = boot_vm(&kvm, &code, 2, RAM, GuestVm::default());
    let mut v1 = vcpus.pop().unwrap();
    let mut v0 = vcpus.pop().unwrap();
    assert!(
        !v0.save_state().unwrap().has_lapic(),
        "no in-kernel irqchip"
    );
    run_to_mark(&mut v0, 0, 1);
    let s0 = v0.save_state().unwrap();
    // Saving a fresh vCPU does not run it: it still takes any CPUID.
    let s1 = v1.save_state().unwrap();
    assert_ne!(s0.cpuid(), s1.cpuid());
    v1.restore_state(&s0).unwrap();
    v1.restore_state(&s1).unwrap();

    // vCPU 0 has run: another CPUID is refused, with a typed error...
    match v0.restore_state(&s1) {
        Err(StateError::CpuidRejected { source }) => assert_eq!(source.errno(), libc::EINVAL),
        other => panic!("got {other:?}, want CpuidRejected"),
    }
    // ... its own is taken, and it continues from the state.
    run_to_mark(&mut v0, 1, 3);
    v0.restore_state(&s0).unwrap();
    assert_eq!(v0.fd().get_regs().unwrap(), *s0.regs());
    run_to_mark(&mut v0, 3, 4); // RAM still counts on: MARK 4
    let after = v0.save_state().unwrap().regs().rbx;
    // rbx is one iteration past MARK 1's state (not four past the start).
    let step = |rbx: u64| {
        rbx.wrapping_add(0x8888_0000_0000_0008u64.wrapping_mul(2))
            .wrapping_add(7)
    };
    assert_eq!(after, step(s0.regs().rbx));
}

#[test]
fn truncated_garbled_or_foreign_bytes_are_errors() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let (vm, mut vcpus) = boot_vm(&kvm, &guest(false), 1, RAM, GuestVm::default());
    let mut v = vcpus.pop().unwrap();
    run_to_mark(&mut v, 0, 1);
    let bytes = v.save_state().unwrap().to_bytes();
    for len in 0..bytes.len() {
        match VcpuState::from_bytes(&bytes[..len]) {
            Err(StateError::Truncated { .. } | StateError::BadChecksum { .. }) => {}
            other => panic!("{len} of {} bytes: got {other:?}", bytes.len()),
        }
    }
    let mut rng = common::rng::Rng(0x5eed);
    for _ in 0..200 {
        let mut b = bytes.clone();
        let i = rng.below(b.len() as u64) as usize;
        b[i] ^= 1 << rng.below(8);
        assert!(
            VcpuState::from_bytes(&b).is_err(),
            "a bit flip at byte {i} went unnoticed"
        );
    }
    let mut b = bytes.clone();
    b[8] = FORMAT_VERSION as u8 + 1;
    assert!(matches!(
        VcpuState::from_bytes(&b),
        Err(StateError::BadVersion { .. })
    ));
    let vm_bytes = VmState::save(vm.vm_fd()).unwrap().to_bytes();
    assert!(matches!(
        VcpuState::from_bytes(&vm_bytes),
        Err(StateError::BadMagic { .. })
    ));
    assert!(matches!(
        VmState::from_bytes(&bytes),
        Err(StateError::BadMagic { .. })
    ));
    for len in 0..vm_bytes.len() {
        assert!(VmState::from_bytes(&vm_bytes[..len]).is_err());
    }
}

#[test]
fn the_lapic_travels_with_an_in_kernel_irqchip_and_is_refused_without_one() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let vm = |irqchip: bool| {
        let memfile = Arc::new(MemoryFile::new("lapic", MemoryFileOptions::default()).unwrap());
        let vm = Vm::new(&kvm, memfile, VmOptions::default()).unwrap();
        if irqchip {
            vm.vm_fd().create_irq_chip().unwrap();
        }
        vm
    };
    let reg = |l: &kvm_bindings::kvm_lapic_state, off: usize| {
        let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
        u32::from_le_bytes(b.try_into().unwrap())
    };
    let set_reg = |l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            l.regs[off + i] = b as _;
        }
    };
    const TPR: usize = 0x80;
    const LVT_TIMER: usize = 0x320;

    let vm1 = vm(true);
    let mut a = vm1.create_vcpu(0).unwrap();
    let mut lapic = a.fd().get_lapic().unwrap();
    set_reg(&mut lapic, TPR, 0x20);
    set_reg(&mut lapic, LVT_TIMER, 0x2_00ec); // periodic, vector 0xec, unmasked
    a.fd().set_lapic(&lapic).unwrap();
    let s = a.save_state().unwrap();
    let saved = s.lapic().expect("an in-kernel irqchip has a LAPIC");
    assert_eq!(reg(saved, TPR), 0x20);

    let vm2 = vm(true);
    let mut b = vm2.create_vcpu(0).unwrap();
    assert_ne!(reg(&b.fd().get_lapic().unwrap(), LVT_TIMER), 0x2_00ec);
    b.restore_state(&s).unwrap();
    let got = b.fd().get_lapic().unwrap();
    assert_eq!(
        (reg(&got, TPR), reg(&got, LVT_TIMER)),
        (0x20, 0x2_00ec),
        "TPR and LVT timer after restore"
    );
    assert_eq!(b.save_state().unwrap().lapic(), Some(saved));

    let vm3 = vm(false);
    let mut c = vm3.create_vcpu(0).unwrap();
    match c.restore_state(&s) {
        Err(StateError::Kvm {
            op: "KVM_SET_LAPIC",
            ..
        }) => {}
        other => panic!("got {other:?}, want a KVM_SET_LAPIC error"),
    }
}

#[test]
fn a_pending_port_read_is_completed_before_saving() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    const PORT: u16 = 0x20;
    const VALUE: u32 = 0xfeed_f00d;
    let code: &[u8] = &[
        0xe5, 0x20, // in eax, 0x20
        0xe7, 0x11, // out 0x11, eax (EXIT with what was read)
        0x0f, 0x0b, // ud2
    ];
    let (_vm1, mut v) = boot_vm(&kvm, code, 1, RAM, GuestVm::default());
    let mut v = v.pop().unwrap();
    loop {
        match v.run().unwrap() {
            Exit::Resolved => continue,
            Exit::IoIn { port, data } if port == PORT => {
                data.copy_from_slice(&VALUE.to_le_bytes());
                break;
            }
            other => panic!("unexpected exit {other:?}, want a read of port {PORT:#x}"),
        }
    }
    // KVM writes rax and moves past the `in` only on the next KVM_RUN:
    // save_state does that run.
    assert_eq!(
        v.fd().get_regs().unwrap().rip,
        CODE_GPA,
        "KVM holds the `in`"
    );
    let state = v.save_state().unwrap();
    assert_eq!(state.regs().rax, u64::from(VALUE));
    assert_eq!(state.regs().rip, CODE_GPA + 2);

    // A second VM restored from it writes what the first read.
    let (_vm2, mut w) = boot_vm(&kvm, code, 1, RAM, GuestVm::default());
    let mut w = w.pop().unwrap();
    w.restore_state(&state).unwrap();
    loop {
        match w.run().unwrap() {
            Exit::Resolved => continue,
            Exit::IoOut { port, data } if port == guestmm::vmm::hypercall::PORT_EXIT => {
                assert_eq!(data, VALUE.to_le_bytes());
                break;
            }
            other => panic!("unexpected exit {other:?}, want EXIT"),
        }
    }
}
