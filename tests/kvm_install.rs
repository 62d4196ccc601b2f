//! Installing host-written memory on real KVM: memory a host write (a
//! loader) populated is shown to the guest without faulting through exits
//! again — by the VM's first run on its own, or by
//! `Vm::install_host_writes` for memory written after that.

mod common;

use std::sync::Arc;

use guestmm::kvm::{Action, EmulationFailure, ExitHandler, Vcpu, VcpuStop, Vm, VmOptions, VmStats};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{AddressSpaceOptions, IoOpts, MapOpts};
use guestmm::vmm::boot::{BootLayout, EntryArgs, BOOT_SIZE, DEFAULT_RAM_BASE};
use guestmm::{Perms, Range, PAGE_SIZE};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 16 << 20;

/// Adds the first qword of every page of RAM (`rdi`, `rsi` bytes) into
/// `eax`, then `out 0x11, eax` (the EXIT hypercall) with the sum.
const SUM_PAGES: &[u8] = &[
    0x48, 0x89, 0xf9, // mov rcx, rdi
    0x4c, 0x8d, 0x04, 0x37, // lea r8, [rdi+rsi]
    0x31, 0xc0, // xor eax, eax
    0x48, 0x03, 0x01, // loop: add rax, [rcx]
    0x48, 0x81, 0xc1, 0x00, 0x10, 0x00, 0x00, // add rcx, 0x1000
    0x4c, 0x39, 0xc1, // cmp rcx, r8
    0x72, 0xf1, // jb loop
    0xe7, 0x11, // out 0x11, eax
    0x0f, 0x0b, // ud2
];

/// Stops at the first port write, keeping its port and data.
#[derive(Default)]
struct FirstOut {
    out: Option<(u16, Vec<u8>)>,
    failure: Option<String>,
}

impl ExitHandler for FirstOut {
    fn io_out(&mut self, _: &Vcpu, port: u16, data: &[u8]) -> Action {
        self.out = Some((port, data.to_vec()));
        Action::Stop
    }
    fn emulation_failure(&mut self, _: &Vcpu, f: &EmulationFailure) -> Action {
        self.failure = Some(f.to_string());
        Action::Stop
    }
    fn shutdown(&mut self, _: &Vcpu) -> Action {
        self.failure = Some("shutdown".into());
        Action::Stop
    }
}

/// The RAM image the host writes: a distinct qword at every page start.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; RAM as usize];
    for (i, page) in img.chunks_mut(PAGE_SIZE as usize).enumerate() {
        page[..8].copy_from_slice(&(i as u64 * 0x1_0001 + 7).to_le_bytes());
    }
    img
}

/// When the host's writes are installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Install {
    /// The VM's first-run install happens before the host writes RAM, and
    /// nothing installs the writes (the baseline).
    Never,
    /// The host writes RAM before the first run, which installs it.
    AtFirstRun,
    /// As `Never`, then `Vm::install_host_writes` after the writes.
    Explicit,
}

/// Runs the page-summing guest on 16 MiB of RAM that the host filled
/// through the region view. One-page fault windows make every uninstalled
/// page cost the guest an exit.
fn run(kvm: &Kvm, install: Install) -> (VmStats, u64) {
    let memfile = Arc::new(MemoryFile::new("kvm-install", MemoryFileOptions::default()).unwrap());
    let opts = VmOptions {
        space: AddressSpaceOptions {
            fault_around: PAGE_SIZE,
            fault_around_max: PAGE_SIZE,
            ..VmOptions::default().space
        },
        ..VmOptions::default()
    };
    let vm = Vm::new(kvm, memfile, opts).unwrap();
    let layout = BootLayout::new(DEFAULT_RAM_BASE, RAM, 1).unwrap();
    let space = vm.space();
    layout.map_boot_region(space, SUM_PAGES).unwrap();
    space
        .map(
            MapOpts::anonymous(RAM)
                .fixed(DEFAULT_RAM_BASE)
                .perms(Perms::READ_WRITE)
                .name("ram"),
        )
        .unwrap();
    if install != Install::AtFirstRun {
        // What the first run would do; RAM is not written yet.
        vm.install_host_writes().unwrap();
    }
    // What a loader does: write through the region view.
    let mem = space.regions(IoOpts::FORCE).unwrap();
    mem.write_slice(&image(), GuestAddress(DEFAULT_RAM_BASE))
        .unwrap();
    let ram = Range::from_len(DEFAULT_RAM_BASE, RAM).unwrap();
    let live_before = vm.slots().stats().live;
    assert_eq!(
        vm.slots().stats().live,
        live_before,
        "host writes alone install nothing"
    );
    if install == Install::Explicit {
        // The boot region is installed already; RAM is what is new.
        let shown = vm.install_host_writes().unwrap();
        assert_eq!(shown, BOOT_SIZE + RAM);
        assert!(vm.slots().stats().live > live_before, "RAM got a slot");
        assert_eq!(space.install_populated(ram).unwrap(), RAM, "idempotent");
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    layout
        .setup_vcpu(vcpu.fd(), kvm, 0, &EntryArgs::default())
        .unwrap();
    let mut h = FirstOut::default();
    let stop = vcpu.run_with(&mut h).unwrap();
    assert_eq!(stop, VcpuStop::Handler, "failure: {:?}", h.failure);
    let (port, data) = h.out.expect("the guest reached its EXIT hypercall");
    assert_eq!(port, 0x11);
    let sum = u32::from_le_bytes(data[..4].try_into().unwrap());
    (vm.stats(), u64::from(sum))
}

#[test]
fn installing_host_written_memory_spares_the_guest_its_faults() {
    common::log_from_env();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let expected = image()
        .chunks(PAGE_SIZE as usize)
        .map(|p| u64::from_le_bytes(p[..8].try_into().unwrap()))
        .fold(0u64, u64::wrapping_add) as u32;

    let (lazy, sum) = run(&kvm, Install::Never);
    assert_eq!(sum, u64::from(expected), "the guest read the host's bytes");
    let (installed, sum) = run(&kvm, Install::Explicit);
    assert_eq!(sum, u64::from(expected), "the guest read the host's bytes");
    let (first_run, sum) = run(&kvm, Install::AtFirstRun);
    assert_eq!(sum, u64::from(expected), "the guest read the host's bytes");
    eprintln!(
        "memory exits: {} without an install, {} with install_host_writes, {} with the first run's",
        lazy.memory_exits, installed.memory_exits, first_run.memory_exits
    );
    assert_eq!(
        first_run.memory_exits, 0,
        "the first run installed what the loader wrote"
    );
    let pages = RAM / PAGE_SIZE;
    assert!(
        lazy.memory_exits >= pages,
        "without the install every page faults: {} exits for {pages} pages",
        lazy.memory_exits
    );
    assert!(
        installed.memory_exits * 100 <= lazy.memory_exits,
        "{} exits with the install, {} without",
        installed.memory_exits,
        lazy.memory_exits
    );
}
