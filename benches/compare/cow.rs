//! Copy-on-write granularity (issue 12), in both copy-on-write modes
//! (`guestmm`: `CowMode::UserfaultfdWp`, `guestmm-ro-slots`: read-only
//! memslots): memory-file growth when a guest writes one page per 2 MiB
//! of 1 GiB of RAM populated before a fork (the `sparse` guest), and the
//! bytes copied when a guest writes half of a 256 MiB private template
//! (the `cow` guest; the runner's template is a memfd, shmem, so
//! userfaultfd can protect it), with the time per write-protect event.

use guestmm::kvm::CowMode;
use guestmm::uffd::{Features, Userfaultfd};
use guestmm::vmm::guests::{self, Guest};
use guestmm::vmm::runner::{run_guest, GuestReport, RunOptions};
use kvm_ioctls::Kvm;

use crate::common::{median, median_ms, Table, Target};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1024 * MIB;
const PAGE: u64 = 4096;
const TEMPLATE: u64 = 256 * MIB;

fn modes() -> Vec<(CowMode, &'static str)> {
    let mut m = Vec::new();
    match Userfaultfd::open(Features::SHMEM_WP) {
        Ok(_) => m.push((CowMode::UserfaultfdWp, "guestmm")),
        Err(e) => println!(
            "note: userfaultfd write protection unavailable ({e}): cow section runs ro-slots only"
        ),
    }
    m.push((CowMode::ReadOnlySlots, "guestmm-ro-slots"));
    m
}

fn run_one(kvm: &Kvm, guest: &Guest, opts: &RunOptions) -> Option<GuestReport> {
    match run_guest(kvm, guest, opts) {
        Ok(r) if r.passed => Some(r),
        Ok(r) => {
            println!("note: {} failed: {}", guest.name, r.summary_line());
            None
        }
        Err(e) => {
            println!("note: {} could not start: {e}", guest.name);
            None
        }
    }
}

/// The `cow` section.
pub fn run(kvm: &Kvm, table: &mut Table) {
    let modes = modes();
    let sparse = *guests::find("sparse").expect("sparse guest");
    let restore = Guest {
        template_size: TEMPLATE,
        ..*guests::find("cow").expect("cow guest")
    };
    let mut growth = vec![Vec::new(); modes.len()];
    let mut copied = vec![Vec::new(); modes.len()];
    let mut restore_time = vec![Vec::new(); modes.len()];
    let mut event_us = Vec::new();
    for _ in 0..crate::reps() {
        for (i, &(mode, _)) in modes.iter().enumerate() {
            let opts = RunOptions {
                ram_size: GIB,
                fork_ram: true,
                cow: mode,
                ..RunOptions::default()
            };
            if let Some(r) = run_one(kvm, &sparse, &opts) {
                growth[i].push(r.mm.cow_copied_bytes as f64);
            }
            let opts = RunOptions {
                cow: mode,
                ..RunOptions::default()
            };
            if let Some(r) = run_one(kvm, &restore, &opts) {
                copied[i].push(r.mm.cow_copied_bytes as f64);
                restore_time[i].push(r.elapsed);
                if r.vm.cow.events > 0 {
                    event_us.push(r.vm.cow.handle_ns as f64 / r.vm.cow.events as f64 / 1e3);
                }
            }
        }
    }
    let touched = GIB / (2 * MIB);
    let written = (TEMPLATE / 2) as f64;
    for (i, &(mode, name)) in modes.iter().enumerate() {
        if growth[i].is_empty() || copied[i].is_empty() {
            continue;
        }
        let f = table.bench(
            &format!("fork-sparse-growth-kib/{name}"),
            median(&growth[i]) / 1024.0,
            "KiB",
            &format!(
                "1 GiB RAM populated, forked, then the sparse guest writes {touched} pages \
                 (one per 2 MiB): memory file growth (bytes copied); {} mode",
                mode.name()
            ),
        );
        if mode == CowMode::UserfaultfdWp {
            f.target(Target::AtMost(1.1 * (touched * PAGE) as f64 / 1024.0));
        }
        let suffix = if mode == CowMode::UserfaultfdWp {
            String::new()
        } else {
            format!("/{name}")
        };
        let f = table.ratio(
            &format!("restore-copied/written{suffix}"),
            median(&copied[i]) / written,
            &format!(
                "cow guest over a {} MiB private template: bytes copied ÷ bytes written (half); {} mode",
                TEMPLATE / MIB,
                mode.name()
            ),
        );
        if mode == CowMode::UserfaultfdWp {
            f.target(Target::AtMost(1.02));
        }
        table.bench(
            &format!("restore-ms/{name}"),
            median_ms(&restore_time[i]),
            "ms",
            "cow guest over the 256 MiB template: first vCPU entry → EXIT (reads all, writes half, verifies)",
        );
    }
    if !event_us.is_empty() {
        table.bench(
            "cow-wp-event-us/guestmm",
            median(&event_us),
            "us",
            "fault thread: write-protect event read → page copied, mapped and woken (mean per run)",
        );
    }
}
