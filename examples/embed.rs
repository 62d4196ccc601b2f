//! Embedding guestmm in a VMM: create a VM whose RAM is lazily populated,
//! load a guest, run it with an exit handler, and look at what the memory
//! manager did.
//!
//! Run with `cargo run --example embed` (needs /dev/kvm).

use std::sync::Arc;

use guestmm::kvm::{Action, ExitHandler, MemoryViolation, Vcpu, Vm, VmOptions};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{IoOpts, MapOpts};
use guestmm::vmm::boot::{BootLayout, EntryArgs, BOOT_SIZE, DEFAULT_RAM_BASE};
use guestmm::vmm::guests;
use guestmm::vmm::hypercall::{self, Hypercall};
use guestmm::Perms;
use kvm_ioctls::Kvm;

/// The VMM's side: the guest's console and exit hypercalls.
#[derive(Default)]
struct Console {
    out: String,
    exit_code: Option<u32>,
}

impl ExitHandler for Console {
    fn io_out(&mut self, vcpu: &Vcpu, port: u16, data: &[u8]) -> Action {
        let regs = if hypercall::needs_regs(port) {
            vcpu.fd().get_regs().unwrap_or_default()
        } else {
            Default::default()
        };
        match hypercall::decode(port, data, &regs) {
            Ok(Hypercall::Console(b)) => self.out.push(char::from(b)),
            Ok(Hypercall::Exit(code)) => {
                self.exit_code = Some(code);
                return Action::Stop;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("bad hypercall: {e}");
                return Action::Stop;
            }
        }
        Action::Continue
    }

    fn violation(&mut self, _vcpu: &Vcpu, v: &MemoryViolation) -> Action {
        eprintln!("guest touched memory it may not: {v}");
        Action::Stop
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    // 1. Guest memory comes from one memfd.
    let memfile = Arc::new(MemoryFile::new("embed", MemoryFileOptions::default())?);
    // 2. The VM: a KVM VM, an address space, and memslots that follow it.
    let vm = Vm::new(&kvm, memfile.clone(), VmOptions::default())?;
    let space = vm.space();

    // 3. Boot memory (page tables, GDT, code) is precommitted: the CPU walks
    //    page tables without exiting. RAM is lazy: touched pages fault in.
    let guest = guests::find("touch").expect("touch guest");
    let ram_size = 64 << 20;
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram_size, 1)?;
    space.map(
        MapOpts::anonymous(BOOT_SIZE)
            .fixed(0)
            .perms(Perms::ALL)
            .precommit()
            .name("boot"),
    )?;
    for (gpa, bytes) in layout.boot_image(guest.image)? {
        space.write_with(gpa, &bytes, IoOpts::FORCE)?;
    }
    space.map(
        MapOpts::anonymous(ram_size)
            .fixed(DEFAULT_RAM_BASE)
            .perms(Perms::ALL)
            .name("ram"),
    )?;

    // 4. One vCPU in 64-bit user mode, run until the guest exits.
    let mut vcpu = vm.create_vcpu(0)?;
    layout.setup_vcpu(vcpu.fd(), &kvm, 0, &EntryArgs::default())?;
    let mut console = Console::default();
    vcpu.run_with(&mut console)?;

    // 5. What happened.
    let stats = vm.stats();
    println!("guest exit code: {:?}", console.exit_code);
    for line in space.maps() {
        println!("{line}");
    }
    println!(
        "memory exits: {}, fault-around windows: {}, slot adds/deletes: {}/{}, live slots: {}",
        stats.memory_exits,
        space.stats().windows,
        stats.slots.adds,
        stats.slots.deletes,
        stats.slots.live
    );
    println!(
        "guest memory committed: {} KiB",
        memfile.usage()?.total_committed() / 1024
    );
    if console.exit_code != Some(0) {
        return Err("the guest failed its checks".into());
    }
    Ok(())
}
