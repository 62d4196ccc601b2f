//! The KVM adapter: memslots as the mm core's backend, exits turned into
//! faults, and the vCPU run loop.
//!
//! - [`slots`]: [`SlotTable`], the memslot policy;
//! - [`exits`]: which exits are memory faults, and violation reports;
//! - [`vcpu`]: the run loop and the VMM's [`ExitHandler`];
//! - [`vm`]: [`Vm`], tying a KVM VM to an address space;
//! - [`emulate`]: resolving emulation failures (what an instruction KVM
//!   could not complete needs);
//! - [`walk`]: a software x86-64 page-table walker.

pub mod emulate;
pub mod exits;
pub mod slots;
mod sys;
pub mod vcpu;
pub mod vm;
pub mod walk;

pub use exits::{FailedInstruction, MemOperand, MemoryExit, MemoryViolation, ViolationKind};
pub use slots::{MergePolicy, SlotStats, SlotTable};
pub use vcpu::{Action, ExitHandler, VcpuStop};
pub use vm::{open_kvm, Vm, VmError, VmOptions, VmStats};
