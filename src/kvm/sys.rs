//! The host calls of the KVM layer: the guest-physical reservation in the
//! VMM's address space and the memfd mappings placed into it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A `PROT_NONE` reservation of host virtual addresses that mirrors the
/// guest-physical space (`host_va = base + gpa`), unmapped on drop.
///
/// Invariant: `[base, base + len)` is a mapping owned by this value; every
/// mapping placed inside it with [`map_fd`](Self::map_fd) or
/// [`unmap`](Self::unmap) stays inside it.
#[derive(Debug)]
pub(crate) struct Reservation {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the reservation is address space owned by this value; the host
// never dereferences it (only KVM and the guest touch the memory), so moving
// or sharing the handle across threads is sound.
unsafe impl Send for Reservation {}
// SAFETY: as for Send.
unsafe impl Sync for Reservation {}

impl Reservation {
    /// Reserves `len` bytes of host address space.
    pub(crate) fn new(len: u64) -> io::Result<Reservation> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        // SAFETY: no hint and no MAP_FIXED: the kernel picks fresh address
        // space, so no existing mapping is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Reservation { base, len })
    }

    /// Host address of guest-physical address `gpa`.
    pub(crate) fn host_addr(&self, gpa: u64) -> u64 {
        self.base.as_ptr() as u64 + gpa
    }

    /// Size of the reservation.
    pub(crate) fn len(&self) -> u64 {
        self.len as u64
    }

    fn check(&self, gpa: u64, len: u64) -> io::Result<*mut libc::c_void> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(self.host_addr(gpa) as *mut libc::c_void),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Maps `len` bytes of `fd` at `file_offset` shared at `gpa`, replacing
    /// what was there; read-write if `writable`.
    pub(crate) fn map_fd(
        &self,
        gpa: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> io::Result<()> {
        let addr = self.check(gpa, len)?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let off = libc::off_t::try_from(file_offset).map_err(io::Error::other)?;
        // SAFETY: the target lies inside our reservation (checked), which no
        // Rust object references; MAP_FIXED replaces only our own mappings.
        let p = unsafe {
            libc::mmap(
                addr,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts `PROT_NONE` reservation back over `[gpa, gpa + len)`.
    pub(crate) fn unmap(&self, gpa: u64, len: u64) -> io::Result<()> {
        let addr = self.check(gpa, len)?;
        // SAFETY: as in `map_fd`: inside our reservation, replacing only our
        // own mappings.
        let p = unsafe {
            libc::mmap(
                addr,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes `[gpa, gpa + len)` readable and writable.
    pub(crate) fn protect_read_write(&self, gpa: u64, len: u64) -> io::Result<()> {
        let addr = self.check(gpa, len)?;
        // SAFETY: inside our reservation; changing protections of our own
        // mappings affects no Rust object.
        if unsafe { libc::mprotect(addr, len as usize, libc::PROT_READ | libc::PROT_WRITE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the whole range is ours (type invariant); KVM slots that
        // referenced it are deleted before the SlotTable drops this.
        if unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) } < 0 {
            log::error!(
                "munmap of the guest reservation failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// The data of the pending port-I/O exit in `run` (`size × count` bytes at
/// `data_offset` into the mapping).
///
/// # Preconditions
/// - `run.exit_reason` is `KVM_EXIT_IO` (the union holds `io`).
pub(crate) fn io_data(run: &mut kvm_bindings::kvm_run) -> &mut [u8] {
    debug_assert_eq!(run.exit_reason, kvm_bindings::KVM_EXIT_IO);
    // SAFETY: the exit reason (checked by the caller) says the union holds
    // `io`; all its fields are plain integers.
    let io = unsafe { run.__bindgen_anon_1.io };
    let len = usize::from(io.size) * io.count as usize;
    let start = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
    // SAFETY: KVM places the data `data_offset` bytes into the kvm_run
    // mapping, which is at least a page and fully mapped for the vCPU's
    // life (kvm-ioctls maps KVM_GET_VCPU_MMAP_SIZE bytes); the slice
    // borrows `run` mutably, so nothing else touches the bytes meanwhile.
    unsafe { std::slice::from_raw_parts_mut(start.add(io.data_offset as usize), len) }
}

/// The data of the pending MMIO exit in `run` (at most 8 bytes).
///
/// # Preconditions
/// - `run.exit_reason` is `KVM_EXIT_MMIO` (the union holds `mmio`).
pub(crate) fn mmio_data(run: &mut kvm_bindings::kvm_run) -> &mut [u8] {
    debug_assert_eq!(run.exit_reason, kvm_bindings::KVM_EXIT_MMIO);
    // SAFETY: the exit reason (checked by the caller) says the union holds
    // `mmio`; all its fields are plain integers and arrays of them.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    &mut mmio.data[..len]
}
