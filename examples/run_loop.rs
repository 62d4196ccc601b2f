//! A VMM that keeps its own run loop: each `Vcpu::run` is one `KVM_RUN`,
//! guestmm resolves memory exits inside it and hands back the rest
//! (`Exit`). Another thread pauses every vCPU (`Vm::pause`), looks at guest
//! memory while nothing runs, resumes, and kicks a vCPU out of the guest
//! (`VcpuKicker::kick`), the way a VMM stops vCPUs for a snapshot or for
//! its own events.
//!
//! Run with `cargo run --features vmm --example run_loop` (needs /dev/kvm;
//! the `vmm` feature only provides the test guest it boots).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guestmm::kvm::{Exit, Vm, VmOptions};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{IoOpts, MapOpts};
use guestmm::vmm::boot::{BootLayout, EntryArgs, BOOT_SIZE, DEFAULT_RAM_BASE};
use guestmm::vmm::guests;
use guestmm::vmm::hypercall::{self, Hypercall};
use guestmm::Perms;
use kvm_ioctls::Kvm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let memfile = Arc::new(MemoryFile::new("run-loop", MemoryFileOptions::default())?);
    let vm = Vm::new(&kvm, memfile, VmOptions::default())?;
    let space = vm.space().clone();

    // The `touch` guest writes every page of 256 MiB of lazy RAM twice,
    // long enough to be paused and kicked on the way.
    let guest = guests::find("touch").expect("touch guest");
    let ram_size = 256 << 20;
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram_size, 1)?;
    space.map(
        MapOpts::anonymous(BOOT_SIZE)
            .fixed(0)
            .perms(Perms::ALL)
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
    let mut vcpu = vm.create_vcpu(0)?;
    layout.setup_vcpu(vcpu.fd(), &kvm, 0, &EntryArgs::default())?;
    let kicker = vcpu.kicker();

    // The VMM's control thread: pause, inspect, resume, kick.
    let done = Arc::new(AtomicBool::new(false));
    let control = {
        let (vm, done) = (vm.clone(), done.clone());
        std::thread::spawn(move || -> Result<(), String> {
            std::thread::sleep(Duration::from_millis(100));
            if done.load(Ordering::Acquire) {
                return Ok(());
            }
            {
                let _paused = vm.pause().map_err(|e| e.to_string())?;
                // No vCPU is inside KVM_RUN: memory is stable.
                let a = vm.space().stats().populated_bytes;
                std::thread::sleep(Duration::from_millis(50));
                let b = vm.space().stats().populated_bytes;
                println!(
                    "paused: {} MiB populated, unchanged while paused: {}",
                    a >> 20,
                    a == b
                );
            } // the vCPUs resume here
            std::thread::sleep(Duration::from_millis(20));
            kicker.kick();
            Ok(())
        })
    };

    // The run loop.
    let mut kicks = 0;
    let code = loop {
        match vcpu.run()? {
            Exit::Resolved => {}
            Exit::IoOut { port, data } => {
                let data = data.to_vec();
                let regs = if hypercall::needs_regs(port) {
                    vcpu.fd().get_regs()?
                } else {
                    Default::default()
                };
                match hypercall::decode(port, &data, &regs)? {
                    Hypercall::Exit(code) => break code,
                    Hypercall::Mark(n) => println!("guest mark {n}"),
                    other => println!("hypercall {other:?}"),
                }
            }
            Exit::Kicked => {
                // Whatever brought the VMM here (a device event, a
                // snapshot request) is handled; then back into the guest.
                kicks += 1;
                println!("kicked out of the guest");
            }
            Exit::Violation(v) => return Err(format!("violation: {v}").into()),
            Exit::EmulationFailure(f) => return Err(format!("stuck: {f}").into()),
            Exit::Stopped => return Err("the VM was stopped".into()),
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    };
    done.store(true, Ordering::Release);
    control.join().map_err(|_| "control thread panicked")??;
    let stats = vm.stats();
    println!(
        "guest exit code {code}; kicks seen {kicks}; memory exits {}; slot pauses {}",
        stats.memory_exits, stats.slot_pauses
    );
    if code != 0 {
        return Err("the guest failed its checks".into());
    }
    Ok(())
}
