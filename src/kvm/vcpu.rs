//! The vCPU run loop: memory exits are resolved here (fault, then complete
//! the access against memory); everything else goes to the VMM's
//! [`ExitHandler`].
//!
//! ```text
//! KVM_RUN ─► MMIO read/write at gpa ─► handle_fault(gpa) ─ ok ─► complete the access
//!                                            │                  against memory, re-run
//!                                            ├─ unmapped + device range ─► handler MMIO
//!                                            ├─ violation ─► handler: Stop | Continue
//!                                            └─ out of memory / slots ─► VmError
//!         ─► internal error or shutdown ─► kvm::emulate: walk the guest page tables,
//!                                              decode, fault in the instruction's and its
//!                                              operands' pages, re-run (bounded); a shutdown
//!                                              with nothing to populate ─► handler
//!         ─► port I/O, HLT, other ─► handler
//! ```
//!
//! A memory exit at an address whose pma already exists (another vCPU
//! populated it, or a slot was being replaced) resolves the same way: the
//! fault is idempotent and the access is completed against memory.

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::emulate::{ExitForm, RetryState, Verdict};
use super::exits::{MemoryViolation, ViolationKind};
use super::vm::{Vm, VmError};
use crate::mm::{FaultError, IoOpts, MmError};
use crate::perms::Access;

use std::sync::atomic::Ordering;

/// What the handler wants after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the vCPU again.
    Continue,
    /// Return from [`Vm::run_vcpu`].
    Stop,
}

/// Why [`Vm::run_vcpu`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The handler returned [`Action::Stop`].
    Handler,
    /// A violation the handler chose to stop on.
    Violation(MemoryViolation),
}

/// The VMM's side of the run loop. Defaults stop on anything unexpected.
pub trait ExitHandler {
    /// A port write (`out`): `vcpu` is free for register access.
    fn io_out(&mut self, vcpu: &mut VcpuFd, index: u32, port: u16, data: &[u8]) -> Action;

    /// A port read (`in`): fill `data`.
    fn io_in(&mut self, _index: u32, _port: u16, data: &mut [u8]) -> Action {
        data.fill(0xff);
        Action::Continue
    }

    /// A read of a registered device range: fill `data`.
    fn mmio_read(&mut self, _index: u32, _gpa: u64, data: &mut [u8]) -> Action {
        data.fill(0);
        Action::Continue
    }

    /// A write to a registered device range.
    fn mmio_write(&mut self, _index: u32, _gpa: u64, _data: &[u8]) -> Action {
        Action::Continue
    }

    /// A refused guest access. `Continue` drops a write and makes a read
    /// return zeros; a violation found resolving an emulation failure (an
    /// instruction fetch, an operand of an instruction KVM cannot emulate)
    /// cannot be skipped and stops the vCPU whatever this returns.
    fn violation(&mut self, _violation: &MemoryViolation) -> Action {
        Action::Stop
    }

    /// `hlt`.
    fn hlt(&mut self, _index: u32) -> Action {
        Action::Stop
    }

    /// A triple fault: a `KVM_EXIT_SHUTDOWN` for which the emulation path
    /// found nothing to populate.
    fn shutdown(&mut self, _vcpu: &mut VcpuFd, _index: u32) -> Action {
        Action::Stop
    }

    /// Any other exit, described.
    fn unhandled(&mut self, _index: u32, _what: &str) -> Action {
        Action::Stop
    }
}

/// An exit whose handling needs the vCPU back (the kvm_run borrow ended).
enum Pending {
    IoOut(u16, [u8; 8], usize),
    Hlt,
    Shutdown,
    EmulationFailure,
    Other(String),
    Stop(VcpuStop),
}

impl Vm {
    /// Runs vCPU `index` until the handler stops it or a host error occurs.
    pub fn run_vcpu(
        &self,
        vcpu: &mut VcpuFd,
        index: u32,
        handler: &mut dyn ExitHandler,
    ) -> Result<VcpuStop, VmError> {
        let mut retry = RetryState::default();
        loop {
            let pending = match vcpu.run() {
                Ok(exit) => {
                    self.counters.exits.fetch_add(1, Ordering::Relaxed);
                    match exit {
                        VcpuExit::MmioRead(gpa, data) => {
                            match self.mmio_read(index, gpa, data, handler)? {
                                Some(stop) => Pending::Stop(stop),
                                None => continue,
                            }
                        }
                        VcpuExit::MmioWrite(gpa, data) => {
                            let mut buf = [0u8; 8];
                            let n = data.len().min(8);
                            buf[..n].copy_from_slice(&data[..n]);
                            match self.mmio_write(index, gpa, &buf[..n], handler)? {
                                Some(stop) => Pending::Stop(stop),
                                None => continue,
                            }
                        }
                        VcpuExit::MemoryFault { gpa, .. } => {
                            match self.memory_fault(index, gpa, handler)? {
                                Some(stop) => Pending::Stop(stop),
                                None => continue,
                            }
                        }
                        VcpuExit::IoOut(port, data) => {
                            let mut buf = [0u8; 8];
                            let n = data.len().min(8);
                            buf[..n].copy_from_slice(&data[..n]);
                            Pending::IoOut(port, buf, n)
                        }
                        VcpuExit::IoIn(port, data) => match handler.io_in(index, port, data) {
                            Action::Continue => continue,
                            Action::Stop => Pending::Stop(VcpuStop::Handler),
                        },
                        VcpuExit::Hlt => Pending::Hlt,
                        VcpuExit::Shutdown => Pending::Shutdown,
                        VcpuExit::InternalError => Pending::EmulationFailure,
                        other => Pending::Other(format!("{other:?}")),
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(VmError::Kvm {
                        op: "KVM_RUN",
                        source,
                    })
                }
            };
            let action = match pending {
                Pending::Stop(stop) => return Ok(stop),
                Pending::IoOut(port, buf, n) => handler.io_out(vcpu, index, port, &buf[..n]),
                Pending::Hlt => handler.hlt(index),
                Pending::Other(what) => handler.unhandled(index, &what),
                Pending::Shutdown | Pending::EmulationFailure => {
                    let form = match pending {
                        Pending::Shutdown => ExitForm::Shutdown,
                        _ => ExitForm::InternalError,
                    };
                    match self.resolve_emulation_failure(vcpu, index, form, &mut retry)? {
                        Verdict::Rerun => {
                            let c = &self.counters;
                            c.emulation_failures.fetch_add(1, Ordering::Relaxed);
                            if form == ExitForm::Shutdown {
                                c.emulation_shutdowns.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        Verdict::TripleFault => handler.shutdown(vcpu, index),
                        // The instruction cannot be skipped: stop whatever
                        // the handler says.
                        Verdict::Violation(v) => {
                            self.report(v.clone(), handler);
                            return Ok(VcpuStop::Violation(v));
                        }
                    }
                }
            };
            if action == Action::Stop {
                return Ok(VcpuStop::Handler);
            }
        }
    }

    /// Resolves an MMIO read. `Ok(None)`: re-run; `Ok(Some)`: stop.
    fn mmio_read(
        &self,
        index: u32,
        gpa: u64,
        data: &mut [u8],
        handler: &mut dyn ExitHandler,
    ) -> Result<Option<VcpuStop>, VmError> {
        match self.space().handle_fault(gpa, Access::Read) {
            Ok(_) => {
                self.counters.memory_exits.fetch_add(1, Ordering::Relaxed);
                match self.space().read_with(gpa, data, IoOpts::default()) {
                    Ok(()) => Ok(None),
                    Err(e) => {
                        data.fill(0);
                        self.access_failed(index, gpa, Access::Read, e, handler)
                    }
                }
            }
            Err(FaultError::Unmapped { .. }) if self.is_device(gpa) => {
                self.counters.device_exits.fetch_add(1, Ordering::Relaxed);
                Ok(stop_if(handler.mmio_read(index, gpa, data)))
            }
            Err(e) => {
                let stop = self.fault_failed(index, e, handler)?;
                data.fill(0);
                Ok(stop)
            }
        }
    }

    /// Resolves an MMIO write.
    fn mmio_write(
        &self,
        index: u32,
        gpa: u64,
        data: &[u8],
        handler: &mut dyn ExitHandler,
    ) -> Result<Option<VcpuStop>, VmError> {
        match self.space().handle_fault(gpa, Access::Write) {
            Ok(_) => {
                self.counters.memory_exits.fetch_add(1, Ordering::Relaxed);
                match self.space().write_with(gpa, data, IoOpts::default()) {
                    Ok(()) => Ok(None),
                    Err(e) => self.access_failed(index, gpa, Access::Write, e, handler),
                }
            }
            Err(FaultError::Unmapped { .. }) if self.is_device(gpa) => {
                self.counters.device_exits.fetch_add(1, Ordering::Relaxed);
                Ok(stop_if(handler.mmio_write(index, gpa, data)))
            }
            Err(e) => self.fault_failed(index, e, handler),
        }
    }

    /// Resolves `KVM_EXIT_MEMORY_FAULT`: populate and re-run. A refused
    /// access cannot be skipped, so it stops whatever the handler says.
    fn memory_fault(
        &self,
        index: u32,
        gpa: u64,
        handler: &mut dyn ExitHandler,
    ) -> Result<Option<VcpuStop>, VmError> {
        match self
            .space()
            .handle_fault(gpa, super::exits::MEMORY_FAULT_ACCESS)
        {
            Ok(_) => {
                self.counters.memory_exits.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Ok(Some(
                self.fault_failed(index, e, handler)?
                    .unwrap_or(VcpuStop::Handler),
            )),
        }
    }

    /// Reports a refused fault to the handler, or fails the VM for host
    /// errors.
    fn fault_failed(
        &self,
        index: u32,
        e: FaultError,
        handler: &mut dyn ExitHandler,
    ) -> Result<Option<VcpuStop>, VmError> {
        match MemoryViolation::from_fault(&e, index) {
            Some(v) => Ok(self.report(v, handler)),
            None => Err(VmError::Fault {
                vcpu: index,
                source: e,
            }),
        }
    }

    /// The fault succeeded but the access did not (it straddles into
    /// memory the guest may not touch).
    fn access_failed(
        &self,
        index: u32,
        gpa: u64,
        access: Access,
        e: MmError,
        handler: &mut dyn ExitHandler,
    ) -> Result<Option<VcpuStop>, VmError> {
        let kind = match e {
            MmError::NotMapped { .. } => ViolationKind::Unmapped,
            MmError::Permission { allowed, .. } => ViolationKind::Permission { allowed },
            MmError::Fault(f) => return self.fault_failed(index, f, handler),
            other => {
                return Err(VmError::Access {
                    vcpu: index,
                    source: other,
                })
            }
        };
        Ok(self.report(
            MemoryViolation {
                gpa,
                access,
                vcpu: index,
                kind,
                rip: None,
                instruction: None,
            },
            handler,
        ))
    }

    fn report(&self, v: MemoryViolation, handler: &mut dyn ExitHandler) -> Option<VcpuStop> {
        self.counters.violations.fetch_add(1, Ordering::Relaxed);
        log::debug!("{v}");
        match handler.violation(&v) {
            Action::Continue => None,
            Action::Stop => Some(VcpuStop::Violation(v)),
        }
    }
}

fn stop_if(action: Action) -> Option<VcpuStop> {
    (action == Action::Stop).then_some(VcpuStop::Handler)
}
