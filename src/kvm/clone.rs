//! Cloning a running VM: the child gets a fork of the address space
//! (private memory shared copy-on-write, shared mappings shared), a new KVM
//! VM with the same device ranges, and vCPUs in the parent's state; both
//! then run on. Each side pays for what it writes: with userfaultfd write
//! protection ([`CowMode::UserfaultfdWp`](super::CowMode)) one 4 KiB copy
//! per page written, otherwise the 2 MiB chunk around it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::lifecycle::{check_vcpus, LifecycleError};
use super::vcpu_state::VmState;
use super::{Vcpu, Vm, VmOptions};
use crate::mm::ParentProtection;

/// Options of [`Vm::clone_vm`].
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// The child's options; `None` takes the parent's. The space size is
    /// always the parent's (the child maps the same layout).
    pub vm: Option<VmOptions>,
    /// How the parent's memory traps its writes from now on. The default
    /// (page-granular copy-on-write in userfaultfd mode: atomic, one page
    /// copied per page written) costs a page-table update per populated
    /// page at the clone (~40 ms per GiB on this project's nested hosts);
    /// [`ParentProtection::ReadOnly`] costs a few memslot changes however
    /// much is populated, and the parent pays later, per window it writes.
    pub parent: ParentProtection,
}

/// A clone made by [`Vm::clone_vm`].
#[derive(Debug)]
pub struct VmClone {
    /// The child VM.
    pub vm: Arc<Vm>,
    /// Its vCPUs, in the parent's order and state.
    pub vcpus: Vec<Vcpu>,
    /// Time from the call to the child ready to run (the parent's vCPUs
    /// are held out of `KVM_RUN` meanwhile).
    pub elapsed: Duration,
}

impl Vm {
    /// Clones this VM: pauses it, forks its address space into a new KVM
    /// VM, gives the child vCPUs the state of `vcpus` and installs what
    /// the child needs to run (everything populated, copy-on-write), so
    /// its first instruction costs no exit. The parent's vCPUs may run
    /// again as soon as this returns.
    ///
    /// Preconditions: `vcpus` are all of this VM's vCPUs (none of them
    /// inside [`Vcpu::run`]: they are borrowed mutably).
    ///
    /// Errors: `vcpus` not all of this VM's ([`LifecycleError::Vcpus`]);
    /// KVM refusing the new VM or a vCPU state; the fork (out of memory).
    /// The parent is unchanged by a failure, except that its private memory
    /// may be copy-on-write (a write then copies once).
    pub fn clone_vm(
        self: &Arc<Self>,
        kvm: &Kvm,
        vcpus: &mut [Vcpu],
        opts: CloneOptions,
    ) -> Result<VmClone, LifecycleError> {
        let start = Instant::now();
        check_vcpus(self, vcpus)?;
        let _paused = self.pause()?;
        let states = vcpus
            .iter_mut()
            .map(Vcpu::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        let vm_state = VmState::save(self.vm_fd())?;
        let mut child_opts = opts.vm.unwrap_or_else(|| self.options().clone());
        child_opts.space = self.space().options().clone();
        let parent_space = self.space().clone();
        let child = Vm::build(kvm, child_opts, move |slots| {
            parent_space.fork_with(slots, opts.parent)
        })?;
        for range in self.device_ranges() {
            child.add_device_range(range)?;
        }
        // An in-kernel irqchip and PIT must exist before the vCPUs.
        vm_state.create_devices(child.vm_fd())?;
        let mut child_vcpus = Vec::with_capacity(states.len());
        for (vcpu, state) in vcpus.iter().zip(&states) {
            let mut c = child.create_vcpu(vcpu.index())?;
            c.restore_state(state)?;
            child_vcpus.push(c);
        }
        vm_state.restore(child.vm_fd())?;
        child.install_host_writes()?;
        let elapsed = start.elapsed();
        log::debug!("cloned a VM of {} vCPUs in {elapsed:?}", states.len());
        Ok(VmClone {
            vm: child,
            vcpus: child_vcpus,
            elapsed,
        })
    }
}
