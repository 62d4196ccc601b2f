//! Emulation failures: an instruction KVM could not complete because a page
//! it needs has no memslot.
//!
//! Every memory exit goes through KVM's instruction emulator, which cannot
//! emulate VEX/AVX moves, cannot fetch an instruction from a slot-less page
//! and cannot walk a guest page table in one. Such an access comes back as
//! `KVM_EXIT_INTERNAL_ERROR` (emulation failure) with RIP at the instruction
//! or, on hosts that turn the failure into an exception an IDT-less guest
//! cannot deliver, as `KVM_EXIT_SHUTDOWN`; a `KVM_RUN` with no memslot at
//! all fails with `ENOSPC` on PVM hosts. All take this path:
//!
//! ```text
//! regs, sregs ─► walk(RIP page[s], execute)        software walker, tables read
//!                                                   through read_with (populates them)
//!             ─► read ≤ 15 bytes ─► iced-x86 decode ─► memory the instruction touches
//!                (kvm::operands: sizes XSAVE areas, masks, VSIB elements)
//!             ─► walk every page it touches, with its access
//!             ─► handle_fault(every table, code and operand page not installed)
//!             ─► kvm::retry: re-run, reset the MMU context, or give up
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
//! Not modelled: 32-bit and PAE paging (KVM's `KVM_TRANSLATE` is used
//! there).

use iced_x86::{Decoder, DecoderOptions, Instruction, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

#[cfg(test)]
use super::exits::MemOperand;
use super::exits::{FailedInstruction, MemoryViolation, ViolationKind};
use super::operands::{self, CpuState, VectorRegs};
use super::retry::{ExitForm, Instance, Resolution, RetryState, Verdict};
use super::vm::{Vm, VmError};
use super::walk::{walk, PagingMode, WalkError, PTE_ADDR_MASK};
use crate::mm::{IoOpts, MmError};
use crate::perms::Access;
use crate::range::{page_round_down, PAGE_SIZE};

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// Most pages one operand may make us walk (an XSAVE area with AVX-512 and
/// AMX state is about 11 KiB).
const MAX_OPERAND_PAGES: u64 = 4;

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

/// A page the instruction needs.
#[derive(Debug, Clone, Copy)]
struct Needed {
    page: u64,
    access: Access,
    /// False for pages the instruction may not touch (see
    /// [`operands::Touch::required`]): populated if allowed, never reported.
    required: bool,
}

/// One failure being resolved: the vCPU's state and what it needs.
struct Failure<'a> {
    vm: &'a Vm,
    vcpu: &'a VcpuFd,
    index: u32,
    /// Also fault in the descriptor tables and the TSS (see
    /// [`Failure::system_tables`]).
    system_tables: bool,
    regs: kvm_regs,
    sregs: kvm_sregs,
    mode: Option<PagingMode>,
    long64: bool,
    needed: Vec<Needed>,
    /// A digest of the linear addresses the instruction touches.
    digest: u64,
    insn: FailedInstruction,
}

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

impl Vm {
    /// Resolves an emulation failure of vCPU `index` (see the module docs);
    /// `slots_changed` if memslots changed while the failing `KVM_RUN` ran.
    pub(crate) fn resolve_emulation_failure(
        &self,
        vcpu: &VcpuFd,
        index: u32,
        form: ExitForm,
        slots_changed: bool,
        retry: &mut RetryState,
    ) -> Result<Verdict, VmError> {
        let mut f = Failure::new(self, vcpu, index)?;
        f.system_tables = form != ExitForm::InternalError;
        let resolution = f.resolve()?;
        log::debug!(
            "vcpu {index}: {form:?} at rip {:#x} insn {:02x?} operand {}: {}{}",
            f.regs.rip,
            f.insn.bytes(),
            f.insn.operand.map_or("none".to_string(), |o| format!(
                "{} {} bytes at gva {:#x}",
                o.access, o.size, o.gva
            )),
            match &resolution {
                Resolution::Populated { .. } => "populated".to_string(),
                Resolution::NothingNew => "nothing new".to_string(),
                Resolution::Violation(v) => v.to_string(),
            },
            if slots_changed {
                " (slots changed)"
            } else {
                ""
            },
        );
        let instance = Instance {
            rip: f.regs.rip,
            cr3: f.sregs.cr3,
            operands: f.digest,
        };
        let verdict = retry.after(form, instance, f.insn, index, resolution, slots_changed);
        if verdict == Verdict::ResetMmuAndRerun {
            reset_mmu_context(vcpu, &f.sregs)?;
        }
        Ok(verdict)
    }

    /// Populates what the instruction at vCPU `index`'s RIP needs, as for an
    /// emulation failure: for a vCPU the watchdog found inside `KVM_RUN`
    /// too long (KVM's emulator hangs on a few instructions whose operand
    /// has no slot, such as `sgdt` at CPL3). Returns what it found.
    pub(crate) fn populate_for_current_instruction(
        &self,
        vcpu: &VcpuFd,
        index: u32,
    ) -> Result<Resolution, VmError> {
        Failure::new(self, vcpu, index)?.resolve()
    }
}

/// Makes KVM rebuild the vCPU's MMU context: one `KVM_SET_SREGS` with paging
/// off, then the real registers. On PVM hosts a vCPU whose CR3 page had no
/// slot stays shut down after the page is back until this is done.
pub(crate) fn reset_mmu_context(vcpu: &VcpuFd, sregs: &kvm_sregs) -> Result<(), VmError> {
    const CR0_PG: u64 = 1 << 31;
    const CR4_PCIDE: u64 = 1 << 17;
    const EFER_LMA: u64 = 1 << 10;
    let mut flat = *sregs;
    flat.cr0 &= !CR0_PG;
    flat.cr4 &= !CR4_PCIDE;
    flat.efer &= !EFER_LMA;
    // KVM refuses a 64-bit code segment outside long mode.
    flat.cs.l = 0;
    vcpu.set_sregs(&flat).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_sregs(sregs).map_err(kvm("KVM_SET_SREGS"))?;
    log::debug!("reset the MMU context (cr3 {:#x})", sregs.cr3);
    Ok(())
}

impl<'a> Failure<'a> {
    fn new(vm: &'a Vm, vcpu: &'a VcpuFd, index: u32) -> Result<Failure<'a>, VmError> {
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mode = PagingMode::from_sregs(&sregs);
        Ok(Failure {
            vm,
            vcpu,
            index,
            system_tables: false,
            mode,
            long64: mode.is_some() && sregs.cs.l == 1,
            regs,
            sregs,
            needed: Vec::new(),
            digest: 0,
            insn: FailedInstruction {
                bytes: [0; MAX_INSN_LEN],
                len: 0,
                decoded: false,
                operand: None,
            },
        })
    }

    /// Finds and faults in what the instruction needs.
    fn resolve(&mut self) -> Result<Resolution, VmError> {
        match self.collect() {
            Ok(()) => self.fault_in(),
            Err(Refusal::Violation(v)) => Ok(Resolution::Violation(v)),
            Err(Refusal::Host(e)) => Err(e),
        }
    }

    /// Finds every page the instruction needs (into `needed`).
    fn collect(&mut self) -> Result<(), Refusal> {
        let rip = self.linear(Register::CS, self.regs.rip);
        // The instruction's bytes: what its first page holds (at most 15);
        // the next page only if the decoder needs more.
        let first_len = ((page_round_down(rip) + PAGE_SIZE - rip) as usize).min(MAX_INSN_LEN);
        let gpa = self.translate(rip, Access::Execute, true)?;
        self.read(gpa, 0, first_len)?;
        self.insn.len = first_len as u8;
        let mut instr = self.decode(first_len);
        if instr.is_none() && first_len < MAX_INSN_LEN {
            let next = rip.wrapping_add(first_len as u64);
            let gpa = self.translate(next, Access::Execute, true)?;
            self.read(gpa, first_len, MAX_INSN_LEN)?;
            self.insn.len = MAX_INSN_LEN as u8;
            instr = self.decode(MAX_INSN_LEN);
        }
        // Not an instruction: nothing more to populate.
        let Some(instr) = instr else { return Ok(()) };
        self.insn.decoded = true;
        self.insn.len = instr.len() as u8;

        if self.system_tables || is_port_io(&instr) {
            self.system_tables()?;
        }
        let touches = self.touches(&instr)?;
        self.insn.operand = touches.first().map(|t| t.op);
        for t in touches {
            let op = t.op;
            self.digest = self.digest.rotate_left(17) ^ op.gva ^ u64::from(op.size);
            let last = op.gva.wrapping_add(u64::from(op.size) - 1);
            let pages = (page_round_down(last).wrapping_sub(page_round_down(op.gva)) / PAGE_SIZE)
                .min(MAX_OPERAND_PAGES - 1);
            for i in 0..=pages {
                let gva = if i == 0 {
                    op.gva
                } else {
                    page_round_down(op.gva).wrapping_add(i * PAGE_SIZE)
                };
                match self.translate(gva, op.access, t.required) {
                    Ok(_) => {}
                    Err(Refusal::Violation(mut v)) if t.required => {
                        if let Some(insn) = v.instruction.as_mut() {
                            insn.operand = Some(op);
                        }
                        return Err(Refusal::Violation(v));
                    }
                    Err(Refusal::Violation(_)) => {}
                    Err(host) => return Err(host),
                }
            }
        }
        Ok(())
    }

    /// The GDT, the IDT and the TSS: the CPU reads them without an
    /// instruction naming them (delivering an exception, checking a port
    /// against the TSS I/O bitmap — which PVM hosts do for every `in`/`out`
    /// at CPL3 —, loading a segment), and KVM's emulator cannot read them
    /// through a page without a slot. Optional: populated where the guest
    /// has memory, never reported.
    fn system_tables(&mut self) -> Result<(), Refusal> {
        let tables = [
            (self.sregs.gdt.base, u64::from(self.sregs.gdt.limit)),
            (self.sregs.idt.base, u64::from(self.sregs.idt.limit)),
            (self.sregs.tr.base, u64::from(self.sregs.tr.limit)),
        ];
        for (base, limit) in tables {
            // An unusable TR or a zero-limit table has nothing to read.
            if limit == 0 && base == 0 {
                continue;
            }
            let last = base.wrapping_add(limit);
            let mut page = page_round_down(base);
            for _ in 0..=(page_round_down(last).wrapping_sub(page) / PAGE_SIZE).min(16) {
                match self.translate(page.max(base), Access::Read, false) {
                    Ok(_) | Err(Refusal::Violation(_)) => {}
                    Err(host) => return Err(host),
                }
                page = page.wrapping_add(PAGE_SIZE);
            }
        }
        Ok(())
    }

    /// The memory `instr` touches, reading the vector, mask and XCR0 state
    /// only when the instruction needs it.
    fn touches(&self, instr: &Instruction) -> Result<Vec<operands::Touch>, Refusal> {
        let vectors = if operands::need_vectors(instr) {
            let xsave = self.vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
            Some(VectorRegs::from_xsave(&xsave))
        } else {
            None
        };
        let xcr0 = if operands::is_xsave_family(instr) {
            let xcrs = self.vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
            xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
                .iter()
                .find(|x| x.xcr == 0)
                .map_or(0b11, |x| x.value)
        } else {
            0
        };
        let cpu = CpuState {
            regs: &self.regs,
            sregs: &self.sregs,
            long64: self.long64,
            vectors: vectors.as_ref(),
            xcr0,
            xcr0_extra: if xcr0 == 0 { 0 } else { operands::host_xcr0() },
        };
        Ok(operands::memory_accesses(instr, &cpu))
    }

    /// Faults in every needed page not installed (for its access) yet.
    fn fault_in(&mut self) -> Result<Resolution, VmError> {
        let mut new = false;
        let mut cr3_root = false;
        let root = self.sregs.cr3 & PTE_ADDR_MASK;
        for &Needed {
            page,
            access,
            required,
        } in &self.needed
        {
            let installed = match self.vm.slots().slot_at(page) {
                Some(writable) => writable || access != Access::Write,
                None => false,
            };
            if installed {
                continue;
            }
            if let Err(e) = self.vm.space().handle_fault(page, access) {
                if !required && e.is_guest_violation() {
                    continue;
                }
                return match MemoryViolation::from_fault(&e, self.index) {
                    Some(v) => Ok(Resolution::Violation(self.decorate(v))),
                    None => Err(VmError::Fault {
                        vcpu: self.index,
                        source: e,
                    }),
                };
            }
            new = true;
            cr3_root |= self.mode.is_some() && page == root;
        }
        Ok(if new {
            Resolution::Populated { cr3_root }
        } else {
            Resolution::NothingNew
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

    fn need(&mut self, gpa: u64, access: Access, required: bool) {
        let page = page_round_down(gpa);
        match self.needed.iter_mut().find(|n| n.page == page) {
            Some(n) => {
                if access == Access::Write {
                    n.access = Access::Write;
                }
                n.required |= required;
            }
            None => self.needed.push(Needed {
                page,
                access,
                required,
            }),
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
        let cpu = CpuState {
            regs: &self.regs,
            sregs: &self.sregs,
            long64: self.long64,
            vectors: None,
            xcr0: 0,
            xcr0_extra: 0,
        };
        let base = operands::register(&cpu, seg, 0, 0).unwrap_or(0);
        let la = base.wrapping_add(offset);
        if self.long64 {
            la
        } else {
            la & 0xffff_ffff
        }
    }

    /// Translates linear address `gva` for `access`, recording the table
    /// pages read and the target page in `needed`.
    fn translate(&mut self, gva: u64, access: Access, required: bool) -> Result<u64, Refusal> {
        let Some(mode) = self.mode else {
            return self.translate_by_kvm(gva, access, required);
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
            self.need(t, Access::Read, required);
        }
        let (gpa, kind) = match r {
            Ok(t) => {
                self.need(t.gpa, access, required);
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
        required: bool,
    ) -> Result<u64, Refusal> {
        const CR0_PG: u64 = 1 << 31;
        let gpa = if self.sregs.cr0 & CR0_PG == 0 {
            gva
        } else {
            let t = self.vcpu.translate_gva(gva).map_err(kvm("KVM_TRANSLATE"))?;
            if t.valid == 0 {
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
        self.need(gpa, access, required);
        Ok(gpa)
    }

    /// A host-side read of guest memory failed at `gpa`.
    fn mm_refusal(&self, e: MmError, gpa: u64, access: Access) -> Refusal {
        let kind = match e {
            // A table or code address outside every vma or beyond the
            // address space (a guest-chosen CR3, say): the guest's error.
            MmError::NotMapped { .. } | MmError::OutOfSpace { .. } | MmError::Range(_) => {
                ViolationKind::Unmapped
            }
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

/// True for `in`, `out`, `ins`, `outs`: at CPL3 they may read the TSS I/O
/// bitmap.
fn is_port_io(instr: &Instruction) -> bool {
    use iced_x86::Mnemonic::*;
    matches!(
        instr.mnemonic(),
        In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd
    )
}

/// The memory operands `instr` touches under `regs`/`sregs`, without vector
/// state (masked and VSIB accesses count whole): for tests.
#[cfg(test)]
fn memory_operands(
    instr: &Instruction,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    long64: bool,
) -> Vec<MemOperand> {
    let cpu = CpuState {
        regs,
        sregs,
        long64,
        vectors: None,
        xcr0: 0,
        xcr0_extra: 0,
    };
    operands::memory_accesses(instr, &cpu)
        .into_iter()
        .map(|t| t.op)
        .collect()
}

#[cfg(test)]
mod tests;
