//! The address space's layout as plain values ([`AddressSpace::layout`]):
//! what a snapshot records and a restore rebuilds.

use std::sync::Arc;

use super::mappable::Mappable;
use super::AddressSpace;
use crate::perms::Perms;
use crate::range::GuestRange;

/// One vma as [`AddressSpace::layout`] lists it.
#[derive(Debug, Clone)]
pub struct VmaLayout {
    /// Guest-physical range of the vma.
    pub range: GuestRange,
    /// Private (copy-on-write) or shared.
    pub private: bool,
    /// The most `protect` may grant.
    pub max_perms: Perms,
    /// The protection regions, in address order, covering `range` exactly.
    pub protections: Vec<(GuestRange, Perms)>,
    /// The vma's name.
    pub name: String,
    /// The object mapped and the object offset of `range.start()`, or `None`
    /// for private anonymous memory. Shared anonymous memory is a
    /// [`SharedMemory`](super::SharedMemory) object and is listed as one.
    pub object: Option<(Arc<dyn Mappable>, u64)>,
}

impl AddressSpace {
    /// Every vma with its protection regions, in address order. Read under
    /// the `mapping` lock alone; true at the moment it was taken.
    pub fn layout(&self) -> Vec<VmaLayout> {
        let mapping = self.read_mapping();
        mapping
            .vmas
            .iter()
            .map(|(vr, vma)| VmaLayout {
                range: vr,
                private: vma.private,
                max_perms: vma.max_perms,
                protections: vma
                    .protection
                    .regions(vr, vr)
                    .map(|r| (r.range, r.perms))
                    .collect(),
                name: vma.name.to_string(),
                object: vma
                    .mappable
                    .as_ref()
                    .map(|m| (m.clone(), vma.object_offset(vr, vr.start()))),
            })
            .collect()
    }
}
