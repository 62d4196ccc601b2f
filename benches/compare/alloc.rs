//! Allocator scaling: allocate(4 KiB) + dec_ref with 100,000 live,
//! fragmented allocations over the same with 1,000 (the live set is built
//! as in `benches/memfile.rs`: 2N single pages, every other one freed).

use std::time::Instant;

use guestmm::memfile::{MemoryFile, MemoryKind};
use guestmm::PAGE_SIZE;

use crate::common::{fragmented_memfile, median, Table, Target};

/// Allocate/free pairs per timed batch.
const BATCH: u32 = 2_000;

/// Nanoseconds per allocate + dec_ref pair, over one batch.
fn batch_ns(f: &MemoryFile) -> f64 {
    let t = Instant::now();
    for _ in 0..BATCH {
        let r = f
            .allocate(PAGE_SIZE, MemoryKind::Anonymous)
            .expect("allocate");
        f.dec_ref(r).expect("dec_ref");
    }
    t.elapsed().as_secs_f64() * 1e9 / f64::from(BATCH)
}

pub fn run(table: &mut Table) {
    let sizes = [1_000u64, 100_000];
    let files: Vec<MemoryFile> = sizes.iter().map(|&n| fragmented_memfile(n)).collect();
    for f in &files {
        batch_ns(f); // warm up
    }
    let reps = crate::reps().max(5) * 3;
    let mut ns = vec![Vec::new(); sizes.len()];
    let mut ratios = Vec::new();
    for _ in 0..reps {
        let a = batch_ns(&files[0]);
        let b = batch_ns(&files[1]);
        ns[0].push(a);
        ns[1].push(b);
        ratios.push(b / a);
    }
    for (i, n) in sizes.iter().enumerate() {
        assert_eq!(files[i].segment_count() as u64, *n);
        table.bench(
            &format!("alloc-4k-free/{}k-live", n / 1000),
            median(&ns[i]),
            "ns",
            "MemoryFile allocate(4 KiB) + dec_ref (with its fallocate punch), fragmented live set",
        );
    }
    let f = table.ratio(
        "alloc-100k/1k",
        median(&ratios),
        "median of per-batch ratios, batches alternating",
    );
    f.target(Target::AtMost(3.0));
}
