//! The side-by-side comparison runner (`make bench`, or
//! `cargo bench --bench compare [-- SECTION...]`).
//!
//! Sections: `touch` (guest-memory touch: eager anonymous memory vs guestmm
//! eager and lazy and the peers: prefilled, `MADV_HUGEPAGE`, userfaultfd
//! handlers; KVM's page-fault counts from `KVM_GET_STATS_FD`), `scatter`
//! (pages in pseudo-random order), `sparse` (one page per 2 MiB over 1 GiB:
//! committed memory; slots after a 1 GiB sequential touch), `startup` (VM creation to the first hypercall, 1 GiB vs
//! 64 GiB), `cow` (copy-on-write granularity in both copy-on-write modes:
//! fork + sparse writes, private template restore), `clone` (fork of 1 GiB populated, COW break, takeover),
//! `lifecycle` (snapshot, restore with and without working-set replay, the
//! Firecracker-way restore, clone of a VM, snapshot blocks), `alloc`
//! (allocator scaling with fragmentation), `mmops` (map/protect/unmap churn
//! vs the host kernel). Every figure is printed as `bench NAME: VALUE UNIT`
//! or `ratio NAME: VALUE`, and the table is written to
//! `target/bench-report.md`.
//!
//! Absolute times on these machines are noisy (nested KVM, shared cores):
//! configurations are measured side by side in one run, alternating, at
//! least 5 repetitions each, and medians are reported. Ratios between
//! configurations are medians of per-round ratios (each round runs every
//! configuration once). Nothing here asserts performance.
//!
//! `GUESTMM_BENCH_TOUCH=lazy-2m,uffd-2m-copy` limits the touch section to
//! those configurations (plus the two eager baselines and `guestmm`, the
//! default configuration). The userfaultfd peers need userfaultfd (root, or
//! `vm.unprivileged_userfaultfd=1`): without it one line says why and they
//! are left out.
//!
//! `GUESTMM_BENCH_REPS=N` changes the repetition count (default 5, minimum 5
//! for reported runs; lower values are for trying the runner out).

#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

#[path = "compare/alloc.rs"]
mod alloc;
#[path = "compare/clone.rs"]
mod clone;
#[path = "compare/cow.rs"]
mod cow;
#[path = "compare/lazy.rs"]
mod lazy;
#[path = "compare/lifecycle.rs"]
mod lifecycle;
#[path = "compare/mmops.rs"]
mod mmops;
#[path = "compare/startup.rs"]
mod startup;
#[path = "compare/touch.rs"]
mod touch;

use common::Table;

const SECTIONS: &[&str] = &[
    "touch",
    "scatter",
    "sparse",
    "startup",
    "cow",
    "clone",
    "lifecycle",
    "alloc",
    "mmops",
];

/// Repetitions per configuration.
pub fn reps() -> usize {
    std::env::var("GUESTMM_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it: then only a quick smoke run of the sections that
    // need no KVM, one repetition, and no report file.
    if !std::env::args().any(|a| a == "--bench") {
        println!("note: smoke run (no --bench): clone, alloc, mmops once; no report written");
        std::env::set_var("GUESTMM_BENCH_REPS", "1");
        let mut table = Table::default();
        clone::run(&mut table);
        alloc::run(&mut table);
        mmops::run(&mut table);
        return;
    }
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for w in &wanted {
        assert!(
            SECTIONS.contains(&w.as_str()),
            "unknown section {w}; sections: {SECTIONS:?}"
        );
    }
    let run = |s: &str| wanted.is_empty() || wanted.iter().any(|w| w == s);
    let mut table = Table::default();
    let started = std::time::Instant::now();

    let kvm = match guestmm::kvm::open_kvm() {
        Ok(k) => Some(k),
        Err(e) => {
            println!("note: /dev/kvm unavailable ({e}): skipping touch and startup");
            None
        }
    };
    if let Some(kvm) = &kvm {
        if run("touch") {
            touch::run(kvm, &mut table);
        }
        if run("scatter") {
            lazy::scatter(kvm, &mut table);
        }
        if run("sparse") {
            lazy::sparse(kvm, &mut table);
        }
        if run("startup") {
            startup::run(kvm, &mut table);
        }
        if run("cow") {
            cow::run(kvm, &mut table);
        }
        if run("lifecycle") {
            lifecycle::run(kvm, &mut table);
        }
    }
    if run("clone") {
        clone::run(&mut table);
    }
    if run("alloc") {
        alloc::run(&mut table);
    }
    if run("mmops") {
        mmops::run(&mut table);
    }

    let header = format!(
        "guestmm comparison runner: `cargo bench --bench compare`, {} repetitions, {}; medians",
        reps(),
        machine()
    );
    let md = table.markdown(&header);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-report.md");
    match std::fs::write(&path, &md) {
        Ok(()) => println!("note: wrote {}", path.display()),
        Err(e) => println!("note: could not write {}: {e}", path.display()),
    }
    for f in table.missed() {
        println!("note: target missed: {} {} = {}", f.kind, f.name, f.value);
    }
    println!(
        "note: compare took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// `nproc`, CPU model, kernel, and whether KVM is nested.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |m| m.trim().to_string());
    let hypervisor = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs, {model}, Linux {}{}",
        kernel.trim(),
        if hypervisor {
            ", running as a guest (nested KVM)"
        } else {
            ""
        }
    )
}
