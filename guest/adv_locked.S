/*
 * adv_locked: locked read-modify-writes whose operand is fresh or
 * populated-but-slot-less. Window n is W(n) = ram_base + n * 4 MiB + 0x1230
 * (16-aligned, one operand per window).
 *   2 lock cmpxchg16b on 8 fresh windows (W1..W8), expecting zero: ZF set,
 *     rcx:rbx stored
 *   3 lock cmpxchg16b on the same operands after their slots are taken
 *     away (the operand may first be read through an MMIO exit), expecting
 *     the value just stored: ZF set, new value stored
 *   4 lock cmpxchg16b with a wrong expectation (slot-less again): ZF clear,
 *     rdx:rax = the value in memory, memory unchanged
 *   5 lock xadd on fresh W9: returns 0, memory = addend
 *   6 lock cmpxchg on fresh W10 expecting 0: stored
 *   7 lock inc, lock or, lock btc (bit 63) on fresh W11, W12, W13
 *   8 xchg (implicitly locked) with fresh W14
 *   9 lock xadd, lock cmpxchg on W9, W10 after their slots were taken away
 * Exit codes: 1 RAM < 64 MiB, 2..9 the case above, 100 no CMPXCHG16B.
 */
#include "adv.h"

#define W(n) ((n) * 4 * MiB + 0x1230)
#define LO 0x1111111111111111
#define HI 0x2222222222222222

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi
	cmp r13, 64 * MiB
	jb fail1
	mov eax, 1
	cpuid
	test ecx, 1 << 13		/* CX16 */
	jz fail100

	mov r14d, 1			/* 2 */
1:	imul r15, r14, 4 * MiB
	lea r15, [r12 + r15 + 0x1230]
	xor eax, eax
	xor edx, edx
	movabs rbx, LO
	movabs rcx, HI
	add rbx, r14
	lock cmpxchg16b [r15]
	jnz fail2
	cmp [r15], rbx
	jne fail2
	cmp [r15 + 8], rcx
	jne fail2
	inc r14d
	cmp r14d, 8
	jbe 1b

	DROP_SLOTS r12, r13		/* 3 */
	mov r14d, 1
2:	imul r15, r14, 4 * MiB
	lea r15, [r12 + r15 + 0x1230]
	movabs rax, LO
	movabs rdx, HI
	add rax, r14
	mov rbx, rdx
	mov rcx, rax
	lock cmpxchg16b [r15]
	jnz fail3
	cmp [r15], rbx
	jne fail3
	cmp [r15 + 8], rcx
	jne fail3
	inc r14d
	cmp r14d, 8
	jbe 2b

	DROP_SLOTS r12, r13		/* 4 */
	lea r15, [r12 + W(3)]
	xor eax, eax
	xor edx, edx
	xor ebx, ebx
	xor ecx, ecx
	lock cmpxchg16b [r15]
	jz fail4
	movabs rbx, HI			/* W3 holds (lo HI, hi LO + 3) */
	cmp rax, rbx
	jne fail4
	movabs rcx, LO + 3
	cmp rdx, rcx
	jne fail4
	cmp [r15], rbx
	jne fail4

	mov eax, 5			/* 5 */
	lock xadd [r12 + W(9)], rax
	test rax, rax
	jnz fail5
	cmp qword ptr [r12 + W(9)], 5
	jne fail5

	xor eax, eax			/* 6 */
	mov ecx, 77
	lock cmpxchg [r12 + W(10)], rcx
	jnz fail6
	cmp qword ptr [r12 + W(10)], 77
	jne fail6

	lock inc qword ptr [r12 + W(11)]	/* 7 */
	cmp qword ptr [r12 + W(11)], 1
	jne fail7
	lock or dword ptr [r12 + W(12)], 0x80
	cmp dword ptr [r12 + W(12)], 0x80
	jne fail7
	lock btc qword ptr [r12 + W(13)], 63
	jc fail7
	movabs rax, 0x8000000000000000
	cmp [r12 + W(13)], rax
	jne fail7

	movabs rax, LO			/* 8 */
	xchg [r12 + W(14)], rax
	test rax, rax
	jnz fail8
	movabs rax, LO
	cmp [r12 + W(14)], rax
	jne fail8

	DROP_SLOTS r12, r13		/* 9 */
	mov eax, 5
	lock xadd [r12 + W(9)], rax
	cmp rax, 5
	jne fail9
	cmp qword ptr [r12 + W(9)], 10
	jne fail9
	mov eax, 77
	mov ecx, 78
	lock cmpxchg [r12 + W(10)], rcx
	jnz fail9
	cmp qword ptr [r12 + W(10)], 78
	jne fail9
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
