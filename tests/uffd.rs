//! userfaultfd write-protect mode on a memfd mapped `MAP_SHARED` twice (as
//! guestmm maps its memory file: the guest's reservation and the file's
//! internal mapping). No KVM needed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use guestmm::uffd::{Event, Features, RegisterMode, UffdError, Userfaultfd, UFFD_PAGE_SIZE};

const PAGE: u64 = UFFD_PAGE_SIZE;

/// The tests count this process's threads and descriptors: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A write-protect capable userfaultfd, or `None` (said once, past the
/// harness's capture) when this host has none.
fn uffd_or_skip() -> Option<Userfaultfd> {
    static SAID: std::sync::Once = std::sync::Once::new();
    match Userfaultfd::open_shmem_wp() {
        Ok(u) => Some(u),
        Err(e) if e.is_unavailable() => {
            SAID.call_once(|| {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "skipping uffd tests: {e}");
            });
            None
        }
        Err(e) => panic!("opening userfaultfd: {e}"),
    }
}

/// A memfd of `pages` pages mapped shared twice: `a` (to register) and `b`.
struct Twice {
    fd: libc::c_int,
    len: usize,
    a: u64,
    b: u64,
}

impl Twice {
    fn new(pages: u64) -> Twice {
        let len = (pages * PAGE) as usize;
        // SAFETY: plain syscalls on fresh objects; results checked.
        unsafe {
            let fd = libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let map = || {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                p as u64
            };
            Twice {
                fd,
                len,
                a: map(),
                b: map(),
            }
        }
    }

    fn read(addr: u64) -> u64 {
        // SAFETY: callers pass an address inside a live mapping of `self`.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    }

    fn write(addr: u64, v: u64) {
        // SAFETY: as for `read`.
        unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
    }
}

impl Drop for Twice {
    fn drop(&mut self) {
        if thread::panicking() {
            // A failed test may leave a writer blocked in here: unmapping
            // would turn its wake-up into a SIGSEGV of the whole binary.
            return;
        }
        // SAFETY: unmapping our own mappings and closing our own fd.
        unsafe {
            libc::munmap(self.a as *mut _, self.len);
            libc::munmap(self.b as *mut _, self.len);
            libc::close(self.fd);
        }
    }
}

/// A thread that writes `v` at `addr` and raises `done`.
fn writer(addr: u64, v: u64) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let h = thread::spawn(move || {
        Twice::write(addr, v);
        d.store(true, Ordering::SeqCst);
    });
    (done, h)
}

fn next_event(u: &Userfaultfd) -> Event {
    assert!(
        u.poll(Some(Duration::from_secs(10))).unwrap(),
        "no userfaultfd event within 10 s"
    );
    u.read_event()
        .unwrap()
        .expect("poll said an event is pending")
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).unwrap().count()
}

#[test]
fn handshake_offers_shmem_write_protection() {
    let _g = serial();
    let Some(u) = uffd_or_skip() else { return };
    assert!(u.features().contains(Features::SHMEM_WP));
    assert!(u.offered().contains(Features::WP_HUGETLBFS_SHMEM));
    let t = Twice::new(1);
    let ioctls = u.register(t.a, PAGE, RegisterMode::WP).unwrap();
    assert!(ioctls.writeprotect() && ioctls.wake(), "{ioctls:?}");
    // Bad input is a typed error, not a kernel EINVAL.
    assert!(matches!(
        u.write_protect(t.a + 1, PAGE),
        Err(UffdError::BadRange { .. })
    ));
    assert!(matches!(u.wake(t.a, 0), Err(UffdError::BadRange { .. })));
}

#[test]
fn write_to_protected_page_blocks_until_unprotected_other_mapping_unaffected() {
    let _g = serial();
    let Some(u) = uffd_or_skip() else { return };
    let t = Twice::new(4);
    Twice::write(t.a + PAGE, 0x11);
    u.register(t.a, 4 * PAGE, RegisterMode::WP).unwrap();
    u.write_protect(t.a + PAGE, PAGE).unwrap();
    // Reads of the protected page do not fault.
    assert_eq!(Twice::read(t.a + PAGE), 0x11);

    let (done, h) = writer(t.a + PAGE + 8, 0x22);
    let ev = next_event(&u);
    match ev {
        Event::Pagefault {
            address, write, wp, ..
        } => {
            assert_eq!(address, t.a + PAGE, "page-aligned faulting address");
            assert!(write && wp, "{ev:?}");
        }
        Event::Other { .. } => panic!("{ev:?}"),
    }
    thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "the write went through a WP'd page"
    );
    // The other mapping of the same page reads and writes freely.
    assert_eq!(Twice::read(t.b + PAGE), 0x11);
    Twice::write(t.b + PAGE + 16, 0x33);
    assert_eq!(Twice::read(t.a + PAGE + 16), 0x33);
    // Unprotected pages of the registered mapping too.
    Twice::write(t.a + 2 * PAGE, 0x44);

    u.unprotect(t.a + PAGE, PAGE, true).unwrap();
    h.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(Twice::read(t.b + PAGE + 8), 0x22);
    assert!(
        !u.poll(Some(Duration::from_millis(20))).unwrap(),
        "a second event"
    );
}

#[test]
fn one_write_among_many_protected_pages_gives_one_event_for_that_page() {
    let _g = serial();
    let Some(u) = uffd_or_skip() else { return };
    let pages = 64;
    let t = Twice::new(pages);
    for p in 0..pages {
        Twice::write(t.a + p * PAGE, p);
    }
    u.register(t.a, pages * PAGE, RegisterMode::WP).unwrap();
    u.write_protect(t.a, pages * PAGE).unwrap();

    let target = t.a + 37 * PAGE;
    let (_done, h) = writer(target + 0x100, 0xdead);
    assert_eq!(next_event(&u).page(), Some(target));
    // Nothing else queued while the writer waits.
    assert_eq!(u.read_event().unwrap(), None);
    u.unprotect(target, PAGE, true).unwrap();
    h.join().unwrap();
    assert!(!u.poll(Some(Duration::from_millis(20))).unwrap());
    assert_eq!(Twice::read(t.b + 37 * PAGE + 0x100), 0xdead);
    // Its neighbours are still protected: a write to page 38 faults.
    let (_done, h) = writer(target + PAGE, 1);
    assert_eq!(next_event(&u).page(), Some(target + PAGE));
    u.unprotect(t.a, pages * PAGE, true).unwrap();
    h.join().unwrap();
    for p in 0..pages {
        let want = match p {
            37 => 37,
            38 => 1,
            _ => p,
        };
        assert_eq!(Twice::read(t.b + p * PAGE), want, "page {p}");
    }
}

#[test]
fn dontwake_unprotect_leaves_the_writer_asleep_until_wake() {
    let _g = serial();
    let Some(u) = uffd_or_skip() else { return };
    let t = Twice::new(2);
    Twice::write(t.a, 1);
    u.register(t.a, 2 * PAGE, RegisterMode::WP).unwrap();
    u.write_protect(t.a, 2 * PAGE).unwrap();
    let (done, h) = writer(t.a, 2);
    assert!(next_event(&u).is_wp());
    u.unprotect(t.a, PAGE, false).unwrap();
    thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "DONTWAKE woke the writer");
    u.wake(t.a, PAGE).unwrap();
    h.join().unwrap();
    assert_eq!(Twice::read(t.b), 2);
}

#[test]
fn an_unpopulated_shmem_page_is_protected_too() {
    let _g = serial();
    let Some(u) = uffd_or_skip() else { return };
    let t = Twice::new(2);
    u.register(t.a, 2 * PAGE, RegisterMode::WP).unwrap();
    // An unpopulated page is protected too (shmem keeps a pte marker): a
    // first write through `a` faults with WP set.
    u.write_protect(t.a, 2 * PAGE).unwrap();
    let (_d, h) = writer(t.a + PAGE, 5);
    assert!(next_event(&u).is_wp());
    u.unprotect(t.a + PAGE, PAGE, true).unwrap();
    h.join().unwrap();
    assert_eq!(Twice::read(t.b + PAGE), 5);
}

#[test]
fn dropping_the_userfaultfd_wakes_writers_and_leaks_no_fd() {
    let _g = serial();
    let Some(probe) = uffd_or_skip() else { return };
    drop(probe);
    // (Threads: the wrapper starts none, and every writer is joined below.
    // The process's task count is not compared: the test harness starts
    // threads for other tests meanwhile.)
    let fds = count_dir("/proc/self/fd");
    let t = Twice::new(8);
    for _ in 0..3 {
        let u = Userfaultfd::open_shmem_wp().unwrap();
        u.register(t.a, 8 * PAGE, RegisterMode::WP).unwrap();
        u.write_protect(t.a, 8 * PAGE).unwrap();
        let (done, h) = writer(t.a + 3 * PAGE, 9);
        assert_eq!(next_event(&u).page(), Some(t.a + 3 * PAGE));
        assert!(!done.load(Ordering::SeqCst));
        // Closing releases the registration and the protection.
        drop(u);
        let t0 = Instant::now();
        h.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(Twice::read(t.b + 3 * PAGE), 9);
        // And the range is plain memory again.
        Twice::write(t.a + 4 * PAGE, 10);
    }
    drop(t);
    assert_eq!(count_dir("/proc/self/fd"), fds, "descriptors leaked");
}

#[test]
fn remapping_a_copy_over_a_protected_page_and_waking_completes_the_write_there() {
    let _g = serial();
    let Some(u) = uffd_or_skip() else { return };
    // Pages 0..4 are the "template" (mapped at `a`), 4..8 spare copies.
    let t = Twice::new(8);
    for p in 0..4 {
        Twice::write(t.b + p * PAGE, 0x100 + p);
    }
    let len = 4 * PAGE;
    u.register(t.a, len, RegisterMode::WP).unwrap();
    u.write_protect(t.a, len).unwrap();
    let (done, h) = writer(t.a + 2 * PAGE + 8, 0xbeef);
    assert_eq!(next_event(&u).page(), Some(t.a + 2 * PAGE));
    // SAFETY: page 6 is a spare page of the memfd; the MAP_FIXED target is
    // page 2 of `a`, which only this test uses.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (t.b + 2 * PAGE) as *const u8,
            (t.b + 6 * PAGE) as *mut u8,
            PAGE as usize,
        );
        let p = libc::mmap(
            (t.a + 2 * PAGE) as *mut _,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            t.fd,
            (6 * PAGE) as libc::off_t,
        );
        assert_eq!(p as u64, t.a + 2 * PAGE);
    }
    assert!(
        !done.load(Ordering::SeqCst),
        "remapping alone woke the writer"
    );
    // Waiters are found by address even though the new vma is not registered.
    u.wake(t.a + 2 * PAGE, PAGE).unwrap();
    h.join().unwrap();
    assert_eq!(
        Twice::read(t.b + 6 * PAGE + 8),
        0xbeef,
        "the write landed in the copy"
    );
    assert_eq!(Twice::read(t.b + 6 * PAGE), 0x102, "the copy kept the page");
    assert_eq!(
        Twice::read(t.b + 2 * PAGE + 8),
        0,
        "the template is untouched"
    );
    // Page 3 is still registered and protected.
    let (_d, h) = writer(t.a + 3 * PAGE, 1);
    assert_eq!(next_event(&u).page(), Some(t.a + 3 * PAGE));
    // A range that spans the unregistered copy is refused as a whole
    // (ENOENT): callers unprotect registered runs only.
    match u.unprotect(t.a, len, true) {
        Err(UffdError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::ENOENT)),
        r => panic!("{r:?}"),
    }
    u.unprotect(t.a + 3 * PAGE, PAGE, true).unwrap();
    h.join().unwrap();
}

/// A missing-mode userfaultfd (no feature needed), or `None` (said once).
fn missing_uffd_or_skip() -> Option<Userfaultfd> {
    match Userfaultfd::open(Features::empty()) {
        Ok(u) => Some(u),
        Err(e) if e.is_unavailable() => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipping uffd missing-mode test: {e}");
            None
        }
        Err(e) => panic!("opening userfaultfd: {e}"),
    }
}

/// A private anonymous mapping of `pages` pages, unmapped on drop.
struct Anon {
    addr: u64,
    len: usize,
}

impl Anon {
    fn new(pages: u64) -> Anon {
        let len = (pages * PAGE) as usize;
        // SAFETY: a fresh anonymous mapping; result checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Anon {
            addr: p as u64,
            len,
        }
    }

    fn read(addr: u64) -> u64 {
        // SAFETY: callers read inside a live mapping of this test.
        unsafe { std::ptr::read_volatile(addr as *const u64) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

#[test]
fn missing_mode_copy_and_zeropage_fill_pages_and_wake_the_faulter() {
    let _g = serial();
    let Some(u) = missing_uffd_or_skip() else {
        return;
    };
    let m = Anon::new(8);
    let ioctls = u.register(m.addr, 8 * PAGE, RegisterMode::MISSING).unwrap();
    assert!(ioctls.copy() && ioctls.zeropage(), "ioctls {ioctls:?}");

    // A reader faults on page 3 and blocks until it is filled.
    let addr = m.addr + 3 * PAGE + 8;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let reader = thread::spawn(move || {
        let v = Anon::read(addr);
        d.store(true, Ordering::SeqCst);
        v
    });
    let ev = next_event(&u);
    assert_eq!(ev.page(), Some(m.addr + 3 * PAGE));
    assert!(
        !done.load(Ordering::SeqCst),
        "the reader ran before the fill"
    );
    let mut src = vec![0u8; 2 * PAGE as usize];
    for (i, w) in src.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(0xabc0_0000 + i as u64).to_ne_bytes());
    }
    // Pages 2 and 3: both missing, both filled, the reader woken.
    assert_eq!(u.copy(m.addr + 2 * PAGE, &src).unwrap(), 2 * PAGE);
    assert_eq!(reader.join().unwrap(), 0xabc0_0000 + 512 + 1);
    assert_eq!(Anon::read(m.addr + 2 * PAGE), 0xabc0_0000);

    // Zero pages 4..6; page 5 read back as zero without an event.
    assert_eq!(u.zeropage(m.addr + 4 * PAGE, 2 * PAGE).unwrap(), 2 * PAGE);
    assert_eq!(Anon::read(m.addr + 5 * PAGE + 16), 0);

    // A copy over 1..4 stops at present page 2: one page filled.
    let three = vec![7u8; 3 * PAGE as usize];
    assert_eq!(u.copy(m.addr + PAGE, &three).unwrap(), PAGE);
    assert_eq!(Anon::read(m.addr + PAGE), 0x0707_0707_0707_0707);
    assert_eq!(
        Anon::read(m.addr + 2 * PAGE),
        0xabc0_0000,
        "present page kept"
    );
    // Onto a present page: nothing filled.
    assert_eq!(u.zeropage(m.addr + 4 * PAGE, PAGE).unwrap(), 0);
    assert!(u.read_event().unwrap().is_none(), "no stray event");

    // Bad input is a typed error, not a call.
    assert!(matches!(
        u.copy(m.addr + 1, &src),
        Err(UffdError::BadRange { .. })
    ));
    assert!(matches!(
        u.copy(m.addr, &src[..100]),
        Err(UffdError::BadRange { .. })
    ));
    assert!(matches!(
        u.zeropage(m.addr, 0),
        Err(UffdError::BadRange { .. })
    ));
    u.unregister(m.addr, 8 * PAGE).unwrap();
}
