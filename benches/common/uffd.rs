//! A userfaultfd peer: guest RAM is one private anonymous mapping registered
//! with userfaultfd in missing mode, and a handler thread resolves every
//! missing fault (KVM's GUP of a guest page included) with `UFFDIO_ZEROPAGE`
//! or `UFFDIO_COPY` of 4 KiB or of the whole aligned 2 MiB block: what a VMM
//! author who wants lazy guest memory without guestmm writes (Firecracker's
//! snapshot handler style).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

const UFFDIO: u64 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const HUGE: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// `_IOC(dir, 0xAA, nr, size)` (x86-64 encoding).
const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr) as libc::c_ulong
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_API: libc::c_ulong = ioc(READ_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(READ_WRITE, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: libc::c_ulong = ioc(READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(READ_WRITE, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(READ_WRITE, 0x04, std::mem::size_of::<UffdioZeropage>());
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, 0x00, 0);

/// How the handler resolves a missing fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdMode {
    /// `UFFDIO_ZEROPAGE` of the faulting 4 KiB page (a write then takes a
    /// second, copy-on-write fault in the kernel).
    Zero4k,
    /// `UFFDIO_COPY` of a zeroed 4 KiB page.
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

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A new userfaultfd: the syscall, else `/dev/userfaultfd`.
fn new_uffd() -> Result<OwnedFd, String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: a new fd nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let sys_err = errno();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| format!("userfaultfd(2): {sys_err}; /dev/userfaultfd: {e}"))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a
    // new fd or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(format!(
            "userfaultfd(2): {sys_err}; USERFAULTFD_IOC_NEW: {}",
            errno()
        ));
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The handler thread of one registered region; stopped and joined on drop.
pub struct UffdHandler {
    stop: OwnedFd,
    thread: Option<JoinHandle<Result<(), String>>>,
    faults: Arc<AtomicU64>,
}

impl UffdHandler {
    /// Registers `base..base + len` (a private anonymous mapping nobody has
    /// touched, 2 MiB aligned) in missing mode and starts the handler.
    /// `Err` says why userfaultfd is unavailable.
    ///
    /// # Safety
    /// The mapping must stay mapped until this handler is dropped.
    pub unsafe fn start(base: u64, len: u64, mode: UffdMode) -> Result<UffdHandler, String> {
        assert!(
            base % HUGE == 0 && len % HUGE == 0,
            "region not 2 MiB aligned"
        );
        let uffd = new_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes the struct we pass.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(format!("UFFDIO_API: {}", errno()));
        }
        let mut reg = UffdioRegister {
            range: UffdioRange { start: base, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the struct we pass; the
        // range is the caller's mapping.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(format!("UFFDIO_REGISTER: {}", errno()));
        }
        let want = match mode {
            UffdMode::Zero4k => 0x04,
            UffdMode::Copy4k | UffdMode::Copy2m => 0x03,
        };
        if reg.ioctls & (1 << want) == 0 {
            return Err(format!(
                "the registered range does not support ioctl {want:#x} (ioctls {:#x})",
                reg.ioctls
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
            .spawn(move || serve(uffd, stop_raw, base, len, mode, &counter))
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
    uffd: OwnedFd,
    stop: i32,
    base: u64,
    len: u64,
    mode: UffdMode,
    faults: &AtomicU64,
) -> Result<(), String> {
    let unit = mode.unit();
    // The source of every copy: `unit` zero bytes, touched so the kernel
    // copies from present pages.
    let src = vec![0u8; unit as usize];
    let mut msgs = [0u8; 32 * 16];
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
        // SAFETY: reading uffd_msg records into our buffer.
        let got = unsafe { libc::read(uffd.as_raw_fd(), msgs.as_mut_ptr().cast(), msgs.len()) };
        if got < 0 {
            let e = errno();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(format!("read: {e}"));
        }
        for msg in msgs[..got as usize].chunks_exact(32) {
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes"));
            let start = (addr & !(unit - 1)).max(base);
            let end = (start + unit).min(base + len);
            faults.fetch_add(1, Ordering::Relaxed);
            resolve(uffd.as_raw_fd(), mode, start, end - start, &src)?;
        }
    }
}

/// Fills `start..start + len` (or wakes its waiters if another message for
/// the same block already filled it).
fn resolve(uffd: i32, mode: UffdMode, start: u64, len: u64, src: &[u8]) -> Result<(), String> {
    let mut done = 0;
    while done < len {
        let (ret, progress) = match mode {
            UffdMode::Zero4k => {
                let mut z = UffdioZeropage {
                    range: UffdioRange {
                        start: start + done,
                        len: len - done,
                    },
                    ..Default::default()
                };
                // SAFETY: UFFDIO_ZEROPAGE reads and writes our struct; the
                // range is inside the registered region.
                let r = unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, &mut z) };
                (r, z.zeropage)
            }
            UffdMode::Copy4k | UffdMode::Copy2m => {
                let mut c = UffdioCopy {
                    dst: start + done,
                    src: src.as_ptr() as u64 + done,
                    len: len - done,
                    ..Default::default()
                };
                // SAFETY: UFFDIO_COPY reads `src` (our live buffer of `len`
                // bytes) and writes into the registered region.
                let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, &mut c) };
                (r, c.copy)
            }
        };
        if ret == 0 {
            return Ok(());
        }
        let e = errno();
        match e.raw_os_error() {
            Some(libc::EAGAIN) if progress > 0 => done += progress as u64,
            Some(libc::EAGAIN) => {}
            Some(libc::EEXIST) => {
                // Already filled for an earlier message: just wake.
                let mut r = UffdioRange { start, len };
                // SAFETY: UFFDIO_WAKE reads our range struct.
                unsafe { libc::ioctl(uffd, UFFDIO_WAKE, &mut r) };
                return Ok(());
            }
            _ => return Err(format!("resolve {start:#x}+{len:#x}: {e}")),
        }
    }
    Ok(())
}

/// Why userfaultfd cannot be used here, or `None` if it can (a descriptor
/// is created and its API handshake done, then closed).
pub fn unavailable() -> Option<String> {
    let uffd = match new_uffd() {
        Ok(fd) => fd,
        Err(e) => return Some(e),
    };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: UFFDIO_API reads and writes the struct we pass.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
        return Some(format!("UFFDIO_API: {}", errno()));
    }
    None
}
