/*
 * adv_smppt: page tables and code in lazy RAM while other vCPUs' faults
 * merge and split the memslots right next to them (2-4 vCPUs).
 * vCPU 0 builds a page-table hierarchy at T = ram_base + 20 MiB (PML4,
 * PDPT, PD, PT in four pages; the boot PML4's entries copied, VA
 * 0x7f00_0000_0000 -> A = ram_base + 24 MiB + 0x5000) and copies `func`
 * to X = T + 16 KiB, loads it with SET_CR3 and then, until the other vCPUs
 * have done ROUNDS rounds between them (at least LOOPS iterations), calls
 * X (running from RAM), writes through the VA and checks at A; every 32
 * iterations it reloads CR3 (SET_CR3 again: a fresh walk of the tables).
 * vCPU i >= 1 owns L(i) = [T - i * 512 KiB, T - (i - 1) * 512 KiB) and
 * U(i) = [T + 32 KiB + (i - 1) * 512 KiB, + 512 KiB): each round it writes
 * one u64 per page, nearest to T first (new slots that merge with the
 * tables' slot), checks them, then takes the slots of both ranges away
 * (splitting the merged slot again).
 * Exit codes: 1 RAM < 32 MiB or bad index/count, 2 X returned a wrong
 * value, 3 a write through the VA not seen at A, 4 timed out (~30 s)
 * waiting for the others, 5 identity map wrong after restoring CR3,
 * 6 a toucher's write not read back.
 */
#include "adv.h"

#define VA 0x7f0000000000
#define PTE 7
#define ROUNDS 24
#define LOOPS 2000
#define CTL_START 0			/* control page at ram_base */
#define CTL_ROUNDS 8
#define CTL_DONE 16
#define RANGE (512 * 1024)

ENTRY
	mov r12, rdi			/* RAM base */
	mov r14, rdx			/* index */
	mov r15, rcx			/* count */
	cmp rsi, 32 * MiB
	jb fail1
	cmp r15, 2
	jb fail1
	cmp r14, r15
	jae fail1
	lea r13, [r12 + 20 * MiB]	/* T */
	test r14, r14
	jnz toucher

	mov esi, BOOT_PML4		/* vCPU 0: build the tables */
	mov rdi, r13
	mov ecx, 512
	rep movsq
	lea rax, [r13 + 0x1000 + PTE]
	mov [r13 + (VA >> 39 & 511) * 8], rax
	lea rax, [r13 + 0x2000 + PTE]
	mov [r13 + 0x1000], rax
	lea rax, [r13 + 0x3000 + PTE]
	mov [r13 + 0x2000], rax
	lea rbx, [r12 + 24 * MiB + 0x5000]	/* A */
	lea rax, [rbx + PTE]
	mov [r13 + 0x3000], rax
	lea rsi, [rip + func]		/* X */
	lea rdi, [r13 + 0x4000]
	mov ecx, func_end - func
	rep movsb
	mov rdi, r13
	out PORT_SET_CR3, al
	lock inc qword ptr [r12 + CTL_START]

	movabs rbp, VA
	xor r8d, r8d			/* iteration */
1:	mov rdi, r8
	lea rax, [r13 + 0x4000]
	call rax
	lea rdx, [r8 * 2 + 1]
	cmp rax, rdx
	jne fail2
	mov ecx, r8d
	and ecx, 511
	mov [rbp + rcx * 8], r8
	cmp [rbx + rcx * 8], r8
	jne fail3
	inc r8
	test r8d, 31
	jnz 2f
	mov rdi, r13
	out PORT_SET_CR3, al
2:	cmp r8, LOOPS
	jb 1b
	cmp qword ptr [r12 + CTL_ROUNDS], ROUNDS
	jae 3f
	RDTSC64				/* keep going until the others are done */
	test r9, r9
	jnz 4f
	mov r9, rax
4:	sub rax, r9
	shr rax, 37
	jnz fail4
	jmp 1b

3:	mov byte ptr [r12 + CTL_DONE], 1
	mov edi, BOOT_PML4
	out PORT_SET_CR3, al
	lea rcx, [r8 - 1]
	and ecx, 511
	lea rdx, [r8 - 1]
	cmp [rbx + rcx * 8], rdx
	jne fail5
	EXIT(0)

toucher:
	mov eax, 1
	WAIT_GE r12+CTL_START, rax, 4
	lea rbx, [r14 - 1]
	imul rbx, rbx, RANGE		/* (i - 1) * RANGE */
	mov rsi, r13
	sub rsi, rbx			/* L(i) top */
	lea rdi, [r13 + 0x8000]
	add rdi, rbx			/* U(i) base */
	mov r8, rsi
	sub r8, RANGE			/* L(i) base */
	mov r9d, 1			/* round tag */
5:	xor ecx, ecx			/* nearest to T first */
6:	mov rdx, rsi
	sub rdx, rcx
	mov [rdx - 8], r9
	mov [rdi + rcx], r9
	add rcx, 4096
	cmp rcx, RANGE
	jb 6b
	xor ecx, ecx
7:	mov rdx, rsi
	sub rdx, rcx
	cmp [rdx - 8], r9
	jne fail6
	cmp [rdi + rcx], r9
	jne fail6
	add rcx, 4096
	cmp rcx, RANGE
	jb 7b
	DROP_SLOTS r8, RANGE
	DROP_SLOTS rdi, RANGE
	lock inc qword ptr [r12 + CTL_ROUNDS]
	inc r9
	cmp byte ptr [r12 + CTL_DONE], 0
	je 5b
	EXIT(0)

/* rax = 2 * rdi + 1, copied to X and run from there. */
func:	lea rax, [rdi + rdi]
	inc rax
	ret
func_end:

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
