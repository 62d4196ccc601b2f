/*
 * lazypt: builds a 4-level page-table hierarchy in never-touched RAM, maps
 * VA 0x7f00_0000_0000 (4 KiB page -> A) and VA 0x7f00_0020_0000 (2 MiB page
 * -> B), copies the boot PML4's entries (identity map: code, stack, RAM),
 * takes the tables' memslots away (PROTECT none, then read-write: the
 * pages stay populated but nothing is installed until the next fault),
 * loads it with SET_CR3, accesses memory through the new range and checks
 * it through the identity map (and back), then restores the boot CR3.
 *   tables  T = ram_base + 20 MiB: PML4, PDPT, PD, PT in 4 consecutive pages
 *   A       = ram_base + 24 MiB + 0x5000
 *   B       = ram_base + 26 MiB (2 MiB aligned)
 * Exit codes: 1 RAM < 32 MiB, 2..6 a write through the new VA not seen at
 * the physical page, 7 a write at the physical page not seen through the VA,
 * 8 the identity map is wrong after restoring CR3.
 */
#include "abi.h"

#define VA 0x7f0000000000
#define PTE 7				/* present | write | user */
#define PTE_HUGE 0x87

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 32 * MiB
	jb fail1
	lea r13, [r12 + 20 * MiB]	/* T */
	lea r14, [r12 + 24 * MiB + 0x5000] /* A */
	lea r15, [r12 + 26 * MiB]	/* B */

	mov esi, BOOT_PML4		/* copy the boot PML4 */
	mov rdi, r13
	mov ecx, 512
	rep movsq

	lea rax, [r13 + 0x1000 + PTE]
	mov [r13 + (VA >> 39 & 511) * 8], rax	/* PML4[254] -> PDPT */
	lea rax, [r13 + 0x2000 + PTE]
	mov [r13 + 0x1000], rax			/* PDPT[0] -> PD */
	lea rax, [r13 + 0x3000 + PTE]
	mov [r13 + 0x2000], rax			/* PD[0] -> PT */
	lea rax, [r15 + PTE_HUGE]
	mov [r13 + 0x2000 + 8], rax		/* PD[1] -> B, 2 MiB */
	lea rax, [r14 + PTE]
	mov [r13 + 0x3000], rax			/* PT[0] -> A */

	/*
	 * Take the tables' memslots away (their contents stay): after SET_CR3
	 * the first instruction fetch walks tables KVM cannot see, and the VMM
	 * must find them by walking in software.
	 */
	mov rdi, r13
	mov esi, 0x4000
	xor edx, edx
	out PORT_PROTECT, al
	mov rdi, r13
	mov esi, 0x4000
	mov edx, PERM_READ | PERM_WRITE
	out PORT_PROTECT, al

	mov rdi, r13
	out PORT_SET_CR3, al
	movabs rbx, VA

	movabs rax, 0xa1a1a1a1a1a1a1a1
	mov [rbx], rax
	movabs rax, 0xa2a2a2a2a2a2a2a2
	mov [rbx + 0xff8], rax
	movabs rax, 0xb1b1b1b1b1b1b1b1
	mov [rbx + 2 * MiB], rax
	movabs rax, 0xb2b2b2b2b2b2b2b2
	mov [rbx + 3 * MiB], rax
	movabs rax, 0xb3b3b3b3b3b3b3b3
	mov [rbx + 4 * MiB - 8], rax

	movabs rax, 0xa1a1a1a1a1a1a1a1
	cmp [r14], rax
	jne fail2
	movabs rax, 0xa2a2a2a2a2a2a2a2
	cmp [r14 + 0xff8], rax
	jne fail3
	movabs rax, 0xb1b1b1b1b1b1b1b1
	cmp [r15], rax
	jne fail4
	movabs rax, 0xb2b2b2b2b2b2b2b2
	cmp [r15 + 1 * MiB], rax
	jne fail5
	movabs rax, 0xb3b3b3b3b3b3b3b3
	cmp [r15 + 2 * MiB - 8], rax
	jne fail6

	movabs rax, 0xc1c1c1c1c1c1c1c1
	mov [r14 + 8], rax
	cmp [rbx + 8], rax
	jne fail7

	mov edi, BOOT_PML4
	out PORT_SET_CR3, al
	movabs rax, 0xa1a1a1a1a1a1a1a1
	cmp [r14], rax
	jne fail8
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
FAIL(8)
