//! Sizing what iced-x86 cannot: masks, VSIB elements, XSAVE areas.

use super::*;
use iced_x86::{Decoder, DecoderOptions};

fn decode(bytes: &[u8]) -> Instruction {
    let i = Decoder::with_ip(64, bytes, 0x20_0000, DecoderOptions::NONE).decode();
    assert!(!i.is_invalid(), "{bytes:02x?} does not decode");
    i
}

/// Intel's standard-layout offsets: AVX, opmask, ZMM_Hi256, Hi16_ZMM, PKRU.
fn intel_layout() -> XsaveLayout {
    let mut components = [(0, 0, false); 64];
    components[2] = (256, 576, false);
    components[5] = (64, 1088, false);
    components[6] = (512, 1152, false);
    components[7] = (1024, 1664, false);
    components[9] = (8, 2688, false);
    XsaveLayout { components }
}

fn regs() -> kvm_regs {
    kvm_regs {
        rax: 0x4000_0000,
        rdi: 0x4100_0000,
        ..Default::default()
    }
}

fn cpu<'a>(
    regs: &'a kvm_regs,
    sregs: &'a kvm_sregs,
    vectors: Option<&'a VectorRegs>,
) -> CpuState<'a> {
    CpuState {
        regs,
        sregs,
        long64: true,
        vectors,
        xcr0: 0,
        xcr0_extra: 0,
    }
}

/// Vector registers with `ymm[n]` = `bytes` and `k1` = `k1`.
fn vectors(set: &[(usize, [u8; 32])], k1: u64) -> VectorRegs {
    let mut v = VectorRegs {
        zmm: [[0; 64]; 32],
        k: [0; 8],
    };
    for (n, bytes) in set {
        v.zmm[*n][..32].copy_from_slice(bytes);
    }
    v.k[1] = k1;
    v
}

/// A ymm value whose dword elements are selected (sign bit) where `mask` has a 1.
fn dword_mask(mask: u8) -> [u8; 32] {
    let mut b = [0u8; 32];
    for i in 0..8 {
        if mask & (1 << i) != 0 {
            b[i * 4 + 3] = 0x80;
        }
    }
    b
}

/// A touch as (gva, size, access, required).
type Flat = (u64, u32, Access, bool);

fn touches(t: &[Touch]) -> Vec<Flat> {
    t.iter()
        .map(|t| (t.op.gva, t.op.size, t.op.access, t.required))
        .collect()
}

#[test]
fn vmaskmovps_store_touches_only_the_selected_elements() {
    // vmaskmovps [rdi], ymm1 (mask), ymm2
    let instr = decode(&[0xc4, 0xe2, 0x75, 0x2e, 0x17]);
    assert_eq!(instr.mnemonic(), Mnemonic::Vmaskmovps);
    assert!(need_vectors(&instr));
    let (r, s) = (regs(), kvm_sregs::default());
    let cases: &[(u8, Vec<Flat>)] = &[
        // Elements 0-3 selected: the first 16 bytes only (the rest may lie
        // past the end of RAM).
        (0b0000_1111, vec![(r.rdi, 16, Access::Write, true)]),
        // Two runs.
        (
            0b1100_0011,
            vec![
                (r.rdi, 8, Access::Write, true),
                (r.rdi + 24, 8, Access::Write, true),
            ],
        ),
        // Nothing selected: nothing touched.
        (0, vec![]),
        (0xff, vec![(r.rdi, 32, Access::Write, true)]),
    ];
    for (mask, want) in cases {
        let v = vectors(&[(1, dword_mask(*mask))], 0);
        let got = touches(&memory_accesses(&instr, &cpu(&r, &s, Some(&v))));
        assert_eq!(
            &got, want,
            "mask {mask:#010b}: got {got:x?}, want {want:x?}"
        );
    }
    // Without the vector state, the whole operand counts.
    let got = touches(&memory_accesses(&instr, &cpu(&r, &s, None)));
    assert_eq!(got, vec![(r.rdi, 32, Access::Write, true)]);
}

#[test]
fn avx512_masked_store_follows_its_opmask() {
    // vmovdqu32 [rdi]{k1}, zmm0
    let instr = decode(&[0x62, 0xf1, 0x7e, 0x49, 0x7f, 0x07]);
    assert!(instr.has_op_mask());
    let (r, s) = (regs(), kvm_sregs::default());
    let v = vectors(&[], 0x00ff); // dword elements 0-7 of 16
    let got = touches(&memory_accesses(&instr, &cpu(&r, &s, Some(&v))));
    assert_eq!(got, vec![(r.rdi, 32, Access::Write, true)]);
}

#[test]
fn a_gather_touches_each_selected_element_at_its_index() {
    // vpgatherdd ymm0, [rax+ymm1*4], ymm2
    let instr = decode(&[0xc4, 0xe2, 0x6d, 0x90, 0x04, 0x88]);
    assert_eq!(instr.mnemonic(), Mnemonic::Vpgatherdd);
    assert!(need_vectors(&instr));
    let mut index = [0u8; 32];
    // Indices: element i at i * 0x1000 (one page apart), element 7 negative.
    for i in 0..8u32 {
        let v: i32 = if i == 7 { -1 } else { (i * 0x400) as i32 };
        index[i as usize * 4..][..4].copy_from_slice(&v.to_le_bytes());
    }
    let (r, s) = (regs(), kvm_sregs::default());
    let v = vectors(&[(1, index), (2, dword_mask(0b1000_0101))], 0);
    let got = touches(&memory_accesses(&instr, &cpu(&r, &s, Some(&v))));
    let want = vec![
        (r.rax, 4, Access::Read, true),
        (r.rax + 2 * 0x1000, 4, Access::Read, true),
        (r.rax - 4, 4, Access::Read, true),
    ];
    assert_eq!(got, want, "got {got:x?}, want {want:x?}");
}

#[test]
fn xsave_areas_by_layout_and_feature_mask() {
    let l = intel_layout();
    let sse_avx = 0b111;
    let avx512 = 0b1110_0111;
    let cases: &[(&str, XsaveForm, u64, (u64, u64))] = &[
        ("x87+SSE only", XsaveForm::Standard, 0b11, (576, 576)),
        ("AVX, standard", XsaveForm::Standard, sse_avx, (832, 832)),
        ("AVX, compacted", XsaveForm::Compacted, sse_avx, (832, 832)),
        (
            "AVX-512, standard",
            XsaveForm::Standard,
            avx512,
            (2688, 2688),
        ),
        (
            "AVX-512, compacted",
            XsaveForm::Compacted,
            avx512,
            (2432, 2432),
        ),
        (
            "AVX-512 + PKRU, compacted",
            XsaveForm::Compacted,
            avx512 | 1 << 9,
            (2440, 2440),
        ),
        (
            "xrstor AVX-512: compacted required, standard possible",
            XsaveForm::Either,
            avx512,
            (2432, 2688),
        ),
        (
            "a mask of nothing still has the legacy area and header",
            XsaveForm::Standard,
            0,
            (576, 576),
        ),
    ];
    for (what, form, rfbm, want) in cases {
        assert_eq!(xsave_area(*form, *rfbm, &l), *want, "{what}");
    }
    // 64-byte alignment of a component in the compacted form.
    let mut aligned = intel_layout();
    aligned.components[9] = (8, 2688, true);
    assert_eq!(
        xsave_area(XsaveForm::Compacted, 0b11 | 1 << 2 | 1 << 9, &aligned),
        (832 + 8, 832 + 8),
        "832 is already 64-byte aligned"
    );
    aligned.components[2] = (200, 576, false);
    assert_eq!(
        xsave_area(XsaveForm::Compacted, 0b11 | 1 << 2 | 1 << 9, &aligned),
        (832 + 8, 832 + 8),
        "576 + 200 = 776 rounds up to 832"
    );
}

#[test]
fn xsave_instructions_are_sized_from_xcr0_and_edx_eax() {
    if XSAVE_LAYOUT.components[2].0 == 0 {
        eprintln!("skipping: this CPU has no AVX state component");
        return;
    }
    let avx_end = XSAVE_LAYOUT.offset(2) + u64::from(XSAVE_LAYOUT.components[2].0);
    // xsave [rdi]; xrstor [rdi]
    for (bytes, access) in [
        (&[0x0f, 0xae, 0x27][..], Access::Write),
        (&[0x0f, 0xae, 0x2f][..], Access::Read),
    ] {
        let instr = decode(bytes);
        assert!(is_xsave_family(&instr));
        let r = kvm_regs {
            rax: u64::MAX,
            rdx: u64::MAX,
            ..regs()
        };
        let s = kvm_sregs::default();
        let mut c = cpu(&r, &s, None);
        c.xcr0 = 0b111;
        let got = touches(&memory_accesses(&instr, &c));
        assert_eq!(
            got,
            vec![(r.rdi, avx_end as u32, access, true)],
            "{:?}",
            instr.mnemonic()
        );
        // EDX:EAX masks AVX out.
        let r = kvm_regs {
            rax: 0b11,
            rdx: 0,
            ..regs()
        };
        let mut c = cpu(&r, &s, None);
        c.xcr0 = 0b111;
        let got = touches(&memory_accesses(&instr, &c));
        assert_eq!(
            got,
            vec![(r.rdi, 576, access, true)],
            "{:?}",
            instr.mnemonic()
        );
        // The vCPU's XCR0 lacks AVX but the CPU runs guest code with the
        // host's (PVM): the AVX part is populated, not required.
        let r = kvm_regs {
            rax: 0b111,
            rdx: 0,
            ..regs()
        };
        let mut c = cpu(&r, &s, None);
        c.xcr0 = 0b11;
        c.xcr0_extra = 0b111;
        let got = touches(&memory_accesses(&instr, &c));
        assert_eq!(
            got,
            vec![
                (r.rdi, 576, access, true),
                (r.rdi + 576, avx_end as u32 - 576, access, false)
            ],
            "{:?}",
            instr.mnemonic()
        );
    }
}

#[test]
fn vector_registers_come_from_the_standard_xsave_layout() {
    let l = intel_layout();
    let mut bytes = vec![0u8; 4096];
    // XSTATE_BV: SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM.
    bytes[512..520].copy_from_slice(&(0b1110_0110u64).to_le_bytes());
    bytes[160 + 16 * 3] = 0x11; // xmm3 byte 0
    bytes[576 + 16 * 3] = 0x22; // ymm3 byte 16
    bytes[1152 + 32 * 3] = 0x33; // zmm3 byte 32
    bytes[1664 + 64 * 4] = 0x44; // zmm20 byte 0
    bytes[1088 + 8 * 2..][..8].copy_from_slice(&0xabcdu64.to_le_bytes()); // k2
    let v = VectorRegs::from_bytes(&bytes, &l);
    let zmm3 = v.vector(Register::ZMM3).unwrap();
    assert_eq!((zmm3[0], zmm3[16], zmm3[32]), (0x11, 0x22, 0x33));
    assert_eq!(v.vector(Register::XMM3).unwrap().len(), 16);
    assert_eq!(v.vector(Register::YMM3).unwrap()[16], 0x22);
    assert_eq!(v.vector(Register::ZMM20).unwrap()[0], 0x44);
    assert_eq!(v.opmask(Register::K2), Some(0xabcd));
    // A component missing from XSTATE_BV is in its initial state (zeros).
    bytes[512..520].copy_from_slice(&(0b10u64).to_le_bytes());
    let v = VectorRegs::from_bytes(&bytes, &l);
    assert_eq!(
        v.vector(Register::YMM3).unwrap()[16],
        0,
        "AVX absent: upper halves zero"
    );
    assert_eq!(v.opmask(Register::K2), Some(0));
}
