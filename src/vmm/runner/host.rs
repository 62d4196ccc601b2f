//! Host-side helpers of a run: the template file a guest maps
//! ([`make_template`], [`first_pattern_mismatch`]) and the thread that
//! decommits guest RAM while the guest runs ([`Decommitter`]).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use super::RunError;
use crate::mm::{AddressSpace, HostFile, MmError};
use crate::vmm::guests::cow_pattern;

/// The host thread of
/// [`RunOptions::decommit_every`](super::RunOptions::decommit_every).
pub(super) struct Decommitter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64, MmError>>,
}

impl Decommitter {
    pub(super) fn start(
        space: Arc<AddressSpace>,
        gpa: u64,
        len: u64,
        period: Duration,
    ) -> Decommitter {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut count = 0;
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(period);
                space.decommit(gpa, len)?;
                count += 1;
            }
            Ok(count)
        });
        Decommitter { stop, thread }
    }

    /// Stops the thread; returns how many decommits it made.
    pub(super) fn finish(self) -> Result<u64, MmError> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap_or(Ok(0))
    }
}

/// A private temporary file of `size` bytes filled with the COW pattern.
pub(super) fn make_template(
    size: u64,
    on_disk: bool,
) -> Result<(std::fs::File, Arc<HostFile>), RunError> {
    let mut file = if on_disk {
        let path = std::env::temp_dir().join(format!(
            "guestmm-template-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        file
    } else {
        // A memfd: shmem, so userfaultfd can write-protect its pages
        // (CowMode::UserfaultfdWp); a file on disk keeps read-only slots.
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"guestmm-template".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    };
    let mut buf = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(8) {
        buf.extend_from_slice(&cow_pattern(off).to_le_bytes());
    }
    file.write_all(&buf)?;
    let hf = HostFile::new(file.try_clone()?, false)?;
    Ok((file, hf))
}

/// The first offset where `file` no longer holds the COW pattern.
pub(super) fn first_pattern_mismatch(
    file: &std::fs::File,
    size: u64,
) -> Result<Option<u64>, RunError> {
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf
        .chunks_exact(8)
        .enumerate()
        .find(|(i, w)| {
            u64::from_le_bytes((*w).try_into().expect("8 bytes")) != cow_pattern(*i as u64 * 8)
        })
        .map(|(i, _)| i as u64 * 8))
}
