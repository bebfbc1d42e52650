//! Random sequences of domain operations, attach/detach and injected device
//! failures. After every step with no failure pending, the device's mappings
//! must equal the driver's tree (or the device must not know the domain).

mod common;

use common::*;
use viommu_driver::fake::{InjectReply, Injection};
use viommu_driver::{Error, Prot};
use viommu_proto::{RequestType, Status};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TYPES: [RequestType; 4] =
    [RequestType::Attach, RequestType::Detach, RequestType::Map, RequestType::Unmap];
const REPLIES: [InjectReply; 6] = [
    InjectReply::Status(Status::Range),
    InjectReply::Status(Status::Inval),
    InjectReply::Status(Status::NoMem),
    InjectReply::Status(Status::IoErr),
    InjectReply::UsedLenZero,
    InjectReply::AfterApplying(Status::IoErr),
];

/// A random failure for `request`. Only a MAP or an ATTACH is made to fail
/// after doing its work: the driver undoes those. A DETACH or an UNMAP that
/// did its work and failed leaves the driver on the safe side (still
/// attached, still mapped), which this model's equality check would flag.
fn reply_for(rng: &mut Rng, request: RequestType) -> Injection {
    let undone = [RequestType::Map, RequestType::Attach].contains(&request);
    let reply = match REPLIES[rng.below(6) as usize] {
        InjectReply::AfterApplying(s) if !undone => InjectReply::Status(s),
        r => r,
    };
    Injection { request: Some(request), reply }
}

#[test]
fn random_operations_keep_driver_and_device_in_step() {
    let mut failures_seen = 0;
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (fake, iommu) = setup(device_config());
        let d = iommu.alloc_paging(1).unwrap();
        for step in 0..300 {
            let page = |r: &mut Rng| 0x10_0000 + r.below(64) * 0x1000;
            let result: Result<(), Error> = match rng.below(10) {
                0..=3 => {
                    let (iova, size) = (page(&mut rng), (1 + rng.below(4)) * 0x1000);
                    d.map_pages(iova, 0x8000_0000 + iova, size, Prot(3))
                        .and_then(|_| d.iotlb_sync_map(iova, size))
                }
                4 | 5 => {
                    let (iova, size) = (page(&mut rng), (1 + rng.below(8)) * 0x1000);
                    d.unmap_pages(iova, size).and_then(|_| d.iotlb_sync())
                }
                6 => iommu.attach(&d, 1 + rng.below(3) as u32),
                7 => iommu.detach(1 + rng.below(3) as u32),
                8 if fake.pending_injections() == 0 => {
                    let request = TYPES[rng.below(4) as usize];
                    fake.inject(reply_for(&mut rng, request));
                    Ok(())
                }
                _ => d.iotlb_sync(),
            };
            match result {
                Err(Error::Device { .. } | Error::NoResponse { .. }) => failures_seen += 1,
                // Refused by the driver before anything was sent.
                Err(Error::Overlap { .. } | Error::WouldSplit { .. } | Error::NotAttached(_))
                | Ok(()) => {}
                Err(e) => panic!("seed {seed} step {step}: unexpected {e}"),
            }
            if fake.pending_injections() == 0 {
                if d.is_attached() {
                    // A MAP that failed after applying stays until its cleanup UNMAP.
                    let stale = d.stale_ranges();
                    let mut dev = fake.mappings(d.id());
                    dev.retain(|m| !stale.contains(&(m.0, m.1)));
                    assert_eq!(dev, tree(&d), "seed {seed} step {step}");
                } else {
                    assert!(!fake.has_domain(d.id()), "seed {seed} step {step}");
                }
                let attached: Vec<u32> = d.endpoints();
                for ep in 1..=3 {
                    let want = attached.contains(&ep).then(|| d.id());
                    assert_eq!(fake.endpoint_domain(ep), want, "seed {seed} step {step} ep {ep}");
                }
            }
        }
    }
    assert!(failures_seen > 50, "the injections were exercised: {failures_seen}");
}

/// The DMA layer under random maps, unmaps, policy switches, clock ticks and
/// injected failures: once everything is unmapped and flushed, no IOVA, tree
/// entry or device mapping is left, and on the way, after each flush with no
/// failure pending, the device equals the tree.
#[test]
fn random_dma_operations_leak_nothing() {
    use viommu_driver::dma::{
        DmaDirection as Dir, DmaMapping, DmaOptions, FlushQueueConfig, Policy,
    };
    let mut failures = 0;
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
        let opts = DmaOptions {
            lazy: FlushQueueConfig { entries: 8, timeout_ns: 1000 },
            lazy_single: FlushQueueConfig { entries: 32, timeout_ns: 5000 },
            ..Default::default()
        };
        let (fake, _iommu, dma, clock) = dma_setup(opts);
        let mut live: Vec<DmaMapping> = Vec::new();
        for step in 0..400 {
            let r = match rng.below(12) {
                0..=3 => {
                    let mut b = dma.begin();
                    let base = 0x4000_0000 + rng.below(1 << 20) * 0x1000;
                    let ok = b.map(base, 16, Dir::ToDevice).is_ok()
                        && b.map_sg(
                            &[(base + 0x1000, 4096 * (1 + rng.below(3) as usize))],
                            Dir::FromDevice,
                        )
                        .is_ok()
                        && b.map(base + 64, 1, Dir::FromDevice).is_ok();
                    assert!(ok, "seed {seed} step {step}: reserving IOVAs");
                    b.commit().map(|m| live.push(m))
                }
                4..=6 if !live.is_empty() => {
                    let m = live.swap_remove(rng.below(live.len() as u64) as usize);
                    dma.unmap(m)
                }
                7 => dma.set_policy(
                    [Policy::Strict, Policy::Lazy, Policy::LazySingle][rng.below(3) as usize],
                ),
                8 => {
                    clock.advance(rng.below(3000));
                    clock.cpu.store(rng.below(4), std::sync::atomic::Ordering::SeqCst);
                    dma.tick()
                }
                9 if fake.pending_injections() == 0 => {
                    let request = [RequestType::Map, RequestType::Unmap][rng.below(2) as usize];
                    fake.inject(reply_for(&mut rng, request));
                    Ok(())
                }
                10 => dma.flush(),
                _ => Ok(()),
            };
            match r {
                Ok(()) => {}
                Err(Error::Device { .. } | Error::NoResponse { .. }) => failures += 1,
                Err(e) => panic!("seed {seed} step {step}: unexpected {e}"),
            }
        }
        for m in live.drain(..) {
            let _ = dma.unmap(m);
        }
        // Whatever injection is left must not bite the final flushes.
        while fake.pending_injections() > 0 {
            let _ = dma
                .map_single(0x7000_0000, 4096, Dir::ToDevice)
                .map(|i| dma.unmap_single(i, 4096, Dir::ToDevice));
            let _ = dma.flush();
        }
        let _ = dma.flush();
        dma.flush().unwrap();
        assert_eq!(dma.pending_unmaps(), 0, "seed {seed}");
        assert_eq!(dma.iova_in_use(), 0, "seed {seed}");
        assert!(dma.domain().mappings().is_empty(), "seed {seed}");
        assert!(fake.mappings(dma.domain().id()).is_empty(), "seed {seed}");
    }
    assert!(failures > 20, "the injections were exercised: {failures}");
}
