/*
 * scatter: every 4 KiB page of RAM in a pseudo-random order first (so
 * populated windows are not GPA-adjacent and cannot merge into one slot),
 * then reads everything back in order.
 *   MARK 1  start; pass 1 visits pages in LCG order (full period over the
 *           next power of two >= page count, values >= count skipped) and
 *           writes page i's first u64 = i ^ K1
 *   MARK 2  pass 1 done; pass 2 reads every page back in order
 *   MARK 3  verified
 * Exit codes: 1 no RAM, 2 pass 1 did not visit every page exactly once,
 * 3 a page holds the wrong value.
 */
#include "abi.h"

#define K1 0x3c3c0000c3c3ffff

ENTRY
	mov r12, rdi			/* RAM base */
	mov rbx, rsi
	shr rbx, 12			/* page count */
	jz fail1
	movabs r8, K1
	MARK(1)

	LCG_INIT
	xor esi, esi			/* pages visited */
	mov rcx, r14
4:	LCG_NEXT 5f
	mov rdx, r11
	shl rdx, 12
	mov rax, r11
	xor rax, r8
	mov [r12 + rdx], rax
	inc rsi
5:	dec rcx
	jnz 4b
	cmp rsi, rbx
	jne fail2
	MARK(2)

	xor ecx, ecx
6:	mov rdx, rcx
	shl rdx, 12
	mov rax, rcx
	xor rax, r8
	cmp [r12 + rdx], rax
	jne fail3
	inc rcx
	cmp rcx, rbx
	jb 6b
	MARK(3)
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
