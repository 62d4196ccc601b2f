/*
 * adv_gather: AVX2 gathers (VSIB) whose elements lie in eight different
 * 2 MiB windows, 4 MiB apart: element k at G(k) = ram_base + k * 4 MiB +
 * 2 MiB - 4096 + 4 * k (one page below a window boundary).
 *   2 vpgatherdd from fresh pages: every element 0, mask cleared
 *   3 vpgatherqq from fresh pages (other offsets, +2048): 0, mask cleared
 * Then a pattern is written at G(k) and G(k) + 8 by scalar stores and the
 * RAM's slots are taken away (pages stay populated, slot-less):
 *   4 vpgatherdd: element k == pattern(k), mask cleared
 *   5 vgatherdps with elements 1, 3, 5 masked off and their indices
 *     pointing past the end of RAM: active elements exact, masked-off
 *     elements keep the destination's old value
 *   6 vpgatherdd with element k at G(k) + 4094 + 1024 * k, straddling a
 *     page boundary for k = 0 (fresh pages): values exact (0 for fresh
 *     halves)
 * pattern(k) = 0xa5000000 + k. Exit codes: 1 RAM < 40 MiB, 2..6 the case
 * above, 7 mask not cleared, 100 no AVX2.
 */
#include "adv.h"

#define G(k) ((k) * 4 * MiB + 2 * MiB - 4096 + 4 * (k))

ENTRY
	mov r12, rdi			/* RAM base */
	mov r13, rsi
	cmp r13, 40 * MiB
	jb fail1
	NEED_AVX2 100

	/* 2: dword indices (byte offsets / 1, scale 1) */
	vmovdqu ymm1, [rip + idx]
	vpcmpeqd ymm2, ymm2, ymm2	/* mask */
	vpcmpeqd ymm0, ymm0, ymm0	/* destination: ones */
	vpgatherdd ymm0, [r12 + ymm1 * 1], ymm2
	vptest ymm0, ymm0
	jnz fail2
	vptest ymm2, ymm2
	jnz fail7

	/* 3: qword indices, 4 elements at G(k) + 2048, k = 4..7 */
	vmovdqu ymm1, [rip + idxq]
	vpcmpeqd ymm2, ymm2, ymm2
	vpcmpeqd ymm0, ymm0, ymm0
	vpgatherqq ymm0, [r12 + ymm1 * 1], ymm2
	vptest ymm0, ymm0
	jnz fail3
	vptest ymm2, ymm2
	jnz fail7

	/* write the patterns, then take the slots away */
	lea rsi, [rip + idx]
	xor ecx, ecx
1:	movsxd rax, dword ptr [rsi + rcx * 4]
	lea edx, [rcx + 0xa5000000]
	mov [r12 + rax], edx
	mov [r12 + rax + 8], edx
	inc ecx
	cmp ecx, 8
	jb 1b
	DROP_SLOTS r12, r13

	/* 4 */
	vmovdqu ymm1, [rip + idx]
	vpcmpeqd ymm2, ymm2, ymm2
	vpxor ymm0, ymm0, ymm0
	vpgatherdd ymm0, [r12 + ymm1 * 1], ymm2
	vptest ymm2, ymm2
	jnz fail7
	vmovdqu ymm3, [rip + want]
	vpcmpeqd ymm4, ymm0, ymm3
	vpmovmskb eax, ymm4
	cmp eax, -1
	jne fail4
	DROP_SLOTS r12, r13

	/* 5: odd elements masked off, their indices past the end of RAM */
	vmovdqu ymm1, [rip + idx]
	mov eax, r13d
	add eax, 4096
	vmovd xmm5, eax
	vpbroadcastd ymm5, xmm5
	vmovdqu ymm6, [rip + odd]	/* -1 in odd elements */
	vpand ymm5, ymm5, ymm6
	vpandn ymm1, ymm6, ymm1		/* even: G(k), odd: 0 */
	vpor ymm1, ymm1, ymm5		/* odd: RAM size + 4096 */
	vpxor ymm2, ymm6, [rip + ones]	/* mask: even elements */
	vmovdqu ymm0, [rip + old]
	vgatherdps ymm0, [r12 + ymm1 * 1], ymm2
	vptest ymm2, ymm2
	jnz fail7
	vmovdqu ymm3, [rip + want]
	vpblendvb ymm3, ymm3, [rip + old], ymm6
	vpcmpeqd ymm4, ymm0, ymm3
	vpmovmskb eax, ymm4
	cmp eax, -1
	jne fail5

	/* 6: element 0 straddles G(0) + 4094 (its page is populated, the next one fresh) */
	vmovdqu ymm1, [rip + idx6]
	vpcmpeqd ymm2, ymm2, ymm2
	vpcmpeqd ymm0, ymm0, ymm0
	vpgatherdd ymm0, [r12 + ymm1 * 1], ymm2
	vptest ymm2, ymm2
	jnz fail7
	vptest ymm0, ymm0		/* every element reads zero bytes */
	jnz fail6
	vzeroupper
	EXIT(0)

FAIL(1)
FAIL(2)
FAIL(3)
FAIL(4)
FAIL(5)
FAIL(6)
FAIL(7)
FAIL(100)

	.section .rodata
	.balign 32
idx:	.long G(0), G(1), G(2), G(3), G(4), G(5), G(6), G(7)
idxq:	.quad G(4) + 2048, G(5) + 2048, G(6) + 2048, G(7) + 2048
want:	.long 0xa5000000, 0xa5000001, 0xa5000002, 0xa5000003
	.long 0xa5000004, 0xa5000005, 0xa5000006, 0xa5000007
odd:	.long 0, -1, 0, -1, 0, -1, 0, -1
ones:	.long -1, -1, -1, -1, -1, -1, -1, -1
old:	.long 0x01010101, 0x02020202, 0x03030303, 0x04040404
	.long 0x05050505, 0x06060606, 0x07070707, 0x08080808
idx6:	.long G(0) + 4094, G(1) + 1024 + 12, G(2) + 2048 + 12, G(3) + 3072 + 12
	.long G(4) + 12, G(5) + 1024 + 12, G(6) + 2048 + 12, G(7) + 3072 + 12
