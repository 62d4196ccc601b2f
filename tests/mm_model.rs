//! Model-based test of the mm core.
//!
//! A reference model (a plain array of pages per address space over a small
//! guest-physical window) is driven side by side with real `AddressSpace`s
//! by seeded random op sequences: maps (anonymous, private host file,
//! shared `SharedMemory`; fixed, fixed-replace, anywhere, hint), unmaps,
//! protects, decommits, guest accesses (through what the `RecordingBackend`
//! installed, faulting when nothing suitable is installed, exactly as KVM
//! would), host reads and writes, forks, drops of family members, a second
//! independent space that maps the same shared objects, and
//! `SharedMemory::decommit`.
//!
//! After every op: `check_invariants` on every space, `check_file_refs` over
//! the whole family plus the second space and all objects, `maps()` equal to
//! the model's protections, and every installed page checked: mapped,
//! readable, writable only if the protection allows and the page is this
//! space's alone (a MemoryFile page with one reference), and its bytes
//! (read through the installed fd, without side effects) equal to the model.
//!
//! Failures print the seed, the op index, the failing op and a shrunk op
//! sequence; `MM_MODEL_SEED=<seed>` replays one case, `MM_MODEL_SCALE=<n>`
//! multiplies the number of cases.

mod common;
use common::rng::Rng;
use common::tempfile;

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{
    check_file_refs, AddressSpace, AddressSpaceOptions, FaultError, File, HostFile, IoOpts,
    MapOpts, Mappable, MmError, RecordingBackend, SharedMemory,
};
use guestmm::{Access, Perms, Range};

const PS: u64 = 4096;
const BASE: u64 = 1 << 30;
/// Family slots (a root space and its forks) are `0..FAMILY`; slot `FAMILY`
/// is an independent space that maps only shared objects.
const FAMILY: usize = 3;
const OTHER: usize = FAMILY;
const SLOTS: usize = FAMILY + 1;
/// Object sizes in pages.
const OBJ_PAGES: [u64; 3] = [16, 32, 48];
/// Host file sizes in pages.
const FILE_PAGES: [u64; 2] = [24, 64];
const EXEC_ONLY: Perms = Perms::new(false, false, true);
const WRITE_ONLY: Perms = Perms::new(false, true, false);

// ---------------------------------------------------------------- config ---

#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    /// Pages in the window `[BASE, BASE + pages * PS)`, which is the whole
    /// placeable space (`map_floor = BASE`, `size = BASE + pages * PS`).
    pages: u64,
    fault_around: u64,
    fault_around_max: u64,
    max_map_pages: u64,
    cases: u64,
    ops_per_case: usize,
    /// Every this many ops, every mapped page of every space is read back.
    check_all_every: usize,
}

// ------------------------------------------------------------------- rng ---

// ------------------------------------------------------------------- ops ---

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anon,
    /// Private mapping of host file `file` from page `page` on.
    File {
        file: usize,
        page: u64,
    },
    /// Shared mapping of object `obj` from page `page` on.
    Shm {
        obj: usize,
        page: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Fixed(u64),
    FixedReplace(u64),
    Anywhere,
    Hint(u64),
}

/// One step. Pages are window page indices; `gpa` fields are byte offsets
/// from `BASE`. Every op runs on any state (ops on empty slots are skipped),
/// so a recorded sequence can be replayed and shrunk.
#[derive(Debug, Clone)]
enum Op {
    Map {
        space: usize,
        kind: Kind,
        place: Place,
        align_pages: u64,
        pages: u64,
        perms: Perms,
        max: Perms,
        precommit: bool,
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
    /// A guest access of `len` bytes at `gpa`: served by what is installed
    /// if it allows the access (no fault), else `handle_fault` first.
    /// `spurious` always calls `handle_fault` (a racing vCPU's exit).
    Guest {
        space: usize,
        gpa: u64,
        len: u64,
        access: Access,
        byte: u8,
        spurious: bool,
    },
    HostRead {
        space: usize,
        gpa: u64,
        len: u64,
        force: bool,
    },
    HostWrite {
        space: usize,
        gpa: u64,
        len: u64,
        byte: u8,
        force: bool,
        zero: bool,
    },
    Fork {
        parent: usize,
        child: usize,
    },
    Drop {
        space: usize,
    },
    /// (Re)creates the independent space.
    NewOther,
    ObjDecommit {
        obj: usize,
        start: u64,
        pages: u64,
    },
    /// Reads back (forced) every mapped page of `[start, start + pages)`.
    Check {
        space: usize,
        start: u64,
        pages: u64,
    },
    CheckAll,
    /// The space's backend refuses installs after `after` more succeed,
    /// during the next four ops (out of memslots): they may fail with a
    /// backend error and must leave nothing stale installed.
    FailInstalls {
        space: usize,
        after: usize,
    },
}

impl Op {
    /// True for ops that exercise the mm (not read-back checks).
    fn counts(&self) -> bool {
        !matches!(
            self,
            Op::Check { .. } | Op::CheckAll | Op::FailInstalls { .. }
        )
    }
}

// ----------------------------------------------------------------- model ---

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Anon,
    File { file: usize, page: u64 },
    Shm { obj: usize, page: u64 },
}

#[derive(Debug, Clone, Copy)]
struct MPage {
    perms: Perms,
    max: Perms,
    origin: Origin,
    /// Private bytes (a copy made by a write), by id in `Model::data`;
    /// `None` shows the origin (zeros, the file page, the object page).
    data: Option<u64>,
}

#[derive(Default)]
struct Model {
    spaces: Vec<Option<Vec<Option<MPage>>>>,
    /// Private page contents shared by forks, with their holder counts.
    data: HashMap<u64, (Vec<u8>, u32)>,
    next_id: u64,
    objs: Vec<Vec<Option<Vec<u8>>>>,
    files: Vec<Vec<u8>>,
}

thread_local! {
    /// True while an op runs with installs failing (see `Op::FailInstalls`).
    static FAILING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static ZERO_PAGE: [u8; PS as usize] = [0; PS as usize];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Ok,
    Err(&'static str),
}

impl Model {
    fn page(&self, s: usize, p: u64) -> Option<&MPage> {
        self.spaces[s].as_ref()?.get(p as usize)?.as_ref()
    }

    fn bytes(&self, pg: &MPage) -> &[u8] {
        if let Some(id) = pg.data {
            return &self.data[&id].0;
        }
        match pg.origin {
            Origin::Anon => &ZERO_PAGE,
            Origin::File { file, page } => {
                &self.files[file][(page * PS) as usize..((page + 1) * PS) as usize]
            }
            Origin::Shm { obj, page } => match &self.objs[obj][page as usize] {
                Some(b) => b,
                None => &ZERO_PAGE,
            },
        }
    }

    fn release(&mut self, pg: &MPage) {
        if let Some(id) = pg.data {
            let e = self.data.get_mut(&id).expect("live id");
            e.1 -= 1;
            if e.1 == 0 {
                self.data.remove(&id);
            }
        }
    }

    fn write(&mut self, s: usize, p: u64, off: usize, src: &[u8]) {
        let pg = self.page(s, p).copied().expect("write to a mapped page");
        if let Origin::Shm { obj, page } = pg.origin {
            let b = self.objs[obj][page as usize].get_or_insert_with(|| vec![0; PS as usize]);
            b[off..off + src.len()].copy_from_slice(src);
            return;
        }
        if let Some(id) = pg.data {
            let e = self.data.get_mut(&id).unwrap();
            if e.1 == 1 {
                e.0[off..off + src.len()].copy_from_slice(src);
                return;
            }
        }
        let mut copy = self.bytes(&pg).to_vec();
        copy[off..off + src.len()].copy_from_slice(src);
        self.release(&pg);
        let id = self.next_id;
        self.next_id += 1;
        self.data.insert(id, (copy, 1));
        self.spaces[s].as_mut().unwrap()[p as usize]
            .as_mut()
            .unwrap()
            .data = Some(id);
    }

    fn unmap(&mut self, s: usize, start: u64, pages: u64) {
        for p in start..start + pages {
            if let Some(pg) = self.spaces[s].as_mut().unwrap()[p as usize].take() {
                self.release(&pg);
            }
        }
    }

    fn mapped(&self, s: usize, start: u64, pages: u64) -> bool {
        (start..start + pages).all(|p| self.page(s, p).is_some())
    }

    fn free(&self, s: usize, start: u64, pages: u64) -> bool {
        (start..start + pages).all(|p| self.page(s, p).is_none())
    }

    fn fault_expect(&self, s: usize, p: u64, access: Access) -> Expect {
        match self.page(s, p) {
            None => Expect::Err("Unmapped"),
            Some(pg) if pg.perms.read && pg.perms.allows(access) => Expect::Ok,
            Some(_) => Expect::Err("Permission"),
        }
    }

    /// Host I/O of `len` bytes at window offset `gpa`.
    fn io_expect(&self, s: usize, gpa: u64, len: u64, access: Access, force: bool) -> Expect {
        let (first, last) = (gpa / PS, (gpa + len - 1) / PS);
        if !self.mapped(s, first, last - first + 1) {
            return Expect::Err("NotMapped");
        }
        if !force
            && (first..=last).any(|p| {
                let perms = self.page(s, p).unwrap().perms;
                !perms.allows(access)
            })
        {
            return Expect::Err("Permission");
        }
        Expect::Ok
    }
}

fn mm_kind(e: &MmError) -> &'static str {
    match e {
        MmError::Range(_) => "Range",
        MmError::OutOfSpace { .. } => "OutOfSpace",
        MmError::Overlap { .. } => "Overlap",
        MmError::NoSpace { .. } => "NoSpace",
        MmError::BadAlignment { .. } => "BadAlignment",
        MmError::NotMapped { .. } => "NotMapped",
        MmError::PermsExceedMax { .. } => "PermsExceedMax",
        MmError::WriteWithoutRead { .. } => "WriteWithoutRead",
        MmError::BadObjectRange { .. } => "BadObjectRange",
        MmError::Permission { .. } => "Permission",
        MmError::ForeignPin { .. } => "ForeignPin",
        MmError::Fault(_) => "Fault",
        MmError::Backend(_) => "Backend",
        MmError::Memory(_) => "Memory",
        MmError::File(_) => "File",
    }
}

fn fault_kind(e: &FaultError) -> &'static str {
    match e {
        FaultError::Unmapped { .. } => "Unmapped",
        FaultError::Permission { .. } => "Permission",
        FaultError::Bus { .. } => "Bus",
        FaultError::OutOfMemory { .. } => "OutOfMemory",
        FaultError::Backend { .. } => "Backend",
    }
}

fn compare<T, E: std::fmt::Debug>(
    outcomes: &mut HashMap<String, u64>,
    what: &str,
    got: &Result<T, E>,
    kind: impl Fn(&E) -> &'static str,
    want: Expect,
) -> Result<(), String> {
    let got_kind = match got {
        Ok(_) => Expect::Ok,
        Err(e) => Expect::Err(kind(e)),
    };
    // Injected install failures may fail any op that installs.
    let want = if got_kind == Expect::Err("Backend") && FAILING.with(|f| f.get()) {
        got_kind
    } else {
        want
    };
    let name = match got_kind {
        Expect::Ok => "Ok",
        Expect::Err(k) => k,
    };
    *outcomes.entry(format!("{what} {name}")).or_default() += 1;
    if got_kind != want {
        let detail = match got {
            Ok(_) => "Ok".to_string(),
            Err(e) => format!("{e:?}"),
        };
        return Err(format!("{what}: got {detail}, want {want:?}"));
    }
    Ok(())
}

// ------------------------------------------------------------------ world ---

struct Space {
    space: Arc<AddressSpace>,
    be: Arc<RecordingBackend>,
}

/// The real system under test next to its model.
struct World {
    cfg: Config,
    mf: Arc<MemoryFile>,
    memfd: RawFd,
    files: Vec<Arc<HostFile>>,
    file_fds: Vec<RawFd>,
    objs: Vec<Arc<SharedMemory>>,
    spaces: Vec<Option<Space>>,
    model: Model,
    /// Outcomes per op kind (`"map Ok"`, `"Write fault Permission"`, …),
    /// printed so a run shows what it exercised.
    outcomes: HashMap<String, u64>,
    /// The space whose backend refuses installs, and for how many more ops.
    failing: Option<(usize, usize)>,
}

fn fd_read(fd: RawFd, off: u64, buf: &mut [u8]) -> Result<(), String> {
    // SAFETY: `fd` belongs to the live MemoryFile or HostFile of the world;
    // the File is never dropped, so the descriptor is not closed here.
    let f = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    f.read_exact_at(buf, off)
        .map_err(|e| format!("pread fd {fd} at {off:#x}: {e}"))
}

fn fd_write(fd: RawFd, off: u64, buf: &[u8]) -> Result<(), String> {
    // SAFETY: as in `fd_read`.
    let f = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    f.write_all_at(buf, off)
        .map_err(|e| format!("pwrite fd {fd} at {off:#x}: {e}"))
}

fn opts(cfg: &Config) -> AddressSpaceOptions {
    AddressSpaceOptions {
        size: BASE + cfg.pages * PS,
        map_floor: BASE,
        fault_around: cfg.fault_around,
        fault_around_max: cfg.fault_around_max,
        ..AddressSpaceOptions::default()
    }
}

impl World {
    fn new(cfg: Config, seed: u64) -> World {
        let mf = Arc::new(MemoryFile::new("mm-model", MemoryFileOptions::default()).unwrap());
        let memfd = mf.fd().as_raw_fd();
        let mut rng = Rng(seed ^ 0xF11E);
        let mut files = Vec::new();
        let mut file_fds = Vec::new();
        let mut model = Model::default();
        for (i, &pages) in FILE_PAGES.iter().enumerate() {
            let content: Vec<u8> = (0..pages * PS).map(|_| rng.next() as u8).collect();
            let f = tempfile(&format!("f{i}"));
            f.write_all_at(&content, 0).unwrap();
            let hf = HostFile::new(f, false).unwrap();
            file_fds.push(File::fd(hf.as_ref()).as_raw_fd());
            files.push(hf);
            model.files.push(content);
        }
        let objs: Vec<Arc<SharedMemory>> = OBJ_PAGES
            .iter()
            .map(|&p| SharedMemory::new(mf.clone(), p * PS).unwrap())
            .collect();
        model.objs = OBJ_PAGES.iter().map(|&p| vec![None; p as usize]).collect();
        model.spaces = vec![None; SLOTS];
        let mut w = World {
            cfg,
            mf,
            memfd,
            files,
            file_fds,
            objs,
            spaces: (0..SLOTS).map(|_| None).collect(),
            model,
            outcomes: HashMap::new(),
            failing: None,
        };
        w.create(0);
        w.create(OTHER);
        w
    }

    fn create(&mut self, slot: usize) {
        let be = Arc::new(RecordingBackend::new());
        let space = AddressSpace::new(self.mf.clone(), be.clone(), opts(&self.cfg)).unwrap();
        self.spaces[slot] = Some(Space { space, be });
        self.model.spaces[slot] = Some(vec![None; self.cfg.pages as usize]);
    }

    fn live(&self) -> Vec<usize> {
        (0..SLOTS).filter(|&s| self.spaces[s].is_some()).collect()
    }

    fn family(&self) -> usize {
        (0..FAMILY).filter(|&s| self.spaces[s].is_some()).count()
    }

    fn sp(&self, s: usize) -> &Space {
        self.spaces[s].as_ref().unwrap()
    }

    // ------------------------------------------------------------ generate

    fn gen(&self, rng: &mut Rng) -> Op {
        let live = self.live();
        let space = rng.pick(&live);
        let pages = self.cfg.pages;
        // A page, mostly a mapped one.
        let mapped: Vec<u64> = (0..pages)
            .filter(|&p| self.model.page(space, p).is_some())
            .collect();
        let page = |rng: &mut Rng| {
            if !mapped.is_empty() && rng.chance(85) {
                rng.pick(&mapped)
            } else {
                rng.below(pages)
            }
        };
        let start = page(rng);
        let span = |rng: &mut Rng, start: u64, max: u64| rng.range(1, max.min(pages - start));
        match rng.below(100) {
            0..=9 => {
                let mut len = span(rng, 0, self.cfg.max_map_pages);
                let kind = if space == OTHER || rng.chance(30) {
                    let obj = rng.below(OBJ_PAGES.len() as u64) as usize;
                    if rng.chance(90) {
                        len = len.min(OBJ_PAGES[obj]);
                    }
                    let room = OBJ_PAGES[obj].saturating_sub(len);
                    Kind::Shm {
                        obj,
                        page: if rng.chance(3) {
                            room + 1
                        } else {
                            rng.range(0, room)
                        },
                    }
                } else if rng.chance(35) {
                    let file = rng.below(FILE_PAGES.len() as u64) as usize;
                    if rng.chance(95) {
                        len = len.min(FILE_PAGES[file]);
                    }
                    let room = FILE_PAGES[file].saturating_sub(len);
                    Kind::File {
                        file,
                        page: rng.range(0, room),
                    }
                } else {
                    Kind::Anon
                };
                let at = rng.below(pages - len + 1);
                let place = match rng.below(10) {
                    0..=3 => Place::Fixed(at),
                    4..=6 => Place::FixedReplace(at),
                    7..=8 => Place::Anywhere,
                    _ => Place::Hint(at),
                };
                let perms = rng.pick(&[
                    Perms::READ_WRITE,
                    Perms::READ_WRITE,
                    Perms::READ,
                    Perms::ALL,
                    Perms::READ_EXECUTE,
                    Perms::NONE,
                    EXEC_ONLY,
                    WRITE_ONLY,
                ]);
                let max = match rng.below(10) {
                    0..=6 => Perms::ALL,
                    7..=8 => perms,
                    _ => Perms::READ,
                };
                Op::Map {
                    space,
                    kind,
                    place,
                    align_pages: rng.pick(&[1, 1, 1, 4]),
                    pages: len,
                    perms,
                    max,
                    precommit: rng.chance(5),
                }
            }
            10..=13 => Op::Unmap {
                space,
                start,
                pages: span(rng, start, 16),
            },
            14..=21 => Op::Protect {
                space,
                start,
                pages: span(rng, start, 16),
                perms: rng.pick(&[
                    Perms::READ_WRITE,
                    Perms::READ_WRITE,
                    Perms::READ,
                    Perms::READ,
                    Perms::NONE,
                    Perms::ALL,
                    Perms::READ_EXECUTE,
                    EXEC_ONLY,
                    WRITE_ONLY,
                ]),
            },
            22..=25 => Op::Decommit {
                space,
                start,
                pages: span(rng, start, 16),
            },
            26..=62 => {
                let len = rng.range(1, 16);
                Op::Guest {
                    space,
                    gpa: start * PS + rng.below(PS - len + 1),
                    len,
                    access: rng.pick(&[
                        Access::Read,
                        Access::Write,
                        Access::Write,
                        Access::Execute,
                    ]),
                    byte: rng.next() as u8,
                    spurious: rng.chance(10),
                }
            }
            63..=71 => {
                let gpa = start * PS + rng.below(PS);
                let len = rng.range(1, (3 * PS).min(pages * PS - gpa));
                Op::HostRead {
                    space,
                    gpa,
                    len,
                    force: rng.chance(30),
                }
            }
            72..=83 => {
                let gpa = start * PS + rng.below(PS);
                let len = rng.range(1, (3 * PS).min(pages * PS - gpa));
                Op::HostWrite {
                    space,
                    gpa,
                    len,
                    byte: rng.next() as u8,
                    force: rng.chance(30),
                    zero: rng.chance(10),
                }
            }
            84..=87 => {
                let fam: Vec<usize> = (0..FAMILY).filter(|&s| self.spaces[s].is_some()).collect();
                match (0..FAMILY).find(|&s| self.spaces[s].is_none()) {
                    Some(child) if !fam.is_empty() => Op::Fork {
                        parent: rng.pick(&fam),
                        child,
                    },
                    _ => Op::Drop {
                        space: rng.pick(&fam),
                    },
                }
            }
            88..=89 => {
                if space == OTHER && rng.chance(50) {
                    Op::Drop { space }
                } else if self.spaces[OTHER].is_none() {
                    Op::NewOther
                } else if space < FAMILY && self.family() > 1 {
                    Op::Drop { space }
                } else {
                    Op::CheckAll
                }
            }
            90..=91 if rng.chance(60) => Op::FailInstalls {
                space,
                after: rng.below(3) as usize,
            },
            90..=93 => {
                let obj = rng.below(OBJ_PAGES.len() as u64) as usize;
                let start = rng.below(OBJ_PAGES[obj]);
                Op::ObjDecommit {
                    obj,
                    start,
                    pages: rng.range(1, (OBJ_PAGES[obj] - start).min(8)),
                }
            }
            _ => Op::Check {
                space,
                start,
                pages: span(rng, start, 16),
            },
        }
    }

    // ------------------------------------------------------------- execute

    /// Runs one op against the real system and the model.
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        if let Op::FailInstalls { space, after } = *op {
            if let Some(sp) = self
                .failing
                .take()
                .and_then(|(s, _)| self.spaces[s].as_ref())
            {
                sp.be.fail_installs_after(None);
            }
            if let Some(sp) = &self.spaces[space] {
                sp.be.fail_installs_after(Some(after));
                self.failing = Some((space, 4));
            }
            return Ok(());
        }
        FAILING.with(|f| f.set(self.failing.is_some()));
        let r = self.apply_op(op);
        FAILING.with(|f| f.set(false));
        if let Some((s, left)) = self.failing.take() {
            match &self.spaces[s] {
                Some(sp) if left <= 1 => sp.be.fail_installs_after(None),
                Some(_) => self.failing = Some((s, left - 1)),
                None => {}
            }
        }
        r
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), String> {
        let present = |s: usize| self.spaces.get(s).is_some_and(|x| x.is_some());
        match *op {
            Op::Map {
                space,
                kind,
                place,
                align_pages,
                pages,
                perms,
                max,
                precommit,
            } if present(space) => self.map(
                space,
                kind,
                place,
                align_pages,
                pages,
                perms,
                max,
                precommit,
            ),
            Op::Unmap {
                space,
                start,
                pages,
            } if present(space) => {
                let got = self.sp(space).space.unmap(BASE + start * PS, pages * PS);
                compare(&mut self.outcomes, "unmap", &got, mm_kind, Expect::Ok)?;
                self.model.unmap(space, start, pages);
                Ok(())
            }
            Op::Protect {
                space,
                start,
                pages,
                perms,
            } if present(space) => {
                let want = if perms.write && !perms.read {
                    Expect::Err("WriteWithoutRead")
                } else if !self.model.mapped(space, start, pages) {
                    Expect::Err("NotMapped")
                } else if (start..start + pages)
                    .any(|p| !self.model.page(space, p).unwrap().max.is_superset_of(perms))
                {
                    Expect::Err("PermsExceedMax")
                } else {
                    Expect::Ok
                };
                let got = self
                    .sp(space)
                    .space
                    .protect(BASE + start * PS, pages * PS, perms);
                compare(&mut self.outcomes, "protect", &got, mm_kind, want)?;
                if got.is_ok() {
                    for p in start..start + pages {
                        self.model.spaces[space].as_mut().unwrap()[p as usize]
                            .as_mut()
                            .unwrap()
                            .perms = perms;
                    }
                }
                Ok(())
            }
            Op::Decommit {
                space,
                start,
                pages,
            } if present(space) => {
                let want = if self.model.mapped(space, start, pages) {
                    Expect::Ok
                } else {
                    Expect::Err("NotMapped")
                };
                let got = self.sp(space).space.decommit(BASE + start * PS, pages * PS);
                compare(&mut self.outcomes, "decommit", &got, mm_kind, want)?;
                if got.is_ok() {
                    for p in start..start + pages {
                        let pg = *self.model.page(space, p).unwrap();
                        self.model.release(&pg);
                        self.model.spaces[space].as_mut().unwrap()[p as usize]
                            .as_mut()
                            .unwrap()
                            .data = None;
                    }
                }
                Ok(())
            }
            Op::Guest {
                space,
                gpa,
                len,
                access,
                byte,
                spurious,
            } if present(space) => self.guest(space, gpa, len, access, byte, spurious),
            Op::HostRead {
                space,
                gpa,
                len,
                force,
            } if present(space) => {
                let want = self.model.io_expect(space, gpa, len, Access::Read, force);
                let mut buf = vec![0u8; len as usize];
                let o = if force {
                    IoOpts::FORCE
                } else {
                    IoOpts::default()
                };
                let got = self.sp(space).space.read_with(BASE + gpa, &mut buf, o);
                compare(&mut self.outcomes, "read", &got, mm_kind, want)?;
                if got.is_ok() {
                    self.compare_bytes(space, gpa, &buf, "host read")?;
                }
                Ok(())
            }
            Op::HostWrite {
                space,
                gpa,
                len,
                byte,
                force,
                zero,
            } if present(space) => {
                let want = self.model.io_expect(space, gpa, len, Access::Write, force);
                let buf: Vec<u8> = (0..len)
                    .map(|i| if zero { 0 } else { byte.wrapping_add(i as u8) })
                    .collect();
                let o = if force {
                    IoOpts::FORCE
                } else {
                    IoOpts::default()
                };
                let sp = &self.sp(space).space;
                let got = if zero {
                    sp.zero(BASE + gpa, len, o)
                } else {
                    sp.write_with(BASE + gpa, &buf, o)
                };
                compare(&mut self.outcomes, "write", &got, mm_kind, want)?;
                if got.is_ok() {
                    let mut done = 0u64;
                    while done < len {
                        let at = gpa + done;
                        let n = (PS - at % PS).min(len - done);
                        let src = &buf[done as usize..(done + n) as usize];
                        self.model.write(space, at / PS, (at % PS) as usize, src);
                        done += n;
                    }
                }
                Ok(())
            }
            Op::Fork { parent, child } if present(parent) && !present(child) => {
                let be = Arc::new(RecordingBackend::new());
                let got = self.sp(parent).space.fork(be.clone());
                compare(&mut self.outcomes, "fork", &got, mm_kind, Expect::Ok)?;
                self.spaces[child] = Some(Space {
                    space: got.unwrap(),
                    be,
                });
                let pages = self.model.spaces[parent].clone();
                for pg in pages.iter().flatten().flatten() {
                    if let Some(id) = pg.data {
                        self.model.data.get_mut(&id).unwrap().1 += 1;
                    }
                }
                self.model.spaces[child] = pages;
                Ok(())
            }
            Op::Drop { space } if present(space) => {
                if space < FAMILY && self.family() == 1 {
                    return Ok(());
                }
                self.tally(space);
                self.spaces[space] = None;
                let pages = self.model.spaces[space].take().unwrap();
                for pg in pages.iter().flatten() {
                    self.model.release(pg);
                }
                Ok(())
            }
            Op::NewOther if !present(OTHER) => {
                self.create(OTHER);
                Ok(())
            }
            Op::ObjDecommit { obj, start, pages } => {
                let got =
                    self.objs[obj].decommit(Range::new(start * PS, (start + pages) * PS).unwrap());
                compare(
                    &mut self.outcomes,
                    "object decommit",
                    &got,
                    |_| "File",
                    Expect::Ok,
                )?;
                for p in start..start + pages {
                    self.model.objs[obj][p as usize] = None;
                }
                Ok(())
            }
            Op::Check {
                space,
                start,
                pages,
            } if present(space) => self.read_back(space, start, pages),
            Op::CheckAll => {
                for s in self.live() {
                    self.read_back(s, 0, self.cfg.pages)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn map(
        &mut self,
        space: usize,
        kind: Kind,
        place: Place,
        align_pages: u64,
        pages: u64,
        perms: Perms,
        max: Perms,
        precommit: bool,
    ) -> Result<(), String> {
        let mut o = match kind {
            Kind::Anon => MapOpts::anonymous(pages * PS),
            Kind::File { file, page } => MapOpts::object(
                self.files[file].clone() as Arc<dyn Mappable>,
                page * PS,
                pages * PS,
            ),
            Kind::Shm { obj, page } => MapOpts::object(
                self.objs[obj].clone() as Arc<dyn Mappable>,
                page * PS,
                pages * PS,
            )
            .shared(),
        }
        .perms(perms)
        .max_perms(max)
        .align(align_pages * PS);
        if precommit {
            o = o.precommit();
        }
        o = match place {
            Place::Fixed(p) => o.fixed(BASE + p * PS),
            Place::FixedReplace(p) => o.fixed_replace(BASE + p * PS),
            Place::Anywhere => o,
            Place::Hint(p) => o.hint(BASE + p * PS),
        };
        // The model's placement, in map()'s order of checks.
        let obj_fits = match kind {
            Kind::Anon => true,
            Kind::File { file, page } => page + pages <= FILE_PAGES[file],
            Kind::Shm { obj, page } => page + pages <= OBJ_PAGES[obj],
        };
        let fits = |p: u64| p + pages <= self.cfg.pages;
        let want: Result<u64, &'static str> = if perms.write && !perms.read {
            Err("WriteWithoutRead")
        } else if !max.is_superset_of(perms) {
            Err("PermsExceedMax")
        } else if !obj_fits {
            Err("BadObjectRange")
        } else {
            match place {
                Place::Fixed(p) | Place::FixedReplace(p) if (BASE / PS + p) % align_pages != 0 => {
                    Err("BadAlignment")
                }
                Place::Fixed(p) | Place::FixedReplace(p) if !fits(p) => Err("OutOfSpace"),
                Place::Fixed(p) if !self.model.free(space, p, pages) => Err("Overlap"),
                Place::Fixed(p) | Place::FixedReplace(p) => Ok(p),
                Place::Anywhere | Place::Hint(_) => {
                    let floor = if let Place::Hint(h) = place { h } else { 0 };
                    let first = floor.div_ceil(align_pages) * align_pages;
                    (first..self.cfg.pages)
                        .step_by(align_pages as usize)
                        .find(|&p| fits(p) && self.model.free(space, p, pages))
                        .ok_or("NoSpace")
                }
            }
        };
        let got = self.sp(space).space.map(o);
        let want_kind = match want {
            Ok(_) => Expect::Ok,
            Err(k) => Expect::Err(k),
        };
        compare(&mut self.outcomes, "map", &got, mm_kind, want_kind)?;
        let (gpa, at) = match (got, want) {
            (Ok(gpa), Ok(at)) => (gpa, at),
            // A precommit whose install failed leaves the vma mapped.
            (Err(MmError::Backend(_)), Ok(at)) => (BASE + at * PS, at),
            _ => return Ok(()),
        };
        if gpa != BASE + at * PS {
            return Err(format!(
                "map placed at {gpa:#x}, want {:#x}",
                BASE + at * PS
            ));
        }
        self.model.unmap(space, at, pages);
        for i in 0..pages {
            let origin = match kind {
                Kind::Anon => Origin::Anon,
                Kind::File { file, page } => Origin::File {
                    file,
                    page: page + i,
                },
                Kind::Shm { obj, page } => Origin::Shm {
                    obj,
                    page: page + i,
                },
            };
            self.model.spaces[space].as_mut().unwrap()[(at + i) as usize] = Some(MPage {
                perms,
                max,
                origin,
                data: None,
            });
        }
        Ok(())
    }

    fn guest(
        &mut self,
        space: usize,
        gpa: u64,
        len: u64,
        access: Access,
        byte: u8,
        spurious: bool,
    ) -> Result<(), String> {
        let page = gpa / PS;
        let addr = BASE + gpa;
        let want = self.model.fault_expect(space, page, access);
        let usable = |s: &Space| {
            s.be.installed_at(addr)
                .is_some_and(|(_, i)| access != Access::Write || i.writable)
        };
        if spurious || !usable(self.sp(space)) {
            let got = self.sp(space).space.handle_fault(addr, access);
            compare(
                &mut self.outcomes,
                &format!("{access} fault"),
                &got,
                fault_kind,
                want,
            )?;
            if got.is_err() {
                return Ok(());
            }
            if !usable(self.sp(space)) {
                return Err(format!(
                    "{access} fault at {addr:#x} succeeded but installed {:?}: the guest would fault forever",
                    self.sp(space).be.installed_at(addr)
                ));
            }
        } else {
            *self.outcomes.entry(format!("{access} direct")).or_default() += 1;
        }
        if want != Expect::Ok && access != Access::Execute {
            return Err(format!(
                "{access} at {addr:#x} served by an install the model forbids: {want:?}"
            ));
        }
        let (r, inst) = self.sp(space).be.installed_at(addr).unwrap();
        let off = inst.file_offset + (addr - r.start());
        match access {
            Access::Read | Access::Execute => {
                let mut buf = vec![0u8; len as usize];
                fd_read(inst.fd, off, &mut buf)?;
                self.compare_bytes(space, gpa, &buf, "guest read")
            }
            Access::Write => {
                let buf: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
                fd_write(inst.fd, off, &buf)?;
                self.model.write(space, page, (gpa % PS) as usize, &buf);
                Ok(())
            }
        }
    }

    /// Compares `buf`, read at window offset `gpa`, with the model.
    fn compare_bytes(&self, space: usize, gpa: u64, buf: &[u8], what: &str) -> Result<(), String> {
        let mut done = 0u64;
        while done < buf.len() as u64 {
            let at = gpa + done;
            let n = (PS - at % PS).min(buf.len() as u64 - done);
            let pg = self.model.page(space, at / PS).unwrap();
            let want = &self.model.bytes(pg)[(at % PS) as usize..(at % PS + n) as usize];
            let got = &buf[done as usize..(done + n) as usize];
            if got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                return Err(format!(
                    "{what} in space {space} at {:#x}: got byte {:#04x}, want {:#04x} (page {pg:?})",
                    BASE + at + i as u64,
                    got[i],
                    want[i]
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Reads every mapped page of the range back (ignoring protections) and
    /// compares it with the model.
    fn read_back(&self, space: usize, start: u64, pages: u64) -> Result<(), String> {
        let mut buf = vec![0u8; PS as usize];
        for p in start..start + pages {
            if self.model.page(space, p).is_none() {
                continue;
            }
            self.sp(space)
                .space
                .read_with(BASE + p * PS, &mut buf, IoOpts::FORCE)
                .map_err(|e| format!("read back page {p} of space {space}: {e}"))?;
            self.compare_bytes(space, p * PS, &buf, "read back")?;
        }
        Ok(())
    }

    // -------------------------------------------------------------- checks

    fn check(&self) -> Result<(), String> {
        let family: Vec<&AddressSpace> = (0..SLOTS)
            .filter_map(|s| self.spaces[s].as_ref().map(|x| x.space.as_ref()))
            .collect();
        let objs: Vec<&SharedMemory> = self.objs.iter().map(|o| o.as_ref()).collect();
        for s in self.live() {
            self.sp(s)
                .space
                .check_invariants()
                .map_err(|e| format!("space {s} invariants: {e}"))?;
            self.check_maps(s)?;
            self.check_installed(s)?;
        }
        check_file_refs(&self.mf, &family, &objs).map_err(|e| format!("file refs: {e}"))?;
        Ok(())
    }

    /// `maps()` shows exactly the model's mapped pages and protections.
    fn check_maps(&self, s: usize) -> Result<(), String> {
        let mut got: Vec<Option<Perms>> = vec![None; self.cfg.pages as usize];
        for e in self.sp(s).space.maps() {
            for gpa in (e.range.start()..e.range.end()).step_by(PS as usize) {
                got[((gpa - BASE) / PS) as usize] = Some(e.perms);
            }
        }
        for (p, g) in got.iter().enumerate() {
            let want = self.model.page(s, p as u64).map(|pg| pg.perms);
            if *g != want {
                return Err(format!(
                    "maps() of space {s} at page {p}: got {g:?}, want {want:?}"
                ));
            }
        }
        Ok(())
    }

    /// Everything installed is mapped, readable, writable only when allowed
    /// and exclusive, and shows the model's bytes.
    fn check_installed(&self, s: usize) -> Result<(), String> {
        let sp = self.sp(s);
        let mut buf = Vec::new();
        for (r, inst) in sp.be.installed() {
            buf.resize(r.len() as usize, 0);
            fd_read(inst.fd, inst.file_offset, &mut buf)?;
            for gpa in (r.start()..r.end()).step_by(PS as usize) {
                let p = (gpa - BASE) / PS;
                let Some(pg) = self.model.page(s, p) else {
                    return Err(format!(
                        "space {s}: {gpa:#x} installed ({inst:?}) but not mapped"
                    ));
                };
                if !pg.perms.read {
                    return Err(format!(
                        "space {s}: {gpa:#x} installed ({inst:?}) under protection {}",
                        pg.perms
                    ));
                }
                let foff = inst.file_offset + (gpa - r.start());
                if inst.writable {
                    if !pg.perms.write {
                        return Err(format!(
                            "space {s}: {gpa:#x} installed writable under protection {}",
                            pg.perms
                        ));
                    }
                    if inst.fd != self.memfd {
                        return Err(format!(
                            "space {s}: {gpa:#x} installed writable from a host file ({pg:?})"
                        ));
                    }
                    let private = !matches!(pg.origin, Origin::Shm { .. });
                    let refs = self.mf.refs(foff);
                    if private && refs != Some(1) {
                        return Err(format!(
                            "space {s}: {gpa:#x} installed writable on a private page with {refs:?} refs (copy-on-write not broken; {pg:?})"
                        ));
                    }
                }
                if let Origin::File { file, .. } = pg.origin {
                    if inst.fd != self.memfd && inst.fd != self.file_fds[file] {
                        return Err(format!("space {s}: {gpa:#x} installed from fd {}", inst.fd));
                    }
                }
                let at = (gpa - r.start()) as usize;
                let got = &buf[at..at + PS as usize];
                let want = self.model.bytes(pg);
                if got != want {
                    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    return Err(format!(
                        "space {s}: installed page {gpa:#x} ({inst:?}) shows byte {:#04x} at +{i:#x}, want {:#04x} ({pg:?})",
                        got[i], want[i]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Adds a space's copy-on-write counters to the outcomes.
    fn tally(&mut self, s: usize) {
        let st = self.sp(s).space.stats();
        for (k, v) in [
            ("stat cow_copies", st.cow_copies),
            ("stat cow_takeovers", st.cow_takeovers),
            ("stat faults", st.faults),
            ("stat populated_total pages", st.populated_total / PS),
        ] {
            *self.outcomes.entry(k.to_string()).or_default() += v;
        }
    }

    /// Drops everything and checks nothing is left allocated or committed.
    fn teardown(&mut self) -> Result<(), String> {
        for s in self.live() {
            self.tally(s);
        }
        self.spaces.iter_mut().for_each(|s| *s = None);
        self.objs.clear();
        for (i, f) in self.files.iter().enumerate() {
            if f.refs() != 0 {
                return Err(format!(
                    "host file {i}: got {} refs after teardown, want 0",
                    f.refs()
                ));
            }
        }
        let allocated = self.mf.allocated_bytes();
        if allocated != 0 {
            return Err(format!(
                "teardown: got {allocated:#x} bytes allocated, want 0"
            ));
        }
        let committed = self
            .mf
            .usage()
            .map_err(|e| e.to_string())?
            .total_committed();
        if committed != 0 {
            return Err(format!(
                "teardown: got {committed:#x} bytes committed, want 0"
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- driver ---

/// A failure: the op index (`None` for teardown) and the message.
type Failure = (Option<usize>, String);

fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

/// Generates and runs one case; returns the ops run and the outcome.
fn run_generated(
    cfg: Config,
    seed: u64,
    outcomes: &mut HashMap<String, u64>,
) -> (Vec<Op>, usize, Result<(), Failure>) {
    let mut rng = Rng(seed);
    let mut world = World::new(cfg, seed);
    let mut ops = Vec::with_capacity(cfg.ops_per_case);
    let mut counted = 0;
    for i in 0..cfg.ops_per_case {
        let op = if i % cfg.check_all_every == cfg.check_all_every - 1 {
            Op::CheckAll
        } else {
            world.gen(&mut rng)
        };
        ops.push(op.clone());
        counted += op.counts() as usize;
        let r = catch(|| {
            world.apply(&op)?;
            world.check()
        });
        if let Err(e) = r {
            return (ops, counted, Err((Some(i), e)));
        }
    }
    let r = catch(|| world.teardown()).map_err(|e| (None, e));
    for (k, v) in world.outcomes.drain() {
        *outcomes.entry(k).or_default() += v;
    }
    (ops, counted, r)
}

/// Replays a fixed op sequence.
fn replay(cfg: Config, seed: u64, ops: &[Op]) -> Result<(), Failure> {
    let mut world = World::new(cfg, seed);
    for (i, op) in ops.iter().enumerate() {
        catch(|| {
            world.apply(op)?;
            world.check()
        })
        .map_err(|e| (Some(i), e))?;
    }
    catch(|| world.teardown()).map_err(|e| (None, e))
}

/// Removes chunks of ops while the sequence still fails.
fn shrink(cfg: Config, seed: u64, mut ops: Vec<Op>, deadline: Instant) -> Vec<Op> {
    let mut chunk = ops.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut removed = false;
        while i < ops.len() && Instant::now() < deadline {
            let mut cand = ops.clone();
            cand.drain(i..(i + chunk).min(ops.len()));
            if replay(cfg, seed, &cand).is_err() {
                ops = cand;
                removed = true;
            } else {
                i += chunk;
            }
        }
        if Instant::now() >= deadline || (chunk == 1 && !removed) {
            return ops;
        }
        if !removed {
            chunk = chunk.div_ceil(2).max(1);
        }
    }
}

fn run(cfg: Config) {
    let scale: u64 = std::env::var("MM_MODEL_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let seeds: Vec<u64> = match std::env::var("MM_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("MM_MODEL_SEED is a u64")],
        Err(_) => (0..cfg.cases * scale)
            .map(|i| 0x6d6d_0000 + i * 7919 + cfg.pages)
            .collect(),
    };
    let t0 = Instant::now();
    let mut total = 0;
    let mut outcomes = HashMap::new();
    for seed in seeds {
        let (ops, counted, result) = run_generated(cfg, seed, &mut outcomes);
        total += counted;
        let Err((at, msg)) = result else { continue };
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let until = at.map_or(ops.len(), |i| i + 1);
        let shrunk = shrink(
            cfg,
            seed,
            ops[..until].to_vec(),
            Instant::now() + std::time::Duration::from_secs(60),
        );
        let shrunk_result = replay(cfg, seed, &shrunk);
        std::panic::set_hook(hook);
        panic!(
            "{}: seed {seed} failed at op {at:?} ({:?}): {msg}\n\
             replay with MM_MODEL_SEED={seed}; shrunk to {} ops failing with {shrunk_result:?}:\n{shrunk:#?}",
            cfg.name,
            at.map(|i| &ops[i]),
            shrunk.len()
        );
    }
    let mut outcomes: Vec<_> = outcomes.into_iter().collect();
    outcomes.sort();
    eprintln!(
        "{}: {total} ops in {:.1?} ({:?})\n{outcomes:?}",
        cfg.name,
        t0.elapsed(),
        cfg
    );
}

#[test]
fn model_small_fault_around_4k() {
    run(Config {
        name: "fault-around 4 KiB",
        pages: 128,
        fault_around: PS,
        fault_around_max: 64 << 10,
        max_map_pages: 32,
        cases: 14,
        ops_per_case: 2000,
        check_all_every: 250,
    });
}

#[test]
fn model_small_fault_around_16k() {
    run(Config {
        name: "fault-around 16 KiB",
        pages: 192,
        fault_around: 16 << 10,
        fault_around_max: 64 << 10,
        max_map_pages: 48,
        cases: 14,
        ops_per_case: 2000,
        check_all_every: 250,
    });
}

#[test]
fn model_default_fault_around_2m() {
    run(Config {
        name: "fault-around 2 MiB",
        pages: 2048,
        fault_around: 2 << 20,
        fault_around_max: 32 << 20,
        max_map_pages: 768,
        cases: 4,
        ops_per_case: 1000,
        check_all_every: 500,
    });
}
