/*
 * lifecycle: builds state, reaches the snapshot point, then checks that the
 * state survived (a restored copy or a clone runs this part) and works on.
 * The working set is the first half of RAM; the second half is never
 * written (holes in a snapshot).
 *   MARK 1   start; writes page i's first u64 = i ^ K1 over the working set,
 *            the counter (page 0, second u64) = 1, r13/r15 and xmm1
 *   MARK 10  the snapshot / clone point (LIFECYCLE_MARK in src/vmm/lifecycle.rs)
 *   MARK 11  registers and counter checked, counter = 2
 *   MARK 12  read pass over the working set (every byte) done; a quarter written (every
 *            fourth 2 MiB chunk: page i's third u64 = i ^ K2); one page per
 *            2 MiB of the other half read as zero; the writes verified
 * Exit codes: 1 RAM too small, 2 r13/r15 wrong, 3 xmm1 wrong, 4 counter
 * wrong, 5 working-set pattern wrong, 6 unwritten half not zero, 7 a write
 * of the quarter lost, 8 counter wrong at the end.
 */
#include "abi.h"

#define K1 0x5a5a0000a5a5ffff
#define K2 0x0123456789abcdef
#define R13V 0x13a5c0de5eed1e55
#define XV 0x600dcafef00dbabe

ENTRY
	mov r12, rdi			/* RAM base */
	mov rbx, rsi
	shr rbx, 13			/* working-set pages: half of RAM */
	cmp rbx, 512
	jb fail1
	movabs r8, K1
	MARK(1)

	xor ecx, ecx
1:	mov rax, rcx
	xor rax, r8
	mov rdx, rcx
	shl rdx, 12
	mov [r12 + rdx], rax
	inc rcx
	cmp rcx, rbx
	jb 1b
	mov qword ptr [r12 + 8], 1
	movabs r13, R13V
	mov r15, r13
	not r15
	movabs rax, XV
	movq xmm1, rax
	punpcklqdq xmm1, xmm1
	MARK(10)

	movabs rax, R13V
	cmp r13, rax
	jne fail2
	not rax
	cmp r15, rax
	jne fail2
	movabs rdx, XV
	movq rax, xmm1
	cmp rax, rdx
	jne fail3
	pshufd xmm2, xmm1, 0xee
	movq rax, xmm2
	cmp rax, rdx
	jne fail3
	cmp qword ptr [r12 + 8], 1
	jne fail4
	inc qword ptr [r12 + 8]
	MARK(11)

	movabs rbp, K2
	xor ecx, ecx
2:	mov rdx, rcx
	shl rdx, 12
	xor eax, eax			/* xor of every u64 of the page */
	xor edi, edi
	lea rsi, [r12 + rdx]
8:	xor rax, [rsi + rdi * 8]
	xor rax, [rsi + rdi * 8 + 8]
	add edi, 2
	cmp edi, 512
	jb 8b
	xor rax, rcx			/* want i ^ K1 (page 0: ^ the counter, 2) */
	xor rax, r8
	test rcx, rcx
	jnz 9f
	xor rax, 2
9:	test rax, rax
	jnz fail5
	test rcx, 0x600			/* chunk index (i >> 9) % 4 == 0 */
	jnz 3f
	mov rax, rcx
	xor rax, rbp
	mov [r12 + rdx + 16], rax
3:	inc rcx
	cmp rcx, rbx
	jb 2b

	mov rcx, rbx			/* the other half: one page per 2 MiB */
	lea rsi, [rbx + rbx]
4:	cmp rcx, rsi
	jae 5f
	mov rdx, rcx
	shl rdx, 12
	cmp qword ptr [r12 + rdx], 0
	jne fail6
	add rcx, 512
	jmp 4b

5:	xor ecx, ecx
6:	test rcx, 0x600
	jnz 7f
	mov rdx, rcx
	shl rdx, 12
	mov rax, rcx
	xor rax, rbp
	cmp [r12 + rdx + 16], rax
	jne fail7
7:	inc rcx
	cmp rcx, rbx
	jb 6b
	cmp qword ptr [r12 + 8], 2
	jne fail8
	MARK(12)
	EXIT(0)

	FAIL(1)
	FAIL(2)
	FAIL(3)
	FAIL(4)
	FAIL(5)
	FAIL(6)
	FAIL(7)
	FAIL(8)
