/*
 * exec: runs code from RAM pages that have no memslot at the call, on a
 * stack page never touched before the call.
 *   F = ram_base + ram_size - 2 MiB (a 2 MiB window boundary)
 *   S = ram_base + ram_size / 2 (the page below S is never touched before
 *       the call; >= 4 MiB from F)
 * Copies func (position independent) to F - 3, so its first instruction
 * (`push rdi`, 1 byte) ends just below F and its second (`lea`, 4 bytes)
 * straddles F. The copy populates both pages; PROTECT(none) then
 * PROTECT(rwx) over [F - 4 KiB, F + 4 KiB) takes their memslots away
 * without installing them again (gaining permissions installs nothing), so
 * the call fetches from slot-less pages: first the page below F, then an
 * instruction whose second half is on the page at F. Switches RSP to S,
 * calls F - 3 with (40, 2), which returns 2*40 + 2 = 82, restores RSP.
 * Exit codes: 1 RAM < 16 MiB, 2 wrong result, 3 pushed argument missing
 * from the new stack, 4 return address missing from the new stack.
 */
#include "abi.h"

#define PERM_ALL (PERM_READ | PERM_WRITE | PERM_EXEC)

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi			/* RAM size */
	cmp r13, 16 * MiB
	jb fail1
	lea rbx, [r12 + r13 - 2 * MiB - 3]	/* F - 3: entry point */
	mov r15, r13
	shr r15, 1
	add r15, r12			/* S */

	mov rdi, rbx
	lea rsi, [rip + func_start]
	lea rcx, [rip + func_end]
	sub rcx, rsi
	rep movsb

	lea rdi, [r12 + r13 - 2 * MiB - 4096]
	mov esi, 8192
	xor edx, edx
	out PORT_PROTECT, al		/* slots of both pages go away */
	lea rdi, [r12 + r13 - 2 * MiB - 4096]
	mov esi, 8192
	mov edx, PERM_ALL
	out PORT_PROTECT, al		/* nothing is installed again */

	mov r14, rsp
	mov rsp, r15
	mov edi, 40
	mov esi, 2
	call rbx
ret_here:
	mov rsp, r14
	cmp rax, 82
	jne fail2
	cmp qword ptr [r15 - 16], 40
	jne fail3
	lea rax, [rip + ret_here]
	cmp [r15 - 8], rax
	jne fail4
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)

func_start:
	push rdi			/* 1 byte: at F - 3 */
	lea rax, [rdi + rsi]		/* 4 bytes: F - 2 .. F + 1 */
	pop rcx
	add rax, rcx
	ret
func_end:
