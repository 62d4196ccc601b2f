/*
 * adv_straddle: accesses that straddle two never-touched pages in two
 * fault-around windows, so one instruction needs both at once. Boundary n
 * is B(n) = ram_base + 2 MiB + n * 4 MiB (a 2 MiB window boundary; no two
 * cases share a window), or, for the 4 KiB cases, a page boundary 64 KiB
 * into the window above B(n) (in the same window with default fault-around,
 * two windows with W4). Each case loads its register with ones (loads) or
 * a pattern (stores) and checks the result with scalar loads:
 *   n=0  vmovdqu ymm store at B-16       n=1  vmovdqu ymm load at B-8 (0)
 *   n=2  movdqu xmm store at B-8         n=3  mov qword store at B-4
 *   n=4  mov qword load at B-3 (0)       n=5  mov dword store at B-2
 *   n=6  add qword [B-4], imm (RMW)      n=7  vmovups ymm store at P-16
 *   n=8  vmovdqu ymm load at P-24 (0)    n=9  mov word store at P-1
 *   n=10 movdqu xmm load at B-1 (0)      n=11 vmovdqu ymm store at B-1
 *   n=12 xchg qword [B-4], reg           n=13 vmovdqu ymm store at B-32+1
 *        (aligned-free: lands in both pages, one byte in the upper one)
 * (P = B + 64 KiB + 4 KiB.) Exit codes: 1 RAM < 64 MiB, 2 + n case n
 * wrong, 100 no AVX.
 */
#include "adv.h"

#define B(n) (2 * MiB + (n) * 4 * MiB)
#define P(n) (B(n) + 68 * 1024)

/* \nq u64s at [\a] equal those at [\b] (rax, rcx scratch), else fail\code. */
.macro verify a, b, nq, code
	xor ecx, ecx
1:	mov rax, [\a + rcx * 8]
	cmp rax, [\b + rcx * 8]
	jne fail\code
	inc ecx
	cmp ecx, \nq
	jb 1b
.endm

/* The \nq u64s at [\a] (unaligned) are zero, else fail\code. */
.macro zero a, nq, code
	xor ecx, ecx
1:	cmp qword ptr [\a + rcx * 8], 0
	jne fail\code
	inc ecx
	cmp ecx, \nq
	jb 1b
.endm

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 64 * MiB
	jb fail1
	NEED_AVX 100
	lea rsi, [rip + pattern]
	vmovdqu ymm0, [rsi]
	movabs rbx, 0x1122334455667788

	lea rdi, [r12 + B(0) - 16]	/* 0 */
	vmovdqu [rdi], ymm0
	verify rdi, rsi, 4, 2

	vpcmpeqb ymm1, ymm1, ymm1	/* 1 */
	vmovdqu ymm1, [r12 + B(1) - 8]
	sub rsp, 64
	vmovdqu [rsp], ymm1
	zero rsp, 4, 3
	add rsp, 64

	movdqu xmm2, [rsi + 8]		/* 2 */
	lea rdi, [r12 + B(2) - 8]
	movdqu [rdi], xmm2
	lea rdx, [rsi + 8]
	verify rdi, rdx, 2, 4

	mov [r12 + B(3) - 4], rbx	/* 3 */
	cmp [r12 + B(3) - 4], rbx
	jne fail5

	mov rax, -1			/* 4 */
	mov rax, [r12 + B(4) - 3]
	test rax, rax
	jnz fail6

	mov [r12 + B(5) - 2], ebx	/* 5 */
	cmp [r12 + B(5) - 2], ebx
	jne fail7
	cmp dword ptr [r12 + B(5) + 2], 0
	jne fail7

	add qword ptr [r12 + B(6) - 4], 0x5a5a	/* 6 */
	cmp qword ptr [r12 + B(6) - 4], 0x5a5a
	jne fail8

	lea rdi, [r12 + P(7) - 16]	/* 7 */
	vmovups [rdi], ymm0
	verify rdi, rsi, 4, 9

	vpcmpeqb ymm1, ymm1, ymm1	/* 8 */
	vmovdqu ymm1, [r12 + P(8) - 24]
	sub rsp, 64
	vmovdqu [rsp], ymm1
	zero rsp, 4, 10
	add rsp, 64

	mov [r12 + P(9) - 1], bx	/* 9 */
	cmp [r12 + P(9) - 1], bx
	jne fail11

	pcmpeqb xmm3, xmm3		/* 10 */
	movdqu xmm3, [r12 + B(10) - 1]
	sub rsp, 64
	movdqu [rsp], xmm3
	zero rsp, 2, 12
	add rsp, 64

	lea rdi, [r12 + B(11) - 1]	/* 11 */
	vmovdqu [rdi], ymm0
	verify rdi, rsi, 4, 13

	mov rax, rbx			/* 12 */
	xchg [r12 + B(12) - 4], rax
	test rax, rax
	jnz fail14
	cmp [r12 + B(12) - 4], rbx
	jne fail14

	lea rdi, [r12 + B(13) - 31]	/* 13 */
	vmovdqu [rdi], ymm0
	verify rdi, rsi, 4, 15

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
FAIL(9)
FAIL(10)
FAIL(11)
FAIL(12)
FAIL(13)
FAIL(14)
FAIL(15)
FAIL(100)

	.section .rodata
	.balign 32
pattern:
	.quad 0x0706050403020100, 0x0f0e0d0c0b0a0908
	.quad 0x1716151413121110, 0x1f1e1d1c1b1a1918
	.quad 0x2726252423222120
