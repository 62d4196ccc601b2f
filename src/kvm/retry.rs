//! When to re-run an instruction KVM could not complete, and when to give up.
//!
//! A failure is a request to populate, never by itself a reason to stop a
//! healthy vCPU. What bounds retries is **progress**, counted per
//! instruction instance (the same RIP, CR3 and operand addresses: a loop
//! that fails at one RIP on a new page each iteration is a new instance each
//! time):
//!
//! - an attempt that installed something the instruction needs is progress;
//! - so is one during whose `KVM_RUN` the memslots changed (another vCPU
//!   installed the page first, the host decommitted it): what KVM saw may
//!   already be gone, so it is a transient, not a verdict;
//! - an attempt with neither is fruitless. The first fruitless attempt is
//!   re-run anyway: KVM's emulator refuses some instructions whose operand a
//!   previous MMIO exit already populated (`cmpxchg16b`, `movbe`), and the
//!   re-run executes them natively. The second gets one reset of the MMU
//!   context (on PVM hosts a vCPU whose CR3 page had no slot stays shut
//!   down until then, and a stale translation can outlive the memslot
//!   change that should have dropped it). The next fruitless attempt is
//!   final: a real triple fault for a shutdown, an unresolved emulation
//!   failure otherwise.
//! - [`MAX_ATTEMPTS`] attempts of one instance, even with progress each time,
//!   end it too: a guard against livelock (the host undoing every populate).

use super::exits::{EmulationFailure, FailedInstruction, MemoryViolation};

/// Most attempts at one instruction instance, progress or not.
pub(crate) const MAX_ATTEMPTS: u32 = 1000;

/// How the failure reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitForm {
    /// `KVM_EXIT_INTERNAL_ERROR` (emulation failure).
    InternalError,
    /// `KVM_EXIT_SHUTDOWN` (on hosts that turn an emulation failure into an
    /// exception an IDT-less guest cannot deliver; also a page walk through
    /// a table page without a slot).
    Shutdown,
    /// `KVM_RUN` failed with `ENOSPC`: the VM has no memslot at all (seen on
    /// PVM hosts at the first run of a guest whose memory is all lazy).
    NoSlots,
}

/// Which instruction instance a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Instance {
    pub rip: u64,
    pub cr3: u64,
    /// A digest of the linear addresses the instruction touches.
    pub operands: u64,
}

/// What resolving one failure found.
#[derive(Debug)]
pub(crate) enum Resolution {
    /// Pages the instruction needs were newly installed; `cr3_root` if the
    /// top-level page table was one of them.
    Populated { cr3_root: bool },
    /// Everything the instruction needs was already installed.
    NothingNew,
    /// The instruction needs memory the guest may not have.
    Violation(MemoryViolation),
}

/// What the vCPU does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run the vCPU again.
    Rerun,
    /// Reset the vCPU's MMU context, then run it again.
    ResetMmuAndRerun,
    /// A real triple fault: the VMM's.
    TripleFault,
    /// Give up on the instruction: the VMM's (it may inject an exception).
    Unresolved(EmulationFailure),
}

/// Per-vCPU retry state (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct RetryState {
    instance: Option<Instance>,
    attempts: u32,
    fruitless: u32,
    mmu_reset: bool,
}

impl RetryState {
    /// Forgets the current instance: the vCPU got past it (an exit that only
    /// a later instruction can cause, like port I/O).
    pub(crate) fn moved_on(&mut self) {
        *self = RetryState::default();
    }

    /// Decides what follows a failure of `instance` that `resolution`
    /// resolved; `slots_changed` if memslots changed while the failing
    /// `KVM_RUN` ran.
    pub(crate) fn after(
        &mut self,
        form: ExitForm,
        instance: Instance,
        insn: FailedInstruction,
        vcpu: u32,
        resolution: Resolution,
        slots_changed: bool,
    ) -> Verdict {
        if self.instance != Some(instance) {
            *self = RetryState {
                instance: Some(instance),
                ..RetryState::default()
            };
        }
        self.attempts += 1;
        let failure = |violation: Option<MemoryViolation>, attempts: u32| EmulationFailure {
            vcpu,
            rip: instance.rip,
            instruction: insn,
            attempts,
            violation,
        };
        let progress = match resolution {
            Resolution::Violation(v) => {
                return Verdict::Unresolved(failure(Some(v), self.attempts))
            }
            Resolution::Populated { cr3_root } => {
                if cr3_root && form != ExitForm::InternalError {
                    return self.checked(Verdict::ResetMmuAndRerun, failure(None, self.attempts));
                }
                true
            }
            Resolution::NothingNew => slots_changed,
        };
        if progress {
            self.fruitless = 0;
            return self.checked(Verdict::Rerun, failure(None, self.attempts));
        }
        self.fruitless += 1;
        match form {
            _ if self.fruitless == 1 => Verdict::Rerun,
            // KVM may hold a stale translation that no memslot change
            // reached (seen under a host decommitting every 2 ms: an AVX
            // store failing twice on a page installed all along): a reset
            // of the MMU context drops it, for failures and shutdowns alike.
            _ if !self.mmu_reset => {
                self.mmu_reset = true;
                Verdict::ResetMmuAndRerun
            }
            ExitForm::Shutdown => {
                self.moved_on();
                Verdict::TripleFault
            }
            _ => Verdict::Unresolved(failure(None, self.attempts)),
        }
    }

    /// `verdict`, unless the instance used up [`MAX_ATTEMPTS`].
    fn checked(&self, verdict: Verdict, failure: EmulationFailure) -> Verdict {
        if self.attempts >= MAX_ATTEMPTS {
            log::warn!(
                "vcpu {}: giving up on rip {:#x} after {} attempts, each of which made progress",
                failure.vcpu,
                failure.rip,
                self.attempts
            );
            Verdict::Unresolved(failure)
        } else {
            verdict
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn() -> FailedInstruction {
        FailedInstruction {
            bytes: [0; 15],
            len: 0,
            decoded: true,
            operand: None,
        }
    }

    fn at(rip: u64, operands: u64) -> Instance {
        Instance {
            rip,
            cr3: 0x1000,
            operands,
        }
    }

    const POPULATED: fn() -> Resolution = || Resolution::Populated { cr3_root: false };

    #[test]
    fn every_attempt_that_populates_reruns_however_often_the_rip_repeats() {
        let mut r = RetryState::default();
        // An AVX memset: one RIP, a new page each time.
        for page in 0..10_000u64 {
            let v = r.after(
                ExitForm::InternalError,
                at(0x20_0000, page),
                insn(),
                0,
                POPULATED(),
                false,
            );
            assert_eq!(v, Verdict::Rerun, "page {page}");
        }
    }

    #[test]
    fn a_fruitless_attempt_reruns_then_resets_the_mmu_then_gives_up() {
        let mut r = RetryState::default();
        let i = at(0x20_0000, 7);
        let mut next = || {
            r.after(
                ExitForm::InternalError,
                i,
                insn(),
                1,
                Resolution::NothingNew,
                false,
            )
        };
        assert_eq!(next(), Verdict::Rerun);
        assert_eq!(next(), Verdict::ResetMmuAndRerun);
        match next() {
            Verdict::Unresolved(f) => {
                assert_eq!((f.vcpu, f.rip, f.attempts), (1, 0x20_0000, 3));
                assert!(f.violation.is_none());
            }
            other => panic!("got {other:?}, want Unresolved"),
        }
    }

    #[test]
    fn fruitless_attempts_on_different_instances_never_add_up() {
        // cmpxchg16b on one fresh page after another: each instance needs
        // one fruitless re-run.
        let mut r = RetryState::default();
        for page in 0..100 {
            let v = r.after(
                ExitForm::InternalError,
                at(0x20_0000, page),
                insn(),
                0,
                Resolution::NothingNew,
                false,
            );
            assert_eq!(v, Verdict::Rerun, "page {page}");
        }
    }

    #[test]
    fn a_slot_change_during_the_run_is_progress() {
        // Two vCPUs racing on one window: the loser finds it installed.
        let mut r = RetryState::default();
        let i = at(0x20_0000, 3);
        for n in 0..50 {
            let v = r.after(
                ExitForm::InternalError,
                i,
                insn(),
                0,
                Resolution::NothingNew,
                true,
            );
            assert_eq!(v, Verdict::Rerun, "attempt {n}");
        }
    }

    #[test]
    fn a_fruitless_shutdown_reruns_then_resets_the_mmu_then_is_a_triple_fault() {
        let mut r = RetryState::default();
        let i = at(0x20_0000, 0);
        let s = |r: &mut RetryState| {
            r.after(
                ExitForm::Shutdown,
                i,
                insn(),
                0,
                Resolution::NothingNew,
                false,
            )
        };
        assert_eq!(s(&mut r), Verdict::Rerun);
        assert_eq!(s(&mut r), Verdict::ResetMmuAndRerun);
        assert_eq!(s(&mut r), Verdict::TripleFault);
        // The triple fault ends the instance: a later one starts afresh.
        assert_eq!(s(&mut r), Verdict::Rerun);
    }

    #[test]
    fn populating_the_cr3_root_resets_the_mmu() {
        let mut r = RetryState::default();
        let v = r.after(
            ExitForm::Shutdown,
            at(0x20_0000, 0),
            insn(),
            0,
            Resolution::Populated { cr3_root: true },
            false,
        );
        assert_eq!(v, Verdict::ResetMmuAndRerun);
    }

    #[test]
    fn progress_on_one_instance_is_bounded() {
        let mut r = RetryState::default();
        let i = at(0x20_0000, 1);
        let mut verdicts = (0..MAX_ATTEMPTS)
            .map(|_| r.after(ExitForm::InternalError, i, insn(), 0, POPULATED(), false));
        assert!(verdicts
            .by_ref()
            .take(MAX_ATTEMPTS as usize - 1)
            .all(|v| v == Verdict::Rerun));
        assert!(
            matches!(verdicts.next(), Some(Verdict::Unresolved(f)) if f.attempts == MAX_ATTEMPTS)
        );
    }

    #[test]
    fn a_violation_is_unresolved_at_once() {
        let mut r = RetryState::default();
        let v = MemoryViolation {
            gpa: 0x3000_0000,
            access: crate::Access::Write,
            vcpu: 0,
            kind: crate::kvm::ViolationKind::Unmapped,
            rip: Some(0x20_0000),
            instruction: None,
        };
        let got = r.after(
            ExitForm::InternalError,
            at(0x20_0000, 0),
            insn(),
            0,
            Resolution::Violation(v.clone()),
            false,
        );
        assert!(matches!(got, Verdict::Unresolved(f) if f.violation == Some(v)));
    }
}
