/*
 * adv_xsave: the XSAVE family to and from lazy memory, with the requested-
 * feature bitmap EDX:EAX = 7 (x87, SSE, AVX: an 832-byte standard area).
 * Every area is 64-byte aligned and fresh unless said otherwise: areas
 * A(n) = ram_base + n * 4 MiB + 2 MiB - 4032 lie in one page.
 *   2 xsave [A1]: XMM0/XMM15 at 160/400, YMM0/YMM15 upper halves at 576/816,
 *     XSTATE_BV bits 1 and 2 set
 *   3 xrstor [A2] (never touched: all zero, XSTATE_BV 0): ymm0/ymm15 zero
 *   4 xrstor [A1] after taking A1's slots away: ymm0/ymm15 back
 *   5 xsavec [A3] (if CPUID.(0xD,1):EAX[1]): XCOMP_BV = 1 << 63 | 7, YMM0
 *     upper at 576 (compacted: AVX is the first extended component)
 *   6 xrstor [A3] (compacted, slots taken away) after zeroing: ymm0 back
 *   7 xsaveopt [A4] (if CPUID.(0xD,1):EAX[0]): XMM0 and YMM0 upper exact
 * (Areas straddling a window boundary: guest/adv_xsavewide.S.)
 * Exit codes: 1 RAM < 24 MiB, 2..7 the case above, 100 no XSAVE or no AVX.
 */
#include "adv.h"

#define A(n) ((n) * 4 * MiB + 2 * MiB - 4096 + 64)

/* ymm\r equals the 32 bytes at [\p] (via the stack), else fail\code. */
.macro check_ymm r, p, code
	sub rsp, 64
	vmovdqu [rsp], ymm\r
	xor ecx, ecx
1:	mov rax, [\p + rcx * 8]
	cmp [rsp + rcx * 8], rax
	jne fail\code
	inc ecx
	cmp ecx, 4
	jb 1b
	add rsp, 64
.endm

/* The 16 bytes at [\a] equal those at [\p], else fail\code. */
.macro check16 a, p, code
	mov rax, [\p]
	cmp [\a], rax
	jne fail\code
	mov rax, [\p + 8]
	cmp [\a + 8], rax
	jne fail\code
.endm

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 24 * MiB
	jb fail1
	mov eax, 1
	cpuid
	test ecx, 1 << 26		/* XSAVE */
	jz fail100
	NEED_AVX 100
	mov eax, 0xd
	mov ecx, 1
	cpuid
	mov r15d, eax			/* XSAVEOPT, XSAVEC, ... */

	lea rsi, [rip + pat0]
	lea rbp, [rip + pat15]
	lea rbx, [rip + zeros]
	vmovdqu ymm0, [rsi]
	vmovdqu ymm15, [rbp]

	lea rdi, [r12 + A(1)]		/* 2 */
	mov eax, 7
	xor edx, edx
	xsave [rdi]
	check16 rdi + 160, rsi, 2
	check16 rdi + 400, rbp, 2
	check16 rdi + 576, rsi + 16, 2
	check16 rdi + 816, rbp + 16, 2
	mov rax, [rdi + 512]
	and eax, 6
	cmp eax, 6
	jne fail2

	lea rdi, [r12 + A(2)]		/* 3 */
	mov eax, 7
	xor edx, edx
	xrstor [rdi]
	ldmxcsr [rip + mxcsr]
	check_ymm 0, rbx, 3
	check_ymm 15, rbx, 3

	lea r14, [r12 + A(1)]		/* 4 */
	lea r13, [r12 + A(1) & ~0xfff]
	DROP_SLOTS r13, 8192
	mov eax, 7
	xor edx, edx
	xrstor [r14]
	check_ymm 0, rsi, 4
	check_ymm 15, rbp, 4

	test r15d, 2			/* 5, 6 */
	jz 5f
	lea r14, [r12 + A(3)]
	mov eax, 7
	xor edx, edx
	xsavec [r14]
	movabs rax, 0x8000000000000007
	cmp [r14 + 520], rax
	jne fail5
	check16 r14 + 576, rsi + 16, 5
	check16 r14 + 160, rsi, 5
	lea r13, [r12 + A(3) & ~0xfff]
	DROP_SLOTS r13, 8192
	vpxor ymm0, ymm0, ymm0
	mov eax, 7
	xor edx, edx
	xrstor [r14]
	check_ymm 0, rsi, 6

5:	test r15d, 1			/* 7 */
	jz 7f
	lea rdi, [r12 + A(4)]
	mov eax, 7
	xor edx, edx
	xsaveopt [rdi]
	check16 rdi + 160, rsi, 7
	check16 rdi + 576, rsi + 16, 7
7:	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
FAIL(100)

	.section .rodata
	.balign 32
pat0:	.quad 0x0706050403020100, 0x0f0e0d0c0b0a0908
	.quad 0x1716151413121110, 0x1f1e1d1c1b1a1918
pat15:	.quad 0xf0f1f2f3f4f5f6f7, 0xe0e1e2e3e4e5e6e7
	.quad 0xd0d1d2d3d4d5d6d7, 0xc0c1c2c3c4c5c6c7
zeros:	.quad 0, 0, 0, 0
mxcsr:	.long 0x1f80
