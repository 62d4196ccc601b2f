//! The Firecracker way to restore a snapshot, as a peer of `Vm::restore`:
//! guest memory is one private anonymous mapping covering every guest
//! address the snapshot maps (boot region, gap and RAM), registered up
//! front as ONE memslot at GPA 0 and with userfaultfd in missing mode; a
//! handler thread serves each fault with `UFFDIO_COPY` of the 4 KiB page
//! (or the 2 MiB block around it) read with `pread` from the snapshot
//! file at `data_offset + gpa`, and `UFFDIO_ZEROPAGE` where the snapshot
//! holds no data.
//!
//! The vCPU: guestmm has no way to restore a [`VcpuState`] into a raw
//! `VcpuFd` (only `Vcpu::restore_state` on a guestmm `Vcpu`), so the KVM VM
//! is a guestmm `Vm` whose address space stays empty (no vma, no slot of
//! its own): it is only the vessel of the VM fd and the vCPU. The memslot
//! is registered on its fd directly, so KVM resolves every guest access
//! through the anonymous mapping and never exits for memory.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmm::kvm::{CowMode, Vcpu, VcpuState, Vm, VmOptions, VmState};
use guestmm::memfile::{MemoryFile, MemoryFileOptions};
use guestmm::snapshot::Snapshot;
use kvm_ioctls::Kvm;

use super::anon_vm::AnonRam;
use super::uffd::{Source, UffdHandler, UffdMode};

const HUGE: u64 = 2 << 20;

/// A VM restored the Firecracker way. Field order matters: the vCPU and
/// the VM go before the handler, the handler before the memory it fills.
pub struct FcRestored {
    /// The vCPU, in the snapshot's state.
    pub vcpu: Vcpu,
    /// The VM (its address space empty).
    pub vm: Arc<Vm>,
    handler: UffdHandler,
    _ram: AnonRam,
    /// Time from the call to the vCPU ready.
    pub elapsed: Duration,
}

impl FcRestored {
    /// Faults the handler served so far.
    pub fn faults(&self) -> u64 {
        self.handler.faults()
    }
}

/// Restores the single-vCPU snapshot at `path` the Firecracker way, with
/// the handler copying `mode`'s unit (`Copy4k` or `Copy2m`). `Err` says why
/// (userfaultfd unavailable, a KVM refusal, a bad snapshot).
pub fn restore(kvm: &Kvm, path: &Path, mode: UffdMode) -> Result<FcRestored, String> {
    let start = Instant::now();
    let snap = Snapshot::open(path).map_err(|e| e.to_string())?;
    let meta = snap.meta().clone();
    if meta.vcpus.len() != 1 {
        return Err(format!("{} vCPUs; the peer runs one", meta.vcpus.len()));
    }
    let end = meta
        .vmas
        .iter()
        .map(|v| v.range.end())
        .max()
        .ok_or("no vma")?
        .next_multiple_of(HUGE);
    // The memory file stays empty: nothing is ever mapped in the space.
    let memfile = Arc::new(
        MemoryFile::new("fc-restore", MemoryFileOptions::default()).map_err(|e| e.to_string())?,
    );
    let vm = Vm::new(
        kvm,
        memfile,
        VmOptions {
            cow: CowMode::ReadOnlySlots,
            ..VmOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let ram = AnonRam::new(end);
    let data = meta.data.iter().map(|r| (r.start(), r.end())).collect();
    let source = Source::File {
        offset: snap.data_offset(),
        file: snap.into_file(),
        data,
    };
    // SAFETY: `ram` outlives the handler (FcRestored field order).
    let handler = unsafe { UffdHandler::start_from(ram.addr(), ram.len(), mode, source) }?;
    ram.register(vm.vm_fd(), 0, 0);
    let state = VcpuState::from_bytes(&meta.vcpus[0]).map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    vcpu.restore_state(&state).map_err(|e| e.to_string())?;
    VmState::from_bytes(&meta.vm_state)
        .and_then(|s| s.restore(vm.vm_fd()))
        .map_err(|e| e.to_string())?;
    Ok(FcRestored {
        vcpu,
        vm,
        handler,
        _ram: ram,
        elapsed: start.elapsed(),
    })
}
