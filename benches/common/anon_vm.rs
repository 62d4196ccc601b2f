//! The baseline without guestmm: the boot region and RAM are plain
//! anonymous `mmap`s registered as memslots up front (what Firecracker
//! does), run by a minimal single-vCPU loop over the hypercall ABI. Boot
//! setup is shared with guestmm's runner through `guestmm::vmm::boot`.
//!
//! The peers a VMM author would otherwise pick use the same VM with RAM
//! prepared differently ([`RamMode`]): prefilled before start, with
//! `MADV_HUGEPAGE`, or registered with userfaultfd and filled by a handler
//! thread.

use std::time::{Duration, Instant};

use guestmm::kvm::{KvmStats, KvmStatsReader};
use guestmm::vmm::boot::{BootLayout, EntryArgs, BOOT_SIZE, DEFAULT_RAM_BASE};
use guestmm::vmm::guests::Guest;
use guestmm::vmm::hypercall::{self, Hypercall};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::host_mem::HostMem;
use super::uffd::{UffdHandler, UffdMode};

const HUGE: usize = 2 << 20;

/// How the RAM of an [`AnonVm`] is prepared before the vCPU first runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamMode {
    /// Untouched: the host kernel faults 4 KiB pages in as KVM touches them.
    Plain,
    /// Every page written in before start (`MADV_POPULATE_WRITE`): the
    /// limit, nothing left to fault on the host side.
    Prefilled,
    /// `MADV_HUGEPAGE` on the (2 MiB aligned) RAM: the host faults in
    /// transparent huge pages where it can.
    Huge,
    /// Registered with userfaultfd (missing mode); a handler thread
    /// resolves each fault as the mode says.
    Uffd(UffdMode),
}

/// Guest RAM: a private anonymous mapping, 2 MiB aligned (so huge pages
/// and 2 MiB userfaultfd copies line up), unmapped on drop.
///
/// Invariant: `ptr..ptr + len` is a mapping owned by this value.
pub struct AnonRam {
    ptr: *mut u8,
    len: usize,
}

impl AnonRam {
    /// Maps `len` bytes (a multiple of 2 MiB), 2 MiB aligned.
    pub fn new(len: u64) -> AnonRam {
        let len = usize::try_from(len).expect("fits the host");
        assert_eq!(len % HUGE, 0, "RAM must be a multiple of 2 MiB");
        // SAFETY: a fresh anonymous mapping with no address hint, one huge
        // page larger so an aligned start exists; no existing memory is
        // affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap of {len} bytes failed");
        let addr = raw as usize;
        let start = addr.next_multiple_of(HUGE);
        // SAFETY: trimming the parts of our own fresh mapping outside
        // `start..start + len`.
        unsafe {
            if start > addr {
                libc::munmap(raw, start - addr);
            }
            let tail = addr + len + HUGE - (start + len);
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        AnonRam {
            ptr: start as *mut u8,
            len,
        }
    }

    /// Maps `len` bytes of `file` `MAP_PRIVATE`: the host kernel's own
    /// copy-on-write (a write copies the page into anonymous memory).
    pub fn private_file(file: &std::fs::File, len: u64) -> AnonRam {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).expect("fits the host");
        // SAFETY: a fresh private mapping of a file we hold, no address
        // hint; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap of the template failed");
        AnonRam {
            ptr: raw.cast(),
            len,
        }
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    fn madvise(&self, advice: i32, what: &str) {
        // SAFETY: advice on exactly our own mapping.
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, advice) };
        assert_eq!(r, 0, "{what}: {}", std::io::Error::last_os_error());
    }

    /// Registers this memory as memslot `slot` at `gpa`.
    pub fn register(&self, vm: &VmFd, slot: u32, gpa: u64) {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: self.len as u64,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: the mapping outlives the slot: AnonVm drops its vCPU and
        // VM fd before its RAM (field order).
        unsafe { vm.set_user_memory_region(region) }.expect("set_user_memory_region");
    }
}

impl Drop for AnonRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly our own mapping (invariant).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A one-vCPU VM over eager anonymous memory. Field order matters: the
/// vCPU and the VM go before the userfaultfd handler, the handler before
/// the memory it fills.
pub struct AnonVm {
    vcpu: VcpuFd,
    _vm: VmFd,
    stats: Option<KvmStatsReader>,
    uffd: Option<UffdHandler>,
    _boot: HostMem,
    _ram: AnonRam,
    _template: Option<AnonRam>,
    created: Instant,
    prefill: Option<Duration>,
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
    /// Missing faults the userfaultfd handler resolved (0 without one).
    pub uffd_faults: u64,
    /// How long the prefill before start took ([`RamMode::Prefilled`]).
    pub prefill: Option<Duration>,
}

impl AnonVm {
    /// Creates the VM, registers the boot region and `ram_size` bytes of
    /// RAM, writes the boot image and sets up vCPU 0.
    pub fn new(kvm: &Kvm, guest: &Guest, ram_size: u64) -> AnonVm {
        Self::with_mode(kvm, guest, ram_size, RamMode::Plain).expect("plain RAM")
    }

    /// As [`AnonVm::new`], RAM prepared as `mode` says. `Err` says why the
    /// mode is unavailable here (userfaultfd refused).
    pub fn with_mode(
        kvm: &Kvm,
        guest: &Guest,
        ram_size: u64,
        mode: RamMode,
    ) -> Result<AnonVm, String> {
        Self::with_template(kvm, guest, ram_size, mode, None)
    }

    /// As [`AnonVm::with_mode`], plus `template` (a file and its size)
    /// mapped `MAP_PRIVATE` as one more slot right after RAM and passed in
    /// `r8`/`r9`, as guestmm's runner passes its template.
    pub fn with_template(
        kvm: &Kvm,
        guest: &Guest,
        ram_size: u64,
        mode: RamMode,
        template: Option<(&std::fs::File, u64)>,
    ) -> Result<AnonVm, String> {
        let created = Instant::now();
        let layout = BootLayout::new(DEFAULT_RAM_BASE, ram_size, 1).expect("layout");
        let vm = kvm.create_vm().expect("create_vm");
        let mut boot = HostMem::new(BOOT_SIZE);
        for (gpa, bytes) in layout.boot_image(guest.image).expect("boot image") {
            boot.write(gpa, &bytes);
        }
        boot.register(&vm, 0, 0);
        let ram = AnonRam::new(ram_size);
        let mut uffd = None;
        let mut prefill = None;
        match mode {
            RamMode::Plain => {}
            RamMode::Huge => ram.madvise(libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
            RamMode::Prefilled => {
                let t = Instant::now();
                ram.madvise(libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE");
                prefill = Some(t.elapsed());
            }
            RamMode::Uffd(m) => {
                // SAFETY: `ram` outlives the handler (AnonVm field order).
                uffd = Some(unsafe { UffdHandler::start(ram.ptr as u64, ram.len as u64, m) }?);
            }
        }
        ram.register(&vm, 1, layout.ram_base());
        let mut args = EntryArgs::default();
        let template = template.map(|(file, size)| {
            // Where guestmm's runner maps it: right after RAM.
            args.template_base = layout.ram_base() + ram_size;
            args.template_size = size;
            let t = AnonRam::private_file(file, size);
            t.register(&vm, 2, args.template_base);
            t
        });
        let vcpu = vm.create_vcpu(0).expect("create_vcpu");
        layout.setup_vcpu(&vcpu, kvm, 0, &args).expect("setup_vcpu");
        let stats = KvmStatsReader::open(&vm, &[&vcpu]).ok();
        Ok(AnonVm {
            vcpu,
            _vm: vm,
            stats,
            uffd,
            _boot: boot,
            _ram: ram,
            _template: template,
            created,
            prefill,
        })
    }

    /// KVM's counters of this VM and its vCPU now (`None` on kernels
    /// without binary statistics).
    pub fn kvm_stats(&self) -> Option<KvmStats> {
        self.stats.as_ref().and_then(|r| r.read().ok())
    }

    /// Runs the vCPU until the guest's EXIT hypercall, or until its first
    /// hypercall if `stop_at_first`. Panics on anything unexpected.
    pub fn run(&mut self, stop_at_first: bool) -> AnonRun {
        let mut out = AnonRun {
            prefill: self.prefill,
            ..AnonRun::default()
        };
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
                    out.uffd_faults = self.uffd.as_ref().map_or(0, |u| u.faults());
                    out.elapsed = start.elapsed();
                    return out;
                }
                Ok(other) => panic!("eager-anon: {other:?} unsupported"),
                Err(e) => panic!("eager-anon: {e}"),
            }
        }
    }
}
