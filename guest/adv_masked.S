/*
 * adv_masked: AVX/AVX2 masked stores and loads whose masked-off part lies
 * past the end of RAM (mapped by the page tables, outside every vma) and
 * whose active part is inside the last RAM page; with --eager the CPU
 * completes them natively, so lazily they must complete too. E = RAM end.
 * The last page is fresh for case 2 and populated but slot-less (DROP_SLOTS)
 * for the others:
 *   2 vmaskmovps [E-16], ymm: dwords 0-3 active (inside), 4-7 masked (past E)
 *   3 vpmaskmovd [E-8], ymm: dwords 0-1 active
 *   4 vmaskmovps ymm, [E-16] load: dwords 0-3 active, 4-7 give zero
 *   5 vpmaskmovq [E-24], ymm: qwords 0-2 active
 *   6 vmaskmovpd [E-8], xmm: qword 0 active
 *   7 vmaskmovps [E+4096], ymm with an all-zero mask: no access at all
 * Then, in the middle of RAM, masked stores to fresh pages straddling a
 * 2 MiB window boundary B, where the masked-off elements must stay zero:
 *   8 vpmaskmovd [B-16], ymm: dwords 0-3 active (below B), 4-7 masked
 *   9 vpmaskmovd [B'-16], ymm: dwords 4-7 active (above B'), 0-3 masked
 *  10 vpmaskmovd [B''-16], ymm: dwords 1,6 active only
 * Exit codes: 1 RAM < 16 MiB, 2..10 the case above (7 has none: an access
 * there would stop the vCPU with a violation), 100 no AVX2.
 */
#include "adv.h"

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi			/* RAM size */
	cmp r13, 16 * MiB
	jb fail1
	NEED_AVX2 100
	lea r14, [r12 + r13]		/* E */
	lea r15, [r14 - 4096]		/* last page */
	lea rsi, [rip + pattern]
	vmovdqu ymm0, [rsi]

	vmovdqu ymm1, [rip + m_lo4]	/* 2 */
	vmaskmovps [r14 - 16], ymm1, ymm0
	mov rax, [rsi]
	cmp [r14 - 16], rax
	jne fail2
	mov rax, [rsi + 8]
	cmp [r14 - 8], rax
	jne fail2
	DROP_SLOTS r15, 4096

	mov qword ptr [r14 - 8], 0	/* 3 */
	DROP_SLOTS r15, 4096
	vmovdqu ymm1, [rip + m_lo2]
	vpmaskmovd [r14 - 8], ymm1, ymm0
	mov rax, [rsi]
	cmp [r14 - 8], rax
	jne fail3
	DROP_SLOTS r15, 4096

	vpcmpeqb ymm2, ymm2, ymm2	/* 4: [E-16, E) holds pattern[0..16) from 2/3 */
	vmovdqu ymm1, [rip + m_lo4]
	vmaskmovps ymm2, ymm1, [r14 - 16]
	sub rsp, 64
	vmovdqu [rsp], ymm2
	mov rax, [rsi]
	cmp [rsp], rax
	jne fail4
	cmp [rsp + 8], rax		/* case 3 wrote pattern[0..8) at E-8 */
	jne fail4
	cmp qword ptr [rsp + 16], 0
	jne fail4
	cmp qword ptr [rsp + 24], 0
	jne fail4
	add rsp, 64
	DROP_SLOTS r15, 4096

	vmovdqu ymm1, [rip + m_q3]	/* 5 */
	vpmaskmovq [r14 - 24], ymm1, ymm0
	xor ecx, ecx
1:	mov rax, [rsi + rcx * 8]
	cmp [r14 - 24 + rcx * 8], rax
	jne fail5
	inc ecx
	cmp ecx, 3
	jb 1b
	DROP_SLOTS r15, 4096

	movdqu xmm1, [rip + m_x1]	/* 6: qword 0 active, 1 not */
	movdqu xmm3, [rsi + 16]
	vmaskmovpd [r14 - 8], xmm1, xmm3
	mov rax, [rsi + 16]
	cmp [r14 - 8], rax
	jne fail6

	vpxor ymm1, ymm1, ymm1		/* 7 */
	vmaskmovps [r14 + 4096], ymm1, ymm0

	lea rbx, [r12 + 4 * MiB]	/* 8 */
	vmovdqu ymm1, [rip + m_lo4]
	vpmaskmovd [rbx - 16], ymm1, ymm0
	mov rax, [rsi]
	cmp [rbx - 16], rax
	jne fail8
	mov rax, [rsi + 8]
	cmp [rbx - 8], rax
	jne fail8
	cmp qword ptr [rbx], 0
	jne fail8
	cmp qword ptr [rbx + 8], 0
	jne fail8

	lea rbx, [r12 + 8 * MiB]	/* 9 */
	vmovdqu ymm1, [rip + m_hi4]
	vpmaskmovd [rbx - 16], ymm1, ymm0
	cmp qword ptr [rbx - 16], 0
	jne fail9
	cmp qword ptr [rbx - 8], 0
	jne fail9
	mov rax, [rsi + 16]
	cmp [rbx], rax
	jne fail9
	mov rax, [rsi + 24]
	cmp [rbx + 8], rax
	jne fail9

	lea rbx, [r12 + 12 * MiB]	/* 10 */
	vmovdqu ymm1, [rip + m_16]
	vpmaskmovd [rbx - 16], ymm1, ymm0
	mov eax, [rsi + 4]
	cmp dword ptr [rbx - 12], eax
	jne fail10
	mov eax, [rsi + 24]
	cmp dword ptr [rbx + 8], eax
	jne fail10
	mov rax, [rbx - 16]
	shl rax, 32			/* dword 0 must be zero */
	jnz fail10
	cmp qword ptr [rbx - 8], 0
	jne fail10
	cmp qword ptr [rbx], 0
	jne fail10
	cmp dword ptr [rbx + 12], 0
	jne fail10

	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(8)
FAIL(9)
FAIL(10)
FAIL(100)

	.section .rodata
	.balign 32
pattern:
	.quad 0x0706050403020100, 0x0f0e0d0c0b0a0908
	.quad 0x1716151413121110, 0x1f1e1d1c1b1a1918
m_lo4:	.long -1, -1, -1, -1, 0, 0, 0, 0
m_lo2:	.long -1, -1, 0, 0, 0, 0, 0, 0
m_hi4:	.long 0, 0, 0, 0, -1, -1, -1, -1
m_16:	.long 0, -1, 0, 0, 0, 0, -1, 0
m_q3:	.quad -1, -1, -1, 0
m_x1:	.quad -1, 0
