//! The PVH entry: from 32-bit protected mode to long mode, then Rust.
//!
//! QEMU's `-kernel` boots an ELF that carries the note
//! `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name "Xen") through the x86/HVM
//! direct boot ABI (Xen's docs/misc/pvh.pandoc): "`ebx`: contains the
//! physical memory address where the loader has placed the boot start info
//! structure", "`cr0`: bit 0 (PE) must be set. All the other writeable bits
//! are cleared", "`cr4`: all bits are cleared", flat 32-bit `cs`, `ds`,
//! `es`, interrupts off. "The OS is in charge of setting up its own stack,
//! GDT and IDT."
//!
//! The stub below zeroes .bss, identity-maps the first 4 GiB with 2 MiB
//! pages, turns on PAE, SSE, long mode and paging, loads a 64-bit GDT and
//! calls `kernel_main(start_info_paddr)` on a 64 KiB stack. More of the
//! physical address space is mapped later from Rust ([`crate::paging`]).

core::arch::global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .p2align 2
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    /* 8 bytes, high half zero: QEMU versions read 4 or 8. */
    .quad pvh_start32

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi                  /* start_info, kept until kernel_main */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov $boot_stack_top, %esp

    /* PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories; 2048 2 MiB pages. */
    mov $BOOT_PDPT, %eax
    or $3, %eax
    mov %eax, BOOT_PML4
    mov $BOOT_PD, %eax
    or $3, %eax
    mov $BOOT_PDPT, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b
    mov $BOOT_PD, %edi
    mov $0x83, %eax                 /* present, writable, 2 MiB page */
    mov $2048, %ecx
2:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 2b

    mov %cr4, %eax
    or $0x620, %eax                 /* PAE, OSFXSR, OSXMMEXCPT */
    mov %eax, %cr4
    mov $BOOT_PML4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx           /* EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov %cr0, %eax
    and $0xfffffffb, %eax           /* EM off: SSE instructions run */
    or $0x80000003, %eax            /* PG, MP, PE */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    mov %esi, %edi                  /* start_info, zero-extended */
    call kernel_main
3:  hlt
    jmp 3b

    .section .rodata.boot, "a"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .p2align 12
    .global BOOT_PML4
BOOT_PML4:
    .skip 4096
    .global BOOT_PDPT
BOOT_PDPT:
    .skip 4096
BOOT_PD:
    .skip 4 * 4096
    .p2align 4
boot_stack:
    .skip 65536
boot_stack_top:
    "#,
    options(att_syntax)
);
