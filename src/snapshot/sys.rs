//! The two host calls the snapshot writer needs on a borrowed descriptor:
//! positional reads and `SEEK_DATA`/`SEEK_HOLE`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read
/// as zeros. Reading a hole of a memfd (or a sparse file) returns zeros
/// without allocating or committing anything.
pub(super) fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes
        // and `fd` is a valid descriptor for the duration of the call.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => {
                rest.fill(0);
                return Ok(());
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// `lseek(fd, offset, whence)`; `None` for `ENXIO` (no data, or no hole,
/// at or after `offset`). Only the descriptor's file position changes,
/// which guestmm never uses (all its I/O is positional or mapped).
pub(super) fn seek(
    fd: BorrowedFd<'_>,
    offset: u64,
    whence: libc::c_int,
) -> io::Result<Option<u64>> {
    // SAFETY: lseek takes no pointers; `fd` is a valid descriptor.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}
