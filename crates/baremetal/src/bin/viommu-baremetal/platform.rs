//! What the machine has: the PVH start info, ACPI (VIOT, FADT's PM timer),
//! and the two virtio-pci functions, with their transports.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use viommu_baremetal::acpi::{PmTimer, Rsdp, Tables};
use viommu_baremetal::pci::{self, regs, Bdf, ConfigSpace, Function};
use viommu_baremetal::pvh::{StartInfo, LEN as START_INFO_LEN};
use viommu_baremetal::virtio_pci::{PciTransport, Window};
use viommu_driver::topology::viot::{Viot, ViotIommu};

use crate::arch::{PhysMmio, PortConfig};
use crate::memory::{map_mmio, FirmwareMemory};
use crate::println;

/// Vendor ID of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device IDs are 0x1040 + the virtio device ID (§4.1.2.1).
pub const IOMMU_DEVICE: u16 = 0x1040 + 23;
/// Modern virtio-blk.
pub const BLK_DEVICE: u16 = 0x1040 + 2;

/// A virtio-pci function, ready to drive.
pub struct VirtioFunction {
    /// Its transport.
    pub transport: PciTransport<PhysMmio>,
}

/// Everything the tests need from the firmware and the bus.
pub struct Platform {
    /// The PM timer, the clock.
    pub timer: Option<PmTimer>,
    /// The virtio-iommu.
    pub iommu: VirtioFunction,
    /// The virtio-blk endpoint.
    pub blk: VirtioFunction,
    /// Where the virtio-iommu function is.
    pub iommu_bdf: Bdf,
    /// Where the virtio-blk function is.
    pub blk_bdf: Bdf,
    /// The endpoint ID of the virtio-blk function, from the VIOT.
    pub blk_endpoint: u32,
}

/// Reads the start info, ACPI and PCI; each step prints a PASS or FAIL.
pub fn discover(start_info: u64, res: &mut crate::Results) -> Result<Platform, String> {
    let mut b = [0u8; START_INFO_LEN];
    let mem = FirmwareMemory;
    if !viommu_baremetal::acpi::PhysMem::read(&mem, start_info, &mut b) {
        return Err(format!("start info at {start_info:#x} is not readable"));
    }
    let start = StartInfo::parse(&b).map_err(|e| format!("start info: {e:?}"))?;
    println!(
        "VG INFO pvh start_info={start_info:#x} version={} rsdp={:#x} memmap_entries={}",
        start.version, start.rsdp_paddr, start.memmap_entries
    );
    res.record(
        "pvh-start-info",
        if start.rsdp_paddr != 0 { Ok(()) } else { Err("no RSDP".into()) },
    );

    let rsdp = Rsdp::read(&mem, start.rsdp_paddr).map_err(|e| format!("RSDP: {e:?}"))?;
    let tables = Tables::read(&mem, &rsdp).map_err(|e| format!("RSDT/XSDT: {e:?}"))?;
    let viot_bytes = tables.find(&mem, b"VIOT").map_err(|e| format!("VIOT: {e:?}"))?;
    let viot = Viot::parse(&viot_bytes).map_err(|e| format!("VIOT: {e}"))?;
    let timer = tables.find(&mem, b"FACP").ok().and_then(|f| PmTimer::from_fadt(&f));
    println!(
        "VG INFO acpi revision={} root={} tables={} viot_bytes={} viot_iommus={} viot_endpoints={} pm_timer={:?}",
        rsdp.revision,
        if tables.xsdt { "XSDT" } else { "RSDT" },
        tables.entries.len(),
        viot_bytes.len(),
        viot.iommus().len(),
        viot.endpoints().len(),
        timer
    );
    res.record("acpi-viot", Ok(()));

    let mut cs = PortConfig;
    let funcs = pci::scan(&mut cs);
    for f in &funcs {
        println!("VG INFO pci {} {:04x}:{:04x} class={:06x}", f.bdf, f.vendor, f.device, f.class);
    }
    let find = |device: u16| -> Result<Function, String> {
        let mut it = funcs.iter().filter(|f| f.vendor == VIRTIO_VENDOR && f.device == device);
        match (it.next(), it.next()) {
            (Some(f), None) => Ok(*f),
            (None, _) => Err(format!("no {VIRTIO_VENDOR:04x}:{device:04x} on the bus")),
            (Some(_), Some(_)) => Err(format!("more than one {VIRTIO_VENDOR:04x}:{device:04x}")),
        }
    };
    let (iommu_fn, blk_fn) = (find(IOMMU_DEVICE)?, find(BLK_DEVICE)?);
    res.record("pci-virtio-devices", Ok(()));

    // The VIOT names the IOMMU and the blk function's endpoint ID.
    let Some((blk_endpoint, behind)) = viot.pci_endpoint(0, blk_fn.bdf.rid()) else {
        return Err(format!("the VIOT puts {} behind no IOMMU", blk_fn.bdf));
    };
    let want = ViotIommu::Pci { segment: 0, bdf: iommu_fn.bdf.rid() };
    res.record(
        "viot-endpoint",
        if behind == want {
            Ok(())
        } else {
            Err(format!("VIOT names {behind:?} for {}, the bus has {want:?}", blk_fn.bdf))
        },
    );
    println!(
        "VG INFO viot {} is endpoint {blk_endpoint:#x} of the IOMMU at {}",
        blk_fn.bdf, iommu_fn.bdf
    );

    let iommu = open(&mut cs, iommu_fn.bdf)?;
    let blk = open(&mut cs, blk_fn.bdf)?;
    Ok(Platform { timer, iommu, blk, iommu_bdf: iommu_fn.bdf, blk_bdf: blk_fn.bdf, blk_endpoint })
}

/// Enables a function (memory space, bus mastering, INTx off), maps its
/// BARs and builds its transport.
pub fn open(cs: &mut dyn ConfigSpace, bdf: Bdf) -> Result<VirtioFunction, String> {
    let caps = pci::virtio_caps(&pci::capabilities(cs, bdf)).map_err(|e| format!("{bdf}: {e}"))?;
    let bars = pci::memory_bars(cs, bdf);
    for r in [Some(caps.common), Some(caps.notify), caps.device].into_iter().flatten() {
        let w = Window::of(r, &bars).ok_or_else(|| format!("{bdf}: BAR {} unassigned", r.bar))?;
        if !map_mmio(w.base, w.len) {
            return Err(format!("{bdf}: cannot map {:#x}+{:#x}", w.base, w.len));
        }
    }
    cs.set_command(bdf, regs::CMD_MEM | regs::CMD_BUS_MASTER | regs::CMD_INTX_DISABLE);
    let transport = PciTransport::new(PhysMmio, &caps, &bars)
        .ok_or_else(|| format!("{bdf}: virtio structures outside the BARs"))?;
    let bars: Vec<String> = bars
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.map(|b| format!("{i}:{:#x}+{:#x}", b.addr, b.size)))
        .collect();
    println!("VG INFO {bdf} bars {} queues={}", bars.join(" "), transport.num_queues());
    Ok(VirtioFunction { transport })
}
