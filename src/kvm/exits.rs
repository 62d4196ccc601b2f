//! What a vCPU exit means for memory: which exits are memory faults, and the
//! violation report handed to the VMM when a fault is the guest's fault.
//!
//! Measured on this project's hosts (see DESIGN.md):
//! - an access to a GPA with no memslot exits as `KVM_EXIT_MMIO` with the
//!   address, size, direction and (for writes) data;
//! - a write to a `KVM_MEM_READONLY` slot exits as an MMIO write;
//! - an instruction fetch from a GPA with no memslot, and an access the
//!   instruction emulator cannot handle (VEX/AVX moves), exit as
//!   `KVM_EXIT_INTERNAL_ERROR` with RIP at the instruction;
//! - `KVM_EXIT_MEMORY_FAULT` carries a GPA on hosts that report it (never
//!   required here);
//! - on some hosts an emulation failure at CPL3 in an IDT-less guest comes
//!   back as `KVM_EXIT_SHUTDOWN` instead (see [`super::emulate`]).

use kvm_ioctls::VcpuExit;

use crate::mm::FaultError;
use crate::perms::{Access, Perms};

/// `KVM_MEMORY_EXIT_FLAG_PRIVATE` is the only flag defined; the access kind
/// is not reported, so a memory-fault exit is treated as a write (the
/// strongest access: it breaks copy-on-write, and a read fault would only
/// exit again on the write).
pub(crate) const MEMORY_FAULT_ACCESS: Access = Access::Write;

/// A memory exit: the GPA and access the guest attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryExit {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes accessed.
    pub len: usize,
    /// The access.
    pub access: Access,
}

impl MemoryExit {
    /// The memory exit `exit` is, if it is one.
    pub fn of(exit: &VcpuExit<'_>) -> Option<MemoryExit> {
        match exit {
            VcpuExit::MmioRead(gpa, data) => Some(MemoryExit {
                gpa: *gpa,
                len: data.len(),
                access: Access::Read,
            }),
            VcpuExit::MmioWrite(gpa, data) => Some(MemoryExit {
                gpa: *gpa,
                len: data.len(),
                access: Access::Write,
            }),
            VcpuExit::MemoryFault { gpa, size, .. } => Some(MemoryExit {
                gpa: *gpa,
                len: *size as usize,
                access: MEMORY_FAULT_ACCESS,
            }),
            _ => None,
        }
    }
}

/// Why a guest access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// No vma (and no device range) at the address.
    Unmapped,
    /// The protection at the address forbids the access.
    Permission {
        /// What the protection allows.
        allowed: Perms,
    },
    /// The mapped object has no page there (beyond its end).
    Bus,
    /// The guest's own page tables do not map `gva`: the entry at level
    /// `level` (5 = PML5 … 1 = PT) is not present. The violation's `gpa` is
    /// that entry's address.
    NotInGuestPageTables {
        /// The guest-virtual (linear) address.
        gva: u64,
        /// The level of the not-present entry.
        level: u8,
    },
    /// The guest's page tables map `gva` but forbid the access (the guest
    /// would take a page fault it has no handler for).
    GuestPageProtection {
        /// The guest-virtual (linear) address.
        gva: u64,
    },
    /// `gva` is not canonical (a general-protection fault in the guest). The
    /// violation's `gpa` is 0.
    NonCanonical {
        /// The guest-virtual (linear) address.
        gva: u64,
    },
}

impl std::fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ViolationKind::Unmapped => f.write_str("no mapping there"),
            ViolationKind::Permission { allowed } => write!(f, "protection {allowed}"),
            ViolationKind::Bus => f.write_str("beyond the mapped object"),
            ViolationKind::NotInGuestPageTables { gva, level } => write!(
                f,
                "gva {gva:#x} not in the guest page tables (level {level} not present)"
            ),
            ViolationKind::GuestPageProtection { gva } => {
                write!(f, "gva {gva:#x} protected by the guest page tables")
            }
            ViolationKind::NonCanonical { gva } => write!(f, "gva {gva:#x} not canonical"),
        }
    }
}

/// A memory operand of a decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Guest-virtual (linear) address of its first byte.
    pub gva: u64,
    /// Bytes it covers.
    pub size: u32,
    /// How the instruction uses it (a read-modify-write is a write).
    pub access: Access,
}

/// The instruction behind an emulation failure, as far as it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedInstruction {
    /// Instruction bytes; the first `len` are valid.
    pub bytes: [u8; 15],
    /// The decoded length, or the bytes that could be fetched when the
    /// instruction could not be decoded.
    pub len: u8,
    /// True if `bytes[..len]` decoded to a valid instruction.
    pub decoded: bool,
    /// The memory operand the violation concerns (the first one when the
    /// violation is about the instruction as a whole).
    pub operand: Option<MemOperand>,
}

impl FailedInstruction {
    /// The valid instruction bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(15)]
    }
}

/// A guest access the memory manager refused; the VMM's handler decides
/// whether the guest stops or continues (writes dropped, reads as zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryViolation {
    /// Guest-physical address.
    pub gpa: u64,
    /// The access.
    pub access: Access,
    /// Index of the vCPU.
    pub vcpu: u32,
    /// Why it was refused.
    pub kind: ViolationKind,
    /// The guest's instruction pointer, when known.
    pub rip: Option<u64>,
    /// The instruction, when the violation comes from an emulation failure.
    pub instruction: Option<FailedInstruction>,
}

impl MemoryViolation {
    /// The violation a guest-caused fault error describes, or `None` for
    /// host-side failures (out of memory, out of slots) that stop the VM.
    pub fn from_fault(e: &FaultError, vcpu: u32) -> Option<MemoryViolation> {
        let (gpa, access, kind) = match *e {
            FaultError::Unmapped { gpa, access } => (gpa, access, ViolationKind::Unmapped),
            FaultError::Permission {
                gpa,
                access,
                allowed,
            } => (gpa, access, ViolationKind::Permission { allowed }),
            FaultError::Bus { gpa, access, .. } => (gpa, access, ViolationKind::Bus),
            _ => return None,
        };
        Some(MemoryViolation {
            gpa,
            access,
            vcpu,
            kind,
            rip: None,
            instruction: None,
        })
    }
}

impl std::fmt::Display for MemoryViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vcpu {}: {} at {:#x} refused: {}",
            self.vcpu, self.access, self.gpa, self.kind
        )?;
        if let Some(rip) = self.rip {
            write!(f, " (rip {rip:#x})")?;
        }
        if let Some(insn) = &self.instruction {
            f.write_str(" insn [")?;
            for (i, b) in insn.bytes().iter().enumerate() {
                write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
            }
            f.write_str("]")?;
            if !insn.decoded {
                f.write_str(" undecodable")?;
            }
            if let Some(op) = insn.operand {
                write!(
                    f,
                    " operand {} {} bytes at gva {:#x}",
                    op.access, op.size, op.gva
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for MemoryViolation {}

/// An instruction KVM could not complete and guestmm could not get past
/// (see [`super::emulate`]): handed to the VMM, which may inject an
/// exception into the guest and run it again, or stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulationFailure {
    /// Index of the vCPU.
    pub vcpu: u32,
    /// The guest's instruction pointer.
    pub rip: u64,
    /// The instruction, as far as it could be read.
    pub instruction: FailedInstruction,
    /// Attempts at this instruction (see [`super::emulate`]'s retry rules).
    pub attempts: u32,
    /// The refused access that stops it, or `None`: everything it needs is
    /// installed and KVM still cannot run it (an instruction KVM's emulator
    /// does not implement, reached where the host emulates guest code, such
    /// as `int3` at CPL0 on PVM hosts).
    pub violation: Option<MemoryViolation>,
}

impl std::fmt::Display for EmulationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.violation {
            Some(v) => write!(f, "{v}"),
            None => {
                write!(
                    f,
                    "vcpu {}: KVM cannot run the instruction at rip {:#x} after {} attempt(s), with everything it needs installed",
                    self.vcpu, self.rip, self.attempts
                )?;
                write!(f, " insn [")?;
                for (i, b) in self.instruction.bytes().iter().enumerate() {
                    write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
                }
                f.write_str("]")
            }
        }
    }
}

impl std::error::Error for EmulationFailure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_exits_are_recognised_with_their_access() {
        let mut buf = [0u8; 4];
        let read = MemoryExit::of(&VcpuExit::MmioRead(0x1000, &mut buf));
        assert_eq!(
            read,
            Some(MemoryExit {
                gpa: 0x1000,
                len: 4,
                access: Access::Read
            })
        );
        let write = MemoryExit::of(&VcpuExit::MmioWrite(0x2000, &[1, 2]));
        assert_eq!(
            write,
            Some(MemoryExit {
                gpa: 0x2000,
                len: 2,
                access: Access::Write
            })
        );
        let fault = MemoryExit::of(&VcpuExit::MemoryFault {
            flags: 0,
            gpa: 0x3000,
            size: 4096,
        });
        assert_eq!(
            fault,
            Some(MemoryExit {
                gpa: 0x3000,
                len: 4096,
                access: MEMORY_FAULT_ACCESS
            })
        );
        assert_eq!(MemoryExit::of(&VcpuExit::Hlt), None);
    }
}
