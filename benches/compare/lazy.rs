//! Lazy memory where eager memory has no answer: `scatter` (every page in
//! pseudo-random order first, so no two windows are adjacent), `sparse` (one
//! page per 2 MiB over 1 GiB: what does a mostly idle guest commit?) and the
//! live memslots after a 1 GiB sequential `touch`. `guestmm` is the library's
//! default configuration (`RunOptions::default()`) at run time.

use guestmm::vmm::runner::RunOptions;
use kvm_ioctls::Kvm;

use super::touch::{eager_anon, guestmm_default, kvm_faults, med, ratio_of, rounds, Sample};
use crate::common::{median_ms, Table, Target};

const MIB: u64 = 1 << 20;
/// RAM of the scatter run (as the touch section's).
const SCATTER_RAM: u64 = 256 * MIB;
/// RAM of the sparse and 1 GiB runs.
const GIB: u64 = 1024 * MIB;
const PAGE: u64 = 4096;

/// `scatter`, 256 MiB: guestmm default vs eager anonymous memory.
pub fn scatter(kvm: &Kvm, table: &mut Table) {
    let configs = [guestmm_default(), eager_anon()];
    let samples = rounds(kvm, "scatter", SCATTER_RAM, &configs);
    let how = format!("scatter guest, {} MiB, 1 vCPU", SCATTER_RAM / MIB);
    for (i, c) in configs.iter().enumerate() {
        let total: Vec<_> = samples[i].iter().map(|x| x.total).collect();
        table.bench(
            &format!("scatter-total/{}", c.name),
            median_ms(&total),
            "ms",
            &format!("{how}: first vCPU entry → EXIT"),
        );
    }
    let f = table.ratio(
        "scatter-total/guestmm/eager-anon",
        ratio_of(&samples[0], &samples[1], |x| x.total.as_secs_f64()),
        "scatter, default configuration ÷ eager anonymous: median of per-round time ratios",
    );
    f.target(Target::AtMost(0.35));
    kvm_faults(table, "scatter-kvm-page-faults", &configs, &samples, &how);
    table.bench(
        "scatter-memory-exits/guestmm",
        med(&samples[0], |x| x.memory_exits as f64),
        "exits",
        &format!("{how}: guestmm memory exits"),
    );
    table.bench(
        "scatter-max-live-ram-slots/guestmm",
        med(&samples[0], |x| x.max_live as f64) - 1.0,
        "slots",
        "most live slots minus the boot region's",
    );
}

/// `sparse` over 1 GiB (guestmm default vs eager anonymous), and the slots
/// left after a 1 GiB sequential `touch` (guestmm default).
pub fn sparse(kvm: &Kvm, table: &mut Table) {
    let configs = [guestmm_default(), eager_anon()];
    let samples = rounds(kvm, "sparse", GIB, &configs);
    let touched = GIB / (2 * MIB);
    let touched_bytes = (touched * PAGE) as f64;
    let how = format!("sparse guest, 1 GiB, {touched} pages touched (one per 2 MiB)");
    // "Committed ≤ 1.1 × touched + one window": one window is the largest
    // fault-around window of the default configuration.
    let window = RunOptions::default().fault_around_max as f64;
    let bound = 1.1 + window / touched_bytes;
    for (i, c) in configs.iter().enumerate() {
        let f = table.bench(
            &format!("sparse-committed-ratio/{}", c.name),
            med(&samples[i], |x| x.committed as f64) / touched_bytes,
            "×",
            &format!(
                "{how}: committed ÷ (pages touched × 4 KiB); guestmm: resident MemoryFile \
                 bytes under pmas, eager-anon: RSS growth; target 1.1 + one {} MiB window",
                window as u64 / MIB
            ),
        );
        if c.name == "guestmm" {
            f.target(Target::AtMost((bound * 100.0).floor() / 100.0));
        }
        let total: Vec<_> = samples[i].iter().map(|x| x.total).collect();
        table.bench(
            &format!("sparse-total/{}", c.name),
            median_ms(&total),
            "ms",
            &format!("{how}: first vCPU entry → EXIT"),
        );
    }
    kvm_faults(table, "sparse-kvm-page-faults", &configs, &samples, &how);
    let g = &samples[0];
    table.bench(
        "sparse-memory-exits/guestmm",
        med(g, |x| x.memory_exits as f64),
        "exits",
        &format!("{how}: guestmm memory exits"),
    );
    let f = table.bench(
        "sparse-memory-exits-per-window/guestmm",
        med(g, |x: &Sample| {
            x.memory_exits as f64 / x.windows.max(1) as f64
        }),
        "exits/window",
        "memory exits ÷ fault-around windows installed",
    );
    f.target(Target::AtMost(1.0));

    // The slot count after a 1 GiB sequential touch: counts, not times, so
    // fewer rounds would do, but it is cheap enough to run as many.
    let configs = [guestmm_default()];
    let samples = rounds(kvm, "touch", GIB, &configs);
    let f = table.bench(
        "ram-slots-after-1g/guestmm",
        med(&samples[0], |x| x.live_end as f64) - 1.0,
        "slots",
        "touch guest, 1 GiB, default configuration: live slots at the guest's exit minus the boot region's",
    );
    f.target(Target::AtMost(12.0));
    let f = table.bench(
        "slot-deletes-1g/guestmm",
        med(&samples[0], |x| x.slot_deletes as f64),
        "slots",
        "touch guest, 1 GiB, default configuration: slot deletes during the run (0 unless the slot budget is reached)",
    );
    f.target(Target::AtMost(0.0));
    table.bench(
        "max-live-ram-slots-1g/guestmm",
        med(&samples[0], |x| x.max_live as f64) - 1.0,
        "slots",
        "touch guest, 1 GiB: most live slots minus the boot region's",
    );
    kvm_faults(
        table,
        "touch-1g-kvm-page-faults",
        &configs,
        &samples,
        "touch guest, 1 GiB",
    );
}
