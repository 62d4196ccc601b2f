/* hello: prints "hello from guestmm\n" through CONSOLE and exits 0. */
#include "abi.h"

ENTRY
	lea rsi, [rip + msg]
1:	lodsb
	test al, al
	jz 2f
	out PORT_CONSOLE, al
	jmp 1b
2:	EXIT(0)

	.section .rodata
msg:	.asciz "hello from guestmm\n"
