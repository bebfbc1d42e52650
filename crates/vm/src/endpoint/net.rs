//! A virtio-net-like endpoint: a TX queue of small packets and an RX queue
//! the guest keeps refilled. The device loops every transmitted packet back
//! into the next posted RX buffer, so both directions move checked data.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use viommu_driver::PAGE_SIZE;

use super::{pattern, Dir, DmaEngine, GuestDma, IoBuf, IoToken, MapError, Seg};
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

    /// Takes back every posted RX buffer (the guest is about to unmap them).
    pub fn withdraw_rx(&mut self) {
        self.rx_posted.clear();
    }

    /// Packets dropped for want of an RX buffer or by a DMA fault.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Transmits one packet of `len` bytes at bus address `tx` whose stream
    /// offset is `offset`: reads and checks it, then receives it into the
    /// next RX buffer. Returns the RX buffer used, or `None` if dropped.
    pub fn transmit(&mut self, tx: u64, len: usize, offset: u64) -> Option<Seg> {
        // The length comes from the guest: a packet larger than a buffer is dropped.
        let Some(buf) = self.scratch.get_mut(..len) else {
            self.dropped += 1;
            return None;
        };
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
    tx: Vec<Seg>,
    rx: Vec<Seg>,
    /// The RX refill in the device's hands: its mapping and, per buffer,
    /// (bus address, guest-physical address).
    rx_token: Option<IoToken>,
    rx_posted: Vec<(u64, u64)>,
    mapped: Vec<Vec<Seg>>,
    packet: Vec<u8>,
    next_offset: u64,
    /// Received packets whose data did not match, or that never arrived.
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
        let mut bufs = pages.iter().flat_map(|p| {
            (0..per_page).map(move |i| Seg { addr: p.gpa + (i * BUF_LEN) as u64, len: BUF_LEN })
        });
        let tx = bufs.by_ref().take(batch).map(|s| Seg { len: packet_len, ..s }).collect();
        let rx = bufs.take(batch).collect();
        Ok(Self {
            ram,
            pages,
            tx,
            rx,
            rx_token: None,
            rx_posted: Vec::new(),
            mapped: Vec::new(),
            packet: vec![0; packet_len],
            next_offset: 0,
            rx_errors: 0,
        })
    }

    /// Maps every RX buffer (one I/O) and posts it.
    pub fn fill_rx(&mut self, dma: &mut dyn GuestDma, dev: &mut NetDevice) -> Result<(), MapError> {
        let bufs: Vec<IoBuf<'_>> = self
            .rx
            .iter()
            .map(|s| IoBuf { segs: std::slice::from_ref(s), dir: Dir::FromDevice })
            .collect();
        let token = dma.map_io(&bufs, &mut self.mapped)?;
        self.rx_token = Some(token);
        for (m, s) in self.mapped.iter().zip(&self.rx) {
            self.rx_posted.push((m[0].addr, s.addr));
            dev.post_rx(m[0]);
        }
        Ok(())
    }

    /// One round: transmit every TX buffer (mapped as one I/O), complete
    /// them, take the received packets (check, unmap the RX buffers) and
    /// refill the RX queue (mapped as one I/O). Returns the packets received
    /// intact.
    pub fn round(
        &mut self,
        dma: &mut dyn GuestDma,
        dev: &mut NetDevice,
    ) -> Result<usize, MapError> {
        let len = self.packet.len();
        let ram_err = |e: crate::RamError| MapError(e.to_string());
        let base = self.next_offset;
        for (i, s) in self.tx.iter().enumerate() {
            pattern::fill(&mut self.packet, base + (i * len) as u64);
            self.ram.write(s.addr, &self.packet).map_err(ram_err)?;
        }
        let bufs: Vec<IoBuf<'_>> = self
            .tx
            .iter()
            .map(|s| IoBuf { segs: std::slice::from_ref(s), dir: Dir::ToDevice })
            .collect();
        let tx_token = dma.map_io(&bufs, &mut self.mapped)?;
        let mut received = Vec::with_capacity(self.tx.len());
        for (i, m) in self.mapped.iter().enumerate() {
            let offset = base + (i * len) as u64;
            if let Some(rx) = dev.transmit(m[0].addr, len, offset) {
                received.push((rx, offset));
            }
        }
        dma.unmap_io(tx_token)?;
        self.next_offset += (self.tx.len() * len) as u64;

        let mut intact = 0;
        for (rx, offset) in &received {
            let Some(&(_, gpa)) = self.rx_posted.iter().find(|&&(b, _)| b == rx.addr) else {
                self.rx_errors += 1;
                continue;
            };
            self.ram.read(gpa, &mut self.packet[..rx.len]).map_err(ram_err)?;
            if pattern::check(&self.packet[..rx.len], *offset) {
                intact += 1;
            } else {
                self.rx_errors += 1;
            }
        }
        // The whole refill is unmapped at once: the device used every buffer
        // of it (a drop would leave some posted; they are withdrawn first).
        self.rx_errors += (self.rx_posted.len() - received.len()) as u64;
        dev.withdraw_rx();
        self.rx_posted.clear();
        if let Some(t) = self.rx_token.take() {
            dma.unmap_io(t)?;
        }
        self.fill_rx(dma, dev)?;
        Ok(intact)
    }

    /// Unmaps the RX buffers still posted.
    pub fn drain(&mut self, dma: &mut dyn GuestDma, dev: &mut NetDevice) -> Result<(), MapError> {
        dev.withdraw_rx();
        self.rx_posted.clear();
        match self.rx_token.take() {
            Some(t) => dma.unmap_io(t),
            None => Ok(()),
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
        assert_eq!(dev.transmit(4096, BUF_LEN + 1, 0), None, "oversized packet dropped");
        assert_eq!(dev.dropped(), 1);
        guest.drain(&mut DirectDma, &mut dev).unwrap();
    }
}
