//! How the test workloads turn buffers into bus addresses: through the
//! viommu DMA layer under one policy, or 1:1 when no IOMMU is in the way.
//!
//! A *round* is the set of requests submitted before one kick of the block
//! device. With the batch API a round's buffers are mapped in one
//! [`DmaBatch`](viommu_driver::dma::DmaBatch) (one sync) and released
//! together when the round's last request completes.

use std::collections::HashMap;

use viommu_driver::dma::{DmaDirection, DmaDomain, DmaMapping, DmaOptions, Policy};
use viommu_driver::{CounterSnapshot, Domain, VirtioIommu};

use crate::hugepage::HugePageHal;
use crate::virtio_pci::PciTransport;

/// One buffer of a round: physical address, length, and whether the device writes it.
pub type RoundBuf = (u64, usize, bool);

/// Maps and unmaps the data buffers of the workloads.
pub trait Mapper {
    /// Maps the buffers of one round; returns their IOVAs and the round's id.
    fn map_round(&mut self, bufs: &[RoundBuf]) -> Result<(Vec<u64>, u64), String>;
    /// One request of round `round` completed; its buffer was `(iova, len, device_writes)`.
    fn complete(
        &mut self,
        round: u64,
        iova: u64,
        len: usize,
        device_writes: bool,
    ) -> Result<(), String>;
    /// Sends every deferred UNMAP and waits for it.
    fn flush(&mut self) -> Result<(), String>;
    /// The driver's request and kick counters so far.
    fn counts(&self) -> CounterSnapshot;
}

fn dir(device_writes: bool) -> DmaDirection {
    if device_writes {
        DmaDirection::FromDevice
    } else {
        DmaDirection::ToDevice
    }
}

/// No IOMMU: bus address = physical address, nothing sent.
#[derive(Debug, Default)]
pub struct IdentityMapper;

impl Mapper for IdentityMapper {
    fn map_round(&mut self, bufs: &[RoundBuf]) -> Result<(Vec<u64>, u64), String> {
        Ok((bufs.iter().map(|b| b.0).collect(), 0))
    }
    fn complete(&mut self, _: u64, _: u64, _: usize, _: bool) -> Result<(), String> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn counts(&self) -> CounterSnapshot {
        CounterSnapshot::default()
    }
}

/// The viommu DMA layer under one policy.
pub struct DmaMapper {
    iommu: VirtioIommu<PciTransport, HugePageHal>,
    dma: DmaDomain,
    batch: bool,
    next_round: u64,
    /// Batch mode: the round's mapping and its requests still in flight.
    rounds: HashMap<u64, (DmaMapping, usize)>,
}

impl DmaMapper {
    /// A DMA layer over `domain` (attached by the caller). `policy` is
    /// `strict`, `lazy`, `lazy-single` or `lazy-batch` (lazy + batch API).
    pub fn new(
        iommu: &VirtioIommu<PciTransport, HugePageHal>,
        domain: Domain,
        endpoint: u32,
        policy: &str,
    ) -> Result<Self, String> {
        let (policy, batch) = match policy {
            "strict" => (Policy::Strict, false),
            "lazy" => (Policy::Lazy, false),
            "lazy-single" => (Policy::LazySingle, false),
            "lazy-batch" => (Policy::Lazy, true),
            p => return Err(format!("unknown policy {p}")),
        };
        let resv = iommu.reserved_regions(endpoint).map_err(|e| e.to_string())?;
        let opts = DmaOptions { policy, ..DmaOptions::default() };
        let dma = DmaDomain::with_std(domain, &resv, opts).map_err(|e| e.to_string())?;
        Ok(Self { iommu: iommu.clone(), dma, batch, next_round: 0, rounds: HashMap::new() })
    }

    /// Maps a region for the device's lifetime (rings, request headers), read-write.
    pub fn map_coherent(&mut self, paddr: u64, len: usize) -> Result<u64, String> {
        self.dma.map_single(paddr, len, DmaDirection::Bidirectional).map_err(|e| e.to_string())
    }

    /// The DMA layer.
    pub fn dma(&self) -> &DmaDomain {
        &self.dma
    }
}

impl Mapper for DmaMapper {
    fn map_round(&mut self, bufs: &[RoundBuf]) -> Result<(Vec<u64>, u64), String> {
        let round = self.next_round;
        self.next_round += 1;
        if !self.batch {
            let iovas = bufs
                .iter()
                .map(|&(p, l, w)| self.dma.map_single(p, l, dir(w)).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?;
            return Ok((iovas, round));
        }
        let mut b = self.dma.begin();
        let iovas = bufs
            .iter()
            .map(|&(p, l, w)| b.map(p, l, dir(w)).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let mapping = b.commit().map_err(|e| e.to_string())?;
        self.rounds.insert(round, (mapping, bufs.len()));
        Ok((iovas, round))
    }

    fn complete(
        &mut self,
        round: u64,
        iova: u64,
        len: usize,
        device_writes: bool,
    ) -> Result<(), String> {
        if !self.batch {
            return self.dma.unmap_single(iova, len, dir(device_writes)).map_err(|e| e.to_string());
        }
        let left = {
            let r = self.rounds.get_mut(&round).ok_or_else(|| format!("unknown round {round}"))?;
            r.1 -= 1;
            r.1
        };
        if left == 0 {
            let (mapping, _) = self.rounds.remove(&round).expect("present");
            self.dma.unmap(mapping).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.dma.flush().map_err(|e| e.to_string())
    }

    fn counts(&self) -> CounterSnapshot {
        self.iommu.counters()
    }
}
