//! A software x86-64 page-table walker.
//!
//! KVM's own translation (`KVM_TRANSLATE`) and its instruction emulator walk
//! guest page tables through memslots only: a table page that guestmm has
//! not populated yet is invisible to them. This walker reads every entry
//! through a caller-supplied function instead, so the caller can read through
//! guestmm's host-side I/O, which populates lazy table pages as it goes.
//!
//! Supported: IA-32e paging with 4 levels (48-bit linear addresses) and 5
//! levels (CR4.LA57, 57-bit), 4 KiB, 2 MiB and 1 GiB pages, permission
//! checks (R/W, U/S, XD). Not modelled: reserved-bit checks, protection keys,
//! SMEP/SMAP, accessed/dirty updates (the hardware sets those when the guest
//! re-runs the access).
//!
//! ```text
//! level:      5 (PML5)  4 (PML4)  3 (PDPT)      2 (PD)        1 (PT)
//! index bits: 56:48     47:39     38:30         29:21         20:12
//! leaf if:    -         -         PS → 1 GiB    PS → 2 MiB    always 4 KiB
//! ```

use kvm_bindings::kvm_sregs;

use crate::perms::Access;

/// Entry bit: present.
pub const PTE_PRESENT: u64 = 1;
/// Entry bit: writable.
pub const PTE_WRITE: u64 = 1 << 1;
/// Entry bit: user-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Entry bit (levels 2 and 3): this entry maps a large page.
pub const PTE_PS: u64 = 1 << 7;
/// Entry bit: execute disable (honoured when EFER.NXE is set).
pub const PTE_XD: u64 = 1 << 63;
/// Physical-address bits 51:12 of an entry (or of CR3).
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const CR0_PG: u64 = 1 << 31;
const CR0_WP: u64 = 1 << 16;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// 4 KiB.
pub const PAGE_4K: u64 = 1 << 12;
/// 2 MiB.
pub const PAGE_2M: u64 = 1 << 21;
/// 1 GiB.
pub const PAGE_1G: u64 = 1 << 30;

/// The paging configuration a walk follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    /// CR3: the top-level table is at `cr3 & PTE_ADDR_MASK` (PCID and
    /// flag bits are ignored).
    pub cr3: u64,
    /// CR4.LA57: 5-level paging.
    pub la57: bool,
    /// The access is made at CPL3: every level must have the U bit and a
    /// write needs R/W at every level.
    pub user: bool,
    /// CR0.WP: supervisor writes honour read-only entries too.
    pub write_protect: bool,
    /// EFER.NXE: the XD bit forbids instruction fetches.
    pub nx: bool,
}

impl PagingMode {
    /// User-mode 4-level paging with WP and NX enabled.
    pub fn four_level(cr3: u64) -> PagingMode {
        PagingMode {
            cr3,
            la57: false,
            user: true,
            write_protect: true,
            nx: true,
        }
    }

    /// User-mode 5-level paging with WP and NX enabled.
    pub fn five_level(cr3: u64) -> PagingMode {
        PagingMode {
            la57: true,
            ..PagingMode::four_level(cr3)
        }
    }

    /// The mode of a vCPU in IA-32e mode (CR0.PG and EFER.LMA set), with the
    /// privilege level taken from CS; `None` in any other mode (real mode,
    /// 32-bit or PAE paging), which this walker does not model.
    pub fn from_sregs(sregs: &kvm_sregs) -> Option<PagingMode> {
        if sregs.cr0 & CR0_PG == 0 || sregs.efer & EFER_LMA == 0 {
            return None;
        }
        Some(PagingMode {
            cr3: sregs.cr3,
            la57: sregs.cr4 & CR4_LA57 != 0,
            user: sregs.cs.dpl == 3,
            write_protect: sregs.cr0 & CR0_WP != 0,
            nx: sregs.efer & EFER_NXE != 0,
        })
    }

    /// Number of paging levels (4 or 5).
    pub fn levels(&self) -> u8 {
        if self.la57 {
            5
        } else {
            4
        }
    }

    /// True if `gva` is canonical: bits above the linear-address width
    /// (48 or 57) copy its top bit.
    pub fn is_canonical(&self, gva: u64) -> bool {
        let bits = if self.la57 { 57 } else { 48 };
        let shift = 64 - bits;
        (((gva << shift) as i64) >> shift) as u64 == gva
    }
}

/// Where a linear address leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the byte at the linear address.
    pub gpa: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Every level allows writes.
    pub writable: bool,
    /// Every level allows user access.
    pub user: bool,
    /// No level sets XD (always true when NX is off).
    pub executable: bool,
}

/// Why a linear address could not be translated. `E` is the error of the
/// caller's entry reader.
#[derive(Debug, thiserror::Error)]
pub enum WalkError<E> {
    /// The address is not canonical for the paging mode (a #GP, not a #PF).
    #[error("linear address {gva:#x} is not canonical")]
    NonCanonical {
        /// The linear address.
        gva: u64,
    },
    /// An entry on the way is not present.
    #[error(
        "linear address {gva:#x} is not mapped: level-{level} entry at {entry:#x} not present"
    )]
    NotPresent {
        /// The linear address.
        gva: u64,
        /// The level of the entry (5 = PML5 … 1 = PT).
        level: u8,
        /// Guest-physical address of the entry.
        entry: u64,
    },
    /// The entries map the address but forbid the access.
    #[error("{access} at linear address {gva:#x} not allowed by the guest page tables")]
    Protection {
        /// The linear address.
        gva: u64,
        /// The access.
        access: Access,
        /// What the tables map there.
        translation: Translation,
    },
    /// Reading an entry failed.
    #[error("linear address {gva:#x}: reading the level-{level} entry at {entry:#x} failed")]
    Read {
        /// The linear address.
        gva: u64,
        /// The level of the entry.
        level: u8,
        /// Guest-physical address of the entry.
        entry: u64,
        /// The reader's error.
        #[source]
        source: E,
    },
}

/// Translates the linear address `gva` for `access` under `mode`, reading
/// each 8-byte entry with `read(entry_gpa)`.
///
/// Entries are read top-down, at most one per level; a not-present entry
/// stops the walk. Permission bits accumulate across levels as the hardware
/// does (R/W and U/S must be set at every level, XD at any level forbids
/// fetches); an access they forbid is [`WalkError::Protection`].
pub fn walk<E>(
    mut read: impl FnMut(u64) -> Result<u64, E>,
    mode: &PagingMode,
    gva: u64,
    access: Access,
) -> Result<Translation, WalkError<E>> {
    if !mode.is_canonical(gva) {
        return Err(WalkError::NonCanonical { gva });
    }
    let mut table = mode.cr3 & PTE_ADDR_MASK;
    let (mut writable, mut user, mut executable) = (true, true, true);
    let mut level = mode.levels();
    let (base, page_size) = loop {
        let shift = 12 + 9 * u32::from(level - 1);
        let entry_gpa = table + ((gva >> shift) & 0x1ff) * 8;
        let entry = read(entry_gpa).map_err(|source| WalkError::Read {
            gva,
            level,
            entry: entry_gpa,
            source,
        })?;
        if entry & PTE_PRESENT == 0 {
            return Err(WalkError::NotPresent {
                gva,
                level,
                entry: entry_gpa,
            });
        }
        writable &= entry & PTE_WRITE != 0;
        user &= entry & PTE_USER != 0;
        executable &= !mode.nx || entry & PTE_XD == 0;
        let size = 1u64 << shift;
        match level {
            1 => break (entry & PTE_ADDR_MASK, size),
            // Large pages: bit 12 is PAT, the address starts at `shift`.
            2 | 3 if entry & PTE_PS != 0 => break (entry & PTE_ADDR_MASK & !(size - 1), size),
            _ => {
                table = entry & PTE_ADDR_MASK;
                level -= 1;
            }
        }
    };
    let t = Translation {
        gpa: base | (gva & (page_size - 1)),
        page_size,
        writable,
        user,
        executable,
    };
    if !allows(mode, &t, access) {
        return Err(WalkError::Protection {
            gva,
            access,
            translation: t,
        });
    }
    Ok(t)
}

/// The hardware's permission rules (without SMEP/SMAP/protection keys).
fn allows(mode: &PagingMode, t: &Translation, access: Access) -> bool {
    if mode.user && !t.user {
        return false;
    }
    match access {
        Access::Read => true,
        Access::Write => t.writable || (!mode.user && !mode.write_protect),
        Access::Execute => t.executable,
    }
}

#[cfg(test)]
mod tests;
