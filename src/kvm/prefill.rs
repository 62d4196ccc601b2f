//! Filling host page tables of installed memory (`MADV_POPULATE_WRITE` /
//! `MADV_POPULATE_READ`), for [`SlotTable::prefill`](super::SlotTable).
//!
//! KVM resolves a guest access to a slot's page through the host page
//! tables of the slot's `userspace_addr`; a page not present there costs a
//! host page fault inside KVM. Populating the range first lets KVM map the
//! pages without one.

use std::io;

/// How often an interrupted populate (a kick signal reaching the calling
/// vCPU thread) is retried; pages already filled are cheap to pass again.
const EINTR_RETRIES: usize = 8;

/// Fills the host page tables of `[addr, addr + len)`, writable pages
/// (`MADV_POPULATE_WRITE`) or readable ones (`MADV_POPULATE_READ`).
///
/// Errors are the kernel's: `EFAULT`/`ENOMEM` when part of the range is no
/// longer mapped that way (a concurrent remove or re-protection),
/// `EINVAL` on kernels before 5.14.
pub(super) fn populate(addr: u64, len: u64, writable: bool) -> io::Result<()> {
    let advice = if writable {
        libc::MADV_POPULATE_WRITE
    } else {
        libc::MADV_POPULATE_READ
    };
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let mut tries = 0;
    loop {
        // SAFETY: populating only faults pages in (zero-filled or the
        // file's contents); it changes no mapping and no memory content, so
        // it cannot invalidate any Rust reference, whatever `addr` is (an
        // unmapped or protected address makes the call fail).
        let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted && tries < EINTR_RETRIES {
            tries += 1;
            continue;
        }
        return Err(e);
    }
}
