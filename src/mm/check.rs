//! Invariant checks: [`AddressSpace::check_invariants`] for one space and
//! [`check_file_refs`] across every holder of MemoryFile references.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{AddressSpace, SharedMemory};
use crate::memfile::MemoryFile;
use crate::range::PAGE_SIZE;

impl AddressSpace {
    /// Walks every structure and checks what must hold:
    /// - the vma and pma sets are well formed, the vma set maximally merged;
    /// - each vma's protection ranges are minimal and within its max perms;
    /// - pmas lie only inside vmas; shared vmas hold no copy-on-write or
    ///   private pmas; anonymous private vmas hold only private pmas or
    ///   copy-on-write ones;
    /// - no pma maps object offsets past its object's size (private
    ///   copies included: truncation drops them; a truncation still
    ///   telling its mappers may briefly leave some);
    /// - every private pma page has an owner count of at least one.
    ///
    /// The error names the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mapping = self.read_mapping();
        let active = self.lock_active();
        mapping
            .vmas
            .check_invariants()
            .map_err(|e| format!("vmas: {e}"))?;
        if !mapping.vmas.is_maximally_merged() {
            return Err("vmas are not maximally merged".into());
        }
        for (vr, vma) in mapping.vmas.iter() {
            vma.protection
                .check_invariants(vr)
                .map_err(|e| format!("vma {vr}: {e}"))?;
            let most = vma.protection.max_perms_in(vr, vr);
            if !vma.max_perms.is_superset_of(most) {
                return Err(format!(
                    "vma {vr}: protection {most} exceeds max {}",
                    vma.max_perms
                ));
            }
        }
        active
            .pmas
            .check_invariants()
            .map_err(|e| format!("pmas: {e}"))?;
        for (pr, pma) in active.pmas.iter() {
            if let Some(gap) = mapping.vmas.gaps(pr).next() {
                return Err(format!("pma {pr} reaches unmapped {gap}"));
            }
            for (vr, vma) in mapping.vmas.iter_range(pr) {
                if !vma.private && (pma.need_cow || pma.private) {
                    return Err(format!(
                        "pma {pr} in shared vma {vr} is private or copy-on-write"
                    ));
                }
                if vma.mappable.is_none() && vma.private && !pma.private {
                    return Err(format!("pma {pr} in anonymous vma {vr} is not private"));
                }
                if let Some(m) = &vma.mappable {
                    let part = vr.intersect(pr);
                    let end = vma.object_offset(vr, part.end());
                    let size = m.size();
                    if end > size {
                        return Err(format!(
                            "pma {part} in vma {vr} maps object offsets up to {end:#x}, \
                             past the object's size {size:#x}"
                        ));
                    }
                }
            }
            if pma.private {
                let fr = pma.file_range(pr, pr);
                let counted: u64 = self
                    .private_refs
                    .counts(fr)
                    .iter()
                    .map(|(r, _)| r.len())
                    .sum();
                if counted != fr.len() {
                    return Err(format!(
                        "private pma {pr} (file {fr}): only {counted:#x} bytes counted"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks that the MemoryFile's reference count of every allocated page
/// equals what `spaces` (pmas and pins) and `objects` hold, and that the
/// private owner counts equal the private pmas of `spaces`. Pass every live
/// holder, or the counts will (rightly) disagree.
pub fn check_file_refs(
    memfile: &Arc<MemoryFile>,
    spaces: &[&AddressSpace],
    objects: &[&SharedMemory],
) -> Result<(), String> {
    let mf_ptr = Arc::as_ptr(memfile) as *const ();
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    let mut owners: BTreeMap<u64, u64> = BTreeMap::new();
    let add = |map: &mut BTreeMap<u64, u64>, start: u64, len: u64| {
        for page in (start..start + len).step_by(PAGE_SIZE as usize) {
            *map.entry(page).or_default() += 1;
        }
    };
    for space in spaces {
        let active = space.lock_active();
        for (pr, pma) in active.pmas.iter() {
            if Arc::as_ptr(&pma.file) as *const () != mf_ptr {
                continue;
            }
            add(&mut want, pma.offset, pr.len());
            if pma.private {
                add(&mut owners, pma.offset, pr.len());
            }
        }
        for held in active.pins.values() {
            for (file, fr) in held {
                if Arc::as_ptr(file) as *const () == mf_ptr {
                    add(&mut want, fr.start(), fr.len());
                }
            }
        }
    }
    for obj in objects {
        for fr in obj.file_refs() {
            add(&mut want, fr.start(), fr.len());
        }
    }
    let have = memfile.ref_counts();
    let mut have_pages: BTreeMap<u64, u64> = BTreeMap::new();
    for (fr, refs) in have {
        for page in (fr.start()..fr.end()).step_by(PAGE_SIZE as usize) {
            have_pages.insert(page, refs);
        }
    }
    if have_pages != want {
        let diff = have_pages
            .iter()
            .find(|(p, r)| want.get(p) != Some(r))
            .map(|(p, r)| (*p, Some(*r), want.get(p).copied()))
            .or_else(|| {
                want.iter()
                    .find(|(p, _)| !have_pages.contains_key(p))
                    .map(|(p, r)| (*p, None, Some(*r)))
            });
        return Err(format!(
            "MemoryFile refs disagree (page, have, want): {diff:x?}"
        ));
    }
    if let Some(space) = spaces.first() {
        let mut counted: BTreeMap<u64, u64> = BTreeMap::new();
        for (fr, n) in space.private_refs.all() {
            for page in (fr.start()..fr.end()).step_by(PAGE_SIZE as usize) {
                counted.insert(page, n);
            }
        }
        if counted != owners {
            return Err(
                "private owner counts disagree with the private pmas of the given spaces".into(),
            );
        }
    }
    Ok(())
}
