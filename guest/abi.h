/*
 * guestmm test-guest ABI, shared by every guest/*.S (C preprocessor).
 * Keep in step with src/vmm/boot.rs and src/vmm/hypercall.rs.
 *
 * Entry (64-bit mode, CPL3, IOPL3, no IDT: any exception is a triple fault):
 *   rdi = RAM base GPA     rsi = RAM size        rdx = vCPU index
 *   rcx = vCPU count       r8  = template base   r9  = template size
 *   r10 = HOLE_GPA (identity-mapped, never backed: accesses are MMIO exits)
 *   rsp = top of this vCPU's 64 KiB stack minus 8
 * Memory is identity-mapped (virtual == guest-physical) with 2 MiB pages.
 *
 * Hypercalls are `out imm8, reg` (immediate port, so rdx is free); allowed
 * at CPL3 by IOPL=3 and by the TSS I/O bitmap (PVM hosts emulate `out` and
 * consult the bitmap):
 *   CONSOLE  out 0x10, al    one byte
 *   EXIT     out 0x11, eax   0 = pass, else number of the failed check
 *   MARK     out 0x12, eax   phase marker
 *   PROTECT  out 0x13, al    rdi = gpa, rsi = len, rdx = perms (1 r, 2 w, 4 x)
 *   MAP_TEMPLATE out 0x14, al  rdi = gpa, rsi = len
 *   SET_CR3  out 0x15, al    rdi = new CR3
 */
#define PORT_CONSOLE 0x10
#define PORT_EXIT 0x11
#define PORT_MARK 0x12
#define PORT_PROTECT 0x13
#define PORT_MAP_TEMPLATE 0x14
#define PORT_SET_CR3 0x15

#define PERM_READ 1
#define PERM_WRITE 2
#define PERM_EXEC 4

/* GPA of the boot page tables' PML4 (BootLayout: PML4_GPA). */
#define BOOT_PML4 0x300000

#define MiB 0x100000

	.intel_syntax noprefix
	.section .note.GNU-stack, "", @progbits

/* Stop with an immediate exit code; a VMM that resumes gets a #UD (Shutdown). */
#define EXIT(code) mov eax, code; out PORT_EXIT, eax; ud2
#define MARK(n) mov eax, n; out PORT_MARK, eax
/* fail<n>: exit with code n. */
#define FAIL(n) fail##n: EXIT(n)

/* Guest entry point: first byte of the image (guest.ld puts .text.start first). */
#define ENTRY .section .text.start, "ax"; .globl _start; _start:

/*
 * A pseudo-random visiting order over rbx items (touch, scatter): a
 * full-period LCG over m = the next power of two >= rbx, values >= rbx
 * skipped. LCG_INIT sets r14 = m, r15 = m - 1, r9/r10 = multiplier and
 * increment, r11 = 0; LCG_NEXT advances r11 and jumps to `skip` when it is
 * not a valid index. Run LCG_NEXT m times to visit every index exactly once.
 */
#define LCG_A 0x5851f42d4c957f2d
#define LCG_C 0x14057b7ef767814f
.macro LCG_INIT
	mov r14, 1
1001:	cmp r14, rbx
	jae 1002f
	shl r14, 1
	jmp 1001b
1002:	lea r15, [r14 - 1]
	movabs r9, LCG_A
	movabs r10, LCG_C
	xor r11d, r11d
.endm
.macro LCG_NEXT skip
	imul r11, r9
	add r11, r10
	and r11, r15
	cmp r11, rbx
	jae \skip
.endm
