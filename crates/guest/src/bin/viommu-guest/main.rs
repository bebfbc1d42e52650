//! The real-guest test program (see `scripts/real-guest` and docs/real-guest.md).
//!
//! - `viommu-guest gen-disk FILE`: writes the known disk pattern (on the host);
//! - `viommu-guest run`: the tests, inside the guest, with options from
//!   /proc/cmdline ([`opts`]): `vg.policy=` one of our modes (`identity`,
//!   `strict-every-sync`, `strict`, `lazy`, `lazy-single`, `best`) or
//!   Linux's drivers (`linux-none`, `linux-lazy`, `linux-strict`),
//!   `vg.mib=N` (MiB per workload), `vg.neg=0|1` (negative tests), and more.
//!
//! Output lines for the host script, all starting with `VG `:
//! `PASS name`, `FAIL name: why`, `MARK name cfgw=K` (the K-th traced config
//! write starts workload `name`), `PERF name k=v...` (the guest's counters),
//! `SAMPLE` (before and after each workload: the host samples QEMU's CPU
//! time), `DONE passed=N failed=N`.
//!
//! One module per job: [`opts`] (options), [`rig`] (our drivers' setup),
//! [`workload`] (the matrix and its buffers), [`io`] (the I/O loop),
//! [`kernel`] (Linux's drivers), [`negative`] (negative tests), [`outcome`]
//! (errors and PASS/FAIL lines).
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

mod io;
mod kernel;
mod negative;
mod opts;
mod outcome;
mod rig;
mod workload;

use std::io::Write;
use std::time::Duration;

use viommu_guest::blk::VirtioBlk;
use viommu_guest::hugepage::HugePageHal;
use viommu_guest::pattern;
use viommu_guest::virtio_pci::PciTransport;

use opts::{Opts, Policy};
use outcome::Results;

const IOMMU_BDF: &str = "00:04.0";
const BLK_BDF: &str = "00:05.0";
/// Requester ID of 00:05.0.
const BLK_ENDPOINT: u32 = 0x28;
/// Entries of the virtio-blk queue (QEMU runs with `queue-size=1024`).
const BLK_QUEUE_SIZE: u16 = 1024;
/// Size of the disk image: the read region, then the write region.
const DISK_MIB: u64 = 128;
const READ_BASE: u64 = 0;
const WRITE_BASE: u64 = 64 << 20;
/// How long a request may take before we call it stuck (TCG is slow).
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// 2 MiB pages of DMA memory the HAL may take (the init script reserves 64).
const HUGE_PAGES: usize = 60;

/// Our virtio-blk driver on QEMU's device.
type Blk = VirtioBlk<PciTransport, HugePageHal>;

fn gen_disk(path: &str) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..DISK_MIB {
        pattern::fill(&mut buf, mib << 20, pattern::DISK_TAG);
        f.write_all(&buf)?;
    }
    f.flush()
}

/// A boot of our drivers: setup, the workloads, then (strict boot) the
/// negative tests.
fn run_ours(mode: viommu_driver::Mode, o: &Opts, res: &mut Results) {
    let (rig, mut blk, mut m) = match rig::setup(mode, o.irq, res) {
        Ok(v) => v,
        Err(e) => {
            res.record::<()>(&format!("{}-setup", o.policy), Err(e));
            return;
        }
    };
    res.check("blk-capacity", blk.capacity() == DISK_MIB << 20, || {
        format!("capacity {} bytes", blk.capacity())
    });
    io::run_workloads(&rig, &mut blk, m.as_mut(), o, res);
    if o.neg && rig.iommu.is_some() {
        negative::run(&rig, blk, m.as_mut(), res);
    }
}

fn run() -> Results {
    let mut res = Results::default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let o = match Opts::from_cmdline(&cmdline) {
        Ok(o) => o,
        Err(e) => {
            res.record::<()>("options", Err(e.into()));
            return res;
        }
    };
    println!("VG INFO options {o:?}");
    match o.policy {
        Policy::Linux(boot) => kernel::run(boot, &o, &mut res),
        Policy::Ours(mode) => run_ours(mode, &o, &mut res),
    }
    res
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
        Some("run") => {
            let res = run();
            println!("VG DONE passed={} failed={}", res.passed, res.failed);
            std::process::exit(if res.failed == 0 { 0 } else { 1 });
        }
        _ => {
            eprintln!("usage: viommu-guest gen-disk FILE | run");
            std::process::exit(2);
        }
    }
}
