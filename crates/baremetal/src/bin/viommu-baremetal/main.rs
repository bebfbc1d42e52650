//! The bare-metal guest: a freestanding x86_64 program that QEMU boots with
//! `-kernel` through the PVH entry. It finds QEMU's virtio-iommu-pci and
//! virtio-blk-pci from ACPI and PCI, brings up viommu-driver on them, runs
//! block I/O through the IOMMU with every byte checked, and prints
//! `VG PASS`/`VG FAIL` lines and counters for scripts/real-guest. See
//! docs/real-guest.md, "Bare metal".
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod arch;
mod boot;
mod memory;
mod platform;
mod rt;
mod serial;

use alloc::string::String;

/// `isa-debug-exit` codes: QEMU exits with `code << 1 | 1`, so 33 and 35.
const EXIT_PASS: u8 = 0x10;
const EXIT_FAIL: u8 = 0x11;

/// PASS and FAIL counts.
#[derive(Default)]
pub struct Results {
    passed: u32,
    failed: u32,
}

impl Results {
    /// Prints `VG PASS name` or `VG FAIL name why` and counts it.
    pub fn record(&mut self, name: &str, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.passed += 1;
                println!("VG PASS {name}");
            }
            Err(why) => {
                self.failed += 1;
                println!("VG FAIL {name} {why}");
            }
        }
    }
}

#[no_mangle]
extern "C" fn kernel_main(start_info: u32) -> ! {
    serial::init();
    memory::init();
    println!("VG BOOTED baremetal heap={} MiB", memory::HEAP_BYTES >> 20);
    let mut res = Results::default();
    match platform::discover(start_info as u64, &mut res) {
        Ok(_p) => {}
        Err(e) => res.record("discover", Err(e)),
    }
    println!("VG INFO heap_used={}", memory::heap_used());
    println!("VG DONE passed={} failed={}", res.passed, res.failed);
    arch::exit(if res.failed == 0 && res.passed > 0 { EXIT_PASS } else { EXIT_FAIL })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("VG FAIL panic {info}");
    arch::exit(EXIT_FAIL)
}
