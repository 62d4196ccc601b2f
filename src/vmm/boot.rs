//! x86-64 boot setup for the test guests: 64-bit long mode at CPL3.
//!
//! Guests run in user mode because guest code at CPL0 is emulated
//! instruction by instruction on this project's (nested) machines, while CPL3
//! code runs natively. The VMM loads every register through `KVM_SET_SREGS`
//! and `KVM_SET_REGS`; the guest never executes a privileged instruction.
//! This module knows nothing about how guest memory is managed: it describes
//! the boot region ([`BootLayout::boot_image`]) and the caller writes those
//! bytes wherever it keeps guest memory.
//!
//! # Guest-physical layout
//!
//! ```text
//! 0x0000_0000  boot region, BOOT_SIZE bytes (must be backed eagerly:
//!              KVM cannot walk a page table or read a GDT through a GPA
//!              without a memslot)
//!   0x0000_1000  GDT      null, 64-bit code DPL3 (0x08), data DPL3 (0x10), TSS (0x18)
//!   0x0000_2000  TSS      104 bytes + I/O bitmap allowing every port (TSS_SIZE)
//!   0x0010_0000  stacks   STACK_SIZE per vCPU, MAX_VCPUS of them
//!   0x0020_0000  code     the guest image, at most CODE_MAX_SIZE bytes
//!   0x0030_0000  PML4, then one PDPT, then up to MAX_PDS page directories
//! 0x3000_0000  HOLE_GPA, HOLE_SIZE bytes: identity-mapped, never backed;
//!              an access reaches the VMM as an MMIO exit
//! 0x4000_0000  DEFAULT_RAM_BASE: RAM (any 2 MiB aligned base outside the
//!              boot region and the hole)
//! ```
//!
//! The page tables identity-map `[0, mapped_end)` with 2 MiB pages that are
//! present, writable and user-accessible, where `mapped_end` is
//! `max(ram_end, 4 GiB)` rounded up to 1 GiB.
//!
//! # Entry ABI
//!
//! Every vCPU starts at [`CODE_GPA`] (the image's first byte) in 64-bit mode,
//! CPL3, RFLAGS = IOPL3 and a TSS I/O bitmap allowing every port (so `out`
//! is allowed and is the hypercall, see [`super::hypercall`]; the bitmap is
//! what makes it work under PVM, see [`TSS_SIZE`]), interrupts off, with:
//!
//! | register | value |
//! |---|---|
//! | `rdi` | RAM base GPA |
//! | `rsi` | RAM size in bytes |
//! | `rdx` | this vCPU's index (0-based) |
//! | `rcx` | vCPU count |
//! | `r8`  | template base GPA, 0 if none |
//! | `r9`  | template size in bytes, 0 if none |
//! | `r10` | [`HOLE_GPA`] |
//! | `r11` | flags: bit 0 set if the VM traps copy-on-write writes per page (`CowMode::UserfaultfdWp`) |
//! | `rsp` | top of this vCPU's stack minus 8 (as just after a `call`) |
//!
//! There is no IDT: any exception is a triple fault (`KVM_EXIT_SHUTDOWN`).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use log::debug;

/// 2 MiB: the page size of the identity map and the alignment RAM must have.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// 1 GiB: what one page directory maps.
const GIB: u64 = 1 << 30;

/// GPA of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// GPA of the 64-bit TSS.
pub const TSS_GPA: u64 = 0x2000;
/// Offset of the I/O permission bitmap in the TSS (right after the 104-byte TSS).
pub const TSS_IOPB_OFFSET: u64 = 104;
/// Size of the TSS: the 104-byte TSS, an all-zero I/O permission bitmap for
/// all 65536 ports (8 KiB) and the terminating 0xff byte.
///
/// The bitmap matters on hosts where KVM cannot honour RFLAGS.IOPL at CPL3:
/// under PVM (`kvm_pvm`, this project's machines) the hardware IOPL is forced
/// to 0, `out` raises #GP and KVM's emulator re-checks the access, against
/// the (virtual) IOPL 0 and then this bitmap. On VMX, IOPL = 3 suffices.
pub const TSS_SIZE: u64 = TSS_IOPB_OFFSET + 8192 + 1;
/// GPA of the first vCPU stack area.
pub const STACK_GPA: u64 = 0x10_0000;
/// Bytes of stack per vCPU.
pub const STACK_SIZE: u64 = 64 << 10;
/// Most vCPUs the stack area holds.
pub const MAX_VCPUS: u32 = 16;
/// GPA the guest image is loaded at and starts at (`guest/guest.ld` links there).
pub const CODE_GPA: u64 = 0x20_0000;
/// Largest guest image.
pub const CODE_MAX_SIZE: u64 = 1 << 20;
/// GPA of the PML4; the PDPT follows it, then the page directories.
pub const PML4_GPA: u64 = 0x30_0000;
/// GPA of the single PDPT (it maps up to 512 GiB).
pub const PDPT_GPA: u64 = PML4_GPA + 0x1000;
/// GPA of the first page directory; directory `i` maps `[i GiB, (i+1) GiB)`.
pub const PD_GPA: u64 = PDPT_GPA + 0x1000;
/// Most page directories, so the identity map ends at most at `MAX_PDS` GiB.
pub const MAX_PDS: u64 = 128;
/// The highest end of RAM the identity map can cover.
pub const MAX_MAPPED_END: u64 = MAX_PDS * GIB;
/// Size of the boot region `[0, BOOT_SIZE)`: everything above, rounded up to 2 MiB.
pub const BOOT_SIZE: u64 = round_up(PD_GPA + MAX_PDS * 0x1000, HUGE_PAGE_SIZE);
/// A GPA that the page tables map but nothing backs: guest accesses there
/// reach the VMM as MMIO exits (used by the `protect` guest).
pub const HOLE_GPA: u64 = 0x3000_0000;
/// Size of the hole; RAM may not overlap `[HOLE_GPA, HOLE_GPA + HOLE_SIZE)`.
pub const HOLE_SIZE: u64 = HUGE_PAGE_SIZE;
/// Default RAM base (1 GiB).
pub const DEFAULT_RAM_BASE: u64 = 0x4000_0000;

/// Selector of the 64-bit code segment (GDT index 1), RPL 3.
pub const CODE_SELECTOR: u16 = 0x08 | 3;
/// Selector of the data segment (GDT index 2), RPL 3.
pub const DATA_SELECTOR: u16 = 0x10 | 3;
/// Selector of the TSS (GDT index 3, a 16-byte descriptor).
pub const TSS_SELECTOR: u16 = 0x18;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

/// Control-register and EFER bits.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// RFLAGS: reserved bit 1 plus IOPL = 3.
pub const ENTRY_RFLAGS: u64 = 0x2 | 0x3000;

/// CPUID leaf 1 ECX bits.
const CPUID1_ECX_XSAVE: u32 = 1 << 26;
const CPUID1_ECX_AVX: u32 = 1 << 28;
/// XCR0 bits: x87, SSE, AVX.
const XCR0_X87_SSE: u64 = 0b011;
const XCR0_AVX: u64 = 0b100;

// The boot region's pieces do not overlap and it ends below the hole and RAM.
const _: () = {
    assert!(GDT_GPA + GDT_ENTRIES as u64 * 8 <= TSS_GPA);
    assert!(TSS_GPA + TSS_SIZE <= STACK_GPA);
    assert!(STACK_GPA + MAX_VCPUS as u64 * STACK_SIZE <= CODE_GPA);
    assert!(CODE_GPA + CODE_MAX_SIZE <= PML4_GPA);
    assert!(PD_GPA + MAX_PDS * 0x1000 <= BOOT_SIZE);
    assert!(BOOT_SIZE <= HOLE_GPA && HOLE_GPA + HOLE_SIZE <= DEFAULT_RAM_BASE);
    assert!(BOOT_SIZE % HUGE_PAGE_SIZE == 0);
};

const fn round_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// What can go wrong when laying out or starting a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Mapping or writing the boot region failed.
    #[error("boot region: {0}")]
    Memory(#[from] crate::mm::MmError),
    /// RAM base or size is not a multiple of 2 MiB.
    #[error("RAM [{base:#x}, +{size:#x}) is not 2 MiB aligned")]
    RamNotAligned {
        /// RAM base GPA.
        base: u64,
        /// RAM size.
        size: u64,
    },
    /// RAM size is zero.
    #[error("RAM size is zero")]
    RamEmpty,
    /// RAM starts inside the boot region.
    #[error("RAM base {base:#x} lies inside the boot region [0, {BOOT_SIZE:#x})")]
    RamOverlapsBoot {
        /// RAM base GPA.
        base: u64,
    },
    /// RAM overlaps the MMIO hole.
    #[error("RAM [{base:#x}, +{size:#x}) overlaps the hole at {HOLE_GPA:#x}")]
    RamOverlapsHole {
        /// RAM base GPA.
        base: u64,
        /// RAM size.
        size: u64,
    },
    /// RAM ends above what the identity map can cover.
    #[error("RAM [{base:#x}, +{size:#x}) ends above {MAX_MAPPED_END:#x}")]
    RamTooHigh {
        /// RAM base GPA.
        base: u64,
        /// RAM size.
        size: u64,
    },
    /// The vCPU count is zero or exceeds the stack area.
    #[error("{vcpus} vCPUs: must be 1..={MAX_VCPUS}")]
    BadVcpuCount {
        /// The requested count.
        vcpus: u32,
    },
    /// A vCPU index not below the vCPU count.
    #[error("vCPU index {index} out of range for {vcpus} vCPUs")]
    BadVcpuIndex {
        /// The index given.
        index: u32,
        /// The layout's vCPU count.
        vcpus: u32,
    },
    /// The guest image does not fit its slot.
    #[error("guest image of {len} bytes exceeds {CODE_MAX_SIZE} bytes")]
    CodeTooLarge {
        /// Image length.
        len: usize,
    },
    /// The template range is not inside the identity map or overlaps the boot region.
    #[error(
        "template [{base:#x}, +{size:#x}) is outside the mapped space or overlaps the boot region"
    )]
    BadTemplate {
        /// Template base GPA.
        base: u64,
        /// Template size.
        size: u64,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, BootError>;

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { op, source }
}

/// Per-guest entry arguments beyond what the layout already knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryArgs {
    /// GPA where the VMM mapped the template file (`r8`), 0 if none.
    pub template_base: u64,
    /// Size of the template mapping in bytes (`r9`), 0 if none.
    pub template_size: u64,
    /// The VM breaks copy-on-write per page through userfaultfd write
    /// protection (bit 0 of `r11`): locked instructions on copy-on-write
    /// pages are atomic.
    pub cow_wp: bool,
}

/// A validated guest-physical layout: boot region, RAM and vCPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    ram_base: u64,
    ram_size: u64,
    vcpus: u32,
}

impl BootLayout {
    /// Validates a layout: RAM `[ram_base, ram_base + ram_size)` must be
    /// non-empty, 2 MiB aligned, above the boot region, clear of the hole and
    /// end at most at [`MAX_MAPPED_END`]; `vcpus` must be `1..=MAX_VCPUS`.
    pub fn new(ram_base: u64, ram_size: u64, vcpus: u32) -> Result<BootLayout> {
        if ram_size == 0 {
            return Err(BootError::RamEmpty);
        }
        if ram_base % HUGE_PAGE_SIZE != 0 || ram_size % HUGE_PAGE_SIZE != 0 {
            return Err(BootError::RamNotAligned {
                base: ram_base,
                size: ram_size,
            });
        }
        if ram_base < BOOT_SIZE {
            return Err(BootError::RamOverlapsBoot { base: ram_base });
        }
        let end = match ram_base.checked_add(ram_size) {
            Some(end) if end <= MAX_MAPPED_END => end,
            _ => {
                return Err(BootError::RamTooHigh {
                    base: ram_base,
                    size: ram_size,
                })
            }
        };
        if ram_base < HOLE_GPA + HOLE_SIZE && HOLE_GPA < end {
            return Err(BootError::RamOverlapsHole {
                base: ram_base,
                size: ram_size,
            });
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(BootError::BadVcpuCount { vcpus });
        }
        Ok(BootLayout {
            ram_base,
            ram_size,
            vcpus,
        })
    }

    /// RAM base GPA.
    pub fn ram_base(&self) -> u64 {
        self.ram_base
    }

    /// RAM size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// End of the identity map: `max(ram_end, 4 GiB)` rounded up to 1 GiB.
    pub fn mapped_end(&self) -> u64 {
        round_up((self.ram_base + self.ram_size).max(4 * GIB), GIB)
    }

    /// The initial RSP of vCPU `index`: its stack top minus 8.
    pub fn stack_pointer(&self, index: u32) -> Result<u64> {
        self.check_index(index)?;
        Ok(STACK_GPA + (u64::from(index) + 1) * STACK_SIZE - 8)
    }

    fn check_index(&self, index: u32) -> Result<()> {
        if index >= self.vcpus {
            return Err(BootError::BadVcpuIndex {
                index,
                vcpus: self.vcpus,
            });
        }
        Ok(())
    }

    /// Maps the boot region into `space` at 0 (a precommitted read-write-
    /// execute vma named `boot`: page tables must be in a memslot from the
    /// first instruction) and writes [`boot_image`](Self::boot_image)`(code)`
    /// into it.
    pub fn map_boot_region(&self, space: &crate::mm::AddressSpace, code: &[u8]) -> Result<()> {
        let image = self.boot_image(code)?;
        space.map(
            crate::mm::MapOpts::anonymous(BOOT_SIZE)
                .fixed(0)
                .perms(crate::Perms::ALL)
                .precommit()
                .name("boot"),
        )?;
        for (gpa, bytes) in image {
            space.write_with(gpa, &bytes, crate::mm::IoOpts::FORCE)?;
        }
        Ok(())
    }

    /// Everything to write into the boot region before the first run, as
    /// `(gpa, bytes)` pieces: GDT, TSS, page tables and the guest image
    /// `code` at [`CODE_GPA`]. Bytes not covered must read as zero.
    pub fn boot_image(&self, code: &[u8]) -> Result<Vec<(u64, Vec<u8>)>> {
        if code.len() as u64 > CODE_MAX_SIZE {
            return Err(BootError::CodeTooLarge { len: code.len() });
        }
        let mut out = Vec::new();
        out.push((GDT_GPA, u64s_to_bytes(&gdt())));
        let mut tss = vec![0u8; TSS_SIZE as usize];
        // I/O map base: a bitmap of zeros (every port allowed), then 0xff.
        tss[102..104].copy_from_slice(&(TSS_IOPB_OFFSET as u16).to_le_bytes());
        tss[TSS_SIZE as usize - 1] = 0xff;
        out.push((TSS_GPA, tss));

        let pds = self.mapped_end() / GIB;
        let mut pml4 = vec![0u64; 512];
        pml4[0] = PDPT_GPA | PTE_PRESENT | PTE_WRITE | PTE_USER;
        out.push((PML4_GPA, u64s_to_bytes(&pml4)));
        let mut pdpt = vec![0u64; 512];
        for (i, e) in pdpt.iter_mut().enumerate().take(pds as usize) {
            *e = (PD_GPA + i as u64 * 0x1000) | PTE_PRESENT | PTE_WRITE | PTE_USER;
        }
        out.push((PDPT_GPA, u64s_to_bytes(&pdpt)));
        // Straight to bytes: the 64 GiB map is 260 KiB, and every fresh
        // host page costs a page fault (expensive when nested).
        let mut pd = Vec::with_capacity(pds as usize * 4096);
        for i in 0..pds * 512 {
            let e = (i * HUGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE;
            pd.extend_from_slice(&e.to_le_bytes());
        }
        out.push((PD_GPA, pd));
        out.push((CODE_GPA, code.to_vec()));
        Ok(out)
    }

    /// Prepares vCPU `index` to enter the guest: CPUID, long-mode sregs at
    /// CPL3, XCR0 (x87|SSE, plus AVX when offered), FPU and the entry
    /// registers of the module's entry ABI. Validates `index` and the
    /// template range first; on an ioctl error the vCPU is partly set up.
    pub fn setup_vcpu(&self, vcpu: &VcpuFd, kvm: &Kvm, index: u32, args: &EntryArgs) -> Result<()> {
        self.check_index(index)?;
        self.check_template(args)?;

        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get_supported_cpuid"))?;
        let mut leaf1_ecx = 0;
        let mut xcr0_supported = 0u64;
        for e in cpuid.as_mut_slice() {
            match (e.function, e.index) {
                (1, _) => {
                    leaf1_ecx = e.ecx;
                    // Initial APIC id in EBX[31:24].
                    e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
                }
                (0xb, _) | (0x1f, _) => e.edx = index,
                (0xd, 0) => xcr0_supported = u64::from(e.eax) | (u64::from(e.edx) << 32),
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set_cpuid2"))?;

        let xsave = leaf1_ecx & CPUID1_ECX_XSAVE != 0;
        let avx = xsave && leaf1_ecx & CPUID1_ECX_AVX != 0 && xcr0_supported & XCR0_AVX != 0;

        let mut sregs = vcpu.get_sregs().map_err(kvm_err("get_sregs"))?;
        self.fill_sregs(&mut sregs, xsave);
        vcpu.set_sregs(&sregs).map_err(kvm_err("set_sregs"))?;

        if xsave {
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = XCR0_X87_SSE | if avx { XCR0_AVX } else { 0 };
            vcpu.set_xcrs(&xcrs).map_err(kvm_err("set_xcrs"))?;
        }

        let mut fpu = vcpu.get_fpu().map_err(kvm_err("get_fpu"))?;
        fpu.fcw = 0x37f;
        fpu.mxcsr = 0x1f80;
        vcpu.set_fpu(&fpu).map_err(kvm_err("set_fpu"))?;

        let regs = kvm_regs {
            rip: CODE_GPA,
            rsp: self.stack_pointer(index)?,
            rflags: ENTRY_RFLAGS,
            rdi: self.ram_base,
            rsi: self.ram_size,
            rdx: u64::from(index),
            rcx: u64::from(self.vcpus),
            r8: args.template_base,
            r9: args.template_size,
            r10: HOLE_GPA,
            r11: u64::from(args.cow_wp),
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("set_regs"))?;
        debug!(
            "vcpu {index}: rip {:#x} rsp {:#x} xsave {xsave} avx {avx}",
            regs.rip, regs.rsp
        );
        Ok(())
    }

    fn check_template(&self, args: &EntryArgs) -> Result<()> {
        if args.template_base == 0 && args.template_size == 0 {
            return Ok(());
        }
        let bad = BootError::BadTemplate {
            base: args.template_base,
            size: args.template_size,
        };
        match args.template_base.checked_add(args.template_size) {
            Some(end) if args.template_base >= BOOT_SIZE && end <= self.mapped_end() => Ok(()),
            _ => Err(bad),
        }
    }

    /// Fills `sregs` for 64-bit mode at CPL3 (see the module docs).
    fn fill_sregs(&self, sregs: &mut kvm_sregs, xsave: bool) {
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: CODE_SELECTOR,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: DATA_SELECTOR,
            type_: 0x3, // read/write, accessed
            present: 1,
            dpl: 3,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            ..Default::default()
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_GPA,
            limit: (TSS_SIZE - 1) as u32,
            selector: TSS_SELECTOR,
            type_: 0xb, // 64-bit TSS, busy
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            selector: 0,
            type_: 0x2,
            present: 1,
            limit: 0xffff,
            ..Default::default()
        };
        sregs.gdt.base = GDT_GPA;
        sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = PML4_GPA;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if xsave { CR4_OSXSAVE } else { 0 };
        sregs.efer = EFER_LME | EFER_LMA | EFER_SCE;
    }
}

/// Number of 8-byte GDT slots (the TSS descriptor takes two).
const GDT_ENTRIES: usize = 5;

/// The GDT: null, 64-bit code DPL3, data DPL3, busy 64-bit TSS.
fn gdt() -> [u64; GDT_ENTRIES] {
    let base = TSS_GPA;
    let limit = TSS_SIZE - 1;
    let tss_low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // present, DPL0, type 0xb (busy 64-bit TSS)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [
        0,
        0x00af_fb00_0000_ffff, // code: P, DPL3, S, exec/read/accessed; G, L
        0x00cf_f300_0000_ffff, // data: P, DPL3, S, read/write/accessed; G, D/B
        tss_low,
        base >> 32,
    ]
}

/// Little-endian bytes of `words`. Sized up front: collecting a `flat_map`
/// pushes byte by byte, which cost ~0.2 ms for the 64 GiB identity map.
fn u64s_to_bytes(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests;
