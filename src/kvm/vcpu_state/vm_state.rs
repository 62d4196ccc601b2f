//! [`VmState`]: the VM-wide part, the kvm-clock.

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;

use super::codec::{self, malformed, Writer};
use super::{kvm, parse, tag, Result};

const VM_MAGIC: &[u8; 8] = b"GMMVMST\0";

/// VM-wide KVM state a restored VM needs: the kvm-clock. An in-kernel
/// irqchip's and PIT's state belong to the VMM that created them, as does
/// guest memory (see the [module docs](super)).
#[derive(Clone, Debug, PartialEq)]
pub struct VmState {
    clock: kvm_clock_data,
}

impl VmState {
    /// Saves the VM's kvm-clock (`KVM_GET_CLOCK`).
    pub fn save(vm: &VmFd) -> Result<VmState> {
        let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(VmState { clock })
    }

    /// Sets the VM's kvm-clock to the saved value (`KVM_SET_CLOCK`): the
    /// guest's clock continues from where it was saved, without counting
    /// the time in between (no `KVM_CLOCK_REALTIME` adjustment). Restore
    /// before the vCPUs first run.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
    }

    /// The saved kvm-clock, in nanoseconds.
    pub fn clock_ns(&self) -> u64 {
        self.clock.clock
    }

    /// The state as bytes (format version [`FORMAT_VERSION`](super::FORMAT_VERSION)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let c = &self.clock;
        let mut w = Writer::new(VM_MAGIC);
        w.section(tag::CLOCK, |w| {
            w.u64(c.clock);
            w.u32(c.flags);
            w.u32(c.pad0);
            w.u64(c.realtime);
            w.u64(c.host_tsc);
            c.pad.iter().for_each(|&p| w.u32(p));
        });
        w.finish()
    }

    /// Decodes [`to_bytes`](Self::to_bytes)' output. Truncated, corrupted
    /// or foreign bytes are an error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState> {
        let sections = codec::sections(bytes, VM_MAGIC, "VM state")?;
        if let Some(s) = sections.iter().find(|s| s.tag != tag::CLOCK) {
            return Err(malformed(format!("VM state: unknown section {}", s.tag)));
        }
        let clock = parse(&sections, tag::CLOCK, "clock", |r| {
            Ok(kvm_clock_data {
                clock: r.u64()?,
                flags: r.u32()?,
                pad0: r.u32()?,
                realtime: r.u64()?,
                host_tsc: r.u64()?,
                pad: [r.u32()?, r.u32()?, r.u32()?, r.u32()?],
            })
        })?;
        Ok(VmState { clock })
    }
}
