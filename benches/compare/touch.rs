//! Guest-memory touch: the `touch` guest with 256 MiB of RAM on one vCPU,
//! under eager anonymous memory (no guestmm), guestmm eager and guestmm lazy
//! with several fault-around policies.

use std::time::Duration;

use guestmm::kvm::MergePolicy;
use guestmm::vmm::guests;
use guestmm::vmm::runner::{run_guest, RunOptions};
use kvm_ioctls::Kvm;

use crate::common::anon_vm::AnonVm;
use crate::common::{median, median_ms, RssProbe, Table, Target};

const MIB: u64 = 1 << 20;
const RAM: u64 = 256 * MIB;
/// `max_slots` of the `+lazymerge` configurations (`MergePolicy::Lazy`).
const LAZY_MERGE_SLOTS: usize = 64;

/// One configuration under test.
struct Config {
    name: &'static str,
    /// `None`: eager anonymous memory without guestmm.
    opts: Option<RunOptions>,
}

fn configs() -> Vec<Config> {
    let lazy = |initial: u64, max: u64| {
        Some(RunOptions {
            ram_size: RAM,
            fault_around: initial,
            fault_around_max: max,
            ..RunOptions::default()
        })
    };
    let lazy_merge = |initial: u64, max: u64| {
        Some(RunOptions {
            slot_merge: MergePolicy::Lazy {
                max_slots: LAZY_MERGE_SLOTS,
            },
            ..lazy(initial, max).expect("lazy")
        })
    };
    vec![
        Config {
            name: "eager-anon",
            opts: None,
        },
        Config {
            name: "eager-memfd",
            opts: Some(RunOptions {
                ram_size: RAM,
                eager: true,
                ..RunOptions::default()
            }),
        },
        Config {
            name: "lazy-2m",
            opts: lazy(2 * MIB, 2 * MIB),
        },
        Config {
            name: "lazy-adaptive",
            opts: lazy(2 * MIB, RunOptions::default().fault_around_max),
        },
        Config {
            name: "lazy-adaptive-128m",
            opts: lazy(2 * MIB, 128 * MIB),
        },
        Config {
            name: "lazy-adaptive-1g",
            opts: lazy(2 * MIB, 1024 * MIB),
        },
        Config {
            name: "lazy-4k",
            opts: lazy(4096, 4096),
        },
        Config {
            name: "lazy-2m+lazymerge",
            opts: lazy_merge(2 * MIB, 2 * MIB),
        },
        Config {
            name: "lazy-adaptive+lazymerge",
            opts: lazy_merge(2 * MIB, RunOptions::default().fault_around_max),
        },
        Config {
            name: "lazy-4k+lazymerge",
            opts: lazy_merge(4096, 4096),
        },
    ]
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    seq: Duration,
    total: Duration,
    memory_exits: u64,
    slot_adds: u64,
    slot_deletes: u64,
    max_live: u64,
    live_end: u64,
    rss: u64,
}

fn run_one(kvm: &Kvm, cfg: &Config) -> Sample {
    let guest = guests::find("touch").expect("touch guest");
    let mark = |marks: &[(u32, Duration)], n: u32| {
        marks
            .iter()
            .find(|(p, _)| *p == n)
            .map(|(_, d)| *d)
            .unwrap_or_else(|| panic!("{}: no MARK {n}", cfg.name))
    };
    let rss = RssProbe::start();
    match &cfg.opts {
        None => {
            let mut vm = AnonVm::new(kvm, guest, RAM);
            let r = vm.run(false);
            assert_eq!(r.exit_code, Some(0), "eager-anon: touch failed");
            let growth = rss.growth();
            Sample {
                seq: mark(&r.marks, 2) - mark(&r.marks, 1),
                total: r.elapsed,
                max_live: 2,
                live_end: 2,
                slot_adds: 2,
                rss: growth,
                ..Sample::default()
            }
        }
        Some(opts) => {
            let r = run_guest(kvm, guest, opts).expect("run_guest");
            assert!(r.passed, "{}: {}", cfg.name, r.summary_line());
            let marks: Vec<(u32, Duration)> = r.marks.iter().map(|&(_, p, d)| (p, d)).collect();
            Sample {
                seq: mark(&marks, 2) - mark(&marks, 1),
                total: r.elapsed,
                memory_exits: r.vm.memory_exits,
                slot_adds: r.vm.slots.adds,
                slot_deletes: r.vm.slots.deletes,
                max_live: r.vm.slots.max_live,
                live_end: r.vm.slots.live,
                rss: rss.growth(),
            }
        }
    }
}

pub fn run(kvm: &Kvm, table: &mut Table) {
    // GUESTMM_BENCH_TOUCH=a,b keeps only those configurations (the two
    // eager baselines always run: every ratio needs them).
    let only = std::env::var("GUESTMM_BENCH_TOUCH").ok();
    let configs: Vec<Config> = configs()
        .into_iter()
        .filter(|c| {
            c.opts.as_ref().is_none_or(|o| o.eager)
                || only
                    .as_deref()
                    .is_none_or(|o| o.split(',').any(|n| n == c.name))
        })
        .collect();
    let reps = crate::reps();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 0..reps {
        // Rotate the order every round so no configuration always runs
        // right after the same neighbour.
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let s = run_one(kvm, &configs[i]);
            samples[i].push(s);
        }
    }
    let mib = (RAM / MIB) as f64;
    let idx = |name: &str| configs.iter().position(|c| c.name == name).expect("config");
    let (anon, memfd) = (idx("eager-anon"), idx("eager-memfd"));
    let how = format!("touch guest, {} MiB, 1 vCPU", RAM / MIB);
    for (i, c) in configs.iter().enumerate() {
        let s = &samples[i];
        let seq: Vec<Duration> = s.iter().map(|x| x.seq).collect();
        let total: Vec<Duration> = s.iter().map(|x| x.total).collect();
        table.bench(
            &format!("touch-seq/{}", c.name),
            median_ms(&seq),
            "ms",
            &format!("{how}: MARK 1 → MARK 2 (sequential pass)"),
        );
        table.bench(
            &format!("touch-total/{}", c.name),
            median_ms(&total),
            "ms",
            &format!("{how}: first vCPU entry → EXIT"),
        );
    }
    for (i, c) in configs.iter().enumerate() {
        if i == anon {
            continue;
        }
        for (base, base_name) in [(anon, "eager-anon"), (memfd, "eager-memfd")] {
            if i == base {
                continue;
            }
            for (what, get) in [
                ("seq", (|x: &Sample| x.seq) as fn(&Sample) -> Duration),
                ("total", |x: &Sample| x.total),
            ] {
                let ratios: Vec<f64> = samples[i]
                    .iter()
                    .zip(&samples[base])
                    .map(|(a, b)| get(a).as_secs_f64() / get(b).as_secs_f64())
                    .collect();
                let f = table.ratio(
                    &format!("touch-{what}/{}/{base_name}", c.name),
                    median(&ratios),
                    "median of per-round time ratios",
                );
                if base_name == "eager-memfd" && what == "seq" {
                    match c.name {
                        "lazy-2m" => f.target(Target::AtMost(1.10)),
                        "lazy-adaptive" => f.target(Target::AtMost(1.05)),
                        _ => {}
                    }
                }
            }
        }
    }
    for (i, c) in configs.iter().enumerate() {
        let s = &samples[i];
        let med =
            |f: fn(&Sample) -> u64| median(&s.iter().map(|x| f(x) as f64).collect::<Vec<_>>());
        let is_lazy = c.name.starts_with("lazy");
        let f = table.bench(
            &format!("memory-exits-per-mib/{}", c.name),
            med(|x| x.memory_exits) / mib,
            "exits/MiB",
            "memory exits over the whole run / MiB of RAM (all are in the sequential pass)",
        );
        if c.name == "lazy-adaptive" {
            f.target(Target::AtMost(0.1));
        }
        if c.opts.is_some() {
            table.bench(
                &format!("slot-adds/{}", c.name),
                med(|x| x.slot_adds),
                "slots",
                "KVM_SET_USER_MEMORY_REGION adds, boot region included",
            );
            table.bench(
                &format!("slot-deletes/{}", c.name),
                med(|x| x.slot_deletes),
                "slots",
                "slot deletes during the run",
            );
        }
        table.bench(
            &format!("max-live-slots/{}", c.name),
            med(|x| x.max_live),
            "slots",
            "most slots live at once, boot region's slot included",
        );
        if is_lazy {
            let f = table.bench(
                &format!("max-live-ram-slots/{}", c.name),
                med(|x| x.max_live) - 1.0,
                "slots",
                "most live slots minus the boot region's",
            );
            if c.name == "lazy-adaptive" {
                f.target(Target::AtMost(2.0));
            }
            let f = table.bench(
                &format!("ram-slots-at-end/{}", c.name),
                med(|x| x.live_end) - 1.0,
                "slots",
                "live slots at the guest's exit minus the boot region's",
            );
            if c.name == "lazy-adaptive" {
                f.target(Target::AtMost(1.0));
            }
        }
        table.bench(
            &format!("rss-per-mib/{}", c.name),
            med(|x| x.rss) / RAM as f64,
            "MiB/MiB",
            "peak host RSS growth (VmHWM - VmRSS before, RssShmem included) / MiB touched",
        );
    }
}
