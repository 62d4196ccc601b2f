/*
 * adv_cowsmp: 2-4 vCPUs do `lock inc` on shared u64s of a private
 * copy-on-write template mapping (the VMM maps its template at r8, never
 * touched before): for each of the first 16 template pages, every vCPU
 * does 4096 `lock inc` on the page's first u64. The first writes break
 * copy-on-write while other vCPUs increment: a locked instruction that
 * reads the template page and writes the private copy loses updates (a
 * known limitation, fixed by the page-granular copy-on-write issue).
 * vCPU 0 waits for the others, then prints `lost N` (decimal, N = expected
 * - actual increments over the 16 pages) on the console and exits 0: the
 * count is reported, not checked. Initial values come from the template
 * pattern (the u64 at offset o is (o * 0x9E3779B97F4A7C15) ^ 0xC0FFEE).
 * Exit codes: 1 no template (< 64 KiB), bad index or count, 2 timed out
 * waiting (~30 s), 3 a counter above its expected value (impossible).
 */
#include "adv.h"

#define PAGES 16
#define INCS 4096
#define GOLDEN 0x9e3779b97f4a7c15
#define SALT 0xc0ffee
#define DONE 0				/* at ram_base */

ENTRY
	mov r12, rdi			/* RAM base */
	mov rbp, r8			/* template */
	mov r14, rdx			/* index */
	mov r15, rcx			/* count */
	cmp r9, 64 * 1024
	jb fail1
	test r15, r15
	jz fail1
	cmp r14, r15
	jae fail1

	xor ebx, ebx			/* page */
1:	mov rdx, rbx
	shl rdx, 12
	mov ecx, INCS
2:	lock inc qword ptr [rbp + rdx]
	dec ecx
	jnz 2b
	inc ebx
	cmp ebx, PAGES
	jb 1b
	lock inc qword ptr [r12 + DONE]
	test r14, r14
	jz 3f
	EXIT(0)

3:	WAIT_GE r12+DONE, r15, 2
	xor r13d, r13d			/* lost */
	xor ebx, ebx
	movabs r10, GOLDEN
4:	mov rdx, rbx
	shl rdx, 12
	mov rax, rdx
	imul rax, r10
	xor rax, SALT			/* initial value */
	imul rcx, r15, INCS
	add rax, rcx			/* expected */
	sub rax, [rbp + rdx]
	jb fail3
	add r13, rax
	inc ebx
	cmp ebx, PAGES
	jb 4b

	lea rsi, [rip + msg]		/* "lost " */
5:	lodsb
	test al, al
	jz 6f
	out PORT_CONSOLE, al
	jmp 5b
6:	mov rax, r13			/* decimal, built backwards on the stack */
	mov rdi, rsp
	sub rsp, 32
	mov ecx, 10
7:	xor edx, edx
	div rcx
	add dl, '0'
	dec rdi
	mov [rdi], dl
	test rax, rax
	jnz 7b
8:	mov al, [rdi]
	out PORT_CONSOLE, al
	inc rdi
	lea rax, [rsp + 32]
	cmp rdi, rax
	jb 8b
	mov al, 10
	out PORT_CONSOLE, al
	add rsp, 32
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)

	.section .rodata
msg:	.asciz "lost "
