//! A VM running machine code given by a test (64-bit, CPL3, the boot layout
//! of `guestmm::vmm::boot`): a precommitted boot region and lazy RAM.

use std::sync::Arc;

use guestmm::kvm::{Vcpu, Vm, VmOptions};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::MapOpts;
use guestmm::vmm::boot::{BootLayout, EntryArgs, DEFAULT_RAM_BASE};
use guestmm::Perms;
use kvm_ioctls::Kvm;

/// How [`boot_vm`] builds the VM.
#[derive(Clone, Default)]
pub struct GuestVm {
    /// Options of the VM.
    pub vm: VmOptions,
    /// Options of its memory file.
    pub memfile: MemoryFileOptions,
}

/// A VM running `code` on `vcpus` vCPUs over `ram` bytes of lazy private
/// RAM at `DEFAULT_RAM_BASE` (entry registers: see `guest/abi.h`).
pub fn boot_vm(
    kvm: &Kvm,
    code: &[u8],
    vcpus: u32,
    ram: u64,
    opts: GuestVm,
) -> (Arc<Vm>, Vec<Vcpu>) {
    let memfile = Arc::new(MemoryFile::new("test-guest-vm", opts.memfile).unwrap());
    let vm = Vm::new(kvm, memfile, opts.vm).unwrap();
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram, vcpus).unwrap();
    let space = vm.space();
    layout.map_boot_region(space, code).unwrap();
    space
        .map(
            MapOpts::anonymous(ram)
                .fixed(DEFAULT_RAM_BASE)
                .perms(Perms::ALL)
                .name("ram"),
        )
        .unwrap();
    let list = (0..vcpus)
        .map(|i| {
            let v = vm.create_vcpu(i).unwrap();
            layout
                .setup_vcpu(v.fd(), kvm, i, &EntryArgs::default())
                .unwrap();
            v
        })
        .collect();
    (vm, list)
}
