//! Cloning an address space: the child maps the same objects, and private
//! pages become copy-on-write on both sides.

use std::sync::Arc;

use super::{AddressSpace, AddressSpaceBackend, MmError};
use crate::range::GuestRange;

/// How a fork makes the parent's writable private memory trap writes
/// again (the child installs its own as copy-on-write when it faults or
/// installs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ParentProtection {
    /// The backend's copy-on-write protection
    /// ([`AddressSpaceBackend::write_protect_cow`]): with per-page write
    /// protection (KVM in userfaultfd mode) every present page is
    /// protected, so the fork costs a page-table update per populated page
    /// and later writes copy one page each, natively.
    #[default]
    CopyOnWrite,
    /// Read-only installs ([`AddressSpaceBackend::write_protect`]): for
    /// KVM, read-only memslots, which cost the same whatever is
    /// populated; the parent's first write to each fault-around window
    /// afterwards exits, is completed by the host (not atomic against
    /// other vCPUs), and re-installs the window as copy-on-write.
    ReadOnly,
}

impl AddressSpace {
    /// A new address space with the same vmas, showing its memory through
    /// `backend`.
    ///
    /// Shared mappings show the same pages in both spaces. Private pages are
    /// shared too but marked copy-on-write on both sides (and write-protected
    /// in this space's backend): the first write on either side copies, and
    /// once one side is gone the other takes the pages over without copying.
    /// Pins are not inherited.
    pub fn fork(
        &self,
        backend: Arc<dyn AddressSpaceBackend>,
    ) -> Result<Arc<AddressSpace>, MmError> {
        self.fork_with(backend, ParentProtection::default())
    }

    /// [`fork`](Self::fork), choosing how this space's backend traps its
    /// writes to the pages now shared ([`ParentProtection`]).
    pub fn fork_with(
        &self,
        backend: Arc<dyn AddressSpaceBackend>,
        protection: ParentProtection,
    ) -> Result<Arc<AddressSpace>, MmError> {
        let mapping = self.read_mapping();
        let mut active = self.lock_active();
        let child = AddressSpace::with_private_refs(
            self.memfile.clone(),
            backend,
            self.opts.clone(),
            self.private_refs.clone(),
        );
        let mut write_protect: Vec<GuestRange> = Vec::new();
        {
            let mut child_mapping = child.write_mapping();
            let mut child_active = child.lock_active();
            for (vr, vma) in mapping.vmas.iter() {
                if let Some(m) = &vma.mappable {
                    m.add_mapping(child.as_mapping_space(), child.id, vr, vma.offset);
                }
                child_mapping
                    .vmas
                    .insert_without_merging(vr, vma.clone())
                    .expect("child starts empty");
                if active.pmas.is_empty_range(vr) {
                    continue;
                }
                // Pmas may cross vma edges; cut them there so each piece
                // takes its own vma's policy.
                active.pmas.split_at(vr.start());
                active.pmas.split_at(vr.end());
                for (pr, pma) in active.pmas.iter_range_mut(vr) {
                    let fr = pma.file_range(pr, pr);
                    pma.file.inc_ref(fr)?;
                    if pma.private {
                        self.private_refs.inc(fr);
                    }
                    if vma.private {
                        pma.need_cow = true;
                    }
                    child_active
                        .pmas
                        .insert_without_merging(pr, pma.clone())
                        .expect("child starts empty");
                }
                active.pmas.merge_range(vr);
                child_active.pmas.merge_range(vr);
                if vma.private {
                    write_protect.push(vr);
                }
            }
            child_mapping.vmas.merge_all();
        }
        for r in write_protect {
            match protection {
                ParentProtection::CopyOnWrite => self.backend.write_protect_cow(r)?,
                ParentProtection::ReadOnly => self.backend.write_protect(r)?,
            }
        }
        log::debug!("space {}: forked into {}", self.id, child.id);
        Ok(child)
    }
}
