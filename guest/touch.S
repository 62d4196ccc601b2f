/*
 * touch: every 4 KiB page of RAM, sequentially then in a pseudo-random order.
 *   MARK 1  start; pass 1 writes page i's first u64 = i ^ K1, in order
 *   MARK 2  pass 1 done; pass 2 visits pages in LCG order (full period over
 *           the next power of two >= page count, values >= count skipped),
 *           checks the first u64 and writes the second u64 = i ^ K2
 *   MARK 3  pass 2 done; pass 3 reads every page back
 *   MARK 4  verified
 * Exit codes: 1 no RAM, 2 pass-2 read wrong, 3 pass 2 did not visit every
 * page exactly once, 4 first u64 wrong at the end, 5 second u64 wrong.
 */
#include "abi.h"

#define K1 0x5a5a0000a5a5ffff
#define K2 0x0123456789abcdef

ENTRY
	mov r12, rdi			/* RAM base */
	mov rbx, rsi
	shr rbx, 12			/* page count */
	jz fail1
	movabs r8, K1
	movabs rbp, K2
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
	MARK(2)

	LCG_INIT
	xor esi, esi			/* pages visited */
	mov rcx, r14
4:	LCG_NEXT 5f
	mov rdx, r11
	shl rdx, 12
	mov rax, r11
	xor rax, r8
	cmp [r12 + rdx], rax
	jne fail2
	mov rax, r11
	xor rax, rbp
	mov [r12 + rdx + 8], rax
	inc rsi
5:	dec rcx
	jnz 4b
	cmp rsi, rbx
	jne fail3
	MARK(3)

	xor ecx, ecx
6:	mov rdx, rcx
	shl rdx, 12
	mov rax, rcx
	xor rax, r8
	cmp [r12 + rdx], rax
	jne fail4
	mov rax, rcx
	xor rax, rbp
	cmp [r12 + rdx + 8], rax
	jne fail5
	inc rcx
	cmp rcx, rbx
	jb 6b
	MARK(4)
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
