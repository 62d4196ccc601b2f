//! The map/protect/unmap churn shared by `benches/mm.rs` (criterion) and
//! `benches/compare.rs` (`ratio mm-ops-vs-linux`): 10,000 operations
//! generated once from a fixed seed, replayed on a 64 GiB guestmm space
//! (NoopBackend) and on the host kernel inside a 64 GiB `PROT_NONE`
//! reservation (`mmap(MAP_FIXED)` / `mprotect` / `mmap(PROT_NONE,
//! MAP_FIXED)` as unmap).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{AddressSpace, AddressSpaceOptions, MapOpts, NoopBackend};
use guestmm::Perms;

use super::rng::Rng;

const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;

pub const SPACE: u64 = 64 * GIB;
pub const OPS: usize = 10_000;
pub const SEED: u64 = 0x6d6d_6368_7572_6e21;
/// Ranges are multiples of this (the model tracks mappedness per unit).
const UNIT: u64 = 64 * KIB;
const UNITS: usize = (SPACE / UNIT) as usize;
/// Most operations land in this hot prefix, so they overlap, split and merge.
const HOT: u64 = GIB;

/// One operation of the churn.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Map anonymous memory, replacing what is there.
    Map {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Permissions.
        perms: Perms,
    },
    /// Change the permissions of a fully mapped range.
    Protect {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Permissions.
        perms: Perms,
    },
    /// Unmap (on the host: put the reservation's PROT_NONE back).
    Unmap {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// The operation sequence: maps (replacing what is there) and unmaps of
/// random ranges, and protects of ranges that are entirely mapped (guestmm
/// refuses to protect holes; Linux would protect the reservation).
pub fn churn_ops() -> Vec<Op> {
    let mut rng = Rng(SEED);
    let mut mapped = vec![false; UNITS];
    let perms_of = |rng: &mut Rng| match rng.below(3) {
        0 => Perms::READ,
        1 => Perms::NONE,
        _ => Perms::READ_WRITE,
    };
    let mut ops = Vec::with_capacity(OPS);
    while ops.len() < OPS {
        let span = if rng.below(10) < 8 { HOT } else { SPACE };
        let units = 1 + rng.below(64);
        let first = rng.below(span / UNIT - units + 1) as usize;
        let (gpa, len) = (first as u64 * UNIT, units * UNIT);
        let range = first..first + units as usize;
        let op = match rng.below(100) {
            0..=39 => {
                mapped[range].fill(true);
                Op::Map {
                    gpa,
                    len,
                    perms: perms_of(&mut rng),
                }
            }
            40..=74 => {
                // The longest mapped run from `first`, at most `units`.
                let run = mapped[range].iter().take_while(|m| **m).count() as u64;
                if run == 0 {
                    continue;
                }
                Op::Protect {
                    gpa,
                    len: run * UNIT,
                    perms: perms_of(&mut rng),
                }
            }
            _ => {
                mapped[range].fill(false);
                Op::Unmap { gpa, len }
            }
        };
        ops.push(op);
    }
    ops
}

pub fn new_space() -> (Arc<MemoryFile>, Arc<AddressSpace>) {
    let mf = Arc::new(MemoryFile::new("bench-churn", MemoryFileOptions::default()).unwrap());
    let opts = AddressSpaceOptions {
        size: SPACE,
        map_floor: 0,
        ..AddressSpaceOptions::default()
    };
    let space = AddressSpace::new(mf.clone(), Arc::new(NoopBackend), opts).unwrap();
    (mf, space)
}

pub fn apply_mm(space: &AddressSpace, ops: &[Op]) {
    for op in ops {
        match *op {
            Op::Map { gpa, len, perms } => {
                let opts = MapOpts::anonymous(len).fixed_replace(gpa).perms(perms);
                black_box(space.map(opts).unwrap());
            }
            Op::Protect { gpa, len, perms } => space.protect(gpa, len, perms).unwrap(),
            Op::Unmap { gpa, len } => space.unmap(gpa, len).unwrap(),
        }
    }
}

/// Times `ops` on a fresh guestmm space (creation and teardown untimed).
pub fn time_mm(ops: &[Op]) -> Duration {
    let (_mf, space) = new_space();
    let t0 = Instant::now();
    apply_mm(&space, ops);
    let t = t0.elapsed();
    drop(space);
    t
}

/// The host side: a 64 GiB `PROT_NONE` reservation that operations remap.
pub mod host {
    use super::{Op, SPACE};
    use guestmm::Perms;

    pub struct Reservation {
        base: *mut libc::c_void,
    }

    fn prot(perms: Perms) -> libc::c_int {
        let mut p = libc::PROT_NONE;
        if perms.read {
            p |= libc::PROT_READ;
        }
        if perms.write {
            p |= libc::PROT_WRITE;
        }
        if perms.execute {
            p |= libc::PROT_EXEC;
        }
        p
    }

    const ANON: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

    impl Reservation {
        pub fn new() -> Reservation {
            // SAFETY: a fresh anonymous mapping at an address the kernel
            // chooses; it aliases nothing, and it is unmapped on drop.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SPACE as usize,
                    libc::PROT_NONE,
                    ANON,
                    -1,
                    0,
                )
            };
            assert_ne!(
                base,
                libc::MAP_FAILED,
                "mmap of the 64 GiB reservation: {}",
                std::io::Error::last_os_error()
            );
            Reservation { base }
        }

        pub fn base(&self) -> *mut libc::c_void {
            self.base
        }

        fn at(&self, gpa: u64) -> *mut libc::c_void {
            debug_assert!(gpa < SPACE);
            self.base.wrapping_add(gpa as usize)
        }

        pub fn apply(&self, ops: &[Op]) {
            for op in ops {
                let rc = match *op {
                    // SAFETY: `[gpa, gpa + len)` lies inside our own
                    // reservation (the generator keeps ranges in SPACE), so
                    // MAP_FIXED replaces only pages this benchmark owns and
                    // nothing in the process references.
                    Op::Map { gpa, len, perms } => unsafe {
                        mmap_fixed(self.at(gpa), len, prot(perms))
                    },
                    // SAFETY: as above; the pages are never accessed.
                    Op::Protect { gpa, len, perms } => unsafe {
                        libc::mprotect(self.at(gpa), len as usize, prot(perms))
                    },
                    // SAFETY: as above; "unmap" puts the reservation's
                    // PROT_NONE pages back so the range stays ours.
                    Op::Unmap { gpa, len } => unsafe {
                        mmap_fixed(self.at(gpa), len, libc::PROT_NONE)
                    },
                };
                assert_eq!(rc, 0, "{op:?}: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// # Safety
    /// `[addr, addr + len)` must lie in memory the caller owns and nothing
    /// references.
    unsafe fn mmap_fixed(addr: *mut libc::c_void, len: u64, prot: libc::c_int) -> libc::c_int {
        // SAFETY: the caller guarantees the range is ours to replace.
        let p = unsafe { libc::mmap(addr, len as usize, prot, ANON | libc::MAP_FIXED, -1, 0) };
        if p == libc::MAP_FAILED {
            -1
        } else {
            debug_assert_eq!(p, addr);
            0
        }
    }

    impl Drop for Reservation {
        fn drop(&mut self) {
            // SAFETY: `base` is the start of our SPACE-byte reservation,
            // which nothing references any more.
            let rc = unsafe { libc::munmap(self.base, SPACE as usize) };
            debug_assert_eq!(rc, 0);
        }
    }
}

/// Checks once that both sides end in the same state: the coalesced
/// accessible ranges of guestmm's `maps()` equal those of
/// `/proc/self/maps` inside the reservation (`PROT_NONE` and unmapped look
/// alike on the host, so only accessible ranges are compared).
pub fn check_same_result(ops: &[Op]) {
    let (_mf, space) = new_space();
    apply_mm(&space, ops);
    let mut ours: Vec<(u64, u64, String)> = Vec::new();
    for m in space.maps().into_iter().filter(|m| m.perms.read) {
        push_coalesced(
            &mut ours,
            m.range.start(),
            m.range.end(),
            m.perms.to_string(),
        );
    }
    let r = host::Reservation::new();
    r.apply(ops);
    let base = r.base() as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut linux: Vec<(u64, u64, String)> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let (s, e) = range.split_once('-').unwrap();
        let s = u64::from_str_radix(s, 16).unwrap();
        let e = u64::from_str_radix(e, 16).unwrap();
        if s < base || e > base + SPACE || !perms.starts_with('r') {
            continue;
        }
        // "rw-p" -> "rw-" like Perms' Display.
        push_coalesced(&mut linux, s - base, e - base, perms[..3].to_string());
    }
    drop(r);
    assert_eq!(
        ours.len(),
        linux.len(),
        "guestmm and Linux disagree after the churn"
    );
    assert_eq!(ours, linux, "guestmm and Linux disagree after the churn");
}

fn push_coalesced(v: &mut Vec<(u64, u64, String)>, start: u64, end: u64, perms: String) {
    match v.last_mut() {
        Some(last) if last.1 == start && last.2 == perms => last.1 = end,
        _ => v.push((start, end, perms)),
    }
}

/// Times `ops` in a fresh host reservation (creation and teardown untimed).
pub fn time_linux(ops: &[Op]) -> Duration {
    let r = host::Reservation::new();
    let t0 = Instant::now();
    r.apply(ops);
    let t = t0.elapsed();
    drop(r);
    t
}
