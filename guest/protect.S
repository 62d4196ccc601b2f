/*
 * protect: two memory violations the VMM must survive.
 *   1. writes V to RAM page 0, PROTECT(ram_base, 4096, read-only), writes
 *      W != V there: the VMM reports a violation and drops the write;
 *   2. reads 8 bytes at HOLE_GPA (r10): the VMM reports a violation and
 *      returns zeros.
 * Exit codes: 1 the hole read did not give 0, 2 the dropped write landed.
 */
#include "abi.h"

#define V 0x1111222233334444
#define W 0x5555666677778888

ENTRY
	mov r12, rdi			/* RAM base */
	mov r15, r10			/* hole */
	movabs rax, V
	mov [r12], rax

	mov rdi, r12
	mov esi, 4096
	mov edx, PERM_READ
	out PORT_PROTECT, al

	movabs rax, W
	mov [r12], rax			/* violation 1: dropped */
	mov rbx, -1
	mov rbx, [r15]			/* violation 2: reads as zero */
	test rbx, rbx
	jnz fail1
	movabs rax, V
	cmp [r12], rax
	jne fail2
	EXIT(0)

FAIL(1)
FAIL(2)
