//! Shared by the benchmarks: the figure table of the comparison runner,
//! medians, host RSS readings, and the eager anonymous-memory VM (the
//! Firecracker-style baseline without guestmm).

#![allow(dead_code)]

pub mod anon_vm;
pub mod churn;
pub mod fc_restore;
#[path = "../../tests/common/host_mem.rs"]
pub mod host_mem;
#[path = "../../tests/common/rng.rs"]
pub mod rng;
pub mod uffd;

use std::fmt::Write as _;

use guestmm::memfile::{MemoryFile, MemoryFileOptions, MemoryKind};
use guestmm::{Range, PAGE_SIZE};
use std::time::Duration;

/// One figure of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    /// `bench` (an absolute value with a unit) or `ratio`.
    pub kind: &'static str,
    /// Name, e.g. `touch-seq/lazy-2m`.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Unit (empty for ratios).
    pub unit: &'static str,
    /// The target, as text (`≤ 1.10`), if the figure has one.
    pub target: Option<Target>,
    /// How it was measured (one line for the Markdown table).
    pub note: String,
}

/// A target a figure should meet.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// value ≤ bound.
    AtMost(f64),
    /// value ≥ bound.
    AtLeast(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(b) => v <= b,
            Target::AtLeast(b) => v >= b,
        }
    }
    fn text(self) -> String {
        match self {
            Target::AtMost(b) => format!("≤ {b}"),
            Target::AtLeast(b) => format!("≥ {b}"),
        }
    }
}

/// The figures of one run, printed as they come and written as Markdown.
#[derive(Debug, Default)]
pub struct Table {
    figures: Vec<Figure>,
}

impl Table {
    /// Records and prints `bench NAME: VALUE UNIT`.
    pub fn bench(&mut self, name: &str, value: f64, unit: &'static str, note: &str) -> &mut Figure {
        println!("bench {name}: {} {unit}", fmt_value(value));
        self.push("bench", name, value, unit, note)
    }

    /// Records and prints `ratio NAME: VALUE`.
    pub fn ratio(&mut self, name: &str, value: f64, note: &str) -> &mut Figure {
        println!("ratio {name}: {}", fmt_value(value));
        self.push("ratio", name, value, "", note)
    }

    fn push(
        &mut self,
        kind: &'static str,
        name: &str,
        value: f64,
        unit: &'static str,
        note: &str,
    ) -> &mut Figure {
        self.figures.push(Figure {
            kind,
            name: name.to_string(),
            value,
            unit,
            target: None,
            note: note.to_string(),
        });
        self.figures.last_mut().expect("just pushed")
    }

    /// The table as Markdown: figure, value, target, met.
    pub fn markdown(&self, header: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{header}\n");
        let _ = writeln!(s, "| figure | value | target | met? | how |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for f in &self.figures {
            let value = if f.unit.is_empty() {
                fmt_value(f.value)
            } else {
                format!("{} {}", fmt_value(f.value), f.unit)
            };
            let (target, met) = match f.target {
                Some(t) => (t.text(), if t.met(f.value) { "yes" } else { "**no**" }),
                None => (String::new(), ""),
            };
            let _ = writeln!(
                s,
                "| `{} {}` | {value} | {target} | {met} | {} |",
                f.kind, f.name, f.note
            );
        }
        s
    }

    /// The figure `kind name` printed earlier, if any (to attach a target
    /// that depends on a later figure).
    pub fn figure_mut(&mut self, kind: &str, name: &str) -> Option<&mut Figure> {
        self.figures
            .iter_mut()
            .find(|f| f.kind == kind && f.name == name)
    }

    /// Figures with a target they miss.
    pub fn missed(&self) -> Vec<&Figure> {
        self.figures
            .iter()
            .filter(|f| f.target.is_some_and(|t| !t.met(f.value)))
            .collect()
    }
}

impl Figure {
    /// Attaches a target.
    pub fn target(&mut self, t: Target) {
        self.target = Some(t);
    }
}

/// Three significant digits, no exponent for the ranges we print.
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.5}")
    }
}

/// Median of `xs` (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median of durations, in milliseconds.
pub fn median_ms(xs: &[Duration]) -> f64 {
    median(&xs.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>())
}

/// Median of durations, in microseconds.
pub fn median_us(xs: &[Duration]) -> f64 {
    median(&xs.iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>())
}

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`, `RssShmem`…).
pub fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Peak-RSS probe: resets the process's RSS high-water mark (`VmHWM`, via
/// `/proc/self/clear_refs` value 5) and later reports how far RSS rose
/// above where it started. RSS counts anonymous pages and mapped shared
/// memfd pages (RssShmem) alike. Falls back to the final VmRSS if the reset
/// is refused.
pub struct RssProbe {
    start: u64,
    hwm_reset: bool,
}

impl RssProbe {
    /// Starts a probe now.
    pub fn start() -> RssProbe {
        let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        RssProbe {
            start: status_bytes("VmRSS"),
            hwm_reset,
        }
    }

    /// Bytes by which RSS peaked above the start (call while the memory
    /// is still mapped, or after, when the reset worked).
    pub fn growth(&self) -> u64 {
        let end = if self.hwm_reset {
            status_bytes("VmHWM")
        } else {
            status_bytes("VmRSS")
        };
        end.saturating_sub(self.start)
    }
}

/// A memory file holding `n` live, fragmented allocations: 2N single pages
/// allocated, every other one freed, so the allocation map truly holds N
/// segments separated by one-page holes (neighbours cannot merge).
pub fn fragmented_memfile(n: u64) -> MemoryFile {
    let f = MemoryFile::new("bench-alloc", MemoryFileOptions::default()).expect("memfile");
    for _ in 0..2 * n {
        f.allocate(PAGE_SIZE, MemoryKind::Anonymous)
            .expect("allocate");
    }
    for i in 0..n {
        let r = Range::pages(2 * i * PAGE_SIZE + PAGE_SIZE, PAGE_SIZE).expect("range");
        f.dec_ref(r).expect("free");
    }
    assert_eq!(f.segment_count() as u64, n, "live set must not merge");
    f
}
