//! mm operations against Linux: the shared 10,000-operation
//! map/protect/unmap churn over 64 GiB (`benches/common/churn.rs`) on a
//! guestmm space and on the host kernel, alternating.

use crate::common::churn::{check_same_result, churn_ops, time_linux, time_mm, OPS};
use crate::common::{median, median_ms, Table, Target};

pub fn run(table: &mut Table) {
    let ops = churn_ops();
    check_same_result(&ops);
    // One untimed run each to warm caches and the allocator.
    time_mm(&ops);
    time_linux(&ops);
    let reps = crate::reps().max(9);
    let (mut ours, mut linux, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let a = time_mm(&ops);
        let b = time_linux(&ops);
        ratios.push(b.as_secs_f64() / a.as_secs_f64());
        ours.push(a);
        linux.push(b);
    }
    let how = format!("{OPS} map/protect/unmap ops over 64 GiB (shared churn sequence)");
    table.bench(
        "mm-ops/guestmm",
        median_ms(&ours),
        "ms",
        &format!("{how}: AddressSpace (NoopBackend)"),
    );
    table.bench(
        "mm-ops/linux",
        median_ms(&linux),
        "ms",
        &format!("{how}: host mmap(MAP_FIXED)/mprotect in a PROT_NONE reservation"),
    );
    let f = table.ratio(
        "mm-ops-vs-linux",
        median(&ratios),
        "our ops/s over Linux's: median of per-round ratios",
    );
    f.target(Target::AtLeast(2.0));
}
