/*
 * cowsmp: 4 vCPUs do locked read-modify-writes on shared counters in a
 * private copy-on-write template mapping (the VMM maps its template at r8
 * and never touches it before start): on each of the first 16 template
 * pages, every vCPU does 1024 rounds of `lock xadd` +1 on the u64 at +0, a
 * `lock cmpxchg` loop +1 on +8, and an `xchg` spinlock at +16 around a
 * plain `inc` of +24. The first writes hit copy-on-write pages while the
 * other vCPUs update them. vCPU 0 waits for the others, prints `lost N`
 * (N = expected - actual over all counters, decimal) and exits 0 if N is 0,
 * 5 otherwise. Needs the VM to trap copy-on-write writes per page (r11 bit
 * 0, userfaultfd write protection): without it, exits 100 (unsupported)
 * before touching anything. Initial values come from the template pattern
 * (the u64 at offset o is (o * 0x9E3779B97F4A7C15) ^ 0xC0FFEE); the
 * spinlock is free while it holds anything but 1.
 * Exit codes: 1 no template (< 64 KiB), bad index or count, 2 timed out
 * waiting (~30 s), 3 a counter above its expected value, 5 updates lost,
 * 100 unsupported.
 */
#include "adv.h"

#define PAGES 16
#define ROUNDS 1024
#define GOLDEN 0x9e3779b97f4a7c15
#define SALT 0xc0ffee
#define DONE 0				/* at ram_base */
#define LOCKED 1

ENTRY
	test r11, 1
	jz fail100
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
1:	mov rdi, rbx
	shl rdi, 12
	add rdi, rbp			/* this page's counters */
	mov ecx, ROUNDS
2:	mov eax, 1
	lock xadd [rdi], rax
3:	mov rax, [rdi + 8]
	lea rdx, [rax + 1]
	lock cmpxchg [rdi + 8], rdx
	jnz 3b
4:	mov eax, LOCKED
	xchg [rdi + 16], rax
	cmp rax, LOCKED
	jne 5f
	pause
	jmp 4b
5:	inc qword ptr [rdi + 24]
	mov [rdi + 16], rax		/* release: put the free value back */
	dec ecx
	jnz 2b
	inc ebx
	cmp ebx, PAGES
	jb 1b
	lock inc qword ptr [r12 + DONE]
	test r14, r14
	jz 6f
	EXIT(0)

6:	WAIT_GE r12+DONE, r15, 2
	xor r13d, r13d			/* lost */
	movabs r10, GOLDEN
	imul r9, r15, ROUNDS		/* increments per counter */
	xor ebx, ebx			/* byte offset of the counter */
7:	mov rax, rbx
	imul rax, r10
	xor rax, SALT			/* initial value */
	mov rdx, rbx
	and edx, 0xfff
	cmp edx, 16			/* the spinlock: back to its initial value */
	je 8f
	add rax, r9
8:	sub rax, [rbp + rbx]
	jb fail3
	add r13, rax
	add rbx, 8
	mov rdx, rbx
	and edx, 0xfff
	cmp edx, 32
	jb 7b
	add rbx, 4096 - 32		/* next page */
	cmp rbx, PAGES * 4096
	jb 7b

	lea rsi, [rip + msg]		/* "lost " */
9:	lodsb
	test al, al
	jz 10f
	out PORT_CONSOLE, al
	jmp 9b
10:	mov rax, r13			/* decimal, built backwards on the stack */
	mov rdi, rsp
	sub rsp, 32
	mov ecx, 10
11:	xor edx, edx
	div rcx
	add dl, '0'
	dec rdi
	mov [rdi], dl
	test rax, rax
	jnz 11b
12:	mov al, [rdi]
	out PORT_CONSOLE, al
	inc rdi
	lea rax, [rsp + 32]
	cmp rdi, rax
	jb 12b
	mov al, 10
	out PORT_CONSOLE, al
	add rsp, 32
	test r13, r13
	jnz fail5
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(5)
FAIL(100)

	.section .rodata
msg:	.asciz "lost "
