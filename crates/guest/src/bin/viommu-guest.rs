//! The real-guest test program (see `scripts/real-guest`).
//!
//! - `viommu-guest gen-disk FILE`: writes the known pattern (host side);
//! - `viommu-guest run`: the tests, inside the guest; options from /proc/cmdline.

use std::io::Write;

use viommu_guest::pattern;

/// Size of the disk image: the read region, then the write region.
const DISK_MIB: u64 = 128;

fn gen_disk(path: &str) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..DISK_MIB {
        pattern::fill(&mut buf, mib << 20, pattern::DISK_TAG);
        f.write_all(&buf)?;
    }
    f.flush()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("gen-disk") if args.len() == 3 => {
            if let Err(e) = gen_disk(&args[2]) {
                eprintln!("gen-disk: {e}");
                std::process::exit(1);
            }
        }
        Some("run") => smoke(),
        _ => {
            eprintln!("usage: viommu-guest gen-disk FILE | run");
            std::process::exit(2);
        }
    }
}

fn smoke() {
    use viommu_driver::Transport;
    for bdf in ["00:04.0", "00:05.0"] {
        let mut t = match viommu_guest::virtio_pci::PciTransport::open(bdf) {
            Ok(t) => t,
            Err(e) => {
                println!("VG FAIL open-{bdf} {e}");
                continue;
            }
        };
        t.set_status(0);
        let f = t.device_features();
        let mut cfg = [0u8; 40];
        t.read_config(0, &mut cfg);
        println!("VG INFO {bdf} features={f:#x} queues={} q0max={} cfg={cfg:02x?}", t.num_queues(), t.max_queue_size(0));
    }
    let hal = viommu_guest::hugepage::HugePageHal::new(4).unwrap();
    use viommu_driver::Hal;
    let r = hal.dma_alloc(2).unwrap();
    println!("VG INFO dma {:#x}", r.bus_addr);
    println!("VG DONE");
}
