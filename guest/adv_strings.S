/*
 * adv_strings: string instructions over fresh memory, each run crossing a
 * 2 MiB window boundary, forwards and (DF=1) backwards. Region n is
 * R(n) = ram_base + n * 4 MiB + 1.5 MiB + 3 (unaligned), LEN = 1 MiB + 5
 * bytes (it crosses the window boundary at n * 4 MiB + 2 MiB).
 *   2 rep stosq forward into R1 (LEN/8 qwords): every qword exact
 *   3 rep movsb forward R1 -> R2: R2 equals R1
 *   4 rep movsb backward (DF=1) R1 -> R3: R3 equals R1
 *   5 repe cmpsb R2 vs R3 (both populated now): rcx 0, ZF set
 *   6 repe cmpsb over fresh R4 vs fresh R5: rcx 0, ZF set (all zeros)
 *   7 repe cmpsb backward (DF=1) over fresh R6 vs fresh R7: rcx 0, ZF set
 *   8 repne scasb forward over fresh R8 for 0x77, planted at its last byte
 *     (only that page touched first): found, rcx 0, rdi one past it
 *   9 repne scasb backward (DF=1) over fresh R9 for 0x77, planted at its
 *     first byte: found, rcx 0, rdi one below it
 *  10 rep stosb backward (DF=1) into fresh R10: every byte 0xab, the
 *     bytes either side untouched
 *  11 rep lodsq over fresh R11: rax 0 (last qword), rsi advanced
 * Exit codes: 1 RAM < 48 MiB, 2..11 the case above.
 */
#include "adv.h"

#define R(n) ((n) * 4 * MiB + 0x180003)
#define LEN (MiB + 5)

/* The LEN bytes at [\a] and [\b] are equal (scalar, 8 at a time plus the
 * last 8 overlapping), else fail\code. Clobbers rax, rcx. */
.macro same a, b, code
	xor ecx, ecx
1:	mov rax, [\a + rcx]
	cmp rax, [\b + rcx]
	jne fail\code
	add rcx, 8
	cmp rcx, LEN - 8
	jb 1b
	mov rax, [\a + LEN - 8]
	cmp rax, [\b + LEN - 8]
	jne fail\code
.endm

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 48 * MiB
	jb fail1
	cld

	lea rdi, [r12 + R(1)]		/* 2 */
	movabs rax, 0x0102030405060708
	mov ecx, LEN / 8
	rep stosq
	test rcx, rcx
	jnz fail2
	lea rdi, [r12 + R(1)]
	xor ecx, ecx
1:	cmp [rdi + rcx * 8], rax
	jne fail2
	inc ecx
	cmp ecx, LEN / 8
	jb 1b
	mov byte ptr [rdi + LEN - 1], 0xee	/* the last bytes stosq left */
	mov byte ptr [rdi + LEN - 3], 0xdd

	lea rsi, [r12 + R(1)]		/* 3 */
	lea rdi, [r12 + R(2)]
	mov ecx, LEN
	rep movsb
	lea rsi, [r12 + R(1)]
	lea rdi, [r12 + R(2)]
	same rsi, rdi, 3

	std				/* 4 */
	lea rsi, [r12 + R(1) + LEN - 1]
	lea rdi, [r12 + R(3) + LEN - 1]
	mov ecx, LEN
	rep movsb
	cld
	lea rsi, [r12 + R(1)]
	lea rdi, [r12 + R(3)]
	same rsi, rdi, 4

	lea rsi, [r12 + R(2)]		/* 5 */
	lea rdi, [r12 + R(3)]
	mov ecx, LEN
	repe cmpsb
	jne fail5
	test rcx, rcx
	jnz fail5

	lea rsi, [r12 + R(4)]		/* 6 */
	lea rdi, [r12 + R(5)]
	mov ecx, LEN
	repe cmpsb
	jne fail6
	test rcx, rcx
	jnz fail6

	std				/* 7 */
	lea rsi, [r12 + R(6) + LEN - 1]
	lea rdi, [r12 + R(7) + LEN - 1]
	mov ecx, LEN
	repe cmpsb
	cld
	jne fail7
	test rcx, rcx
	jnz fail7

	lea rdi, [r12 + R(8)]		/* 8 */
	mov byte ptr [rdi + LEN - 1], 0x77
	mov al, 0x77
	mov ecx, LEN
	repne scasb
	jne fail8
	test rcx, rcx
	jnz fail8
	lea rax, [r12 + R(8) + LEN]
	cmp rdi, rax
	jne fail8

	lea rdi, [r12 + R(9)]		/* 9 */
	mov byte ptr [rdi], 0x77
	add rdi, LEN - 1
	mov al, 0x77
	mov ecx, LEN
	std
	repne scasb
	cld
	jne fail9
	test rcx, rcx
	jnz fail9
	lea rax, [r12 + R(9) - 1]
	cmp rdi, rax
	jne fail9

	std				/* 10 */
	lea rdi, [r12 + R(10) + LEN - 1]
	mov al, 0xab
	mov ecx, LEN
	rep stosb
	cld
	lea rdi, [r12 + R(10)]
	movabs rax, 0xabababababababab
	xor ecx, ecx
2:	cmp [rdi + rcx], rax
	jne fail10
	add rcx, 8
	cmp rcx, LEN - 8
	jb 2b
	cmp [rdi + LEN - 8], rax
	jne fail10
	cmp byte ptr [rdi - 1], 0
	jne fail10
	cmp byte ptr [rdi + LEN], 0
	jne fail10

	lea rsi, [r12 + R(11)]		/* 11 */
	mov rax, -1
	mov ecx, LEN / 8
	rep lodsq
	test rax, rax
	jnz fail11
	lea rdx, [r12 + R(11) + LEN / 8 * 8]
	cmp rsi, rdx
	jne fail11
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
FAIL(10)
FAIL(11)
