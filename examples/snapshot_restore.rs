//! The lifecycle lazy memory exists for: boot a guest once, snapshot it,
//! start copies fast. The `lifecycle` test guest builds state (a pattern
//! over half of its RAM, registers, a counter) and stops at MARK 10; this
//! VMM snapshots it there, restores it twice (the first restore records the
//! windows the guest faults in, the second prefetches them), and clones the
//! original twice. Every copy checks its memory and registers and must exit
//! 0.
//!
//! Run with `cargo run --release --features vmm --example snapshot_restore`
//! (needs /dev/kvm; the `vmm` feature only provides the guest and its
//! boot code: the snapshot, restore and clone calls are the library's).

use std::sync::Arc;
use std::time::Duration;

use guestmm::kvm::{CloneOptions, RestoreOptions, SnapshotMode, Vm, WorkingSetMode};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::vmm::guests;
use guestmm::vmm::lifecycle::{boot_to_mark, run_until, LIFECYCLE_MARK};
use guestmm::vmm::runner::RunOptions;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = guestmm::kvm::open_kvm()?;
    let timeout = Duration::from_secs(60);
    let guest = guests::find("lifecycle").ok_or("no lifecycle guest")?;
    let opts = RunOptions {
        ram_size: 256 << 20,
        ..RunOptions::default()
    };
    let path = std::env::temp_dir().join(format!("guestmm-example-{}.snap", std::process::id()));

    // Boot and run to the snapshot point.
    let (vm, mut vcpus, _memfile, out) = boot_to_mark(&kvm, guest, &opts, LIFECYCLE_MARK)?;
    if !out.at_mark {
        return Err(format!("the guest did not reach its mark: {out:?}").into());
    }
    let saved = vm.snapshot(&mut vcpus, &path, SnapshotMode::Full)?;
    println!(
        "snapshot: {} MiB of data in {} MiB of file blocks, {:?}",
        saved.data_bytes_written >> 20,
        saved.file_blocks_bytes >> 20,
        saved.elapsed
    );

    // Two clones of the running original: they share its memory and copy
    // only what they write.
    for i in 0..2 {
        let mut clone = vm.clone_vm(&kvm, &mut vcpus, CloneOptions::default())?;
        let out = run_until(&mut clone.vcpus[0], None, timeout);
        println!(
            "clone {i}: made in {:?}, exit {:?}",
            clone.elapsed, out.exit_code
        );
        if out.exit_failure().is_some() {
            return Err(format!("clone {i}: {out:?}").into());
        }
    }
    let out = run_until(&mut vcpus[0], None, timeout);
    println!("original: exit {:?}", out.exit_code);
    drop(vcpus);
    drop(vm);

    // Restore twice from the file: record the working set, then replay it.
    for mode in [WorkingSetMode::Record, WorkingSetMode::Replay] {
        let memfile = Arc::new(MemoryFile::new("restored", MemoryFileOptions::default())?);
        let mut restored = Vm::restore(
            &kvm,
            memfile,
            &path,
            RestoreOptions {
                working_set: mode,
                ..RestoreOptions::default()
            },
        )?;
        let out = run_until(&mut restored.vcpus[0], None, timeout);
        if mode == WorkingSetMode::Record {
            restored.vm.save_working_set(&path)?;
        }
        println!(
            "restore ({mode:?}): ready in {:?} ({} windows prefetched), ran in {:?} with {} memory exits, exit {:?}",
            restored.elapsed,
            restored.prefetched_windows,
            out.elapsed,
            restored.vm.stats().memory_exits,
            out.exit_code
        );
        if out.exit_failure().is_some() {
            return Err(format!("restore: {out:?}").into());
        }
    }
    std::fs::remove_file(guestmm::snapshot::working_set_path(&path))?;
    std::fs::remove_file(&path)?;
    Ok(())
}
