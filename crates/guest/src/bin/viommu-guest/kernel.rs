//! The same workloads through Linux's own virtio-blk (and virtio-iommu)
//! drivers on `/dev/vda`, for the same-run comparison.

use std::time::{Duration, Instant};

use viommu_guest::blk::BlkOp;
use viommu_guest::hugepage::HugePageHal;
use viommu_guest::kernel_boot::{self, BoundMarker};
use viommu_guest::kernel_io::{Disk, Job};
use viommu_proto::Config;

use crate::opts::{LinuxBoot, Opts};
use crate::outcome::{Outcome, Results};
use crate::workload::{mbps, measured, plan, Workload};
use crate::{BLK_BDF, BLK_QUEUE_SIZE, DISK_MIB, HUGE_PAGES, IOMMU_BDF};

/// Where `scripts/real-guest` puts the (decompressed) kernel modules.
const MODULE_DIR: &str = "/lib/modules";
/// The block device the kernel's virtio-blk creates.
const KERNEL_DISK: &str = "/dev/vda";
/// The block layer's merge switch for the disk.
const NOMERGES: &str = "/sys/block/vda/queue/nomerges";
/// The disk's virtio features as Linux negotiated them: one '0' or '1' per
/// bit, bit 0 first.
const DISK_FEATURES: &str = "/sys/block/vda/device/features";
/// VIRTIO_F_RING_PACKED.
const RING_PACKED: usize = 34;
/// Reading it sends the disk a GET_ID request (`vg.vhost=1` marks).
const SERIAL: &str = "/sys/block/vda/serial";
/// How long after loading the modules the disk may take to appear.
const DISK_WAIT: Duration = Duration::from_secs(60);
/// Pause after each workload in a lazy Linux boot, so that the UNMAPs its
/// flush queue sends up to ~10 ms later land before the next mark.
const SETTLE: Duration = Duration::from_millis(500);

/// Loads Linux's virtio-iommu (when the boot has an IOMMU) and virtio-blk,
/// and waits for the disk; checks the IOMMU domain type of the endpoint.
fn setup(boot: LinuxBoot, o: &Opts, res: &mut Results) -> Outcome<(Disk, Option<BoundMarker>)> {
    let hal = HugePageHal::new(HUGE_PAGES)?;
    let t0 = Instant::now();
    if boot.has_iommu() {
        kernel_boot::load_module(&format!("{MODULE_DIR}/virtio-iommu.ko"))?;
    }
    kernel_boot::load_module(&format!("{MODULE_DIR}/virtio_blk.ko"))?;
    kernel_boot::wait_for(KERNEL_DISK, DISK_WAIT)?;
    println!("VG INFO {KERNEL_DISK} up {:.2} s after loading modules", t0.elapsed().as_secs_f64());
    if !o.merges {
        // 2: no merging at all, so each I/O is one virtio-blk request.
        std::fs::write(NOMERGES, "2").map_err(|e| format!("write {NOMERGES}: {e}"))?;
    }
    // The packed ring keeps Linux's I/O clear of QEMU's ring-crossing bug
    // (docs/real-guest.md); with a split ring the boot would corrupt memory.
    let features = std::fs::read_to_string(DISK_FEATURES).unwrap_or_default();
    let packed = features.as_bytes().get(RING_PACKED) == Some(&b'1');
    if o.vhost {
        // The vhost-user back-end offers split rings only.
        res.check("linux-split-ring", !packed, || format!("{DISK_FEATURES}: packed ring"));
    } else {
        res.check("linux-packed-ring", packed, || {
            format!("{DISK_FEATURES}: {:?} lacks bit {RING_PACKED}", features.trim())
        });
    }
    let blk_bdf = format!("0000:{BLK_BDF}");
    let found = kernel_boot::iommu_domain_type(&blk_bdf);
    let want = boot.domain_type();
    res.check("iommu-domain-type", found.as_deref() == want, || {
        format!("{blk_bdf}: domain type {found:?}, want {want:?}")
    });
    let marker = if boot.has_iommu() && o.marks {
        Some(BoundMarker::open(IOMMU_BDF, Config::BYPASS_OFFSET)?)
    } else {
        None
    };
    Ok((Disk::open(KERNEL_DISK, hal)?, marker))
}

/// Marks the trace (with an IOMMU to mark through, unless `vg.marks=0`)
/// and, with an IOMMU, lets lazy UNMAPs land: the pauses stay without marks.
struct Marks {
    marker: Option<BoundMarker>,
    iommu: bool,
    vhost: bool,
}

impl Marks {
    fn mark(&self, name: &str) {
        if let Some(m) = &self.marker {
            println!("VG MARK {name} cfgw={}", m.mark());
        }
        if self.vhost {
            let id = std::fs::read_to_string(SERIAL);
            println!("VG VHOST-MARK {name} serial={:?}", id.map(|s| s.trim().to_string()).ok());
        }
    }

    fn settle(&self) {
        if self.iommu {
            std::thread::sleep(SETTLE);
        }
    }
}

/// One workload, then (writes) its read-back.
fn run_one(disk: &Disk, marks: &Marks, w: &Workload, cpu: bool) -> Outcome {
    let (p, calib) = measured(cpu, || disk.run(&w.job));
    let p = p?;
    println!(
        "VG PERF {} ios={} reqs={} bytes={} secs={:.3} mbps={:.1} calib_secs={calib:.6}",
        w.name,
        p.ios,
        p.ios,
        w.job.bytes,
        p.secs,
        mbps(w.job.bytes, p.secs)
    );
    marks.settle();
    if w.op() == BlkOp::Write {
        marks.mark(&format!("verify-{}", w.name));
        let v = Job { write: false, size: 1 << 20, scattered: false, qd: 32, ..w.job.clone() };
        disk.run(&v).map_err(|e| format!("read-back: {e}"))?;
        marks.settle();
    }
    Ok(())
}

/// The workload matrix through the kernel's drivers.
pub fn run(boot: LinuxBoot, o: &Opts, res: &mut Results) {
    let (disk, marker) = match setup(boot, o, res) {
        Ok(v) => v,
        Err(e) => {
            res.record::<()>(&format!("{}-setup", o.policy), Err(e));
            return;
        }
    };
    let marks = Marks { marker, iommu: boot.has_iommu(), vhost: o.vhost };
    let capacity = disk.capacity().map_err(Into::into).and_then(|c| {
        if c == DISK_MIB << 20 {
            Ok(())
        } else {
            Err(format!("capacity {c} bytes").into())
        }
    });
    res.record("blk-capacity", capacity);
    marks.settle();
    for w in plan(o, BLK_QUEUE_SIZE as usize) {
        marks.mark(&w.name);
        let r = run_one(&disk, &marks, &w, o.cpu);
        res.record(&format!("{}-{}", o.policy, w.name), r);
    }
    marks.mark("end");
}
