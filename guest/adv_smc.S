/*
 * adv_smc: self-modifying code in lazy RAM. The snippet `mov eax, imm32;
 * ret` (6 bytes) is copied to C = ram_base + 2 MiB + 0x100 (a fresh
 * window), called, its immediate rewritten in place, called again:
 *   2 first call returns the first immediate
 *   3 16 rounds: take C's slot away (pages kept), rewrite the immediate
 *     (a write to a slot-less page), take the slot away again, call it:
 *     the new immediate every time (calls from pages that lost their slot)
 *   4 the snippet written by an AVX store (vmovdqu ymm) into fresh page
 *     C2 = ram_base + 6 MiB + 0x200, called
 *   5 the snippet at B - 3 (B = ram_base + 10 MiB, a window boundary:
 *     the `mov` straddles it), slots taken away, called, rewritten across
 *     the boundary (mov dword at B - 2), called again
 * Exit codes: 1 RAM < 16 MiB, 2..5 the case above.
 */
#include "adv.h"

#define C1 (2 * MiB + 0x100)
#define C2 (6 * MiB + 0x200)
#define B3 (10 * MiB)

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 16 * MiB
	jb fail1

	lea rbx, [r12 + C1]		/* 2 */
	mov byte ptr [rbx], 0xb8	/* mov eax, imm32 */
	mov dword ptr [rbx + 1], 0x11111111
	mov byte ptr [rbx + 5], 0xc3	/* ret */
	call rbx
	cmp eax, 0x11111111
	jne fail2

	lea r13, [r12 + C1 - 0x100]	/* 3 */
	mov r14d, 16
1:	DROP_SLOTS r13, 4096, PERM_ALL
	mov [rbx + 1], r14d
	DROP_SLOTS r13, 4096, PERM_ALL
	xor eax, eax
	call rbx
	cmp eax, r14d
	jne fail3
	dec r14d
	jnz 1b

	vmovdqu ymm0, [rip + snippet]	/* 4 */
	lea rbx, [r12 + C2]
	vmovdqu [rbx], ymm0
	xor eax, eax
	call rbx
	cmp eax, 0x44444444
	jne fail4
	vzeroupper

	lea rbx, [r12 + B3 - 3]		/* 5 */
	mov byte ptr [rbx], 0xb8
	mov dword ptr [rbx + 1], 0x55555555
	mov byte ptr [rbx + 5], 0xc3
	lea r13, [r12 + B3 - 4096]
	DROP_SLOTS r13, 8192, PERM_ALL
	call rbx
	cmp eax, 0x55555555
	jne fail5
	mov dword ptr [rbx + 1], 0x56565656
	DROP_SLOTS r13, 8192, PERM_ALL
	call rbx
	cmp eax, 0x56565656
	jne fail5
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)

	.section .rodata
	.balign 32
snippet:
	.byte 0xb8
	.long 0x44444444
	.byte 0xc3
	.fill 26, 1, 0xcc
