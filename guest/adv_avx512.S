/*
 * adv_avx512: AVX-512 stores, masked ({k}) stores and loads, scatters and
 * gathers on lazy memory. E = RAM end, W(n) = ram_base + n * 4 MiB + 0x40.
 *   2 vmovdqu64 zmm stores to 16 fresh windows W(0..15): exact
 *   3 vmovdqu64 zmm store straddling the window boundary at W(16) - 0x40
 *     + 2 MiB - 32: exact
 *   4 vmovdqu32 [E-16]{k1}, zmm with k1 = 0xf (4 dwords in the fresh last
 *     page, 12 masked off past the end of RAM): exact
 *   5 vmovdqu64 [E-16]{k1}, zmm with k1 = 3 on the same page after its
 *     slot was taken away: exact
 *   6 vmovdqu32 zmm{k1}{z}, [E-16] with k1 = 0xf (slot-less): the 4 dwords
 *     exact, the rest zero
 *   7 vpscatterdd to 16 fresh pages, one per window at W(n) + 2 MiB + 4n:
 *     every element exact, k cleared
 *   8 vpgatherdd from the same 16 pages after their slots were taken away:
 *     exact, k cleared
 * Exit codes: 1 RAM < 72 MiB, 2..8 the case above, 100 no AVX-512F
 * (CPUID.7:EBX[16]) or XCR0 without opmask/ZMM state.
 */
#include "adv.h"

#define W(n) ((n) * 4 * MiB + 0x40)

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi
	cmp r13, 72 * MiB
	jb fail1
	/*
	 * AVX-512F, and XCR0 enabling opmask, ZMM_Hi256 and Hi16_ZMM. XGETBV
	 * needs CR4.OSXSAVE: when CPUID shows XSAVE but not OSXSAVE this is a
	 * PVM guest running with the host's CR4 and XCR0 (a VMX guest gets
	 * OSXSAVE whenever XSAVE is offered), where XGETBV runs natively.
	 */
	mov eax, 1
	cpuid
	test ecx, 1 << 26		/* XSAVE */
	jz fail100
	NEED_AVX 100
	mov eax, 7
	xor ecx, ecx
	cpuid
	test ebx, 1 << 16
	jz fail100
	xor ecx, ecx
	xgetbv
	and eax, 0xe6
	cmp eax, 0xe6
	jne fail100

	lea rsi, [rip + pattern]
	vmovdqu64 zmm0, [rsi]

	xor ebx, ebx			/* 2 */
1:	imul rdi, rbx, 4 * MiB
	lea rdi, [r12 + rdi + 0x40]
	vmovdqu64 [rdi], zmm0
	xor ecx, ecx
2:	mov rax, [rsi + rcx * 8]
	cmp [rdi + rcx * 8], rax
	jne fail2
	inc ecx
	cmp ecx, 8
	jb 2b
	inc ebx
	cmp ebx, 16
	jb 1b

	lea rdi, [r12 + W(16) - 0x40 + 2 * MiB - 32]	/* 3 */
	vmovdqu64 [rdi], zmm0
	xor ecx, ecx
3:	mov rax, [rsi + rcx * 8]
	cmp [rdi + rcx * 8], rax
	jne fail3
	inc ecx
	cmp ecx, 8
	jb 3b

	lea r14, [r12 + r13]		/* 4: E */
	mov eax, 0xf
	kmovw k1, eax
	vmovdqu32 [r14 - 16]{k1}, zmm0
	mov rax, [rsi]
	cmp [r14 - 16], rax
	jne fail4
	mov rax, [rsi + 8]
	cmp [r14 - 8], rax
	jne fail4

	lea r15, [r14 - 4096]		/* 5 */
	DROP_SLOTS r15, 4096
	vmovdqu64 zmm1, [rsi + 64]
	mov eax, 3
	kmovw k1, eax
	vmovdqu64 [r14 - 16]{k1}, zmm1
	mov rax, [rsi + 64]
	cmp [r14 - 16], rax
	jne fail5
	mov rax, [rsi + 72]
	cmp [r14 - 8], rax
	jne fail5

	DROP_SLOTS r15, 4096		/* 6 */
	vpternlogd zmm2, zmm2, zmm2, 0xff
	mov eax, 0xf
	kmovw k1, eax
	vmovdqu32 zmm2{k1}{z}, [r14 - 16]
	sub rsp, 128
	vmovdqu64 [rsp], zmm2
	mov rax, [rsi + 64]
	cmp [rsp], rax
	jne fail6
	mov rax, [rsi + 72]
	cmp [rsp + 8], rax
	jne fail6
	mov ecx, 2
4:	cmp qword ptr [rsp + rcx * 8], 0
	jne fail6
	inc ecx
	cmp ecx, 8
	jb 4b
	add rsp, 128

	vmovdqu32 zmm5, [rip + sidx]	/* 7 */
	vmovdqu32 zmm3, [rip + svals]
	kxnorw k2, k2, k2
	vpscatterdd [r12 + zmm5 * 1]{k2}, zmm3
	kortestw k2, k2
	jnz fail7
	lea rdi, [rip + sidx]
	lea rdx, [rip + svals]
	xor ecx, ecx
5:	movsxd rax, dword ptr [rdi + rcx * 4]
	mov eax, [r12 + rax]
	cmp eax, [rdx + rcx * 4]
	jne fail7
	inc ecx
	cmp ecx, 16
	jb 5b

	DROP_SLOTS r12, r13		/* 8 */
	kxnorw k2, k2, k2
	vpxord zmm4, zmm4, zmm4
	vpgatherdd zmm4{k2}, [r12 + zmm5 * 1]
	kortestw k2, k2
	jnz fail8
	vpcmpeqd k3, zmm4, zmm3
	kortestw k3, k3
	jnc fail8			/* CF: all ones */
	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
FAIL(8)
FAIL(100)

	.section .rodata
	.balign 64
pattern:
	.quad 0x0706050403020100, 0x0f0e0d0c0b0a0908
	.quad 0x1716151413121110, 0x1f1e1d1c1b1a1918
	.quad 0x2726252423222120, 0x2f2e2d2c2b2a2928
	.quad 0x3736353433323130, 0x3f3e3d3c3b3a3938
	.quad 0x4746454443424140, 0x4f4e4d4c4b4a4948
	.quad 0x5756555453525150, 0x5f5e5d5c5b5a5958
	.quad 0x6766656463626160, 0x6f6e6d6c6b6a6968
	.quad 0x7776757473727170, 0x7f7e7d7c7b7a7978
sidx:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	.long \n * 4 * MiB + 2 * MiB + 4 * \n
	.endr
svals:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	.long 0xc0de0000 + \n
	.endr
