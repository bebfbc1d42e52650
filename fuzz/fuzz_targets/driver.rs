//! The driver against a hostile device: `VirtioIommu::new`, then a workload of domains,
//! attaches, maps, unmaps, syncs, PROBEs and event polls, while the device answers with
//! whatever the input says (used ids and lengths, statuses, properties, config values, a
//! config generation that never settles, a status that turns DEVICE_NEEDS_RESET).
//!
//! What must hold: no panic, no wait without bound (libFuzzer's -timeout catches a hang),
//! no double free of DMA memory, and the driver's own mapping tree agrees with what it
//! said succeeded.
//!
//! Input: the workload's length (2 bytes), the workload (driver options, 4 bytes, then
//! operations until its end), then the device's script (its setup, see
//! `HostileTransport::new`, then its answers as events come; once it is over, the device
//! answers every request correctly with OK).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use viommu_driver::{Domain, DriverOptions, Prot, VirtioIommu};
use viommu_fuzz::hostile::{HostileTransport, Pool, PoolHal, Script};
use viommu_fuzz::input::Input;

/// Endpoint IDs the workload names.
const ENDPOINTS: u8 = 4;

type Driver = VirtioIommu<HostileTransport, PoolHal>;

fuzz_target!(|data: &[u8]| {
    let (n, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let (workload, device) = rest.split_at(n.min(rest.len()));
    let mut work = Input::new(workload);
    let (opts, fail_after) = options(&mut work);
    let pool = Pool::fresh(fail_after);
    let transport = HostileTransport::new(Script::new(device), pool.clone());
    let Ok(drv) = note("new", VirtioIommu::new(transport, PoolHal(pool), opts)) else { return };
    let mut domains: Vec<Domain> = Vec::new();
    while !work.is_empty() {
        op(&drv, &mut domains, &mut work);
    }
});

/// Driver options: small queues, waits bounded by a poll count (so a silent device costs
/// little time), and maybe one DMA allocation that fails.
fn options(i: &mut Input) -> (DriverOptions, Option<u32>) {
    let (q, flags, spins, fail) = (i.u8(), i.u8(), i.u8(), i.u8());
    let opts = DriverOptions {
        bypass: flags & 1 != 0,
        event_idx: flags & 2 == 0,
        indirect_desc: flags & 4 == 0,
        request_queue_size: 2 << (q % 6),
        event_buffers: 1 << (q / 8 % 5),
        sw_msi: (flags & 8 == 0).then_some((0x0800_0000, 0x080f_ffff)),
        spin_limit: 2 + u64::from(spins % 64),
        timeout: Some(Duration::from_secs(1)),
        max_probe_size: 4096,
        event_budget: 1 + u32::from(flags >> 5),
        ..DriverOptions::default()
    };
    (opts, (fail != 0).then(|| u32::from(fail)))
}

/// One workload operation: an opcode byte and its arguments.
fn op(drv: &Driver, domains: &mut Vec<Domain>, i: &mut Input) {
    let code = i.u8();
    let ep = u32::from(i.u8() % ENDPOINTS);
    let pick = |domains: &Vec<Domain>, b: u8| {
        (!domains.is_empty()).then(|| usize::from(b) % domains.len())
    };
    match code % 10 {
        0 if domains.len() < 4 => domains.extend(note("paging", drv.alloc_paging(ep))),
        1 if domains.len() < 4 => domains.extend(note("identity", drv.alloc_identity(ep))),
        2 if domains.len() < 4 => domains.extend(note("blocking", drv.alloc_blocking())),
        3 => {
            if let Some(d) = pick(domains, i.u8()) {
                let _ = note("attach", drv.attach(&domains[d], ep));
            }
        }
        4 => {
            let _ = note("detach", drv.detach(ep));
        }
        5 => {
            let Some(d) = pick(domains, i.u8()) else { return };
            map(&domains[d], i);
        }
        6 => {
            let Some(d) = pick(domains, i.u8()) else { return };
            let g = domains[d].granule();
            let (page, pages) = (u64::from(i.u8()), u64::from(i.u8() % 16));
            let _ =
                note("unmap", domains[d].unmap_pages(page.wrapping_mul(g), pages.wrapping_mul(g)));
        }
        7 => {
            let Some(d) = pick(domains, i.u8()) else { return };
            let _ = note(
                "sync",
                match i.u8() % 3 {
                    0 => domains[d].iotlb_sync(),
                    1 => domains[d].iotlb_sync_map(0, u64::MAX),
                    _ => domains[d].flush_iotlb_all(),
                },
            );
        }
        8 => {
            let _ = match i.u8() % 3 {
                0 => note("probe", drv.probe_endpoint(ep).map(|r| r.len())),
                1 => note("poll_events", drv.poll_events()),
                _ => note("interrupt", drv.handle_interrupt()),
            };
        }
        _ => {
            if let Some(d) = pick(domains, i.u8()) {
                domains.swap_remove(d);
            }
        }
    }
}

/// A MAP of a few granules; if the driver says it worked, its tree must say so too.
fn map(domain: &Domain, i: &mut Input) {
    let g = domain.granule();
    let (page, pages, phys, prot) = (u64::from(i.u8()), u64::from(i.u8() % 16), i.u16(), i.u8());
    let (iova, paddr, size) =
        (page.wrapping_mul(g), u64::from(phys).wrapping_mul(g), pages.wrapping_mul(g));
    if note("map", domain.map_pages(iova, paddr, size, Prot(u32::from(prot % 8)))).is_ok() {
        assert_eq!(domain.iova_to_phys(iova), Some(paddr), "a mapping the driver reported made");
    }
}

/// With `VIOMMU_FUZZ_DEBUG` set (when replaying one input), prints each call's result.
fn note<T>(what: &str, r: viommu_driver::Result<T>) -> viommu_driver::Result<T> {
    if std::env::var_os("VIOMMU_FUZZ_DEBUG").is_some() {
        eprintln!("{what}: {:?}", r.as_ref().map(|_| ()));
    }
    r
}
