/*
 * adv_decommit: vCPUs stream AVX stores over fresh RAM while the host
 * decommits all of RAM every few milliseconds (RunOptions::decommit_every):
 * every store may find its page gone, its slot deleted, or re-populated by
 * the other vCPU a moment ago. A healthy vCPU must never be stopped. RAM
 * contents do not survive a decommit, so nothing is verified: the guest
 * passes by finishing. vCPU i owns 8 MiB at ram_base + 4 MiB + i * 8 MiB
 * and stores one ymm into every page of it, PASSES times.
 * Exit codes: 1 RAM too small for the vCPU count, 100 no AVX.
 */
#include "adv.h"

#define SLICE (8 * MiB)
#define PASSES 8

ENTRY
	mov r12, rdi			/* RAM base */
	mov r14, rdx			/* index */
	imul rax, rcx, SLICE
	add rax, 4 * MiB
	cmp rsi, rax
	jb fail1
	NEED_AVX 100
	imul rbx, r14, SLICE
	lea rbx, [r12 + rbx + 4 * MiB]	/* slice start */
	vpcmpeqb ymm0, ymm0, ymm0
	mov r15d, PASSES
1:	xor ecx, ecx
2:	vmovdqu [rbx + rcx + 0x40], ymm0
	add rcx, 4096
	cmp rcx, SLICE
	jb 2b
	dec r15d
	jnz 1b
	EXIT(0)

FAIL(1)
FAIL(100)
