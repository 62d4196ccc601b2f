/*
 * Macros shared by the adversarial guests (guest/adv_*.S), on top of abi.h.
 * They attack the lazy-memory exit path: every access of interest goes to
 * memory that is fresh (never touched) or populated but slot-less (written,
 * then PROTECT none + PROTECT rw(x): the pages stay, their memslots go).
 */
#include "abi.h"

#define PERM_RW (PERM_READ | PERM_WRITE)
#define PERM_ALL (PERM_READ | PERM_WRITE | PERM_EXEC)

/* Exit code of every adversarial guest for "this host cannot run it". */
#define UNSUPPORTED 100

/*
 * Take the memslots of [\base, \base + \len) away, keeping the pages
 * (PROTECT none, then PROTECT \perms); page-aligned. Clobbers rax only.
 */
.macro DROP_SLOTS base, len, perms=PERM_RW
	push rdi
	push rsi
	push rdx
	mov rdi, \base
	mov rsi, \len
	xor edx, edx
	out PORT_PROTECT, al
	mov rdi, \base
	mov rsi, \len
	mov edx, \perms
	out PORT_PROTECT, al
	pop rdx
	pop rsi
	pop rdi
.endm

/*
 * AVX usable, else jump to fail\code. CPUID.1:ECX.AVX; when OSXSAVE is set
 * (VMX: CPUID mirrors the CR4 the VMM loaded), XCR0 must enable SSE|AVX.
 * Under PVM the guest sees the host's CPUID (OSXSAVE clear) and runs AVX
 * natively with the host's XCR0. Clobbers rax, rbx, rcx, rdx.
 */
.macro NEED_AVX code
	mov eax, 1
	cpuid
	test ecx, 1 << 28
	jz fail\code
	test ecx, 1 << 27
	jz 1099f
	xor ecx, ecx
	xgetbv
	and eax, 6
	cmp eax, 6
	jne fail\code
1099:
.endm

/* AVX and AVX2 (CPUID.7.0:EBX bit 5). */
.macro NEED_AVX2 code
	NEED_AVX \code
	mov eax, 7
	xor ecx, ecx
	cpuid
	test ebx, 1 << 5
	jz fail\code
.endm

/* rax = the TSC (rdx clobbered). */
.macro RDTSC64
	rdtsc
	shl rdx, 32
	or rax, rdx
.endm

/*
 * Wait until the u64 at [\addr] is >= \want (a register), at most about
 * 30 s by TSC, else jump to fail\code. Clobbers rax, rdx, r11.
 */
.macro WAIT_GE addr, want, code
	RDTSC64
	mov r11, rax
1098:	cmp [\addr], \want
	jae 1097f
	pause
	RDTSC64
	sub rax, r11
	shr rax, 37			/* ~30 s at a few GHz */
	jnz fail\code
	jmp 1098b
1097:
.endm
