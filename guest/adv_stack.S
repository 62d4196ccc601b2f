/*
 * adv_stack: stack operations with RSP moved into fresh RAM. For each of
 * 8 windows n (S(n) = ram_base + n * 4 MiB + 2 MiB, a window boundary):
 * RSP = S(n), so the first push writes the never-touched page below it,
 * in another window than the page at S(n):
 *   2 push reg: [rsp] exact          3 call: the return address on the
 *   new stack, the callee's push/pop and ret work
 *   4 push qword [fresh page]: 0 pushed; pop qword [fresh page]: stored
 *   5 pushfq/popfq round trip         6 enter 32, 0 / leave
 * then RSP = S(n) + 4 (misaligned: every push straddles the boundary):
 *   7 push reg, call and ret, pop: exact
 * Restores the boot stack at the end. Exit codes: 1 RAM < 40 MiB,
 * 2..7 the case above.
 */
#include "adv.h"

#define S(n) ((n) * 4 * MiB + 2 * MiB)

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 40 * MiB
	jb fail1
	mov r15, rsp			/* boot stack */
	movabs rbx, 0x5a5a0000a5a50000
	xor r14d, r14d			/* n */

1:	imul r13, r14, 4 * MiB
	lea r13, [r12 + r13 + S(0)]	/* S(n) */
	add rbx, r14
	mov rsp, r13

	push rbx			/* 2 */
	cmp [rsp], rbx
	jne fail2
	cmp [r13 - 8], rbx
	jne fail2

	lea r8, [rip + 3f]		/* 3: returns rbx + 1 in rax */
	call func
3:	lea rdx, [rbx + 1]
	cmp rax, rdx
	jne fail3
	lea rax, [r13 - 8]
	cmp rsp, rax
	jne fail3

	push qword ptr [r13 + 0x10000]	/* 4: a fresh page above S(n) */
	cmp qword ptr [rsp], 0
	jne fail4
	mov [rsp], rbx
	pop qword ptr [r13 + 0x20000]	/* another fresh page */
	cmp [r13 + 0x20000], rbx
	jne fail4

	pushfq				/* 5 */
	pop rax
	push rax
	popfq
	pushfq
	pop rdx
	cmp rax, rdx
	jne fail5

	mov rbp, 0x1234			/* 6 */
	enter 32, 0
	cmp qword ptr [rsp + 32], 0x1234
	jne fail6
	mov qword ptr [rsp], 1		/* the local area */
	leave
	cmp rbp, 0x1234
	jne fail6

	lea rsp, [r13 + 4]		/* 7: misaligned */
	push rbx
	cmp [r13 - 4], rbx
	jne fail7
	lea r8, [rip + 3f]
	call func
3:	lea rdx, [rbx + 1]
	cmp rax, rdx
	jne fail7
	pop rax
	cmp rax, rbx
	jne fail7
	lea rax, [r13 + 4]
	cmp rsp, rax
	jne fail7

	inc r14
	cmp r14, 8
	jb 1b
	mov rsp, r15
	EXIT(0)

/* rax = rbx + 1 through a push and pop on the current stack, or 0 when
 * the return address on top of the stack is not r8. */
func:	cmp [rsp], r8
	jne 2f
	push rcx
	lea rcx, [rbx + 1]
	push rcx
	pop rax
	pop rcx
	ret
2:	xor eax, eax
	ret

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
