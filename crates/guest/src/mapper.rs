//! How the test workloads turn buffers into bus addresses: through the
//! viommu DMA layer under one policy, or 1:1 when no IOMMU is in the way.
//!
//! A *round* is the set of requests submitted before one kick of the block
//! device. With the batch API a round's buffers are mapped in one
//! [`DmaBatch`](viommu_driver::dma::DmaBatch) (one sync) and released
//! together when the round's last request completes.

use viommu_driver::dma::{DmaDirection, DmaDomain, DmaMapping, DmaOptions, SgMapping};
use viommu_driver::{CounterSnapshot, Domain, Hal, Mode, Transport, VirtioIommu};

/// What mapping can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The DMA layer or the driver under it failed.
    #[error("viommu DMA layer: {0}")]
    Dma(#[from] viommu_driver::Error),
    /// A handle this mapper did not give out, or already released.
    #[error("no mapping has handle {0}")]
    UnknownHandle(u64),
    /// [`DmaMapper`] is for modes that map; identity maps nothing.
    #[error("mode {0} maps nothing: use IdentityMapper")]
    NothingToMap(Mode),
}

/// One buffer of a round: its physical segments `(paddr, len)` and
/// whether the device writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundBuf {
    /// Physical segments, in order.
    pub segs: Vec<(u64, usize)>,
    /// The device writes the buffer (a disk read).
    pub device_writes: bool,
}

/// A mapped buffer: what the device is given, and what to release later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    /// Descriptors `(IOVA, len)`; runs contiguous in IOVA space are merged.
    pub descs: Vec<(u64, u32)>,
    /// Handle for [`Mapper::complete`].
    pub handle: u64,
}

/// Maps and unmaps the data buffers of the workloads.
pub trait Mapper {
    /// Maps the buffers of one round (one sync with the batch API).
    fn map_round(&mut self, bufs: &[RoundBuf]) -> Result<Vec<Mapped>, MapError>;
    /// The request using buffer `handle` completed: unmap it (under the policy).
    fn complete(&mut self, handle: u64) -> Result<(), MapError>;
    /// Sends every deferred UNMAP and waits for it.
    fn flush(&mut self) -> Result<(), MapError>;
    /// Flushes the deferred UNMAPs whose timeout has passed: the embedder's
    /// timer, which a polling program calls from its loop.
    fn tick(&mut self) -> Result<(), MapError> {
        Ok(())
    }
    /// The driver's request and kick counters so far.
    fn counts(&self) -> CounterSnapshot;
    /// Most descriptors a buffer of `segs` physical segments becomes.
    fn max_descs(&self, segs: usize) -> usize;
}

fn dir(device_writes: bool) -> DmaDirection {
    if device_writes {
        DmaDirection::FromDevice
    } else {
        DmaDirection::ToDevice
    }
}

/// Merges `(addr, len)` runs that touch into single descriptors.
pub fn merge_descs(runs: impl IntoIterator<Item = (u64, usize)>) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for (a, l) in runs {
        match out.last_mut() {
            Some(d) if d.0 + d.1 as u64 == a && d.1 as usize + l <= u32::MAX as usize => {
                d.1 += l as u32
            }
            _ => out.push((a, l as u32)),
        }
    }
    out
}

/// No IOMMU: bus address = physical address, nothing sent.
#[derive(Debug, Default)]
pub struct IdentityMapper;

impl Mapper for IdentityMapper {
    fn map_round(&mut self, bufs: &[RoundBuf]) -> Result<Vec<Mapped>, MapError> {
        Ok(bufs
            .iter()
            .map(|b| Mapped { descs: merge_descs(b.segs.iter().copied()), handle: 0 })
            .collect())
    }
    fn complete(&mut self, _: u64) -> Result<(), MapError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), MapError> {
        Ok(())
    }
    fn counts(&self) -> CounterSnapshot {
        CounterSnapshot::default()
    }
    fn max_descs(&self, segs: usize) -> usize {
        segs
    }
}

/// What one handle holds until its request completes.
enum Held {
    /// `map_single`: IOVA, length, direction.
    Single(u64, usize, DmaDirection),
    /// `map_sg`.
    Sg(SgMapping),
    /// A request of a batch round.
    Round(u64),
}

/// Values by handle, in a vector with a free list: no hashing and, once
/// warm, no allocation per I/O (a `HashMap` costs both, and every guest
/// instruction is slow under TCG).
#[derive(Debug)]
struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, v: T) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(v);
                i as u64
            }
            None => {
                self.slots.push(Some(v));
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn get_mut(&mut self, h: u64) -> Option<&mut T> {
        self.slots.get_mut(usize::try_from(h).ok()?)?.as_mut()
    }

    fn remove(&mut self, h: u64) -> Option<T> {
        let i = usize::try_from(h).ok()?;
        let v = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(v)
    }
}

/// The viommu DMA layer under one mode, on any transport.
///
/// Without the batch API a one-segment buffer costs one `map_single`, a
/// scattered one one `map_sg` (one IOVA range, one sync); with it
/// ([`Mode::Best`]), a round's buffers share one
/// [`DmaBatch`](viommu_driver::dma::DmaBatch).
pub struct DmaMapper<T: Transport, H: Hal> {
    iommu: VirtioIommu<T, H>,
    dma: DmaDomain,
    batch: bool,
    held: Slab<Held>,
    /// Batch rounds: the round's mapping and its requests still in flight.
    rounds: Slab<(DmaMapping, usize)>,
}

impl<T: Transport + 'static, H: Hal + 'static> DmaMapper<T, H> {
    /// A DMA layer over `domain` (attached by the caller) under `mode`.
    ///
    /// Every mode keeps the DMA layer's default UNMAP coalescing, as this
    /// suite always has (so its `lazy` is the bench's `lazy` plus
    /// coalescing); the mode picks the policy, per-MAP syncs and the batch API.
    pub fn new(
        iommu: &VirtioIommu<T, H>,
        domain: Domain,
        endpoint: u32,
        mode: Mode,
    ) -> Result<Self, MapError> {
        let policy = mode.policy().ok_or(MapError::NothingToMap(mode))?;
        let resv = iommu.reserved_regions(endpoint)?;
        let opts =
            DmaOptions { policy, sync_every_map: mode.sync_every_map(), ..DmaOptions::default() };
        let dma = DmaDomain::with_std(domain, &resv, opts)?;
        Ok(Self {
            iommu: iommu.clone(),
            dma,
            batch: mode.batch(),
            held: Slab::default(),
            rounds: Slab::default(),
        })
    }

    /// Maps a region for the device's lifetime (rings, request headers), read-write.
    pub fn map_coherent(&mut self, paddr: u64, len: usize) -> Result<u64, viommu_driver::Error> {
        self.dma.map_single(paddr, len, DmaDirection::Bidirectional)
    }

    /// The DMA layer.
    pub fn dma(&self) -> &DmaDomain {
        &self.dma
    }

    fn map_batch(&mut self, bufs: &[RoundBuf]) -> Result<Vec<Mapped>, MapError> {
        let mut b = self.dma.begin();
        let mut descs = Vec::with_capacity(bufs.len());
        for buf in bufs {
            let d = dir(buf.device_writes);
            let runs = if let [(p, l)] = buf.segs[..] {
                vec![(b.map(p, l, d)?, l as u32)]
            } else {
                let segs = b.map_sg(&buf.segs, d)?;
                merge_descs(segs.iter().map(|s| (s.addr, s.len)))
            };
            descs.push(runs);
        }
        let mapping = b.commit()?;
        let round = self.rounds.insert((mapping, bufs.len()));
        Ok(descs
            .into_iter()
            .map(|descs| Mapped { descs, handle: self.held.insert(Held::Round(round)) })
            .collect())
    }

    /// One request of batch round `round` completed: the round is unmapped
    /// with its last request.
    fn complete_round(&mut self, round: u64) -> Result<(), MapError> {
        let r = self.rounds.get_mut(round).ok_or(MapError::UnknownHandle(round))?;
        r.1 -= 1;
        if r.1 > 0 {
            return Ok(());
        }
        let (mapping, _) = self.rounds.remove(round).ok_or(MapError::UnknownHandle(round))?;
        Ok(self.dma.unmap(mapping)?)
    }
}

impl<T: Transport + 'static, H: Hal + 'static> Mapper for DmaMapper<T, H> {
    fn map_round(&mut self, bufs: &[RoundBuf]) -> Result<Vec<Mapped>, MapError> {
        if self.batch {
            return self.map_batch(bufs);
        }
        let mut out = Vec::with_capacity(bufs.len());
        for buf in bufs {
            let d = dir(buf.device_writes);
            let (descs, held) = if let [(p, l)] = buf.segs[..] {
                let iova = self.dma.map_single(p, l, d)?;
                (vec![(iova, l as u32)], Held::Single(iova, l, d))
            } else {
                let m = self.dma.map_sg(&buf.segs, d)?;
                (merge_descs(m.segments.iter().map(|s| (s.addr, s.len))), Held::Sg(m))
            };
            out.push(Mapped { descs, handle: self.held.insert(held) });
        }
        Ok(out)
    }

    fn complete(&mut self, handle: u64) -> Result<(), MapError> {
        match self.held.remove(handle).ok_or(MapError::UnknownHandle(handle))? {
            Held::Single(iova, len, d) => Ok(self.dma.unmap_single(iova, len, d)?),
            Held::Sg(m) => Ok(self.dma.unmap_sg(m)?),
            Held::Round(round) => self.complete_round(round),
        }
    }

    fn flush(&mut self) -> Result<(), MapError> {
        Ok(self.dma.flush()?)
    }

    fn tick(&mut self) -> Result<(), MapError> {
        Ok(self.dma.tick()?)
    }

    fn counts(&self) -> CounterSnapshot {
        self.iommu.counters()
    }

    /// One: a buffer gets one IOVA range, and page-aligned segments (all
    /// the workloads use) lie back to back in it.
    fn max_descs(&self, _segs: usize) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_merge_only_when_touching() {
        assert_eq!(
            merge_descs([(0x1000, 0x1000), (0x2000, 0x800), (0x4000, 0x10)]),
            [(0x1000, 0x1800), (0x4000, 0x10)]
        );
        assert!(merge_descs([]).is_empty());
    }

    #[test]
    fn slab_reuses_freed_handles_and_refuses_unknown_ones() {
        let mut s = Slab::default();
        let (a, b) = (s.insert("a"), s.insert("b"));
        assert_ne!(a, b);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "a handle is released once");
        assert_eq!(s.get_mut(a), None);
        let c = s.insert("c");
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!(s.get_mut(b).copied(), Some("b"));
        assert_eq!(s.remove(99), None);
        assert_eq!(s.remove(u64::MAX), None);
    }

    #[test]
    fn identity_mapper_gives_physical_addresses() {
        let mut m = IdentityMapper;
        let bufs = [RoundBuf { segs: vec![(0x5000, 4096), (0x7000, 4096)], device_writes: true }];
        let out = m.map_round(&bufs).unwrap();
        assert_eq!(out[0].descs, [(0x5000, 4096), (0x7000, 4096)]);
        assert_eq!(m.counts(), CounterSnapshot::default());
    }

    mod on_the_fake_device {
        use super::*;
        use viommu_driver::fake::{FakeHal, FakeTransport};
        use viommu_driver::DriverOptions;

        // The driver tests' one device model: viommu-device behind the fake's
        // rings (its checks on the model's state are not all used here).
        #[allow(dead_code)]
        mod device {
            include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../driver/tests/common/device.rs"));
        }
        use device::FakeDevice;

        type Fake = DmaMapper<FakeTransport, FakeHal>;

        fn mapper(mode: Mode) -> (FakeDevice, Fake) {
            let fake = FakeDevice::default();
            let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default())
                .expect("driver");
            let domain = iommu.alloc_paging(1).expect("domain");
            iommu.attach(&domain, 1).expect("attach");
            let m = DmaMapper::new(&iommu, domain, 1, mode).expect("mapper");
            (fake, m)
        }

        fn round() -> Vec<RoundBuf> {
            let one = |p: u64| RoundBuf { segs: vec![(p, 4096)], device_writes: true };
            let sg = RoundBuf {
                segs: vec![(0x9000_0000, 4096), (0x9000_2000, 4096)],
                device_writes: false,
            };
            vec![one(0x8000_0000), one(0x8010_0000), sg]
        }

        #[test]
        fn lazy_maps_each_buffer_and_defers_its_unmap() {
            let (_fake, mut m) = mapper(Mode::Lazy);
            let before = m.counts();
            let mapped = m.map_round(&round()).unwrap();
            let c = m.counts().since(&before);
            // The scattered buffer's two pages lie apart: two MAPs, one sync.
            assert_eq!((c.map, c.syncs), (4, 3), "one map call and one sync per buffer");
            assert_eq!(mapped[2].descs.len(), 1, "a scattered buffer gets one IOVA range");
            assert_eq!(mapped[2].descs[0].1, 8192);
            for h in mapped.iter().map(|x| x.handle) {
                m.complete(h).unwrap();
            }
            assert_eq!(m.counts().since(&before).unmap, 0, "lazy: nothing sent yet");
            m.flush().unwrap();
            assert!(m.counts().since(&before).unmap > 0);
            assert_eq!(m.dma().iova_in_use(), 0);
            assert!(matches!(m.complete(mapped[0].handle), Err(MapError::UnknownHandle(_))));
        }

        #[test]
        fn best_maps_a_round_with_one_sync_and_unmaps_it_with_its_last_request() {
            let (_fake, mut m) = mapper(Mode::Best);
            let before = m.counts();
            let mapped = m.map_round(&round()).unwrap();
            let c = m.counts().since(&before);
            assert_eq!((c.map, c.syncs), (4, 1), "one batch: one sync");
            m.complete(mapped[0].handle).unwrap();
            m.complete(mapped[1].handle).unwrap();
            m.flush().unwrap();
            assert_ne!(m.dma().iova_in_use(), 0, "the round's last request is in flight");
            m.complete(mapped[2].handle).unwrap();
            m.flush().unwrap();
            assert_eq!(m.dma().iova_in_use(), 0);
        }

        #[test]
        fn identity_is_not_a_dma_mapper_mode() {
            let fake = FakeDevice::default();
            let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default())
                .expect("driver");
            let domain = iommu.alloc_paging(1).expect("domain");
            let r = DmaMapper::new(&iommu, domain, 1, Mode::Identity);
            assert!(matches!(r, Err(MapError::NothingToMap(Mode::Identity))));
        }
    }
}
