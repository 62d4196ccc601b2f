//! Copy-on-write by userfaultfd write protection: the parts of
//! [`SlotTable`] that write-protect host pages and keep the set of
//! protected ranges (`SlotState::wp`). Which installs take this path is the
//! slot policy's call (`kvm/slots.rs`, `install_cow`).
//!
//! With a userfaultfd ([`SlotTable::set_userfaultfd`], the VM's
//! [`CowMode::UserfaultfdWp`](crate::kvm::CowMode)), copy-on-write installs
//! ([`AddressSpaceBackend::install_cow`]) are *writable* extents, so they
//! share slots with the memory around them, and their host pages are
//! write-protected page by page: the range is mapped read-only, registered
//! in WP mode (every `MAP_FIXED` makes a new, unregistered mapping, so each
//! copy-on-write install registers its own range), protected, then made
//! read-write. A guest write there blocks inside `KVM_RUN` and becomes an
//! event for the VM's fault thread (`kvm/cow_wp.rs`). Any later install or
//! removal over protected pages replaces their mapping (which drops the
//! protection) and wakes the writers blocked there; `write_protect_cow`
//! (a fork) protects writable extents again without changing a slot.
//! Read-only protection the guest asked for stays a read-only slot.
//!
//! A vCPU blocked on a protected page is inside `KVM_RUN` holding KVM's
//! SRCU read lock, which a slot deletion waits for; so in this mode every
//! plan that deletes a slot closes the run gate first (the kick's signal
//! ends the blocked fault with `EINTR`).
//!
//! [`AddressSpaceBackend::install_cow`]: crate::mm::backend::AddressSpaceBackend::install_cow

use std::os::fd::{AsRawFd, BorrowedFd};

use super::{SlotState, SlotTable};
use crate::mm::backend::{BackendError, Installed};
use crate::range::{GuestRange, Range};
use crate::segment::SegmentValue;
use crate::uffd::{RegisterMode, Userfaultfd};

/// A write-protected range of the reservation (value of `SlotState::wp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Protected;

impl SegmentValue for Protected {
    fn merge(&self, _: Range, _: &Self, _: Range) -> Option<Self> {
        Some(Protected)
    }
    fn split(&self, _: Range, _: u64) -> (Self, Self) {
        (Protected, Protected)
    }
}

impl SlotTable {
    /// GPA ranges whose host pages are write-protected now (copy-on-write
    /// in [`CowMode::UserfaultfdWp`](crate::kvm::CowMode)).
    pub fn write_protected(&self) -> Vec<GuestRange> {
        self.lock().wp.iter().map(|(r, _)| r).collect()
    }

    /// Drops the protection marks over `range` (its mapping was just
    /// replaced or removed) and wakes the writers blocked there.
    ///
    /// # Preconditions
    /// - `st` is the locked state.
    pub(super) fn unprotected_locked(&self, st: &mut SlotState, range: GuestRange) {
        let Some(uffd) = &self.uffd else { return };
        if st.wp.is_empty_range(range) {
            return;
        }
        st.wp.remove_range(range);
        st.stats.wp_wakes += 1;
        if let Err(e) = uffd.wake(self.reservation.host_addr(range.start()), range.len()) {
            log::error!("UFFDIO_WAKE {range}: {e}");
        }
    }

    /// Registers the host pages of `range` (mapped, shared) with the
    /// userfaultfd in WP mode and write-protects them.
    fn protect_pages(&self, uffd: &Userfaultfd, range: GuestRange) -> Result<(), BackendError> {
        let host = self.reservation.host_addr(range.start());
        let err = |op: &'static str, e: crate::uffd::UffdError| BackendError::Host {
            op,
            source: match std::error::Error::source(&e) {
                Some(cause) => std::io::Error::other(format!("{e}: {cause}")),
                None => std::io::Error::other(e.to_string()),
            },
        };
        uffd.register(host, range.len(), RegisterMode::WP)
            .map_err(|e| err("UFFDIO_REGISTER", e))?;
        uffd.write_protect(host, range.len())
            .map_err(|e| err("UFFDIO_WRITEPROTECT", e))
    }

    /// The copy-on-write install of `range` through `uffd`: a writable
    /// extent whose host pages are write-protected (see the module docs).
    ///
    /// # Preconditions
    /// - `fd` is shmem-backed ([`shmem_backed`]).
    pub(super) fn install_protected(
        &self,
        uffd: &Userfaultfd,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), BackendError> {
        self.check_range(range)?;
        let mut st = self.lock();
        let want = Installed {
            fd: fd.as_raw_fd(),
            file_offset,
            writable: true,
        };
        let Some(plan) = Self::plan_new_install_locked(&mut st, range, &want, true)? else {
            return Ok(());
        };
        // Read-only until protected: a slot may already cover the range.
        self.map_locked(&mut st, range, fd, want, false)?;
        st.wp.remove_range(range);
        let protected = self.protect_pages(uffd, range).and_then(|()| {
            self.reservation
                .protect_read_write(range.start(), range.len())
                .map_err(|source| BackendError::Host {
                    op: "mprotect",
                    source,
                })
        });
        if let Err(e) = protected {
            // Not protected: the guest must not see it writable.
            let _ = self.remove_locked(&mut st, range);
            return Err(e);
        }
        st.wp.insert(range, Protected).expect("range just cleared");
        st.stats.wp_installs += 1;
        self.apply_locked(&mut st, plan)
    }

    /// Write-protects the host pages of the writable extents in `range`
    /// again through `uffd` (a fork), changing no slot.
    pub(super) fn reprotect_writable(
        &self,
        uffd: &Userfaultfd,
        range: GuestRange,
    ) -> Result<(), BackendError> {
        self.check_range(range)?;
        let mut st = self.lock();
        let writable: Vec<GuestRange> = st
            .extents
            .iter_range(range)
            .filter(|(_, e)| e.writable)
            .map(|(r, _)| r.intersect(range))
            .collect();
        for part in writable {
            self.bump();
            self.protect_pages(uffd, part)?;
            st.wp.remove_range(part);
            st.wp.insert(part, Protected).expect("range just cleared");
            st.stats.wp_reprotects += 1;
        }
        Ok(())
    }
}

/// Whether `fd` is a shmem (memfd, tmpfs) or hugetlbfs file, whose pages
/// userfaultfd can write-protect.
pub(super) fn shmem_backed(fd: BorrowedFd<'_>) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: `statfs` is plain data, zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a borrowed, open fd and a live out-pointer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } < 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | HUGETLBFS_MAGIC)
}
