//! A small, safe wrapper over Linux userfaultfd, for write-protect mode on
//! shared memory and missing mode (filling pages on demand with
//! [`Userfaultfd::copy`] and [`Userfaultfd::zeropage`], as a snapshot
//! restore handler does).
//!
//! userfaultfd lets a thread handle page faults of another thread (or of
//! the kernel on its behalf, e.g. KVM resolving a guest access) in
//! userspace. In write-protect mode ([`RegisterMode::WP`]) a range's pages
//! can be write-protected page by page ([`Userfaultfd::write_protect`]); a
//! write to such a page blocks the writer and queues a page-fault [`Event`]
//! whose `wp` flag is set ([`Event::is_wp`]), until the handler removes the protection
//! ([`Userfaultfd::unprotect`]) and wakes it. Write protection is a bit in
//! one mapping's page-table entry: other mappings of the same memfd page
//! are unaffected, which is what lets a handler copy a page through a
//! second mapping while the first is protected.
//!
//! This module knows nothing of guestmm's mm or KVM layers.
//!
//! # With KVM
//!
//! KVM resolves a guest access to a memslot page with `get_user_pages` on
//! the slot's host mapping, which takes the userfaultfd path like any
//! other fault: a guest write to a write-protected page of a *writable*
//! memslot blocks the vCPU thread inside `KVM_RUN` (no exit to userspace)
//! until the page is unprotected and woken, and the write then lands;
//! protecting a page KVM already maps writable zaps KVM's mapping through
//! the MMU notifier. `tests/kvm_uffd_wp.rs` shows this on this project's
//! (nested, `kvm_pvm`) hosts, including locked read-modify-writes of
//! several vCPUs staying atomic while protection comes and goes, and
//! prints the cost of one round trip.
//!
//! # Availability
//!
//! [`Userfaultfd::open`] tries `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`,
//! Linux 6.1; access is by file permission) and falls back to the
//! `userfaultfd(2)` system call, which needs `CAP_SYS_PTRACE` unless
//! `vm.unprivileged_userfaultfd = 1`. The `UFFD_USER_MODE_ONLY` flag that
//! would let an unprivileged process in anyway is not used on purpose: it
//! leaves faults taken in kernel mode (such as KVM's accesses to guest
//! memory) unhandled, which defeats the point. Errors say which of these
//! failed ([`UffdError`]) so a caller can fall back to something else.
//!
//! Write protection of shmem/memfd memory needs Linux 5.19 and a kernel
//! built with `CONFIG_PTE_MARKER_UFFD_WP`; the API handshake reports it as
//! [`Features::WP_HUGETLBFS_SHMEM`].
//!
//! # Why raw ioctls and not the `userfaultfd` crate
//!
//! The crate (0.9) hides the feature mask the kernel offers (its builder
//! checks ioctls only), has no flag for `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`
//! or later features, does not fall back to the system call when
//! `/dev/userfaultfd` exists but is not accessible, and brings `nix` 0.27
//! and `thiserror` 1 along. What is needed here is seven ioctls and one
//! 32-byte message, written out below from `include/uapi/linux/userfaultfd.h`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use log::debug;

// ---- include/uapi/linux/userfaultfd.h (Linux 6.18), written out ----------

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO`: the ioctl type of userfaultfd ioctls (and of `USERFAULTFD_IOC`).
const UFFDIO: u32 = 0xaa;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` as in `include/uapi/asm-generic/ioctl.h`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr
}

/// `USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, 0x00, 0);
/// `UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)`.
const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, 0x3f, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)`.
const UFFDIO_REGISTER: u32 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, 0x01, size_of::<UffdioRange>());
/// `UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)`.
const UFFDIO_WAKE: u32 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: u32 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
/// `UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)`.
const UFFDIO_COPY: u32 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
/// `UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u32 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());

/// `UFFDIO_WRITEPROTECT_MODE_WP`: set (not clear) write protection.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: clear without waking the waiters.
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_copy`: `copy` is written back (bytes copied, or -errno).
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`: `zeropage` is written back like `copy`.
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `sizeof(struct uffd_msg)`: u8 event, 7 reserved bytes, a 24-byte union;
/// for page faults the union is `{ u64 flags; u64 address; u32 ptid; }`.
const UFFD_MSG_SIZE: usize = 32;

// ---- public API ------------------------------------------------------------

/// The host page size userfaultfd works in (shmem, no huge pages).
pub const UFFD_PAGE_SIZE: u64 = 4096;

/// Most events one [`Userfaultfd::read_events`] call returns.
pub const MAX_EVENTS_PER_READ: usize = 32;

/// A set of `UFFD_FEATURE_*` bits, as requested in and returned by the API
/// handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(pub u64);

impl Features {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect mode exists (anonymous memory).
    pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
    /// `UFFD_FEATURE_MISSING_SHMEM`: missing mode on shmem.
    pub const MISSING_SHMEM: Features = Features(1 << 5);
    /// `UFFD_FEATURE_THREAD_ID`: events carry the faulting thread's id.
    pub const THREAD_ID: Features = Features(1 << 8);
    /// `UFFD_FEATURE_MINOR_SHMEM`: minor-fault mode on shmem.
    pub const MINOR_SHMEM: Features = Features(1 << 10);
    /// `UFFD_FEATURE_EXACT_ADDRESS`: events carry the exact faulting address,
    /// not the page's.
    pub const EXACT_ADDRESS: Features = Features(1 << 11);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19): write-protect mode on
    /// shmem and hugetlbfs, so on memfd memory.
    pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protecting an
    /// unpopulated anonymous page protects it too (shmem always does).
    pub const WP_UNPOPULATED: Features = Features(1 << 13);
    /// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): write faults resolve themselves
    /// (no event), for dirty tracking through `PAGEMAP_SCAN`.
    pub const WP_ASYNC: Features = Features(1 << 15);

    /// What write protection of memfd (shmem) pages needs.
    pub const SHMEM_WP: Features = Features(Self::PAGEFAULT_FLAG_WP.0 | Self::WP_HUGETLBFS_SHMEM.0);

    /// No feature.
    pub const fn empty() -> Features {
        Features(0)
    }

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    /// The bits of `self` not in `other`.
    pub const fn difference(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
}

/// How a range is registered: which faults become events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegisterMode(u64);

impl RegisterMode {
    /// `UFFDIO_REGISTER_MODE_MISSING`: an access to a page with no page
    /// table entry blocks and becomes an event.
    pub const MISSING: RegisterMode = RegisterMode(1 << 0);
    /// `UFFDIO_REGISTER_MODE_WP`: a write to a write-protected page blocks
    /// and becomes an event.
    pub const WP: RegisterMode = RegisterMode(1 << 1);

    /// Both modes.
    pub const fn union(self, other: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | other.0)
    }
}

/// Which `UFFDIO_*` range ioctls the kernel allows on a registered range
/// (the `ioctls` bit mask `UFFDIO_REGISTER` returns, bit `_UFFDIO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeIoctls(pub u64);

impl RangeIoctls {
    /// `UFFDIO_WAKE` is allowed.
    pub const fn wake(self) -> bool {
        self.0 & (1 << 0x02) != 0
    }

    /// `UFFDIO_WRITEPROTECT` is allowed.
    pub const fn writeprotect(self) -> bool {
        self.0 & (1 << 0x06) != 0
    }

    /// `UFFDIO_COPY` is allowed (missing mode).
    pub const fn copy(self) -> bool {
        self.0 & (1 << 0x03) != 0
    }

    /// `UFFDIO_ZEROPAGE` is allowed (missing mode on anonymous memory).
    pub const fn zeropage(self) -> bool {
        self.0 & (1 << 0x04) != 0
    }
}

/// One event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread (or the kernel on its behalf) faulted on a registered range
    /// and is blocked until the range is fixed and woken.
    Pagefault {
        /// The faulting host virtual address: page aligned unless
        /// [`Features::EXACT_ADDRESS`] was requested.
        address: u64,
        /// A write fault (`UFFD_PAGEFAULT_FLAG_WRITE`).
        write: bool,
        /// A write to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP`).
        wp: bool,
        /// A minor fault (`UFFD_PAGEFAULT_FLAG_MINOR`).
        minor: bool,
        /// The faulting thread's id with [`Features::THREAD_ID`], else 0.
        thread_id: u32,
    },
    /// Any other event (fork, remap, remove, unmap): only asked for with
    /// features this module does not request by default.
    Other {
        /// The `UFFD_EVENT_*` code.
        code: u8,
    },
}

impl Event {
    /// The faulting address of a page fault, rounded down to its page.
    pub fn page(&self) -> Option<u64> {
        match *self {
            Event::Pagefault { address, .. } => Some(address & !(UFFD_PAGE_SIZE - 1)),
            Event::Other { .. } => None,
        }
    }

    /// Whether this is a write to a write-protected page.
    pub fn is_wp(&self) -> bool {
        matches!(self, Event::Pagefault { wp: true, .. })
    }

    fn parse(msg: &[u8; UFFD_MSG_SIZE]) -> Event {
        let u64_at = |o: usize| u64::from_ne_bytes(msg[o..o + 8].try_into().expect("8 bytes"));
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            return Event::Other { code: msg[0] };
        }
        let flags = u64_at(8);
        Event::Pagefault {
            address: u64_at(16),
            write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            wp: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
            minor: flags & UFFD_PAGEFAULT_FLAG_MINOR != 0,
            thread_id: u32::from_ne_bytes(msg[24..28].try_into().expect("4 bytes")),
        }
    }
}

/// Why userfaultfd, or one of its operations, is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` could be opened nor the system call was
    /// permitted: unprivileged userfaultfd is off (`vm.unprivileged_userfaultfd
    /// = 0`), the process lacks `CAP_SYS_PTRACE` and may not open the
    /// device, or a seccomp filter refuses it.
    #[error(
        "userfaultfd not permitted: /dev/userfaultfd: {device}; userfaultfd(2): {syscall} \
         (unprivileged userfaultfd is off: needs CAP_SYS_PTRACE, access to /dev/userfaultfd \
         or vm.unprivileged_userfaultfd=1)"
    )]
    NotPermitted {
        /// Why opening `/dev/userfaultfd` (or its ioctl) failed.
        device: io::Error,
        /// Why the system call failed.
        syscall: io::Error,
    },
    /// The kernel has no userfaultfd (`CONFIG_USERFAULTFD` off: `ENOSYS`,
    /// and no `/dev/userfaultfd`).
    #[error("userfaultfd not supported by this kernel (userfaultfd(2): {0})")]
    NotSupported(#[source] io::Error),
    /// The API handshake does not offer features the caller needs (e.g.
    /// [`Features::WP_HUGETLBFS_SHMEM`] before Linux 5.19 or without
    /// `CONFIG_PTE_MARKER_UFFD_WP`).
    #[error("userfaultfd lacks features {missing:#x} (kernel offers {offered:#x})")]
    FeatureMissing {
        /// The requested bits the kernel does not offer.
        missing: u64,
        /// Everything the kernel offers.
        offered: u64,
    },
    /// A range that is empty, not page aligned or overflows.
    #[error(
        "bad userfaultfd range: start {start:#x} len {len:#x} (must be page aligned, non-empty)"
    )]
    BadRange {
        /// Start address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A userfaultfd ioctl or read failed.
    #[error("userfaultfd {op} failed")]
    Io {
        /// The operation (`UFFDIO_REGISTER`, `read`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl UffdError {
    /// Whether the error means "userfaultfd cannot be used here at all" (as
    /// opposed to a bad call), so a caller should fall back.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            UffdError::NotPermitted { .. }
                | UffdError::NotSupported(_)
                | UffdError::FeatureMissing { .. }
        )
    }
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, UffdError>;

/// An open userfaultfd after its API handshake. Non-blocking and
/// close-on-exec; dropping it closes it, which unregisters every range,
/// removes the write protection it set and wakes every blocked faulter.
///
/// All operations take `&self`: one thread may read events while others
/// protect or unprotect ranges.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: Features,
    offered: Features,
}

impl Userfaultfd {
    /// Opens a userfaultfd with the `features` requested, after checking that
    /// the kernel offers them (a throwaway descriptor's handshake: the
    /// features of one descriptor can be set once only).
    pub fn open(features: Features) -> Result<Userfaultfd> {
        let offered = Self::offered_features()?;
        let missing = features.difference(offered);
        if missing != Features::empty() {
            return Err(UffdError::FeatureMissing {
                missing: missing.0,
                offered: offered.0,
            });
        }
        let fd = new_fd()?;
        let got = api(&fd, features)?;
        debug!(
            "userfaultfd {}: features {:#x} (offered {:#x})",
            fd.as_raw_fd(),
            features.0,
            got.0
        );
        Ok(Userfaultfd {
            fd,
            features,
            offered: got,
        })
    }

    /// Opens a userfaultfd for write protection of memfd (shmem) memory:
    /// [`Features::SHMEM_WP`].
    pub fn open_shmem_wp() -> Result<Userfaultfd> {
        Self::open(Features::SHMEM_WP)
    }

    /// The features this kernel offers (a handshake on a throwaway descriptor).
    pub fn offered_features() -> Result<Features> {
        let fd = new_fd()?;
        api(&fd, Features::empty())
    }

    /// The features this descriptor was opened with.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Everything the kernel offered in this descriptor's handshake.
    pub fn offered(&self) -> Features {
        self.offered
    }

    /// Registers `[start, start + len)` of this process's address space in
    /// `mode`. The range must be mapped (for WP on memfd memory: a shared
    /// mapping of the memfd) and page aligned. Returns the range ioctls the
    /// kernel allows there.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<RangeIoctls> {
        let mut reg = UffdioRegister {
            range: range(start, len)?,
            mode: mode.0,
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut reg)?;
        Ok(RangeIoctls(reg.ioctls))
    }

    /// Unregisters `[start, start + len)`; its write protection goes too and
    /// faulters blocked there are woken.
    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut r = range(start, len)?;
        self.ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, &mut r)
    }

    /// Write-protects `[start, start + len)` (registered in WP mode: every
    /// vma in the range must be, else `ENOENT` and nothing changes; a page
    /// replaced by a new mapping, e.g. `MAP_FIXED`, is no longer): a
    /// later write there blocks and becomes an [`Event`] with `wp` set.
    /// Pages not yet populated are protected too (shmem keeps a marker).
    pub fn write_protect(&self, start: u64, len: u64) -> Result<()> {
        self.writeprotect(start, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from `[start, start + len)` (every vma in
    /// it registered in WP mode, as for `write_protect`) and, if `wake`,
    /// wakes the writers blocked there (they retry their write). With
    /// `wake == false` (`UFFDIO_WRITEPROTECT_MODE_DONTWAKE`) the caller
    /// wakes them later with [`Userfaultfd::wake`], e.g. once per batch.
    pub fn unprotect(&self, start: u64, len: u64, wake: bool) -> Result<()> {
        let mode = if wake {
            0
        } else {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        };
        self.writeprotect(start, len, mode)
    }

    /// Wakes the faulters blocked on `[start, start + len)`; they retry
    /// their access (and block again if nothing changed). Waiters are found
    /// by address, so this also works after the range was remapped (e.g. a
    /// private copy mapped over a protected page with `MAP_FIXED`).
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        let mut r = range(start, len)?;
        self.ioctl("UFFDIO_WAKE", UFFDIO_WAKE, &mut r)
    }

    /// Fills the missing pages at `dst` (in a range registered in
    /// [`RegisterMode::MISSING`]) with a copy of `src` (`UFFDIO_COPY`) and
    /// wakes the faulters blocked on what was filled. `dst` and
    /// `src.len()` must be page aligned, `src` non-empty.
    ///
    /// Returns the bytes filled: all of `src`, or fewer if the copy stopped
    /// at a page that is already present (`EEXIST`, e.g. filled for an
    /// earlier event of the same block): the page at `dst + returned` is
    /// present, and faulters blocked after it are not woken ([`wake`]
    /// them). The kernel's partial progress (`EAGAIN`) is resumed here.
    ///
    /// Errors: [`UffdError::BadRange`], or [`UffdError::Io`] (`ENOENT`:
    /// `dst` not registered; `EINVAL`: not missing mode).
    ///
    /// [`wake`]: Userfaultfd::wake
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<u64> {
        let len = src.len() as u64;
        range(dst, len)?;
        self.fill("UFFDIO_COPY", dst, len, |done| {
            let mut c = UffdioCopy {
                dst: dst + done,
                // The kernel reads `src` (a live slice) from this offset on.
                src: src.as_ptr() as u64 + done,
                len: len - done,
                ..Default::default()
            };
            let r = self.raw_ioctl(UFFDIO_COPY, &mut c);
            (r, c.copy)
        })
    }

    /// Fills the missing pages of `[start, start + len)` (registered in
    /// [`RegisterMode::MISSING`], anonymous memory) with zeros
    /// (`UFFDIO_ZEROPAGE`: the shared zero page, a later write copies it)
    /// and wakes the faulters there. Returns the bytes filled, as
    /// [`copy`](Userfaultfd::copy) does (fewer than `len` if a page was
    /// already present).
    ///
    /// Errors: as [`copy`](Userfaultfd::copy).
    pub fn zeropage(&self, start: u64, len: u64) -> Result<u64> {
        range(start, len)?;
        self.fill("UFFDIO_ZEROPAGE", start, len, |done| {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: start + done,
                    len: len - done,
                },
                ..Default::default()
            };
            let r = self.raw_ioctl(UFFDIO_ZEROPAGE, &mut z);
            (r, z.zeropage)
        })
    }

    /// Runs a filling ioctl (`call(done)` returns the ioctl's result and the
    /// progress it wrote back) until `len` bytes are filled or a page is
    /// found present; returns the bytes filled.
    fn fill(
        &self,
        op: &'static str,
        start: u64,
        len: u64,
        mut call: impl FnMut(u64) -> (libc::c_int, i64),
    ) -> Result<u64> {
        let mut done = 0;
        while done < len {
            let (r, progress) = call(done);
            if r == 0 {
                return Ok(len);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Partial progress (or none, while the address space is
                // changing): go on from where the kernel stopped.
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    if progress > 0 {
                        done += progress as u64;
                    }
                }
                Some(libc::EEXIST) => return Ok(done),
                _ => {
                    log::debug!("{op} {:#x}+{:#x}: {e}", start + done, len - done);
                    return Err(UffdError::Io { op, source: e });
                }
            }
        }
        Ok(done)
    }

    /// One ioctl, its return value as is (for the filling ioctls, whose
    /// `EAGAIN` carries progress).
    fn raw_ioctl<T>(&self, req: u32, arg: &mut T) -> libc::c_int {
        // SAFETY: `req` is a userfaultfd ioctl whose argument is a `T` (the
        // pairs are fixed by the callers in this file), `arg` is a live
        // exclusive reference, and the fd is owned by `self`. The filling
        // ioctls only populate pages that are missing in a range registered
        // on this descriptor (never overwrite a present page), reading from
        // a source slice the caller keeps alive for the call.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) }
    }

    /// Reads one pending event, or `None` if there is none right now.
    pub fn read_event(&self) -> Result<Option<Event>> {
        let mut out = Vec::with_capacity(1);
        self.read_events(&mut out, 1)?;
        Ok(out.pop())
    }

    /// Reads up to `max` (at least 1, at most [`MAX_EVENTS_PER_READ`])
    /// pending events into `out` without blocking; returns how many were
    /// read (0 if none pending).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize> {
        let mut buf = [0u8; MAX_EVENTS_PER_READ * UFFD_MSG_SIZE];
        let buf = &mut buf[..max.clamp(1, MAX_EVENTS_PER_READ) * UFFD_MSG_SIZE];
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes and the
        // fd is owned by `self`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(UffdError::Io {
                    op: "read",
                    source: e,
                }),
            };
        }
        let n = n as usize / UFFD_MSG_SIZE;
        for msg in buf.chunks_exact(UFFD_MSG_SIZE).take(n) {
            out.push(Event::parse(msg.try_into().expect("32 bytes")));
        }
        Ok(n)
    }

    /// Waits until an event is pending or `timeout` passes (`None`: no
    /// limit); returns whether one is pending. `EINTR` counts as "none yet".
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(UffdError::Io {
                op: "poll",
                source: e,
            });
        }
        Ok(r > 0 && pfd.revents & libc::POLLIN != 0)
    }

    fn writeprotect(&self, start: u64, len: u64, mode: u64) -> Result<()> {
        let mut wp = UffdioWriteprotect {
            range: range(start, len)?,
            mode,
        };
        self.ioctl("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, &mut wp)
    }

    fn ioctl<T>(&self, op: &'static str, req: u32, arg: &mut T) -> Result<()> {
        loop {
            // SAFETY: `req` is a userfaultfd ioctl whose argument is a `T`
            // (the pairs are fixed by the callers above), `arg` is a live
            // exclusive reference, and the fd is owned by `self`.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            // UFFDIO_WRITEPROTECT returns EAGAIN while the address space is
            // changing (mmap_changing, e.g. during fork); retry.
            if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                return Err(UffdError::Io { op, source: e });
            }
        }
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn range(start: u64, len: u64) -> Result<UffdioRange> {
    let aligned = start % UFFD_PAGE_SIZE == 0 && len % UFFD_PAGE_SIZE == 0;
    if len == 0 || !aligned || start.checked_add(len).is_none() {
        return Err(UffdError::BadRange { start, len });
    }
    Ok(UffdioRange { start, len })
}

/// The API handshake: returns the features the kernel offers (the
/// requested ones are then enabled on `fd`).
fn api(fd: &OwnedFd, features: Features) -> Result<Features> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features: features.0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, `a` is one and live.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut a as *mut UffdioApi) };
    if r != 0 {
        return Err(UffdError::Io {
            op: "UFFDIO_API",
            source: io::Error::last_os_error(),
        });
    }
    Ok(Features(a.features))
}

/// A new non-blocking, close-on-exec userfaultfd: `/dev/userfaultfd` first,
/// then the system call.
fn new_fd() -> Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let device = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as an int
            // argument and returns a new descriptor or -1.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if fd >= 0 {
                // SAFETY: the ioctl returned a fresh descriptor that we own.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            io::Error::last_os_error()
        }
        Err(e) => e,
    };
    // SAFETY: userfaultfd(2) takes an int of flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the system call returned a fresh descriptor that we own.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall = io::Error::last_os_error();
    match syscall.raw_os_error() {
        Some(libc::ENOSYS) if device.kind() == io::ErrorKind::NotFound => {
            Err(UffdError::NotSupported(syscall))
        }
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOSYS) => {
            Err(UffdError::NotPermitted { device, syscall })
        }
        _ => Err(UffdError::Io {
            op: "userfaultfd(2)",
            source: syscall,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl numbers as `<linux/userfaultfd.h>` defines them (printed
    /// by a C program including it on Linux 6.18 / x86-64).
    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn parses_a_wp_pagefault_message() {
        let mut msg = [0u8; UFFD_MSG_SIZE];
        msg[0] = UFFD_EVENT_PAGEFAULT;
        msg[8..16]
            .copy_from_slice(&(UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE).to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7f00_1234_5678u64.to_ne_bytes());
        msg[24..28].copy_from_slice(&77u32.to_ne_bytes());
        let ev = Event::parse(&msg);
        assert_eq!(
            ev,
            Event::Pagefault {
                address: 0x7f00_1234_5678,
                write: true,
                wp: true,
                minor: false,
                thread_id: 77
            }
        );
        assert_eq!(ev.page(), Some(0x7f00_1234_5000));
        msg[0] = 0x13;
        assert_eq!(Event::parse(&msg), Event::Other { code: 0x13 });
    }

    #[test]
    fn rejects_bad_ranges() {
        for (s, l) in [
            (0x1000, 0),
            (0x1001, 0x1000),
            (0x1000, 0x10),
            (!0xfff, 0x2000),
        ] {
            assert!(
                matches!(range(s, l), Err(UffdError::BadRange { .. })),
                "{s:#x} {l:#x}"
            );
        }
        assert!(range(0x1000, 0x2000).is_ok());
    }
}
