//! Dirty tracking of a [`Vm`]'s guest memory: the address space's tracking
//! ([`AddressSpace::start_dirty_tracking`](crate::mm::AddressSpace::start_dirty_tracking))
//! over KVM's dirty log on the VM's memslots (see [`SlotTable`](super::SlotTable)'s
//! "Dirty log").
//!
//! KVM's dirty bitmap (`KVM_GET_DIRTY_LOG`) is used, not the dirty ring
//! (`KVM_CAP_DIRTY_LOG_RING`): the bitmap needs no per-vCPU state and no
//! handling of ring-full exits, and a harvest costs one ioctl per slot
//! (guestmm keeps O(log size) slots). The ring was not measured.

use super::vm::{Vm, VmError};
use crate::dirty::DirtyPages;

impl Vm {
    /// Starts tracking which guest pages change, by the guest (KVM's dirty
    /// log on every writable memslot) or by the host (the address space's
    /// writes, copy-on-write breaks, decommits): see
    /// [`AddressSpace::take_dirty`](crate::mm::AddressSpace::take_dirty).
    /// Already tracking: nothing changes.
    ///
    /// While tracking, every memslot deletion (merges, splits,
    /// write-protection, removals) pauses the vCPUs for its duration, so a
    /// slot's log is harvested with nothing running.
    pub fn start_dirty_tracking(&self) -> Result<(), VmError> {
        Ok(self.space().start_dirty_tracking()?)
    }

    /// The pages written since tracking started or since the last take,
    /// and clears them. They still go into the next diff snapshot
    /// ([`SnapshotMode::Diff`](super::SnapshotMode::Diff)): the address
    /// space keeps the pages dirtied since its diff base
    /// ([`AddressSpace::dirty_since_base`](crate::mm::AddressSpace::dirty_since_base)). The vCPUs keep running: a write racing the take is
    /// reported by this take or the next, never lost.
    ///
    /// Not tracking: an empty set.
    pub fn take_dirty(&self) -> Result<DirtyPages, VmError> {
        Ok(self.space().take_dirty()?)
    }

    /// Stops tracking (memslots drop `KVM_MEM_LOG_DIRTY_PAGES`) and forgets
    /// what was not taken.
    pub fn stop_dirty_tracking(&self) {
        self.space().stop_dirty_tracking();
    }

    /// Whether dirty tracking is on.
    pub fn is_dirty_tracking(&self) -> bool {
        self.space().is_dirty_tracking()
    }
}
