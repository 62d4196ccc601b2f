//! Operand addresses of each addressing form, without KVM (the retry
//! rules are tested in `kvm::retry`, masks, VSIB and XSAVE sizes in
//! `kvm::operands`).

use super::*;

const RIP: u64 = 0x20_0000;

fn regs() -> kvm_regs {
    kvm_regs {
        rax: 0x4000_1000,
        rbx: 0xffff_ffff_4000_2000,
        rcx: 3,
        rsp: 0x10_fff8,
        rdi: 0x4200_0ff0,
        r10: 0x3000_0000,
        rip: RIP,
        ..Default::default()
    }
}

fn sregs() -> kvm_sregs {
    let mut s = kvm_sregs::default();
    s.fs.base = 0x7000_0000;
    s.ds.base = 0x1000; // ignored in 64-bit mode
    s
}

fn operands(bytes: &[u8]) -> Vec<MemOperand> {
    let instr = Decoder::with_ip(64, bytes, RIP, DecoderOptions::NONE).decode();
    assert!(!instr.is_invalid(), "{bytes:02x?} does not decode");
    memory_operands(&instr, &regs(), &sregs(), true)
}

fn op(gva: u64, size: u32, access: Access) -> MemOperand {
    MemOperand { gva, size, access }
}

#[test]
fn memory_operands_of_each_addressing_form() {
    let r = regs();
    let cases: &[(&str, &[u8], Vec<MemOperand>)] = &[
        (
            "vmovdqu [rdi], ymm0",
            &[0xc5, 0xfe, 0x7f, 0x07],
            vec![op(r.rdi, 32, Access::Write)],
        ),
        (
            "vmovdqu ymm1, [rdi]",
            &[0xc5, 0xfe, 0x6f, 0x0f],
            vec![op(r.rdi, 32, Access::Read)],
        ),
        (
            "vmovdqu [r10], ymm0",
            &[0xc4, 0xc1, 0x7e, 0x7f, 0x02],
            vec![op(r.r10, 32, Access::Write)],
        ),
        (
            "movdqu [rip+0x100], xmm0",
            &[0xf3, 0x0f, 0x7f, 0x05, 0x00, 0x01, 0x00, 0x00],
            vec![op(RIP + 8 + 0x100, 16, Access::Write)],
        ),
        (
            "mov rax, fs:[rbx+rcx*8+0x10]",
            &[0x64, 0x48, 0x8b, 0x44, 0xcb, 0x10],
            vec![op(
                0x7000_0000u64
                    .wrapping_add(r.rbx)
                    .wrapping_add(3 * 8 + 0x10),
                8,
                Access::Read,
            )],
        ),
        (
            "mov rax, [rbx] (DS base ignored)",
            &[0x48, 0x8b, 0x03],
            vec![op(r.rbx, 8, Access::Read)],
        ),
        (
            "mov eax, [ebx] (32-bit address)",
            &[0x67, 0x8b, 0x03],
            vec![op(0x4000_2000, 4, Access::Read)],
        ),
        ("push rax", &[0x50], vec![op(r.rsp - 8, 8, Access::Write)]),
        (
            "add [rax], rbx (read-modify-write)",
            &[0x48, 0x01, 0x18],
            vec![op(r.rax, 8, Access::Write)],
        ),
        ("lea rax, [rbx+8]", &[0x48, 0x8d, 0x43, 0x08], vec![]),
    ];
    for (what, bytes, want) in cases {
        let got = operands(bytes);
        assert_eq!(&got, want, "{what}: got {got:x?}, want {want:x?}");
    }
}
