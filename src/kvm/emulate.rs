//! Emulation failures: an instruction KVM could not complete because a page
//! it needs has no memslot.
//!
//! Every memory exit goes through KVM's instruction emulator, which cannot
//! emulate VEX/AVX moves, cannot fetch an instruction from a slot-less page
//! and cannot walk a guest page table in one. Such an access comes back as
//! `KVM_EXIT_INTERNAL_ERROR` (emulation failure) with RIP at the instruction
//! or, on hosts that turn the failure into an exception an IDT-less guest
//! cannot deliver, as `KVM_EXIT_SHUTDOWN`. Both take this path:
//!
//! ```text
//! regs, sregs ─► walk(RIP page[s], execute)        software walker, tables read
//!                                                   through read_with (populates them)
//!             ─► read ≤ 15 bytes ─► iced-x86 decode ─► used memory operands
//!             ─► linear address (base + index*scale + disp + FS/GS base, RIP-relative)
//!             ─► walk every page each operand touches, with its access
//!             ─► handle_fault(every table, code and operand page)
//!   something newly installed ─► re-run
//!   nothing new               ─► Shutdown: a real triple fault (handler)
//!                                 InternalError: one retry, then NoProgress
//!   not mapped by the guest's tables / outside every vma ─► violation
//! ```
//!
//! How each class of access to a page without a memslot reached guestmm,
//! measured on this project's PVM-based nested hosts (`kvm_pvm`, guests at
//! CPL3, `KVM_CAP_EXIT_ON_EMULATION_FAILURE` on; guests `simd`, `exec`,
//! `lazypt`, `badstore`):
//!
//! | access | exit |
//! |---|---|
//! | scalar `mov`, `rep movsb`, `call`'s push, locked RMW | MMIO |
//! | SSE `movdqu`/`movaps` load or store (also straddling two pages) | MMIO, 2 × 8 bytes |
//! | AVX `vmovdqu ymm` load or store (also straddling two pages) | internal error |
//! | instruction fetch (also an instruction straddling into such a page) | internal error |
//! | instruction fetch whose page walk reads a table page without a slot | shutdown |
//! | AVX store to a GPA outside every vma | internal error → violation |
//! | AVX store to a GVA the guest's page tables do not map | shutdown (the guest's #PF, no IDT) → violation |
//! | scalar load from a non-canonical address | shutdown (the guest's #GP) → violation |
//!
//! MMIO exits are resolved in [`super::vcpu`] and never come here.
//!
//! Not modelled: VSIB (gather/scatter) operands, whose addresses need vector
//! registers; 32-bit and PAE paging (KVM's `KVM_TRANSLATE` is used there).

use iced_x86::{Decoder, DecoderOptions, Instruction, InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::exits::{FailedInstruction, MemOperand, MemoryViolation, ViolationKind};
use super::vm::{Vm, VmError};
use super::walk::{walk, PagingMode, WalkError};
use crate::mm::{IoOpts, MmError};
use crate::perms::Access;
use crate::range::{page_round_down, PAGE_SIZE};

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// Most pages one operand may make us walk (an XSAVE area is a few KiB).
const MAX_OPERAND_PAGES: u64 = 4;
/// Most consecutive failures of one instruction before it is reported,
/// even if each populated something (a guard against livelock).
const MAX_ATTEMPTS_PER_RIP: u32 = 8;

/// How the failure reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitForm {
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_SHUTDOWN`.
    Shutdown,
}

/// What resolving one failure found.
#[derive(Debug)]
pub(crate) enum Resolution {
    /// At least one page the instruction needs was newly installed.
    Populated,
    /// Everything the instruction needs was already installed.
    NothingNew(FailedInstruction),
    /// The instruction needs memory the guest may not have.
    Violation(MemoryViolation),
}

/// What the run loop does after a failure.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run the vCPU again.
    Rerun,
    /// A real triple fault: the handler's `shutdown`.
    TripleFault,
    /// Report and stop.
    Violation(MemoryViolation),
}

/// Per-vCPU bound on retries: an instruction that fails again with nothing
/// newly populated is reported, never retried forever.
#[derive(Debug, Default)]
pub(crate) struct RetryState {
    last_rip: Option<u64>,
    same_rip: u32,
    fruitless: u32,
}

impl RetryState {
    /// Decides what follows a failure at `rip` resolved as `resolution`.
    ///
    /// - `Populated` re-runs, unless the same RIP failed
    ///   [`MAX_ATTEMPTS_PER_RIP`] times in a row;
    /// - `NothingNew` is a triple fault for `Shutdown`; for `InternalError`
    ///   it re-runs once (a transient: another vCPU replacing a slot), and
    ///   is reported as `NoProgress` when the previous failure was at the
    ///   same RIP or was fruitless too.
    pub(crate) fn after(
        &mut self,
        form: ExitForm,
        rip: u64,
        index: u32,
        resolution: Resolution,
    ) -> Verdict {
        let same = self.last_rip == Some(rip);
        self.same_rip = if same { self.same_rip + 1 } else { 1 };
        self.last_rip = Some(rip);
        match resolution {
            Resolution::Violation(v) => Verdict::Violation(v),
            Resolution::Populated if self.same_rip < MAX_ATTEMPTS_PER_RIP => {
                self.fruitless = 0;
                Verdict::Rerun
            }
            Resolution::Populated => Verdict::Violation(no_progress(rip, index, None)),
            Resolution::NothingNew(_) if form == ExitForm::Shutdown => {
                *self = RetryState::default();
                Verdict::TripleFault
            }
            Resolution::NothingNew(insn) => {
                self.fruitless += 1;
                if same || self.fruitless >= 2 {
                    Verdict::Violation(no_progress(rip, index, Some(insn)))
                } else {
                    Verdict::Rerun
                }
            }
        }
    }
}

fn no_progress(rip: u64, index: u32, insn: Option<FailedInstruction>) -> MemoryViolation {
    MemoryViolation {
        gpa: 0,
        access: insn
            .and_then(|i| i.operand)
            .map_or(Access::Execute, |o| o.access),
        vcpu: index,
        kind: ViolationKind::NoProgress,
        rip: Some(rip),
        instruction: insn,
    }
}

/// Why a linear address could not be resolved to an installable GPA.
enum Refusal {
    Violation(MemoryViolation),
    Host(VmError),
}

impl From<VmError> for Refusal {
    fn from(e: VmError) -> Refusal {
        Refusal::Host(e)
    }
}

/// One failure being resolved: the vCPU's state and what it needs.
struct Failure<'a> {
    vm: &'a Vm,
    vcpu: &'a VcpuFd,
    index: u32,
    regs: kvm_regs,
    sregs: kvm_sregs,
    mode: Option<PagingMode>,
    long64: bool,
    /// Pages to fault in: (page GPA, access), a write superseding a read.
    needed: Vec<(u64, Access)>,
    insn: FailedInstruction,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

impl Vm {
    /// Resolves an emulation failure of vCPU `index` (see the module docs).
    pub(crate) fn resolve_emulation_failure(
        &self,
        vcpu: &VcpuFd,
        index: u32,
        form: ExitForm,
        retry: &mut RetryState,
    ) -> Result<Verdict, VmError> {
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mode = PagingMode::from_sregs(&sregs);
        let mut f = Failure {
            vm: self,
            vcpu,
            index,
            mode,
            long64: mode.is_some() && sregs.cs.l == 1,
            regs,
            sregs,
            needed: Vec::new(),
            insn: FailedInstruction {
                bytes: [0; MAX_INSN_LEN],
                len: 0,
                decoded: false,
                operand: None,
            },
        };
        let resolution = match f.collect() {
            Ok(()) => f.fault_in()?,
            Err(Refusal::Violation(v)) => Resolution::Violation(v),
            Err(Refusal::Host(e)) => return Err(e),
        };
        log::debug!(
            "vcpu {index}: {form:?} at rip {:#x} insn {:02x?} operand {}: {}",
            regs.rip,
            f.insn.bytes(),
            f.insn.operand.map_or("none".to_string(), |o| format!(
                "{} {} bytes at gva {:#x}",
                o.access, o.size, o.gva
            )),
            match &resolution {
                Resolution::Populated => "populated".to_string(),
                Resolution::NothingNew(_) => "nothing new".to_string(),
                Resolution::Violation(v) => v.to_string(),
            }
        );
        Ok(retry.after(form, regs.rip, index, resolution))
    }
}

impl Failure<'_> {
    /// Finds every page the instruction needs (into `needed`).
    fn collect(&mut self) -> Result<(), Refusal> {
        let rip = self.linear(Register::CS, self.regs.rip);
        // The instruction's bytes: what its first page holds (at most 15);
        // the next page only if the decoder needs more.
        let first_len = ((page_round_down(rip) + PAGE_SIZE - rip) as usize).min(MAX_INSN_LEN);
        let gpa = self.translate(rip, Access::Execute, None)?;
        self.read(gpa, 0, first_len)?;
        self.insn.len = first_len as u8;
        let mut instr = self.decode(first_len);
        if instr.is_none() && first_len < MAX_INSN_LEN {
            let gpa = self.translate(rip.wrapping_add(first_len as u64), Access::Execute, None)?;
            self.read(gpa, first_len, MAX_INSN_LEN)?;
            self.insn.len = MAX_INSN_LEN as u8;
            instr = self.decode(MAX_INSN_LEN);
        }
        // Not an instruction: nothing more to populate.
        let Some(instr) = instr else { return Ok(()) };
        self.insn.decoded = true;
        self.insn.len = instr.len() as u8;

        let operands = memory_operands(&instr, &self.regs, &self.sregs, self.long64);
        self.insn.operand = operands.first().copied();
        for op in operands {
            let last = op.gva.wrapping_add(u64::from(op.size) - 1);
            let pages = (page_round_down(last).wrapping_sub(page_round_down(op.gva)) / PAGE_SIZE)
                .min(MAX_OPERAND_PAGES - 1);
            for i in 0..=pages {
                let gva = if i == 0 {
                    op.gva
                } else {
                    page_round_down(op.gva).wrapping_add(i * PAGE_SIZE)
                };
                self.translate(gva, op.access, Some(op))?;
            }
        }
        Ok(())
    }

    /// Faults in every needed page not installed (for its access) yet;
    /// `Populated` if there was one.
    fn fault_in(&mut self) -> Result<Resolution, VmError> {
        let mut new = false;
        for &(gpa, access) in &self.needed {
            let installed = match self.vm.slots().slot_at(gpa) {
                Some(writable) => writable || access != Access::Write,
                None => false,
            };
            if installed {
                continue;
            }
            if let Err(e) = self.vm.space().handle_fault(gpa, access) {
                return match MemoryViolation::from_fault(&e, self.index) {
                    Some(v) => Ok(Resolution::Violation(self.decorate(v))),
                    None => Err(VmError::Fault {
                        vcpu: self.index,
                        source: e,
                    }),
                };
            }
            new = true;
        }
        Ok(if new {
            Resolution::Populated
        } else {
            Resolution::NothingNew(self.insn)
        })
    }

    /// Decodes `insn.bytes[..avail]`; `None` if invalid or truncated.
    fn decode(&self, avail: usize) -> Option<Instruction> {
        let bitness = if self.long64 {
            64
        } else if self.sregs.cs.db == 1 {
            32
        } else {
            16
        };
        let mut decoder = Decoder::with_ip(
            bitness,
            &self.insn.bytes[..avail],
            self.regs.rip,
            DecoderOptions::NONE,
        );
        let instr = decoder.decode();
        (!instr.is_invalid()).then_some(instr)
    }

    /// Adds the RIP and the instruction to a violation.
    fn decorate(&self, mut v: MemoryViolation) -> MemoryViolation {
        v.rip = Some(self.regs.rip);
        v.instruction = Some(self.insn);
        v
    }

    fn need(&mut self, gpa: u64, access: Access) {
        let page = page_round_down(gpa);
        match self.needed.iter_mut().find(|(p, _)| *p == page) {
            Some((_, a)) if access == Access::Write => *a = Access::Write,
            Some(_) => {}
            None => self.needed.push((page, access)),
        }
    }

    /// Copies guest memory at `gpa` into `insn.bytes[from..to]`.
    fn read(&mut self, gpa: u64, from: usize, to: usize) -> Result<(), Refusal> {
        let r = self
            .vm
            .space()
            .read_with(gpa, &mut self.insn.bytes[from..to], IoOpts::FORCE);
        r.map_err(|e| self.mm_refusal(e, gpa, Access::Execute))
    }

    /// The linear address of `offset` in segment `seg`.
    fn linear(&self, seg: Register, offset: u64) -> u64 {
        let base = register(&self.regs, &self.sregs, self.long64, seg).unwrap_or(0);
        let la = base.wrapping_add(offset);
        if self.long64 {
            la
        } else {
            la & 0xffff_ffff
        }
    }

    /// Translates linear address `gva` for `access`, recording the table
    /// pages read and the target page in `needed`.
    fn translate(
        &mut self,
        gva: u64,
        access: Access,
        operand: Option<MemOperand>,
    ) -> Result<u64, Refusal> {
        let Some(mode) = self.mode else {
            return self.translate_by_kvm(gva, access, operand);
        };
        let space = self.vm.space().clone();
        let mut tables = Vec::new();
        let r = walk(
            |entry| {
                tables.push(entry);
                let mut b = [0u8; 8];
                space.read_with(entry, &mut b, IoOpts::FORCE)?;
                Ok::<u64, MmError>(u64::from_le_bytes(b))
            },
            &mode,
            gva,
            access,
        );
        // The hardware walks these too: they need slots.
        for t in tables {
            self.need(t, Access::Read);
        }
        let (gpa, kind) = match r {
            Ok(t) => {
                self.need(t.gpa, access);
                return Ok(t.gpa);
            }
            Err(WalkError::NonCanonical { gva }) => (0, ViolationKind::NonCanonical { gva }),
            Err(WalkError::NotPresent { gva, level, entry }) => {
                (entry, ViolationKind::NotInGuestPageTables { gva, level })
            }
            Err(WalkError::Protection {
                gva, translation, ..
            }) => (translation.gpa, ViolationKind::GuestPageProtection { gva }),
            Err(WalkError::Read { entry, source, .. }) => {
                return Err(self.mm_refusal(source, entry, Access::Read))
            }
        };
        self.insn.operand = operand.or(self.insn.operand);
        Err(Refusal::Violation(self.decorate(MemoryViolation {
            gpa,
            access,
            vcpu: self.index,
            kind,
            rip: None,
            instruction: None,
        })))
    }

    /// Outside IA-32e paging: linear = physical without paging, else ask KVM.
    fn translate_by_kvm(
        &mut self,
        gva: u64,
        access: Access,
        operand: Option<MemOperand>,
    ) -> Result<u64, Refusal> {
        const CR0_PG: u64 = 1 << 31;
        let gpa = if self.sregs.cr0 & CR0_PG == 0 {
            gva
        } else {
            let t = self.vcpu.translate_gva(gva).map_err(kvm("KVM_TRANSLATE"))?;
            if t.valid == 0 {
                self.insn.operand = operand.or(self.insn.operand);
                return Err(Refusal::Violation(self.decorate(MemoryViolation {
                    gpa: 0,
                    access,
                    vcpu: self.index,
                    kind: ViolationKind::NotInGuestPageTables { gva, level: 0 },
                    rip: None,
                    instruction: None,
                })));
            }
            t.physical_address
        };
        self.need(gpa, access);
        Ok(gpa)
    }

    /// A host-side read of guest memory failed at `gpa`.
    fn mm_refusal(&self, e: MmError, gpa: u64, access: Access) -> Refusal {
        let kind = match e {
            MmError::NotMapped { .. } => ViolationKind::Unmapped,
            MmError::Permission { allowed, .. } => ViolationKind::Permission { allowed },
            MmError::Fault(f) => match MemoryViolation::from_fault(&f, self.index) {
                Some(v) => return Refusal::Violation(self.decorate(v)),
                None => {
                    return Refusal::Host(VmError::Fault {
                        vcpu: self.index,
                        source: f,
                    })
                }
            },
            other => {
                return Refusal::Host(VmError::Access {
                    vcpu: self.index,
                    source: other,
                })
            }
        };
        Refusal::Violation(self.decorate(MemoryViolation {
            gpa,
            access,
            vcpu: self.index,
            kind,
            rip: None,
            instruction: None,
        }))
    }
}

/// The memory operands `instr` reads or writes, with their linear
/// addresses under `regs`/`sregs` (VSIB operands and `lea`-like operands
/// that access nothing are left out).
fn memory_operands(
    instr: &Instruction,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    long64: bool,
) -> Vec<MemOperand> {
    let mut factory = InstructionInfoFactory::new();
    factory
        .info(instr)
        .used_memory()
        .iter()
        .filter(|m| m.vsib_size() == 0)
        .filter_map(|m| {
            let access = match m.access() {
                OpAccess::Read | OpAccess::CondRead => Access::Read,
                OpAccess::Write
                | OpAccess::CondWrite
                | OpAccess::ReadWrite
                | OpAccess::ReadCondWrite => Access::Write,
                _ => return None,
            };
            let size = m.memory_size().size() as u32;
            let gva = m.virtual_address(0, |reg, _, _| register(regs, sregs, long64, reg))?;
            (size > 0).then_some(MemOperand { gva, size, access })
        })
        .collect()
}

/// The value of `reg` (a segment register's base), for addressing.
fn register(r: &kvm_regs, s: &kvm_sregs, long64: bool, reg: Register) -> Option<u64> {
    if reg.is_segment_register() {
        return Some(match reg {
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            _ if long64 => 0,
            Register::ES => s.es.base,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            _ => s.ds.base,
        });
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

#[cfg(test)]
mod tests;
