/*
 * adv_xsavewide: XSAVE/XRSTOR areas that straddle a 2 MiB window boundary
 * with EDX:EAX = 7 (x87, SSE, AVX): the legacy region and XSAVE header
 * (bytes 0-575) lie below the boundary, the AVX state (576-831) above it,
 * in a fresh window. Only an operand sized from the XCR0 the CPU really
 * runs the guest with covers both pages: under PVM that is the host's XCR0
 * (AVX on), whatever XCR0 the VMM set (see guest/adv_xsave.S for the
 * cases within one page). S = ram_base + 6 MiB - 576 (64-byte aligned).
 *   2 xsave [S]: XMM0 at 160 and the YMM0 upper half at 576 exact
 *   3 xrstor [S] after zeroing ymm0 and taking S's slots away: ymm0 back
 * Exit codes: 1 RAM < 8 MiB, 2..3 the case above, 100 no XSAVE or no AVX.
 */
#include "adv.h"

#define S (6 * MiB - 576)

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 8 * MiB
	jb fail1
	mov eax, 1
	cpuid
	test ecx, 1 << 26		/* XSAVE */
	jz fail100
	NEED_AVX 100
	lea rsi, [rip + pat0]
	vmovdqu ymm0, [rsi]

	lea r14, [r12 + S]		/* 2 */
	mov eax, 7
	xor edx, edx
	xsave [r14]
	mov rax, [rsi]
	cmp [r14 + 160], rax
	jne fail2
	mov rax, [rsi + 16]
	cmp [r14 + 576], rax
	jne fail2
	mov rax, [rsi + 24]
	cmp [r14 + 584], rax
	jne fail2

	lea r13, [r12 + S & ~0xfff]	/* 3 */
	DROP_SLOTS r13, 8192
	vpxor ymm0, ymm0, ymm0
	mov eax, 7
	xor edx, edx
	xrstor [r14]
	sub rsp, 64
	vmovdqu [rsp], ymm0
	xor ecx, ecx
1:	mov rax, [rsi + rcx * 8]
	cmp [rsp + rcx * 8], rax
	jne fail3
	inc ecx
	cmp ecx, 4
	jb 1b
	add rsp, 64
	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(100)

	.section .rodata
	.balign 32
pat0:	.quad 0x0706050403020100, 0x0f0e0d0c0b0a0908
	.quad 0x1716151413121110, 0x1f1e1d1c1b1a1918
