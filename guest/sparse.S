/*
 * sparse: one 4 KiB page per 2 MiB of RAM, the rest untouched (a guest whose
 * memory is mostly never used: lazy memory must not commit the whole RAM).
 *   MARK 1  start; pass 1 writes the first u64 of the first page of every
 *           2 MiB block = block ^ K1, in order
 *   MARK 2  pass 1 done; pass 2 reads them back, and the page's second u64
 *           (never written) must still be 0
 *   MARK 3  verified
 * Exit codes: 1 less than 2 MiB of RAM, 2 a written u64 is wrong,
 * 3 an unwritten u64 is not zero.
 */
#include "abi.h"

#define K1 0x6b6b0000b6b6ffff

ENTRY
	mov r12, rdi			/* RAM base */
	mov rbx, rsi
	shr rbx, 21			/* 2 MiB blocks */
	jz fail1
	movabs r8, K1
	MARK(1)

	xor ecx, ecx
1:	mov rax, rcx
	xor rax, r8
	mov rdx, rcx
	shl rdx, 21
	mov [r12 + rdx], rax
	inc rcx
	cmp rcx, rbx
	jb 1b
	MARK(2)

	xor ecx, ecx
2:	mov rdx, rcx
	shl rdx, 21
	mov rax, rcx
	xor rax, r8
	cmp [r12 + rdx], rax
	jne fail2
	cmp qword ptr [r12 + rdx + 8], 0
	jne fail3
	inc rcx
	cmp rcx, rbx
	jb 2b
	MARK(3)
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
