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
mod batch;
mod boot;
mod clock;
mod iommu;
mod memory;
mod platform;
mod rt;
mod serial;
mod traps;
mod vdrivers;
mod workload;

use alloc::string::String;
use alloc::sync::Arc;

use viommu_driver::Mode;

use crate::workload::{boot_tag, Workload};

/// `isa-debug-exit` codes: QEMU exits with `code << 1 | 1`, so 33 and 35.
const EXIT_PASS: u8 = 0x10;
/// Some test failed.
pub const EXIT_FAIL: u8 = 0x11;

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
    traps::init();
    memory::init();
    println!("VG BOOTED baremetal heap={} MiB", memory::HEAP_BYTES >> 20);
    let mut res = Results::default();
    if let Err(e) = run(start_info as u64, &mut res) {
        res.record("setup", Err(e));
    }
    println!("VG INFO heap_used={}", memory::heap_used());
    println!("VG DONE passed={} failed={}", res.passed, res.failed);
    arch::exit(if res.failed == 0 && res.passed > 0 { EXIT_PASS } else { EXIT_FAIL })
}

/// Finds the devices, brings up the IOMMU driver, runs the block paths.
fn run(start_info: u64, res: &mut Results) -> Result<(), String> {
    let p = platform::discover(start_info, res)?;
    let clock = Arc::new(clock::Clock::new(p.timer));
    let marker = p
        .iommu
        .transport
        .marker(viommu_proto::Config::BYPASS_OFFSET as u64)
        .ok_or("the virtio-iommu has no device config")?;
    let rig = iommu::bring_up(
        "iommu",
        p.iommu.transport,
        memory::HeapHal,
        marker,
        p.blk_endpoint,
        clock.clone(),
        res,
    )?;
    let tag = boot_tag();
    let workloads = [
        Workload::read("batch-read-4k", 4096, 256),
        Workload::read("batch-read-64k", 64 << 10, 64),
        Workload::read("batch-read-64k-sg", 64 << 10, 64).scattered(),
        Workload::write("batch-write-4k", 4096, 64, tag ^ 1),
        Workload::read("batch-read-4k-qd8", 4096, 256).qd(8),
    ];
    let r = batch::run(&rig, p.blk.transport, Mode::Best, &workloads, true, res);
    // virtio-drivers' VirtIOBlk on the same device and domain, through the adapters.
    let vd = [
        Workload::read("read-4k", 4096, 128),
        Workload::read("read-64k", 64 << 10, 32),
        Workload::write("write-4k", 4096, 32, tag ^ 2),
    ];
    let r = r.and_then(|()| vdrivers::run(&rig, p.blk_bdf, &vd, res));
    // The negative test took its own faults: none may come from the workloads.
    let f = rig.take_faults(100_000_000);
    res.record("no-faults", if f.count == 0 { Ok(()) } else { Err(alloc::format!("{f:?}")) });
    if let Err(e) = r {
        rig.mark("end");
        return Err(e);
    }
    // Then the driver itself on virtio-drivers' transport and HAL, on the
    // same devices (reset), with the hand-built path.
    let rig2 = vdrivers::bring_up_on_vd(p.iommu_bdf, rig.marker(), p.blk_endpoint, clock, res);
    let r = rig2.and_then(|rig2| {
        let blk = platform::open(&mut arch::PortConfig, p.blk_bdf)?;
        let w = [
            Workload::read("vdt-batch-read-4k", 4096, 64),
            Workload::write("vdt-batch-write-4k", 4096, 32, tag ^ 3),
        ];
        let r = batch::run(&rig2, blk.transport, Mode::Best, &w, false, res);
        let f = rig2.take_faults(100_000_000);
        res.record(
            "vd-iommu-no-faults",
            if f.count == 0 { Ok(()) } else { Err(alloc::format!("{f:?}")) },
        );
        r
    });
    rig.mark("end");
    r
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("VG FAIL panic {info}");
    arch::exit(EXIT_FAIL)
}
