//! Benchmarks of the mm core.
//!
//! - `fault/*`: fault throughput over a large anonymous vma with the
//!   NoopBackend, with 4 KiB and 2 MiB fault-around windows. Each iteration
//!   faults every window of the vma once (write faults, in address order);
//!   the vma is decommitted between iterations, outside the timing, so every
//!   iteration really populates. Throughput is in faults per second.
//! - `churn/*`: the same 10,000 map/protect/unmap operations (generated
//!   once from a fixed seed) applied to a 64 GiB guestmm space (NoopBackend)
//!   and to the host kernel inside a 64 GiB `PROT_NONE` reservation
//!   (`mmap(MAP_FIXED)` / `mprotect` / `mmap(PROT_NONE, MAP_FIXED)` as
//!   unmap). Before criterion runs, the binary also times both side by side
//!   (alternating, medians) and prints `ratio mm-ops-vs-linux: X.XX`, our
//!   operations per second over Linux's.
//!
//! Run: `cargo bench --bench mm`.
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::{AddressSpace, AddressSpaceOptions, MapOpts, NoopBackend};
use guestmm::Access;

use common::churn::{check_same_result, churn_ops, time_linux, time_mm, Op, SEED};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn quick(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("mm");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g
}

// ---------------------------------------------------------------- faults

/// Faults every `window` of a `vma_len` anonymous vma per iteration.
fn bench_faults(c: &mut Criterion) {
    let mut g = quick(c);
    for (name, window, vma_len) in [
        ("4k_window", 4 * KIB, 64 * MIB),
        ("2m_window", 2 * MIB, 4 * GIB),
    ] {
        let mf = Arc::new(MemoryFile::new("bench-fault", MemoryFileOptions::default()).unwrap());
        let opts = AddressSpaceOptions {
            fault_around: window,
            fault_around_max: window,
            ..AddressSpaceOptions::default()
        };
        let space = AddressSpace::new(mf.clone(), Arc::new(NoopBackend), opts).unwrap();
        let base = space
            .map(MapOpts::anonymous(vma_len).fixed(GIB).align(2 * MIB))
            .unwrap();
        let faults = vma_len / window;
        g.throughput(Throughput::Elements(faults));
        g.bench_function(BenchmarkId::new("fault", name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    for k in 0..faults {
                        black_box(
                            space
                                .handle_fault(base + k * window, Access::Write)
                                .unwrap(),
                        );
                    }
                    total += t0.elapsed();
                    space.decommit(base, vma_len).unwrap();
                }
                total
            })
        });
        assert_eq!(space.stats().populated_bytes, 0);
        drop(space);
        assert_eq!(mf.allocated_bytes(), 0);
    }
    g.finish();
}

fn bench_churn(c: &mut Criterion, ops: &[Op]) {
    let mut g = quick(c);
    g.throughput(Throughput::Elements(ops.len() as u64));
    g.bench_function("churn/guestmm", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| time_mm(ops)).sum())
    });
    g.bench_function("churn/linux", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| time_linux(ops)).sum())
    });
    g.finish();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Alternates guestmm and Linux runs of the same sequence and prints the
/// ratio of our operations per second to Linux's from the medians.
fn print_ratio(ops: &[Op]) {
    const REPS: usize = 9;
    // One untimed run each to warm caches and the allocator.
    time_mm(ops);
    time_linux(ops);
    let (mut ours, mut linux) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        ours.push(time_mm(ops));
        linux.push(time_linux(ops));
    }
    let (m_ours, m_linux) = (median(ours), median(linux));
    let per_sec = |d: Duration| ops.len() as f64 / d.as_secs_f64();
    println!(
        "churn of {} ops over 64 GiB, median of {REPS} alternating runs: guestmm {:?} ({:.0} ops/s), linux {:?} ({:.0} ops/s)",
        ops.len(),
        m_ours,
        per_sec(m_ours),
        m_linux,
        per_sec(m_linux)
    );
    println!(
        "ratio mm-ops-vs-linux: {:.2}",
        m_linux.as_secs_f64() / m_ours.as_secs_f64()
    );
}

fn main() {
    let ops = churn_ops();
    let count = |f: fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
    println!(
        "churn sequence: {} maps, {} protects, {} unmaps (seed {SEED:#x})",
        count(|o| matches!(o, Op::Map { .. })),
        count(|o| matches!(o, Op::Protect { .. })),
        count(|o| matches!(o, Op::Unmap { .. }))
    );
    check_same_result(&ops);
    print_ratio(&ops);
    let mut c = Criterion::default().configure_from_args();
    bench_faults(&mut c);
    bench_churn(&mut c, &ops);
    c.final_summary();
}
