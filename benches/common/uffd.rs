//! A userfaultfd peer: guest RAM is one private anonymous mapping registered
//! with userfaultfd in missing mode, and a handler thread resolves every
//! missing fault (KVM's GUP of a guest page included) with `UFFDIO_ZEROPAGE`
//! or `UFFDIO_COPY` of 4 KiB or of the whole aligned 2 MiB block: what a VMM
//! author who wants lazy guest memory without guestmm writes (Firecracker's
//! snapshot handler style). The copies come from zeros, or from a snapshot
//! file ([`Source::File`]: Firecracker's restore). The userfaultfd calls
//! are `guestmm::uffd`'s.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use guestmm::uffd::{Event, Features, RegisterMode, Userfaultfd, MAX_EVENTS_PER_READ};

const HUGE: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// How the handler resolves a missing fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdMode {
    /// `UFFDIO_ZEROPAGE` of the faulting 4 KiB page (a write then takes a
    /// second, copy-on-write fault in the kernel).
    Zero4k,
    /// `UFFDIO_COPY` of the faulting 4 KiB page (a zeroed one, or the
    /// source's).
    Copy4k,
    /// `UFFDIO_COPY` of the whole aligned 2 MiB block around the fault.
    Copy2m,
}

impl UffdMode {
    fn unit(self) -> u64 {
        match self {
            UffdMode::Zero4k | UffdMode::Copy4k => PAGE,
            UffdMode::Copy2m => HUGE,
        }
    }
}

/// Where the bytes of a copy come from.
pub enum Source {
    /// Zeros.
    Zeros,
    /// A file: region offset `o` is at file offset `offset + o`, read with
    /// `pread` (holes read as zeros). Blocks that overlap none of `data`
    /// (region offsets, sorted, disjoint) are filled with
    /// `UFFDIO_ZEROPAGE` without reading.
    File {
        /// The file.
        file: std::fs::File,
        /// File offset of the region's start.
        offset: u64,
        /// Region ranges `(start, end)` that hold data.
        data: Vec<(u64, u64)>,
    },
}

impl Source {
    /// Whether `start..end` (region offsets) may hold data (zeros are
    /// copied as data).
    fn has_data(&self, start: u64, end: u64) -> bool {
        match self {
            Source::Zeros => false,
            Source::File { data, .. } => {
                // The first range ending after `start`.
                let i = data.partition_point(|&(_, e)| e <= start);
                data.get(i).is_some_and(|&(s, _)| s < end)
            }
        }
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// The handler thread of one registered region; stopped and joined on drop.
pub struct UffdHandler {
    stop: OwnedFd,
    thread: Option<JoinHandle<Result<(), String>>>,
    faults: Arc<AtomicU64>,
}

impl UffdHandler {
    /// Registers `base..base + len` (a private anonymous mapping nobody has
    /// touched, 2 MiB aligned) in missing mode and starts the handler,
    /// copying zeros. `Err` says why userfaultfd is unavailable.
    ///
    /// # Safety
    /// The mapping must stay mapped until this handler is dropped.
    pub unsafe fn start(base: u64, len: u64, mode: UffdMode) -> Result<UffdHandler, String> {
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::start_from(base, len, mode, Source::Zeros) }
    }

    /// As [`UffdHandler::start`], copies taken from `source`.
    ///
    /// # Safety
    /// The mapping must stay mapped until this handler is dropped.
    pub unsafe fn start_from(
        base: u64,
        len: u64,
        mode: UffdMode,
        source: Source,
    ) -> Result<UffdHandler, String> {
        assert!(
            base % HUGE == 0 && len % HUGE == 0,
            "region not 2 MiB aligned"
        );
        let uffd = Userfaultfd::open(Features::empty()).map_err(|e| e.to_string())?;
        let ioctls = uffd
            .register(base, len, RegisterMode::MISSING)
            .map_err(|e| e.to_string())?;
        let ok = match mode {
            UffdMode::Zero4k => ioctls.zeropage(),
            UffdMode::Copy4k | UffdMode::Copy2m => ioctls.copy() && ioctls.zeropage(),
        };
        if !ok {
            return Err(format!(
                "the registered range does not support the fill ioctls (ioctls {:#x})",
                ioctls.0
            ));
        }
        // SAFETY: eventfd(2) returns a new fd or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if stop < 0 {
            return Err(format!("eventfd: {}", errno()));
        }
        // SAFETY: a new fd nobody else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let faults = Arc::new(AtomicU64::new(0));
        let (stop_raw, counter) = (stop.as_raw_fd(), faults.clone());
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || serve(&uffd, stop_raw, base, len, mode, &source, &counter))
            .map_err(|e| format!("spawn: {e}"))?;
        Ok(UffdHandler {
            stop,
            thread: Some(thread),
            faults,
        })
    }

    /// Missing faults resolved so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }
}

impl Drop for UffdHandler {
    fn drop(&mut self) {
        let one = 1u64;
        // SAFETY: an 8-byte write from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let r = t.join();
            // A handler error means the guest saw a fault nobody resolved:
            // the run is worthless, say so (unless already unwinding).
            if !std::thread::panicking() {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("uffd handler: {e}"),
                    Err(_) => panic!("uffd handler panicked"),
                }
            }
        }
    }
}

/// The handler loop: waits for faults or the stop eventfd.
fn serve(
    uffd: &Userfaultfd,
    stop: i32,
    base: u64,
    len: u64,
    mode: UffdMode,
    source: &Source,
    faults: &AtomicU64,
) -> Result<(), String> {
    let unit = mode.unit();
    // The buffer of every copy (zeros for Source::Zeros, touched so the
    // kernel copies from present pages).
    let mut buf = vec![0u8; unit as usize];
    let mut events = Vec::with_capacity(MAX_EVENTS_PER_READ);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two live fds described by our array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if errno().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {}", errno()));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        events.clear();
        uffd.read_events(&mut events, MAX_EVENTS_PER_READ)
            .map_err(|e| e.to_string())?;
        for ev in &events {
            let Event::Pagefault { address, .. } = *ev else {
                continue;
            };
            let start = (address & !(unit - 1)).max(base);
            let end = (start + unit).min(base + len);
            faults.fetch_add(1, Ordering::Relaxed);
            resolve(uffd, mode, source, base, start, end - start, &mut buf)?;
        }
    }
}

/// Fills `start..start + len` (or wakes its waiters if another message for
/// the same block already filled it).
fn resolve(
    uffd: &Userfaultfd,
    mode: UffdMode,
    source: &Source,
    base: u64,
    start: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let (o, buf) = (start - base, &mut buf[..len as usize]);
    let zero_fill = match source {
        Source::Zeros => mode == UffdMode::Zero4k,
        Source::File { .. } => mode == UffdMode::Zero4k || !source.has_data(o, o + len),
    };
    let filled = if zero_fill {
        uffd.zeropage(start, len)
    } else {
        if let Source::File { file, offset, .. } = source {
            file.read_exact_at(buf, offset + o)
                .map_err(|e| format!("pread at {:#x}: {e}", offset + o))?;
        }
        uffd.copy(start, buf)
    }
    .map_err(|e| format!("fill {start:#x}+{len:#x}: {e}"))?;
    if filled < len {
        // Already filled for an earlier message: just wake.
        uffd.wake(start, len)
            .map_err(|e| format!("wake {start:#x}+{len:#x}: {e}"))?;
    }
    Ok(())
}

/// Why userfaultfd cannot be used here, or `None` if it can (a descriptor
/// is created and its API handshake done, then closed).
pub fn unavailable() -> Option<String> {
    Userfaultfd::open(Features::empty())
        .err()
        .map(|e| e.to_string())
}
