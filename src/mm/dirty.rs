//! Dirty tracking: which guest pages changed since the last take.
//!
//! Two sources feed one sink ([`DirtyLog`], shared with the backend):
//!
//! - **the guest's writes**, which only the backend sees (KVM's dirty log on
//!   memslots); [`AddressSpace::take_dirty`] asks the backend to harvest
//!   them into the sink, and the backend harvests a slot into the sink
//!   before it deletes it (see `kvm/slots.rs`);
//! - **host-side changes**, marked here by the mm core as they happen:
//!   host writes ([`write_with`](AddressSpace::write_with),
//!   [`zero`](AddressSpace::zero), [`SpaceMemory`](super::SpaceMemory)
//!   writes, every access through [`SpaceRegions`](super::SpaceRegions),
//!   which serves reads as writes), pins for write (when pinned and again
//!   when unpinned: a device writes in between), copy-on-write breaks of
//!   [`break_cow_page`](AddressSpace::break_cow_page) (the faulting page),
//!   and every populated page dropped by `unmap`, `decommit`, truncation
//!   of a mapped object or an object's decommit (its content becomes zero,
//!   the object's or nothing; a shared object's decommit marks the whole
//!   range this space maps there, populated here or not).
//!
//! Extra pages are reported only for those drops (a page dropped and never
//! written), for host writes that failed part way, and for pins; a page
//! written is never missed.
//!
//! # No page is lost, without a pause
//!
//! A take harvests the backend, then empties the sink. Host writes mark the
//! sink *after* the bytes land (under `active`, like the write): a take
//! that empties the sink before the mark leaves the page for the next take.
//! A guest write sets its bit in KVM's log for its slot at some instant;
//! the harvest fetches and clears each slot's log atomically
//! (`KVM_GET_DIRTY_LOG`): a bit set before that is in the sink before the
//! sink is emptied, a bit set after stays in KVM's log, harvested by the
//! next take or moved into the sink when the slot is deleted. So every
//! write is reported by the first take that starts after it completes or,
//! where the CPU buffers the log per vCPU (Intel PML: KVM flushes the
//! buffer when the vCPU exits, and a harvest kicks running vCPUs without
//! waiting for them), by the take after. For a diff snapshot: take, then
//! copy the pages; a page changed after its copy is in a later take.
//!
//! What is not seen: writes through host mappings the mm core handed out
//! earlier and that outlive a take (a `SpaceMemory` slice or a
//! `SpaceRegions` slice kept across it, a pin's pages written by a device
//! before the take and unpinned after it are reported on unpin).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{AddressSpace, MmError};
use crate::dirty::{DirtyLog, DirtyPages};
use crate::range::GuestRange;

/// An address space's dirty-tracking state.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    on: AtomicBool,
    log: Arc<DirtyLog>,
    /// Serializes start, take and stop, and guards the pages dirty since
    /// the base ([`AddressSpace::mark_dirty_base`]). Taken first and
    /// alone: above `mapping` in the lock order.
    control: Mutex<Option<DirtyPages>>,
}

impl Tracking {
    /// Marks `range` if tracking is on.
    pub(crate) fn mark(&self, range: GuestRange) {
        if self.on.load(Ordering::Acquire) {
            self.log.mark(range);
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Option<DirtyPages>> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AddressSpace {
    /// Starts tracking which pages change (see the module docs): from its
    /// return on, every guest or host write is reported by
    /// [`take_dirty`](Self::take_dirty). Turns on the backend's dirty log
    /// (KVM: `KVM_MEM_LOG_DIRTY_PAGES` on every writable slot). Already
    /// tracking: nothing changes.
    ///
    /// Errors: the backend's ([`MmError::Backend`]); tracking stays off.
    pub fn start_dirty_tracking(&self) -> Result<(), MmError> {
        let mut control = self.dirty.control();
        if self.dirty.on.load(Ordering::Acquire) {
            return Ok(());
        }
        // Nothing before this start was tracked: no base survives it.
        *control = None;
        // Under `active`: no host write or install runs meanwhile, so each
        // is either before the start (not reported) or after (reported).
        let _active = self.lock_active();
        self.dirty.log.clear();
        if let Err(e) = self.backend.start_dirty_log(self.dirty.log.clone()) {
            self.backend.stop_dirty_log();
            return Err(e.into());
        }
        self.dirty.on.store(true, Ordering::Release);
        log::debug!("space {}: dirty tracking on", self.id);
        Ok(())
    }

    /// The pages written since tracking started or since the last take,
    /// and clears them: harvests the backend's log into the sink, then
    /// empties the sink. Needs no pause of the guest (see the module docs
    /// for why nothing is lost). Not tracking: an empty set.
    ///
    /// Errors: the backend's harvest ([`MmError::Backend`]); what was
    /// harvested before the failure stays for the next take.
    pub fn take_dirty(&self) -> Result<DirtyPages, MmError> {
        let mut control = self.dirty.control();
        self.take_dirty_controlled(&mut control)
    }

    /// [`take_dirty`](Self::take_dirty) with the control lock held: the
    /// pages taken also go into those dirty since the base, if one is set.
    fn take_dirty_controlled(
        &self,
        since_base: &mut Option<DirtyPages>,
    ) -> Result<DirtyPages, MmError> {
        if !self.dirty.on.load(Ordering::Acquire) {
            return Ok(DirtyPages::new());
        }
        self.backend.harvest_dirty()?;
        let pages = self.dirty.log.take();
        if let Some(base) = since_base.as_mut() {
            base.union(&pages);
        }
        Ok(pages)
    }

    /// Makes now the base of later [`dirty_since_base`](Self::dirty_since_base)
    /// calls (a full snapshot about to be written): takes what is dirty
    /// (discarded: the snapshot saves it) and starts an empty set that
    /// every later take adds to, whoever calls it. Returns `false` (and
    /// sets nothing) if not tracking.
    ///
    /// Errors: the backend's harvest; no base is set.
    pub fn mark_dirty_base(&self) -> Result<bool, MmError> {
        let mut control = self.dirty.control();
        *control = None;
        if !self.dirty.on.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.take_dirty_controlled(&mut control)?;
        *control = Some(DirtyPages::new());
        Ok(true)
    }

    /// Forgets the base ([`mark_dirty_base`](Self::mark_dirty_base)): its
    /// snapshot was not written.
    pub fn clear_dirty_base(&self) {
        *self.dirty.control() = None;
    }

    /// Every page dirtied since the base ([`mark_dirty_base`](Self::mark_dirty_base)),
    /// including those taken since by [`take_dirty`](Self::take_dirty)
    /// (a diff snapshot's pages); `None` if there is no base (never set,
    /// or tracking stopped or restarted since). Takes what is dirty now.
    ///
    /// Errors: the backend's harvest.
    pub fn dirty_since_base(&self) -> Result<Option<DirtyPages>, MmError> {
        let mut control = self.dirty.control();
        if control.is_none() {
            return Ok(None);
        }
        self.take_dirty_controlled(&mut control)?;
        Ok(control.clone())
    }

    /// Stops tracking and forgets what was not taken. Not tracking:
    /// nothing happens.
    pub fn stop_dirty_tracking(&self) {
        let mut control = self.dirty.control();
        *control = None;
        if !self.dirty.on.load(Ordering::Acquire) {
            return;
        }
        let _active = self.lock_active();
        self.dirty.on.store(false, Ordering::Release);
        self.backend.stop_dirty_log();
        self.dirty.log.clear();
        log::debug!("space {}: dirty tracking off", self.id);
    }

    /// Whether dirty tracking is on.
    pub fn is_dirty_tracking(&self) -> bool {
        self.dirty.on.load(Ordering::Acquire)
    }

    /// Marks `range` dirty if tracking is on (a host-side change).
    pub(crate) fn mark_dirty(&self, range: GuestRange) {
        self.dirty.mark(range);
    }
}
