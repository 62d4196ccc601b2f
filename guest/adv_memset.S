/*
 * adv_memset: what glibc's AVX memset does, over fresh RAM. Fills
 * [ram_base + 0x1230, ram_end - 4 MiB) (64 MiB with the minimum RAM) with
 * unaligned `vmovdqu ymm` stores, four per iteration, plus an overlapping
 * tail store, then verifies every u64 with scalar loads and that the bytes
 * just outside the range stayed zero. Then fills the last 4 MiB backwards
 * (from high to low addresses, aligned stores) with a second pattern and
 * verifies it. Each fresh window is first reached by an AVX store: on PVM
 * hosts every one is an emulation failure at the same RIP, which must not
 * count against the vCPU (the first fix of issue 9).
 * Exit codes: 1 RAM < 72 MiB, 2 forward fill wrong, 3 byte before the
 * range written, 4 byte after the range written, 5 backward fill wrong,
 * 100 no AVX.
 */
#include "adv.h"

#define START 0x1230
#define TAIL (4 * MiB)

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi			/* RAM size */
	cmp r13, 72 * MiB
	jb fail1
	NEED_AVX 100

	vbroadcastsd ymm0, [rip + pat1]
	lea rdi, [r12 + START]		/* start */
	lea r14, [r12 + r13 - TAIL]	/* end */
	lea rcx, [r14 - 128]
1:	vmovdqu [rdi], ymm0
	vmovdqu [rdi + 32], ymm0
	vmovdqu [rdi + 64], ymm0
	vmovdqu [rdi + 96], ymm0
	sub rdi, -128
	cmp rdi, rcx
	jbe 1b
2:	lea rax, [rdi + 32]		/* rest, 32 at a time, then the overlapping tail */
	cmp rax, r14
	ja 3f
	vmovdqu [rdi], ymm0
	add rdi, 32
	jmp 2b
3:	vmovdqu [r14 - 32], ymm0

	mov rax, [rip + pat1]
	lea rdi, [r12 + START]
4:	cmp [rdi], rax
	jne fail2
	add rdi, 8
	cmp rdi, r14
	jb 4b
	cmp byte ptr [r12 + START - 1], 0
	jne fail3
	cmp byte ptr [r14], 0
	jne fail4
	MARK(1)

	vbroadcastsd ymm1, [rip + pat2]
	lea rdi, [r12 + r13 - 64]	/* backwards, 64 bytes per iteration */
5:	vmovdqa [rdi + 32], ymm1
	vmovdqa [rdi], ymm1
	sub rdi, 64
	cmp rdi, r14
	jae 5b
	mov rax, [rip + pat2]
	mov rdi, r14
6:	cmp [rdi], rax
	jne fail5
	add rdi, 8
	lea rcx, [r12 + r13]
	cmp rdi, rcx
	jb 6b
	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(100)

	.section .rodata
	.balign 8
pat1:	.quad 0x5a5a5a5a5a5a5a5a
pat2:	.quad 0x0123456789abcdef
