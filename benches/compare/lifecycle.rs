//! VM lifecycle (issue 13): restore to the first guest instruction with
//! 64 GiB vs 1 GiB of RAM, restore + run of the `lifecycle` guest with and
//! without working-set replay against the same run with its memory
//! resident and against the Firecracker way (one slot of anonymous memory
//! filled by a userfaultfd handler from the snapshot file, 4 KiB or 2 MiB
//! per fault), clone of a VM with 1 GiB populated, memory-file growth of a
//! clone per page written, and snapshot file blocks against populated
//! memory (and that saving commits nothing).
//!
//! The snapshot files live in the temporary directory and are removed at
//! the end. The page cache of a snapshot file is warm for every restore
//! (not dropped between runs): a restored fleet shares it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::kvm::{
    CloneOptions, CowMode, KvmStatsReader, RestoreOptions, SnapshotMode, Vcpu, Vm, VmOptions,
    WorkingSetMode,
};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::mm::MapOpts;
use guestmm::snapshot::HEADER_SIZE;
use guestmm::uffd::{Features, Userfaultfd};
use guestmm::vmm::boot::{BootLayout, EntryArgs, DEFAULT_RAM_BASE};
use guestmm::vmm::guests::{self, Guest};
use guestmm::vmm::lifecycle::{run_until, RunOutcome, LIFECYCLE_MARK};
use guestmm::{Access, Perms};
use kvm_ioctls::Kvm;

use crate::common::fc_restore;
use crate::common::uffd::UffdMode;
use crate::common::{median, median_ms, Table, Target};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1024 * MIB;
const PAGE: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(120);

/// A booted guest VM: one vCPU set up at the guest's entry, not run yet.
struct Booted {
    vm: Arc<Vm>,
    vcpu: Vcpu,
    memfile: Arc<MemoryFile>,
    ram_base: u64,
}

/// Boots `guest` with `ram` bytes of lazy RAM (as guestmm's runner does:
/// precommitted boot region with the image, RAM one anonymous vma).
fn boot(kvm: &Kvm, guest: &Guest, ram: u64, cow: CowMode) -> Booted {
    let ram = ram.max(guest.min_ram);
    let layout = BootLayout::new(DEFAULT_RAM_BASE, ram, 1).expect("layout");
    let memfile =
        Arc::new(MemoryFile::new("lifecycle", MemoryFileOptions::default()).expect("memfile"));
    let vm = Vm::new(
        kvm,
        memfile.clone(),
        VmOptions {
            cow,
            ..VmOptions::default()
        },
    )
    .expect("vm");
    let space = vm.space().clone();
    layout
        .map_boot_region(&space, guest.image)
        .expect("boot region");
    space
        .map(
            MapOpts::anonymous(ram)
                .fixed(layout.ram_base())
                .perms(Perms::ALL)
                .name("ram"),
        )
        .expect("map ram");
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    let args = EntryArgs {
        cow_wp: vm.stats().cow_mode == CowMode::UserfaultfdWp,
        ..EntryArgs::default()
    };
    layout
        .setup_vcpu(vcpu.fd(), kvm, 0, &args)
        .expect("setup_vcpu");
    Booted {
        vm,
        vcpu,
        memfile,
        ram_base: layout.ram_base(),
    }
}

/// Unmaps everything (so the memory goes back now) and drops the VM.
fn discard(vm: Arc<Vm>, vcpus: Vec<Vcpu>) {
    drop(vcpus);
    let space = vm.space().clone();
    let _ = space.unmap(0, space.options().size);
}

fn expect_mark(what: &str, out: &RunOutcome, mark: u32) {
    assert!(
        out.at_mark,
        "{what}: did not reach MARK {mark}: {:?}",
        out.exit_failure()
    );
}

fn expect_exit(what: &str, out: &RunOutcome) {
    if let Some(f) = out.exit_failure() {
        panic!("{what}: {f}");
    }
}

fn snap_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("guestmm-bench-{}-{name}.snap", std::process::id()))
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(guestmm::snapshot::working_set_path(path));
}

/// The `lifecycle` section.
pub fn run(kvm: &Kvm, table: &mut Table) {
    let t = Instant::now();
    let guest = *guests::find("lifecycle").expect("lifecycle guest");
    startup(kvm, &guest, table);
    restore(kvm, &guest, table);
    clone_time(kvm, &guest, table);
    clone_growth(kvm, table);
    println!("note: lifecycle took {:.0} s", t.elapsed().as_secs_f64());
}

/// `ratio restore-startup-64g/1g`.
fn startup(kvm: &Kvm, guest: &Guest, table: &mut Table) {
    let sizes = [GIB, 64 * GIB];
    let paths: Vec<PathBuf> = sizes
        .iter()
        .map(|s| snap_path(&format!("startup-{}g", s / GIB)))
        .collect();
    for (&ram, path) in sizes.iter().zip(&paths) {
        // Snapshotted before its first run: the restore's first
        // instruction is the guest's entry.
        let b = boot(kvm, guest, ram, VmOptions::default().cow);
        let mut vcpus = vec![b.vcpu];
        b.vm.snapshot(&mut vcpus, path, SnapshotMode::Full)
            .expect("snapshot at entry");
        discard(b.vm, vcpus);
    }
    // A restore takes milliseconds: more rounds than the default, cheaply.
    let reps = 3 * crate::reps().max(5);
    let mut samples = vec![Vec::new(); sizes.len()];
    for round in 0..reps {
        for j in 0..sizes.len() {
            let s = (j + round) % sizes.len();
            let memfile = Arc::new(
                MemoryFile::new("restore-startup", MemoryFileOptions::default()).expect("memfile"),
            );
            let t0 = Instant::now();
            let mut r = Vm::restore(
                kvm,
                memfile,
                &paths[s],
                RestoreOptions {
                    working_set: WorkingSetMode::Off,
                    ..RestoreOptions::default()
                },
            )
            .expect("restore");
            let out = run_until(&mut r.vcpus[0], Some(1), TIMEOUT);
            let took = t0.elapsed();
            expect_mark("restore-startup", &out, 1);
            samples[s].push(took);
            discard(r.vm, r.vcpus);
        }
    }
    for (s, size) in sizes.iter().enumerate() {
        table.bench(
            &format!("restore-startup-{}g-ms", size / GIB),
            median_ms(&samples[s]),
            "ms",
            "lifecycle guest snapshotted at its entry: Vm::restore + run to MARK 1 (warm page cache)",
        );
    }
    let ratios: Vec<f64> = samples[1]
        .iter()
        .zip(&samples[0])
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
        .collect();
    table
        .ratio(
            "restore-startup-64g/1g",
            median(&ratios),
            "restore to the first exit (MARK 1), 64 GiB ÷ 1 GiB RAM; median of per-round ratios, \
             sizes alternating",
        )
        .target(Target::AtMost(1.2));
    for p in &paths {
        remove(p);
    }
}

/// Bytes of the 4 KiB pages of `vm`'s vmas that are populated and not
/// all zero (read through the address space).
fn nonzero_bytes(vm: &Vm) -> u64 {
    let space = vm.space();
    let mut buf = vec![0u8; (2 * MIB) as usize];
    let mut total = 0;
    for m in space.maps() {
        let mut at = m.range.start();
        while at < m.range.end() {
            let n = (m.range.end() - at).min(2 * MIB);
            let chunk = &mut buf[..n as usize];
            space.read(at, chunk).expect("read guest memory");
            total += chunk
                .chunks_exact(PAGE as usize)
                .filter(|p| p.iter().any(|&x| x != 0))
                .count() as u64
                * PAGE;
            at += n;
        }
    }
    total
}

/// One timed run of the lifecycle guest from MARK 10 to EXIT.
#[derive(Default, Clone, Copy)]
struct Sample {
    time: Duration,
    memory_exits: u64,
    kvm_pf: Option<u64>,
}

fn kvm_pf(vm: &Vm, vcpu: &Vcpu) -> Option<KvmStatsReader> {
    KvmStatsReader::open(vm.vm_fd(), &[vcpu.fd()]).ok()
}

/// The resident run: a fresh VM run to MARK 10 (its working set written,
/// so populated and mapped by KVM), then timed from there to EXIT.
fn resident_run(kvm: &Kvm, guest: &Guest, ram: u64) -> Sample {
    let mut b = boot(kvm, guest, ram, VmOptions::default().cow);
    let first = run_until(&mut b.vcpu, Some(LIFECYCLE_MARK), TIMEOUT);
    expect_mark("resident", &first, LIFECYCLE_MARK);
    let stats = kvm_pf(&b.vm, &b.vcpu);
    let pf0 = stats.as_ref().and_then(|s| s.read().ok()?.pf_taken());
    let exits0 = b.vm.stats().memory_exits;
    let t0 = Instant::now();
    let out = run_until(&mut b.vcpu, None, TIMEOUT);
    let time = t0.elapsed();
    expect_exit("resident", &out);
    let pf1 = stats.as_ref().and_then(|s| s.read().ok()?.pf_taken());
    let s = Sample {
        time,
        memory_exits: b.vm.stats().memory_exits - exits0,
        kvm_pf: pf0.zip(pf1).map(|(a, b)| b - a),
    };
    drop(stats);
    discard(b.vm, vec![b.vcpu]);
    s
}

/// `Vm::restore` with `mode` + run to EXIT (then the record saved).
fn guestmm_run(kvm: &Kvm, path: &Path, mode: WorkingSetMode) -> Sample {
    let memfile =
        Arc::new(MemoryFile::new("restore", MemoryFileOptions::default()).expect("memfile"));
    let t0 = Instant::now();
    let mut r = Vm::restore(
        kvm,
        memfile,
        path,
        RestoreOptions {
            working_set: mode,
            ..RestoreOptions::default()
        },
    )
    .expect("restore");
    let stats = kvm_pf(&r.vm, &r.vcpus[0]);
    let out = run_until(&mut r.vcpus[0], None, TIMEOUT);
    let time = t0.elapsed();
    expect_exit(&format!("restore ({mode:?})"), &out);
    if mode == WorkingSetMode::Record {
        r.vm.save_working_set(path).expect("save working set");
    }
    let s = Sample {
        time,
        memory_exits: r.vm.stats().memory_exits,
        kvm_pf: stats.as_ref().and_then(|s| s.read().ok()?.pf_taken()),
    };
    drop(stats);
    discard(r.vm, r.vcpus);
    s
}

/// `Vm::restore` without a record, then every vma prefetched for `access`
/// before timing (`AddressSpace::prefetch`: populated and host page tables
/// filled; read: the page cache mapped read-only; write: everything
/// copied into the memory file): the run to EXIT alone, timed. What
/// remains is KVM's own faults (and, for read, the writes' copies).
fn prefilled_run(kvm: &Kvm, path: &Path, access: Access) -> Sample {
    let memfile =
        Arc::new(MemoryFile::new("restore", MemoryFileOptions::default()).expect("memfile"));
    let mut r = Vm::restore(
        kvm,
        memfile,
        path,
        RestoreOptions {
            working_set: WorkingSetMode::Off,
            ..RestoreOptions::default()
        },
    )
    .expect("restore");
    let space = r.vm.space().clone();
    let all: Vec<_> = space
        .maps()
        .into_iter()
        .map(|m| (m.range, access))
        .collect();
    space.prefetch(&all, None);
    let exits0 = r.vm.stats().memory_exits;
    let stats = kvm_pf(&r.vm, &r.vcpus[0]);
    let t0 = Instant::now();
    let out = run_until(&mut r.vcpus[0], None, TIMEOUT);
    let time = t0.elapsed();
    expect_exit("restore (prefilled)", &out);
    let s = Sample {
        time,
        memory_exits: r.vm.stats().memory_exits - exits0,
        kvm_pf: stats.as_ref().and_then(|s| s.read().ok()?.pf_taken()),
    };
    drop(stats);
    discard(r.vm, r.vcpus);
    s
}

/// The Firecracker-way restore + run to EXIT.
fn fc_run(kvm: &Kvm, path: &Path, mode: UffdMode) -> Result<(Sample, u64), String> {
    let t0 = Instant::now();
    let mut r = fc_restore::restore(kvm, path, mode)?;
    let stats = kvm_pf(&r.vm, &r.vcpu);
    let out = run_until(&mut r.vcpu, None, TIMEOUT);
    let time = t0.elapsed();
    expect_exit(&format!("fc restore ({mode:?})"), &out);
    let s = Sample {
        time,
        memory_exits: r.vm.stats().memory_exits,
        kvm_pf: stats.as_ref().and_then(|s| s.read().ok()?.pf_taken()),
    };
    let faults = r.faults();
    drop(stats);
    Ok((s, faults))
}

/// Restore figures and the snapshot's blocks.
fn restore(kvm: &Kvm, guest: &Guest, table: &mut Table) {
    const RAM: u64 = 512 * MIB;
    let path = snap_path("restore-512m");
    // The snapshot, and what saving it cost.
    {
        let mut b = boot(kvm, guest, RAM, VmOptions::default().cow);
        let first = run_until(&mut b.vcpu, Some(LIFECYCLE_MARK), TIMEOUT);
        expect_mark("snapshot source", &first, LIFECYCLE_MARK);
        let committed = b.vm.space().stats().committed_bytes;
        let allocated = b.memfile.allocated_bytes();
        let mut vcpus = vec![b.vcpu];
        let saved =
            b.vm.snapshot(&mut vcpus, &path, SnapshotMode::Full)
                .expect("snapshot");
        let committed_after = b.vm.space().stats().committed_bytes;
        let allocated_after = b.memfile.allocated_bytes();
        let grew = (committed_after.saturating_sub(committed))
            .max(allocated_after.saturating_sub(allocated));
        if grew != 0 || committed_after != committed || allocated_after != allocated {
            println!(
                "note: FAIL: saving the snapshot changed memory: committed {committed} -> \
                 {committed_after}, memory file {allocated} -> {allocated_after} bytes"
            );
        }
        table
            .bench(
                "snapshot-commit-growth-kib",
                grew as f64 / 1024.0,
                "KiB",
                "committed guest memory / memory-file allocation growth while saving the snapshot \
                 (must be 0)",
            )
            .target(Target::AtMost(0.0));
        let blocks = std::fs::metadata(&path).expect("stat snapshot").blocks() * 512;
        let meta = saved.metadata_bytes.next_multiple_of(PAGE) + HEADER_SIZE;
        // After the commit check: reading may populate what was not.
        let nonzero = nonzero_bytes(&b.vm);
        table
            .ratio(
                "snapshot-blocks/populated",
                blocks.saturating_sub(meta) as f64 / nonzero as f64,
                &format!(
                    "lifecycle guest, 512 MiB RAM, at MARK 10: snapshot file blocks (st_blocks·512 \
                     = {} KiB, minus header and metadata {} KiB) ÷ non-zero 4 KiB pages of guest \
                     memory ({} KiB; committed {} KiB, the rest zero pages populated by \
                     fault-around)",
                    blocks / 1024,
                    meta / 1024,
                    nonzero / 1024,
                    committed / 1024,
                ),
            )
            .target(Target::AtMost(1.02));
        let rest = run_until(&mut vcpus[0], None, TIMEOUT);
        expect_exit("the original after the snapshot", &rest);
        discard(b.vm, vcpus);
    }

    let fc_modes: Vec<(UffdMode, &str)> = match crate::common::uffd::unavailable() {
        None => vec![(UffdMode::Copy4k, "uffd-4k"), (UffdMode::Copy2m, "uffd-2m")],
        Some(why) => {
            println!("note: userfaultfd unavailable ({why}): no Firecracker-way restore");
            Vec::new()
        }
    };
    let mut fc_ok = vec![true; fc_modes.len()];
    let mut resident = Vec::new();
    let mut no_replay = Vec::new();
    let mut replay = Vec::new();
    let mut prefilled = Vec::new();
    let mut prefilled_write = Vec::new();
    let mut fc: Vec<Vec<(Sample, u64)>> = vec![Vec::new(); fc_modes.len()];
    for _ in 0..crate::reps() {
        resident.push(resident_run(kvm, guest, RAM));
        // Record first: the replay of this round uses this round's record.
        no_replay.push(guestmm_run(kvm, &path, WorkingSetMode::Record));
        replay.push(guestmm_run(kvm, &path, WorkingSetMode::Replay));
        prefilled.push(prefilled_run(kvm, &path, Access::Read));
        prefilled_write.push(prefilled_run(kvm, &path, Access::Write));
        for (i, &(mode, name)) in fc_modes.iter().enumerate() {
            if !fc_ok[i] {
                continue;
            }
            match fc_run(kvm, &path, mode) {
                Ok(s) => fc[i].push(s),
                Err(e) => {
                    println!("note: {name} restore failed: {e}");
                    fc_ok[i] = false;
                }
            }
        }
    }
    let per_round = |xs: &[Sample]| -> f64 {
        median(
            &xs.iter()
                .zip(&resident)
                .map(|(a, r)| a.time.as_secs_f64() / r.time.as_secs_f64())
                .collect::<Vec<_>>(),
        )
    };
    let times = |xs: &[Sample]| xs.iter().map(|s| s.time).collect::<Vec<_>>();
    let med_u64 = |xs: &[u64]| median(&xs.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let pf = |xs: &[Sample]| -> Option<f64> {
        let v: Option<Vec<u64>> = xs.iter().map(|s| s.kvm_pf).collect();
        v.map(|v| med_u64(&v))
    };
    let exits = |xs: &[Sample]| med_u64(&xs.iter().map(|s| s.memory_exits).collect::<Vec<_>>());

    let base_note =
        "lifecycle guest, 512 MiB RAM (working set 256 MiB), MARK 10 → EXIT: reads the \
                     working set, writes a quarter, verifies; warm page cache";
    table.bench(
        "restore-run-ms/resident",
        median_ms(&times(&resident)),
        "ms",
        &format!(
            "{base_note}; resident = a fresh VM run to MARK 10 (working set written, populated \
             and mapped), timed from there"
        ),
    );
    for (name, xs, what) in [
        (
            "no-replay",
            &no_replay,
            "Vm::restore (WorkingSetMode::Record) + run",
        ),
        (
            "replay",
            &replay,
            "Vm::restore (Replay of the recorded working set) + run",
        ),
        (
            "prefilled",
            &prefilled,
            "Vm::restore, every vma prefetched for read (AddressSpace::prefetch: page cache \
             mapped read-only, host page tables filled; untimed), then the run alone",
        ),
        (
            "prefilled-write",
            &prefilled_write,
            "Vm::restore, every vma prefetched for write (AddressSpace::prefetch: copied into the \
             memory file, host page tables filled; untimed), then the run alone",
        ),
    ] {
        table.bench(
            &format!("restore-run-ms/{name}"),
            median_ms(&times(xs)),
            "ms",
            &format!("{base_note}; {what}"),
        );
    }
    table
        .ratio(
            "restore-replay/resident",
            per_round(&replay),
            "restore with working-set replay + run ÷ resident run; median of per-round ratios",
        )
        .target(Target::AtMost(1.15));
    table.ratio(
        "restore-no-replay/resident",
        per_round(&no_replay),
        "restore recording its working set + run ÷ resident run; median of per-round ratios",
    );
    let exit_ratio = median(
        &replay
            .iter()
            .zip(&no_replay)
            .map(|(a, b)| a.memory_exits as f64 / (b.memory_exits as f64).max(1.0))
            .collect::<Vec<_>>(),
    );
    table
        .ratio(
            "restore-exits-replay/no-replay",
            exit_ratio,
            &format!(
                "memory exits (Vm::stats().memory_exits): replay {} ÷ no-replay {} (resident run: {})",
                exits(&replay),
                exits(&no_replay),
                exits(&resident)
            ),
        )
        .target(Target::AtMost(0.05));
    for (name, xs) in [
        ("resident", &resident),
        ("no-replay", &no_replay),
        ("replay", &replay),
        ("prefilled", &prefilled),
        ("prefilled-write", &prefilled_write),
    ] {
        if let Some(v) = pf(xs) {
            table.bench(
                &format!("restore-kvm-page-faults/{name}"),
                v,
                "faults",
                "KVM's pf_taken over the run (binary stats), median",
            );
        }
    }
    for (i, &(_, name)) in fc_modes.iter().enumerate() {
        if fc[i].len() != resident.len() {
            continue;
        }
        let samples: Vec<Sample> = fc[i].iter().map(|&(s, _)| s).collect();
        let faults = med_u64(&fc[i].iter().map(|&(_, f)| f).collect::<Vec<_>>());
        table.bench(
            &format!("restore-run-ms/{name}"),
            median_ms(&times(&samples)),
            "ms",
            &format!(
                "{base_note}; the Firecracker way: anonymous memory in one slot, userfaultfd \
                 missing faults served by UFFDIO_COPY of {} pread from the snapshot \
                 (UFFDIO_ZEROPAGE outside its data); {faults} faults served",
                if name == "uffd-4k" { "4 KiB" } else { "2 MiB" }
            ),
        );
        table.ratio(
            &format!("restore-{name}/resident"),
            per_round(&samples),
            "Firecracker-way restore + run ÷ resident run; median of per-round ratios",
        );
        if let Some(v) = pf(&samples) {
            table.bench(
                &format!("restore-kvm-page-faults/{name}"),
                v,
                "faults",
                "KVM's pf_taken over the run (binary stats), median",
            );
        }
    }
    remove(&path);
}

/// The copy-on-write modes to measure clones in: userfaultfd write
/// protection (the default, unsuffixed) if this host has it, and
/// read-only slots (suffixed).
fn cow_modes() -> Vec<(CowMode, &'static str)> {
    let mut modes = Vec::new();
    match Userfaultfd::open(Features::SHMEM_WP) {
        Ok(_) => modes.push((CowMode::UserfaultfdWp, "")),
        Err(e) => println!(
            "note: userfaultfd write protection unavailable ({e}): clones in ro-slots mode only"
        ),
    }
    modes.push((CowMode::ReadOnlySlots, "/guestmm-ro-slots"));
    modes
}

/// `bench clone-1g-ms`: the lifecycle guest with 2 GiB of RAM run to
/// MARK 10 (1 GiB written), cloned several times.
fn clone_time(kvm: &Kvm, guest: &Guest, table: &mut Table) {
    for (mode, suffix) in cow_modes() {
        let mut b = boot(kvm, guest, 2 * GIB, mode);
        let first = run_until(&mut b.vcpu, Some(LIFECYCLE_MARK), TIMEOUT);
        expect_mark("clone parent", &first, LIFECYCLE_MARK);
        let populated = b.vm.space().stats().committed_bytes;
        let mut vcpus = vec![b.vcpu];
        let mut times = Vec::new();
        for _ in 0..crate::reps().max(7) {
            let c =
                b.vm.clone_vm(kvm, &mut vcpus, CloneOptions::default())
                    .expect("clone");
            times.push(c.elapsed);
            discard(c.vm, c.vcpus);
        }
        // The parent still works after its clones.
        let rest = run_until(&mut vcpus[0], None, TIMEOUT);
        expect_exit("clone parent after the clones", &rest);
        let f = table.bench(
            &format!("clone-1g-ms{suffix}"),
            median_ms(&times),
            "ms",
            &format!(
                "Vm::clone_vm (VmClone::elapsed) of the lifecycle guest (2 GiB RAM) at MARK 10, \
                 1 GiB written, {} MiB committed (fault-around); median of {} clones, each \
                 discarded (min {:.2} ms, max {:.2} ms); {} mode",
                populated / MIB,
                times.len(),
                times.iter().min().map_or(0.0, |t| t.as_secs_f64() * 1e3),
                times.iter().max().map_or(0.0, |t| t.as_secs_f64() * 1e3),
                mode.name()
            ),
        );
        if mode == CowMode::UserfaultfdWp {
            f.target(Target::AtMost(5.0));
        }
        discard(b.vm, vcpus);
    }
}

/// `bench clone-growth-kib-per-page`: the sparse guest (one page written
/// per 2 MiB of 1 GiB RAM) run in a clone of its VM whose RAM was populated
/// for write before: memory-file growth ÷ pages written.
fn clone_growth(kvm: &Kvm, table: &mut Table) {
    let sparse = *guests::find("sparse").expect("sparse guest");
    const RAM: u64 = GIB;
    let pages = RAM / (2 * MIB);
    for (mode, suffix) in cow_modes() {
        let b = boot(kvm, &sparse, RAM, mode);
        b.vm.space()
            .populate(b.ram_base, RAM, Access::Write)
            .expect("populate RAM");
        let mut vcpus = vec![b.vcpu];
        let mut c =
            b.vm.clone_vm(kvm, &mut vcpus, CloneOptions::default())
                .expect("clone");
        let before = b.memfile.allocated_bytes();
        let out = run_until(&mut c.vcpus[0], None, TIMEOUT);
        expect_exit("sparse guest in a clone", &out);
        let growth = b.memfile.allocated_bytes().saturating_sub(before);
        let f = table.bench(
            &format!("clone-growth-kib-per-page{suffix}"),
            growth as f64 / 1024.0 / pages as f64,
            "KiB",
            &format!(
                "clone of a VM with 1 GiB RAM populated; the sparse guest in the clone writes \
                 {pages} pages (one per 2 MiB): memory-file growth {} KiB ÷ pages; {} mode",
                growth / 1024,
                mode.name()
            ),
        );
        if mode == CowMode::UserfaultfdWp {
            f.target(Target::AtMost(4.5));
        }
        discard(c.vm, c.vcpus);
        discard(b.vm, vcpus);
    }
}
