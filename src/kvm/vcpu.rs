//! A vCPU of a guestmm [`Vm`]: one `KVM_RUN` per [`Vcpu::run`], memory exits
//! resolved inside, everything else handed to the VMM as an [`Exit`].
//!
//! ```text
//! run() ─► run gate (kicked? stopped? paused: wait) ─► KVM_RUN
//!   MMIO read/write at gpa ─► handle_fault(gpa) ─ ok ─► complete the access
//!   │                                   │               against memory: Resolved
//!   │                                   ├─ unmapped + device range ─► Exit::MmioRead/Write
//!   │                                   ├─ violation ─► Exit::Violation (re-run skips it)
//!   │                                   └─ out of memory / slots ─► Err, the VM stops
//!   internal error, shutdown, ENOSPC ─► kvm::emulate: walk, decode, fault in what the
//!                                        instruction needs; kvm::retry decides:
//!                                        Resolved | Exit::Shutdown | Exit::EmulationFailure
//!   EINTR (a kick, a pause, a slot change) ─► Resolved, or Exit::Kicked
//!   port I/O, HLT, anything else ─► Exit::IoOut / IoIn / Hlt / Other
//! ```
//!
//! A memory exit at an address whose pma already exists (another vCPU
//! populated it) resolves the same way: the fault is idempotent and the
//! access is completed against memory. A VMM keeps its own loop:
//!
//! ```no_run
//! # fn demo(vcpu: &mut guestmm::kvm::Vcpu) -> Result<(), guestmm::kvm::VmError> {
//! use guestmm::kvm::Exit;
//! loop {
//!     match vcpu.run()? {
//!         Exit::Resolved => continue,
//!         Exit::IoOut { port, data } => { /* a device */ }
//!         Exit::Kicked | Exit::Stopped | Exit::Hlt => break,
//!         other => { /* the VMM's: see Exit */ break }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! or hands [`Vcpu::run_with`] an [`ExitHandler`](super::ExitHandler).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::emulate::kvm;
use super::exits::{EmulationFailure, MemoryViolation, ViolationKind, MEMORY_FAULT_ACCESS};
use super::gate::{KickReason, Refused};
use super::retry::{ExitForm, Resolution, RetryState, Verdict};
use super::sys::{io_data, mmio_data};
use super::vm::{StopCause, Vm, VmError};
use crate::mm::{FaultError, IoOpts, MmError};
use crate::perms::Access;

/// What a [`Vcpu::run`] ended with.
#[derive(Debug)]
pub enum Exit<'a> {
    /// guestmm resolved the exit (a memory fault, an instruction it
    /// populated for, a pause or slot change that interrupted the run):
    /// run again.
    Resolved,
    /// A port write.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written (`size × count`).
        data: &'a [u8],
    },
    /// A port read: fill `data` before running again.
    IoIn {
        /// The port.
        port: u16,
        /// The bytes to return (`size × count`).
        data: &'a mut [u8],
    },
    /// A read of a device range ([`Vm::add_device_range`]): fill `data`
    /// before running again.
    MmioRead {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes to return.
        data: &'a mut [u8],
    },
    /// A write to a device range.
    MmioWrite {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// A guest access guestmm refused (outside every vma, against the
    /// protection). Running again skips it: a read returns zeros, a write
    /// is dropped. Or stop.
    Violation(MemoryViolation),
    /// An instruction KVM could not complete and guestmm could not get past:
    /// running again retries it, so inject an exception first (e.g. a #BP
    /// for an `int3` KVM's emulator does not implement) or stop.
    EmulationFailure(EmulationFailure),
    /// `hlt` (without an in-kernel irqchip).
    Hlt,
    /// A triple fault (`KVM_EXIT_SHUTDOWN` with nothing to populate and an
    /// MMU context reset tried).
    Shutdown,
    /// The VMM's [`VcpuKicker::kick`].
    Kicked,
    /// The VM was stopped ([`Vm::stop`], or another vCPU failed with a host
    /// error: see [`Vm::stop_cause`]); every later run returns this too.
    Stopped,
    /// Any other exit: its `exit_reason` and the `kvm_run` structure to read
    /// it from (and answer it in).
    Other {
        /// `kvm_run.exit_reason` (`KVM_EXIT_*`).
        reason: u32,
        /// The vCPU's `kvm_run`.
        run: &'a mut kvm_run,
    },
}

/// A KVM vCPU whose `KVM_RUN` goes through its VM's run gate (see
/// `kvm/gate.rs`): guestmm can kick it, pause it, and keep memslot
/// changes from showing it a gap.
pub struct Vcpu {
    vm: Arc<Vm>,
    fd: VcpuFd,
    index: u32,
    gate_id: usize,
    retry: RetryState,
    /// The thread that last unblocked the kick signal for itself.
    unblocked_on: Option<libc::pthread_t>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

/// Kicks one vCPU out of `KVM_RUN` from any thread (see [`Vcpu::kicker`]).
#[derive(Clone)]
pub struct VcpuKicker {
    vm: Arc<Vm>,
    gate_id: usize,
}

impl VcpuKicker {
    /// Makes the vCPU's current [`Vcpu::run`] (or its next, if it is not
    /// running) return [`Exit::Kicked`] promptly. Kicks do not queue: one
    /// pending kick is one `Kicked`.
    pub fn kick(&self) {
        self.vm.gate.kick(self.gate_id, KickReason::Vmm);
    }
}

impl Vm {
    /// Creates vCPU `index` (its KVM vCPU id), registered with the VM's run
    /// gate.
    pub fn create_vcpu(self: &Arc<Self>, index: u32) -> Result<Vcpu, VmError> {
        let mut fd = self.create_vcpu_fd(u64::from(index))?;
        let gate_id = self.gate.register(fd.get_kvm_run());
        self.live_vcpus
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(Vcpu {
            vm: self.clone(),
            fd,
            index,
            gate_id,
            retry: RetryState::default(),
            unblocked_on: None,
        })
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.vm.gate.unregister(self.gate_id);
        self.vm
            .live_vcpus
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One `KVM_RUN`'s result, owned (the run's data stays in `kvm_run`).
enum Step {
    Mmio {
        gpa: u64,
        len: usize,
        write: bool,
        data: [u8; 8],
    },
    MemoryFault {
        gpa: u64,
    },
    IoOut,
    IoIn,
    Hlt,
    Failure(ExitForm),
    Interrupted,
    Other,
}

impl Vcpu {
    /// The vCPU's index (its KVM vCPU id).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU, for register access and setup. Run it with
    /// [`run`](Self::run), never directly.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The vCPU's `kvm_run` (the data of the last exit).
    pub(crate) fn kvm_run(&mut self) -> &mut kvm_run {
        self.fd.get_kvm_run()
    }

    /// A handle that kicks this vCPU from another thread.
    pub fn kicker(&self) -> VcpuKicker {
        VcpuKicker {
            vm: self.vm.clone(),
            gate_id: self.gate_id,
        }
    }

    /// Runs the vCPU once (`KVM_RUN`) and resolves what guestmm can; see
    /// [`Exit`] for the rest. Waits first while the VM is paused. The VM's
    /// first run installs what host writes populated
    /// ([`Vm::install_host_writes`]).
    ///
    /// Errors are host errors (out of memory or memslots, a failed ioctl);
    /// they stop the whole VM ([`StopCause::VcpuFailed`]), so other vCPUs
    /// get [`Exit::Stopped`] instead of waiting for this one forever.
    pub fn run(&mut self) -> Result<Exit<'_>, VmError> {
        if let Err(e) = self.check_run() {
            self.vm.stop_with(StopCause::VcpuFailed {
                vcpu: self.index,
                error: e.to_string(),
            });
            return Err(e);
        }
        let (vm, index) = (self.vm.clone(), self.index);
        self.step().inspect_err(|e| {
            vm.stop_with(StopCause::VcpuFailed {
                vcpu: index,
                error: e.to_string(),
            })
        })
    }

    /// Lets the kick signal through on the calling thread (a VMM may have
    /// blocked it) — once per thread.
    fn check_run(&mut self) -> Result<(), VmError> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if self.unblocked_on != Some(me) {
            let signal = self.vm.gate.signal();
            vmm_sys_util::signal::unblock_signal(signal).map_err(|e| VmError::KickSignal {
                offset: signal - vmm_sys_util::signal::SIGRTMIN(),
                source: std::io::Error::other(e.to_string()),
            })?;
            self.unblocked_on = Some(me);
        }
        self.vm.install_host_writes_once()
    }

    fn step(&mut self) -> Result<Exit<'_>, VmError> {
        match self.vm.gate.enter(self.gate_id) {
            Err(Refused::Stopped) => return Ok(Exit::Stopped),
            Err(Refused::Kicked(KickReason::Vmm)) => return Ok(Exit::Kicked),
            Err(Refused::Kicked(KickReason::Watchdog)) => return self.after_watchdog_kick(),
            Ok(()) => {}
        }
        let generation = self.vm.slots().generation();
        let step = classify(self.fd.run());
        self.vm.gate.leave(self.gate_id);
        let slots_changed = self.vm.slots().generation() != generation;
        let step = step.map_err(kvm("KVM_RUN"))?;
        let counters = &self.vm.counters;
        if !matches!(step, Step::Interrupted) {
            counters.exits.fetch_add(1, Ordering::Relaxed);
        }
        match step {
            Step::Interrupted => Ok(match self.vm.gate.take_kick(self.gate_id) {
                Some(KickReason::Vmm) => Exit::Kicked,
                Some(KickReason::Watchdog) => return self.after_watchdog_kick(),
                None if self.vm.gate.is_stopped() => Exit::Stopped,
                None => Exit::Resolved,
            }),
            Step::Mmio {
                gpa,
                len,
                write: false,
                ..
            } => self.mmio_read(gpa, len),
            Step::Mmio {
                gpa,
                len,
                write: true,
                data,
            } => self.mmio_write(gpa, &data[..len]),
            Step::MemoryFault { gpa } => {
                match self.vm.space().handle_fault(gpa, MEMORY_FAULT_ACCESS) {
                    Ok(_) => {
                        counters.memory_exits.fetch_add(1, Ordering::Relaxed);
                        Ok(Exit::Resolved)
                    }
                    // The access cannot be skipped: it is an unresolved instruction.
                    Err(e) => match self.refused(e)? {
                        Some(v) => Ok(Exit::EmulationFailure(self.unresolved(v)?)),
                        None => Ok(Exit::Resolved),
                    },
                }
            }
            Step::IoOut | Step::IoIn => {
                self.retry.moved_on();
                let run = self.fd.get_kvm_run();
                // SAFETY: reading plain integers of the union member the
                // exit reason (KVM_EXIT_IO, classified above) selects.
                let port = unsafe { run.__bindgen_anon_1.io.port };
                let data = io_data(run);
                Ok(if matches!(step, Step::IoOut) {
                    Exit::IoOut { port, data }
                } else {
                    Exit::IoIn { port, data }
                })
            }
            Step::Hlt => {
                self.retry.moved_on();
                Ok(Exit::Hlt)
            }
            Step::Failure(form) => self.emulation_failure(form, slots_changed),
            Step::Other => {
                self.retry.moved_on();
                let run = self.fd.get_kvm_run();
                Ok(Exit::Other {
                    reason: run.exit_reason,
                    run,
                })
            }
        }
    }

    /// An MMIO read: of guest RAM (fault it in, complete it against
    /// memory), of a device range (the VMM's), or refused.
    fn mmio_read(&mut self, gpa: u64, len: usize) -> Result<Exit<'_>, VmError> {
        let space = self.vm.space().clone();
        match space.handle_fault(gpa, Access::Read) {
            Ok(_) => {
                self.vm
                    .counters
                    .memory_exits
                    .fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 8];
                if let Err(e) = space.read_with(gpa, &mut buf[..len], IoOpts::default()) {
                    mmio_data(self.fd.get_kvm_run()).fill(0);
                    return self.access_failed(gpa, Access::Read, e);
                }
                mmio_data(self.fd.get_kvm_run()).copy_from_slice(&buf[..len]);
                if let Some(saved) = self.vm.wrong_result_instruction(&self.fd, self.index)? {
                    self.rerun_natively(&saved)?;
                }
                Ok(Exit::Resolved)
            }
            Err(FaultError::Unmapped { .. }) if self.vm.is_device(gpa) => {
                self.vm
                    .counters
                    .device_exits
                    .fetch_add(1, Ordering::Relaxed);
                self.retry.moved_on();
                Ok(Exit::MmioRead {
                    gpa,
                    data: mmio_data(self.fd.get_kvm_run()),
                })
            }
            Err(e) => {
                mmio_data(self.fd.get_kvm_run()).fill(0);
                Ok(match self.refused(e)? {
                    Some(v) => Exit::Violation(self.report(v)),
                    None => Exit::Resolved,
                })
            }
        }
    }

    /// An MMIO write: to guest RAM (fault it in, complete it against
    /// memory), to a device range (the VMM's), or refused.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> Result<Exit<'_>, VmError> {
        let space = self.vm.space().clone();
        match space.handle_fault(gpa, Access::Write) {
            Ok(_) => {
                self.vm
                    .counters
                    .memory_exits
                    .fetch_add(1, Ordering::Relaxed);
                match space.write_with(gpa, data, IoOpts::default()) {
                    Ok(()) => Ok(Exit::Resolved),
                    Err(e) => self.access_failed(gpa, Access::Write, e),
                }
            }
            Err(FaultError::Unmapped { .. }) if self.vm.is_device(gpa) => {
                self.vm
                    .counters
                    .device_exits
                    .fetch_add(1, Ordering::Relaxed);
                self.retry.moved_on();
                let run = self.fd.get_kvm_run();
                Ok(Exit::MmioWrite {
                    gpa,
                    data: mmio_data(run),
                })
            }
            Err(e) => Ok(match self.refused(e)? {
                Some(v) => Exit::Violation(self.report(v)),
                None => Exit::Resolved,
            }),
        }
    }

    /// A refused fault: the violation it is, or the host error it is.
    fn refused(&self, e: FaultError) -> Result<Option<MemoryViolation>, VmError> {
        match MemoryViolation::from_fault(&e, self.index) {
            Some(v) => Ok(Some(v)),
            None => Err(VmError::Fault {
                vcpu: self.index,
                source: e,
            }),
        }
    }

    /// Counts and logs a violation.
    fn report(&self, v: MemoryViolation) -> MemoryViolation {
        self.vm.counters.violations.fetch_add(1, Ordering::Relaxed);
        log::debug!("{v}");
        v
    }

    /// The fault succeeded but completing the access did not (it straddles
    /// into memory the guest may not touch).
    fn access_failed(&self, gpa: u64, access: Access, e: MmError) -> Result<Exit<'_>, VmError> {
        let kind = match e {
            MmError::NotMapped { .. } => ViolationKind::Unmapped,
            MmError::Permission { allowed, .. } => ViolationKind::Permission { allowed },
            MmError::Fault(f) => {
                return Ok(match self.refused(f)? {
                    Some(v) => Exit::Violation(self.report(v)),
                    None => Exit::Resolved,
                })
            }
            other => {
                return Err(VmError::Access {
                    vcpu: self.index,
                    source: other,
                })
            }
        };
        Ok(Exit::Violation(self.report(MemoryViolation {
            gpa,
            access,
            vcpu: self.index,
            kind,
            rip: None,
            instruction: None,
        })))
    }

    /// An access that cannot be skipped was refused: an unresolved
    /// instruction, with its RIP.
    fn unresolved(&self, v: MemoryViolation) -> Result<EmulationFailure, VmError> {
        let rip = self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?.rip;
        let v = self.report(MemoryViolation {
            rip: Some(rip),
            ..v
        });
        Ok(EmulationFailure {
            vcpu: self.index,
            rip,
            instruction: v.instruction.unwrap_or(super::exits::FailedInstruction {
                bytes: [0; 15],
                len: 0,
                decoded: false,
                operand: None,
            }),
            attempts: 1,
            violation: Some(v),
        })
    }

    /// An emulation failure (or shutdown, or `ENOSPC`): see [`super::emulate`].
    fn emulation_failure(
        &mut self,
        form: ExitForm,
        slots_changed: bool,
    ) -> Result<Exit<'_>, VmError> {
        let verdict = self.vm.resolve_emulation_failure(
            &self.fd,
            self.index,
            form,
            slots_changed,
            &mut self.retry,
        )?;
        let c = &self.vm.counters;
        Ok(match verdict {
            Verdict::Rerun | Verdict::ResetMmuAndRerun => {
                c.emulation_failures.fetch_add(1, Ordering::Relaxed);
                if form == ExitForm::Shutdown {
                    c.emulation_shutdowns.fetch_add(1, Ordering::Relaxed);
                }
                if verdict == Verdict::ResetMmuAndRerun {
                    c.mmu_resets.fetch_add(1, Ordering::Relaxed);
                }
                Exit::Resolved
            }
            Verdict::TripleFault => Exit::Shutdown,
            Verdict::Unresolved(f) => {
                if f.violation.is_some() {
                    c.violations.fetch_add(1, Ordering::Relaxed);
                }
                log::debug!("{f}");
                Exit::EmulationFailure(f)
            }
        })
    }

    /// The watchdog found this vCPU inside `KVM_RUN` for long: populate
    /// what its instruction needs (curing a hang in KVM's emulator), run on.
    fn after_watchdog_kick(&mut self) -> Result<Exit<'_>, VmError> {
        let found = self
            .vm
            .populate_for_current_instruction(&self.fd, self.index)?;
        if let Resolution::Populated { .. } = found {
            let rip = self.fd.get_regs().map_or(0, |r| r.rip);
            log::info!(
                "vcpu {}: stuck inside KVM_RUN at rip {rip:#x}; populated what its instruction needs",
                self.index
            );
            self.vm
                .counters
                .watchdog_populated
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Exit::Resolved)
    }

    /// Undoes KVM's emulation of the instruction behind the pending MMIO
    /// read (see `kvm/native.rs`): completes it without entering the
    /// guest, then puts back the registers it had before, so the next run
    /// executes it natively against the now installed page.
    fn rerun_natively(&mut self, saved: &kvm_bindings::kvm_regs) -> Result<(), VmError> {
        /// An instruction needs at most a few MMIO fragments.
        const MAX_FRAGMENTS: usize = 8;
        self.fd.set_kvm_immediate_exit(1);
        let mut result = Ok(());
        for _ in 0..MAX_FRAGMENTS {
            match classify(self.fd.run()) {
                Ok(Step::Interrupted) => break,
                Ok(Step::Mmio {
                    gpa,
                    len,
                    write: false,
                    ..
                }) => {
                    // The value does not matter: the result is discarded.
                    let mut buf = [0u8; 8];
                    let _ = self
                        .vm
                        .space()
                        .read_with(gpa, &mut buf[..len], IoOpts::FORCE);
                    mmio_data(self.fd.get_kvm_run()).copy_from_slice(&buf[..len]);
                }
                Ok(_) => {
                    log::warn!(
                        "vcpu {}: unexpected exit completing an instruction to re-run natively",
                        self.index
                    );
                    break;
                }
                Err(e) => {
                    result = Err(VmError::Kvm {
                        op: "KVM_RUN (immediate exit)",
                        source: e,
                    });
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        result?;
        self.fd.set_regs(saved).map_err(kvm("KVM_SET_REGS"))?;
        self.vm
            .counters
            .native_reruns
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Classifies one `KVM_RUN` result (dropping its borrow of `kvm_run`).
fn classify(r: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Result<Step, kvm_ioctls::Error> {
    Ok(match r {
        Ok(VcpuExit::MmioRead(gpa, data)) => Step::Mmio {
            gpa,
            len: data.len().min(8),
            write: false,
            data: [0; 8],
        },
        Ok(VcpuExit::MmioWrite(gpa, data)) => {
            let mut buf = [0u8; 8];
            let len = data.len().min(8);
            buf[..len].copy_from_slice(&data[..len]);
            Step::Mmio {
                gpa,
                len,
                write: true,
                data: buf,
            }
        }
        Ok(VcpuExit::MemoryFault { gpa, .. }) => Step::MemoryFault { gpa },
        Ok(VcpuExit::IoOut(..)) => Step::IoOut,
        Ok(VcpuExit::IoIn(..)) => Step::IoIn,
        Ok(VcpuExit::Hlt) => Step::Hlt,
        Ok(VcpuExit::Shutdown) => Step::Failure(ExitForm::Shutdown),
        Ok(VcpuExit::InternalError) => Step::Failure(ExitForm::InternalError),
        Ok(VcpuExit::Intr) => Step::Interrupted,
        Ok(_) => Step::Other,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
        Err(e) if e.errno() == libc::ENOSPC => Step::Failure(ExitForm::NoSlots),
        Err(e) => return Err(e),
    })
}
