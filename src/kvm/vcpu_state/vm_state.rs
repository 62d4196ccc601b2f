//! [`VmState`]: the VM-wide part: the kvm-clock, and the in-kernel
//! irqchip (PIC master and slave, IOAPIC) and PIT when the VM has them.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_irqchip__bindgen_ty_1, kvm_pit_channel_state, kvm_pit_config,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;

use super::codec::{self, malformed, Writer};
use super::{kvm, parse, parse_opt, tag, Result};

const VM_MAGIC: &[u8; 8] = b"GMMVMST\0";

/// The irqchips `KVM_GET_IRQCHIP` knows: PIC master, PIC slave, IOAPIC.
const CHIPS: [u32; 3] = [0, 1, 2];

/// Bytes of an irqchip's state (the kernel's union).
const CHIP_BYTES: usize = 512;

/// VM-wide KVM state a restored VM needs: the kvm-clock, and the in-kernel
/// irqchip's and PIT's state when the VM has them (a restore or clone
/// creates them before the vCPUs: [`create_devices`](Self::create_devices)).
/// Guest memory and other devices belong to the VMM (see the
/// [module docs](super)).
#[derive(Clone, Debug)]
pub struct VmState {
    clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC: `(chip id, state bytes)`.
    irqchip: Option<Vec<(u32, [u8; CHIP_BYTES])>>,
    pit: Option<kvm_pit_state2>,
}

impl PartialEq for VmState {
    fn eq(&self, other: &Self) -> bool {
        self.to_bytes() == other.to_bytes()
    }
}

/// A chip's state as bytes.
fn chip_bytes(chip: &kvm_irqchip) -> [u8; CHIP_BYTES] {
    // SAFETY: every member of the union is plain data and `dummy` spans
    // all of it: any bit pattern is a valid `[c_char; 512]`.
    let raw = unsafe { chip.chip.dummy };
    raw.map(|b| b as u8)
}

impl VmState {
    /// Saves the VM's kvm-clock (`KVM_GET_CLOCK`).
    pub fn save(vm: &VmFd) -> Result<VmState> {
        let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let mut chips = Vec::new();
        for id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            match vm.get_irqchip(&mut chip) {
                Ok(()) => chips.push((id, chip_bytes(&chip))),
                // No in-kernel irqchip: ENXIO (EINVAL on some kernels).
                Err(e) if matches!(e.errno(), libc::ENXIO | libc::EINVAL) => break,
                Err(e) => return Err(kvm("KVM_GET_IRQCHIP")(e)),
            }
        }
        let irqchip = (chips.len() == CHIPS.len()).then_some(chips);
        let pit = match vm.get_pit2() {
            Ok(p) => Some(p),
            Err(e) if matches!(e.errno(), libc::ENXIO | libc::EINVAL) => None,
            Err(e) => return Err(kvm("KVM_GET_PIT2")(e)),
        };
        Ok(VmState {
            clock,
            irqchip,
            pit,
        })
    }

    /// Whether the saved VM had an in-kernel irqchip.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip.is_some()
    }

    /// Whether the saved VM had an in-kernel PIT.
    pub fn has_pit(&self) -> bool {
        self.pit.is_some()
    }

    /// Creates, in a new VM, the in-kernel devices the saved VM had
    /// (`KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`), as KVM requires before
    /// the vCPUs are created; [`restore`](Self::restore) then sets their
    /// state.
    pub fn create_devices(&self, vm: &VmFd) -> Result<()> {
        if self.irqchip.is_some() {
            vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        }
        if self.pit.is_some() {
            let config = kvm_pit_config::default();
            vm.create_pit2(config).map_err(kvm("KVM_CREATE_PIT2"))?;
        }
        Ok(())
    }

    /// Sets the VM's kvm-clock to the saved value (`KVM_SET_CLOCK`): the
    /// guest's clock continues from where it was saved, without counting
    /// the time in between (no `KVM_CLOCK_REALTIME` adjustment). Restore
    /// before the vCPUs first run.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        if let Some(chips) = &self.irqchip {
            for (id, bytes) in chips {
                let chip = kvm_irqchip {
                    chip_id: *id,
                    pad: 0,
                    chip: kvm_irqchip__bindgen_ty_1 {
                        dummy: bytes.map(|b| b as std::os::raw::c_char),
                    },
                };
                vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
            }
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?;
        }
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
        if let Some(chips) = &self.irqchip {
            w.section(tag::IRQCHIP, |w| {
                for (id, bytes) in chips {
                    w.u32(*id);
                    w.bytes(bytes);
                }
            });
        }
        if let Some(p) = &self.pit {
            w.section(tag::PIT, |w| {
                for c in &p.channels {
                    w.u32(c.count);
                    w.u16(c.latched_count);
                    for b in [
                        c.count_latched,
                        c.status_latched,
                        c.status,
                        c.read_state,
                        c.write_state,
                        c.write_latch,
                        c.rw_mode,
                        c.mode,
                        c.bcd,
                        c.gate,
                    ] {
                        w.u8(b);
                    }
                    w.u64(c.count_load_time as u64);
                }
                w.u32(p.flags);
                p.reserved.iter().for_each(|&r| w.u32(r));
            });
        }
        w.finish()
    }

    /// Decodes [`to_bytes`](Self::to_bytes)' output. Truncated, corrupted
    /// or foreign bytes are an error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<VmState> {
        let sections = codec::sections(bytes, VM_MAGIC, "VM state")?;
        let known = [tag::CLOCK, tag::IRQCHIP, tag::PIT];
        if let Some(s) = sections.iter().find(|s| !known.contains(&s.tag)) {
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
        let irqchip = parse_opt(&sections, tag::IRQCHIP, "irqchip", |r| {
            CHIPS
                .iter()
                .map(|&want| {
                    let id = r.u32()?;
                    if id != want {
                        return Err(malformed(format!("irqchip: chip {id}, want {want}")));
                    }
                    let bytes: [u8; CHIP_BYTES] =
                        r.take(CHIP_BYTES)?.try_into().expect("CHIP_BYTES taken");
                    Ok((id, bytes))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let pit = parse_opt(&sections, tag::PIT, "PIT", |r| {
            let mut channels = [kvm_pit_channel_state::default(); 3];
            for c in &mut channels {
                c.count = r.u32()?;
                c.latched_count = r.u16()?;
                c.count_latched = r.u8()?;
                c.status_latched = r.u8()?;
                c.status = r.u8()?;
                c.read_state = r.u8()?;
                c.write_state = r.u8()?;
                c.write_latch = r.u8()?;
                c.rw_mode = r.u8()?;
                c.mode = r.u8()?;
                c.bcd = r.u8()?;
                c.gate = r.u8()?;
                c.count_load_time = r.u64()? as i64;
            }
            let flags = r.u32()?;
            let mut reserved = [0u32; 9];
            for x in &mut reserved {
                *x = r.u32()?;
            }
            Ok(kvm_pit_state2 {
                channels,
                flags,
                reserved,
            })
        })?;
        Ok(VmState {
            clock,
            irqchip,
            pit,
        })
    }
}
