/*
 * simd: SSE and AVX loads and stores whose targets are fresh lazy RAM. Each
 * step uses its own 8 MiB slot W(n), so a 2 MiB fault-around window of one
 * step never populates another and no two faults look sequential (which
 * would grow the window):
 *   W1 movdqu store (unaligned)      W2 movaps store
 *   W3 movaps load (must read zero)  W4 vmovdqu ymm store
 *   W5 vmovdqu ymm load (zero)
 *   W6 vmovdqu ymm store straddling two never-touched pages in two windows
 *      (at W6 + 2 MiB - 16: the instruction needs both pages at once)
 *   W7 vmovdqu ymm load straddling the same way (zero)
 *   W8 movdqu store straddling the same way (SSE)
 * Stored data is verified with scalar loads. On PVM hosts the SSE steps
 * reach the VMM as MMIO exits and the AVX steps as emulation failures (one
 * each: the VMM populates both pages of a straddling access at once).
 * Exit codes: 1 RAM < 72 MiB, 2..9 the check of the step above in order,
 * 100 AVX unavailable (CPUID.AVX clear, or OSXSAVE set but XCR0 lacks AVX).
 */
#include "abi.h"

#define W(n) (n * 8 * MiB)
/* A 2 MiB window boundary inside slot n, for straddling accesses. */
#define B(n) (W(n) + 2 * MiB)

/* Compare \nq u64s at [\a] with [\b] by scalar loads (rax, rcx are
 * scratch: not \a or \b); jump to fail\code. */
.macro verify a, b, nq, code
	xor ecx, ecx
1:	mov rax, [\a + rcx * 8]
	cmp rax, [\b + rcx * 8]
	jne fail\code
	inc ecx
	cmp ecx, \nq
	jb 1b
.endm

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 72 * MiB
	jb fail1
	lea rsi, [rip + pattern]
	lea rbp, [rip + zeros]

	movdqu xmm0, [rsi]
	lea rdi, [r12 + W(1) + 0x123]
	movdqu [rdi], xmm0
	verify rdi, rsi, 2, 2

	movaps xmm1, [rsi]
	lea rdi, [r12 + W(2) + 0x40]
	movaps [rdi], xmm1
	verify rdi, rsi, 2, 3

	pcmpeqb xmm2, xmm2		/* all ones, so a load that did nothing shows */
	lea rdi, [r12 + W(3) + 0x80]
	movaps xmm2, [rdi]
	sub rsp, 32
	movdqu [rsp], xmm2
	verify rsp, rbp, 2, 4
	add rsp, 32

	/*
	 * AVX: CPUID.1:ECX.AVX must be set. When CPUID.OSXSAVE is set too (the
	 * VMX case: CPUID is intercepted and OSXSAVE mirrors the CR4 the VMM
	 * loaded), XCR0 must also enable SSE and AVX state. Under PVM the guest
	 * sees the host's CPUID (AVX set, OSXSAVE clear) and runs AVX natively
	 * with the host's XCR0, so AVX alone is enough there.
	 */
	mov eax, 1
	cpuid
	test ecx, 0x10000000		/* AVX */
	jz fail100
	test ecx, 0x08000000		/* OSXSAVE */
	jz 2f
	xor ecx, ecx
	xgetbv
	and eax, 6
	cmp eax, 6
	jne fail100
2:

	vmovdqu ymm0, [rsi]
	lea rdi, [r12 + W(4) + 0x40]
	vmovdqu [rdi], ymm0
	verify rdi, rsi, 4, 5

	vpcmpeqb ymm1, ymm1, ymm1
	lea rdi, [r12 + W(5) + 0x100]
	vmovdqu ymm1, [rdi]
	sub rsp, 32
	vmovdqu [rsp], ymm1
	verify rsp, rbp, 4, 6
	add rsp, 32

	lea rdi, [r12 + B(6) - 16]
	vmovdqu [rdi], ymm0
	verify rdi, rsi, 4, 7

	vpcmpeqb ymm2, ymm2, ymm2
	lea rdi, [r12 + B(7) - 16]
	vmovdqu ymm2, [rdi]
	sub rsp, 32
	vmovdqu [rsp], ymm2
	verify rsp, rbp, 4, 8
	add rsp, 32

	movdqu xmm3, [rsi + 16]
	lea rdi, [r12 + B(8) - 8]
	movdqu [rdi], xmm3
	lea rdx, [rsi + 16]
	verify rdi, rdx, 2, 9

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
FAIL(100)

	.section .rodata
	.balign 32
pattern:
	.quad 0x0706050403020100, 0x0f0e0d0c0b0a0908
	.quad 0x1716151413121110, 0x1f1e1d1c1b1a1918
zeros:
	.quad 0, 0, 0, 0
