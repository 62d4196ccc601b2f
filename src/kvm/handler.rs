//! A ready run loop: [`Vcpu::run_with`] calls [`Vcpu::run`] until an
//! [`ExitHandler`] (the VMM's devices and policy) says stop.
//!
//! Callbacks get the [`Vcpu`] (registers, the VM, event injection); data of
//! port and MMIO exits is copied out of `kvm_run` for them and, for reads,
//! copied back.

use kvm_bindings::kvm_run;

use super::exits::{EmulationFailure, MemoryViolation};
use super::sys::{io_data, mmio_data};
use super::vcpu::{Exit, Vcpu};
use super::vm::VmError;

/// What the handler wants after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the vCPU again.
    Continue,
    /// Return from [`Vcpu::run_with`].
    Stop,
}

/// Why [`Vcpu::run_with`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// A handler callback returned [`Action::Stop`].
    Handler,
    /// A violation the handler chose to stop on.
    Violation(MemoryViolation),
    /// An unresolved instruction the handler chose to stop on.
    EmulationFailure(EmulationFailure),
    /// The VM was stopped (see [`super::Vm::stop_cause`]).
    Stopped,
}

/// The VMM's side of [`Vcpu::run_with`]. Defaults stop on anything
/// unexpected.
pub trait ExitHandler {
    /// A port write.
    fn io_out(&mut self, vcpu: &Vcpu, port: u16, data: &[u8]) -> Action;

    /// A port read: fill `data`.
    fn io_in(&mut self, _vcpu: &Vcpu, _port: u16, data: &mut [u8]) -> Action {
        data.fill(0xff);
        Action::Continue
    }

    /// A read of a registered device range: fill `data`.
    fn mmio_read(&mut self, _vcpu: &Vcpu, _gpa: u64, data: &mut [u8]) -> Action {
        data.fill(0);
        Action::Continue
    }

    /// A write to a registered device range.
    fn mmio_write(&mut self, _vcpu: &Vcpu, _gpa: u64, _data: &[u8]) -> Action {
        Action::Continue
    }

    /// A refused guest access. `Continue` drops a write and makes a read
    /// return zeros.
    fn violation(&mut self, _vcpu: &Vcpu, _violation: &MemoryViolation) -> Action {
        Action::Stop
    }

    /// An instruction guestmm could not get past. `Continue` runs it again,
    /// so only after fixing the cause (injecting an exception with
    /// `KVM_SET_VCPU_EVENTS`, changing registers).
    fn emulation_failure(&mut self, _vcpu: &Vcpu, _failure: &EmulationFailure) -> Action {
        Action::Stop
    }

    /// `hlt`.
    fn hlt(&mut self, _vcpu: &Vcpu) -> Action {
        Action::Stop
    }

    /// A triple fault.
    fn shutdown(&mut self, _vcpu: &Vcpu) -> Action {
        Action::Stop
    }

    /// A [`VcpuKicker::kick`](super::VcpuKicker::kick).
    fn kicked(&mut self, _vcpu: &Vcpu) -> Action {
        Action::Stop
    }

    /// Any other exit: its reason and `kvm_run` (see [`Exit::Other`]).
    fn unhandled(&mut self, _index: u32, _reason: u32, _run: &mut kvm_run) -> Action {
        Action::Stop
    }
}

/// An exit whose data was copied out, so the handler can have the vCPU.
enum Copied {
    IoOut(u16, Vec<u8>),
    IoIn(u16, usize),
    MmioRead(u64, usize),
    MmioWrite(u64, [u8; 8], usize),
    Violation(MemoryViolation),
    EmulationFailure(EmulationFailure),
    Hlt,
    Shutdown,
    Kicked,
}

impl Vcpu {
    /// Runs the vCPU until `handler` stops it, the VM stops, or a host
    /// error occurs (which stops the VM: see [`Vcpu::run`]).
    pub fn run_with(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuStop, VmError> {
        let index = self.index();
        loop {
            let copied = match self.run()? {
                Exit::Resolved => continue,
                Exit::Stopped => return Ok(VcpuStop::Stopped),
                Exit::IoOut { port, data } => Copied::IoOut(port, data.to_vec()),
                Exit::IoIn { port, data } => Copied::IoIn(port, data.len()),
                Exit::MmioRead { gpa, data } => Copied::MmioRead(gpa, data.len()),
                Exit::MmioWrite { gpa, data } => {
                    let mut buf = [0u8; 8];
                    let n = data.len().min(8);
                    buf[..n].copy_from_slice(&data[..n]);
                    Copied::MmioWrite(gpa, buf, n)
                }
                Exit::Violation(v) => Copied::Violation(v),
                Exit::EmulationFailure(f) => Copied::EmulationFailure(f),
                Exit::Hlt => Copied::Hlt,
                Exit::Shutdown => Copied::Shutdown,
                Exit::Kicked => Copied::Kicked,
                Exit::Other { reason, run } => match handler.unhandled(index, reason, run) {
                    Action::Continue => continue,
                    Action::Stop => return Ok(VcpuStop::Handler),
                },
            };
            let action = match copied {
                Copied::IoOut(port, data) => handler.io_out(self, port, &data),
                Copied::IoIn(port, len) => {
                    let mut buf = vec![0u8; len];
                    let a = handler.io_in(self, port, &mut buf);
                    io_data(self.kvm_run()).copy_from_slice(&buf);
                    a
                }
                Copied::MmioRead(gpa, len) => {
                    let mut buf = [0u8; 8];
                    let a = handler.mmio_read(self, gpa, &mut buf[..len]);
                    mmio_data(self.kvm_run()).copy_from_slice(&buf[..len]);
                    a
                }
                Copied::MmioWrite(gpa, buf, n) => handler.mmio_write(self, gpa, &buf[..n]),
                Copied::Violation(v) => match handler.violation(self, &v) {
                    Action::Continue => Action::Continue,
                    Action::Stop => return Ok(VcpuStop::Violation(v)),
                },
                Copied::EmulationFailure(f) => match handler.emulation_failure(self, &f) {
                    Action::Continue => Action::Continue,
                    Action::Stop => return Ok(VcpuStop::EmulationFailure(f)),
                },
                Copied::Hlt => handler.hlt(self),
                Copied::Shutdown => handler.shutdown(self),
                Copied::Kicked => handler.kicked(self),
            };
            if action == Action::Stop {
                return Ok(VcpuStop::Handler);
            }
        }
    }
}
