//! Differential test of the mm core against a real Linux process.
//!
//! Seeded random step sequences run side by side on guestmm (an
//! [`AddressSpace`] with the `RecordingBackend`, plus a fork of it) and on
//! Linux (a reserved range of this test process, plus a forked child process
//! that runs the same calls on its copy): maps (private anonymous, shared
//! anonymous, a memfd / [`SharedMemory`] object mapped shared or private),
//! unmaps, protects, `MADV_DONTNEED` (`decommit`), hole punches
//! (`fallocate(PUNCH_HOLE)` and `MADV_REMOVE` / `SharedMemory::decommit`),
//! `ftruncate` / `SharedMemory::truncate`, fork and the child's exit, host
//! reads and writes (`process_vm_readv`/`process_vm_writev` against our own
//! pid or the child's / `read`/`write`), forced ones (`/proc/<pid>/mem`,
//! which forces like ptrace / `IoOpts::FORCE`), `MADV_POPULATE_READ`/`_WRITE`
//! / `populate`, and guest touches (the same
//! Linux calls / `handle_fault` and then the page the backend installed, as
//! KVM would).
//!
//! After every step, every page of the window in every live space is read on
//! both sides (`process_vm_readv`, which never faults the test process, and
//! `AddressSpace::read`) and must agree on accessibility and contents;
//! `check_invariants` runs on every space and `check_file_refs` over all of
//! them. A failure names the seed and step and lists a shrunk sequence that
//! still fails;
//! `MM_ORACLE_SEED=<n>` replays one seed, `MM_ORACLE_SEEDS=<n>` runs more
//! seeds, `MM_ORACLE_STEPS=<n>` changes the step count.
//!
//! # Intended differences (not bugs; the steps avoid or normalise them)
//!
//! 1. **Typed errors instead of signals.** An access past the end of a
//!    truncated object is `FileError::BeyondEnd` (host I/O) or
//!    `FaultError::Bus` (guest) in guestmm and `SIGBUS` on Linux
//!    (`EFAULT` through `process_vm_*`); an access the protection forbids is
//!    `MmError::Permission` / `FaultError::Permission` instead of `SIGSEGV`.
//!    The test compares "accessible or not".
//! 2. **Unmapped and `PROT_NONE` look alike here.** guestmm says which
//!    (`NotMapped` vs `Permission`); the Linux side keeps its range reserved
//!    with `PROT_NONE` shared mappings of an empty memfd (which even forced
//!    accesses cannot reach), so only accessibility is compared.
//! 3. **Host I/O is all or nothing.** `read_with`/`write_with`/`zero` check
//!    the whole range first and change nothing on error; `process_vm_readv`
//!    stops at the first inaccessible page and returns a short count. The
//!    test expects "guestmm error" exactly when Linux is short. `populate`
//!    is all or nothing too, while `MADV_POPULATE_WRITE` copies the
//!    private pages before the failing one (which then stop following their
//!    object), so a refused write populate is not replayed on Linux.
//! 4. **Forced host writes.** `IoOpts::FORCE` writes read-only guest memory,
//!    shared mappings of writable objects included (a VMM loads images);
//!    Linux's `FOLL_FORCE` refuses non-writable shared mappings. A shared
//!    mapping of an object that cannot be written (a read-only `HostFile`)
//!    is refused even forced. Both force through `PROT_NONE` and read-only
//!    private mappings alike; the test skips forced writes to read-only
//!    shared pages.
//! 5. **Whole-range checks.** `protect` and `decommit` over a range with an
//!    unmapped hole fail with `NotMapped` and change nothing; Linux returns
//!    `ENOMEM` after changing the mapped part before the hole. `map` of
//!    object offsets past the object's current end fails with
//!    `BadObjectRange`; Linux maps them (and faults `SIGBUS`).
//!    `SharedMemory::decommit` past the object's end fails with
//!    `BeyondEnd`; `fallocate` there does nothing. Permissions with write
//!    but without read are refused. The Linux side skips what guestmm
//!    refused; the test asserts the refusal is one of these.
//! 6. **Populating is eager.** A fault populates a fault-around window and
//!    a host access populates what it touches; Linux populates pages one by
//!    one. Contents are the same either way.
//! 7. **A guest write fault breaks copy-on-write for its whole fault-around
//!    window** (until copy-on-write becomes page granular). For private
//!    anonymous memory that is invisible; for a private mapping of an object, the
//!    window's other pages become private copies at once and stop showing
//!    later writes to the object through other mappings, where Linux copies
//!    only the written page (POSIX leaves it unspecified). Host writes break
//!    copy-on-write only on the pages they write. Even seeds run with
//!    one-page windows and compare everything; odd seeds use 4-page windows
//!    and skip guest writes to private object mappings.

mod common;
use common::rng::Rng;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::Instant;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{
    check_file_refs, AddressSpace, AddressSpaceOptions, FaultError, FileError, IoOpts, MapOpts,
    MmError, RecordingBackend, SharedMemory,
};
use guestmm::{Access, Perms, Range};

const PS: u64 = 4096;
/// Pages in the compared window.
const PAGES: u64 = 24;
/// Guest-physical start of the window.
const BASE: u64 = 1 << 30;
/// Named objects (memfds / `SharedMemory`), and their largest size in pages.
const OBJS: usize = 2;
const OBJ_MAX_PAGES: u64 = 16;
const SEEDS: u64 = 16;
const STEPS: usize = 400;

// ------------------------------------------------------------ the steps ---

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AnonPrivate,
    AnonShared,
    /// Object `obj` from page `page` on, shared or private.
    Object {
        obj: usize,
        page: u64,
        shared: bool,
    },
}

/// One step; page numbers are window pages, `space` 0 is the parent and 1
/// the fork (steps on a missing fork are skipped on both sides).
#[derive(Debug, Clone, Copy)]
enum Step {
    Map {
        space: usize,
        kind: Kind,
        start: u64,
        pages: u64,
        perms: Perms,
    },
    Unmap {
        space: usize,
        start: u64,
        pages: u64,
    },
    Protect {
        space: usize,
        start: u64,
        pages: u64,
        perms: Perms,
    },
    Decommit {
        space: usize,
        start: u64,
        pages: u64,
    },
    PunchHole {
        obj: usize,
        page: u64,
        pages: u64,
    },
    Truncate {
        obj: usize,
        pages: u64,
    },
    Fork,
    DropFork,
    /// A host read of `len` bytes at window byte offset `at` (may span
    /// pages).
    HostRead {
        space: usize,
        at: u64,
        len: u64,
    },
    /// A host write inside one page.
    HostWrite {
        space: usize,
        at: u64,
        len: u64,
        byte: u8,
    },
    /// A host write inside one page that ignores guest protections
    /// (`IoOpts::FORCE` / a write to `/proc/<pid>/mem`, which forces).
    ForcedWrite {
        space: usize,
        at: u64,
        len: u64,
        byte: u8,
    },
    /// A forced host read (may span pages).
    ForcedRead {
        space: usize,
        at: u64,
        len: u64,
    },
    /// `MADV_REMOVE` over shared object mappings /
    /// `SharedMemory::decommit` of the object pages they show.
    Remove {
        space: usize,
        start: u64,
        pages: u64,
    },
    /// `populate` / `MADV_POPULATE_READ` or `_WRITE`.
    Populate {
        space: usize,
        start: u64,
        pages: u64,
        write: bool,
    },
    /// A guest access inside one page.
    Guest {
        space: usize,
        at: u64,
        len: u64,
        write: bool,
        byte: u8,
    },
}

const PERMS: [Perms; 3] = [Perms::NONE, Perms::READ, Perms::READ_WRITE];

fn random_step(rng: &mut Rng) -> Step {
    let space = if rng.chance(35) { 1 } else { 0 };
    let start = rng.below(PAGES);
    let pages = rng.range(1, (PAGES - start).min(8));
    let at = rng.below(PAGES * PS);
    let in_page = |rng: &mut Rng| rng.range(1, PS - at % PS);
    // Protect and decommit must hit mapped pages only: short ranges.
    let short = rng.range(1, (PAGES - start).min(3));
    match rng.below(100) {
        0..=21 => {
            let kind = match rng.below(4) {
                0 => Kind::AnonPrivate,
                1 => Kind::AnonShared,
                _ => {
                    let page = rng.below(OBJ_MAX_PAGES);
                    Kind::Object {
                        obj: rng.below(OBJS as u64) as usize,
                        page,
                        shared: rng.chance(50),
                    }
                }
            };
            let pages = match kind {
                Kind::Object { page, .. } => pages.min(OBJ_MAX_PAGES - page),
                _ => pages,
            };
            let perms = if rng.chance(70) {
                Perms::READ_WRITE
            } else {
                rng.pick(&PERMS)
            };
            Step::Map {
                space,
                kind,
                start,
                pages,
                perms,
            }
        }
        22..=25 => Step::Unmap {
            space,
            start,
            pages,
        },
        26..=33 => Step::Protect {
            space,
            start,
            pages: short,
            perms: rng.pick(&PERMS),
        },
        34..=40 => Step::Decommit {
            space,
            start,
            pages: short,
        },
        41..=44 => {
            let page = rng.below(OBJ_MAX_PAGES);
            Step::PunchHole {
                obj: rng.below(OBJS as u64) as usize,
                page,
                pages: rng.range(1, (OBJ_MAX_PAGES - page).min(4)),
            }
        }
        45..=49 => Step::Truncate {
            obj: rng.below(OBJS as u64) as usize,
            // Often back to full size, so maps of the object keep fitting.
            pages: if rng.chance(40) {
                OBJ_MAX_PAGES
            } else {
                rng.below(OBJ_MAX_PAGES + 1)
            },
        },
        50..=53 => Step::Fork,
        54..=55 => Step::DropFork,
        56..=65 => Step::HostRead {
            space,
            at,
            len: rng.range(1, 3 * PS).min(PAGES * PS - at),
        },
        66..=72 => Step::HostWrite {
            space,
            at,
            len: in_page(rng),
            byte: rng.next() as u8,
        },
        73..=75 => Step::ForcedWrite {
            space,
            at,
            len: in_page(rng),
            byte: rng.next() as u8,
        },
        76..=77 => Step::ForcedRead {
            space,
            at,
            len: rng.range(1, 3 * PS).min(PAGES * PS - at),
        },
        78..=80 => Step::Remove {
            space,
            start,
            pages: short,
        },
        81..=84 => Step::Populate {
            space,
            start,
            pages,
            write: rng.chance(50),
        },
        _ => Step::Guest {
            space,
            at,
            len: in_page(rng),
            write: rng.chance(50),
            byte: rng.next() as u8,
        },
    }
}

// ---------------------------------------------------------- Linux side ---

/// A system call for a space: run in this process, or sent to the child.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Call {
    op: u64,
    addr: u64,
    len: u64,
    prot: u64,
    flags: u64,
    fd: i64,
    off: u64,
}

const OP_MMAP: u64 = 1;
const OP_MPROTECT: u64 = 2;
const OP_MADVISE: u64 = 3;

fn errno() -> i64 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64
}

/// Runs `c`: 0 or `-errno`. Allocates nothing (the forked child runs it).
fn run_call(c: &Call) -> i64 {
    // SAFETY: the calls only change the test's own reserved window (the
    // caller builds `addr`/`len` inside it), which nothing else touches.
    let r = unsafe {
        match c.op {
            OP_MMAP => {
                let p = libc::mmap(
                    c.addr as *mut libc::c_void,
                    c.len as usize,
                    c.prot as i32,
                    c.flags as i32,
                    c.fd as i32,
                    c.off as libc::off_t,
                );
                if p == libc::MAP_FAILED {
                    -1
                } else {
                    0
                }
            }
            OP_MPROTECT => {
                libc::mprotect(c.addr as *mut libc::c_void, c.len as usize, c.prot as i32)
            }
            OP_MADVISE => libc::madvise(c.addr as *mut libc::c_void, c.len as usize, c.prot as i32),
            _ => -1,
        }
    };
    if r == 0 {
        0
    } else {
        -errno().max(1)
    }
}

/// The forked child: runs calls read from `cmd` and answers on `res` until
/// the pipe closes. Async-signal-safe: no allocation, no locks.
fn child_loop(cmd: RawFd, res: RawFd) -> ! {
    loop {
        let mut c = Call::default();
        let size = std::mem::size_of::<Call>();
        // SAFETY: reads into a local plain-data struct of `size` bytes.
        let n = unsafe { libc::read(cmd, &mut c as *mut Call as *mut libc::c_void, size) };
        if n != size as isize {
            // SAFETY: exiting the child without running the parent's atexit
            // handlers or destructors.
            unsafe { libc::_exit(0) };
        }
        let r = run_call(&c);
        // SAFETY: writes a local i64.
        unsafe { libc::write(res, &r as *const i64 as *const libc::c_void, 8) };
    }
}

struct Child {
    pid: libc::pid_t,
    cmd: OwnedFd,
    res: OwnedFd,
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: our own child; reaping it.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The Linux side: a reserved window in this process, the memfds, and
/// maybe a forked child.
struct Linux {
    window: u64,
    memfds: Vec<OwnedFd>,
    /// An empty memfd behind the placeholders of unmapped pages.
    hole: OwnedFd,
    child: Option<Child>,
}

impl Linux {
    fn new() -> Linux {
        let memfd = |name: &str, pages: u64| {
            let name = std::ffi::CString::new(name).unwrap();
            // SAFETY: a valid C string; the fd is ours.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: plain ftruncate of our memfd.
            assert_eq!(
                unsafe { libc::ftruncate(fd.as_raw_fd(), (pages * PS) as i64) },
                0
            );
            fd
        };
        // "Unmapped" pages are a shared PROT_NONE mapping of an empty
        // memfd: the range stays reserved, and even forced accesses fail
        // (reads are past the file's end, writes to a shared mapping
        // without write are refused).
        let hole = memfd("oracle-hole", 0);
        // SAFETY: a fresh reservation; only this test uses it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (PAGES * PS) as usize,
                libc::PROT_NONE,
                libc::MAP_SHARED,
                hole.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "reserving the window");
        let memfds = (0..OBJS)
            .map(|i| memfd(&format!("oracle-{i}"), OBJ_MAX_PAGES))
            .collect();
        Linux {
            window: p as u64,
            memfds,
            hole,
            child: None,
        }
    }

    fn addr(&self, page: u64) -> u64 {
        self.window + page * PS
    }

    fn pid(&self, space: usize) -> libc::pid_t {
        match space {
            // SAFETY: getpid has no preconditions.
            0 => unsafe { libc::getpid() },
            _ => self.child.as_ref().expect("live child").pid,
        }
    }

    fn call(&self, space: usize, c: Call) -> i64 {
        if space == 0 {
            return run_call(&c);
        }
        let child = self.child.as_ref().expect("live child");
        let size = std::mem::size_of::<Call>();
        // SAFETY: writes/reads plain data over our own pipes.
        unsafe {
            assert_eq!(
                libc::write(
                    child.cmd.as_raw_fd(),
                    &c as *const Call as *const libc::c_void,
                    size
                ),
                size as isize
            );
            let mut r = 0i64;
            assert_eq!(
                libc::read(
                    child.res.as_raw_fd(),
                    &mut r as *mut i64 as *mut libc::c_void,
                    8
                ),
                8
            );
            r
        }
    }

    fn placeholder(&self, space: usize, start: u64, pages: u64) -> i64 {
        self.call(
            space,
            Call {
                op: OP_MMAP,
                addr: self.addr(start),
                len: pages * PS,
                prot: libc::PROT_NONE as u64,
                flags: (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                fd: self.hole.as_raw_fd() as i64,
                off: 0,
            },
        )
    }

    fn fork(&mut self) {
        assert!(self.child.is_none());
        let (cmd_r, cmd_w) = pipe();
        let (res_r, res_w) = pipe();
        // SAFETY: the child only runs `child_loop` (async-signal-safe calls)
        // and `_exit`s; the parent keeps running normally.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: die with the parent rather than linger.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            child_loop(cmd_r.as_raw_fd(), res_w.as_raw_fd());
        }
        self.child = Some(Child {
            pid,
            cmd: cmd_w,
            res: res_r,
        });
    }

    /// Reads `buf.len()` bytes at window byte `at` of `space`; returns how
    /// many were read (short at the first inaccessible page).
    fn read(&self, space: usize, at: u64, buf: &mut [u8]) -> usize {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: (self.window + at) as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the local iovec is our buffer; the remote one is read by
        // the kernel, which reports inaccessible pages instead of faulting.
        let n = unsafe { libc::process_vm_readv(self.pid(space), &local, 1, &remote, 1, 0) };
        n.max(0) as usize
    }

    fn write(&self, space: usize, at: u64, buf: &[u8]) -> usize {
        let local = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: (self.window + at) as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: as in `read`; the kernel writes the remote range or stops.
        let n = unsafe { libc::process_vm_writev(self.pid(space), &local, 1, &remote, 1, 0) };
        n.max(0) as usize
    }
}

impl Linux {
    /// `/proc/<pid>/mem` of `space`: its reads and writes force (like
    /// ptrace), stopping at the first page they cannot reach.
    fn proc_mem(&self, space: usize) -> std::fs::File {
        let path = format!("/proc/{}/mem", self.pid(space));
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {path}: {e}"))
    }

    fn forced_read(&self, space: usize, at: u64, buf: &mut [u8]) -> usize {
        use std::os::unix::fs::FileExt;
        let mem = self.proc_mem(space);
        let mut done = 0;
        while done < buf.len() {
            match mem.read_at(&mut buf[done..], self.window + at + done as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }

    fn forced_write(&self, space: usize, at: u64, buf: &[u8]) -> usize {
        use std::os::unix::fs::FileExt;
        self.proc_mem(space)
            .write_at(buf, self.window + at)
            .unwrap_or(0)
    }
}

impl Drop for Linux {
    fn drop(&mut self) {
        self.child = None;
        // SAFETY: our own reservation.
        unsafe { libc::munmap(self.window as *mut libc::c_void, (PAGES * PS) as usize) };
    }
}

// -------------------------------------------------------- guestmm side ---

struct Space {
    be: Arc<RecordingBackend>,
    space: Arc<AddressSpace>,
}

struct Guestmm {
    mf: Arc<MemoryFile>,
    spaces: [Option<Space>; 2],
    objs: Vec<Arc<SharedMemory>>,
    /// Objects made for shared anonymous maps (alive while mapped).
    anon: Vec<Weak<SharedMemory>>,
}

impl Guestmm {
    /// A fresh side whose faults populate windows of `window` pages (more
    /// than one grow to four times that for sequential faults).
    fn new(window: u64) -> Guestmm {
        let mf = Arc::new(MemoryFile::new("oracle", MemoryFileOptions::default()).unwrap());
        let be = Arc::new(RecordingBackend::new());
        let opts = AddressSpaceOptions {
            size: BASE + PAGES * PS,
            map_floor: BASE,
            fault_around: window * PS,
            // One-page windows stay one page (difference 7).
            fault_around_max: if window == 1 { PS } else { 4 * window * PS },
            ..AddressSpaceOptions::default()
        };
        let space = AddressSpace::new(mf.clone(), be.clone(), opts).unwrap();
        let objs = (0..OBJS)
            .map(|_| SharedMemory::new(mf.clone(), OBJ_MAX_PAGES * PS).unwrap())
            .collect();
        Guestmm {
            mf,
            spaces: [Some(Space { be, space }), None],
            objs,
            anon: Vec::new(),
        }
    }

    fn sp(&self, i: usize) -> &Space {
        self.spaces[i].as_ref().expect("live space")
    }

    fn check(&mut self) -> Result<(), String> {
        self.anon.retain(|w| w.strong_count() > 0);
        let spaces: Vec<&AddressSpace> = self.spaces.iter().flatten().map(|s| &*s.space).collect();
        for (i, s) in spaces.iter().enumerate() {
            s.check_invariants()
                .map_err(|e| format!("space {i}: {e}"))?;
        }
        let anon: Vec<Arc<SharedMemory>> = self.anon.iter().filter_map(Weak::upgrade).collect();
        let objs: Vec<&SharedMemory> = self.objs.iter().chain(&anon).map(|o| &**o).collect();
        check_file_refs(&self.mf, &spaces, &objs)
    }

    /// A guest access of `buf.len()` bytes at `gpa`, as KVM would make it:
    /// through what the backend installed, faulting first if that does not
    /// allow the access. False if the fault is refused (a violation).
    fn guest(&self, i: usize, gpa: u64, buf: &mut [u8], write: bool) -> Result<bool, String> {
        let s = self.sp(i);
        let access = if write { Access::Write } else { Access::Read };
        let usable = || {
            s.be.installed_at(gpa)
                .filter(|(_, inst)| !write || inst.writable)
        };
        if usable().is_none() {
            match s.space.handle_fault(gpa, access) {
                Ok(_) => {}
                Err(e) if e.is_guest_violation() => return Ok(false),
                Err(e) => return Err(format!("{access} fault at {gpa:#x}: {e}")),
            }
        }
        let (r, inst) = usable().ok_or_else(|| {
            format!("{access} fault at {gpa:#x} succeeded but installed nothing usable")
        })?;
        let off = (inst.file_offset + (gpa - r.start())) as i64;
        // SAFETY: the fd is the live MemoryFile's; `buf` is ours.
        let n = unsafe {
            if write {
                libc::pwrite(inst.fd, buf.as_ptr() as *const libc::c_void, buf.len(), off)
            } else {
                libc::pread(
                    inst.fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    off,
                )
            }
        };
        if n != buf.len() as isize {
            return Err(format!("guest {access} through fd {} failed", inst.fd));
        }
        Ok(true)
    }
}

/// True for the errors that mean "not accessible" (difference 1 and 2).
fn inaccessible(e: &MmError) -> bool {
    matches!(
        e,
        MmError::NotMapped { .. }
            | MmError::Permission { .. }
            | MmError::File(FileError::BeyondEnd { .. })
            | MmError::Fault(FaultError::Bus { .. })
    )
}

// ----------------------------------------------------------- the runner ---

/// What one page maps.
#[derive(Clone)]
struct PageState {
    /// The object and object page shown, if any.
    obj: Option<(Arc<SharedMemory>, u64)>,
    shared: bool,
    perms: Perms,
}

struct Pair {
    gm: Guestmm,
    lx: Linux,
    /// Faults populate more than one page (difference 7 applies).
    windowed: bool,
    /// What each page of each space maps (the test's own record, to pick
    /// steps that avoid intended differences).
    pages: [Vec<Option<PageState>>; 2],
    /// Outcomes seen, by name (coverage: printed, and some must occur).
    seen: std::collections::BTreeMap<&'static str, u64>,
}

fn prot(p: Perms) -> u64 {
    let mut v = 0;
    if p.read {
        v |= libc::PROT_READ;
    }
    if p.write {
        v |= libc::PROT_WRITE;
    }
    v as u64
}

impl Pair {
    fn live(&self, space: usize) -> bool {
        self.gm.spaces[space].is_some()
    }

    fn saw(&mut self, what: &'static str) {
        *self.seen.entry(what).or_default() += 1;
    }

    /// Applies `step` to both sides and compares what they answer.
    fn step(&mut self, step: Step) -> Result<(), String> {
        let gpa = |page: u64| BASE + page * PS;
        match step {
            Step::Map {
                space,
                kind,
                start,
                pages,
                perms,
            } if self.live(space) => {
                let len = pages * PS;
                let (opts, flags, fd, off) = match kind {
                    Kind::AnonPrivate => (
                        MapOpts::anonymous(len),
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    ),
                    Kind::AnonShared => {
                        // What a shared anonymous map creates, made here so
                        // the reference check can see it.
                        let obj = SharedMemory::new(self.gm.mf.clone(), len).unwrap();
                        self.gm.anon.push(Arc::downgrade(&obj));
                        (
                            MapOpts::object(obj, 0, len).shared(),
                            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    }
                    Kind::Object { obj, page, shared } => {
                        let o = MapOpts::object(self.gm.objs[obj].clone(), page * PS, len);
                        let fd = self.lx.memfds[obj].as_raw_fd() as i64;
                        if shared {
                            (o.shared(), libc::MAP_SHARED, fd, page * PS)
                        } else {
                            (o, libc::MAP_PRIVATE, fd, page * PS)
                        }
                    }
                };
                let got = self
                    .gm
                    .sp(space)
                    .space
                    .map(opts.perms(perms).fixed_replace(gpa(start)));
                match got {
                    Ok(_) => {
                        self.saw("map");
                        let (obj, shared) = match kind {
                            Kind::AnonPrivate => (None, false),
                            Kind::AnonShared => {
                                let o = self.gm.anon.last().and_then(Weak::upgrade);
                                (o.map(|o| (o, 0)), true)
                            }
                            Kind::Object { obj, page, shared } => {
                                (Some((self.gm.objs[obj].clone(), page)), shared)
                            }
                        };
                        for i in 0..pages {
                            self.pages[space][(start + i) as usize] = Some(PageState {
                                obj: obj.as_ref().map(|(o, p)| (o.clone(), p + i)),
                                shared,
                                perms,
                            });
                        }
                    }
                    // Difference 5: Linux would map past the end.
                    Err(MmError::BadObjectRange { .. }) => {
                        self.saw("map refused past the end");
                        return Ok(());
                    }
                    Err(e) => return Err(format!("map: {e}")),
                }
                let r = self.lx.call(
                    space,
                    Call {
                        op: OP_MMAP,
                        addr: self.lx.addr(start),
                        len,
                        prot: prot(perms),
                        flags: (flags | libc::MAP_FIXED) as u64,
                        fd,
                        off,
                    },
                );
                if r != 0 {
                    return Err(format!("Linux mmap failed ({r}) where guestmm mapped"));
                }
            }
            Step::Unmap {
                space,
                start,
                pages,
            } if self.live(space) => {
                self.gm
                    .sp(space)
                    .space
                    .unmap(gpa(start), pages * PS)
                    .map_err(|e| format!("unmap: {e}"))?;
                self.saw("unmap");
                self.pages[space][start as usize..(start + pages) as usize].fill(None);
                let r = self.lx.placeholder(space, start, pages);
                if r != 0 {
                    return Err(format!("Linux placeholder mmap failed ({r})"));
                }
            }
            Step::Protect {
                space,
                start,
                pages,
                perms,
            } if self.live(space) => {
                match self
                    .gm
                    .sp(space)
                    .space
                    .protect(gpa(start), pages * PS, perms)
                {
                    Ok(()) => {
                        self.saw("protect");
                        for p in &mut self.pages[space][start as usize..(start + pages) as usize] {
                            p.as_mut().expect("protect succeeded on mapped pages").perms = perms;
                        }
                    }
                    Err(MmError::NotMapped { .. }) => {
                        self.saw("protect refused over a hole");
                        return Ok(());
                    }
                    Err(e) => return Err(format!("protect: {e}")),
                }
                let r = self.lx.call(
                    space,
                    Call {
                        op: OP_MPROTECT,
                        addr: self.lx.addr(start),
                        len: pages * PS,
                        prot: prot(perms),
                        ..Call::default()
                    },
                );
                if r != 0 {
                    return Err(format!(
                        "Linux mprotect failed ({r}) where guestmm protected"
                    ));
                }
            }
            Step::Decommit {
                space,
                start,
                pages,
            } if self.live(space) => {
                match self.gm.sp(space).space.decommit(gpa(start), pages * PS) {
                    Ok(()) => self.saw("decommit"),
                    Err(MmError::NotMapped { .. }) => {
                        self.saw("decommit refused over a hole");
                        return Ok(());
                    }
                    Err(e) => return Err(format!("decommit: {e}")),
                }
                let r = self.lx.call(
                    space,
                    Call {
                        op: OP_MADVISE,
                        addr: self.lx.addr(start),
                        len: pages * PS,
                        prot: libc::MADV_DONTNEED as u64,
                        ..Call::default()
                    },
                );
                if r != 0 {
                    return Err(format!(
                        "Linux madvise failed ({r}) where guestmm decommitted"
                    ));
                }
            }
            Step::PunchHole { obj, page, pages } => {
                let range = Range::new(page * PS, (page + pages) * PS).unwrap();
                match self.gm.objs[obj].decommit(range) {
                    Ok(()) => self.saw("punch hole"),
                    Err(FileError::BeyondEnd { .. }) => {
                        self.saw("punch hole refused past the end");
                        return Ok(());
                    }
                    Err(e) => return Err(format!("object decommit: {e}")),
                }
                // SAFETY: a plain fallocate on our memfd.
                let r = unsafe {
                    libc::fallocate(
                        self.lx.memfds[obj].as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (page * PS) as i64,
                        (pages * PS) as i64,
                    )
                };
                if r != 0 {
                    return Err(format!("fallocate: {}", std::io::Error::last_os_error()));
                }
            }
            Step::Truncate { obj, pages } => {
                self.gm.objs[obj]
                    .truncate(pages * PS)
                    .map_err(|e| format!("truncate: {e}"))?;
                self.saw("truncate");
                // SAFETY: a plain ftruncate on our memfd.
                let r = unsafe {
                    libc::ftruncate(self.lx.memfds[obj].as_raw_fd(), (pages * PS) as i64)
                };
                if r != 0 {
                    return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
                }
            }
            Step::Fork if !self.live(1) => {
                let be = Arc::new(RecordingBackend::new());
                let space = self
                    .gm
                    .sp(0)
                    .space
                    .fork(be.clone())
                    .map_err(|e| format!("fork: {e}"))?;
                self.gm.spaces[1] = Some(Space { be, space });
                self.lx.fork();
                self.saw("fork");
                self.pages[1] = self.pages[0].clone();
            }
            Step::DropFork if self.live(1) => {
                self.gm.spaces[1] = None;
                self.lx.child = None;
                self.saw("drop fork");
                self.pages[1].fill(None);
            }
            Step::HostRead { space, at, len } if self.live(space) => {
                let mut a = vec![0u8; len as usize];
                let got = self.gm.sp(space).space.read(BASE + at, &mut a);
                let mut b = vec![0u8; len as usize];
                let n = self.lx.read(space, at, &mut b);
                match got {
                    Ok(()) if n == b.len() => {
                        self.saw("host read ok");
                        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
                            return Err(format!(
                                "host read at {:#x}: guestmm {:#04x}, Linux {:#04x}",
                                BASE + at + i as u64,
                                a[i],
                                b[i]
                            ));
                        }
                    }
                    Err(e) if n < b.len() && inaccessible(&e) => self.saw(if n > 0 {
                        "host read partly accessible"
                    } else {
                        "host read refused"
                    }),
                    other => {
                        return Err(format!(
                            "host read {len:#x} at {:#x}: guestmm {other:?}, Linux read {n:#x}",
                            BASE + at
                        ))
                    }
                }
            }
            Step::HostWrite {
                space,
                at,
                len,
                byte,
            } if self.live(space) => {
                let buf: Vec<u8> = (0..len).map(|i| byte ^ i as u8).collect();
                let got = self.gm.sp(space).space.write(BASE + at, &buf);
                let n = self.lx.write(space, at, &buf);
                match got {
                    Ok(()) if n == buf.len() => self.saw("host write ok"),
                    Err(e) if n == 0 && inaccessible(&e) => self.saw("host write refused"),
                    other => {
                        return Err(format!(
                            "host write {len:#x} at {:#x}: guestmm {other:?}, Linux wrote {n:#x}",
                            BASE + at
                        ))
                    }
                }
            }
            Step::ForcedWrite {
                space,
                at,
                len,
                byte,
            } if self.live(space) => {
                let page = &self.pages[space][(at / PS) as usize];
                if page.as_ref().is_some_and(|p| p.shared && !p.perms.write) {
                    // Difference 4: guestmm writes it, Linux refuses.
                    self.saw("forced write skipped: read-only shared");
                    return Ok(());
                }
                let buf: Vec<u8> = (0..len).map(|i| byte ^ i as u8).collect();
                let got = self
                    .gm
                    .sp(space)
                    .space
                    .write_with(BASE + at, &buf, IoOpts::FORCE);
                let n = self.lx.forced_write(space, at, &buf);
                match got {
                    Ok(()) if n == buf.len() => self.saw("forced write ok"),
                    Err(e) if n == 0 && inaccessible(&e) => self.saw("forced write refused"),
                    other => {
                        return Err(format!(
                            "forced write {len:#x} at {:#x}: guestmm {other:?}, Linux wrote {n:#x}",
                            BASE + at
                        ))
                    }
                }
            }
            Step::ForcedRead { space, at, len } if self.live(space) => {
                let mut a = vec![0u8; len as usize];
                let got = self
                    .gm
                    .sp(space)
                    .space
                    .read_with(BASE + at, &mut a, IoOpts::FORCE);
                let mut b = vec![0u8; len as usize];
                let n = self.lx.forced_read(space, at, &mut b);
                match got {
                    Ok(()) if n == b.len() && a == b => self.saw("forced read ok"),
                    Err(e) if n < b.len() && inaccessible(&e) => self.saw("forced read refused"),
                    other => {
                        return Err(format!(
                            "forced read {len:#x} at {:#x}: guestmm {other:?}, Linux read {n:#x}, same bytes {}",
                            BASE + at,
                            a == b
                        ))
                    }
                }
            }
            Step::Remove {
                space,
                start,
                pages,
            } if self.live(space) => {
                let range = start as usize..(start + pages) as usize;
                let targets: Option<Vec<(Arc<SharedMemory>, u64)>> = self.pages[space][range]
                    .iter()
                    .map(|p| match p {
                        Some(PageState {
                            obj: Some(o),
                            shared: true,
                            perms,
                        }) if perms.write => Some(o.clone()),
                        _ => None,
                    })
                    .collect();
                let Some(targets) = targets else {
                    // Linux refuses MADV_REMOVE elsewhere (EACCES/EINVAL).
                    self.saw("remove skipped: not shared writable");
                    return Ok(());
                };
                for (i, (obj, page)) in targets.into_iter().enumerate() {
                    let range = Range::new(page * PS, (page + 1) * PS).unwrap();
                    match obj.decommit(range) {
                        Ok(()) => self.saw("remove"),
                        Err(FileError::BeyondEnd { .. }) => {
                            self.saw("remove refused past the end");
                            continue;
                        }
                        Err(e) => return Err(format!("object decommit: {e}")),
                    }
                    let r = self.lx.call(
                        space,
                        Call {
                            op: OP_MADVISE,
                            addr: self.lx.addr(start + i as u64),
                            len: PS,
                            prot: libc::MADV_REMOVE as u64,
                            ..Call::default()
                        },
                    );
                    if r != 0 {
                        return Err(format!(
                            "Linux MADV_REMOVE failed ({r}) where guestmm decommitted"
                        ));
                    }
                }
            }
            Step::Populate {
                space,
                start,
                pages,
                write,
            } if self.live(space) => {
                let access = if write { Access::Write } else { Access::Read };
                let got = self
                    .gm
                    .sp(space)
                    .space
                    .populate(gpa(start), pages * PS, access);
                if write {
                    if let Err(e) = &got {
                        // Difference 3: Linux would copy the private pages
                        // before the failing one.
                        if !inaccessible(e) {
                            return Err(format!("populate: {e}"));
                        }
                        self.saw("populate write refused, not replayed");
                        return Ok(());
                    }
                }
                let advice = if write {
                    libc::MADV_POPULATE_WRITE
                } else {
                    libc::MADV_POPULATE_READ
                };
                let r = self.lx.call(
                    space,
                    Call {
                        op: OP_MADVISE,
                        addr: self.lx.addr(start),
                        len: pages * PS,
                        prot: advice as u64,
                        ..Call::default()
                    },
                );
                match got {
                    Ok(()) if r == 0 => self.saw("populate ok"),
                    Err(e) if r != 0 && inaccessible(&e) => self.saw("populate refused"),
                    other => {
                        return Err(format!(
                        "populate {access} of {pages} pages at {:#x}: guestmm {other:?}, Linux {r}",
                        gpa(start)
                    ))
                    }
                }
            }
            Step::Guest {
                space,
                at,
                len,
                write,
                byte,
            } if self.live(space) => {
                let page = &self.pages[space][(at / PS) as usize];
                let private_object = page.as_ref().is_some_and(|p| p.obj.is_some() && !p.shared);
                if write && self.windowed && private_object {
                    // Difference 7: the fault would copy its whole window.
                    self.saw("guest write skipped: window copy-on-write");
                    return Ok(());
                }
                let mut a: Vec<u8> = (0..len).map(|i| byte ^ i as u8).collect();
                let mut b = a.clone();
                let ok = self.gm.guest(space, BASE + at, &mut a, write)?;
                let n = if write {
                    self.lx.write(space, at, &b)
                } else {
                    self.lx.read(space, at, &mut b)
                };
                match (ok, n == b.len()) {
                    (true, true) if a == b => self.saw(if write { "guest write ok" } else { "guest read ok" }),
                    (false, false) if n == 0 => self.saw("guest access refused"),
                    _ => {
                        return Err(format!(
                            "guest {} {len:#x} at {:#x}: guestmm ok {ok}, Linux {n:#x} bytes, same bytes {}",
                            if write { "write" } else { "read" },
                            BASE + at,
                            a == b
                        ))
                    }
                }
            }
            _ => {} // a step on a missing fork, a second fork: skipped on both sides
        }
        Ok(())
    }

    /// Every page of every live space: same accessibility, same bytes.
    fn compare(&mut self) -> Result<(), String> {
        for space in 0..2 {
            if !self.live(space) {
                continue;
            }
            for page in 0..PAGES {
                let mut a = vec![0u8; PS as usize];
                let got = self.gm.sp(space).space.read(BASE + page * PS, &mut a);
                let mut b = vec![0u8; PS as usize];
                let n = self.lx.read(space, page * PS, &mut b);
                let where_ = format!("space {space} page {page} ({:#x})", BASE + page * PS);
                match got {
                    Ok(()) if n == b.len() => {
                        self.saw("page compared: accessible");
                        if a.iter().any(|&x| x != 0) {
                            self.saw("page compared: accessible, not all zeros");
                        }
                        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
                            return Err(format!(
                                "{where_}: byte {i:#x} is {:#04x} in guestmm, {:#04x} on Linux",
                                a[i], b[i]
                            ));
                        }
                    }
                    Ok(()) => return Err(format!("{where_}: readable in guestmm only")),
                    Err(e) if !inaccessible(&e) => {
                        return Err(format!("{where_}: unexpected guestmm error {e}"))
                    }
                    Err(e) if n == b.len() => {
                        return Err(format!("{where_}: readable on Linux only (guestmm: {e})"))
                    }
                    Err(_) => self.saw("page compared: inaccessible"),
                }
            }
        }
        Ok(())
    }
}

/// Runs `steps` on a fresh pair, adding outcomes to `seen`; on failure the
/// index of the failing step and what differed.
fn run_steps(
    steps: &[Step],
    window: u64,
    seen: &mut std::collections::BTreeMap<&'static str, u64>,
) -> Result<(), (usize, String)> {
    let mut pair = Pair {
        gm: Guestmm::new(window),
        lx: Linux::new(),
        windowed: window > 1,
        pages: [vec![None; PAGES as usize], vec![None; PAGES as usize]],
        seen: std::mem::take(seen),
    };
    for (i, &step) in steps.iter().enumerate() {
        let result = pair
            .step(step)
            .and_then(|()| pair.gm.check())
            .and_then(|()| pair.compare());
        if let Err(e) = result {
            *seen = std::mem::take(&mut pair.seen);
            return Err((i, e));
        }
    }
    *seen = std::mem::take(&mut pair.seen);
    // Everything is released when both sides are gone.
    let mf = pair.gm.mf.clone();
    drop(pair);
    if mf.allocated_bytes() != 0 {
        let e = format!("{} bytes still allocated at the end", mf.allocated_bytes());
        return Err((steps.len(), e));
    }
    Ok(())
}

/// Runs one seed (odd seeds with 4-page fault-around windows, even ones
/// with single pages); on failure the error names the step and lists a shrunk
/// sequence that still fails (greedily dropping single steps).
fn run_seed(
    seed: u64,
    steps: usize,
    seen: &mut std::collections::BTreeMap<&'static str, u64>,
) -> Result<(), String> {
    let mut rng = Rng(seed);
    let all: Vec<Step> = (0..steps).map(|_| random_step(&mut rng)).collect();
    let window = if seed % 2 == 1 { 4 } else { 1 };
    let Err((at, first)) = run_steps(&all, window, seen) else {
        return Ok(());
    };
    let mut kept: Vec<Step> = all[..=at.min(all.len() - 1)].to_vec();
    let mut scratch = std::collections::BTreeMap::new();
    let mut last = first.clone();
    let mut i = kept.len();
    while i > 0 {
        i -= 1;
        let mut tried = kept.clone();
        tried.remove(i);
        if let Err((at, e)) = run_steps(&tried, window, &mut scratch) {
            tried.truncate(at + 1);
            kept = tried;
            last = e;
            i = i.min(kept.len());
        }
    }
    let list: Vec<String> = kept
        .iter()
        .enumerate()
        .map(|(i, s)| format!("  {i}: {s:?}"))
        .collect();
    Err(format!(
        "seed {seed} (window {window} pages) step {at} {:?}: {first}\nshrunk to {} steps, failing with: {last}\n{}",
        all[at.min(all.len() - 1)],
        kept.len(),
        list.join("\n")
    ))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_sequences_match_a_linux_process() {
    common::log_from_env();
    let steps = env_u64("MM_ORACLE_STEPS").map_or(STEPS, |n| n as usize);
    let seeds: Vec<u64> = match env_u64("MM_ORACLE_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("MM_ORACLE_SEEDS").unwrap_or(SEEDS))
            .map(|i| 0x0DAC_1E00_u64.wrapping_mul(31).wrapping_add(i))
            .collect(),
    };
    let t = Instant::now();
    let mut seen = std::collections::BTreeMap::new();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, steps, &mut seen) {
            panic!("{e}");
        }
    }
    eprintln!(
        "mm_linux_oracle: {} seeds x {steps} steps in {:.2?}; outcomes: {seen:?}",
        seeds.len(),
        t.elapsed()
    );
    if seeds.len() == SEEDS as usize && steps >= STEPS {
        // The sequences must reach every kind of step and both outcomes of
        // a comparison, or the test compares little.
        for what in [
            "map",
            "unmap",
            "protect",
            "decommit",
            "punch hole",
            "truncate",
            "fork",
            "drop fork",
            "host read ok",
            "host read refused",
            "host write ok",
            "host write refused",
            "forced write ok",
            "forced read ok",
            "forced write refused",
            "remove",
            "populate ok",
            "populate refused",
            "guest write ok",
            "guest read ok",
            "guest access refused",
            "page compared: inaccessible",
            "page compared: accessible, not all zeros",
        ] {
            assert!(
                seen.get(what).copied().unwrap_or(0) > 0,
                "no \"{what}\" in {seen:?}"
            );
        }
    }
}
