//! What a hosted target's libc would give the compiler: `memcpy`,
//! `memmove`, `memset`, `memcmp` and `bcmp` (the prebuilt
//! `compiler_builtins` of x86_64-unknown-linux-gnu leaves them to libc),
//! and `_Unwind_Resume` and `rust_eh_personality`, which the prebuilt
//! `alloc` names although nothing here unwinds (panic = "abort": a panic ends the run, see `main.rs`).
//!
//! Written in assembly with the string instructions, so the compiler
//! cannot turn their loops back into calls to themselves.

core::arch::global_asm!(
    r#"
    .section .text.rt, "ax"
    .global memcpy
memcpy:                         /* rdi = dst, rsi = src, rdx = n */
    mov %rdi, %rax
    mov %rdx, %rcx
    rep movsb
    ret

    .global memmove
memmove:
    mov %rdi, %rax
    mov %rdx, %rcx
    cmp %rsi, %rdi
    jbe 1f                      /* dst below src: copy forwards */
    lea -1(%rsi,%rdx), %rsi     /* else backwards, from the last byte */
    lea -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

    .global memset
memset:                         /* rdi = dst, esi = byte, rdx = n */
    mov %rdi, %r8
    mov %esi, %eax
    mov %rdx, %rcx
    rep stosb
    mov %r8, %rax
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:                           /* rdi = a, rsi = b, rdx = n */
    xor %eax, %eax
    mov %rdx, %rcx
    test %rcx, %rcx
    jz 2f
    repe cmpsb
    je 2f
    movzbl -1(%rdi), %eax
    movzbl -1(%rsi), %edx
    sub %edx, %eax
2:  ret

    .global _Unwind_Resume
    .global rust_eh_personality
_Unwind_Resume:
rust_eh_personality:
    ud2
    "#,
    options(att_syntax)
);
