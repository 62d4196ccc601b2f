//! Startup: VM creation to the guest's first hypercall (the `hello` guest's
//! first CONSOLE byte), with 1 GiB and 64 GiB of RAM, lazy and eager.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::kvm::{Action, ExitHandler, Vcpu, Vm, VmOptions};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::MapOpts;
use guestmm::vmm::boot::{BootLayout, EntryArgs, DEFAULT_RAM_BASE};
use guestmm::vmm::guests;
use guestmm::Perms;
use kvm_ioctls::Kvm;

use crate::common::anon_vm::AnonVm;
use crate::common::{median, median_ms, Table, Target};

const GIB: u64 = 1 << 30;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lazy,
    EagerMemfd,
    EagerAnon,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Lazy => "lazy",
            Kind::EagerMemfd => "eager-memfd",
            Kind::EagerAnon => "eager-anon",
        }
    }
}

/// Stops at the first port write and notes when it came.
struct FirstOut {
    t0: Instant,
    at: Option<Duration>,
}

impl ExitHandler for FirstOut {
    fn io_out(&mut self, _: &Vcpu, _: u16, _: &[u8]) -> Action {
        self.at = Some(self.t0.elapsed());
        Action::Stop
    }
}

/// VM creation (memory file included) to the first hypercall, on guestmm.
fn guestmm_startup(kvm: &Kvm, ram: u64, eager: bool) -> Duration {
    let guest = guests::find("hello").expect("hello guest");
    let t0 = Instant::now();
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram, 1).expect("layout");
    let memfile =
        Arc::new(MemoryFile::new("startup", MemoryFileOptions::default()).expect("memfile"));
    let vm = Vm::new(kvm, memfile, VmOptions::default()).expect("vm");
    let space = vm.space().clone();
    layout
        .map_boot_region(&space, guest.image)
        .expect("boot region");
    let mut map = MapOpts::anonymous(ram)
        .fixed(layout.ram_base())
        .perms(Perms::ALL)
        .name("ram");
    if eager {
        map = map.precommit();
    }
    space.map(map).expect("map ram");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    layout
        .setup_vcpu(vcpu.fd(), kvm, 0, &EntryArgs::default())
        .expect("setup_vcpu");
    let mut h = FirstOut { t0, at: None };
    vcpu.run_with(&mut h).expect("run");
    let at = h.at.expect("hello made a hypercall");
    space.unmap(0, space.options().size).expect("unmap");
    at
}

fn one(kvm: &Kvm, kind: Kind, ram: u64) -> Duration {
    match kind {
        Kind::Lazy => guestmm_startup(kvm, ram, false),
        Kind::EagerMemfd => guestmm_startup(kvm, ram, true),
        Kind::EagerAnon => {
            let guest = guests::find("hello").expect("hello guest");
            let mut vm = AnonVm::new(kvm, guest, ram);
            vm.run(true).first_hypercall.expect("a hypercall")
        }
    }
}

pub fn run(kvm: &Kvm, table: &mut Table) {
    let kinds = [Kind::Lazy, Kind::EagerMemfd, Kind::EagerAnon];
    let sizes = [GIB, 64 * GIB];
    let reps = crate::reps().max(7);
    // samples[kind][size]
    let mut samples = vec![vec![Vec::new(); sizes.len()]; kinds.len()];
    for round in 0..reps {
        for (k, kind) in kinds.iter().enumerate() {
            for j in 0..sizes.len() {
                let s = (j + round) % sizes.len();
                samples[k][s].push(one(kvm, *kind, sizes[s]));
            }
        }
    }
    for (k, kind) in kinds.iter().enumerate() {
        for (s, size) in sizes.iter().enumerate() {
            table.bench(
                &format!("startup-{}g/{}", size / GIB, kind.name()),
                median_ms(&samples[k][s]),
                "ms",
                "hello guest: VM creation (memory file, VM, boot region, RAM vma, vCPU) → first CONSOLE",
            );
        }
        let ratios: Vec<f64> = samples[k][1]
            .iter()
            .zip(&samples[k][0])
            .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
            .collect();
        let name = match kind {
            Kind::Lazy => "startup-64g/1g".to_string(),
            _ => format!("startup-64g/1g/{}", kind.name()),
        };
        let f = table.ratio(&name, median(&ratios), "median of per-round ratios");
        if *kind == Kind::Lazy {
            f.target(Target::AtMost(1.2));
        }
    }
}
