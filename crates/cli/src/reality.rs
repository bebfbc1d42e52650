//! Counts measured in real guests, printed next to the bench summary so that
//! the in-process figures can be checked against Linux on QEMU's device.
//!
//! Source: docs/real-guest.md, "At the final code of the session", the run
//! `REAL_GUEST_REPS=3 bash scripts/real-guest --measure` at commit ec054c5
//! (2026-11-24): Linux 6.12 guests under QEMU 10.0.2 TCG, reads at queue
//! depth 1, median of 3 boots; L = Linux's own driver in lazy (DMA-FQ)
//! mode, ours = our driver's `lazy` in the guest. Copied by hand; update
//! together with that table.

use viommu_vm::bench::Workload;

/// Where the numbers come from, printed with them.
pub const SOURCE: &str = "scripts/real-guest --measure (REAL_GUEST_REPS=3) at commit ec054c5, \
     2026-11-24, Linux 6.12 on QEMU 10.0.2 TCG, reads at QD1, median of 3 boots (docs/real-guest.md)";

/// One workload of the real-guest run that matches a bench group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// The real-guest workload name.
    pub workload: &'static str,
    /// IOMMU request-queue kicks per virtio-blk request: Linux lazy, our lazy.
    pub kicks_per_req: (f64, f64),
    /// MAP+UNMAP requests per MiB moved: Linux lazy, our lazy.
    pub requests_per_mib: (f64, f64),
}

/// The real-guest workload shaped like the bench's block group of
/// `io_size` bytes (the bench scatters data page by page, as the `-sg`
/// workloads do above 4 KiB).
pub fn for_group(workload: Workload, io_size: usize) -> Option<Measured> {
    if workload != Workload::Block {
        return None;
    }
    let m = |workload, kicks_per_req, requests_per_mib| Measured {
        workload,
        kicks_per_req,
        requests_per_mib,
    };
    match io_size {
        4096 => Some(m("read-4k-qd1", (4.014, 1.001), (2048.0, 280.0))),
        65536 => Some(m("read-64k-sg-qd1", (19.07, 1.005), (608.0, 257.6))),
        1048576 => Some(m("read-1m-sg-qd1", (260.2, 1.156), (518.0, 256.2))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_measured_block_sizes_have_figures() {
        assert_eq!(for_group(Workload::Block, 4096).unwrap().kicks_per_req.0, 4.014);
        assert_eq!(for_group(Workload::Block, 1 << 20).unwrap().workload, "read-1m-sg-qd1");
        assert_eq!(for_group(Workload::Block, 8192), None);
        assert_eq!(for_group(Workload::Net, 1500), None);
    }
}
