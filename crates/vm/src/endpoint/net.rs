//! A virtio-net-like endpoint: a TX queue of small packets and an RX queue
//! the guest keeps refilled. The device loops every transmitted packet back
//! into the next posted RX buffer, so both directions move checked data.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use viommu_driver::PAGE_SIZE;

use super::{pattern, Dir, DmaEngine, GuestDma, MapError, Seg};
use crate::ram::{GuestPages, GuestRam};

/// Size of one RX or TX buffer: two per page, as a page pool would split them.
pub const BUF_LEN: usize = 2048;

/// The device model of one queue pair.
#[derive(Debug)]
pub struct NetDevice {
    dma: Arc<DmaEngine>,
    rx_posted: VecDeque<Seg>,
    scratch: Vec<u8>,
    data_errors: Arc<AtomicU64>,
    dropped: u64,
}

impl NetDevice {
    /// A device doing its DMA through `dma`; data errors go to `data_errors`.
    pub fn new(dma: Arc<DmaEngine>, data_errors: Arc<AtomicU64>) -> Self {
        Self { dma, rx_posted: VecDeque::new(), scratch: vec![0; BUF_LEN], data_errors, dropped: 0 }
    }

    /// The guest posts an RX buffer (bus address).
    pub fn post_rx(&mut self, buf: Seg) {
        self.rx_posted.push_back(buf);
    }

    /// Packets dropped for want of an RX buffer or by a DMA fault.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Transmits one packet of `len` bytes at bus address `tx` whose stream
    /// offset is `offset`: reads and checks it, then receives it into the
    /// next RX buffer. Returns the RX buffer used, or `None` if dropped.
    pub fn transmit(&mut self, tx: u64, len: usize, offset: u64) -> Option<Seg> {
        let buf = &mut self.scratch[..len];
        if self.dma.read(tx, buf).is_err() {
            self.dropped += 1;
            return None;
        }
        if !pattern::check(buf, offset) {
            self.data_errors.fetch_add(1, Ordering::Relaxed);
        }
        let Some(rx) = self.rx_posted.pop_front() else {
            self.dropped += 1;
            return None;
        };
        if self.dma.write(rx.addr, buf).is_err() {
            self.dropped += 1;
            return None;
        }
        Some(Seg { addr: rx.addr, len })
    }
}

/// The guest side of one queue pair: `batch` TX buffers and `batch` RX
/// buffers, all mapped for each use.
#[derive(Debug)]
pub struct NetGuest {
    ram: Arc<GuestRam>,
    pages: Vec<GuestPages>,
    tx: Vec<u64>,
    rx: Vec<u64>,
    /// Bus address → guest-physical address of the posted RX buffers.
    rx_bus: Vec<(u64, u64)>,
    packet: Vec<u8>,
    next_offset: u64,
    /// Received packets whose data did not match.
    pub rx_errors: u64,
}

impl NetGuest {
    /// Buffers for rounds of `batch` packets of `packet_len` bytes.
    pub fn new(ram: Arc<GuestRam>, batch: usize, packet_len: usize) -> Result<Self, MapError> {
        assert!(packet_len <= BUF_LEN, "a packet fits one buffer");
        let per_page = PAGE_SIZE / BUF_LEN;
        let npages = (2 * batch).div_ceil(per_page);
        let mut pages = Vec::with_capacity(npages);
        for _ in 0..npages {
            pages.push(ram.alloc_pages(1).ok_or_else(|| MapError("guest RAM exhausted".into()))?);
        }
        let mut bufs =
            pages.iter().flat_map(|p| (0..per_page).map(move |i| p.gpa + (i * BUF_LEN) as u64));
        let tx = bufs.by_ref().take(batch).collect();
        let rx = bufs.take(batch).collect();
        Ok(Self {
            ram,
            pages,
            tx,
            rx,
            rx_bus: Vec::new(),
            packet: vec![0; packet_len],
            next_offset: 0,
            rx_errors: 0,
        })
    }

    /// Maps every RX buffer and posts it (the initial fill).
    pub fn fill_rx(&mut self, dma: &mut dyn GuestDma, dev: &mut NetDevice) -> Result<(), MapError> {
        let rx = self.rx.clone();
        self.refill(dma, dev, &rx)
    }

    fn refill(
        &mut self,
        dma: &mut dyn GuestDma,
        dev: &mut NetDevice,
        bufs: &[u64],
    ) -> Result<(), MapError> {
        dma.begin();
        let mut res = Ok(());
        for &gpa in bufs {
            match dma.map(gpa, BUF_LEN, Dir::FromDevice) {
                Ok(bus) => {
                    self.rx_bus.push((bus, gpa));
                    dev.post_rx(Seg { addr: bus, len: BUF_LEN });
                }
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        let c = dma.commit();
        res.and(c)
    }

    /// One round: transmit `batch` packets (mapped in one batch), complete
    /// them, then take each received packet (unmap, check) and refill the RX
    /// queue (mapped in one batch). Returns the packets received intact.
    pub fn round(
        &mut self,
        dma: &mut dyn GuestDma,
        dev: &mut NetDevice,
    ) -> Result<usize, MapError> {
        let len = self.packet.len();
        let ram_err = |e: crate::RamError| MapError(e.to_string());
        let start_offset = self.next_offset;
        let mut tx_bus = Vec::with_capacity(self.tx.len());
        dma.begin();
        let mut res = Ok(());
        for (i, &gpa) in self.tx.iter().enumerate() {
            pattern::fill(&mut self.packet, start_offset + (i * len) as u64);
            self.ram.write(gpa, &self.packet).map_err(ram_err)?;
            match dma.map(gpa, len, Dir::ToDevice) {
                Ok(bus) => tx_bus.push(bus),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        let c = dma.commit();
        let fail = res.and(c).err();

        let mut received = Vec::with_capacity(tx_bus.len());
        for (i, &bus) in tx_bus.iter().enumerate() {
            if fail.is_none() {
                if let Some(rx) = dev.transmit(bus, len, start_offset + (i * len) as u64) {
                    received.push((rx, start_offset + (i * len) as u64));
                }
            }
            dma.unmap(bus, len, Dir::ToDevice);
        }
        if let Some(e) = fail {
            return Err(e);
        }
        self.next_offset += (self.tx.len() * len) as u64;

        let mut intact = 0;
        let mut used = Vec::with_capacity(received.len());
        for (rx, offset) in received {
            let Some(pos) = self.rx_bus.iter().position(|&(b, _)| b == rx.addr) else {
                self.rx_errors += 1;
                continue;
            };
            let (bus, gpa) = self.rx_bus.swap_remove(pos);
            dma.unmap(bus, BUF_LEN, Dir::FromDevice);
            self.ram.read(gpa, &mut self.packet[..rx.len]).map_err(ram_err)?;
            if pattern::check(&self.packet[..rx.len], offset) {
                intact += 1;
            } else {
                self.rx_errors += 1;
            }
            used.push(gpa);
        }
        self.refill(dma, dev, &used)?;
        Ok(intact)
    }

    /// Unmaps the RX buffers still posted.
    pub fn drain(&mut self, dma: &mut dyn GuestDma) {
        for (bus, _) in self.rx_bus.drain(..) {
            dma.unmap(bus, BUF_LEN, Dir::FromDevice);
        }
    }
}

impl Drop for NetGuest {
    fn drop(&mut self) {
        for p in self.pages.drain(..) {
            self.ram.free_pages(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::DirectDma;

    #[test]
    fn loopback_rounds_deliver_checked_packets() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let errors = Arc::new(AtomicU64::new(0));
        let mut dev = NetDevice::new(Arc::new(DmaEngine::direct(ram.clone())), errors.clone());
        let mut guest = NetGuest::new(ram, 8, 1500).unwrap();
        guest.fill_rx(&mut DirectDma, &mut dev).unwrap();
        for _ in 0..3 {
            assert_eq!(guest.round(&mut DirectDma, &mut dev).unwrap(), 8);
        }
        assert_eq!((guest.rx_errors, dev.dropped(), errors.load(Ordering::Relaxed)), (0, 0, 0));
        guest.drain(&mut DirectDma);
    }
}
