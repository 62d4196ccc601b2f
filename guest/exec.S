/*
 * exec: runs code from a fresh lazy RAM page on a fresh lazy stack.
 * Copies func (position independent, pushes and pops) to
 * F = ram_base + ram_size - 2 MiB, switches RSP to S = ram_base + ram_size/2
 * (the page below S never touched before the call, >= 4 MiB from F),
 * calls F(40, 2) which returns 2*40 + 2 = 82, restores RSP.
 * Exit codes: 1 RAM < 16 MiB, 2 wrong result, 3 pushed argument missing
 * from the new stack, 4 return address missing from the new stack.
 */
#include "abi.h"

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi			/* RAM size */
	cmp r13, 16 * MiB
	jb fail1
	lea rbx, [r12 + r13 - 2 * MiB]	/* F */
	mov r15, r13
	shr r15, 1
	add r15, r12			/* S */

	mov rdi, rbx
	lea rsi, [rip + func_start]
	lea rcx, [rip + func_end]
	sub rcx, rsi
	rep movsb

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
	push rdi
	lea rax, [rdi + rsi]
	pop rcx
	add rax, rcx
	ret
func_end:
