//! Copy-on-write granularity (issue 12), in both copy-on-write modes
//! (`guestmm`: `CowMode::UserfaultfdWp`, `guestmm-ro-slots`: read-only
//! memslots): memory-file growth when a guest writes one page per 2 MiB
//! of 1 GiB of RAM populated before a fork (the `sparse` guest), and the
//! bytes copied when a guest writes half of a 256 MiB private template
//! (the `cow` guest; the runner's template is a memfd, shmem, so
//! userfaultfd can protect it), with the time per write-protect event.
//! The peer for the write pass (the cow guest's MARK 1 → MARK 2) is the
//! same guest with the same template mapped `MAP_PRIVATE` into one eager
//! slot: the host kernel's own copy-on-write (`map-private`).

use guestmm::kvm::CowMode;
use guestmm::uffd::{Features, Userfaultfd};
use guestmm::vmm::guests::{self, Guest};
use guestmm::vmm::runner::{run_guest, GuestReport, RunOptions};
use kvm_ioctls::Kvm;

use crate::common::anon_vm::{AnonVm, RamMode};
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

/// The time from MARK 1 to MARK 2 (the cow guest's write pass).
fn mark_gap(
    marks: impl Iterator<Item = (u32, std::time::Duration)>,
) -> Option<std::time::Duration> {
    let marks: Vec<_> = marks.collect();
    let at = |n| marks.iter().find(|&&(m, _)| m == n).map(|&(_, t)| t);
    Some(at(2)?.saturating_sub(at(1)?))
}

/// A memfd of `size` bytes holding the cow guest's template pattern.
fn pattern_memfd(size: u64) -> std::fs::File {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid NUL-terminated name; the new fd
    // is owned by the File from here on.
    let fd = unsafe { libc::memfd_create(c"cow-template".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut buf = vec![0u8; (4 * MIB) as usize];
    for off in (0..size).step_by(buf.len()) {
        for (i, word) in buf.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&guests::cow_pattern(off + 8 * i as u64).to_le_bytes());
        }
        file.write_all(&buf).expect("write the template");
    }
    file
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
    let template = pattern_memfd(TEMPLATE);
    // Per round: each mode's write pass ÷ map-private's.
    let mut write_pass = vec![Vec::new(); modes.len()];
    for _ in 0..crate::reps() {
        let mut vm = AnonVm::with_template(
            kvm,
            &restore,
            RunOptions::default().ram_size,
            RamMode::Plain,
            Some((&template, TEMPLATE)),
        )
        .expect("map-private VM");
        let peer = vm.run(false);
        assert_eq!(peer.exit_code, Some(0), "map-private: cow guest failed");
        let peer_pass = mark_gap(peer.marks.iter().map(|&(n, t)| (n, t)));
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
                let pass = mark_gap(r.marks.iter().map(|&(_, n, t)| (n, t)));
                if let (Some(a), Some(b)) = (pass, peer_pass) {
                    write_pass[i].push(a.as_secs_f64() / b.as_secs_f64());
                }
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
        if !write_pass[i].is_empty() {
            let f = table.ratio(
                &format!("restore-write-pass/map-private{suffix}"),
                median(&write_pass[i]),
                &format!(
                    "cow guest's write pass (MARK 1 → 2, half of the {} MiB template): guestmm \
                     ÷ the template mapped MAP_PRIVATE into one eager slot; median of per-round \
                     ratios; {} mode",
                    TEMPLATE / MIB,
                    mode.name()
                ),
            );
            if mode == CowMode::UserfaultfdWp {
                f.target(Target::AtMost(1.0));
            }
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
