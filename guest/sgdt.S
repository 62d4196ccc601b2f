/*
 * sgdt: `sgdt`/`sidt` at CPL3 storing to never-touched RAM. On PVM hosts
 * KVM's emulator runs them (UMIP) and, when the operand has no memslot,
 * loops inside KVM_RUN without an exit: only guestmm's watchdog (a kick
 * after VmOptions::watchdog, which populates what the instruction at RIP
 * needs) gets the vCPU going again. Each step uses its own 8 MiB slot:
 *   W1 sgdt to a fresh page            W2 sidt to a fresh page
 *   W3 sgdt straddling two fresh pages in two windows (at W3 + 2 MiB - 4)
 * and checks the stored values: the boot GDT (base 0x1000, 5 entries) and
 * the empty IDT (base 0, limit 0).
 * Exit codes: 1 RAM < 32 MiB, 2/3 W1 limit/base, 4/5 W2 limit/base,
 * 6/7 W3 limit/base.
 */
#include "abi.h"

#define W(n) (n * 8 * MiB)
#define GDT_BASE 0x1000
#define GDT_LIMIT (5 * 8 - 1)

/* Check the 10-byte descriptor at \a: limit \limit, base \base. */
.macro check a, limit, base, code_limit, code_base
	movzx eax, word ptr [\a]
	cmp eax, \limit
	jne fail\code_limit
	mov rax, [\a + 2]
	cmp rax, \base
	jne fail\code_base
.endm

ENTRY
	mov r12, rdi			/* RAM base */
	cmp rsi, 32 * MiB
	jb fail1

	lea rbx, [r12 + W(1) + 0x100]
	sgdt [rbx]
	check rbx, GDT_LIMIT, GDT_BASE, 2, 3

	lea rbx, [r12 + W(2) + 0x200]
	sidt [rbx]
	check rbx, 0, 0, 4, 5

	lea rbx, [r12 + W(3) + 2 * MiB - 4]
	sgdt [rbx]
	check rbx, GDT_LIMIT, GDT_BASE, 6, 7

	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
