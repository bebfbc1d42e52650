//! CPU exceptions: an IDT for vectors 0-31 whose handlers print the vector,
//! error code, RIP and CR2 as a `VG FAIL` line and exit, so a fault in the
//! guest (a bad pointer, a wild jump) ends the run with a reason instead of
//! a triple fault and a silent reset. Interrupts stay off throughout.

use core::arch::{asm, global_asm};

// One stub per vector: the vectors with an error code (8, 10-14, 17, 21,
// 29, 30) have it on the stack already; the others push a 0 in its place.
global_asm!(
    r#"
    .section .text.traps, "ax"
    .macro exc_noerr v
exc_\v:
    push $0
    push $\v
    jmp exc_common
    .endm
    .macro exc_err v
exc_\v:
    push $\v
    jmp exc_common
    .endm
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    exc_noerr \v
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    exc_err \v
    .endr
exc_common:
    mov (%rsp), %rdi            /* vector */
    mov 8(%rsp), %rsi           /* error code */
    mov 16(%rsp), %rdx          /* RIP the CPU pushed */
    and $-16, %rsp
    call exception
    ud2

    .section .rodata.traps, "a"
    .p2align 3
    .global exc_table
exc_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_\v
    .endr
    "#,
    options(att_syntax)
);

extern "C" {
    static exc_table: [u64; 32];
}

#[repr(C, align(16))]
struct Idt([u64; 64]);

static mut IDT: Idt = Idt([0; 64]);

/// The operand of `lidt`: limit, then base.
#[repr(C, packed)]
struct IdtPtr {
    limit: u16,
    base: u64,
}

/// Loads the IDT. Call once, early.
pub fn init() {
    // SAFETY: one CPU, interrupts off: nothing reads the IDT while it is
    // written; the stubs' addresses come from the table above.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, &handler) in (*core::ptr::addr_of!(exc_table)).iter().enumerate() {
            // A 64-bit interrupt gate (type 0xe, present) in code segment 0x08.
            idt.0[2 * v] = (handler & 0xffff)
                | 0x08 << 16
                | 0x8e00_u64 << 32
                | ((handler >> 16) & 0xffff) << 48;
            idt.0[2 * v + 1] = handler >> 32;
        }
        let ptr = IdtPtr { limit: (64 * 8 - 1) as u16, base: idt.0.as_ptr() as u64 };
        asm!("lidt [{0}]", in(reg) &ptr, options(readonly, nostack));
    }
}

#[no_mangle]
extern "C" fn exception(vector: u64, error: u64, rip: u64) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 (the last page-fault address) has no side effects.
    unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack)) }
    crate::println!("VG FAIL exception vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x}");
    crate::arch::exit(crate::EXIT_FAIL)
}
