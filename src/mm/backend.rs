//! The platform side of an address space: what makes populated memory
//! visible to the guest (the seeds' platform `AddressSpace`; "host VMAs serve
//! as PTEs"). The KVM implementation is `kvm::SlotTable`; this module also
//! ships [`RecordingBackend`] for tests and [`NoopBackend`] for benchmarks.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::dirty::{DirtyLog, DirtyPages};
use crate::range::{GuestRange, Range};
use crate::segment::{SegmentSet, SegmentValue};

/// Errors a backend reports; the fault path passes them to its caller.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Every memory slot is in use.
    #[error("out of memory slots: all {limit} are in use")]
    OutOfSlots {
        /// The configured or host slot limit.
        limit: usize,
    },
    /// The range cannot be installed (outside the backend's reservation).
    #[error("range {range} is outside the backend's guest-physical reservation {limit:#x}")]
    OutOfRange {
        /// The offending range.
        range: GuestRange,
        /// End of the reservation.
        limit: u64,
    },
    /// A host call failed.
    #[error("{op} failed: {source}")]
    Host {
        /// The operation (e.g. `KVM_SET_USER_MEMORY_REGION`, `mmap`).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A backend was asked to work with a limit of zero memory slots.
    #[error("a slot limit of 0 leaves no room for guest memory")]
    NoSlots,
    /// A failure injected by a test backend.
    #[error("injected failure: {0}")]
    Injected(&'static str),
}

/// Makes installed memory visible to the guest.
///
/// guestmm calls these with its `active` lock held (lock order: mapping →
/// active → backend), so implementations must not call back into the
/// address space. The exception is [`prefill`](Self::prefill), which it
/// calls with no lock of its own held.
///
/// Every range is non-empty and page aligned.
pub trait AddressSpaceBackend: Send + Sync {
    /// Makes `range` show the pages of `fd` starting at `file_offset`,
    /// writable or read-only, replacing whatever was installed there.
    fn install(
        &self,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> Result<(), BackendError>;

    /// Makes `range` invisible: guest accesses there exit. Parts of `range`
    /// with nothing installed are ignored.
    fn remove(&self, range: GuestRange) -> Result<(), BackendError>;

    /// Makes what is installed in `range` read-only. Parts with nothing
    /// installed are ignored.
    fn write_protect(&self, range: GuestRange) -> Result<(), BackendError>;

    /// Makes `range` show the pages of `fd` from `file_offset` as
    /// copy-on-write memory the guest's protection lets it write: a guest
    /// write there must reach the mm core before it lands. The default
    /// installs read-only (a guest write exits); a backend with per-page
    /// write protection (the KVM backend in
    /// [`CowMode::UserfaultfdWp`](crate::kvm::CowMode)) may install it
    /// writable and trap writes itself, and then says so with
    /// [`page_granular_cow`](Self::page_granular_cow).
    fn install_cow(
        &self,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> Result<(), BackendError> {
        self.install(range, fd, file_offset, false)
    }

    /// Makes what is installed writable in `range` copy-on-write (a fork
    /// made its pages shared): writes must reach the mm core again. The
    /// default is [`write_protect`](Self::write_protect).
    fn write_protect_cow(&self, range: GuestRange) -> Result<(), BackendError> {
        self.write_protect(range)
    }

    /// True if this backend traps guest writes to copy-on-write memory per
    /// page ([`install_cow`](Self::install_cow) installs writable): the
    /// fault path then breaks copy-on-write for the faulting page only.
    fn page_granular_cow(&self) -> bool {
        false
    }

    /// Whether [`install_cow`](Self::install_cow) of pages of `fd` traps
    /// writes per page. Where it does not (a backend that is
    /// [`page_granular_cow`](Self::page_granular_cow) but cannot protect
    /// this file's pages), a write fault breaks copy-on-write in the whole
    /// chunk again, as without per-page trapping. The default is
    /// `page_granular_cow()`.
    fn page_granular_cow_for(&self, fd: BorrowedFd<'_>) -> bool {
        let _ = fd;
        self.page_granular_cow()
    }

    /// Fills the host page tables behind `range`, which was installed
    /// `writable` (or read-only) just before, so the guest's first accesses
    /// there find present pages instead of taking a host page fault each.
    /// Returns the bytes filled. This commits the memory behind `range`;
    /// the fault path decides when that is worth it (see `mm::fault`).
    ///
    /// Called with no address-space lock held: `range` may have been
    /// removed, re-protected or replaced meanwhile. An implementation
    /// must then fill at most what is installed now (or fail with an
    /// error, which the caller logs and ignores), never resurrect what
    /// was removed. The default fills nothing.
    fn prefill(&self, range: GuestRange, writable: bool) -> Result<u64, BackendError> {
        let _ = (range, writable);
        Ok(0)
    }

    /// Starts logging the guest's writes for `sink`: from now on every page
    /// the guest writes must reach `sink`, at the latest at the next
    /// [`harvest_dirty`](Self::harvest_dirty), including pages of memory
    /// removed or re-protected meanwhile (a backend whose log lives with
    /// its mappings must move it into `sink` before dropping them). Called
    /// with `active` held. The default logs nothing: a backend without
    /// guest writes (tests, benchmarks of the mm core).
    fn start_dirty_log(&self, sink: Arc<DirtyLog>) -> Result<(), BackendError> {
        let _ = sink;
        Ok(())
    }

    /// Moves every guest write logged so far into the sink given to
    /// [`start_dirty_log`](Self::start_dirty_log), clearing the log: a
    /// write after a range's harvest stays logged for the next one. Called
    /// with no address-space lock held. The default does nothing.
    fn harvest_dirty(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Stops logging and forgets the sink. Called with `active` held. The
    /// default does nothing.
    fn stop_dirty_log(&self) {}
}

/// A backend that does nothing (benchmarks of the mm core alone).
#[derive(Debug, Default)]
pub struct NoopBackend;

impl AddressSpaceBackend for NoopBackend {
    fn install(
        &self,
        _: GuestRange,
        _: BorrowedFd<'_>,
        _: u64,
        _: bool,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn remove(&self, _: GuestRange) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_protect(&self, _: GuestRange) -> Result<(), BackendError> {
        Ok(())
    }
}

/// One call that reached a [`RecordingBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCall {
    /// [`AddressSpaceBackend::install`].
    Install {
        /// Guest range.
        range: GuestRange,
        /// The fd's number (identifies the file).
        fd: RawFd,
        /// File offset of `range.start()`.
        file_offset: u64,
        /// Installed writable.
        writable: bool,
    },
    /// [`AddressSpaceBackend::remove`].
    Remove {
        /// Guest range.
        range: GuestRange,
    },
    /// [`AddressSpaceBackend::write_protect`].
    WriteProtect {
        /// Guest range.
        range: GuestRange,
    },
}

/// What a [`RecordingBackend`] has installed over one extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The fd number of the file.
    pub fd: RawFd,
    /// File offset at the extent's start.
    pub file_offset: u64,
    /// Writable or read-only.
    pub writable: bool,
}

impl SegmentValue for Installed {
    fn merge(&self, left: Range, right_value: &Self, _right: Range) -> Option<Self> {
        (self.fd == right_value.fd
            && self.writable == right_value.writable
            && self.file_offset + left.len() == right_value.file_offset)
            .then_some(*self)
    }
    fn split(&self, range: Range, at: u64) -> (Self, Self) {
        let right = Installed {
            file_offset: self.file_offset + (at - range.start()),
            ..*self
        };
        (*self, right)
    }
}

#[derive(Default)]
struct Recording {
    calls: Vec<BackendCall>,
    prefills: Vec<(GuestRange, bool)>,
    installed: SegmentSet<Installed>,
    fail_installs_after: Option<usize>,
    /// The dirty-log sink while logging.
    sink: Option<Arc<DirtyLog>>,
    /// Simulated guest writes not harvested yet (a KVM slot's log).
    guest_log: DirtyPages,
}

/// A backend that records every call and keeps a model of what is
/// installed, so tests can assert exactly what would reach KVM.
#[derive(Default)]
pub struct RecordingBackend {
    state: Mutex<Recording>,
}

impl RecordingBackend {
    /// A backend with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<BackendCall> {
        self.lock().calls.clone()
    }

    /// Forgets the recorded calls and prefills (the installed model
    /// stays).
    pub fn clear_calls(&self) {
        let mut s = self.lock();
        s.calls.clear();
        s.prefills.clear();
    }

    /// Every [`prefill`](AddressSpaceBackend::prefill) call so far, in
    /// order, as `(range, writable)`. Kept apart from [`calls`](Self::calls)
    /// so tests of installs need not care about the prefill policy.
    pub fn prefills(&self) -> Vec<(GuestRange, bool)> {
        self.lock().prefills.clone()
    }

    /// What is installed now, as maximal extents.
    pub fn installed(&self) -> Vec<(GuestRange, Installed)> {
        self.lock().installed.iter().map(|(r, v)| (r, *v)).collect()
    }

    /// What is installed at `gpa`.
    pub fn installed_at(&self, gpa: u64) -> Option<(GuestRange, Installed)> {
        self.lock()
            .installed
            .find_segment(gpa)
            .map(|(r, v)| (r, *v))
    }

    /// Makes installs fail with [`BackendError::Injected`] once `n` more
    /// have succeeded (`None` lifts the limit).
    pub fn fail_installs_after(&self, n: Option<usize>) {
        self.lock().fail_installs_after = n;
    }

    /// Simulates a guest write of `data` at `gpa`: the range must be
    /// installed writable all over (else [`BackendError::Injected`] and
    /// nothing is written); the bytes go to the installed file pages
    /// (`pwrite`), and while logging the pages enter the backend's log as
    /// KVM's would, reaching the sink at the next harvest or when they are
    /// removed or write-protected (a slot deletion harvests first).
    pub fn guest_write(&self, gpa: u64, data: &[u8]) -> Result<(), BackendError> {
        let range = Range::from_len(gpa, data.len() as u64)
            .map_err(|_| BackendError::Injected("guest write range overflows"))?;
        let mut s = self.lock();
        if s.installed.span_range(range) != range.len()
            || s.installed.iter_range(range).any(|(_, v)| !v.writable)
        {
            return Err(BackendError::Injected(
                "guest write to memory not installed writable",
            ));
        }
        for (r, v) in s.installed.iter_range(range) {
            let part = r.intersect(range);
            let at = &data[(part.start() - gpa) as usize..(part.end() - gpa) as usize];
            let off = v.file_offset + (part.start() - r.start());
            // SAFETY: `at` is a live buffer of `at.len()` bytes; `v.fd` is
            // the fd the mm core installed, which stays open while installed
            // (the pma holding its pages is alive: we hold our lock, and
            // removal goes through it).
            let n = unsafe { libc::pwrite(v.fd, at.as_ptr().cast(), at.len(), off as libc::off_t) };
            if n != at.len() as isize {
                return Err(BackendError::Host {
                    op: "pwrite",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        if s.sink.is_some() {
            s.guest_log.mark(range);
        }
        Ok(())
    }

    /// Moves the simulated guest log into the sink (a harvest).
    fn harvest_locked(s: &mut Recording) {
        if let Some(sink) = &s.sink {
            let pages = s.guest_log.take();
            for r in pages.ranges() {
                sink.mark(r);
            }
        }
    }

    /// A change that would delete KVM slots: their log goes with them, so
    /// it is harvested first (a KVM slot's log dies with the slot; the
    /// simulated one is dropped the same way after the harvest).
    fn retire_log_locked(s: &mut Recording) {
        Self::harvest_locked(s);
        s.guest_log.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AddressSpaceBackend for RecordingBackend {
    fn install(
        &self,
        range: GuestRange,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> Result<(), BackendError> {
        let mut s = self.lock();
        match s.fail_installs_after {
            Some(0) => return Err(BackendError::Injected("install refused by test")),
            Some(n) => s.fail_installs_after = Some(n - 1),
            None => {}
        }
        let fd = fd.as_raw_fd();
        s.calls.push(BackendCall::Install {
            range,
            fd,
            file_offset,
            writable,
        });
        Self::retire_log_locked(&mut s);
        s.installed.remove_range(range);
        s.installed
            .insert(
                range,
                Installed {
                    fd,
                    file_offset,
                    writable,
                },
            )
            .expect("range was just cleared");
        Ok(())
    }

    fn remove(&self, range: GuestRange) -> Result<(), BackendError> {
        let mut s = self.lock();
        s.calls.push(BackendCall::Remove { range });
        Self::retire_log_locked(&mut s);
        s.installed.remove_range(range);
        Ok(())
    }

    fn write_protect(&self, range: GuestRange) -> Result<(), BackendError> {
        let mut s = self.lock();
        s.calls.push(BackendCall::WriteProtect { range });
        Self::retire_log_locked(&mut s);
        // The range may have holes; protect each installed piece.
        let pieces: Vec<GuestRange> = s.installed.iter_range(range).map(|(r, _)| r).collect();
        for piece in pieces {
            let part = piece.intersect(range);
            s.installed
                .apply_contiguous(part, |_, v| v.writable = false)
                .expect("piece is covered");
        }
        s.installed.merge_range(range);
        Ok(())
    }

    /// Records the call; fills only what is installed in `range` (with
    /// the writability asked for), like a real backend, and reports those
    /// bytes.
    fn prefill(&self, range: GuestRange, writable: bool) -> Result<u64, BackendError> {
        let mut s = self.lock();
        s.prefills.push((range, writable));
        let filled = s
            .installed
            .iter_range(range)
            .filter(|(_, v)| v.writable || !writable)
            .map(|(r, _)| r.intersect(range).len())
            .sum();
        Ok(filled)
    }

    fn start_dirty_log(&self, sink: Arc<DirtyLog>) -> Result<(), BackendError> {
        let mut s = self.lock();
        s.guest_log.clear();
        s.sink = Some(sink);
        Ok(())
    }

    fn harvest_dirty(&self) -> Result<(), BackendError> {
        Self::harvest_locked(&mut self.lock());
        Ok(())
    }

    fn stop_dirty_log(&self) {
        let mut s = self.lock();
        s.sink = None;
        s.guest_log.clear();
    }
}
