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
        _ => {
            eprintln!("usage: viommu-guest gen-disk FILE | run");
            std::process::exit(2);
        }
    }
}
