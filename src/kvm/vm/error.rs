//! The errors of a [`Vm`](super::Vm): [`VmError`], and [`StopCause`], why
//! a VM was stopped.

use crate::mm::{BackendError, FaultError, MmError};
use crate::range::GuestRange;

/// Errors that stop a VM (as opposed to guest violations, which go to the
/// VMM's handler).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A fault could not be resolved for a host reason (out of memory, out
    /// of memslots).
    #[error("vcpu {vcpu}: {source}")]
    Fault {
        /// Index of the vCPU.
        vcpu: u32,
        /// The fault error.
        source: FaultError,
    },
    /// Completing an access against memory failed.
    #[error("vcpu {vcpu}: completing the access failed: {source}")]
    Access {
        /// Index of the vCPU.
        vcpu: u32,
        /// The error.
        source: MmError,
    },
    /// Building the address space failed.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// Building the slot table failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An option is out of range.
    #[error("bad VM option {option}: {why}")]
    BadOption {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A device range was refused.
    #[error("device range {range} refused: {why}")]
    DeviceRange {
        /// The range.
        range: GuestRange,
        /// What it conflicts with.
        why: String,
    },
    /// The kick signal's handler could not be installed.
    #[error("installing the vCPU kick signal handler (SIGRTMIN+{offset}) failed: {source}")]
    KickSignal {
        /// The signal, as an offset from `SIGRTMIN`.
        offset: i32,
        /// The error.
        source: std::io::Error,
    },
    /// [`CowMode::UserfaultfdWp`](crate::kvm::CowMode::UserfaultfdWp) was asked for and userfaultfd write
    /// protection is unavailable.
    #[error("copy-on-write mode uffd-wp unavailable: {source}")]
    Userfaultfd {
        /// Why.
        source: crate::uffd::UffdError,
    },
    /// Some vCPUs did not leave `KVM_RUN` when asked (stuck inside KVM).
    #[error("{stuck} vCPU(s) did not leave KVM_RUN when asked")]
    VcpusStuck {
        /// How many.
        stuck: u32,
    },
    /// The VM was stopped, by [`Vm::stop`](super::Vm::stop) or because a vCPU failed.
    #[error("the VM was stopped: {cause}")]
    Stopped {
        /// Why.
        cause: StopCause,
    },
}

/// Why a VM was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// [`Vm::stop`](super::Vm::stop) was called.
    Requested,
    /// A vCPU failed with a host error (out of memory or memslots, a KVM
    /// ioctl): the whole VM stops, so vCPUs waiting for it do not hang.
    VcpuFailed {
        /// Index of the vCPU.
        vcpu: u32,
        /// Its error.
        error: String,
    },
    /// The copy-on-write fault thread
    /// ([`CowMode::UserfaultfdWp`](crate::kvm::CowMode::UserfaultfdWp)) could
    /// not break copy-on-write for a page a vCPU writes (out of memory or
    /// memslots): that vCPU cannot make progress.
    CopyOnWrite {
        /// The error.
        error: String,
    },
}

impl std::fmt::Display for StopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopCause::Requested => f.write_str("stop requested"),
            StopCause::VcpuFailed { vcpu, error } => write!(f, "vcpu {vcpu} failed: {error}"),
            StopCause::CopyOnWrite { error } => write!(f, "copy-on-write thread: {error}"),
        }
    }
}
