/*
 * cow: the VMM maps its template file privately at [r8, r8 + r9) before
 * start. The u64 at offset o is (o * 0x9E3779B97F4A7C15) ^ 0xC0FFEE.
 * Verifies the pattern (MARK 1), writes !pattern to every u64 of the first
 * half of the pages (MARK 2), verifies the first half holds the new values
 * and the second half the original pattern (MARK 3), exits 0.
 * Exit codes: 1 no template / size not a page multiple, 2 pattern wrong
 * before writing, 3 first half wrong after writing, 4 second half changed.
 */
#include "abi.h"

#define GOLDEN 0x9e3779b97f4a7c15
#define SALT 0xc0ffee

ENTRY
	mov r12, r8			/* template base */
	mov r13, r9			/* template size */
	test r12, r12
	jz fail1
	test r13, r13
	jz fail1
	test r13, 0xfff
	jnz fail1
	movabs r14, GOLDEN
	mov r15, r13
	shr r15, 13
	shl r15, 12			/* first half: whole pages */

	xor ecx, ecx
1:	mov rax, rcx
	imul rax, r14
	xor rax, SALT
	cmp [r12 + rcx], rax
	jne fail2
	add rcx, 8
	cmp rcx, r13
	jb 1b
	MARK(1)

	xor ecx, ecx
	jmp 3f
2:	mov rax, rcx
	imul rax, r14
	xor rax, SALT
	not rax
	mov [r12 + rcx], rax
	add rcx, 8
3:	cmp rcx, r15
	jb 2b
	MARK(2)

	xor ecx, ecx
4:	mov rax, rcx
	imul rax, r14
	xor rax, SALT
	cmp rcx, r15
	jae 5f
	not rax
	cmp [r12 + rcx], rax
	jne fail3
	jmp 6f
5:	cmp [r12 + rcx], rax
	jne fail4
6:	add rcx, 8
	cmp rcx, r13
	jb 4b
	MARK(3)
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
