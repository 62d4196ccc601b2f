//! Unit tests over a synthetic state (no KVM).

use super::*;

/// A state with every section and non-zero fields, built without KVM.
fn synthetic() -> VcpuState {
    let mut s = VcpuState {
        cpuid: (0..20)
            .map(|i| kvm_cpuid_entry2 {
                function: i,
                index: i % 3,
                eax: i * 7,
                edx: !i,
                ..Default::default()
            })
            .collect(),
        mp_state: kvm_mp_state { mp_state: 3 },
        regs: kvm_regs {
            rax: 1,
            r15: u64::MAX,
            rip: 0x20_0000,
            rflags: 0x402,
            ..Default::default()
        },
        sregs: kvm_sregs {
            efer: 0x500,
            cr0: 0x8000_0031,
            ..Default::default()
        },
        xsave: (0..1024 + 700).collect(),
        xcrs: kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        },
        debugregs: kvm_debugregs {
            dr7: 0x400,
            ..Default::default()
        },
        lapic: Some(kvm_lapic_state { regs: [5; 1024] }),
        msrs: SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                reserved: 0,
                data: u64::from(index) << 3,
            })
            .collect(),
        events: kvm_vcpu_events::default(),
        tsc_khz: Some(2_100_000),
    };
    s.sregs.cs.l = 1;
    s.sregs.gdt.limit = 0x27;
    s.xcrs.xcrs[0].value = 0xe7;
    s.events.exception.nr = 14;
    s.events.exception_payload = 0xdead;
    s.events.reserved[25] = 9;
    s
}

#[test]
fn every_section_roundtrips() {
    let s = synthetic();
    assert_eq!(VcpuState::from_bytes(&s.to_bytes()).unwrap(), s);
    let none = VcpuState {
        lapic: None,
        tsc_khz: None,
        ..s
    };
    assert_eq!(VcpuState::from_bytes(&none.to_bytes()).unwrap(), none);
}

/// Every byte changed (and the checksum fixed up, so the section
/// parsers see it): an error or a state, never a panic.
#[test]
fn resealed_corruption_of_every_byte_never_panics() {
    let good = synthetic().to_bytes();
    for i in 8..good.len() - 8 {
        for flip in [1u8 << (i % 8), 0xff] {
            let mut b = good.clone();
            b[i] ^= flip;
            codec::reseal(&mut b);
            let _ = VcpuState::from_bytes(&b);
        }
    }
}

#[test]
fn a_crafted_flood_of_sections_is_refused_at_once() {
    // 200,000 empty sections with distinct tags and a valid checksum: a
    // quadratic duplicate check would take seconds; it is refused by count.
    let mut w = super::codec::Writer::new(VCPU_MAGIC);
    for tag in 0..200_000u32 {
        w.section(tag + 1000, |_| {});
    }
    let bytes = w.finish();
    let start = std::time::Instant::now();
    let err = VcpuState::from_bytes(&bytes).unwrap_err();
    assert!(err.to_string().contains("sections"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
}
