//! Smoke test of the boot machinery without the mm layer: the boot region
//! and RAM are plain anonymous memory registered as eager memslots, and a
//! small run loop here handles the hypercalls. Every guest must exit 0.

mod common;
use common::host_mem::HostMem;
use common::kvm_or_skip;

use guestmm::vmm::boot::{
    BootError, BootLayout, EntryArgs, BOOT_SIZE, CODE_MAX_SIZE, DEFAULT_RAM_BASE,
};
use guestmm::vmm::guests::{self, Guest};
use guestmm::vmm::hypercall::{self, Hypercall};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const MIB: u64 = 1 << 20;

/// A VM with eager boot region, RAM and (optionally) template slots.
/// Field order matters: vCPUs and the VM go before the memory they use.
struct TestVm {
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    _boot: HostMem,
    _ram: HostMem,
    template: Option<HostMem>,
}

fn boot_vm(kvm: &Kvm, guest: &Guest, ram_size: u64) -> TestVm {
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram_size, guest.vcpus).expect("layout");
    let vm = kvm.create_vm().expect("create_vm");
    let mut boot = HostMem::new(BOOT_SIZE);
    for (gpa, bytes) in layout.boot_image(guest.image).expect("boot image") {
        boot.bytes()[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(&bytes);
    }
    boot.register(&vm, 0, 0);
    let ram = HostMem::new(ram_size);
    ram.register(&vm, 1, layout.ram_base());

    let mut args = EntryArgs::default();
    let template = (guest.template_size > 0).then(|| {
        let mut t = HostMem::new(guest.template_size);
        guests::fill_cow_template(t.bytes());
        args.template_base = layout.ram_base() + ram_size;
        args.template_size = guest.template_size;
        t.register(&vm, 2, args.template_base);
        t
    });

    let vcpus = (0..guest.vcpus)
        .map(|i| {
            let vcpu = vm.create_vcpu(u64::from(i)).expect("create_vcpu");
            layout.setup_vcpu(&vcpu, kvm, i, &args).expect("setup_vcpu");
            vcpu
        })
        .collect();
    TestVm {
        vcpus,
        _vm: vm,
        _boot: boot,
        _ram: ram,
        template,
    }
}

/// What one vCPU did until it exited.
#[derive(Debug, Default)]
struct VcpuRun {
    exit_code: u32,
    console: String,
    marks: Vec<u32>,
}

/// An exit copied out of the kvm_run page, so the vCPU can be used again.
enum Exit {
    Io(u16, Vec<u8>),
    Stop(String),
}

/// Runs one vCPU until its EXIT hypercall; any other way out is an error.
fn run_vcpu(index: usize, vcpu: &mut VcpuFd) -> Result<VcpuRun, String> {
    let mut out = VcpuRun::default();
    loop {
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => Exit::Io(port, data.to_vec()),
            Ok(VcpuExit::Hlt) => Exit::Stop("hlt".into()),
            Ok(VcpuExit::Shutdown) => Exit::Stop("shutdown (triple fault)".into()),
            Ok(VcpuExit::InternalError) => Exit::Stop("internal error".into()),
            Ok(VcpuExit::MmioRead(addr, _)) => Exit::Stop(format!("MMIO read at {addr:#x}")),
            Ok(VcpuExit::MmioWrite(addr, _)) => Exit::Stop(format!("MMIO write at {addr:#x}")),
            Ok(other) => Exit::Stop(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("vcpu {index}: KVM_RUN failed: {e}")),
        };
        let (port, data) = match exit {
            Exit::Io(port, data) => (port, data),
            Exit::Stop(what) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                return Err(format!("vcpu {index}: {what}, rip {rip:#x}"));
            }
        };
        let regs = if hypercall::needs_regs(port) {
            vcpu.get_regs().map_err(|e| format!("get_regs: {e}"))?
        } else {
            kvm_regs::default()
        };
        match hypercall::decode(port, &data, &regs) {
            Ok(Hypercall::Console(b)) => out.console.push(char::from(b)),
            Ok(Hypercall::Mark(n)) => out.marks.push(n),
            Ok(Hypercall::Exit(code)) => {
                out.exit_code = code;
                return Ok(out);
            }
            Ok(Hypercall::SetCr3 { cr3 }) => {
                let mut sregs = vcpu.get_sregs().map_err(|e| format!("get_sregs: {e}"))?;
                sregs.cr3 = cr3;
                vcpu.set_sregs(&sregs)
                    .map_err(|e| format!("set_sregs: {e}"))?;
            }
            // exec and lazypt drop and restore permissions only to take
            // memslots away from guestmm-managed pages; eager slots here
            // have nothing to take away.
            Ok(Hypercall::Protect { .. }) => {}
            Ok(other) => return Err(format!("vcpu {index}: {other:?} unsupported here")),
            Err(e) => return Err(format!("vcpu {index}: {e}")),
        }
    }
}

/// Boots `name` with `ram_size` of RAM and runs all its vCPUs to their exit.
fn run_guest(kvm: &Kvm, name: &str, ram_size: u64) -> (TestVm, Vec<VcpuRun>) {
    let guest = guests::find(name).expect("known guest");
    let mut vm = boot_vm(kvm, guest, ram_size);
    let results: Vec<Result<VcpuRun, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = vm
            .vcpus
            .iter_mut()
            .enumerate()
            .map(|(i, vcpu)| s.spawn(move || run_vcpu(i, vcpu)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("vcpu thread panicked"))
            .collect()
    });
    let runs = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}")))
        .collect();
    (vm, runs)
}

fn assert_all_passed(name: &str, runs: &[VcpuRun]) {
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(
            r.exit_code, 0,
            "{name} vcpu {i}: got exit code {}, want 0",
            r.exit_code
        );
    }
}

#[test]
fn hello_prints_and_exits_zero() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (_, runs) = run_guest(&kvm, "hello", 2 * MIB);
    assert_all_passed("hello", &runs);
    assert_eq!(runs[0].console, "hello from guestmm\n");
    assert_eq!(
        runs[0].console,
        guests::find("hello").unwrap().expected_console
    );
}

#[test]
fn touch_writes_and_verifies_64_mib() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (_, runs) = run_guest(&kvm, "touch", 64 * MIB);
    assert_all_passed("touch", &runs);
    assert_eq!(runs[0].marks, [1, 2, 3, 4], "touch marks");
}

#[test]
fn exec_runs_code_from_ram_on_a_ram_stack() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (_, runs) = run_guest(&kvm, "exec", 64 * MIB);
    assert_all_passed("exec", &runs);
}

#[test]
fn simd_loads_and_stores() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (_, runs) = run_guest(&kvm, "simd", guests::find("simd").unwrap().min_ram);
    let want = if std::arch::is_x86_feature_detected!("avx") {
        0
    } else {
        100
    };
    assert_eq!(
        runs[0].exit_code, want,
        "simd: got exit code {}",
        runs[0].exit_code
    );
}

#[test]
fn smp_four_vcpus_count_exactly() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (_, runs) = run_guest(&kvm, "smp", 64 * MIB);
    assert_eq!(runs.len(), 4);
    assert_all_passed("smp", &runs);
}

#[test]
fn lazypt_switches_to_its_own_page_tables() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (_, runs) = run_guest(&kvm, "lazypt", 64 * MIB);
    assert_all_passed("lazypt", &runs);
}

#[test]
fn cow_guest_rewrites_first_half_of_template() {
    let Some(kvm) = kvm_or_skip() else { return };
    let (mut vm, runs) = run_guest(&kvm, "cow", 64 * MIB);
    assert_all_passed("cow", &runs);
    // Eager slots have no COW: the guest's writes land in the template memory.
    let t = vm.template.as_mut().expect("template").bytes();
    let half = t.len() / 2;
    for off in [0, 8, half - 8, half, t.len() - 8] {
        let got = u64::from_le_bytes(t[off..off + 8].try_into().unwrap());
        let pat = guests::cow_pattern(off as u64);
        let want = if off < half { !pat } else { pat };
        assert_eq!(
            got, want,
            "template offset {off:#x}: got {got:#x} want {want:#x}"
        );
    }
}

#[test]
fn bad_layouts_and_arguments_are_errors() {
    assert!(matches!(
        BootLayout::new(0, 64 * MIB, 1),
        Err(BootError::RamOverlapsBoot { base: 0 })
    ));
    assert!(matches!(
        BootLayout::new(DEFAULT_RAM_BASE + 4096, 64 * MIB, 1),
        Err(BootError::RamNotAligned { .. })
    ));
    assert!(matches!(
        BootLayout::new(DEFAULT_RAM_BASE, 64 * MIB, 0),
        Err(BootError::BadVcpuCount { vcpus: 0 })
    ));
    let layout = BootLayout::new(DEFAULT_RAM_BASE, 64 * MIB, 2).unwrap();
    assert!(matches!(
        layout.boot_image(&vec![0x90; CODE_MAX_SIZE as usize + 1]),
        Err(BootError::CodeTooLarge { .. })
    ));

    let Some(kvm) = kvm_or_skip() else { return };
    let vm = kvm.create_vm().expect("create_vm");
    let vcpu = vm.create_vcpu(0).expect("create_vcpu");
    assert!(matches!(
        layout.setup_vcpu(&vcpu, &kvm, 2, &EntryArgs::default()),
        Err(BootError::BadVcpuIndex { index: 2, vcpus: 2 })
    ));
    let template_in_boot = EntryArgs {
        template_base: 0x1000,
        template_size: MIB,
        ..EntryArgs::default()
    };
    assert!(matches!(
        layout.setup_vcpu(&vcpu, &kvm, 0, &template_in_boot),
        Err(BootError::BadTemplate { .. })
    ));
}
