//! The MSRs a [`VcpuState`](super::VcpuState) holds, read and written
//! around the MSRs KVM does not know or will not take back.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::codec::malformed;
use super::{kvm, Result, StateError};

/// The MSRs saved, in restore order (`IA32_TSC` before the MSRs whose
/// meaning depends on it). KVM reads those it knows; the rest are left
/// out of the state (see [`VcpuState::msrs`](super::VcpuState::msrs)). From Firecracker's and
/// Cloud Hypervisor's lists; `EFER` and `APIC_BASE` are in sregs.
pub const SAVED_MSRS: &[u32] = &[
    0x0000_0010, // IA32_TSC
    0x0000_003b, // IA32_TSC_ADJUST
    0x0000_0174, // IA32_SYSENTER_CS
    0x0000_0175, // IA32_SYSENTER_ESP
    0x0000_0176, // IA32_SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x0000_0277, // IA32_PAT
    0x0000_01a0, // IA32_MISC_ENABLE
    0x0000_0048, // IA32_SPEC_CTRL
    0x0000_0da0, // IA32_XSS
    0x0000_02ff, // MTRR_DEF_TYPE
    0x0000_0250, // MTRR_FIX64K_00000
    0x0000_0258, // MTRR_FIX16K_80000
    0x0000_0259, // MTRR_FIX16K_A0000
    0x0000_0268, // MTRR_FIX4K_C0000 .. F8000
    0x0000_0269,
    0x0000_026a,
    0x0000_026b,
    0x0000_026c,
    0x0000_026d,
    0x0000_026e,
    0x0000_026f,
    0x0000_0200, // MTRR_PHYSBASE0 / PHYSMASK0 .. 7
    0x0000_0201,
    0x0000_0202,
    0x0000_0203,
    0x0000_0204,
    0x0000_0205,
    0x0000_0206,
    0x0000_0207,
    0x0000_0208,
    0x0000_0209,
    0x0000_020a,
    0x0000_020b,
    0x0000_020c,
    0x0000_020d,
    0x0000_020e,
    0x0000_020f,
    0x0000_0011, // KVM_WALL_CLOCK
    0x0000_0012, // KVM_SYSTEM_TIME
    0x4b56_4d00, // KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // KVM_ASYNC_PF_EN
    0x4b56_4d03, // KVM_STEAL_TIME
    0x4b56_4d04, // KVM_PV_EOI_EN
    0x4b56_4d05, // KVM_POLL_CONTROL
    0x4b56_4d06, // KVM_ASYNC_PF_INT
    0x0000_06e0, // IA32_TSC_DEADLINE (in-kernel LAPIC only; after IA32_TSC)
];

/// Reads [`SAVED_MSRS`]. `KVM_GET_MSRS` stops at the first MSR it cannot
/// read: that one is dropped and the read resumes after it (one extra
/// ioctl per MSR this host's KVM does not know).
pub(super) fn get_msrs(fd: &VcpuFd) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(SAVED_MSRS.len());
    let mut rest = SAVED_MSRS;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| malformed(format!("msrs: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
        if n < rest.len() {
            log::trace!("KVM_GET_MSRS: MSR {:#x} not readable, skipped", rest[n]);
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Writes `msrs`. `KVM_SET_MSRS` stops at the first MSR it refuses; KVM
/// reads some MSRs it will not take back from the host (on this kernel
/// `IA32_XSS` when the guest's CPUID lacks XSAVES). One the vCPU already
/// holds at the saved value is skipped (nothing to restore), the write
/// resumes after it; any other refusal is [`StateError::MsrsRejected`].
pub(super) fn set_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<()> {
    let mut done = 0;
    while done < msrs.len() {
        let rest = &msrs[done..];
        let list = Msrs::from_entries(rest).map_err(|e| malformed(format!("msrs: {e:?}")))?;
        let n = fd.set_msrs(&list).map_err(kvm("KVM_SET_MSRS"))?;
        if n >= rest.len() {
            break;
        }
        let refused = rest[n];
        let mut current = Msrs::from_entries(&[kvm_msr_entry {
            index: refused.index,
            ..Default::default()
        }])
        .map_err(|e| malformed(format!("msrs: {e:?}")))?;
        let read = fd.get_msrs(&mut current).map_err(kvm("KVM_GET_MSRS"))?;
        if read != 1 || current.as_slice()[0].data != refused.data {
            return Err(StateError::MsrsRejected {
                set: done + n,
                total: msrs.len(),
                index: refused.index,
            });
        }
        log::trace!(
            "KVM_SET_MSRS refused MSR {:#x}, which already holds the saved value",
            refused.index
        );
        done += n + 1;
    }
    Ok(())
}
