//! Boots an unmodified Linux kernel (`vmlinux` ELF) on guestmm memory:
//! linux-loader writes the kernel, command line and boot parameters through
//! the region view of the address space ([`crate::mm::SpaceRegions`]), a
//! 16550 UART (vm-superio) is the console, the irqchip and PIT are KVM's.
//!
//! Two entries: the 64-bit boot protocol (`startup_64` in long mode with a
//! zero page, what Firecracker does) and PVH (32-bit protected mode, paging
//! off, an `hvm_start_info` in `rbx`), chosen with [`BootProtocol`].
//!
//! RAM is one anonymous mapping at guest-physical 0, lazy by default (what
//! the loader writes is populated and installed before the first run, the
//! rest faults in on first touch) or precommitted with `eager`.
//!
//! On hosts that emulate guest CPL0 code (PVM), the host cannot emulate
//! `cmpxchg16b`, `xrstor`, `clac`/`stac`, `popcnt`, `int3` or `fwait` for
//! the guest. [`LinuxOptions::default`] clears CX16 and SMAP in CPUID, and
//! [`DEFAULT_CMDLINE`] passes `noxsave` and `clearcpuid=smap,smep,popcnt`
//! (the CPUID bits alone did not keep the kernel from patching in `clac`
//! here); an `int3` the host cannot run is delivered to the guest as `#BP`
//! (the kernel's own int3 self-test), and an `fwait` (a no-op without a
//! pending x87 exception, which a kernel booting with the x87 masked never
//! has) is stepped over.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use log::{debug, info};
use vm_memory::{Bytes, GuestAddress};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::{
    Action, EmulationFailure, ExitHandler, MemoryViolation, Vcpu, VcpuStop, Vm, VmError, VmOptions,
    VmStats,
};
use crate::memfile::{MemoryFile, MemoryFileOptions};
use crate::mm::{AddressSpaceOptions, IoOpts, MapOpts, MmError, SpaceRegions, Stats};
use crate::Perms;

const MIB: u64 = 1 << 20;

/// Where the boot structures live (below the kernel, above the real-mode IVT).
const GDT_GPA: u64 = 0x500;
const IDT_GPA: u64 = 0x520;
const ZERO_PAGE_GPA: u64 = 0x7000;
const BOOT_STACK_TOP: u64 = 0x8ff0;
const PML4_GPA: u64 = 0x9000;
const PDPT_GPA: u64 = 0xa000;
const PD_GPA: u64 = 0xb000;
/// `hvm_start_info` and its memory map (PVH).
const START_INFO_GPA: u64 = 0x6000;
const MEMMAP_GPA: u64 = 0x6040;
const CMDLINE_GPA: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA: RAM below it is usable, the legacy hole above it not.
const EBDA_GPA: u64 = 0x9_fc00;
const HIMEM_GPA: u64 = 0x10_0000;
/// KVM's TSS and identity-map pages for real-mode emulation, above RAM.
const KVM_TSS_GPA: u64 = 0xfffb_d000;
/// RAM must end below KVM's TSS and the 32-bit MMIO hole.
const MAX_RAM: u64 = 3 << 30;

/// GDT selectors the boot protocols expect (`__BOOT_CS`, `__BOOT_DS`).
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;

/// COM1.
const COM1_BASE: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;

const CPUID1_ECX_CX16: u32 = 1 << 13;
const CPUID7_EBX_SMAP: u32 = 1 << 20;
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;

/// The command line passed when none is given: a serial console from the
/// start (earlyprintk), a fixed kernel address, and the PVM workarounds
/// (`noxsave`, `clearcpuid=smap,smep,popcnt`: see the module docs).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0 noxsave clearcpuid=smap,smep,popcnt nokaslr reboot=t panic=-1";

/// Which entry point of the kernel to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// The 64-bit boot protocol: `startup_64`, long mode, a zero page.
    Linux64,
    /// Xen's PVH entry (the `XEN_ELFNOTE_PHYS32_ENTRY` note of the ELF).
    Pvh,
}

/// How to boot a kernel.
#[derive(Debug, Clone)]
pub struct LinuxOptions {
    /// Path to an uncompressed `vmlinux` ELF.
    pub kernel: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Optional initial ramdisk, loaded at the top of RAM.
    pub initrd: Option<PathBuf>,
    /// RAM size (a multiple of 2 MiB, at least 64 MiB, at most 3 GiB).
    pub ram_size: u64,
    /// Precommit RAM as one slot (the baseline) instead of lazy RAM.
    pub eager: bool,
    /// Entry point.
    pub protocol: BootProtocol,
    /// Clear CX16 and SMAP in CPUID, whose instructions hosts that emulate
    /// guest CPL0 code cannot run (see the module docs).
    pub cpl0_workarounds: bool,
    /// First and largest fault-around window.
    pub fault_around: u64,
    /// Largest fault-around window.
    pub fault_around_max: u64,
    /// Stop once the console has printed this text.
    pub stop_at: Option<String>,
    /// Stop after this long.
    pub timeout: Duration,
    /// Copy console output to stdout as it comes.
    pub echo: bool,
}

impl Default for LinuxOptions {
    fn default() -> Self {
        let space = VmOptions::default().space;
        LinuxOptions {
            kernel: PathBuf::new(),
            cmdline: DEFAULT_CMDLINE.to_string(),
            initrd: None,
            ram_size: 256 * MIB,
            eager: false,
            protocol: BootProtocol::Linux64,
            cpl0_workarounds: true,
            fault_around: space.fault_around,
            fault_around_max: space.fault_around_max,
            stop_at: None,
            timeout: Duration::from_secs(600),
            echo: false,
        }
    }
}

/// How a boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinuxEnd {
    /// The console printed [`LinuxOptions::stop_at`].
    Reached,
    /// The timeout passed first.
    TimedOut,
    /// The vCPU stopped on its own (triple fault, a violation, an
    /// instruction nothing could run, a host error): the reason.
    Stopped(String),
}

/// What a boot did.
#[derive(Debug, Clone)]
pub struct LinuxReport {
    /// How it ended.
    pub end: LinuxEnd,
    /// Everything the guest wrote to COM1.
    pub console: String,
    /// Time from the first `KVM_RUN` to the end.
    pub elapsed: Duration,
    /// Port I/O exits handled by the VMM (the UART and unclaimed ports).
    pub port_exits: u64,
    /// `#BP` exceptions delivered for `int3`s the host could not run.
    pub injected_breakpoints: u64,
    /// `fwait`s the host could not run, stepped over.
    pub skipped_fwaits: u64,
    /// VM counters.
    pub vm: VmStats,
    /// Address space counters.
    pub mm: Stats,
    /// Bytes of guest memory populated at the end.
    pub populated_bytes: u64,
}

/// Why a kernel could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// A bad option.
    #[error("bad option: {0}")]
    BadOption(String),
    /// The kernel or initrd file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// linux-loader refused the kernel, command line or boot parameters.
    #[error("loader: {0}")]
    Loader(String),
    /// PVH was asked for and the kernel has no PVH entry note.
    #[error("the kernel has no PVH entry point")]
    NoPvhEntry,
    /// The VM or a vCPU could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The address space refused a mapping or a write.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// The memory file could not be created.
    #[error(transparent)]
    File(#[from] crate::memfile::MemoryFileError),
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> LinuxError {
    move |source| LinuxError::Kvm { op, source }
}

fn loader_err(e: impl std::fmt::Display) -> LinuxError {
    LinuxError::Loader(e.to_string())
}

/// Boots `opts.kernel` on a new guestmm VM and runs it until the console
/// shows `opts.stop_at`, the timeout passes, or the vCPU stops.
pub fn boot_linux(kvm: &Kvm, opts: &LinuxOptions) -> Result<LinuxReport, LinuxError> {
    if opts.ram_size < 64 * MIB || opts.ram_size > MAX_RAM || opts.ram_size % (2 * MIB) != 0 {
        return Err(LinuxError::BadOption(format!(
            "RAM size {} MiB: want a multiple of 2 MiB from 64 MiB to 3 GiB",
            opts.ram_size / MIB
        )));
    }
    let memfile = Arc::new(MemoryFile::new(
        "guestmm-linux",
        MemoryFileOptions::default(),
    )?);
    let vm = Vm::new(
        kvm,
        memfile,
        VmOptions {
            space: AddressSpaceOptions {
                // Below KVM's TSS pages.
                size: 4 << 30,
                fault_around: opts.fault_around,
                fault_around_max: opts.fault_around_max.max(opts.fault_around),
                ..VmOptions::default().space
            },
            ..VmOptions::default()
        },
    )?;
    // The irqchip must exist before the vCPU.
    let vm_fd = vm.vm_fd();
    vm_fd
        .set_tss_address(KVM_TSS_GPA as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let space = vm.space().clone();
    let mut ram = MapOpts::anonymous(opts.ram_size)
        .fixed(0)
        .perms(Perms::ALL)
        .name("ram");
    if opts.eager {
        ram = ram.precommit();
    }
    space.map(ram)?;
    let mem = SpaceRegions::new(space.clone(), IoOpts::FORCE)?;

    let mut kernel = File::open(&opts.kernel).map_err(|source| LinuxError::Io {
        path: opts.kernel.clone(),
        source,
    })?;
    let loaded =
        Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_GPA))).map_err(loader_err)?;
    info!(
        "kernel loaded at {:#x}..{:#x}",
        loaded.kernel_load.0, loaded.kernel_end
    );
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(loader_err)?;
    cmdline.insert_str(&opts.cmdline).map_err(loader_err)?;
    load_cmdline(&mem, GuestAddress(CMDLINE_GPA), &cmdline).map_err(loader_err)?;
    let cmdline_size = cmdline.as_cstring().map_err(loader_err)?.as_bytes().len() + 1;
    let initrd = match &opts.initrd {
        Some(path) => Some(load_initrd(&mem, path, opts.ram_size, loaded.kernel_end)?),
        None => None,
    };

    let entry = match opts.protocol {
        BootProtocol::Linux64 => {
            write_zero_page(&mem, opts.ram_size, cmdline_size, initrd)?;
            loaded.kernel_load.0
        }
        BootProtocol::Pvh => {
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                return Err(LinuxError::NoPvhEntry);
            };
            write_start_info(&mem, opts.ram_size, initrd)?;
            entry.0
        }
    };
    write_boot_tables(&space)?;

    let vcpu = vm.create_vcpu(0)?;
    setup_vcpu(vcpu.fd(), kvm, opts, entry)?;

    // The UART raises IRQ 4 through an irqfd.
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| LinuxError::Io {
        path: "eventfd".into(),
        source: e,
    })?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut handler = LinuxExits {
        serial: Serial::new(
            IrqTrigger(irq),
            ConsoleOut {
                buf: console.clone(),
                echo: opts.echo,
            },
        ),
        console: console.clone(),
        stop_at: opts.stop_at.clone(),
        reached: false,
        port_exits: 0,
        injected_breakpoints: 0,
        skipped_fwaits: 0,
        seen: 0,
    };

    let start = Instant::now();
    let (done_tx, done_rx) = mpsc::channel();
    let vcpu_thread = std::thread::Builder::new()
        .name("linux-vcpu0".into())
        .spawn(move || {
            let mut vcpu = vcpu;
            let result = vcpu.run_with(&mut handler);
            let _ = done_tx.send(());
            (result, handler)
        })
        .map_err(|source| LinuxError::Io {
            path: "vcpu thread".into(),
            source,
        })?;
    let timed_out = done_rx.recv_timeout(opts.timeout).is_err();
    if timed_out {
        vm.stop();
    }
    let (result, handler) = vcpu_thread
        .join()
        .map_err(|_| LinuxError::BadOption("the vCPU thread panicked".into()))?;
    let elapsed = start.elapsed();
    let end = if handler.reached {
        LinuxEnd::Reached
    } else if timed_out {
        LinuxEnd::TimedOut
    } else {
        LinuxEnd::Stopped(match result {
            Ok(VcpuStop::Handler) => "stopped by the exit handler".into(),
            Ok(VcpuStop::Violation(v)) => v.to_string(),
            Ok(VcpuStop::EmulationFailure(f)) => f.to_string(),
            Ok(VcpuStop::Stopped) => vm
                .stop_cause()
                .map_or("the VM was stopped".into(), |c| c.to_string()),
            Err(e) => e.to_string(),
        })
    };
    let console =
        String::from_utf8_lossy(&console.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let mm = space.stats();
    Ok(LinuxReport {
        end,
        console,
        elapsed,
        port_exits: handler.port_exits,
        injected_breakpoints: handler.injected_breakpoints,
        skipped_fwaits: handler.skipped_fwaits,
        vm: vm.stats(),
        populated_bytes: mm.populated_bytes,
        mm,
    })
}

/// Loads an initrd at the top of RAM (page aligned); returns (address, size).
fn load_initrd(
    mem: &SpaceRegions,
    path: &std::path::Path,
    ram_size: u64,
    kernel_end: u64,
) -> Result<(u64, u64), LinuxError> {
    let io = |source| LinuxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let size = bytes.len() as u64;
    let addr = ram_size
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            LinuxError::BadOption(format!("initrd of {size} bytes does not fit in RAM"))
        })?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(loader_err)?;
    Ok((addr, size))
}

/// The usable RAM ranges: below the EBDA, and from 1 MiB to the end.
fn ram_ranges(ram_size: u64) -> [(u64, u64); 2] {
    [(0, EBDA_GPA), (HIMEM_GPA, ram_size - HIMEM_GPA)]
}

const E820_RAM: u32 = 1;

fn write_zero_page(
    mem: &SpaceRegions,
    ram_size: u64,
    cmdline_size: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), LinuxError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size)) in ram_ranges(ram_size).into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = 2;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_GPA)),
        mem,
    )
    .map_err(loader_err)
}

fn write_start_info(
    mem: &SpaceRegions,
    ram_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), LinuxError> {
    if initrd.is_some() {
        return Err(LinuxError::BadOption(
            "an initrd with PVH is not supported (use the 64-bit protocol)".into(),
        ));
    }
    let memmap: Vec<hvm_memmap_table_entry> = ram_ranges(ram_size)
        .into_iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
        version: 1,
        cmdline_paddr: CMDLINE_GPA,
        memmap_paddr: MEMMAP_GPA,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_GPA));
    params.set_sections(&memmap, GuestAddress(MEMMAP_GPA));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(loader_err)
}

/// GDT, an empty IDT and identity page tables for the first GiB (2 MiB
/// pages), as the 64-bit boot protocol needs; PVH uses only the GDT.
fn write_boot_tables(space: &crate::mm::AddressSpace) -> Result<(), LinuxError> {
    let gdt: [u64; 4] = [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code (PVH: 32-bit, see setup_vcpu)
        gdt_entry(0xc093, 0, 0xfffff), // data
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    space.write_with(GDT_GPA, &bytes, IoOpts::FORCE)?;
    space.write_with(IDT_GPA, &[0u8; 8], IoOpts::FORCE)?;
    space.write_with(PML4_GPA, &(PDPT_GPA | 0x3).to_le_bytes(), IoOpts::FORCE)?;
    space.write_with(PDPT_GPA, &(PD_GPA | 0x3).to_le_bytes(), IoOpts::FORCE)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    space.write_with(PD_GPA, &pd, IoOpts::FORCE)?;
    Ok(())
}

/// A GDT entry from flags (type, S, DPL, P, AVL, L, D/B, G), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags);
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// A segment register as KVM wants it, from a GDT entry.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = (entry >> 55) & 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: g as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn setup_vcpu(vcpu: &VcpuFd, kvm: &Kvm, opts: &LinuxOptions, entry: u64) -> Result<(), LinuxError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx &= 0x00ff_ffff; // APIC id 0
                e.ecx |= CPUID1_ECX_HYPERVISOR;
                if opts.cpl0_workarounds {
                    e.ecx &= !CPUID1_ECX_CX16;
                }
            }
            7 if e.index == 0 && opts.cpl0_workarounds => e.ebx &= !CPUID7_EBX_SMAP,
            0xb | 0x1f => e.edx = 0,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    // LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut word = [0u8; 4];
        for (i, b) in word.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(word) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

    let mut fpu = vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let data = segment(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = 7;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match opts.protocol {
        BootProtocol::Linux64 => {
            sregs.cs = segment(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
            sregs.cr3 = PML4_GPA;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
            regs.rsi = ZERO_PAGE_GPA;
        }
        BootProtocol::Pvh => {
            // 32-bit flat protected mode, paging off.
            sregs.cs = segment(gdt_entry(0xc09b, 0, 0xfffff), BOOT_CS);
            sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = START_INFO_GPA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    debug!("linux vcpu: {:?} entry {entry:#x}", opts.protocol);
    Ok(())
}

/// Raises the UART's interrupt through an irqfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's output: kept for the report, copied to stdout if asked.
struct ConsoleOut {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl Write for ConsoleOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        if self.echo {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The VMM side of the run loop: COM1, nothing on other ports, `#BP` for
/// `int3`s the host cannot run.
struct LinuxExits {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
    console: Arc<Mutex<Vec<u8>>>,
    stop_at: Option<String>,
    reached: bool,
    port_exits: u64,
    injected_breakpoints: u64,
    skipped_fwaits: u64,
    /// Console bytes already searched for `stop_at` (minus its length).
    seen: usize,
}

impl LinuxExits {
    fn check_stop(&mut self) -> Action {
        let Some(needle) = &self.stop_at else {
            return Action::Continue;
        };
        let console = self.console.lock().unwrap_or_else(|e| e.into_inner());
        let from = self.seen.min(console.len());
        let found = console[from..]
            .windows(needle.len())
            .any(|w| w == needle.as_bytes());
        self.seen = console.len().saturating_sub(needle.len());
        if found {
            self.reached = true;
            Action::Stop
        } else {
            Action::Continue
        }
    }
}

impl ExitHandler for LinuxExits {
    fn io_out(&mut self, _vcpu: &Vcpu, port: u16, data: &[u8]) -> Action {
        self.port_exits += 1;
        if (COM1_BASE..COM1_BASE + 8).contains(&port) && data.len() == 1 {
            if let Err(e) = self.serial.write((port - COM1_BASE) as u8, data[0]) {
                log::warn!("uart: {e:?}");
            }
            return self.check_stop();
        }
        Action::Continue
    }

    fn io_in(&mut self, _vcpu: &Vcpu, port: u16, data: &mut [u8]) -> Action {
        self.port_exits += 1;
        if (COM1_BASE..COM1_BASE + 8).contains(&port) && data.len() == 1 {
            data[0] = self.serial.read((port - COM1_BASE) as u8);
        } else {
            data.fill(0xff);
        }
        Action::Continue
    }

    fn violation(&mut self, _vcpu: &Vcpu, v: &MemoryViolation) -> Action {
        log::warn!("linux guest: {v}");
        Action::Stop
    }

    fn emulation_failure(&mut self, vcpu: &Vcpu, f: &EmulationFailure) -> Action {
        let first = f.instruction.bytes().first().copied();
        if f.violation.is_none() && first == Some(0xcc) {
            match inject_breakpoint(vcpu.fd()) {
                Ok(()) => {
                    self.injected_breakpoints += 1;
                    return Action::Continue;
                }
                Err(e) => log::warn!("could not inject #BP: {e}"),
            }
        }
        if f.violation.is_none() && first == Some(0x9b) {
            match step_over(vcpu.fd(), 1) {
                Ok(()) => {
                    self.skipped_fwaits += 1;
                    return Action::Continue;
                }
                Err(e) => log::warn!("could not step over fwait: {e}"),
            }
        }
        log::warn!("linux guest: {f}");
        Action::Stop
    }

    fn hlt(&mut self, _vcpu: &Vcpu) -> Action {
        // With the in-kernel irqchip KVM waits in HLT itself; an exit
        // means the guest halted for good.
        Action::Stop
    }
}

/// Moves RIP past an instruction of `len` bytes.
fn step_over(vcpu: &VcpuFd, len: u64) -> Result<(), kvm_ioctls::Error> {
    let mut regs = vcpu.get_regs()?;
    regs.rip += len;
    vcpu.set_regs(&regs)
}

/// Delivers the `#BP` an `int3` raises: a trap, so the exception frame
/// holds the address after the instruction.
fn inject_breakpoint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    step_over(vcpu, 1)?;
    let mut events = vcpu.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    vcpu.set_vcpu_events(&events)
}
