//! The memory an instruction touches: its memory operands with their
//! linear addresses and sizes, as the CPU would access them now.
//!
//! iced-x86 decodes the operands; what it cannot size, this module does:
//! - **XSAVE family** (`xsave`, `xsavec`, `xsaveopt`, `xrstor`, their 64-bit
//!   forms): the area's size depends on XCR0, the instruction's EDX:EAX
//!   feature mask and CPUID leaf 0xD (standard layout, or compacted for
//!   `xsavec`); an `xrstor` may read either layout, so what the compacted
//!   one needs is required and the rest of the standard one is optional.
//! - **Masked accesses** (`vmaskmovps/pd`, `vpmaskmovd/q`, `maskmovdqu`,
//!   AVX-512 `{k}` masking): masked-off elements are not accessed and do
//!   not fault, so only the active elements count.
//! - **VSIB** (gathers and scatters): one access per active element, at
//!   base + index-vector element × scale.
//!
//! Mask and index registers come from the vCPU's XSAVE state
//! ([`VectorRegs`]), read only for instructions that need it.

use iced_x86::{Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};

use super::exits::MemOperand;
use crate::perms::Access;

/// One stretch of memory an instruction accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Touch {
    /// The operand (linear address, size, access).
    pub op: MemOperand,
    /// False if the CPU may not touch it (the tail of an `xrstor` area
    /// beyond the compacted layout): populate it if the guest may have it,
    /// never report a violation for it.
    pub required: bool,
}

/// The register state operands are computed from.
pub(crate) struct CpuState<'a> {
    pub regs: &'a kvm_regs,
    pub sregs: &'a kvm_sregs,
    /// 64-bit code segment in long mode (segment bases other than FS/GS are 0).
    pub long64: bool,
    /// Vector and mask registers, for instructions that [`need_vectors`].
    pub vectors: Option<&'a VectorRegs>,
    /// XCR0 as the vCPU has it (`KVM_GET_XCRS`), for the XSAVE family.
    pub xcr0: u64,
    /// Components the CPU may save beyond `xcr0`: where the host runs
    /// guest user code with its own XCR0 (PVM: a guest whose VMM left XCR0
    /// at x87 still saves AVX state), the host process's XCR0 ([`host_xcr0`]).
    pub xcr0_extra: u64,
}

/// The XCR0 of this (the VMM's) process, 0 if the OS has not enabled XSAVE.
pub(crate) fn host_xcr0() -> u64 {
    static XCR0: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *XCR0.get_or_init(|| {
        // CPUID.1:ECX.OSXSAVE[27]: xgetbv is available.
        // SAFETY: cpuid has no preconditions on x86-64 (a safe function
        // since Rust 1.87; `unsafe` keeps older toolchains building).
        #[allow(unused_unsafe)]
        let leaf1 = unsafe { std::arch::x86_64::__cpuid(1) };
        if leaf1.ecx & (1 << 27) == 0 {
            return 0;
        }
        let (lo, hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so xgetbv with ECX = 0 is defined; it
        // reads a register and touches no memory.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (u64::from(hi) << 32) | u64::from(lo)
    })
}

/// True if `instr`'s operands depend on vector or mask registers (masked
/// or VSIB accesses), so [`CpuState::vectors`] must be filled.
pub(crate) fn need_vectors(instr: &Instruction) -> bool {
    instr.has_op_mask() || vector_mask_operand(instr).is_some() || has_vsib(instr)
}

/// True if `instr` is of the XSAVE family (needs [`CpuState::xcr0`]).
pub(crate) fn is_xsave_family(instr: &Instruction) -> bool {
    xsave_form(instr.mnemonic()).is_some()
}

fn has_vsib(instr: &Instruction) -> bool {
    (0..instr.op_count()).any(|i| instr.op_kind(i) == OpKind::Memory)
        && instr.memory_index().is_vector_register()
}

/// The memory `instr` reads or writes under `cpu` (operands that access
/// nothing, like `lea`'s, are left out), as runs of active bytes.
pub(crate) fn memory_accesses(instr: &Instruction, cpu: &CpuState<'_>) -> Vec<Touch> {
    let mut out = Vec::new();
    let mut factory = InstructionInfoFactory::new();
    for m in factory.info(instr).used_memory() {
        let access = match m.access() {
            OpAccess::Read | OpAccess::CondRead => Access::Read,
            OpAccess::Write
            | OpAccess::CondWrite
            | OpAccess::ReadWrite
            | OpAccess::ReadCondWrite => Access::Write,
            _ => continue,
        };
        let value = |reg: Register, element: usize, element_size: usize| {
            register(cpu, reg, element, element_size)
        };
        let size = m.memory_size().size() as u64;
        let element = m.memory_size().element_size() as u64;
        if m.vsib_size() > 0 {
            // One access per active element (iced sizes one element): as
            // many as both the index vector and the data vector hold.
            let indices = m.index().size() as u64 / u64::from(m.vsib_size());
            let data = data_vector(instr).map_or(indices * element, |r| r.size() as u64);
            let elements = data.checked_div(element).map_or(0, |d| indices.min(d));
            let mask = element_mask(instr, cpu, elements, element);
            for i in 0..elements {
                if mask & (1 << i) == 0 {
                    continue;
                }
                if let Some(gva) = m.virtual_address(i as usize, value) {
                    push(&mut out, gva, element, access, true);
                }
            }
            continue;
        }
        let Some(gva) = m.virtual_address(0, value) else {
            continue;
        };
        if let Some(form) = xsave_form(instr.mnemonic()) {
            let mask = (cpu.regs.rdx << 32) | (cpu.regs.rax & 0xffff_ffff);
            let (required, optional) = xsave_area(form, cpu.xcr0 & mask, &XSAVE_LAYOUT);
            // What the CPU may also save is populated, never required.
            let (_, wider) = xsave_area(form, (cpu.xcr0 | cpu.xcr0_extra) & mask, &XSAVE_LAYOUT);
            let optional = optional.max(wider);
            push(&mut out, gva, required, access, true);
            if optional > required {
                push(
                    &mut out,
                    gva.wrapping_add(required),
                    optional - required,
                    access,
                    false,
                );
            }
            continue;
        }
        if size == 0 {
            continue;
        }
        let masked = instr.has_op_mask() || vector_mask_operand(instr).is_some();
        if !masked || element == 0 || element >= size || m.memory_size().is_broadcast() {
            push(&mut out, gva, size, access, true);
            continue;
        }
        // Runs of active elements.
        let elements = size / element;
        let mask = element_mask(instr, cpu, elements, element);
        let mut i = 0;
        while i < elements {
            if mask & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < elements && mask & (1 << i) != 0 {
                i += 1;
            }
            push(
                &mut out,
                gva.wrapping_add(start * element),
                (i - start) * element,
                access,
                true,
            );
        }
    }
    out
}

fn push(out: &mut Vec<Touch>, gva: u64, size: u64, access: Access, required: bool) {
    if size == 0 {
        return;
    }
    out.push(Touch {
        op: MemOperand {
            gva,
            size: u32::try_from(size).unwrap_or(u32::MAX),
            access,
        },
        required,
    });
}

/// Which of `elements` elements (of `element` bytes) the instruction
/// accesses: its opmask, or the sign bits of its vector mask operand;
/// all of them when it has neither (or the registers are unknown).
fn element_mask(instr: &Instruction, cpu: &CpuState<'_>, elements: u64, element: u64) -> u64 {
    let all = if elements >= 64 {
        u64::MAX
    } else {
        (1u64 << elements) - 1
    };
    let Some(vectors) = cpu.vectors else {
        return all;
    };
    if instr.has_op_mask() {
        return vectors.opmask(instr.op_mask()).unwrap_or(all) & all;
    }
    if let Some(reg) = vector_mask_operand(instr) {
        let Some(bytes) = vectors.vector(reg) else {
            return all;
        };
        let mut mask = 0;
        for i in 0..elements.min(64) {
            // The element's most significant bit selects it.
            let msb = ((i + 1) * element - 1) as usize;
            if msb < bytes.len() && bytes[msb] & 0x80 != 0 {
                mask |= 1 << i;
            }
        }
        return mask;
    }
    all
}

/// The data vector of a gather (its destination) or scatter (its source):
/// the first vector register operand that is not the index or the mask.
fn data_vector(instr: &Instruction) -> Option<Register> {
    let mask = vector_mask_operand(instr);
    (0..instr.op_count())
        .filter(|&i| instr.op_kind(i) == OpKind::Register)
        .map(|i| instr.op_register(i))
        .find(|r| r.is_vector_register() && Some(*r) != mask)
}

/// The vector register whose element sign bits mask `instr`'s memory
/// access (AVX masked moves, `maskmovdqu`, AVX2 gathers), if any.
fn vector_mask_operand(instr: &Instruction) -> Option<Register> {
    let reg = match instr.mnemonic() {
        Mnemonic::Vmaskmovps
        | Mnemonic::Vmaskmovpd
        | Mnemonic::Vpmaskmovd
        | Mnemonic::Vpmaskmovq
        | Mnemonic::Maskmovdqu
        | Mnemonic::Vmaskmovdqu => {
            // Stores: [mem], mask, src; loads: dst, mask, [mem];
            // maskmovdqu: src, mask (the address is rdi).
            instr.op1_register()
        }
        // AVX2 gathers: dst, [vsib], mask.
        Mnemonic::Vpgatherdd
        | Mnemonic::Vpgatherdq
        | Mnemonic::Vpgatherqd
        | Mnemonic::Vpgatherqq
        | Mnemonic::Vgatherdps
        | Mnemonic::Vgatherdpd
        | Mnemonic::Vgatherqps
        | Mnemonic::Vgatherqpd
            if !instr.has_op_mask() && instr.op_count() == 3 =>
        {
            instr.op2_register()
        }
        _ => return None,
    };
    (reg.is_xmm() || reg.is_ymm()).then_some(reg)
}

/// The value of `reg` for addressing: a GPR (sized), RIP, a segment's base,
/// or element `element` (of `element_size` bytes) of a vector register.
pub(crate) fn register(
    cpu: &CpuState<'_>,
    reg: Register,
    element: usize,
    element_size: usize,
) -> Option<u64> {
    let (r, s) = (cpu.regs, cpu.sregs);
    if reg.is_segment_register() {
        return Some(match reg {
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            _ if cpu.long64 => 0,
            Register::ES => s.es.base,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            _ => s.ds.base,
        });
    }
    if reg.is_vector_register() {
        let bytes = cpu.vectors?.vector(reg)?;
        let at = element.checked_mul(element_size)?;
        let chunk = bytes.get(at..at + element_size)?;
        let mut b = [0u8; 8];
        b[..element_size.min(8)].copy_from_slice(&chunk[..element_size.min(8)]);
        return Some(u64::from_le_bytes(b));
    }
    let full = match reg.full_register() {
        Register::RAX => r.rax,
        Register::RCX => r.rcx,
        Register::RDX => r.rdx,
        Register::RBX => r.rbx,
        Register::RSP => r.rsp,
        Register::RBP => r.rbp,
        Register::RSI => r.rsi,
        Register::RDI => r.rdi,
        Register::R8 => r.r8,
        Register::R9 => r.r9,
        Register::R10 => r.r10,
        Register::R11 => r.r11,
        Register::R12 => r.r12,
        Register::R13 => r.r13,
        Register::R14 => r.r14,
        Register::R15 => r.r15,
        Register::RIP => r.rip,
        _ => return None,
    };
    Some(match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        _ => return None,
    })
}

/// The layout of an XSAVE area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XsaveForm {
    /// `xsave`, `xsaveopt`: standard layout.
    Standard,
    /// `xsavec`: compacted layout.
    Compacted,
    /// `xrstor`: either, depending on the area's header.
    Either,
}

fn xsave_form(m: Mnemonic) -> Option<XsaveForm> {
    Some(match m {
        Mnemonic::Xsave | Mnemonic::Xsaveopt => XsaveForm::Standard,
        Mnemonic::Xsavec => XsaveForm::Compacted,
        Mnemonic::Xrstor => XsaveForm::Either,
        _ => return None,
    })
}

/// CPUID leaf 0xD: per state component `i` (2..64), its (size, standard
/// offset, 64-byte aligned in the compacted form).
pub(crate) struct XsaveLayout {
    components: [(u32, u32, bool); 64],
}

/// Bytes before the extended components: legacy region and header.
const XSAVE_BASE: u64 = 512 + 64;

impl XsaveLayout {
    fn from_cpuid() -> XsaveLayout {
        let mut components = [(0, 0, false); 64];
        // `__cpuid_count` is safe from Rust 1.87 on, unsafe before (MSRV 1.85).
        #[cfg(target_arch = "x86_64")]
        #[allow(unused_unsafe)]
        {
            use std::arch::x86_64::__cpuid_count;
            // SAFETY: CPUID exists on every x86-64 CPU.
            let max_leaf = unsafe { __cpuid_count(0, 0) }.eax;
            if max_leaf >= 0xd {
                // SAFETY: as above; leaf 0xD exists (checked).
                let supported = unsafe { __cpuid_count(0xd, 0) };
                let mask = u64::from(supported.eax) | (u64::from(supported.edx) << 32);
                for (i, c) in components.iter_mut().enumerate().skip(2) {
                    if mask & (1 << i) != 0 {
                        // SAFETY: as above.
                        let l = unsafe { __cpuid_count(0xd, i as u32) };
                        *c = (l.eax, l.ebx, l.ecx & 2 != 0);
                    }
                }
            }
        }
        XsaveLayout { components }
    }

    /// Standard-layout offset of component `i`.
    fn offset(&self, i: usize) -> u64 {
        u64::from(self.components[i].1)
    }
}

static XSAVE_LAYOUT: std::sync::LazyLock<XsaveLayout> =
    std::sync::LazyLock::new(XsaveLayout::from_cpuid);

/// (required, optional) bytes of an XSAVE area of `form` for feature mask
/// `rfbm`: what the instruction certainly touches, and what it may.
fn xsave_area(form: XsaveForm, rfbm: u64, layout: &XsaveLayout) -> (u64, u64) {
    let standard = (2..64)
        .filter(|i| rfbm & (1 << i) != 0)
        .map(|i| layout.offset(i) + u64::from(layout.components[i].0))
        .fold(XSAVE_BASE, u64::max);
    let compacted = (2..64)
        .filter(|i| rfbm & (1 << i) != 0)
        .fold(XSAVE_BASE, |end, i| {
            let (size, _, aligned) = layout.components[i];
            let start = if aligned {
                end.next_multiple_of(64)
            } else {
                end
            };
            start + u64::from(size)
        });
    match form {
        XsaveForm::Standard => (standard, standard),
        XsaveForm::Compacted => (compacted, compacted),
        XsaveForm::Either => (compacted.min(standard), standard.max(compacted)),
    }
}

/// The vector and mask registers of a vCPU, from its XSAVE state
/// (`KVM_GET_XSAVE`, standard layout).
pub(crate) struct VectorRegs {
    /// zmm0..zmm31 (xmm/ymm are their low 16/32 bytes).
    zmm: [[u8; 64]; 32],
    /// k0..k7.
    k: [u64; 8],
}

impl VectorRegs {
    /// Parses `xsave` (standard layout; components absent from XSTATE_BV
    /// are in their initial state, zeros).
    pub(crate) fn from_xsave(xsave: &kvm_xsave) -> VectorRegs {
        let bytes: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        Self::from_bytes(&bytes, &XSAVE_LAYOUT)
    }

    fn from_bytes(bytes: &[u8], layout: &XsaveLayout) -> VectorRegs {
        let mut v = VectorRegs {
            zmm: [[0; 64]; 32],
            k: [0; 8],
        };
        let get = |at: u64, len: usize| -> Option<&[u8]> {
            let at = usize::try_from(at).ok()?;
            bytes.get(at..at.checked_add(len)?)
        };
        let xstate_bv = get(512, 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
        let present = |i: usize| xstate_bv & (1 << i) != 0;
        for (i, zmm) in v.zmm.iter_mut().enumerate().take(16) {
            if present(1) {
                if let Some(b) = get(160 + 16 * i as u64, 16) {
                    zmm[..16].copy_from_slice(b);
                }
            }
            if present(2) {
                if let Some(b) = get(layout.offset(2) + 16 * i as u64, 16) {
                    zmm[16..32].copy_from_slice(b);
                }
            }
            if present(6) {
                if let Some(b) = get(layout.offset(6) + 32 * i as u64, 32) {
                    zmm[32..64].copy_from_slice(b);
                }
            }
        }
        if present(7) {
            for (i, zmm) in v.zmm.iter_mut().enumerate().skip(16) {
                if let Some(b) = get(layout.offset(7) + 64 * (i as u64 - 16), 64) {
                    zmm.copy_from_slice(b);
                }
            }
        }
        if present(5) {
            for (i, k) in v.k.iter_mut().enumerate() {
                if let Some(b) = get(layout.offset(5) + 8 * i as u64, 8) {
                    *k = u64::from_le_bytes(b.try_into().unwrap());
                }
            }
        }
        v
    }

    /// The bytes of vector register `reg` (xmm: 16, ymm: 32, zmm: 64).
    fn vector(&self, reg: Register) -> Option<&[u8]> {
        let (base, len) = if reg.is_xmm() {
            (Register::XMM0, 16)
        } else if reg.is_ymm() {
            (Register::YMM0, 32)
        } else if reg.is_zmm() {
            (Register::ZMM0, 64)
        } else {
            return None;
        };
        let n = (reg as usize).checked_sub(base as usize)?;
        Some(&self.zmm.get(n)?[..len])
    }

    /// The value of opmask register `reg` (`k0`..`k7`).
    fn opmask(&self, reg: Register) -> Option<u64> {
        let n = (reg as usize).checked_sub(Register::K0 as usize)?;
        self.k.get(n).copied()
    }
}

#[cfg(test)]
mod tests;
