/*
 * smp: run with several vCPUs (rdx = index, rcx = count).
 * Each vCPU fills its own 1/count slice of the 16 MiB at ram_base with
 * address ^ (index << 56) ^ K and verifies it; then every vCPU does 100,000
 * rounds of `lock inc` on counter A, `lock xadd` on counter B and a
 * `lock cmpxchg` loop on counter C (pages at ram_base + 16 MiB, never touched
 * before), then `lock inc` DONE. vCPU 0 waits (about 30 s at most, by TSC)
 * until DONE == count and checks A == B == C == count * 100000.
 * Exit codes: 1 bad RAM size / index / count, 2 own slice wrong,
 * 3 counter A, 4 counter B, 5 counter C, 6 timed out waiting.
 */
#include "abi.h"

#define K 0x0f1e2d3c4b5a6978
#define ROUNDS 100000
#define CTR_A 0
#define CTR_B 0x1000
#define CTR_C 0x2000
#define DONE 0x3000

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi			/* RAM size */
	mov r14, rdx			/* index */
	mov r15, rcx			/* count */
	cmp r13, 18 * MiB
	jb fail1
	test r15, r15
	jz fail1
	cmp r14, r15
	jae fail1

	mov eax, 16 * MiB
	xor edx, edx
	div r15
	and rax, -4096
	mov rbx, rax			/* slice size */
	mov rsi, r14
	imul rsi, rbx
	add rsi, r12			/* slice start */
	lea rdi, [rsi + rbx]		/* slice end */
	movabs r8, K
	mov r9, r14
	shl r9, 56
	xor r9, r8			/* this vCPU's key */

	mov rcx, rsi
	jmp 2f
1:	mov rax, rcx
	xor rax, r9
	mov [rcx], rax
	add rcx, 8
2:	cmp rcx, rdi
	jb 1b
	mov rcx, rsi
	jmp 4f
3:	mov rax, rcx
	xor rax, r9
	cmp [rcx], rax
	jne fail2
	add rcx, 8
4:	cmp rcx, rdi
	jb 3b
	MARK(1)

	lea rbp, [r12 + 16 * MiB]
	mov ecx, ROUNDS
5:	lock inc qword ptr [rbp + CTR_A]
	mov eax, 1
	lock xadd [rbp + CTR_B], rax
	mov rax, [rbp + CTR_C]
6:	lea rdx, [rax + 1]
	lock cmpxchg [rbp + CTR_C], rdx
	jne 6b
	dec ecx
	jnz 5b
	lock inc qword ptr [rbp + DONE]
	MARK(2)
	test r14, r14
	jz 7f
	EXIT(0)

7:	rdtsc
	shl rdx, 32
	or rax, rdx
	mov r10, rax			/* start TSC */
	movabs r11, 0x2000000000	/* ~30 s at a few GHz */
8:	pause
	cmp [rbp + DONE], r15
	je 9f
	rdtsc
	shl rdx, 32
	or rax, rdx
	sub rax, r10
	cmp rax, r11
	ja fail6
	jmp 8b

9:	imul rax, r15, ROUNDS
	cmp [rbp + CTR_A], rax
	jne fail3
	cmp [rbp + CTR_B], rax
	jne fail4
	cmp [rbp + CTR_C], rax
	jne fail5
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
