//! Every system call the memory file makes, each behind a small function so
//! the rest of the module holds no `unsafe` except raw copies through the
//! internal mappings.
//!
//! Errors come back as [`std::io::Error`]; the caller wraps them with the
//! syscall's name.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Creates a memfd named `name` with `MFD_CLOEXEC | MFD_ALLOW_SEALING`.
///
/// A name with an interior NUL byte is truncated at it.
pub(super) fn memfd_create(name: &str) -> io::Result<OwnedFd> {
    let name = name.split('\0').next().unwrap_or_default();
    let cname = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the
    // call; the flags are plain integers.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds `seals` (`F_SEAL_*`) to a memfd created with `MFD_ALLOW_SEALING`.
pub(super) fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl(F_ADD_SEALS) takes an int argument and touches no memory
    // of ours; `fd` is a valid open descriptor for the borrow.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the file's size.
pub(super) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = libc::off_t::try_from(size).map_err(io::Error::other)?;
    // SAFETY: ftruncate touches no memory of ours; `fd` is valid.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Frees the file's pages in `[offset, offset + len)` and keeps its size:
/// later reads of the range return zeros.
pub(super) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: fallocate touches no memory of ours; `fd` is valid. Pages of
    // the range that are mapped somewhere simply read as zeros afterwards.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The file's size and its allocated 512-byte blocks (`st_size`,
/// `st_blocks`).
pub(super) fn fstat(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable storage for one `struct stat`, which fstat
    // fills completely on success.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok((st.st_size as u64, st.st_blocks as u64))
}

/// Maps `len` bytes of `fd` at `offset` shared and read-write at an address
/// the kernel picks.
///
/// The mapping lives until [`munmap`]; nothing in Rust owns it.
pub(super) fn mmap_shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<NonNull<u8>> {
    mmap_shared_prot(fd, offset, len, true)
}

/// Like [`mmap_shared`], read-only unless `writable`.
pub(super) fn mmap_shared_prot(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: usize,
    writable: bool,
) -> io::Result<NonNull<u8>> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: with a null hint and no MAP_FIXED the kernel picks fresh
    // address space, so no existing mapping or Rust object is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must be a mapping made by [`mmap_shared`] with this `len`, and
/// nothing may use it afterwards.
pub(super) unsafe fn munmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is our mapping and unused.
    let rc = unsafe { libc::munmap(addr.as_ptr().cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `out` with one byte per page of `[addr, addr + len)`; bit 0 of a
/// byte is set if the page is resident. For a shared file mapping the
/// kernel answers from the page cache, so pages written through any mapping
/// of the file (or by `write(2)`) count, whether or not this mapping touched
/// them.
///
/// Preconditions: `addr` is page aligned (the kernel returns `EINVAL`
/// otherwise; an unmapped range gives `ENOMEM`, never memory unsafety).
pub(super) fn mincore(addr: NonNull<u8>, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    let pages = len.div_ceil(crate::range::PAGE_SIZE as usize);
    out.clear();
    out.resize(pages, 0);
    // SAFETY: mincore only inspects page tables and the page cache; it reads
    // no memory at `addr` and writes exactly `pages` bytes to `out`, which
    // has room for them.
    let rc = unsafe { libc::mincore(addr.as_ptr().cast(), len, out.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
