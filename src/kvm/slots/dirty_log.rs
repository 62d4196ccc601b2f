//! The dirty log of [`SlotTable`]: `KVM_MEM_LOG_DIRTY_PAGES` on writable
//! slots, harvesting, starting and stopping. The harvest before a slot's
//! deletion runs where slots are deleted (`kvm/slots.rs`: `apply_locked`,
//! `Drop`).
//!
//! While the address space tracks dirty pages
//! ([`AddressSpaceBackend::start_dirty_log`]), every *writable* slot
//! carries `KVM_MEM_LOG_DIRTY_PAGES`: slots live when logging starts get it
//! by a flags-only `KVM_SET_USER_MEMORY_REGION` (KVM lets a slot's flags
//! change, except `KVM_MEM_READONLY`), slots added later are created with
//! it. Read-only slots carry no log: the guest cannot write them (a write
//! exits, and the fault path makes the page writable in a new, logged
//! slot). [`harvest_dirty`][hd] runs `KVM_GET_DIRTY_LOG` on every writable
//! slot (fetch and clear, atomic against the guest's writes) and ORs each
//! bitmap into the sink at the slot's guest-physical address.
//!
//! KVM frees a slot's log with the slot, so **every deletion of a writable
//! slot harvests it first** (if that harvest fails, the whole slot is
//! reported dirty: over-reporting, never a loss), under the table's lock:
//! merges, splits, write-protection (a fork's `write_protect_cow` in
//! read-only-slot mode too), removals, and the table's drop. A guest write between that
//! harvest and the deletion would be lost, so while logging, every plan
//! that deletes a slot closes the run gate (no vCPU is inside `KVM_RUN`
//! from the harvest to the deletion; KVM flushes a vCPU's
//! page-modification log when it exits). Pages the mm core replaces under
//! a live slot (a copy-on-write break keeping its writability) change no
//! slot and keep their bits.
//!
//! [`AddressSpaceBackend::start_dirty_log`]:
//!     crate::mm::backend::AddressSpaceBackend::start_dirty_log
//! [hd]: crate::mm::backend::AddressSpaceBackend::harvest_dirty

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Slot, SlotState, SlotTable};
use crate::dirty::DirtyLog;
use crate::mm::backend::BackendError;
use crate::range::GuestRange;

impl SlotTable {
    /// Moves slot `slot`'s dirty log (over `r`) into the sink, if logging
    /// and the slot is writable (`before_delete`: for the stats).
    ///
    /// # Preconditions
    /// - `st` is the locked state; the slot is live.
    pub(super) fn harvest_slot_locked(
        &self,
        st: &mut SlotState,
        r: GuestRange,
        slot: Slot,
        before_delete: bool,
    ) -> Result<(), BackendError> {
        let Some(sink) = &st.dirty else {
            return Ok(());
        };
        if !slot.writable {
            return Ok(());
        }
        let bitmap = self
            .vm
            .get_dirty_log(slot.id, r.len() as usize)
            .map_err(|e| {
                self.ioctl_errors.fetch_add(1, Ordering::Relaxed);
                BackendError::Host {
                    op: "KVM_GET_DIRTY_LOG",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                }
            })?;
        sink.mark_bitmap(r.start(), &bitmap)
            .expect("a slot lies inside the page-aligned reservation");
        st.stats.dirty_harvests += 1;
        if before_delete {
            st.stats.dirty_harvests_on_delete += 1;
        }
        Ok(())
    }

    /// Sets or clears `KVM_MEM_LOG_DIRTY_PAGES` on every writable slot
    /// (flags-only updates). Stops at the first failure.
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    fn set_logging_locked(&self, st: &SlotState, log: bool) -> Result<(), BackendError> {
        for (r, slot) in st.slots.iter() {
            if slot.writable {
                self.set_region(slot.id, r, true, log, false)?;
            }
        }
        Ok(())
    }

    /// Turns on `KVM_MEM_LOG_DIRTY_PAGES` on every writable slot (see the
    /// module docs); on failure the slots flagged so far are cleared again.
    pub(super) fn start_logging(&self, sink: Arc<DirtyLog>) -> Result<(), BackendError> {
        let mut st = self.lock();
        if let Err(e) = self.set_logging_locked(&st, true) {
            let _ = self.set_logging_locked(&st, false);
            return Err(e);
        }
        st.dirty = Some(sink);
        Ok(())
    }

    /// `KVM_GET_DIRTY_LOG` on every writable slot into the sink, under the
    /// table's lock (no slot changes meanwhile; vCPUs keep running).
    pub(super) fn harvest_all(&self) -> Result<(), BackendError> {
        let mut st = self.lock();
        let slots: Vec<(GuestRange, Slot)> = st.slots.iter().map(|(r, s)| (r, *s)).collect();
        for (r, slot) in slots {
            self.harvest_slot_locked(&mut st, r, slot, false)?;
        }
        Ok(())
    }

    /// Clears `KVM_MEM_LOG_DIRTY_PAGES` on every slot and forgets the sink
    /// (failures are logged: a slot left logging costs only KVM's work).
    pub(super) fn stop_logging(&self) {
        let mut st = self.lock();
        if let Err(e) = self.set_logging_locked(&st, false) {
            log::error!("clearing the dirty log flag: {e}");
        }
        st.dirty = None;
    }
}
