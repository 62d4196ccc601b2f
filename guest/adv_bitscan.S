/*
 * adv_bitscan: lzcnt, tzcnt, popcnt, bsf and bsr with a memory operand on
 * a page the guest never touched. KVM's emulator is known to run lzcnt and
 * tzcnt as bsr and bsf (issue 9: lzcnt of 0x10 gave 4, tzcnt of 0 left the
 * destination unchanged); the results must be exact.
 * Fresh RAM (reads zero), one page per operation, 4 MiB apart:
 *   2 lzcnt r64 of 0: 64, CF set      3 tzcnt r64 of 0: 64, CF set
 *   4 lzcnt r32 of 0: 32              5 tzcnt r16 of 0: 16
 *   6 popcnt of 0: 0, ZF set          7 bsf of 0: ZF set
 * Never-touched template pages (the VMM maps its template privately at
 * r8; the u64 at offset o is (o * 0x9E3779B97F4A7C15) ^ 0xC0FFEE), one
 * page each (pages 0-15: 8, 16-31: 9, 32-39: 10, 52-55: 11-14), the u64
 * at o = page * 4096 + 8 * (page % 16) or a fixed offset; expected values
 * are computed from register operands (run natively):
 *   8 lzcnt r64   9 tzcnt r64   10 popcnt r64   11 bsr r64   12 bsf r64
 *  13 lzcnt r32 (low half)   14 tzcnt r32 (high half)
 * Then slot-less pages holding 0x10 (written, slots taken away):
 *  15 lzcnt r64 of 0x10: 59  16 lzcnt r32: 27  17 lzcnt r16: 11
 *  18 tzcnt r64 of 0x10: 4
 * Exit codes: 1 RAM < 64 MiB or template < 256 KiB, 2..18 the check above,
 * 100 no LZCNT (CPUID 0x80000001:ECX[5]), BMI1 (tzcnt) or POPCNT.
 */
#include "adv.h"

#define F(n) ((n) * 4 * MiB + 0x2468)
#define GOLDEN 0x9e3779b97f4a7c15
#define SALT 0xc0ffee

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi
	cmp r13, 64 * MiB
	jb fail1
	cmp r9, 256 * 1024
	jb fail1
	mov rbp, r8			/* template */
	mov eax, 0x80000001
	cpuid
	test ecx, 1 << 5
	jz fail100
	mov eax, 7
	xor ecx, ecx
	cpuid
	test ebx, 1 << 3
	jz fail100
	mov eax, 1
	cpuid
	test ecx, 1 << 23
	jz fail100

	mov rax, 12345			/* 2 */
	lzcnt rax, [r12 + F(1)]
	jnc fail2
	cmp rax, 64
	jne fail2
	mov rax, 12345			/* 3 */
	tzcnt rax, [r12 + F(2)]
	jnc fail3
	cmp rax, 64
	jne fail3
	mov rax, -1			/* 4 */
	lzcnt eax, [r12 + F(3)]
	cmp rax, 32
	jne fail4
	mov eax, 12345			/* 5 */
	tzcnt ax, [r12 + F(4)]
	cmp eax, 16
	jne fail5
	mov rax, 7			/* 6 */
	popcnt rax, [r12 + F(5)]
	jnz fail6
	test rax, rax
	jnz fail6
	mov rax, 7			/* 7 */
	bsf rax, [r12 + F(6)]
	jnz fail7

	movabs r15, GOLDEN
	xor r14d, r14d			/* page */
1:	mov rbx, r14
	shl rbx, 12
	lea rbx, [rbx + r14 * 8]	/* offset */
	mov rsi, rbx
	imul rsi, r15
	xor rsi, SALT			/* the value */
	/* 8: lzcnt */
	mov rdi, 64
	bsr rcx, rsi
	jz 2f
	mov edi, 63
	sub edi, ecx
2:	lzcnt rax, [rbp + rbx]
	cmp rax, rdi
	jne fail8
	/* 9: tzcnt of the u64 16 pages further */
	tzcnt rax, [rbp + rbx + 4096 * 16]
	mov rdx, rbx
	add rdx, 4096 * 16
	imul rdx, r15
	xor rdx, SALT
	mov edi, 64
	bsf rcx, rdx
	cmovnz edi, ecx
	cmp rax, rdi
	jne fail9
	inc r14
	cmp r14, 16
	jb 1b
	jmp 3f

FAIL(8)
FAIL(9)

3:	xor r14d, r14d			/* 10: pages 32..39 */
4:	mov rbx, r14
	add rbx, 32
	shl rbx, 12
	lea rbx, [rbx + r14 * 8]
	mov rsi, rbx
	imul rsi, r15
	xor rsi, SALT
	/* 10: popcnt via a bit loop */
	xor edi, edi
	mov rcx, rsi
5:	test rcx, rcx
	jz 6f
	lea rdx, [rcx - 1]
	and rcx, rdx
	inc edi
	jmp 5b
6:	popcnt rax, [rbp + rbx]
	cmp eax, edi
	jne fail10
	inc r14
	cmp r14, 8
	jb 4b
	jmp 7f
FAIL(10)
7:
	/* 11..14: one fresh template page each, 52..55 */
	mov rbx, 52 * 4096 + 0x100
	mov rsi, rbx
	imul rsi, r15
	xor rsi, SALT
	bsr rdi, rsi
	mov rax, -1
	bsr rax, [rbp + rbx]
	cmp rax, rdi
	jne fail11
	mov rbx, 53 * 4096 + 0x108
	mov rsi, rbx
	imul rsi, r15
	xor rsi, SALT
	bsf rdi, rsi
	mov rax, -1
	bsf rax, [rbp + rbx]
	cmp rax, rdi
	jne fail12
	mov rbx, 54 * 4096 + 0x110
	mov rsi, rbx
	imul rsi, r15
	xor rsi, SALT
	mov edi, esi			/* low half */
	mov eax, 32
	bsr ecx, edi
	jz 8f
	mov eax, 31
	sub eax, ecx
8:	mov edi, eax
	mov rax, -1
	lzcnt eax, [rbp + rbx]
	cmp rax, rdi
	jne fail13
	mov rbx, 55 * 4096 + 0x118
	mov rsi, rbx
	imul rsi, r15
	xor rsi, SALT
	shr rsi, 32			/* high half */
	mov edi, 32
	bsf ecx, esi
	cmovnz edi, ecx
	mov rax, -1
	tzcnt eax, [rbp + rbx + 4]
	cmp rax, rdi
	jne fail14

	lea rbx, [r12 + F(8)]		/* 15..18: slot-less pages holding 0x10 */
	mov qword ptr [rbx], 0x10
	mov qword ptr [rbx + 4 * MiB], 0x10
	mov qword ptr [rbx + 8 * MiB], 0x10
	mov qword ptr [rbx + 12 * MiB], 0x10
	DROP_SLOTS r12, r13
	lzcnt rax, [rbx]
	cmp rax, 59
	jne fail15
	lzcnt eax, [rbx + 4 * MiB]
	cmp eax, 27
	jne fail16
	mov eax, -1
	lzcnt ax, [rbx + 8 * MiB]
	cmp eax, 0xffff000b
	jne fail17
	tzcnt rax, [rbx + 12 * MiB]
	cmp rax, 4
	jne fail18
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
FAIL(11)
FAIL(12)
FAIL(13)
FAIL(14)
FAIL(15)
FAIL(16)
FAIL(17)
FAIL(18)
FAIL(100)
