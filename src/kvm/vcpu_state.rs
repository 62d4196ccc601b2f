//! vCPU and VM state for snapshots and clones: everything KVM holds for a
//! vCPU ([`VcpuState`]) and for a VM ([`VmState`]) that a restored or
//! cloned copy needs, and a small versioned byte format for both.
//!
//! ```text
//! save_state:    complete a pending I/O/MMIO exit (KVM_RUN, immediate_exit)
//!                CPUID, MP state, regs, sregs, XSAVE, XCRs, debug regs,
//!                LAPIC (in-kernel irqchip only), MSRs, vCPU events, TSC kHz
//! restore_state: TSC kHz (if it differs), then the same, in Firecracker's
//!                order: CPUID, MP state, regs, sregs, XSAVE, XCRs, debug
//!                regs, LAPIC, MSRs, vCPU events
//! ```
//!
//! [`VmState`] holds the kvm-clock and, when the VM has them, the
//! in-kernel irqchip (PIC master and slave, IOAPIC: `KVM_GET_IRQCHIP`) and
//! PIT (`KVM_GET_PIT2`); [`VmState::create_devices`] recreates them in a new
//! VM before its vCPUs. Guest memory is not part of either (the VMM copies
//! or shares it), nor are the VMM's own devices, irqfds and GSI routes.
//!
//! # Fresh vCPUs
//!
//! [`Vcpu::restore_state`] is meant for a vCPU that has not run yet: KVM
//! refuses `KVM_SET_CPUID2` after the first `KVM_RUN` unless the CPUID is
//! identical to the one set before (Linux ≥ 5.19; older kernels refuse it
//! outright). Restoring a different CPUID onto a vCPU that ran is
//! [`StateError::CpuidRejected`]; restoring an identical one works.
//!
//! # Pending exits
//!
//! KVM finishes an I/O or MMIO exit only on the next `KVM_RUN`: an `out`
//! is already past at the exit, but an `in` or an MMIO read gets its
//! register written (and `rip` moved) then. [`Vcpu::save_state`] does that
//! run with `immediate_exit` set, so the guest does not run.
//!
//! # Byte format
//!
//! Magic (`GMMVCPU\0`, `GMMVMST\0`), [`FORMAT_VERSION`], then tagged,
//! length-prefixed sections holding every named field of the KVM
//! structures little-endian (no struct is reinterpreted as bytes), then an
//! FNV-1a checksum. Truncated, corrupted or foreign bytes are a
//! [`StateError`], never a panic. The format is for the host and KVM that
//! wrote it (or a compatible one: same CPU features, XSAVE size and MSRs).

mod codec;
mod msrs;
mod sys;
#[cfg(test)]
mod tests;
mod vm_state;

pub use msrs::SAVED_MSRS;
pub use vm_state::VmState;

use std::fmt;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, KVM_MAX_CPUID_ENTRIES,
};

use self::codec::{malformed, Reader, Section, Writer};
use self::msrs::{get_msrs, set_msrs};
use self::sys::{get_xsave, set_xsave, xsave_size, MAX_XSAVE_WORDS, XSAVE_LEGACY};
use kvm_ioctls::{VcpuFd, VmFd};

use super::Vcpu;

/// Why a state could not be saved, restored or decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_CPUID2` refused the CPUID: the vCPU has already run with a
    /// different one (restore onto a fresh vCPU; see the module docs).
    #[error(
        "KVM_SET_CPUID2 refused the saved CPUID (the vCPU has run with a different one?): {source}"
    )]
    CpuidRejected {
        /// KVM's error (`EINVAL`).
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list.
    #[error("KVM_SET_MSRS set {set} of {total} MSRs; it refused MSR {index:#x}")]
    MsrsRejected {
        /// How many it set.
        set: usize,
        /// How many there were.
        total: usize,
        /// The MSR it refused.
        index: u32,
    },
    /// The saved XSAVE area is larger than this host's (`KVM_CAP_XSAVE2`).
    #[error("the saved XSAVE area is {saved} bytes, this host's is {host}")]
    XsaveTooLarge {
        /// The saved area's size.
        saved: usize,
        /// This host's.
        host: usize,
    },
    /// A `KVM_RUN` that completes a pending I/O or MMIO exit before saving
    /// exited again (a string I/O or a multi-part MMIO instruction stopped
    /// in the middle): run the vCPU to its next exit, answer it, save then.
    #[error("completing the pending exit ended in another exit (reason {reason}); answer it and save again")]
    Unfinished {
        /// The new exit's `kvm_run.exit_reason`.
        reason: u32,
    },
    /// The bytes end early.
    #[error("{what} is truncated: {need} more bytes needed, {have} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// The bytes are not this kind of state.
    #[error("bad magic {found:02x?}, want {want:02x?}")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
        /// What they should be.
        want: [u8; 8],
    },
    /// A format version this code does not read.
    #[error("format version {found}, this code reads version {supported}")]
    BadVersion {
        /// The version found.
        found: u16,
        /// The version this code reads.
        supported: u16,
    },
    /// The checksum does not match: the bytes were corrupted.
    #[error("checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    BadChecksum {
        /// The stored checksum.
        stored: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// The bytes parse but do not describe a valid state.
    #[error("malformed state: {why}")]
    Malformed {
        /// What is wrong.
        why: String,
    },
}

/// `Result` of this module.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

/// Everything KVM holds for one vCPU that a restored or cloned vCPU needs
/// (see the [module docs](self)).
#[derive(Clone, PartialEq)]
pub struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// `KVM_GET_XSAVE(2)`'s area as 32-bit words (≥ 4 KiB).
    xsave: Vec<u32>,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: Option<kvm_lapic_state>,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    tsc_khz: Option<u32>,
}

impl fmt::Debug for VcpuState {
    /// The registers in full, the bulky parts by size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuState")
            .field("regs", &self.regs)
            .field("sregs", &self.sregs)
            .field("mp_state", &self.mp_state.mp_state)
            .field("cpuid_entries", &self.cpuid.len())
            .field("xsave_bytes", &(self.xsave.len() * 4))
            .field(
                "xcrs",
                &&self.xcrs.xcrs[..(self.xcrs.nr_xcrs as usize).min(16)],
            )
            .field("lapic", &self.lapic.is_some())
            .field("msrs", &self.msrs)
            .field("events", &self.events)
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

const VCPU_MAGIC: &[u8; 8] = b"GMMVCPU\0";

/// Section tags of a [`VcpuState`].
mod tag {
    pub const CPUID: u32 = 1;
    pub const MP_STATE: u32 = 2;
    pub const REGS: u32 = 3;
    pub const SREGS: u32 = 4;
    pub const XSAVE: u32 = 5;
    pub const XCRS: u32 = 6;
    pub const DEBUGREGS: u32 = 7;
    pub const LAPIC: u32 = 8;
    pub const MSRS: u32 = 9;
    pub const EVENTS: u32 = 10;
    pub const TSC_KHZ: u32 = 11;
    pub const CLOCK: u32 = 100;
    pub const IRQCHIP: u32 = 101;
    pub const PIT: u32 = 102;
}

impl VcpuState {
    /// The general-purpose registers, `rip` and `rflags`.
    pub fn regs(&self) -> &kvm_regs {
        &self.regs
    }

    /// The special registers (segments, control registers, EFER).
    pub fn sregs(&self) -> &kvm_sregs {
        &self.sregs
    }

    /// The CPUID entries the vCPU had.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// The XSAVE area (x87, SSE, AVX, AVX-512 … state) as KVM returns it,
    /// in 32-bit words: the legacy region is the first 1024.
    pub fn xsave_words(&self) -> &[u32] {
        &self.xsave
    }

    /// The MSRs saved: those of [`SAVED_MSRS`] KVM could read.
    pub fn msrs(&self) -> &[kvm_msr_entry] {
        &self.msrs
    }

    /// Whether the LAPIC was saved (the VM has an in-kernel irqchip).
    pub fn has_lapic(&self) -> bool {
        self.lapic.is_some()
    }

    /// The LAPIC's registers, if the VM has an in-kernel irqchip.
    pub fn lapic(&self) -> Option<&kvm_lapic_state> {
        self.lapic.as_ref()
    }

    /// Restores this state into the KVM vCPU `fd` of VM `vm`, for a VMM
    /// that drives raw kvm-ioctls vCPUs ([`Vcpu::restore_state`] is the
    /// same for guestmm's). For a fresh vCPU (one that has not run): on
    /// one that ran, a CPUID other than its own is
    /// [`StateError::CpuidRejected`]. A failure part-way leaves the vCPU
    /// partly restored: discard it.
    pub fn restore_to(&self, fd: &VcpuFd, vm: &VmFd) -> Result<()> {
        let state = self;
        if let Some(khz) = state.tsc_khz {
            // Only when it differs: setting needs KVM_CAP_TSC_CONTROL.
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid =
            CpuId::from_entries(&state.cpuid).map_err(|e| malformed(format!("cpuid: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(|source| {
            if source.errno() == libc::EINVAL {
                StateError::CpuidRejected { source }
            } else {
                kvm("KVM_SET_CPUID2")(source)
            }
        })?;
        fd.set_mp_state(state.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        set_xsave(fd, xsave_size(vm), &state.xsave)?;
        fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        if let Some(l) = &state.lapic {
            fd.set_lapic(l).map_err(kvm("KVM_SET_LAPIC"))?;
        }
        set_msrs(fd, &state.msrs)?;
        fd.set_vcpu_events(&state.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The state as bytes (format version [`FORMAT_VERSION`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(VCPU_MAGIC);
        w.section(tag::CPUID, |w| codec::put_cpuid(w, &self.cpuid));
        w.section(tag::MP_STATE, |w| w.u32(self.mp_state.mp_state));
        w.section(tag::REGS, |w| codec::put_regs(w, &self.regs));
        w.section(tag::SREGS, |w| codec::put_sregs(w, &self.sregs));
        w.section(tag::XSAVE, |w| codec::put_words(w, &self.xsave));
        w.section(tag::XCRS, |w| codec::put_xcrs(w, &self.xcrs));
        w.section(tag::DEBUGREGS, |w| codec::put_debugregs(w, &self.debugregs));
        if let Some(l) = &self.lapic {
            w.section(tag::LAPIC, |w| codec::put_lapic(w, l));
        }
        w.section(tag::MSRS, |w| codec::put_msrs(w, &self.msrs));
        w.section(tag::EVENTS, |w| codec::put_events(w, &self.events));
        if let Some(khz) = self.tsc_khz {
            w.section(tag::TSC_KHZ, |w| w.u32(khz));
        }
        w.finish()
    }

    /// Decodes [`to_bytes`](Self::to_bytes)' output. Truncated, corrupted
    /// or foreign bytes are an error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<VcpuState> {
        let sections = codec::sections(bytes, VCPU_MAGIC, "vCPU state")?;
        for s in &sections {
            if !(tag::CPUID..=tag::TSC_KHZ).contains(&s.tag) {
                return Err(malformed(format!("vCPU state: unknown section {}", s.tag)));
            }
        }
        let cpuid = parse(&sections, tag::CPUID, "cpuid", codec::get_cpuid)?;
        let mp_state = parse(&sections, tag::MP_STATE, "mp state", |r| {
            Ok(kvm_mp_state { mp_state: r.u32()? })
        })?;
        let regs = parse(&sections, tag::REGS, "regs", codec::get_regs)?;
        let sregs = parse(&sections, tag::SREGS, "sregs", codec::get_sregs)?;
        let xsave = parse(&sections, tag::XSAVE, "xsave", |r| {
            codec::get_words(r, MAX_XSAVE_WORDS)
        })?;
        if xsave.len() < XSAVE_LEGACY / 4 {
            return Err(malformed(format!(
                "xsave: {} bytes, less than the legacy {XSAVE_LEGACY}",
                xsave.len() * 4
            )));
        }
        let xcrs = parse(&sections, tag::XCRS, "xcrs", codec::get_xcrs)?;
        let debugregs = parse(&sections, tag::DEBUGREGS, "debugregs", codec::get_debugregs)?;
        let lapic = parse_opt(&sections, tag::LAPIC, "lapic", codec::get_lapic)?;
        let msrs = parse(&sections, tag::MSRS, "msrs", |r| {
            codec::get_msrs(r, SAVED_MSRS.len())
        })?;
        let events = parse(&sections, tag::EVENTS, "vcpu events", codec::get_events)?;
        let tsc_khz = parse_opt(&sections, tag::TSC_KHZ, "tsc khz", |r| r.u32())?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }
}

/// The format version [`VcpuState::to_bytes`] and [`VmState::to_bytes`]
/// write (and the only one their `from_bytes` read).
pub const FORMAT_VERSION: u16 = codec::VERSION;

/// Decodes the section `tag`, which must exist and be used up.
fn parse<T>(
    sections: &[Section<'_>],
    tag: u32,
    what: &'static str,
    f: impl FnOnce(&mut Reader<'_>) -> Result<T>,
) -> Result<T> {
    parse_opt(sections, tag, what, f)?.ok_or_else(|| malformed(format!("no {what} section")))
}

/// Decodes the section `tag` if it exists.
fn parse_opt<T>(
    sections: &[Section<'_>],
    tag: u32,
    what: &'static str,
    f: impl FnOnce(&mut Reader<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let Some(s) = sections.iter().find(|s| s.tag == tag) else {
        return Ok(None);
    };
    let mut r = s.reader(what);
    let v = f(&mut r)?;
    r.done()?;
    Ok(Some(v))
}

/// Exits KVM completes only on the next `KVM_RUN` (KVM API docs, `kvm_run`).
const NEEDS_COMPLETION: &[u32] = &[
    kvm_bindings::KVM_EXIT_IO,
    kvm_bindings::KVM_EXIT_MMIO,
    kvm_bindings::KVM_EXIT_X86_RDMSR,
    kvm_bindings::KVM_EXIT_X86_WRMSR,
    kvm_bindings::KVM_EXIT_XEN,
];

impl Vcpu {
    /// Saves the vCPU's state. If its last exit was an I/O or MMIO exit
    /// (or another KVM completes on the next run), a `KVM_RUN` with
    /// `immediate_exit` completes it first (the guest does not run), so
    /// the state is past the instruction.
    ///
    /// Preconditions: the vCPU is not inside `KVM_RUN` (it is `&mut`); a
    /// pending `IoIn`/`MmioRead` has its data filled in. Other vCPUs of
    /// the VM should be stopped or paused for a consistent snapshot.
    pub fn save_state(&mut self) -> Result<VcpuState> {
        self.complete_pending_exit()?;
        let fd = self.fd();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = get_xsave(fd, xsave_size(self.vm().vm_fd()))?;
        let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        // Without an in-kernel irqchip there is no LAPIC: EINVAL (older
        // kernels: ENXIO).
        let lapic = match fd.get_lapic() {
            Ok(l) => Some(l),
            Err(e) if matches!(e.errno(), libc::EINVAL | libc::ENXIO) => None,
            Err(e) => return Err(kvm("KVM_GET_LAPIC")(e)),
        };
        let msrs = get_msrs(fd)?;
        let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Restores `state` (see the [module docs](self) for the order). For a
    /// fresh vCPU (one that has not run): on one that ran, a CPUID other
    /// than its own is [`StateError::CpuidRejected`]. A failure part-way
    /// leaves the vCPU partly restored: discard it.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        state.restore_to(self.fd(), self.vm().vm_fd())
    }

    /// Completes an exit KVM finishes only on the next `KVM_RUN` (the
    /// registers of an `in` are written then, `rip` moves past an `out`):
    /// one `KVM_RUN` with `immediate_exit` set, which returns `EINTR`
    /// without entering the guest. Nothing to do on a fresh vCPU, so that
    /// saving it does not count as a run.
    fn complete_pending_exit(&mut self) -> Result<()> {
        let run = self.kvm_run();
        if !NEEDS_COMPLETION.contains(&run.exit_reason) {
            return Ok(());
        }
        let err = sys::run_with_immediate_exit(self).err();
        let run = self.kvm_run();
        match err {
            Some(e) if e.errno() == libc::EINTR => Ok(()),
            Some(e) => Err(kvm("KVM_RUN (immediate exit)")(e)),
            None => Err(StateError::Unfinished {
                reason: run.exit_reason,
            }),
        }
    }
}
