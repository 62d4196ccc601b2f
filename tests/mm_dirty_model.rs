//! Dirty tracking at the mm level, against the recording backend (which
//! can simulate guest writes into a KVM-like log): host writes, pins,
//! copy-on-write breaks, decommits, unmaps and forks mark what they change,
//! guest writes reach the sink through harvests (explicit, or before the
//! backend removes or write-protects what they wrote), and a seeded random
//! model check proves no written page is ever missing from a take.

mod common;
use common::rng::Rng;
use common::setup;

use std::collections::BTreeSet;
use std::sync::Arc;

use guestmm::dirty::DirtyPages;
use guestmm::mm::{AddressSpace, IoOpts, MapOpts, RecordingBackend, SharedMemory};
use guestmm::{Access, Perms, Range, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const BASE: u64 = 1 << 30;

fn pages_of(d: &DirtyPages) -> BTreeSet<u64> {
    d.pages().collect()
}

fn set(pages: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    pages.into_iter().collect()
}

fn page(n: u64) -> u64 {
    BASE + n * PAGE_SIZE
}

#[test]
fn host_writes_mark_exactly_their_pages() {
    let (_mf, _be, space) = setup("dirty-host");
    space.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    space.write(page(0), b"before tracking").unwrap();
    assert!(
        space.take_dirty().unwrap().is_empty(),
        "not tracking: empty"
    );
    space.start_dirty_tracking().unwrap();
    assert!(space.is_dirty_tracking());
    assert!(
        space.take_dirty().unwrap().is_empty(),
        "earlier writes are not reported"
    );

    // A write across a page boundary marks both pages; a read marks nothing.
    space.write(page(3) + PAGE_SIZE - 2, &[1, 2, 3, 4]).unwrap();
    let mut buf = [0u8; 64];
    space.read(page(9), &mut buf).unwrap();
    space
        .zero(page(20), 3 * PAGE_SIZE, IoOpts::default())
        .unwrap();
    // vm-memory writes through `SpaceMemory`.
    let mem = space.guest_memory(IoOpts::default());
    mem.write_slice(&[7u8; 10], GuestAddress(page(30) + 5))
        .unwrap();
    let mut rb = [0u8; 10];
    mem.read_slice(&mut rb, GuestAddress(page(31))).unwrap();
    let d = space.take_dirty().unwrap();
    assert_eq!(
        pages_of(&d),
        set([page(3), page(4), page(20), page(21), page(22), page(30)])
    );
    assert_eq!(
        d.ranges(),
        vec![
            Range::new(page(3), page(5)).unwrap(),
            Range::new(page(20), page(23)).unwrap(),
            Range::new(page(30), page(31)).unwrap(),
        ]
    );
    assert!(space.take_dirty().unwrap().is_empty(), "a take clears");

    // A failed write (permission) marks nothing.
    space.protect(page(40), PAGE_SIZE, Perms::READ).unwrap();
    assert!(space.write(page(40), b"x").is_err());
    assert!(space.take_dirty().unwrap().is_empty());

    space.stop_dirty_tracking();
    assert!(!space.is_dirty_tracking());
    space.write(page(1), b"after").unwrap();
    assert!(space.take_dirty().unwrap().is_empty());
}

#[test]
fn region_view_accesses_mark_their_pages() {
    let (_mf, _be, space) = setup("dirty-regions");
    space.map(MapOpts::anonymous(MIB).fixed(BASE)).unwrap();
    space.start_dirty_tracking().unwrap();
    let mem = space.regions(IoOpts::default()).unwrap();
    mem.write_slice(b"hello", GuestAddress(page(3) + 10))
        .unwrap();
    assert_eq!(pages_of(&space.take_dirty().unwrap()), set([page(3)]));
    // Served as a write (module docs of `regions`): reported too.
    let mut b = [0u8; 4];
    mem.read_slice(&mut b, GuestAddress(page(7))).unwrap();
    assert_eq!(pages_of(&space.take_dirty().unwrap()), set([page(7)]));
}

#[test]
fn truncation_marks_the_populated_pages_it_drops() {
    let (mf, _be, space) = setup("dirty-truncate");
    let obj = SharedMemory::new(mf.clone(), 8 * PAGE_SIZE).unwrap();
    // A private mapping: its copies past the new end go too.
    space
        .map(MapOpts::object(obj.clone(), 0, 8 * PAGE_SIZE).fixed(BASE))
        .unwrap();
    space.write(page(1), b"copy").unwrap();
    space.write(page(6), b"copy").unwrap();
    space.start_dirty_tracking().unwrap();
    obj.truncate(4 * PAGE_SIZE).unwrap();
    let d = space.take_dirty().unwrap();
    assert!(d.contains(page(6)) && !d.contains(page(1)), "{d:?}");
    assert!(d.pages().all(|p| p >= page(4)), "{d:?}");
}

#[test]
fn pins_for_write_mark_on_pin_and_unpin() {
    let (_mf, _be, space) = setup("dirty-pin");
    space.map(MapOpts::anonymous(MIB).fixed(BASE)).unwrap();
    space.start_dirty_tracking().unwrap();
    let r = space
        .pin(page(2), 2 * PAGE_SIZE, Access::Read, IoOpts::default())
        .unwrap();
    assert!(
        space.take_dirty().unwrap().is_empty(),
        "a read pin marks nothing"
    );
    space.unpin(r).unwrap();
    let w = space
        .pin(page(5), 10, Access::Write, IoOpts::default())
        .unwrap();
    assert_eq!(pages_of(&space.take_dirty().unwrap()), set([page(5)]));
    space.unpin(w).unwrap();
    assert_eq!(
        pages_of(&space.take_dirty().unwrap()),
        set([page(5)]),
        "and on unpin"
    );
}

#[test]
fn guest_writes_are_harvested_even_across_removal_and_protection() {
    let (_mf, be, space) = setup("dirty-guest");
    space.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    space.handle_fault(page(0), Access::Write).unwrap();
    // Not logging: the backend's simulated log stays empty.
    be.guest_write(page(1), b"untracked").unwrap();
    space.start_dirty_tracking().unwrap();
    be.guest_write(page(2), b"a").unwrap();
    be.guest_write(page(7), b"b").unwrap();
    assert_eq!(
        pages_of(&space.take_dirty().unwrap()),
        set([page(2), page(7)])
    );
    // Written, then write-protected before the take: the backend harvests
    // before protecting.
    be.guest_write(page(8), b"c").unwrap();
    space.protect(BASE, 2 * MIB, Perms::READ).unwrap();
    assert!(be.guest_write(page(9), b"d").is_err(), "read-only now");
    assert_eq!(pages_of(&space.take_dirty().unwrap()), set([page(8)]));
    // Written, then protected to nothing (removed from the guest).
    space.protect(BASE, 2 * MIB, Perms::ALL).unwrap();
    space.handle_fault(page(0), Access::Write).unwrap();
    be.guest_write(page(10), b"e").unwrap();
    space.protect(page(0), 2 * MIB, Perms::NONE).unwrap();
    assert_eq!(pages_of(&space.take_dirty().unwrap()), set([page(10)]));
}

#[test]
fn decommit_unmap_and_object_decommit_mark_what_changes() {
    let (mf, _be, space) = setup("dirty-drop");
    space.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    for p in [0, 1, 2, 600] {
        space.write(page(p), b"data").unwrap();
    }
    space.start_dirty_tracking().unwrap();
    // Decommit marks the populated pages it drops (they read as zeros
    // now); unpopulated pages already did.
    space.decommit(page(0), 2 * MIB).unwrap();
    let d = space.take_dirty().unwrap();
    assert!(d.contains(page(0)) && d.contains(page(2)) && !d.contains(page(600)));
    assert!(d.page_count() <= 512, "only the decommitted range: {d:?}");
    space.unmap(page(512), 2 * MIB).unwrap();
    assert!(space.take_dirty().unwrap().contains(page(600)));

    // A shared object's decommit marks the range mapped over it.
    let obj = SharedMemory::new(mf.clone(), 2 * MIB).unwrap();
    let at = space
        .map(
            MapOpts::object(obj.clone(), 0, 2 * MIB)
                .fixed(BASE + 8 * MIB)
                .shared(),
        )
        .unwrap();
    space.write(at, b"shared").unwrap();
    assert!(space.take_dirty().unwrap().contains(at));
    obj.decommit(Range::new(0, 2 * PAGE_SIZE).unwrap()).unwrap();
    let d = space.take_dirty().unwrap();
    assert_eq!(pages_of(&d), set([at, at + PAGE_SIZE]));
    let mut b = [1u8; 6];
    space.read(at, &mut b).unwrap();
    assert_eq!(b, [0; 6], "decommitted: zeros");
}

#[test]
fn cow_breaks_mark_the_page_and_forks_track_apart() {
    let (_mf, _be, parent) = setup("dirty-cow");
    parent.map(MapOpts::anonymous(4 * MIB).fixed(BASE)).unwrap();
    for p in 0..64 {
        parent.write(page(p), &[p as u8; 16]).unwrap();
    }
    parent.start_dirty_tracking().unwrap();
    let be = Arc::new(RecordingBackend::new());
    let child = parent.fork(be.clone()).unwrap();
    assert!(
        parent.take_dirty().unwrap().is_empty(),
        "a fork changes no content"
    );
    assert!(!child.is_dirty_tracking(), "tracking is not inherited");
    child.start_dirty_tracking().unwrap();
    // A page-granular break (the KVM fault thread's call) marks its page,
    // in the space that broke it only.
    let b = child.break_cow_page(page(5) + 100).unwrap();
    assert!(!b.broken.is_empty());
    assert_eq!(pages_of(&child.take_dirty().unwrap()), set([page(5)]));
    assert!(parent.take_dirty().unwrap().is_empty());
    // A host write to copy-on-write memory breaks it and marks its bytes.
    parent.write(page(6), b"parent").unwrap();
    assert_eq!(pages_of(&parent.take_dirty().unwrap()), set([page(6)]));
    assert!(child.take_dirty().unwrap().is_empty());
    // The child's guest writes after a write fault (a chunk break).
    child.handle_fault(page(40), Access::Write).unwrap();
    be.guest_write(page(41), b"guest").unwrap();
    let d = child.take_dirty().unwrap();
    assert!(d.contains(page(41)), "{d:?}");
    drop(child);
    assert!(
        parent.take_dirty().unwrap().is_empty(),
        "the child's drop changes nothing here"
    );
}

/// What the model expects of a take: every page written since the last
/// take (`must`), plus pages a documented extra may report (`may`).
#[derive(Default)]
struct Model {
    must: BTreeSet<u64>,
    may: BTreeSet<u64>,
}

impl Model {
    fn wrote(&mut self, gpa: u64, len: u64) {
        let mut p = gpa - gpa % PAGE_SIZE;
        while p < gpa + len {
            self.must.insert(p);
            p += PAGE_SIZE;
        }
    }
    fn may(&mut self, gpa: u64, len: u64) {
        for p in (gpa..gpa + len).step_by(PAGE_SIZE as usize) {
            self.may.insert(p);
        }
    }
    fn check(&mut self, got: &DirtyPages, step: usize, seed: u64) {
        let got = pages_of(got);
        let lost: Vec<_> = self.must.difference(&got).collect();
        assert!(lost.is_empty(), "seed {seed} step {step}: lost {lost:x?}");
        let extra: Vec<_> = got
            .iter()
            .filter(|p| !self.must.contains(p) && !self.may.contains(p))
            .collect();
        assert!(
            extra.is_empty(),
            "seed {seed} step {step}: undocumented extra {extra:x?}"
        );
        self.must.clear();
        self.may.clear();
    }
}

fn random_run(seed: u64) {
    const SPAN: u64 = 8 * MIB;
    let (mf, be, space) = setup("dirty-model");
    space.map(MapOpts::anonymous(SPAN).fixed(BASE)).unwrap();
    space.start_dirty_tracking().unwrap();
    let mut rng = Rng(seed);
    let mut model = Model::default();
    let mut forks: Vec<Arc<AddressSpace>> = Vec::new();
    let mut pins = Vec::new();
    for step in 0..400 {
        let p = rng.below(SPAN / PAGE_SIZE);
        let gpa = BASE + p * PAGE_SIZE;
        let len = rng.range(1, 8) * PAGE_SIZE;
        let len = len.min(BASE + SPAN - gpa);
        match rng.below(12) {
            0 | 1 => {
                let off = rng.below(PAGE_SIZE);
                let n = rng.range(1, 2 * PAGE_SIZE).min(BASE + SPAN - gpa - off);
                if space
                    .write(gpa + off, &vec![step as u8; n as usize])
                    .is_ok()
                {
                    model.wrote(gpa + off, n);
                }
            }
            2 | 3 => {
                // A guest write: fault the page in for writing, then write
                // through the backend (as KVM would).
                if space.handle_fault(gpa, Access::Write).is_ok()
                    && be.guest_write(gpa, &[step as u8; 8]).is_ok()
                {
                    model.wrote(gpa, 8);
                }
            }
            4 => {
                if space.zero(gpa, len, IoOpts::default()).is_ok() {
                    model.wrote(gpa, len);
                }
            }
            5 => {
                let perms = rng.pick(&[Perms::READ, Perms::ALL, Perms::NONE, Perms::ALL]);
                space.protect(gpa, len, perms).unwrap();
            }
            6 => {
                space.decommit(gpa, len).unwrap();
                model.may(gpa, len);
            }
            7 => {
                space.unmap(gpa, len).unwrap();
                model.may(gpa, len);
                space.map(MapOpts::anonymous(len).fixed(gpa)).unwrap();
            }
            8 => {
                let child = space.fork(Arc::new(RecordingBackend::new())).unwrap();
                if rng.chance(50) {
                    forks.push(child);
                }
                if forks.len() > 3 {
                    let c = forks.remove(0);
                    let _ = c.write(gpa, b"child");
                }
            }
            9 => {
                if let Ok(b) = space.break_cow_page(gpa) {
                    if !b.broken.is_empty() {
                        model.may(gpa, PAGE_SIZE);
                    }
                }
            }
            10 => {
                if rng.chance(50) {
                    if let Ok(pin) = space.pin(gpa, len, Access::Write, IoOpts::default()) {
                        model.may(gpa, len);
                        pins.push((pin, gpa, len));
                    }
                } else if let Some((pin, g, l)) = pins.pop() {
                    space.unpin(pin).unwrap();
                    model.may(g, l);
                }
            }
            _ => {
                let got = space.take_dirty().unwrap();
                model.check(&got, step, seed);
                // Pins still held may be reported again at unpin.
            }
        }
        space.check_invariants().unwrap();
        for (_, g, l) in &pins {
            model.may(*g, *l);
        }
    }
    for (pin, _, _) in pins {
        space.unpin(pin).unwrap();
    }
    drop(forks);
    drop(space);
    drop(be);
    drop(mf);
}

#[test]
fn random_steps_never_lose_a_written_page() {
    for seed in 1..=12 {
        random_run(seed);
    }
}
