//! Instructions KVM's emulator computes wrongly, executed natively instead.
//!
//! A first touch of a page without a slot is emulated by KVM. For most
//! instructions that is only slower; for a few the result is wrong, silently:
//! KVM decodes `lzcnt` (F3 0F BD) and `tzcnt` (F3 0F BC) as `bsr`/`bsf`
//! (the prefix is ignored), so `lzcnt` of 0x10 gives 4 instead of 59 and
//! `tzcnt` of 0 leaves the destination unchanged instead of 64 (measured on
//! this project's hosts). Both only write a register and flags, so the
//! emulation can be undone exactly:
//!
//! ```text
//! MMIO read exit at RIP ─► fault in the page (it now has a slot)
//!   decode RIP: lzcnt/tzcnt? ─► save the registers (RIP still at the instruction)
//!   complete the pending read with immediate_exit set (KVM finishes its
//!   wrong emulation, enters no guest code) ─► restore the registers
//!   ─► the next run executes the instruction natively, on the installed page
//! ```
//!
//! Instructions with memory side effects cannot be rewound this way and are
//! not listed. `sgdt`/`sidt` into a page without a slot at CPL3 hang inside
//! KVM without an exit on PVM hosts; the watchdog ([`super::VmOptions::watchdog`])
//! gets the vCPU out and populates the page, after which they run natively.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;

use super::emulate::kvm;
use super::vm::{Vm, VmError};
use super::walk::{walk, PagingMode};
use crate::mm::{IoOpts, MmError};
use crate::perms::Access;
use crate::range::{page_round_down, PAGE_SIZE};

/// True if KVM's emulator is known to compute `instr` wrongly and it only
/// writes registers (so its emulation can be rewound).
pub(crate) fn emulated_wrongly(instr: &Instruction) -> bool {
    matches!(instr.mnemonic(), Mnemonic::Lzcnt | Mnemonic::Tzcnt)
}

impl Vm {
    /// If the instruction at vCPU `index`'s RIP (during a pending MMIO
    /// read) is one KVM emulates wrongly, its registers before it ran.
    ///
    /// Only 64-bit code under IA-32e paging is inspected (guestmm's guests);
    /// anything that cannot be read or decoded is left to KVM.
    pub(crate) fn wrong_result_instruction(
        &self,
        vcpu: &VcpuFd,
        index: u32,
    ) -> Result<Option<kvm_regs>, VmError> {
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let Some(mode) = PagingMode::from_sregs(&sregs) else {
            return Ok(None);
        };
        if sregs.cs.l != 1 {
            return Ok(None);
        }
        let rip = regs.rip.wrapping_add(sregs.cs.base);
        let mut bytes = [0u8; 15];
        let first = ((page_round_down(rip) + PAGE_SIZE - rip) as usize).min(bytes.len());
        if !self.read_code(&mode, rip, &mut bytes[..first]) {
            return Ok(None);
        }
        let mut len = first;
        if first < bytes.len() && self.read_code(&mode, rip + first as u64, &mut bytes[first..]) {
            len = bytes.len();
        }
        let instr = Decoder::with_ip(64, &bytes[..len], regs.rip, DecoderOptions::NONE).decode();
        if instr.is_invalid() || !emulated_wrongly(&instr) {
            return Ok(None);
        }
        log::debug!(
            "vcpu {index}: {:?} at rip {:#x} touched a page without a slot: re-running it natively",
            instr.mnemonic(),
            regs.rip
        );
        Ok(Some(regs))
    }

    /// Reads code bytes at linear address `la` (already populated: KVM just
    /// fetched them); false if they cannot be read.
    fn read_code(&self, mode: &PagingMode, la: u64, buf: &mut [u8]) -> bool {
        let space = self.space();
        let t = walk(
            |entry| {
                let mut b = [0u8; 8];
                space.read_with(entry, &mut b, IoOpts::FORCE)?;
                Ok::<u64, MmError>(u64::from_le_bytes(b))
            },
            mode,
            la,
            Access::Execute,
        );
        match t {
            Ok(t) => space.read_with(t.gpa, buf, IoOpts::FORCE).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE).decode()
    }

    #[test]
    fn lzcnt_and_tzcnt_are_rewound_but_bsr_bsf_and_stores_are_not() {
        let cases: &[(&str, &[u8], bool)] = &[
            ("lzcnt rax, [rdi]", &[0xf3, 0x48, 0x0f, 0xbd, 0x07], true),
            ("tzcnt eax, [rdi]", &[0xf3, 0x0f, 0xbc, 0x07], true),
            ("bsr rax, [rdi]", &[0x48, 0x0f, 0xbd, 0x07], false),
            ("bsf eax, [rdi]", &[0x0f, 0xbc, 0x07], false),
            ("mov [rdi], rax", &[0x48, 0x89, 0x07], false),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(emulated_wrongly(&decode(bytes)), *want, "{what}");
        }
    }
}
