//! Guest-memory touch: the `touch` guest with 256 MiB of RAM on one vCPU,
//! under eager anonymous memory (no guestmm), guestmm eager and guestmm lazy
//! with several fault-around policies, and the peers a VMM author would
//! otherwise pick: anonymous memory prefilled before start (the limit), with
//! `MADV_HUGEPAGE`, and userfaultfd with 4 KiB zero-page, 4 KiB copy and
//! 2 MiB copy handlers. `guestmm` is the library's default configuration
//! (`RunOptions::default()`), whatever it is at run time.
//!
//! Besides times, every configuration's KVM page faults are printed as
//! `bench kvm-page-faults/<config>`: KVM's own per-vCPU `pf_taken` counter
//! (`KVM_GET_STATS_FD`), which counts every fault that reached KVM's MMU
//! fault handler and does not depend on machine load.

use std::time::Duration;

use guestmm::kvm::MergePolicy;
use guestmm::vmm::guests;
use guestmm::vmm::runner::{run_guest, RunOptions};
use kvm_ioctls::Kvm;

use crate::common::anon_vm::{AnonVm, RamMode};
use crate::common::uffd::UffdMode;
use crate::common::{median, median_ms, RssProbe, Table, Target};

const MIB: u64 = 1 << 20;
const RAM: u64 = 256 * MIB;
/// `max_slots` of the `+lazymerge` configurations (`MergePolicy::Lazy`).
const LAZY_MERGE_SLOTS: usize = 64;

/// How a configuration runs the guest.
#[derive(Clone)]
pub enum Kind {
    /// Anonymous memory registered up front, no guestmm, RAM prepared as
    /// the mode says.
    Anon(RamMode),
    /// guestmm's runner with these options (`ram_size` is overridden).
    Guestmm(RunOptions),
}

/// One configuration under test.
#[derive(Clone)]
pub struct Config {
    /// Name in the figures.
    pub name: &'static str,
    /// How it runs.
    pub kind: Kind,
}

impl Config {
    /// guestmm options, if it is a guestmm configuration.
    fn opts(&self) -> Option<&RunOptions> {
        match &self.kind {
            Kind::Guestmm(o) => Some(o),
            Kind::Anon(_) => None,
        }
    }
}

/// The library's default configuration.
pub fn guestmm_default() -> Config {
    Config {
        name: "guestmm",
        kind: Kind::Guestmm(RunOptions::default()),
    }
}

/// The baseline: anonymous memory, one slot, nothing prepared.
pub fn eager_anon() -> Config {
    Config {
        name: "eager-anon",
        kind: Kind::Anon(RamMode::Plain),
    }
}

/// The peers that need no guestmm.
fn peers() -> Vec<Config> {
    let anon = |name, mode| Config {
        name,
        kind: Kind::Anon(mode),
    };
    vec![
        anon("eager-anon-prefilled", RamMode::Prefilled),
        anon("eager-anon-thp", RamMode::Huge),
        anon("uffd-4k-zero", RamMode::Uffd(UffdMode::Zero4k)),
        anon("uffd-4k-copy", RamMode::Uffd(UffdMode::Copy4k)),
        anon("uffd-2m-copy", RamMode::Uffd(UffdMode::Copy2m)),
    ]
}

fn configs() -> Vec<Config> {
    let lazy = |initial: u64, max: u64| {
        Kind::Guestmm(RunOptions {
            ram_size: RAM,
            fault_around: initial,
            fault_around_max: max,
            ..RunOptions::default()
        })
    };
    let lazy_merge = |initial: u64, max: u64| {
        Kind::Guestmm(RunOptions {
            slot_merge: MergePolicy::Lazy {
                max_slots: LAZY_MERGE_SLOTS,
            },
            ..RunOptions {
                ram_size: RAM,
                fault_around: initial,
                fault_around_max: max,
                ..RunOptions::default()
            }
        })
    };
    let mut v = vec![
        eager_anon(),
        Config {
            name: "eager-memfd",
            kind: Kind::Guestmm(RunOptions {
                ram_size: RAM,
                eager: true,
                ..RunOptions::default()
            }),
        },
        guestmm_default(),
    ];
    v.extend(peers());
    v.extend([
        Config {
            name: "lazy-2m",
            kind: lazy(2 * MIB, 2 * MIB),
        },
        Config {
            name: "lazy-adaptive",
            kind: lazy(2 * MIB, RunOptions::default().fault_around_max),
        },
        Config {
            name: "lazy-adaptive-128m",
            kind: lazy(2 * MIB, 128 * MIB),
        },
        Config {
            name: "lazy-adaptive-1g",
            kind: lazy(2 * MIB, 1024 * MIB),
        },
        Config {
            name: "lazy-4k",
            kind: lazy(4096, 4096),
        },
        Config {
            name: "lazy-2m+lazymerge",
            kind: lazy_merge(2 * MIB, 2 * MIB),
        },
        Config {
            name: "lazy-adaptive+lazymerge",
            kind: lazy_merge(2 * MIB, RunOptions::default().fault_around_max),
        },
        Config {
            name: "lazy-4k+lazymerge",
            kind: lazy_merge(4096, 4096),
        },
    ]);
    v
}

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// MARK 1 → MARK 2 (zero if the guest has no such marks).
    pub seq: Duration,
    /// First vCPU entry → EXIT.
    pub total: Duration,
    /// guestmm's memory exits.
    pub memory_exits: u64,
    /// Fault-around windows installed (guestmm).
    pub windows: u64,
    /// Memslot adds.
    pub slot_adds: u64,
    /// Memslot deletes during the run.
    pub slot_deletes: u64,
    /// Most live memslots.
    pub max_live: u64,
    /// Live memslots at the guest's exit.
    pub live_end: u64,
    /// Peak host RSS growth.
    pub rss: u64,
    /// Committed guest memory: resident MemoryFile bytes under the space's
    /// pmas (guestmm), RSS growth (anonymous peers).
    pub committed: u64,
    /// KVM's `pf_taken` (vCPUs summed), if the kernel has binary stats.
    pub kvm_pf: Option<u64>,
    /// KVM's `mmu_shadow_zapped` (page-table pages KVM threw away, e.g. on
    /// slot deletes), if the kernel has it.
    pub kvm_zapped: Option<u64>,
    /// Missing faults the userfaultfd handler resolved.
    pub uffd_faults: u64,
    /// The prefill before start, if the configuration has one.
    pub prefill: Option<Duration>,
}

/// Runs `guest` with `ram` bytes of RAM under `cfg` once.
pub fn run_one(kvm: &Kvm, guest_name: &str, ram: u64, cfg: &Config) -> Sample {
    let guest = guests::find(guest_name).expect("guest");
    let seq = |marks: &[(u32, Duration)]| {
        let at = |n: u32| marks.iter().find(|(p, _)| *p == n).map(|(_, d)| *d);
        match (at(1), at(2)) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        }
    };
    let rss = RssProbe::start();
    match &cfg.kind {
        Kind::Anon(mode) => {
            let mut vm = AnonVm::with_mode(kvm, guest, ram, *mode)
                .unwrap_or_else(|e| panic!("{}: {e}", cfg.name));
            let r = vm.run(false);
            assert_eq!(r.exit_code, Some(0), "{}: {guest_name} failed", cfg.name);
            let k = vm.kvm_stats();
            let kvm_pf = k.as_ref().and_then(|k| k.pf_taken());
            let kvm_zapped = k.as_ref().and_then(|k| k.mmu_shadow_zapped());
            let growth = rss.growth();
            Sample {
                seq: seq(&r.marks),
                total: r.elapsed,
                max_live: 2,
                live_end: 2,
                slot_adds: 2,
                rss: growth,
                committed: growth,
                kvm_pf,
                kvm_zapped,
                uffd_faults: r.uffd_faults,
                prefill: r.prefill,
                ..Sample::default()
            }
        }
        Kind::Guestmm(opts) => {
            let opts = RunOptions {
                ram_size: ram,
                ..opts.clone()
            };
            let r = run_guest(kvm, guest, &opts).expect("run_guest");
            assert!(r.passed, "{}: {}", cfg.name, r.summary_line());
            let marks: Vec<(u32, Duration)> = r.marks.iter().map(|&(_, p, d)| (p, d)).collect();
            Sample {
                seq: seq(&marks),
                total: r.elapsed,
                memory_exits: r.vm.memory_exits,
                windows: r.mm.windows,
                slot_adds: r.vm.slots.adds,
                slot_deletes: r.vm.slots.deletes,
                max_live: r.vm.slots.max_live,
                live_end: r.vm.slots.live,
                rss: rss.growth(),
                committed: r.mm.committed_bytes,
                kvm_pf: r.kvm.as_ref().and_then(|k| k.pf_taken()),
                kvm_zapped: r.kvm.as_ref().and_then(|k| k.mmu_shadow_zapped()),
                uffd_faults: 0,
                prefill: None,
            }
        }
    }
}

/// Keeps the configurations that can run here: the userfaultfd peers are
/// dropped, with one line saying why, when userfaultfd is refused.
pub fn available(configs: Vec<Config>) -> Vec<Config> {
    let why = crate::common::uffd::unavailable();
    if let Some(why) = &why {
        println!("note: userfaultfd unavailable ({why}): the uffd-* peers do not run");
    }
    configs
        .into_iter()
        .filter(|c| why.is_none() || !matches!(c.kind, Kind::Anon(RamMode::Uffd(_))))
        .collect()
}

/// Runs every configuration `reps` times, rotating the order every round
/// so no configuration always runs right after the same neighbour.
pub fn rounds(kvm: &Kvm, guest: &str, ram: u64, configs: &[Config]) -> Vec<Vec<Sample>> {
    let reps = crate::reps();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 0..reps {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            samples[i].push(run_one(kvm, guest, ram, &configs[i]));
        }
    }
    samples
}

/// Median of per-round ratios `get(a) / get(b)`.
pub fn ratio_of(a: &[Sample], b: &[Sample], get: fn(&Sample) -> f64) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| get(x) / get(y)).collect();
    median(&ratios)
}

/// Median of `get` over the samples.
pub fn med(s: &[Sample], get: impl Fn(&Sample) -> f64) -> f64 {
    median(&s.iter().map(get).collect::<Vec<_>>())
}

/// Prints `bench <prefix>/<config>` with each configuration's median KVM
/// page faults (`pf_taken`); returns them by configuration index.
pub fn kvm_faults(
    table: &mut Table,
    prefix: &str,
    configs: &[Config],
    samples: &[Vec<Sample>],
    how: &str,
) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let v: Vec<f64> = samples[i]
            .iter()
            .filter_map(|x| x.kvm_pf.map(|n| n as f64))
            .collect();
        if v.is_empty() {
            println!(
                "note: {prefix}/{}: no KVM statistics on this kernel",
                c.name
            );
            out.push(None);
            continue;
        }
        let m = median(&v);
        table.bench(
            &format!("{prefix}/{}", c.name),
            m,
            "faults",
            &format!("{how}: KVM's per-vCPU pf_taken (KVM_GET_STATS_FD), median"),
        );
        out.push(Some(m));
    }
    out
}

pub fn run(kvm: &Kvm, table: &mut Table) {
    // GUESTMM_BENCH_TOUCH=a,b keeps only those configurations (the two
    // eager baselines always run: every ratio needs them).
    let only = std::env::var("GUESTMM_BENCH_TOUCH").ok();
    let configs: Vec<Config> = available(configs())
        .into_iter()
        .filter(|c| {
            c.opts().is_some_and(|o| o.eager)
                || c.name == "eager-anon"
                || c.name == "guestmm"
                || only
                    .as_deref()
                    .is_none_or(|o| o.split(',').any(|n| n == c.name))
        })
        .collect();
    let samples = rounds(kvm, "touch", RAM, &configs);
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
                if c.name == "guestmm" && base_name == "eager-anon" && what == "total" {
                    f.target(Target::AtMost(0.35));
                }
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
    let secs = |x: &Sample| x.total.as_secs_f64();
    let gm = idx("guestmm");
    let uffd2m = configs.iter().position(|c| c.name == "uffd-2m-copy");
    if let Some(u) = uffd2m {
        let f = table.ratio(
            "touch-total/guestmm/uffd-2m-copy",
            ratio_of(&samples[gm], &samples[u], secs),
            "default configuration ÷ userfaultfd 2 MiB UFFDIO_COPY: median of per-round time ratios",
        );
        f.target(Target::AtMost(1.5));
    }
    let faults = kvm_faults(table, "kvm-page-faults", &configs, &samples, &how);
    if let (Some(u), Some(Some(g))) = (uffd2m, faults.get(gm)) {
        if let Some(uf) = faults[u] {
            let f = table.ratio(
                "kvm-page-faults/guestmm/uffd-2m-copy",
                g / uf,
                "KVM page faults (pf_taken) of the default configuration ÷ userfaultfd 2 MiB copy's",
            );
            f.target(Target::AtMost(1.1));
            if let Some(f) = table.figure_mut("bench", "kvm-page-faults/guestmm") {
                f.target(Target::AtMost((1.1 * uf).floor()));
            }
        }
    }
    for (i, c) in configs.iter().enumerate() {
        let zapped: Vec<f64> = samples[i]
            .iter()
            .filter_map(|x| x.kvm_zapped.map(|n| n as f64))
            .collect();
        if !zapped.is_empty() {
            table.bench(
                &format!("kvm-shadow-zapped/{}", c.name),
                median(&zapped),
                "pages",
                &format!(
                    "{how}: KVM's mmu_shadow_zapped (page-table pages zapped, e.g. by slot deletes)"
                ),
            );
        }
        if samples[i].iter().any(|x| x.uffd_faults > 0) {
            table.bench(
                &format!("uffd-faults/{}", c.name),
                med(&samples[i], |x| x.uffd_faults as f64),
                "faults",
                "missing faults the userfaultfd handler resolved",
            );
        }
        let prefill: Vec<Duration> = samples[i].iter().filter_map(|x| x.prefill).collect();
        if !prefill.is_empty() {
            table.bench(
                &format!("touch-prefill/{}", c.name),
                median_ms(&prefill),
                "ms",
                "MADV_POPULATE_WRITE of all RAM before start (not in touch-total)",
            );
        }
    }
    for (i, c) in configs.iter().enumerate() {
        let s = &samples[i];
        let med =
            |f: fn(&Sample) -> u64| median(&s.iter().map(|x| f(x) as f64).collect::<Vec<_>>());
        let is_lazy = c.name.starts_with("lazy") || c.name == "guestmm";
        let f = table.bench(
            &format!("memory-exits-per-mib/{}", c.name),
            med(|x| x.memory_exits) / mib,
            "exits/MiB",
            "memory exits over the whole run / MiB of RAM (all are in the sequential pass)",
        );
        if c.name == "lazy-adaptive" {
            f.target(Target::AtMost(0.1));
        }
        if c.opts().is_some() {
            table.bench(
                &format!("slot-adds/{}", c.name),
                med(|x| x.slot_adds),
                "slots",
                "KVM_SET_USER_MEMORY_REGION adds, boot region included",
            );
            let f = table.bench(
                &format!("slot-deletes/{}", c.name),
                med(|x| x.slot_deletes),
                "slots",
                "slot deletes during the run",
            );
            // The slot budget (issue 11): a sequential stream under the
            // budget deletes no slot, so KVM keeps every mapping it built.
            if c.name == "guestmm" {
                f.target(Target::AtMost(0.0));
            }
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
            // Windows double, one slot each: O(log RAM) slots (the earlier
            // target of 1-2 slots belonged to eager merging, which zapped
            // KVM's mappings at every merge).
            if c.name == "guestmm" {
                f.target(Target::AtMost(12.0));
            }
            table.bench(
                &format!("ram-slots-at-end/{}", c.name),
                med(|x| x.live_end) - 1.0,
                "slots",
                "live slots at the guest's exit minus the boot region's",
            );
        }
        table.bench(
            &format!("rss-per-mib/{}", c.name),
            med(|x| x.rss) / RAM as f64,
            "MiB/MiB",
            "peak host RSS growth (VmHWM - VmRSS before, RssShmem included) / MiB touched",
        );
    }
}
