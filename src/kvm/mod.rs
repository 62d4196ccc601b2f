//! The KVM adapter: memslots as the mm core's backend, exits turned into
//! faults, and the vCPU run loop.
//!
//! - [`slots`]: [`SlotTable`], the memslot policy;
//! - [`gate`](self#the-run-gate): the run gate every `KVM_RUN` passes through
//!   (kicks, pauses, stop, gap-free slot changes);
//! - [`vcpu`]: [`Vcpu`] and [`Exit`]: one `KVM_RUN`, memory exits resolved;
//! - [`handler`]: [`ExitHandler`] and the ready loop [`Vcpu::run_with`];
//! - [`exits`]: which exits are memory faults, violation reports;
//! - [`vm`]: [`Vm`], tying a KVM VM to an address space;
//! - `dirty`: [`Vm::start_dirty_tracking`], [`Vm::take_dirty`] (KVM's
//!   dirty log on memslots, harvested before any slot is deleted);
//! - [`cow_wp`]: [`CowMode`], and the fault thread that breaks
//!   copy-on-write per page under userfaultfd write protection;
//! - [`emulate`], [`operands`](self#operands), [`retry`](self#retries):
//!   resolving emulation failures (what an instruction KVM could not
//!   complete needs, and when to give up);
//! - [`native`](self#native-re-execution): instructions KVM's emulator gets
//!   wrong, re-run natively;
//! - [`walk`]: a software x86-64 page-table walker;
//! - [`kvm_stats`]: KVM's own counters ([`KvmStats`], `KVM_GET_STATS_FD`);
//! - [`vcpu_state`]: [`VcpuState`] and [`VmState`], what KVM holds for a
//!   vCPU and a VM, saved and restored for snapshots and clones;
//! - [`lifecycle`]: [`Vm::snapshot`], [`Vm::restore`] (lazy, with
//!   working-set replay) and [`Vm::save_working_set`]; `clone`:
//!   [`Vm::clone_vm`].
//!
//! # The run gate
//!
//! Every [`Vcpu::run`] passes a gate that knows which vCPUs are inside
//! `KVM_RUN`. Memslot changes that would leave installed memory without a
//! slot for a moment (merges, splits, writability changes) close it: the
//! vCPUs inside are kicked out (`immediate_exit` and a real-time signal,
//! [`VmOptions::kick_signal`]) and wait until the change is complete, so a
//! guest never observes the gap. [`VcpuKicker`], [`Vm::pause`] and
//! [`Vm::stop`] use the same gate.
//!
//! # Retries
//!
//! An emulation failure is a request to populate. It is re-run as long as
//! each attempt makes progress (something installed, or memslots changed
//! while it ran); an instruction instance that fails twice with no progress
//! is handed to the VMM as [`Exit::EmulationFailure`].
//!
//! # Operands
//!
//! What an instruction touches is decoded with iced-x86 and sized here where
//! iced cannot: XSAVE areas from XCR0 and CPUID leaf 0xD, masked accesses
//! element by element from the mask registers, gathers and scatters from
//! the index vector (registers read from the vCPU's XSAVE state).
//!
//! # Native re-execution
//!
//! KVM's emulator computes `lzcnt`/`tzcnt` as `bsr`/`bsf`. When one of them
//! first touches a page, guestmm installs the page, lets KVM finish without
//! entering the guest, restores the registers and re-runs the instruction
//! natively.

mod clone;
pub mod cow_wp;
mod dirty;
pub mod emulate;
pub mod exits;
mod gate;
pub mod handler;
pub mod kvm_stats;
pub mod lifecycle;
mod native;
mod operands;
mod prefill;
mod retry;
pub mod slots;
mod sys;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod walk;

pub use clone::{CloneOptions, VmClone};
pub use cow_wp::{CowMode, CowStats};
pub use exits::{
    EmulationFailure, FailedInstruction, MemOperand, MemoryExit, MemoryViolation, ViolationKind,
};
pub use handler::{Action, ExitHandler, VcpuStop};
pub use kvm_stats::{
    KvmStat, KvmStatKind, KvmStatSet, KvmStatUnit, KvmStats, KvmStatsError, KvmStatsFd,
    KvmStatsReader,
};
pub use lifecycle::{LifecycleError, RestoreOptions, Restored, SnapshotMode, WorkingSetMode};
pub use slots::{MergePolicy, SlotStats, SlotTable, DEFAULT_SLOT_BUDGET};
pub use vcpu::{Exit, Vcpu, VcpuKicker};
pub use vcpu_state::{StateError, VcpuState, VmState};
pub use vm::{open_kvm, Paused, StopCause, Vm, VmError, VmOptions, VmStats};
