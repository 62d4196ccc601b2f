//! Does KVM respect userfaultfd write protection on memfd memory in a
//! *writable* memslot? (issue 12's building block.)
//!
//! A minimal VM of its own (kvm-ioctls, `vmm::boot` for long mode at
//! CPL3): the boot region in an anonymous slot, 2 MiB of RAM in a writable
//! slot backed by a memfd mapped `MAP_SHARED` twice: `a` is the slot's and
//! is registered with userfaultfd in WP mode, `b` is a second mapping (as
//! guestmm's memory file keeps one) that a handler reads and writes freely.
//!
//! The tests print what they measured (`cargo test --features vmm --test
//! kvm_uffd_wp -- --nocapture`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use guestmm::uffd::{Event, Features, RegisterMode, Userfaultfd, UFFD_PAGE_SIZE};
use guestmm::vmm::boot::{BootLayout, EntryArgs, BOOT_SIZE, CODE_GPA, DEFAULT_RAM_BASE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const PAGE: u64 = UFFD_PAGE_SIZE;
const RAM_GPA: u64 = DEFAULT_RAM_BASE;
const RAM_SIZE: u64 = 2 << 20;
/// The memfd: RAM's pages, then as many spare pages for private copies.
const FILE_SIZE: u64 = 2 * RAM_SIZE;
/// The port every snippet ends with (`out 0x10, al`).
const DONE_PORT: u16 = 0x10;

/// `L: mov [rdi], rax; add rdi, 0x1000; dec rcx; jnz L; out 0x10, al`:
/// writes `rax` to the first qword of `rcx` consecutive pages from `rdi`.
const WRITE_PAGES: &[u8] = &[
    0x48, 0x89, 0x07, // mov [rdi], rax
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0x48, 0xff, 0xc9, // dec rcx
    0x75, 0xf1, // jnz L
    0xe6, 0x10, // out 0x10, al
];
/// `rcx` times: `lock xadd` +1 on the qword at `rdi`; a `lock cmpxchg`
/// loop +1 on `rdi+8`; an `xchg` spinlock at `rdi+16` around a plain `inc`
/// of `rdi+24`; then `out 0x10, al`. Assembled from:
///
/// ```text
/// L: mov eax, 1 ; lock xadd [rdi], rax
/// C: mov rax, [rdi+8] ; lea rdx, [rax+1] ; lock cmpxchg [rdi+8], rdx ; jnz C
/// S: pause ; mov eax, 1 ; xchg [rdi+16], rax ; test rax, rax ; jnz S
///    inc qword [rdi+24] ; mov qword [rdi+16], 0
///    dec rcx ; jnz L ; out 0x10, al
/// ```
const LOCKED_LOOP: &[u8] = &[
    0xb8, 0x01, 0x00, 0x00, 0x00, 0xf0, 0x48, 0x0f, 0xc1, 0x07, 0x48, 0x8b, 0x47, 0x08, 0x48, 0x8d,
    0x50, 0x01, 0xf0, 0x48, 0x0f, 0xb1, 0x57, 0x08, 0x75, 0xf0, 0xf3, 0x90, 0xb8, 0x01, 0x00, 0x00,
    0x00, 0x48, 0x87, 0x47, 0x10, 0x48, 0x85, 0xc0, 0x75, 0xf0, 0x48, 0xff, 0x47, 0x18, 0x48, 0xc7,
    0x47, 0x10, 0x00, 0x00, 0x00, 0x00, 0x48, 0xff, 0xc9, 0x75, 0xc5, 0xe6, 0x10,
];
const LOCKED_OFFSET: u64 = 0x100;

/// KVM tests in this binary share one machine's cores: one at a time, so
/// the timings mean something.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn uffd_or_skip() -> Option<Userfaultfd> {
    match Userfaultfd::open(Features::SHMEM_WP.union(Features::THREAD_ID)) {
        Ok(u) => Some(u),
        Err(e) if e.is_unavailable() => {
            eprintln!("skipping: userfaultfd write protection unavailable ({e})");
            None
        }
        Err(e) => panic!("opening userfaultfd: {e}"),
    }
}

/// A VM with the boot region and a uffd-registered RAM slot.
struct Machine {
    vm: VmFd,
    boot: u64,
    memfd: libc::c_int,
    /// RAM as the slot maps it (registered with userfaultfd).
    a: u64,
    /// The whole memfd (RAM, then spare pages) through a second shared mapping.
    b: u64,
}

fn mmap(len: u64, flags: libc::c_int, fd: libc::c_int) -> u64 {
    // SAFETY: a fresh mapping the kernel places; result checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p as u64
}

fn read(addr: u64) -> u64 {
    // SAFETY: callers pass addresses inside a Machine's live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write(addr: u64, v: u64) {
    // SAFETY: as for `read`.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
}

impl Machine {
    fn new(kvm: Kvm, vcpus: u32) -> (Machine, Vec<VcpuFd>) {
        let layout = BootLayout::new(RAM_GPA, RAM_SIZE, vcpus).unwrap();
        let vm = kvm.create_vm().unwrap();
        let boot = mmap(BOOT_SIZE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
        let mut code = WRITE_PAGES.to_vec();
        code.resize(LOCKED_OFFSET as usize, 0xcc);
        code.extend_from_slice(LOCKED_LOOP);
        for (gpa, bytes) in layout.boot_image(&code).unwrap() {
            // SAFETY: the boot image lies inside the boot region we mapped.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), (boot + gpa) as *mut u8, bytes.len())
            };
        }
        // SAFETY: plain syscalls; results checked.
        let memfd = unsafe { libc::memfd_create(c"kvm-uffd-wp".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(memfd >= 0);
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::ftruncate(memfd, FILE_SIZE as libc::off_t) },
            0
        );
        let a = mmap(RAM_SIZE, libc::MAP_SHARED, memfd);
        let b = mmap(FILE_SIZE, libc::MAP_SHARED, memfd);
        for (slot, gpa, size, host) in [(0, 0, BOOT_SIZE, boot), (1, RAM_GPA, RAM_SIZE, a)] {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0, // writable: protection comes from userfaultfd alone
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: the host ranges stay mapped while the slots exist:
            // Machine's Drop deletes the slots before unmapping them.
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        let mut vcpu_fds = Vec::new();
        for i in 0..vcpus {
            let v = vm.create_vcpu(u64::from(i)).unwrap();
            layout
                .setup_vcpu(&v, &kvm, i, &EntryArgs::default())
                .unwrap();
            vcpu_fds.push(v);
        }
        let m = Machine {
            vm,
            boot,
            memfd,
            a,
            b,
        };
        (m, vcpu_fds)
    }

    /// Points a vCPU (set up by `new`) at a snippet with its arguments.
    /// Only general registers: KVM refuses `KVM_SET_CPUID2` after a run.
    fn start(&self, vcpu: &VcpuFd, code_offset: u64, rdi: u64, rcx: u64, rax: u64) {
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE_GPA + code_offset;
        regs.rdi = rdi;
        regs.rcx = rcx;
        regs.rax = rax;
        vcpu.set_regs(&regs).unwrap();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Remove the slots before unmapping what they point at.
        for slot in 0..2 {
            let region = kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: deleting a slot (size 0) maps nothing.
            let _ = unsafe { self.vm.set_user_memory_region(region) };
        }
        // SAFETY: our own mappings and fd.
        unsafe {
            libc::munmap(self.boot as *mut _, BOOT_SIZE as usize);
            libc::munmap(self.a as *mut _, RAM_SIZE as usize);
            libc::munmap(self.b as *mut _, FILE_SIZE as usize);
            libc::close(self.memfd);
        }
    }
}

/// Runs until the snippet's `out 0x10`; anything else is returned as text.
fn run_to_done(vcpu: &mut VcpuFd) -> Result<(), String> {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => return Ok(()),
            Ok(exit) => return Err(format!("unexpected exit {exit:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
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

/// How many of this process's vmas overlap `[start, end)`.
fn vmas_in(start: u64, end: u64) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let r = l.split_whitespace().next().unwrap();
            let (s, e) = r.split_once('-').unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            s < end && start < e
        })
        .count()
}

/// The faulting thread's kernel stack (root only), for the record.
fn kernel_stack(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stack"))
        .map(|s| {
            s.lines()
                .map(|l| l.split_whitespace().nth(1).unwrap_or(l))
                .take(12)
                .collect::<Vec<_>>()
                .join(" <- ")
        })
        .unwrap_or_else(|e| format!("(no stack: {e})"))
}

/// One guest write to a write-protected page: where the vCPU is while the
/// handler holds the protection, and whether the write lands after.
fn one_blocked_write(m: &Machine, u: &Userfaultfd, vcpu: &mut VcpuFd, page: u64, label: &str) {
    let old = read(m.b + page * PAGE);
    let new = old ^ 0x5a5a_0000_0000_0001;
    u.write_protect(m.a + page * PAGE, PAGE).unwrap();
    m.start(vcpu, 0, RAM_GPA + page * PAGE, 1, new);
    let finished = AtomicBool::new(false);
    let hold = Duration::from_millis(100);
    let (outcome, handler) = thread::scope(|s| {
        let handler = s.spawn(|| {
            let got = u.poll(Some(Duration::from_secs(10))).unwrap();
            let ev = if got { u.read_event().unwrap() } else { None };
            let stack = match ev {
                Some(Event::Pagefault { thread_id, .. }) => kernel_stack(thread_id),
                _ => String::new(),
            };
            thread::sleep(hold);
            let done_while_held = finished.load(Ordering::SeqCst);
            let value_while_held = read(m.b + page * PAGE);
            // Release whatever happened, so a stuck vCPU cannot hang the test.
            u.unprotect(m.a + page * PAGE, PAGE, true).unwrap();
            (ev, stack, done_while_held, value_while_held)
        });
        let t0 = Instant::now();
        let r = run_to_done(vcpu);
        finished.store(true, Ordering::SeqCst);
        ((r, t0.elapsed()), handler.join().unwrap())
    });
    let ((result, took), (ev, stack, done_while_held, value_while_held)) = (outcome, handler);
    eprintln!(
        "kvm uffd-wp [{label}]: KVM_RUN -> {result:?} after {took:?}; event {ev:?}; \
         vCPU finished while held: {done_while_held}; vCPU kernel stack: {stack}"
    );
    result.expect("KVM_RUN");
    let ev = ev.expect("no userfaultfd event within 10 s: KVM wrote through the WP'd page or hung");
    match ev {
        Event::Pagefault {
            address, write, wp, ..
        } => {
            assert_eq!(address, m.a + page * PAGE, "faulting host address");
            assert!(write && wp, "{ev:?}");
        }
        Event::Other { .. } => panic!("{ev:?}"),
    }
    assert!(!done_while_held, "the vCPU ran past a write-protected page");
    assert_eq!(
        value_while_held, old,
        "the guest's write landed while protected"
    );
    assert!(
        took >= hold,
        "KVM_RUN returned before the protection was lifted"
    );
    assert_eq!(
        read(m.b + page * PAGE),
        new,
        "the guest's write did not land"
    );
}

#[test]
fn guest_write_to_a_write_protected_page_blocks_in_kvm_until_unprotected() {
    let _g = serial();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let Some(u) = uffd_or_skip() else { return };
    let (m, mut vcpus) = Machine::new(kvm, 1);
    u.register(m.a, RAM_SIZE, RegisterMode::WP).unwrap();
    let vcpu = &mut vcpus[0];

    // Host-populated page that KVM never mapped.
    write(m.b + PAGE, 0x11);
    one_blocked_write(&m, &u, vcpu, 1, "host-populated, not yet mapped by KVM");

    // A page KVM already maps writable: protecting it must zap KVM's mapping.
    m.start(vcpu, 0, RAM_GPA, 1, 0x33);
    run_to_done(vcpu).unwrap();
    assert_eq!(read(m.b), 0x33);
    one_blocked_write(&m, &u, vcpu, 0, "already mapped writable by KVM");

    // Unpopulated shmem page (pte marker): the guest's first touch is a write.
    one_blocked_write(&m, &u, vcpu, 7, "never populated");

    // And protecting the same page again after the guest wrote it.
    one_blocked_write(&m, &u, vcpu, 0, "re-protected after a guest write");
}

/// Breaks copy-on-write for the page at `page_addr` (in `a`, RAM page
/// `page`) the way guestmm would: copy the shared page into a spare file
/// page through `b`, map that over the protected page (`MAP_FIXED`: a new
/// vma, not registered with userfaultfd) and wake the writers.
fn break_cow(m: &Machine, u: &Userfaultfd, page: u64) {
    let copy = RAM_SIZE / PAGE + page;
    // SAFETY: both pages lie inside `b`; the copy target is a spare page
    // nothing else uses; the MAP_FIXED target is one page of `a`, which
    // only the slot and this test use.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (m.b + page * PAGE) as *const u8,
            (m.b + copy * PAGE) as *mut u8,
            PAGE as usize,
        );
        let p = libc::mmap(
            (m.a + page * PAGE) as *mut _,
            PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            m.memfd,
            (copy * PAGE) as libc::off_t,
        );
        assert_eq!(
            p as u64,
            m.a + page * PAGE,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    // The waiters are found by address, registered or not.
    u.wake(m.a + page * PAGE, PAGE).unwrap();
}

#[test]
fn copy_on_write_break_by_remapping_the_page_under_a_blocked_vcpu() {
    let _g = serial();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let Some(u) = uffd_or_skip() else { return };
    let (m, mut vcpus) = Machine::new(kvm, 1);
    let vcpu = &mut vcpus[0];
    // A "template" of 8 pages with a pattern, written by the guest once
    // (so KVM maps it writable), then write-protected.
    const T: u64 = 32;
    for p in T..T + 8 {
        for q in 0..PAGE / 8 {
            write(m.b + p * PAGE + q * 8, p << 32 | q);
        }
    }
    u.register(m.a, RAM_SIZE, RegisterMode::WP).unwrap();
    m.start(vcpu, 0, RAM_GPA + T * PAGE, 8, 0);
    run_to_done(vcpu).unwrap();
    for p in T..T + 8 {
        write(m.b + p * PAGE, p << 32);
    }
    u.write_protect(m.a + T * PAGE, 8 * PAGE).unwrap();

    let mut breaks = Vec::new();
    for (i, p) in [T + 3, T + 4, T].into_iter().enumerate() {
        let v = 0xc0ffee00 + i as u64;
        m.start(vcpu, 0, RAM_GPA + p * PAGE, 1, v);
        let (r, took) = thread::scope(|s| {
            let h = s.spawn(|| {
                let ev = next_event(&u);
                assert!(ev.is_wp(), "{ev:?}");
                assert_eq!(ev.page(), Some(m.a + p * PAGE));
                let t = Instant::now();
                break_cow(&m, &u, p);
                t.elapsed()
            });
            let r = run_to_done(vcpu);
            (r, h.join().unwrap())
        });
        r.unwrap();
        breaks.push(took);
        let copy = RAM_SIZE / PAGE + p;
        assert_eq!(read(m.b + copy * PAGE), v, "the write landed in the copy");
        assert_eq!(
            read(m.b + copy * PAGE + 8),
            p << 32 | 1,
            "the copy kept the rest"
        );
        assert_eq!(
            read(m.b + p * PAGE),
            p << 32,
            "the template page is untouched"
        );
        // The copy is an ordinary writable page now: no event.
        m.start(vcpu, 0, RAM_GPA + p * PAGE, 1, v + 1);
        run_to_done(vcpu).unwrap();
        assert_eq!(read(m.b + copy * PAGE), v + 1);
        assert!(!u.poll(Some(Duration::ZERO)).unwrap());
    }
    // The neighbours kept their registration and protection across the
    // vma splits: a write to T+5 still faults.
    let p = T + 5;
    m.start(vcpu, 0, RAM_GPA + p * PAGE, 1, 5);
    thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(next_event(&u).page(), Some(m.a + p * PAGE));
            u.unprotect(m.a + p * PAGE, PAGE, true).unwrap();
        });
        run_to_done(vcpu).unwrap();
    });
    assert_eq!(read(m.b + p * PAGE), 5);
    let vmas = vmas_in(m.a, m.a + RAM_SIZE);
    eprintln!(
        "kvm uffd-wp copy-on-write break (copy 4 KiB, MAP_FIXED the copy, wake): handler {:?} per break; \
         RAM's host range is now {vmas} vmas (3 pages broken, 2 of them adjacent)",
        breaks
    );
    assert!(vmas <= 1 + 2 * 3, "{vmas} vmas");
}

/// A handler thread: unprotects (and wakes) every faulting page until
/// `stop`; returns (events, WP events, time spent in unprotect). It sleeps
/// in `poll` between events, or with `spin` keeps reading (non-blocking).
/// `gaps` gets the time between consecutive event arrivals.
fn serve(
    u: &Userfaultfd,
    stop: &AtomicBool,
    pages: &Mutex<Vec<u64>>,
    spin: bool,
    gaps: &mut Vec<Duration>,
) -> (u64, u64, Duration) {
    let (mut n, mut wp, mut ioctl) = (0, 0, Duration::ZERO);
    let mut evs = Vec::new();
    let mut last: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        if !spin && !u.poll(Some(Duration::from_millis(5))).unwrap() {
            continue;
        }
        evs.clear();
        if u.read_events(&mut evs, 16).unwrap() == 0 {
            continue;
        }
        let now = Instant::now();
        if let Some(prev) = last.replace(now) {
            // One full round trip: release, the writer resumes, writes the
            // next page, faults, and its event arrives.
            gaps.push(now - prev);
        }
        for ev in &evs {
            n += 1;
            wp += u64::from(ev.is_wp());
            let page = ev.page().unwrap();
            pages.lock().unwrap().push(page);
            let t = Instant::now();
            u.unprotect(page, PAGE, true).unwrap();
            ioctl += t.elapsed();
        }
    }
    (n, wp, ioctl)
}

#[test]
fn write_protect_fault_round_trip_cost() {
    let _g = serial();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let Some(u) = uffd_or_skip() else { return };
    let (m, mut vcpus) = Machine::new(kvm, 1);
    u.register(m.a, RAM_SIZE, RegisterMode::WP).unwrap();
    let vcpu = &mut vcpus[0];
    const K: u64 = 256;
    const FIRST: u64 = 16;
    let base = m.a + FIRST * PAGE;
    for p in 0..K {
        write(base + p * PAGE, p);
    }
    let mut guest_pass = |v: u64| {
        m.start(vcpu, 0, RAM_GPA + FIRST * PAGE, K, v);
        let t = Instant::now();
        run_to_done(vcpu).unwrap();
        t.elapsed()
    };
    let cold = guest_pass(1);
    let warm = guest_pass(2);

    let mut rounds = Vec::new();
    for round in 0..6u64 {
        let spin = round >= 3;
        u.write_protect(base, K * PAGE).unwrap();
        let stop = AtomicBool::new(false);
        let pages = Mutex::new(Vec::new());
        let v = 100 + round;
        let mut gaps = Vec::new();
        let (took, (n, wp, ioctl)) = thread::scope(|s| {
            let h = s.spawn(|| serve(&u, &stop, &pages, spin, &mut gaps));
            let took = guest_pass(v);
            stop.store(true, Ordering::SeqCst);
            (took, h.join().unwrap())
        });
        let mut pages = pages.into_inner().unwrap();
        assert_eq!(n, K, "one event per protected page");
        assert_eq!(wp, K, "all of them write-protect faults");
        pages.sort_unstable();
        pages.dedup();
        assert_eq!(pages.len() as u64, K, "each page faulted once");
        for p in 0..K {
            assert_eq!(read(m.b + (FIRST + p) * PAGE), v, "page {p}");
        }
        gaps.sort_unstable();
        rounds.push((took, ioctl, spin, gaps));
    }

    // The same round trip for a plain host thread, for comparison.
    u.write_protect(base, K * PAGE).unwrap();
    let stop = AtomicBool::new(false);
    let pages = Mutex::new(Vec::new());
    let host = thread::scope(|s| {
        let h = s.spawn(|| serve(&u, &stop, &pages, false, &mut Vec::new()));
        let t = Instant::now();
        for p in 0..K {
            write(base + p * PAGE, 7);
        }
        let took = t.elapsed();
        stop.store(true, Ordering::SeqCst);
        assert_eq!(h.join().unwrap().0, K);
        took
    });

    let per = |d: Duration| d.as_secs_f64() * 1e6 / K as f64;
    eprintln!(
        "kvm uffd-wp round trip, {K} pages, one write each: guest pass cold (KVM maps each page) \
         {:.1} us/page, warm (no faults) {:.2} us/page",
        per(cold),
        per(warm)
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for (i, (took, ioctl, spin, gaps)) in rounds.iter().enumerate() {
        eprintln!(
            "  round {i} (handler {}): {K} WP events, guest pass {:.1} us/page, minus warm {:.1} us/event, \
             UFFDIO_WRITEPROTECT(unprotect+wake) {:.1} us/event; event-to-event min {:.1} median {:.1} p90 {:.1} us",
            if *spin { "spins on read" } else { "sleeps in poll" },
            per(*took),
            per(took.saturating_sub(warm)),
            per(*ioctl),
            us(gaps[0]),
            us(gaps[gaps.len() / 2]),
            us(gaps[gaps.len() * 9 / 10]),
        );
    }
    eprintln!(
        "  host thread writer, same {K} WP'd pages: {:.1} us/event",
        per(host)
    );
    let best = rounds.iter().map(|r| r.0).min().unwrap();
    assert!(best > warm, "write-protect faults cost nothing?");
}

#[test]
fn locked_instructions_of_several_vcpus_on_a_repeatedly_protected_page_keep_exact_sums() {
    let _g = serial();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let Some(u) = uffd_or_skip() else { return };
    let (m, mut vcpus) = Machine::new(kvm, 4);
    u.register(m.a, RAM_SIZE, RegisterMode::WP).unwrap();
    const COUNTER_PAGE: u64 = 300;
    const N: u64 = 100_000;
    const ROUNDS: usize = 20;
    let counter = m.a + COUNTER_PAGE * PAGE;
    for nv in [2usize, 4] {
        let (mut events, mut mid, mut reprotects, mut ok) = (0u64, 0u64, 0u64, 0usize);
        let t0 = Instant::now();
        for round in 0..ROUNDS {
            // Populated and mapped by KVM from earlier rounds (or by this
            // host write), then protected before the vCPUs start: every
            // vCPU's first xadd faults, they all resume on the release.
            for q in 0..4 {
                write(m.b + COUNTER_PAGE * PAGE + q * 8, 0);
            }
            u.write_protect(counter, PAGE).unwrap();
            let stop = AtomicBool::new(false);
            let handled = AtomicU64::new(0);
            let handled_mid = AtomicU64::new(0);
            let protects = AtomicU64::new(0);
            thread::scope(|s| {
                s.spawn(|| {
                    // Release on every event; re-protect every 300 us while
                    // the vCPUs run, so protection comes and goes mid-loop.
                    let mut last = Instant::now();
                    let mut evs = Vec::new();
                    // Set by a re-protection, cleared by a release: events
                    // seen while set are faults in the middle of the loops.
                    let mut reprotected = false;
                    while !stop.load(Ordering::SeqCst) {
                        if u.poll(Some(Duration::from_micros(200))).unwrap() {
                            evs.clear();
                            let n = u.read_events(&mut evs, 16).unwrap();
                            handled.fetch_add(n as u64, Ordering::Relaxed);
                            if reprotected && n > 0 {
                                handled_mid.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            u.unprotect(counter, PAGE, true).unwrap();
                            reprotected = false;
                        }
                        if last.elapsed() > Duration::from_micros(300) {
                            u.write_protect(counter, PAGE).unwrap();
                            protects.fetch_add(1, Ordering::Relaxed);
                            reprotected = true;
                            last = Instant::now();
                        }
                    }
                    u.unprotect(counter, PAGE, true).unwrap();
                });
                let runners: Vec<_> = vcpus[..nv]
                    .iter_mut()
                    .map(|vcpu| {
                        m.start(vcpu, LOCKED_OFFSET, RAM_GPA + COUNTER_PAGE * PAGE, N, 0);
                        s.spawn(move || run_to_done(vcpu))
                    })
                    .collect();
                for r in runners {
                    r.join().unwrap().expect("KVM_RUN");
                }
                stop.store(true, Ordering::SeqCst);
            });
            let c = m.b + COUNTER_PAGE * PAGE;
            let sums = [read(c), read(c + 8), read(c + 24)];
            let lock = read(c + 16);
            events += handled.into_inner();
            mid += handled_mid.into_inner();
            reprotects += protects.into_inner();
            if sums == [nv as u64 * N; 3] && lock == 0 {
                ok += 1;
            } else {
                eprintln!(
                    "round {round}: {nv} vCPUs x {N}: xadd/cmpxchg/xchg-locked sums {sums:?} \
                     lock {lock}, want {} each",
                    nv as u64 * N
                );
            }
        }
        eprintln!(
            "kvm uffd-wp locked ops (lock xadd, lock cmpxchg, xchg spinlock): {nv} vCPUs x {N} \
             on a WP'd page, re-protected every 300 us: exact sums in {ok} of {ROUNDS} runs; \
             {events} WP events ({mid} after a re-protection), {reprotects} re-protections, {:?}",
            t0.elapsed()
        );
        assert_eq!(ok, ROUNDS, "a locked update was lost");
        assert!(
            events >= ROUNDS as u64,
            "the vCPUs never faulted at the start"
        );
        assert!(mid > 0, "no vCPU faulted on a re-protection mid-loop");
    }
}

#[test]
fn copy_on_write_break_under_four_vcpus_doing_locked_ops_keeps_exact_sums() {
    let _g = serial();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let Some(u) = uffd_or_skip() else { return };
    let nv = 4;
    let (m, mut vcpus) = Machine::new(kvm, nv);
    u.register(m.a, RAM_SIZE, RegisterMode::WP).unwrap();
    const N: u64 = 50_000;
    const ROUNDS: u64 = 20;
    let mut wakes = 0;
    for round in 0..ROUNDS {
        // A fresh template page each round, shown to the vCPUs write-
        // protected: every vCPU's first locked op blocks. The handler lets
        // them pile up (all 4 events, or 20 ms), then breaks copy-on-write
        // under them and wakes them all at once.
        let p = 400 + round;
        let t = m.b + p * PAGE;
        for q in 0..PAGE / 8 {
            write(t + q * 8, if q < 4 { 0 } else { q });
        }
        u.write_protect(m.a + p * PAGE, PAGE).unwrap();
        let stop = AtomicBool::new(false);
        let n = thread::scope(|s| {
            let h = s.spawn(|| {
                let (mut broken, mut n, mut first) = (false, 0, None);
                while !stop.load(Ordering::SeqCst) {
                    if u.poll(Some(Duration::from_millis(1))).unwrap() {
                        while let Some(ev) = u.read_event().unwrap() {
                            assert_eq!(ev.page(), Some(m.a + p * PAGE));
                            assert!(!broken, "a fault after the break: {ev:?}");
                            n += 1;
                            first.get_or_insert_with(Instant::now);
                        }
                    }
                    let waited =
                        first.is_some_and(|t: Instant| t.elapsed() > Duration::from_millis(20));
                    if !broken && (n == nv || waited) {
                        break_cow(&m, &u, p);
                        broken = true;
                    }
                }
                n
            });
            let runners: Vec<_> = vcpus
                .iter_mut()
                .map(|vcpu| {
                    m.start(vcpu, LOCKED_OFFSET, RAM_GPA + p * PAGE, N, 0);
                    s.spawn(move || run_to_done(vcpu))
                })
                .collect();
            for r in runners {
                r.join().unwrap().expect("KVM_RUN");
            }
            stop.store(true, Ordering::SeqCst);
            h.join().unwrap()
        });
        wakes += n;
        let c = m.b + (RAM_SIZE / PAGE + p) * PAGE;
        let want = u64::from(nv) * N;
        assert_eq!(
            [read(c), read(c + 8), read(c + 16), read(c + 24)],
            [want, want, 0, want],
            "round {round}: xadd, cmpxchg, lock, xchg-locked sums in the copy"
        );
        assert_eq!(read(c + 32), 4, "the copy kept the template's contents");
        assert_eq!(read(t), 0, "the template was written");
        assert!(n >= 1, "round {round}: no WP event");
    }
    eprintln!(
        "kvm uffd-wp copy-on-write break under {nv} vCPUs x {N} locked ops: exact sums in \
         {ROUNDS} of {ROUNDS} runs, {wakes} WP events"
    );
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// guestmm's slot changes in `CowMode::UserfaultfdWp` rely on this: a
/// signal to a vCPU thread blocked inside `KVM_RUN` on a write-protected
/// page ends the blocked fault, and `KVM_RUN` returns `EINTR` (KVM's page
/// faults are interruptible), so the run gate can get every vCPU out before
/// a memslot deletion waits for KVM's SRCU readers.
#[test]
fn a_signal_ends_kvm_run_blocked_on_a_write_protected_page() {
    let _g = serial();
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let Some(u) = uffd_or_skip() else { return };
    let signal = libc::SIGRTMIN() + 5;
    // SAFETY: a handler that does nothing, for a real-time signal no one
    // else in this test binary uses.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as *const () as usize;
        assert_eq!(libc::sigaction(signal, &sa, std::ptr::null_mut()), 0);
    }
    let (m, mut vcpus) = Machine::new(kvm, 1);
    u.register(m.a, RAM_SIZE, RegisterMode::WP).unwrap();
    u.write_protect(m.a, PAGE).unwrap();
    let mut vcpu = vcpus.remove(0);
    m.start(&vcpu, 0, RAM_GPA, 1, 0x77);
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() } as u64).unwrap();
        let first = vcpu.run().map(|e| format!("{e:?}")).map_err(|e| e.errno());
        tx.send(first.err().map_or(0, |e| e as u64)).unwrap();
        vcpu
    });
    let thread = rx.recv().unwrap();
    let ev = next_event(&u);
    assert!(ev.is_wp(), "{ev:?}");
    let t = Instant::now();
    // SAFETY: the thread is alive (it has not sent its result yet).
    assert_eq!(
        unsafe { libc::pthread_kill(thread as libc::pthread_t, signal) },
        0
    );
    let got = rx.recv_timeout(Duration::from_secs(2));
    let took = t.elapsed();
    // Release it whatever happened.
    u.unprotect(m.a, PAGE, true).unwrap();
    let got = got.unwrap_or_else(|_| rx.recv().unwrap());
    let mut vcpu = handle.join().unwrap();
    assert_eq!(
        got,
        libc::EINTR as u64,
        "KVM_RUN blocked on a write-protected page did not end with EINTR on a signal (errno {got}, after {took:?})"
    );
    eprintln!("signal to a vCPU blocked on a write-protected page: EINTR after {took:?}");
    // The write was not done; it is once the vCPU runs again.
    assert_ne!(read(m.b), 0x77);
    run_to_done(&mut vcpu).unwrap();
    assert_eq!(read(m.b), 0x77);
}
