//! Random sequences of domain operations, attach/detach and injected device
//! failures. After every step with no failure pending, the device's mappings
//! must equal the driver's tree (or the device must not know the domain).

mod common;

use common::*;
use viommu_driver::fake::{FakeConfig, InjectReply, Injection};
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
const REPLIES: [InjectReply; 5] = [
    InjectReply::Status(Status::Range),
    InjectReply::Status(Status::Inval),
    InjectReply::Status(Status::NoMem),
    InjectReply::Status(Status::IoErr),
    InjectReply::UsedLenZero,
];

#[test]
fn random_operations_keep_driver_and_device_in_step() {
    let mut failures_seen = 0;
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (fake, iommu) = setup(FakeConfig::default());
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
                    let request = Some(TYPES[rng.below(4) as usize]);
                    fake.inject(Injection { request, reply: REPLIES[rng.below(5) as usize] });
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
                    assert_eq!(fake.mappings(d.id()), tree(&d), "seed {seed} step {step}");
                } else {
                    assert!(!fake.domains().contains(&d.id()), "seed {seed} step {step}");
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
