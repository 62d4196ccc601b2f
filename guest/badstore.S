/*
 * badstore: AVX stores that can never complete; the VMM must report each as
 * a violation carrying the instruction, within a few exits, and stop the
 * vCPU (an emulation failure cannot be skipped). Run with 2 vCPUs:
 *   both:   a good vmovdqu store to a fresh RAM page (resolved, continues)
 *   vCPU 0: vmovdqu store to VA 0x7fff_0000_0000, which the identity map
 *           does not map (PML4 entry 255 not present)
 *   vCPU 1: vmovdqu store to HOLE_GPA (r10): mapped by the page tables, but
 *           outside every vma
 * Exit codes (a run that reaches them failed): 2 vCPU 0 survived its store,
 * 3 vCPU 1 survived its store, 4 the good store did not land, 100 AVX
 * unavailable.
 */
#include "abi.h"

#define BAD_VA 0x7fff00000000

ENTRY
	mov r12, rdi			/* RAM base */
	mov r14, rdx			/* index */
	mov eax, 1
	cpuid
	test ecx, 0x10000000		/* AVX */
	jz fail100

	vpcmpeqb ymm0, ymm0, ymm0	/* all ones */
	mov rdi, r14
	shl rdi, 23			/* 8 MiB apart per vCPU */
	lea rdi, [r12 + rdi + 0x40]
	vmovdqu [rdi], ymm0
	cmp qword ptr [rdi + 24], -1
	jne fail4

	test r14, r14
	jnz 1f
	movabs rdi, BAD_VA
	vmovdqu [rdi], ymm0		/* violation: not in the guest page tables */
	EXIT(2)
1:	vmovdqu [r10], ymm0		/* violation: outside every vma */
	EXIT(3)

FAIL(4)
FAIL(100)
