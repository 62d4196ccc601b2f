//! The unsafe part of saving and restoring: the XSAVE area
//! (`KVM_GET_XSAVE`/`KVM_SET_XSAVE` for the legacy 4 KiB, `KVM_GET_XSAVE2`
//! and a FAM-extended buffer when `KVM_CAP_XSAVE2` says the area is larger,
//! e.g. with AMX), and a `KVM_RUN` that does not enter the guest.

use kvm_bindings::{kvm_xsave, Xsave};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

use super::codec::malformed;
use super::{kvm, Result, StateError};
use crate::kvm::Vcpu;

/// `KVM_RUN`'s request number (kvm-ioctls does not export it).
mod ioctl {
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
}

/// One `KVM_RUN` with `immediate_exit` set: KVM completes a pending exit
/// and returns `EINTR` without entering the guest (`Ok` means it exited
/// again instead). `immediate_exit` is 0 again afterwards.
pub(super) fn run_with_immediate_exit(
    vcpu: &mut Vcpu,
) -> std::result::Result<(), vmm_sys_util::errno::Error> {
    vcpu.kvm_run().immediate_exit = 1;
    // SAFETY: KVM_RUN takes no argument; what it writes is this vCPU's
    // `kvm_run` mapping, which `&mut Vcpu` holds exclusively (no reference
    // into it is alive across the call).
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(vcpu.fd(), ioctl::KVM_RUN()) };
    let result = if ret == 0 {
        Ok(())
    } else {
        Err(vmm_sys_util::errno::Error::last())
    };
    vcpu.kvm_run().immediate_exit = 0;
    result
}

/// XSAVE areas larger than this are refused as malformed (AMX needs ~11 KiB).
pub(super) const MAX_XSAVE_WORDS: usize = 64 << 10;
/// The legacy `kvm_xsave` size.
pub(super) const XSAVE_LEGACY: usize = std::mem::size_of::<kvm_xsave>();

/// The XSAVE area size KVM uses on this VM (`KVM_CAP_XSAVE2`, at least
/// the legacy 4 KiB).
pub(super) fn xsave_size(vm: &VmFd) -> usize {
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .unwrap_or(0)
        .max(XSAVE_LEGACY)
}

/// A FAM-extended `kvm_xsave2` of `size` bytes.
fn xsave2_of(size: usize) -> Result<Xsave> {
    Xsave::new((size - XSAVE_LEGACY).div_ceil(4))
        .map_err(|e| malformed(format!("xsave area of {size} bytes: {e:?}")))
}

/// The vCPU's XSAVE area (`size` bytes: [`xsave_size`]) as 32-bit words.
pub(super) fn get_xsave(fd: &VcpuFd, size: usize) -> Result<Vec<u32>> {
    if size <= XSAVE_LEGACY {
        return Ok(fd
            .get_xsave()
            .map_err(kvm("KVM_GET_XSAVE"))?
            .region
            .to_vec());
    }
    let mut x = xsave2_of(size)?;
    // SAFETY: `x` holds `size` bytes, KVM_CAP_XSAVE2's size for this VM,
    // which is what KVM_GET_XSAVE2 writes.
    unsafe { fd.get_xsave2(&mut x) }.map_err(kvm("KVM_GET_XSAVE2"))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

/// Sets the vCPU's XSAVE area from `words`, zero-padded to `size` bytes
/// ([`xsave_size`]); a larger saved area is [`StateError::XsaveTooLarge`].
pub(super) fn set_xsave(fd: &VcpuFd, size: usize, words: &[u32]) -> Result<()> {
    if words.len() * 4 > size {
        return Err(StateError::XsaveTooLarge {
            saved: words.len() * 4,
            host: size,
        });
    }
    let (legacy, extra) = words.split_at(words.len().min(XSAVE_LEGACY / 4));
    if size <= XSAVE_LEGACY {
        let mut x = kvm_xsave::default();
        x.region[..legacy.len()].copy_from_slice(legacy);
        // SAFETY: KVM reads KVM_CAP_XSAVE2's size for this VM, which is
        // the legacy size here: all of `x`.
        return unsafe { fd.set_xsave(&x) }.map_err(kvm("KVM_SET_XSAVE"));
    }
    let mut x = xsave2_of(size)?;
    // SAFETY: only `region` is written, not the length the wrapper keeps
    // consistent with its allocation.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..legacy.len()].copy_from_slice(legacy);
    x.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `x` holds `size` bytes, KVM_CAP_XSAVE2's size for this VM,
    // which is what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave2(&x) }.map_err(kvm("KVM_SET_XSAVE2"))
}
