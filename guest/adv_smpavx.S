/*
 * adv_smpavx: 2-4 vCPUs race AVX stores and locked adds into the same
 * fresh windows. Round k (0..11) uses window W(k) = ram_base + 4 MiB +
 * k * 4 MiB; all vCPUs start it together (a barrier in the first RAM
 * page), then each stores its value with `vmovdqu ymm` into its own 32-byte
 * slot of 64 shared pages (page j at W(k) + j * 4096, slot at index * 32)
 * and does `lock xadd` 1 into the page's counter at +0x800. So every fresh
 * page is first reached by several vCPUs at once: losers of the population
 * race find it installed ("nothing new"), which must not count against
 * them. After the last round vCPU 0 checks every slot and counter.
 * value(i, k, j) = 0xa5 << 56 | i << 40 | k << 20 | j, in all four qwords.
 * Exit codes: 1 RAM < 56 MiB or bad index/count (> 8), 2 a barrier timed
 * out (~30 s), 3 a slot wrong, 4 a counter wrong, 100 no AVX.
 */
#include "adv.h"

#define ROUNDS 12
#define PAGES 64
#define BAR 0				/* barrier counters at ram_base + 8 * k */

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi
	mov r14, rdx			/* index */
	mov r15, rcx			/* count */
	cmp r13, 56 * MiB
	jb fail1
	test r15, r15
	jz fail1
	cmp r15, 8
	ja fail1
	cmp r14, r15
	jae fail1
	NEED_AVX 100

	xor ebx, ebx			/* k */
1:	lock inc qword ptr [r12 + BAR + rbx * 8]
	WAIT_GE r12+BAR+rbx*8, r15, 2
	imul rbp, rbx, 4 * MiB
	lea rbp, [r12 + rbp + 4 * MiB]	/* W(k) */
	xor ecx, ecx			/* j */
2:	mov rax, r14			/* value(i, k, j) */
	shl rax, 40
	mov rdx, rbx
	shl rdx, 20
	or rax, rdx
	or rax, rcx
	movabs rdx, 0xa500000000000000
	or rax, rdx
	push rax
	vbroadcastsd ymm0, [rsp]
	pop rax
	mov rdx, rcx
	shl rdx, 12
	add rdx, rbp			/* page j */
	mov rsi, r14
	shl rsi, 5
	vmovdqu [rdx + rsi], ymm0
	mov eax, 1
	lock xadd [rdx + 0x800], rax
	inc ecx
	cmp ecx, PAGES
	jb 2b
	inc ebx
	cmp ebx, ROUNDS
	jb 1b

	lock inc qword ptr [r12 + BAR + ROUNDS * 8]	/* final barrier */
	test r14, r14
	jz 3f
	vzeroupper
	EXIT(0)
3:	WAIT_GE r12+BAR+ROUNDS*8, r15, 2

	xor ebx, ebx			/* vCPU 0 checks */
4:	imul rbp, rbx, 4 * MiB
	lea rbp, [r12 + rbp + 4 * MiB]
	xor ecx, ecx
5:	mov rdx, rcx
	shl rdx, 12
	add rdx, rbp
	cmp [rdx + 0x800], r15
	jne fail4
	xor esi, esi			/* i */
6:	mov rax, rsi
	shl rax, 40
	mov rdi, rbx
	shl rdi, 20
	or rax, rdi
	or rax, rcx
	movabs rdi, 0xa500000000000000
	or rax, rdi
	mov rdi, rsi
	shl rdi, 5
	add rdi, rdx
	cmp [rdi], rax
	jne fail3
	cmp [rdi + 8], rax
	jne fail3
	cmp [rdi + 16], rax
	jne fail3
	cmp [rdi + 24], rax
	jne fail3
	inc rsi
	cmp rsi, r15
	jb 6b
	inc ecx
	cmp ecx, PAGES
	jb 5b
	inc ebx
	cmp ebx, ROUNDS
	jb 4b
	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(100)
