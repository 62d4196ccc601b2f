//! The baseline without guestmm: the boot region and RAM are plain
//! anonymous `mmap`s registered as memslots up front (what Firecracker
//! does), run by a minimal single-vCPU loop over the hypercall ABI. Boot
//! setup is shared with guestmm's runner through `guestmm::vmm::boot`.

use std::time::{Duration, Instant};

use guestmm::vmm::boot::{BootLayout, EntryArgs, BOOT_SIZE, DEFAULT_RAM_BASE};
use guestmm::vmm::guests::Guest;
use guestmm::vmm::hypercall::{self, Hypercall};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::host_mem::HostMem;

/// A one-vCPU VM over eager anonymous memory. Field order matters: the
/// vCPU and the VM go before the memory they use.
pub struct AnonVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    _boot: HostMem,
    _ram: HostMem,
    created: Instant,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct AnonRun {
    /// MARK hypercalls: (phase, time since the vCPU first ran).
    pub marks: Vec<(u32, Duration)>,
    /// First vCPU entry to the EXIT hypercall (or the stop).
    pub elapsed: Duration,
    /// VM creation to the first hypercall.
    pub first_hypercall: Option<Duration>,
    /// Exits from `KVM_RUN`.
    pub exits: u64,
    /// EXIT code, if the guest exited.
    pub exit_code: Option<u32>,
}

impl AnonVm {
    /// Creates the VM, registers the boot region and `ram_size` bytes of
    /// RAM, writes the boot image and sets up vCPU 0.
    pub fn new(kvm: &Kvm, guest: &Guest, ram_size: u64) -> AnonVm {
        let created = Instant::now();
        let layout = BootLayout::new(DEFAULT_RAM_BASE, ram_size, 1).expect("layout");
        let vm = kvm.create_vm().expect("create_vm");
        let mut boot = HostMem::new(BOOT_SIZE);
        for (gpa, bytes) in layout.boot_image(guest.image).expect("boot image") {
            boot.write(gpa, &bytes);
        }
        boot.register(&vm, 0, 0);
        let ram = HostMem::new(ram_size);
        ram.register(&vm, 1, layout.ram_base());
        let vcpu = vm.create_vcpu(0).expect("create_vcpu");
        layout
            .setup_vcpu(&vcpu, kvm, 0, &EntryArgs::default())
            .expect("setup_vcpu");
        AnonVm {
            vcpu,
            _vm: vm,
            _boot: boot,
            _ram: ram,
            created,
        }
    }

    /// Runs the vCPU until the guest's EXIT hypercall, or until its first
    /// hypercall if `stop_at_first`. Panics on anything unexpected.
    pub fn run(&mut self, stop_at_first: bool) -> AnonRun {
        let mut out = AnonRun::default();
        let start = Instant::now();
        loop {
            let (port, data) = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut buf = [0u8; 8];
                    let n = data.len().min(8);
                    buf[..n].copy_from_slice(&data[..n]);
                    (port, (buf, n))
                }
                Ok(other) => panic!("eager-anon: unexpected exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => panic!("eager-anon: KVM_RUN: {e}"),
            };
            out.exits += 1;
            if out.first_hypercall.is_none() {
                out.first_hypercall = Some(self.created.elapsed());
                if stop_at_first {
                    out.elapsed = start.elapsed();
                    return out;
                }
            }
            let regs = if hypercall::needs_regs(port) {
                self.vcpu.get_regs().expect("get_regs")
            } else {
                kvm_regs::default()
            };
            match hypercall::decode(port, &data.0[..data.1], &regs) {
                Ok(Hypercall::Console(_)) => {}
                Ok(Hypercall::Mark(n)) => out.marks.push((n, start.elapsed())),
                Ok(Hypercall::Exit(code)) => {
                    out.exit_code = Some(code);
                    out.elapsed = start.elapsed();
                    return out;
                }
                Ok(other) => panic!("eager-anon: {other:?} unsupported"),
                Err(e) => panic!("eager-anon: {e}"),
            }
        }
    }
}
