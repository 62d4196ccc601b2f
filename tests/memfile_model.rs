//! Random allocate / inc_ref / dec_ref / decommit / read / write sequences
//! against a per-page model, with `check_invariants` after every step.

use guestmm::memfile::{MemoryFile, MemoryFileError, MemoryFileOptions, MemoryKind};
use guestmm::{FileRange, Range, PAGE_SIZE};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;

fn small_file(max_size: u64) -> MemoryFile {
    MemoryFile::new(
        "model",
        MemoryFileOptions {
            max_size,
            chunk_size: 2 << 20,
            initial_size: 0,
        },
    )
    .expect("create memory file")
}

fn pages(start_page: u64, n: u64) -> FileRange {
    Range::pages(start_page * P, n * P).unwrap()
}

/// Pages in the 4 MiB file; ranges picked for ref ops stay in the
/// first `WINDOW` pages so they often hit allocations.
const MAX_PAGES: u64 = 1024;
const WINDOW: u64 = 48;

#[derive(Clone, Debug)]
enum Op {
    Alloc(u64, MemoryKind),
    IncRef(u64, u64),
    DecRef(u64, u64),
    Decommit(u64, u64),
    Write(u64, u8),
    Read(u64),
}

fn kind() -> impl Strategy<Value = MemoryKind> {
    prop::sample::select(MemoryKind::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..=8u64, kind()).prop_map(|(n, k)| Op::Alloc(n, k)),
        2 => (0..WINDOW, 1..=6u64).prop_map(|(s, n)| Op::IncRef(s, n)),
        3 => (0..WINDOW, 1..=6u64).prop_map(|(s, n)| Op::DecRef(s, n)),
        1 => (0..WINDOW, 1..=4u64).prop_map(|(s, n)| Op::Decommit(s, n)),
        2 => (0..WINDOW, 1..=255u8).prop_map(|(p, b)| Op::Write(p, b)),
        1 => (0..WINDOW).prop_map(Op::Read),
    ]
}

/// What the model knows about each page.
#[derive(Clone, Copy, Default)]
struct Page {
    refs: u64,
    kind: Option<MemoryKind>,
    byte: u8,
    committed: bool,
}

struct Model {
    pages: Vec<Page>,
}

impl Model {
    fn allocated(&self, s: u64, n: u64) -> bool {
        (s..s + n).all(|p| self.pages[p as usize].refs > 0)
    }

    fn lowest_fit(&self, n: u64) -> Option<u64> {
        (0..=MAX_PAGES - n).find(|&s| (s..s + n).all(|p| self.pages[p as usize].refs == 0))
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let f = small_file(MAX_PAGES * P);
    let mut m = Model {
        pages: vec![Page::default(); MAX_PAGES as usize],
    };
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc(n, k) => {
                let got = f.allocate(n * P, k);
                match m.lowest_fit(n) {
                    Some(s) => {
                        prop_assert_eq!(got.unwrap(), pages(s, n), "step {}", i);
                        for p in s..s + n {
                            m.pages[p as usize] = Page {
                                refs: 1,
                                kind: Some(k),
                                ..Page::default()
                            };
                        }
                    }
                    None => prop_assert!(
                        matches!(got, Err(MemoryFileError::OutOfMemory { .. })),
                        "step {}: got {:?}",
                        i,
                        got
                    ),
                }
            }
            Op::IncRef(s, n) => {
                let got = f.inc_ref(pages(s, n));
                if m.allocated(s, n) {
                    got.unwrap();
                    for p in s..s + n {
                        m.pages[p as usize].refs += 1;
                    }
                } else {
                    prop_assert!(
                        matches!(got, Err(MemoryFileError::NotAllocated { .. })),
                        "step {}: got {:?}",
                        i,
                        got
                    );
                }
            }
            Op::DecRef(s, n) => {
                let got = f.dec_ref(pages(s, n));
                if m.allocated(s, n) {
                    got.unwrap();
                    for p in s..s + n {
                        let pg = &mut m.pages[p as usize];
                        pg.refs -= 1;
                        if pg.refs == 0 {
                            *pg = Page::default();
                        }
                    }
                } else {
                    prop_assert!(
                        matches!(got, Err(MemoryFileError::NotAllocated { .. })),
                        "step {}: got {:?}",
                        i,
                        got
                    );
                }
            }
            Op::Decommit(s, n) => {
                let got = f.decommit(pages(s, n));
                if m.allocated(s, n) {
                    got.unwrap();
                    for p in s..s + n {
                        m.pages[p as usize].byte = 0;
                        m.pages[p as usize].committed = false;
                    }
                } else {
                    prop_assert!(
                        matches!(got, Err(MemoryFileError::NotAllocated { .. })),
                        "step {}: got {:?}",
                        i,
                        got
                    );
                }
            }
            Op::Write(p, b) => {
                let got = f.write_at(p * P + 11, &[b]);
                if m.allocated(p, 1) {
                    got.unwrap();
                    m.pages[p as usize].byte = b;
                    m.pages[p as usize].committed = true;
                } else {
                    prop_assert!(
                        matches!(got, Err(MemoryFileError::NotAllocated { .. })),
                        "step {}: got {:?}",
                        i,
                        got
                    );
                }
            }
            Op::Read(p) => {
                let mut buf = [0xffu8];
                let got = f.read_at(p * P + 11, &mut buf);
                if m.allocated(p, 1) {
                    got.unwrap();
                    prop_assert_eq!(buf[0], m.pages[p as usize].byte, "step {} page {}", i, p);
                    // A read fault commits a shmem page.
                    m.pages[p as usize].committed = true;
                } else {
                    prop_assert!(got.is_err());
                    prop_assert_eq!(buf[0], 0xff, "failed read must not touch buf");
                }
            }
        }
        if let Err(e) = f.check_invariants() {
            return Err(TestCaseError::fail(format!("step {i}: {e}")));
        }
        for (p, pg) in m.pages.iter().enumerate() {
            let want = (pg.refs > 0).then_some(pg.refs);
            prop_assert_eq!(f.refs(p as u64 * P), want, "step {} page {}", i, p);
            prop_assert_eq!(f.kind(p as u64 * P), pg.kind, "step {} page {}", i, p);
        }
        let u = f.usage().unwrap();
        for k in MemoryKind::ALL {
            let want = m
                .pages
                .iter()
                .filter(|pg| pg.committed && pg.kind == Some(k))
                .count() as u64
                * P;
            prop_assert_eq!(u.committed(k), want, "step {} kind {:?}", i, k);
        }
        let allocated = m.pages.iter().filter(|pg| pg.refs > 0).count() as u64 * P;
        prop_assert_eq!(u.allocated_bytes, allocated);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_sequences_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
