/* objc_msgSend for the GCC Objective-C runtime on x86-64 Linux (test builds only).
 *
 * GCC's libobjc dispatches with objc_msg_lookup(receiver, selector) -> IMP and exports no
 * objc_msgSend, while csrc/ane_runtime.m is written the Apple way: objc_msgSend cast to the
 * exact prototype of each selector. This stub keeps that code unchanged: it preserves every
 * SysV argument register (six integer, eight vector, and %al = vector-register count for
 * variadic callees), asks the runtime for the IMP, restores the registers and tail-jumps to the
 * IMP, so the method sees precisely the call the caller made and returns straight to it.
 * Stack arguments are untouched because the frame is gone before the jump. Struct returns
 * through memory (objc_msgSend_stret) are not supported; the runtime never needs them.
 */
    .text
    .p2align 4
    .globl  objc_msgSend
    .hidden objc_msgSend
    .type   objc_msgSend, @function
objc_msgSend:
    .cfi_startproc
    pushq   %rbp
    .cfi_def_cfa_offset 16
    .cfi_offset %rbp, -16
    movq    %rsp, %rbp
    .cfi_def_cfa_register %rbp
    /* 7 GPRs (56 bytes) + 8 XMMs (128 bytes) = 184, rounded to 192 to keep %rsp 16-aligned. */
    subq    $192, %rsp
    movq    %rdi,   0(%rsp)
    movq    %rsi,   8(%rsp)
    movq    %rdx,  16(%rsp)
    movq    %rcx,  24(%rsp)
    movq    %r8,   32(%rsp)
    movq    %r9,   40(%rsp)
    movq    %rax,  48(%rsp)
    movdqa  %xmm0, 64(%rsp)
    movdqa  %xmm1, 80(%rsp)
    movdqa  %xmm2, 96(%rsp)
    movdqa  %xmm3, 112(%rsp)
    movdqa  %xmm4, 128(%rsp)
    movdqa  %xmm5, 144(%rsp)
    movdqa  %xmm6, 160(%rsp)
    movdqa  %xmm7, 176(%rsp)
    /* %rdi = receiver, %rsi = selector are already in place for the lookup. */
    call    objc_msg_lookup@PLT
    movq    %rax, %r11
    movdqa  176(%rsp), %xmm7
    movdqa  160(%rsp), %xmm6
    movdqa  144(%rsp), %xmm5
    movdqa  128(%rsp), %xmm4
    movdqa  112(%rsp), %xmm3
    movdqa  96(%rsp),  %xmm2
    movdqa  80(%rsp),  %xmm1
    movdqa  64(%rsp),  %xmm0
    movq    48(%rsp), %rax
    movq    40(%rsp), %r9
    movq    32(%rsp), %r8
    movq    24(%rsp), %rcx
    movq    16(%rsp), %rdx
    movq    8(%rsp),  %rsi
    movq    0(%rsp),  %rdi
    leave
    .cfi_def_cfa %rsp, 8
    jmp     *%r11
    .cfi_endproc
    .size   objc_msgSend, .-objc_msgSend

    .section .note.GNU-stack,"",@progbits
