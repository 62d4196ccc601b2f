//! `Vm`: a KVM VM whose RAM is a guestmm address space, shown to the guest
//! through a [`SlotTable`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::slots::{MergePolicy, SlotStats, SlotTable};
use crate::memfile::MemoryFile;
use crate::mm::{AddressSpace, AddressSpaceOptions, BackendError, FaultError, MmError};
use crate::range::GuestRange;

/// `KVM_CAP_EXIT_ON_EMULATION_FAILURE`: emulation failures exit to
/// userspace at any CPL instead of injecting #UD.
const CAP_EXIT_ON_EMULATION_FAILURE: u32 = 204;

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
}

/// Opens `/dev/kvm` and checks that it answers as KVM does (API version
/// 12), so a missing, inaccessible or impostor device is one clear error
/// instead of a failure at the first VM ioctl.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|source| VmError::Kvm {
        op: "open /dev/kvm",
        source,
    })?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::Kvm {
            op: "KVM_GET_API_VERSION",
            source: kvm_ioctls::Error::new(libc::ENOTTY),
        });
    }
    Ok(kvm)
}

/// Options of a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The address space (its `size` is also the host reservation's size).
    pub space: AddressSpaceOptions,
    /// Lower the memslot limit below what KVM offers.
    pub max_slots: Option<usize>,
    /// When adjacent installs share a memslot.
    pub slot_merge: MergePolicy,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            space: AddressSpaceOptions {
                size: 1 << 40,
                ..AddressSpaceOptions::default()
            },
            max_slots: None,
            slot_merge: MergePolicy::Eager,
        }
    }
}

/// Exit counters of a [`Vm`] (all vCPUs).
#[derive(Debug, Default)]
pub(crate) struct ExitCounters {
    pub exits: AtomicU64,
    pub memory_exits: AtomicU64,
    pub emulation_failures: AtomicU64,
    pub emulation_shutdowns: AtomicU64,
    pub violations: AtomicU64,
    pub device_exits: AtomicU64,
}

/// A snapshot of a VM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Every exit from `KVM_RUN`.
    pub exits: u64,
    /// Exits resolved as memory faults (MMIO on guest RAM, memory faults).
    pub memory_exits: u64,
    /// Emulation failures (internal errors and shutdowns) resolved by
    /// populating the pages the instruction needs.
    pub emulation_failures: u64,
    /// Of those, the ones that came back as `KVM_EXIT_SHUTDOWN`.
    pub emulation_shutdowns: u64,
    /// Violations reported to the handler.
    pub violations: u64,
    /// Exits forwarded to device handlers.
    pub device_exits: u64,
    /// Memslot counters.
    pub slots: SlotStats,
}

/// A VM whose guest-physical memory is a guestmm address space.
///
/// Several vCPUs may run on their own threads against one `Arc<Vm>`.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    slots: Arc<SlotTable>,
    space: Arc<AddressSpace>,
    devices: RwLock<Vec<GuestRange>>,
    pub(crate) counters: ExitCounters,
    emulation_failure_exits: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("space", &self.space)
            .field("slots", &self.slots)
            .finish()
    }
}

impl Vm {
    /// Creates a VM with an empty address space over `memfile`.
    pub fn new(kvm: &Kvm, memfile: Arc<MemoryFile>, opts: VmOptions) -> Result<Arc<Vm>, VmError> {
        let vm_fd = Arc::new(kvm.create_vm().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?);
        let emulation_failure_exits =
            kvm.check_extension_raw(CAP_EXIT_ON_EMULATION_FAILURE.into()) > 0 && {
                let cap = kvm_enable_cap {
                    cap: CAP_EXIT_ON_EMULATION_FAILURE,
                    args: [1, 0, 0, 0],
                    ..Default::default()
                };
                vm_fd.enable_cap(&cap).is_ok()
            };
        if !emulation_failure_exits {
            log::warn!("KVM_CAP_EXIT_ON_EMULATION_FAILURE unavailable: failed emulation at CPL3 may raise #UD in the guest");
        }
        let kvm_limit = kvm.get_nr_memslots();
        let limit = opts.max_slots.map_or(kvm_limit, |m| m.min(kvm_limit));
        let slots = Arc::new(SlotTable::with_policy(
            vm_fd.clone(),
            opts.space.size,
            limit,
            opts.slot_merge,
        )?);
        let space = AddressSpace::new(memfile, slots.clone(), opts.space)?;
        Ok(Arc::new(Vm {
            vm_fd,
            slots,
            space,
            devices: RwLock::new(Vec::new()),
            counters: ExitCounters::default(),
            emulation_failure_exits,
        }))
    }

    /// The guest-physical address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// The memslot table.
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// True if emulation failures exit to userspace at every CPL.
    pub fn emulation_failure_exits(&self) -> bool {
        self.emulation_failure_exits
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, VmError> {
        self.vm_fd.create_vcpu(id).map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VCPU",
            source,
        })
    }

    /// Declares `range` a device range: guest accesses there that no vma
    /// covers go to the handler's MMIO callbacks instead of being
    /// violations.
    pub fn add_device_range(&self, range: GuestRange) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(range);
    }

    pub(crate) fn is_device(&self, gpa: u64) -> bool {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|r| r.contains(gpa))
    }

    /// Counters of exits and memslots.
    pub fn stats(&self) -> VmStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        VmStats {
            exits: load(&c.exits),
            memory_exits: load(&c.memory_exits),
            emulation_failures: load(&c.emulation_failures),
            emulation_shutdowns: load(&c.emulation_shutdowns),
            violations: load(&c.violations),
            device_exits: load(&c.device_exits),
            slots: self.slots.stats(),
        }
    }
}
