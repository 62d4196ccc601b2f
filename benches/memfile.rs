//! allocate(4 KiB) + dec_ref with N live, fragmented allocations.
//!
//! The live set is built by allocating 2N single pages and freeing every
//! other one, so the allocation map truly holds N segments separated by
//! one-page holes (neighbours cannot merge). Each iteration allocates a page
//! (lowest fit: the first hole, which merges with its neighbours) and frees
//! it again (splitting them back), and includes the `fallocate` punch.

use std::time::Duration;

mod common;
use common::fragmented_memfile;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use guestmm::memfile::MemoryKind;
use guestmm::PAGE_SIZE;

fn alloc_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocate_4k_dec_ref");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for n in [1_000u64, 10_000, 100_000] {
        let f = fragmented_memfile(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &f, |b, f| {
            b.iter(|| {
                let r = f
                    .allocate(PAGE_SIZE, MemoryKind::Anonymous)
                    .expect("allocate");
                f.dec_ref(r).expect("dec_ref");
            })
        });
        assert_eq!(f.segment_count() as u64, n);
        f.check_invariants().expect("invariants");
    }
    g.finish();
}

criterion_group!(benches, alloc_free);
criterion_main!(benches);
