//! Copy-on-write modes of a [`Vm`](super::Vm), and the fault thread of
//! [`CowMode::UserfaultfdWp`].
//!
//! In that mode copy-on-write memory is installed in *writable* memslots
//! with its host pages write-protected through the VM's userfaultfd (see
//! `kvm/slots.rs`). A guest write to such a page blocks the vCPU inside
//! `KVM_RUN`; the kernel queues an event on the userfaultfd. The fault
//! thread reads it, maps the host address to a GPA through the
//! reservation, and calls
//! [`AddressSpace::break_cow_page`](crate::mm::AddressSpace::break_cow_page):
//! the mm core copies (or takes over) that one page under its usual locks
//! and installs it writable; the slot table maps the new page over the old
//! (`MAP_FIXED`, no slot change) and wakes the writers blocked there, which
//! re-execute their instruction natively, so a `lock xadd` stays a real
//! atomic instruction. The thread wakes the page once more itself in case
//! nothing was installed (a page removed or re-protected meanwhile: the
//! vCPU retries and takes the ordinary path).
//!
//! The thread holds no lock between events, takes the mm locks only
//! inside `break_cow_page` (mapping → active → slot table, as any fault),
//! and ends when the VM drops: it polls with a short timeout and checks a
//! flag; dropping the last reference to the userfaultfd (after the
//! thread is joined) closes it, which wakes anything still blocked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::mm::AddressSpace;
use crate::uffd::{Event, Features, Userfaultfd, MAX_EVENTS_PER_READ, UFFD_PAGE_SIZE};

use super::slots::SlotTable;

/// How a [`Vm`](super::Vm) makes the guest's writes to copy-on-write
/// memory reach the mm core ([`VmOptions::cow`](super::VmOptions::cow)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum CowMode {
    /// [`UserfaultfdWp`](Self::UserfaultfdWp) when a userfaultfd with
    /// write protection of memfd memory can be opened, else
    /// [`ReadOnlySlots`](Self::ReadOnlySlots) (logged at info level). The
    /// default: the whole KVM test suite and every tinyvmm guest pass in
    /// either mode.
    #[default]
    Auto,
    /// Copy-on-write memory is installed in read-only memslots; a guest
    /// write exits, and the fault copies (at most) the 2 MiB chunk
    /// around it ([`COW_CHUNK`](crate::mm::COW_CHUNK)). A locked
    /// read-modify-write whose write hits such a page is emulated by KVM
    /// and is *not* atomic against other vCPUs (see the README's
    /// atomicity note). Works everywhere.
    ReadOnlySlots,
    /// Copy-on-write memory is installed in writable memslots with its
    /// host pages write-protected through userfaultfd; a guest write
    /// blocks inside KVM until the VM's fault thread has copied that one
    /// page (see the [module docs](self)). Guarantees: locked instructions
    /// on copy-on-write pages are atomic; a write copies its 4 KiB page
    /// (until a 2 MiB chunk has [`COW_COLLAPSE_PAGES`](crate::mm::pma::COW_COLLAPSE_PAGES)
    /// broken pages, when the rest of the chunk is copied at once);
    /// copy-on-write adds no memslot. Needs `/dev/userfaultfd` or
    /// `userfaultfd(2)` (privileged, or `vm.unprivileged_userfaultfd = 1`)
    /// and Linux 5.19 for memfd write protection; `Vm::new` fails if
    /// asked for it explicitly and it is unavailable.
    UserfaultfdWp,
}

impl CowMode {
    /// The name `tinyvmm --cow` takes and `--stats` prints.
    pub fn name(self) -> &'static str {
        match self {
            CowMode::Auto => "auto",
            CowMode::ReadOnlySlots => "ro-slots",
            CowMode::UserfaultfdWp => "uffd-wp",
        }
    }

    /// Parses [`name`](Self::name)'s output.
    pub fn from_name(name: &str) -> Option<CowMode> {
        [
            CowMode::Auto,
            CowMode::ReadOnlySlots,
            CowMode::UserfaultfdWp,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

/// Counters of the fault thread ([`CowMode::UserfaultfdWp`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CowStats {
    /// Write-protect events read.
    pub events: u64,
    /// Pages whose copy-on-write the thread broke (copied or taken over).
    pub page_breaks: u64,
    /// Chunks collapsed (broken whole after too many single pages).
    pub collapses: u64,
    /// Bytes copied by the thread's breaks.
    pub copied_bytes: u64,
    /// Events that broke nothing (already broken, removed, or no longer
    /// writable: the vCPU retried on its own).
    pub spurious: u64,
    /// Events whose break failed (the VM was stopped).
    pub failures: u64,
    /// Nanoseconds spent handling events (read to wake), summed.
    pub handle_ns: u64,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    page_breaks: AtomicU64,
    collapses: AtomicU64,
    copied_bytes: AtomicU64,
    spurious: AtomicU64,
    failures: AtomicU64,
    handle_ns: AtomicU64,
}

/// The userfaultfd `mode` needs: `None` for read-only slots (asked for,
/// or `Auto` where userfaultfd is unavailable, logged).
pub(crate) fn resolve(mode: CowMode) -> Result<Option<Arc<Userfaultfd>>, super::VmError> {
    match mode {
        CowMode::ReadOnlySlots => Ok(None),
        CowMode::UserfaultfdWp => Userfaultfd::open(Features::SHMEM_WP)
            .map(|u| Some(Arc::new(u)))
            .map_err(|source| super::VmError::Userfaultfd { source }),
        CowMode::Auto => match Userfaultfd::open(Features::SHMEM_WP) {
            Ok(u) => Ok(Some(Arc::new(u))),
            Err(e) => {
                log::info!("copy-on-write by read-only slots: {e}");
                Ok(None)
            }
        },
    }
}

/// The fault thread of one VM: started by `Vm::new`, stopped by
/// [`stop`](Self::stop) (the VM's drop).
pub(crate) struct FaultThread {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    handle: Option<JoinHandle<()>>,
}

/// How often the thread looks at its stop flag while idle.
const POLL: Duration = Duration::from_millis(50);

impl FaultThread {
    /// Starts the thread reading `uffd`'s events for the pages of `slots`,
    /// breaking copy-on-write in `space`; `on_error` is called (once per
    /// failure) when a break fails for a host reason, with the thread's
    /// description of it: the writer cannot make progress, so the VM
    /// should stop.
    pub(crate) fn spawn(
        uffd: Arc<Userfaultfd>,
        slots: Weak<SlotTable>,
        space: Weak<AddressSpace>,
        on_error: Box<dyn Fn(String) + Send>,
    ) -> std::io::Result<FaultThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let handle = {
            let stop = stop.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("guestmm-cow".into())
                .spawn(move || run(&uffd, &slots, &space, &stop, &counters, &*on_error))?
        };
        Ok(FaultThread {
            stop,
            counters,
            handle: Some(handle),
        })
    }

    /// Counters so far.
    pub(crate) fn stats(&self) -> CowStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        CowStats {
            events: l(&c.events),
            page_breaks: l(&c.page_breaks),
            collapses: l(&c.collapses),
            copied_bytes: l(&c.copied_bytes),
            spurious: l(&c.spurious),
            failures: l(&c.failures),
            handle_ns: l(&c.handle_ns),
        }
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("the copy-on-write fault thread panicked");
            }
        }
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    uffd: &Userfaultfd,
    slots: &Weak<SlotTable>,
    space: &Weak<AddressSpace>,
    stop: &AtomicBool,
    counters: &Counters,
    on_error: &dyn Fn(String),
) {
    let mut events = Vec::with_capacity(MAX_EVENTS_PER_READ);
    while !stop.load(Ordering::Acquire) {
        match uffd.poll(Some(POLL)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                log::error!("copy-on-write thread: poll: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        }
        events.clear();
        if let Err(e) = uffd.read_events(&mut events, MAX_EVENTS_PER_READ) {
            log::error!("copy-on-write thread: read: {e}");
            continue;
        }
        let (Some(slots), Some(space)) = (slots.upgrade(), space.upgrade()) else {
            return;
        };
        for ev in &events {
            let t0 = Instant::now();
            let Some(page) = ev.page().filter(|_| ev.is_wp()) else {
                log::warn!("copy-on-write thread: unexpected event {ev:?}");
                continue;
            };
            counters.events.fetch_add(1, Ordering::Relaxed);
            handle(uffd, &slots, &space, page, counters, on_error, ev);
            counters
                .handle_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// `space.break_cow_page(gpa)`, its time logged at trace level.
fn timed_break(
    space: &AddressSpace,
    gpa: u64,
) -> Result<crate::mm::pma::PageBreak, crate::mm::MmError> {
    let t = Instant::now();
    let r = space.break_cow_page(gpa);
    log::trace!("break_cow_page({gpa:#x}) took {:?}", t.elapsed());
    r
}

fn handle(
    uffd: &Userfaultfd,
    slots: &SlotTable,
    space: &AddressSpace,
    page: u64,
    counters: &Counters,
    on_error: &dyn Fn(String),
    ev: &Event,
) {
    match slots.gpa_of_host(page) {
        None => log::warn!("copy-on-write thread: event outside the reservation: {ev:?}"),
        Some(gpa) => match timed_break(space, gpa) {
            Ok(b) if b.cow_copied + b.cow_taken_over > 0 => {
                counters.page_breaks.fetch_add(1, Ordering::Relaxed);
                counters
                    .copied_bytes
                    .fetch_add(b.cow_copied, Ordering::Relaxed);
                if b.collapsed {
                    counters.collapses.fetch_add(1, Ordering::Relaxed);
                }
                log::trace!("copy-on-write break at {gpa:#x}: {b:?}");
            }
            Ok(_) => {
                counters.spurious.fetch_add(1, Ordering::Relaxed);
            }
            Err(crate::mm::MmError::Fault(f)) if f.is_guest_violation() => {
                // No longer writable or mapped: the vCPU retries and takes
                // the ordinary exit path.
                counters.spurious.fetch_add(1, Ordering::Relaxed);
                log::debug!("copy-on-write event at {gpa:#x}: {f}");
            }
            Err(e) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                on_error(format!("breaking copy-on-write at {gpa:#x}: {e}"));
            }
        },
    }
    // Whatever happened, the writer must retry (breaks wake it already).
    if let Err(e) = uffd.wake(page, UFFD_PAGE_SIZE) {
        log::error!("copy-on-write thread: wake {page:#x}: {e}");
    }
}
