//! Concurrency tests of the mm core: vCPU-like threads fault and do host I/O
//! on one shared address space while another thread protects, unmaps,
//! remaps, decommits and forks it.
//!
//! Every workload runs under a watchdog: a deadlock fails the test with a
//! message naming what each thread was doing instead of hanging CI.
//!
//! Final contents are checked against what a sequential order allows. Each
//! page of the two regions belongs to one worker, which writes
//! `(thread, page, sequence)` stamps there:
//! - region A is only ever protected (read-only or no access, then back), so
//!   each of its pages ends holding its owner's last successful stamp;
//! - region B is also unmapped + remapped, replaced and decommitted, so a
//!   page may end as zeros, but only if a zeroing operation did not end
//!   before the owner's last successful write began (a global logical
//!   clock orders the operations).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{
    check_file_refs, AddressSpace, AddressSpaceOptions, FaultError, IoOpts, MapOpts, MmError,
    NoopBackend, RecordingBackend,
};
use guestmm::{Access, Perms};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const WORKERS: usize = 4;
/// Region A: protected and restored, never unmapped.
const A_BASE: u64 = 1 << 30;
const A_LEN: u64 = 4 * MIB;
/// Region B: protected, unmapped and remapped, replaced, decommitted.
const B_BASE: u64 = 2 << 30;
const B_LEN: u64 = 4 * MIB;
/// Never mapped: faults there are always `Unmapped`.
const HOLE: u64 = 3 << 30;
const A_PAGES: u64 = A_LEN / PAGE;
const PAGES: u64 = A_PAGES + B_LEN / PAGE;
const STAMP_MAGIC: u64 = 0xA5A5 << 48;
/// How long a workload may run before the watchdog declares a deadlock.
const WATCHDOG: Duration = Duration::from_secs(60);

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn page_gpa(i: u64) -> u64 {
    if i < A_PAGES {
        A_BASE + i * PAGE
    } else {
        B_BASE + (i - A_PAGES) * PAGE
    }
}

fn page_of(gpa: u64) -> u64 {
    if gpa >= B_BASE {
        A_PAGES + (gpa - B_BASE) / PAGE
    } else {
        (gpa - A_BASE) / PAGE
    }
}

fn owner(i: u64) -> usize {
    (i % WORKERS as u64) as usize
}

fn in_b(i: u64) -> bool {
    i >= A_PAGES
}

fn stamp(tid: usize, page: u64, seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(STAMP_MAGIC | (tid as u64) << 32 | page).to_le_bytes());
    b[8..].copy_from_slice(&seq.to_le_bytes());
    b
}

/// What a page's first 16 bytes hold.
#[derive(Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Stamp { tid: usize, page: u64, seq: u64 },
    Garbage([u8; 16]),
}

fn decode(b: &[u8]) -> Content {
    let header = u64::from_le_bytes(b[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if header == 0 && seq == 0 {
        return Content::Zero;
    }
    if header & (0xFFFF << 48) != STAMP_MAGIC {
        return Content::Garbage(b[..16].try_into().unwrap());
    }
    Content::Stamp {
        tid: ((header >> 32) & 0xFFFF) as usize,
        page: header & 0xFFFF_FFFF,
        seq,
    }
}

/// What each thread is doing, for the watchdog's message.
struct Progress {
    ops: Vec<AtomicU64>,
    doing: Vec<AtomicU64>,
}

const OP_NAMES: &[&str] = &[
    "idle",
    "host write",
    "write fault",
    "fault anywhere",
    "host read own",
    "host read range",
    "protect A",
    "unmap+remap B",
    "replace B",
    "decommit B",
    "protect B",
    "fork / read child / drop child",
    "check_invariants / stats / maps",
    "done",
];

impl Progress {
    fn new(threads: usize) -> Progress {
        Progress {
            ops: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            doing: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn set(&self, thread: usize, op: u64) {
        self.doing[thread].store(op, Ordering::Relaxed);
        self.ops[thread].fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) -> String {
        (0..self.ops.len())
            .map(|t| {
                let op = self.doing[t].load(Ordering::Relaxed) as usize;
                format!(
                    "thread {t}: {} ops, in \"{}\"",
                    self.ops[t].load(Ordering::Relaxed),
                    OP_NAMES[op]
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Runs `f` on its own thread; fails the test if it does not finish within
/// `limit` (a deadlock), naming what each thread was doing.
fn with_watchdog<T: Send + 'static>(
    name: &str,
    limit: Duration,
    progress: Option<Arc<Progress>>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let out = f();
            let _ = tx.send(());
            out
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "{name}: did not finish within {limit:?}: deadlock (or livelock) suspected; {}",
            progress.map_or_else(|| "no progress info".into(), |p| p.report())
        ),
    }
}

/// Last successful write of a page by its owner: sequence number and the
/// logical clock before and after the call.
#[derive(Default)]
struct WriteRec {
    seq: AtomicU64,
    start: AtomicU64,
    end: AtomicU64,
}

/// Last zeroing (unmap+remap, replace, decommit) of a page of B.
#[derive(Default)]
struct ZeroRec {
    start: AtomicU64,
    end: AtomicU64,
}

struct Shared {
    space: Arc<AddressSpace>,
    clock: AtomicU64,
    writes: Vec<WriteRec>,
    zeroes: Vec<ZeroRec>,
    stop: AtomicBool,
    progress: Arc<Progress>,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

fn setup() -> (Arc<MemoryFile>, Arc<RecordingBackend>, Arc<AddressSpace>) {
    let mf = Arc::new(MemoryFile::new("conc", MemoryFileOptions::default()).unwrap());
    let be = Arc::new(RecordingBackend::new());
    let space = AddressSpace::new(mf.clone(), be.clone(), AddressSpaceOptions::default()).unwrap();
    (mf, be, space)
}

/// One worker: faults, host writes of its own pages, host reads, with the
/// errors the racing mutator may legitimately cause.
///
/// Runs at least `ops` operations, and on until the mutator has done
/// `mutator_ops` or `limit` has passed, so both sides really race.
fn worker(sh: &Shared, tid: usize, seed: u64, ops: u64, mutator_ops: u64, limit: Duration) -> u64 {
    let mut rng = Rng(seed ^ ((tid as u64 + 1) * 0x1234_5678_9ABC));
    let own_page = |rng: &mut Rng| rng.below(PAGES / WORKERS as u64) * WORKERS as u64 + tid as u64;
    let started = Instant::now();
    let mut seq = 0;
    while seq < ops
        || (sh.progress.ops[WORKERS].load(Ordering::Relaxed) < mutator_ops
            && started.elapsed() < limit)
    {
        seq += 1;
        let dice = rng.below(100);
        match dice {
            0..=39 => {
                sh.progress.set(tid, 1);
                let i = own_page(&mut rng);
                write_own(sh, tid, i, seq);
            }
            40..=54 => {
                sh.progress.set(tid, 2);
                let i = own_page(&mut rng);
                let gpa = page_gpa(i) + rng.below(PAGE);
                check_fault(sh.space.handle_fault(gpa, Access::Write), gpa, in_b(i));
            }
            55..=69 => {
                sh.progress.set(tid, 3);
                let gpa = match rng.below(5) {
                    0 => HOLE + rng.below(MIB),
                    1 | 2 => A_BASE + rng.below(A_LEN),
                    _ => B_BASE + rng.below(B_LEN),
                };
                let access = if rng.below(2) == 0 {
                    Access::Read
                } else {
                    Access::Write
                };
                check_fault(
                    sh.space.handle_fault(gpa, access),
                    gpa,
                    !(A_BASE..A_BASE + A_LEN).contains(&gpa),
                );
            }
            70..=89 => {
                sh.progress.set(tid, 4);
                let i = own_page(&mut rng);
                read_own(sh, tid, i);
            }
            _ => {
                sh.progress.set(tid, 5);
                let (base, len) = if rng.below(2) == 0 {
                    (A_BASE, A_LEN)
                } else {
                    (B_BASE, B_LEN)
                };
                let n = 1 + rng.below(16);
                let start = base + rng.below(len / PAGE - n + 1) * PAGE;
                read_range(sh, start, n);
            }
        }
    }
    sh.progress.set(tid, 13);
    seq
}

fn write_own(sh: &Shared, tid: usize, i: u64, seq: u64) {
    let gpa = page_gpa(i);
    let buf = stamp(tid, i, seq);
    for _ in 0..100_000 {
        let start = sh.tick();
        match sh.space.write(gpa, &buf) {
            Ok(()) => {
                let end = sh.tick();
                let rec = &sh.writes[i as usize];
                rec.seq.store(seq, Ordering::SeqCst);
                rec.start.store(start, Ordering::SeqCst);
                rec.end.store(end, Ordering::SeqCst);
                return;
            }
            // Temporarily read-only or inaccessible: retry, as a vCPU would.
            Err(MmError::Permission { .. }) => std::thread::yield_now(),
            Err(MmError::NotMapped { .. }) if in_b(i) => return,
            Err(e) => panic!("thread {tid}: write of page {i} at {gpa:#x}: unexpected error {e}"),
        }
    }
}

fn check_fault(r: Result<guestmm::mm::Populated, FaultError>, gpa: u64, may_be_unmapped: bool) {
    match r {
        Ok(p) => {
            assert!(
                p.window.contains(gpa),
                "fault at {gpa:#x}: window {} does not hold it",
                p.window
            );
        }
        Err(FaultError::Permission { .. }) => {}
        Err(FaultError::Unmapped { .. }) if may_be_unmapped => {}
        Err(e) => panic!("fault at {gpa:#x}: unexpected error {e}"),
    }
}

/// Reads own page `i`: only this thread writes it, so it must hold the last
/// successful stamp (or zeros in B, or before the first write).
fn read_own(sh: &Shared, tid: usize, i: u64) {
    let gpa = page_gpa(i);
    let mut buf = [0u8; 16];
    match sh.space.read(gpa, &mut buf) {
        Ok(()) => {}
        Err(MmError::Permission { .. }) => return,
        Err(MmError::NotMapped { .. }) if in_b(i) => return,
        Err(e) => panic!("thread {tid}: read of page {i} at {gpa:#x}: unexpected error {e}"),
    }
    let seq = sh.writes[i as usize].seq.load(Ordering::SeqCst);
    let got = decode(&buf);
    let want = if seq == 0 {
        Content::Zero
    } else {
        Content::Stamp { tid, page: i, seq }
    };
    let zero_ok = in_b(i) && got == Content::Zero;
    assert!(
        got == want || zero_ok,
        "thread {tid}: own page {i} at {gpa:#x}: got {got:?}, want {want:?}"
    );
}

/// Reads `n` pages from `start` (one host read crossing pages and pmas) and
/// checks every page holds zeros or a stamp of its owner for that page.
fn read_range(sh: &Shared, start: u64, n: u64) {
    let mut buf = vec![0u8; (n * PAGE) as usize];
    match sh.space.read(start, &mut buf) {
        Ok(()) => {}
        Err(MmError::Permission { .. }) => return,
        Err(MmError::NotMapped { .. }) if start >= B_BASE => return,
        Err(e) => panic!("read of {n} pages at {start:#x}: unexpected error {e}"),
    }
    for k in 0..n {
        let i = page_of(start + k * PAGE);
        check_foreign(&buf[(k * PAGE) as usize..], i, "read range");
    }
}

fn check_foreign(bytes: &[u8], i: u64, what: &str) {
    match decode(bytes) {
        Content::Zero => {}
        Content::Stamp { tid, page, .. } if tid == owner(i) && page == i => {}
        got => panic!(
            "{what}: page {i} at {:#x}: got {got:?}, want zeros or a stamp of thread {} for page {i}",
            page_gpa(i),
            owner(i)
        ),
    }
}

/// A random page-aligned sub-range of `[base, base + len)` of 1..=64 pages.
fn sub_range(rng: &mut Rng, base: u64, len: u64) -> (u64, u64) {
    let n = 1 + rng.below(64);
    let start = base + rng.below(len / PAGE - n + 1) * PAGE;
    (start, n * PAGE)
}

fn mark_zeroed(sh: &Shared, gpa: u64, len: u64, start: u64, end: u64) {
    for g in (gpa..gpa + len).step_by(PAGE as usize) {
        let z = &sh.zeroes[page_of(g) as usize];
        z.start.store(start, Ordering::SeqCst);
        z.end.store(end, Ordering::SeqCst);
    }
}

fn b_opts(len: u64) -> MapOpts {
    MapOpts::anonymous(len).name("b")
}

/// The mutator: protects A, and unmaps/remaps, replaces, decommits and
/// protects B, forks, and checks invariants, until the workers are done.
fn mutator(sh: &Shared, be: &RecordingBackend, me: usize, seed: u64) {
    let mut rng = Rng(seed ^ 0xC0FF_EE00);
    let mut child: Option<Arc<AddressSpace>> = None;
    let few_yields = |rng: &mut Rng| {
        for _ in 0..rng.below(3) {
            std::thread::yield_now();
        }
    };
    while !sh.stop.load(Ordering::SeqCst) {
        let dice = rng.below(100);
        match dice {
            0..=24 => {
                sh.progress.set(me, 6);
                let (gpa, len) = sub_range(&mut rng, A_BASE, A_LEN);
                let perms = if rng.below(2) == 0 {
                    Perms::READ
                } else {
                    Perms::NONE
                };
                sh.space.protect(gpa, len, perms).unwrap();
                few_yields(&mut rng);
                check_installed_at_most(be, gpa, len, perms, "after protect of A");
                sh.space.protect(gpa, len, Perms::READ_WRITE).unwrap();
            }
            25..=39 => {
                sh.progress.set(me, 7);
                let (gpa, len) = sub_range(&mut rng, B_BASE, B_LEN);
                let start = sh.tick();
                sh.space.unmap(gpa, len).unwrap();
                few_yields(&mut rng);
                check_installed_at_most(be, gpa, len, Perms::NONE, "after unmap of B");
                let got = sh.space.map(b_opts(len).fixed(gpa)).unwrap();
                assert_eq!(got, gpa, "fixed map placed at {got:#x}, want {gpa:#x}");
                let end = sh.tick();
                mark_zeroed(sh, gpa, len, start, end);
            }
            40..=49 => {
                sh.progress.set(me, 8);
                let (gpa, len) = sub_range(&mut rng, B_BASE, B_LEN);
                let start = sh.tick();
                sh.space.map(b_opts(len).fixed_replace(gpa)).unwrap();
                let end = sh.tick();
                mark_zeroed(sh, gpa, len, start, end);
            }
            50..=59 => {
                sh.progress.set(me, 9);
                let (gpa, len) = sub_range(&mut rng, B_BASE, B_LEN);
                let start = sh.tick();
                sh.space.decommit(gpa, len).unwrap();
                let end = sh.tick();
                mark_zeroed(sh, gpa, len, start, end);
            }
            60..=69 => {
                sh.progress.set(me, 10);
                let (gpa, len) = sub_range(&mut rng, B_BASE, B_LEN);
                sh.space.protect(gpa, len, Perms::READ).unwrap();
                few_yields(&mut rng);
                check_installed_at_most(be, gpa, len, Perms::READ, "after protect of B");
                sh.space.protect(gpa, len, Perms::READ_WRITE).unwrap();
            }
            70..=79 => {
                sh.progress.set(me, 11);
                match child.take() {
                    None => child = Some(sh.space.fork(Arc::new(NoopBackend)).unwrap()),
                    Some(c) => {
                        // The child is a snapshot: each page holds zeros or
                        // a stamp of its owner.
                        for _ in 0..8 {
                            let i = rng.below(PAGES);
                            let mut buf = [0u8; 16];
                            c.read_with(page_gpa(i), &mut buf, IoOpts::FORCE).unwrap();
                            check_foreign(&buf, i, "forked child");
                        }
                        c.check_invariants().unwrap();
                    }
                }
            }
            _ => {
                sh.progress.set(me, 12);
                sh.space
                    .check_invariants()
                    .unwrap_or_else(|e| panic!("invariants broken mid-run: {e}"));
                let stats = sh.space.stats();
                assert!(stats.mapped_bytes == A_LEN + B_LEN, "stats {stats:?}");
                let maps = sh.space.maps();
                assert!(!maps.is_empty());
            }
        }
    }
    drop(child);
    sh.progress.set(me, 13);
}

/// While only this thread changes protections and vmas, checks that what
/// the backend shows in `[gpa, gpa + len)` is at most `perms` allow (faults
/// racing with this check install only what the protection allows).
fn check_installed_at_most(be: &RecordingBackend, gpa: u64, len: u64, perms: Perms, what: &str) {
    let range = guestmm::Range::new(gpa, gpa + len).unwrap();
    for (r, inst) in be.installed() {
        if !r.overlaps(range) {
            continue;
        }
        assert!(
            perms.read,
            "{what} {range} to {perms}: {r} is still installed ({inst:?})"
        );
        assert!(
            perms.write || !inst.writable,
            "{what} {range} to {perms}: {r} is still installed writable"
        );
    }
}

/// Checks each page's final contents against what a sequential order allows.
fn check_final_contents(sh: &Shared) {
    let mut buf = vec![0u8; (A_LEN + B_LEN) as usize];
    let (a, b) = buf.split_at_mut(A_LEN as usize);
    sh.space.read(A_BASE, a).unwrap();
    sh.space.read(B_BASE, b).unwrap();
    for i in 0..PAGES {
        let got = decode(&buf[(i * PAGE) as usize..]);
        let w = &sh.writes[i as usize];
        let seq = w.seq.load(Ordering::SeqCst);
        let want = if seq == 0 {
            Content::Zero
        } else {
            Content::Stamp {
                tid: owner(i),
                page: i,
                seq,
            }
        };
        let z = &sh.zeroes[i as usize];
        let (zs, ze) = (z.start.load(Ordering::SeqCst), z.end.load(Ordering::SeqCst));
        let (ws, we) = (w.start.load(Ordering::SeqCst), w.end.load(Ordering::SeqCst));
        let zeroed = ze != 0;
        let ok = if !zeroed || seq == 0 || ze < ws {
            // No zeroing, or it ended before the last write began.
            got == want
        } else if zs > we {
            // Zeroed after the last write ended.
            got == Content::Zero
        } else {
            // They overlap: either order is possible.
            got == want || got == Content::Zero
        };
        assert!(
            ok,
            "page {i} at {:#x}: got {got:?}, want {want:?} (last write clock {ws}..{we}, \
             last zeroing {zs}..{ze})",
            page_gpa(i)
        );
    }
}

/// Checks the RecordingBackend's model against the space: every installed
/// page is inside a readable region, writable only where the region
/// allows it, and shows the same bytes the space reads there.
fn check_backend(space: &AddressSpace, mf: &MemoryFile, be: &RecordingBackend) {
    use std::os::unix::fs::FileExt;
    let memfd = std::fs::File::from(mf.fd().try_clone_to_owned().unwrap());
    let maps = space.maps();
    for (range, inst) in be.installed() {
        for gpa in (range.start()..range.end()).step_by(PAGE as usize) {
            let region = maps
                .iter()
                .find(|m| m.range.contains(gpa))
                .unwrap_or_else(|| panic!("installed {range} at {gpa:#x} is not mapped"));
            assert!(
                region.perms.read,
                "installed {range} at {gpa:#x} in inaccessible region {region}"
            );
            assert!(
                !inst.writable || region.perms.write,
                "installed writable {range} at {gpa:#x} in region {region}"
            );
            let offset = inst.file_offset + (gpa - range.start());
            assert!(
                mf.refs(offset).is_some(),
                "installed {range} at {gpa:#x} shows freed file page {offset:#x}"
            );
            let mut via_space = [0u8; 16];
            let mut via_file = [0u8; 16];
            space.read_with(gpa, &mut via_space, IoOpts::FORCE).unwrap();
            memfd.read_exact_at(&mut via_file, offset).unwrap();
            assert_eq!(
                via_file, via_space,
                "installed {range} at {gpa:#x} (file {offset:#x}) shows other bytes than the space"
            );
        }
    }
}

/// One run of the racing workload; returns (worker ops, mutator ops).
fn run_racing_workload(seed: u64, ops: u64, mutator_ops: u64, limit: Duration) -> (u64, u64) {
    let (mf, be, space) = setup();
    assert_eq!(
        space
            .map(MapOpts::anonymous(A_LEN).fixed(A_BASE).name("a"))
            .unwrap(),
        A_BASE
    );
    assert_eq!(space.map(b_opts(B_LEN).fixed(B_BASE)).unwrap(), B_BASE);
    let progress = Arc::new(Progress::new(WORKERS + 1));
    let sh = Arc::new(Shared {
        space,
        clock: AtomicU64::new(1),
        writes: (0..PAGES).map(|_| WriteRec::default()).collect(),
        zeroes: (0..PAGES).map(|_| ZeroRec::default()).collect(),
        stop: AtomicBool::new(false),
        progress: progress.clone(),
    });
    let sh2 = sh.clone();
    let be2 = be.clone();
    let worker_ops = with_watchdog(
        &format!("racing workload seed {seed:#x}"),
        WATCHDOG,
        Some(progress.clone()),
        move || {
            std::thread::scope(|s| {
                let (sh, be) = (&*sh2, &*be2);
                let m = s.spawn(move || mutator(sh, be, WORKERS, seed));
                let ws: Vec<_> = (0..WORKERS)
                    .map(|tid| s.spawn(move || worker(sh, tid, seed, ops, mutator_ops, limit)))
                    .collect();
                let mut done = 0;
                for w in ws {
                    match w.join() {
                        Ok(n) => done += n,
                        Err(p) => {
                            sh.stop.store(true, Ordering::SeqCst);
                            std::panic::resume_unwind(p);
                        }
                    }
                }
                sh.stop.store(true, Ordering::SeqCst);
                if let Err(p) = m.join() {
                    std::panic::resume_unwind(p);
                }
                done
            })
        },
    );
    let sh = Arc::try_unwrap(sh).unwrap_or_else(|_| panic!("workload still holds the space"));
    check_final_contents(&sh);
    sh.space.check_invariants().unwrap();
    check_file_refs(&mf, &[&sh.space], &[]).unwrap();
    check_backend(&sh.space, &mf, &be);
    let mutator_done = progress.ops[WORKERS].load(Ordering::Relaxed);
    drop(sh);
    assert_eq!(
        mf.allocated_bytes(),
        0,
        "teardown after the racing workload leaves memory allocated"
    );
    mf.check_invariants().unwrap();
    (worker_ops, mutator_done)
}

#[test]
fn faults_and_host_io_race_protect_unmap_remap_decommit_and_fork() {
    let started = Instant::now();
    for seed in [1u64, 0xDEAD_BEEF, 42, 7_777_777, 0x5EED] {
        let (w, m) = run_racing_workload(seed, 6_000, 2_000, Duration::from_secs(3));
        eprintln!(
            "seed {seed:#x}: {w} worker ops, {m} mutator ops, {:?} so far",
            started.elapsed()
        );
    }
}

/// Several threads fault the same address at once, all succeed, and the
/// space ends with one pma: a fault on an existing pma is not an error.
#[test]
fn simultaneous_faults_on_the_same_address_all_succeed_with_one_pma() {
    with_watchdog("same-address faults", WATCHDOG, None, || {
        for round in 0..40u64 {
            let (mf, be, space) = setup();
            let gpa = space
                .map(MapOpts::anonymous(2 * MIB).fixed(A_BASE).align(2 * MIB))
                .unwrap();
            let threads = 8;
            let barrier = Barrier::new(threads);
            let target = gpa + (round % 512) * PAGE + 8;
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (space, barrier) = (&space, &barrier);
                    s.spawn(move || {
                        let access = if (t as u64 + round) % 3 == 0 {
                            Access::Read
                        } else {
                            Access::Write
                        };
                        barrier.wait();
                        let p = space
                            .handle_fault(target, access)
                            .unwrap_or_else(|e| panic!("round {round} thread {t}: {e}"));
                        assert_eq!(p.window.start(), gpa, "round {round} thread {t}: {p:?}");
                    });
                }
            });
            let stats = space.stats();
            assert_eq!(stats.pmas, 1, "round {round}: {stats:?}");
            assert_eq!(stats.populated_bytes, 2 * MIB, "round {round}: {stats:?}");
            assert_eq!(stats.populated_total, 2 * MIB, "populated once: {stats:?}");
            let installed = be.installed();
            assert_eq!(installed.len(), 1, "round {round}: installed {installed:?}");
            assert!(installed[0].1.writable);
            space.check_invariants().unwrap();
            check_file_refs(&mf, &[&space], &[]).unwrap();
            drop(space);
            assert_eq!(mf.allocated_bytes(), 0);
        }
    });
}

/// After a fork, several threads write-fault the same copy-on-write address
/// at once: all succeed, exactly one copy is made, the parent ends with one
/// pma holding its data, and the child keeps the snapshot.
#[test]
fn simultaneous_write_faults_on_a_cow_page_copy_once() {
    with_watchdog("same-address COW faults", WATCHDOG, None, || {
        for round in 0..20u64 {
            let (mf, be, parent) = setup();
            let gpa = parent
                .map(MapOpts::anonymous(2 * MIB).fixed(A_BASE).align(2 * MIB))
                .unwrap();
            // Populate the whole window first, so the fork shares one pma.
            parent.handle_fault(gpa, Access::Write).unwrap();
            parent.write(gpa, b"before fork").unwrap();
            let child = parent.fork(Arc::new(NoopBackend)).unwrap();
            let threads = 6;
            let barrier = Barrier::new(threads);
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (parent, barrier) = (&parent, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        parent
                            .handle_fault(gpa + (t as u64 * 7 + round) % 512 * PAGE, Access::Write)
                            .unwrap_or_else(|e| panic!("round {round} thread {t}: {e}"));
                    });
                }
            });
            let stats = parent.stats();
            assert_eq!(stats.pmas, 1, "round {round}: {stats:?}");
            assert_eq!(stats.cow_copies, 1, "round {round}: copied once: {stats:?}");
            assert_eq!(
                be.installed_at(gpa).map(|(r, i)| (r.len(), i.writable)),
                Some((2 * MIB, true)),
                "round {round}"
            );
            parent.write(gpa, b"after  fork").unwrap();
            let mut buf = [0u8; 11];
            child.read(gpa, &mut buf).unwrap();
            assert_eq!(
                &buf, b"before fork",
                "round {round}: child sees the snapshot"
            );
            parent.check_invariants().unwrap();
            child.check_invariants().unwrap();
            check_file_refs(&mf, &[&parent, &child], &[]).unwrap();
            drop(child);
            drop(parent);
            assert_eq!(mf.allocated_bytes(), 0);
        }
    });
}

/// A fault racing `SharedMemory::truncate` must not leave pages past the new
/// end: once truncate returns, the object holds nothing beyond its size, no
/// space shows anything there, and faults there are bus errors.
#[test]
fn truncate_racing_faults_leaves_nothing_past_the_new_end() {
    use guestmm::mm::{Mappable, SharedMemory};
    with_watchdog("truncate vs faults", WATCHDOG, None, || {
        let (mf, _be, space) = setup();
        let obj = SharedMemory::new(mf.clone(), 4 * MIB).unwrap();
        let gpa = space
            .map(
                MapOpts::object(obj.clone() as Arc<dyn Mappable>, 0, 4 * MIB)
                    .shared()
                    .fixed(A_BASE),
            )
            .unwrap();
        let stop = AtomicBool::new(false);
        let mut leaks = 0;
        std::thread::scope(|s| {
            let faulter = s.spawn(|| {
                let mut populated = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    match space.handle_fault(gpa + 3 * MIB, Access::Write) {
                        Ok(p) => populated += (p.populated > 0) as u64,
                        Err(FaultError::Bus { .. }) => {}
                        Err(e) => panic!("fault past the end: unexpected error {e}"),
                    }
                }
                populated
            });
            // Race for a while once the faulter has populated at least once.
            while space.stats().populated_bytes == 0 {
                std::thread::yield_now();
            }
            let started = Instant::now();
            let mut round = 0;
            while started.elapsed() < Duration::from_secs(1) {
                round += 1;
                obj.truncate(2 * MIB).unwrap();
                let committed = obj.committed();
                let populated = space.stats().populated_bytes;
                if committed > 0 || populated > 0 {
                    leaks += 1;
                    eprintln!(
                        "round {round}: after truncate to 2 MiB: object committed {committed:#x}, \
                         space populated {populated:#x}, want 0 and 0"
                    );
                }
                obj.truncate(4 * MIB).unwrap();
            }
            stop.store(true, Ordering::SeqCst);
            let populating = faulter.join().unwrap();
            assert!(
                populating > 0,
                "the faulter never populated: no race was run"
            );
        });
        assert_eq!(
            leaks, 0,
            "a fault racing truncate left pages past the new end in {leaks} rounds"
        );
        space.check_invariants().unwrap();
        check_file_refs(&mf, &[&space], &[&obj]).unwrap();
        drop(space);
        drop(obj);
        assert_eq!(mf.allocated_bytes(), 0);
    });
}
