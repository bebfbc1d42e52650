//! Transports: a virtio-drivers transport under this driver ([`VdTransport`]),
//! and one for a device behind the IOMMU ([`IommuTransport`]).

use virtio_drivers::transport::{
    DeviceStatus, DeviceType, InterruptStatus, Transport as VdTransportTrait,
};
use virtio_drivers::{PhysAddr, Result as VdResult};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::SharedDma;
use crate::sync::{DefaultLocks, Locks};
use crate::transport::{QueueAddrs, Transport};
use crate::{Error, Result};

/// VIRTIO_F_ACCESS_PLATFORM: "the device can be used on a platform where
/// device access to data in memory is limited and/or translated" (virtio
/// 1.2 §6).
pub const ACCESS_PLATFORM: u64 = 1 << 33;

/// A virtio-drivers transport (`PciTransport`, `MmioTransport`,
/// `SomeTransport`, or the OS's own) as this driver's [`Transport`], to
/// drive the virtio-iommu device itself.
///
/// Only the modern (virtio 1.x) queue layout: [`VdTransport::new`] refuses
/// a legacy MMIO (version 1) device.
///
/// ```no_run
/// # fn pci() -> virtio_drivers::transport::pci::PciTransport { unimplemented!() }
/// # struct OsHal;
/// # unsafe impl virtio_drivers::Hal for OsHal {
/// #     fn dma_alloc(_: usize, _: virtio_drivers::BufferDirection) -> (u64, core::ptr::NonNull<u8>) { unimplemented!() }
/// #     unsafe fn dma_dealloc(_: u64, _: core::ptr::NonNull<u8>, _: usize) -> i32 { 0 }
/// #     unsafe fn mmio_phys_to_virt(_: u64, _: usize) -> core::ptr::NonNull<u8> { unimplemented!() }
/// #     unsafe fn share(_: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) -> u64 { 0 }
/// #     unsafe fn unshare(_: u64, _: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) {}
/// # }
/// use viommu_driver::adapter::{VdHal, VdTransport};
/// use viommu_driver::{DriverOptions, VirtioIommu};
/// // The virtio-iommu-pci function the OS found (virtio-drivers' PCI code).
/// let transport = VdTransport::new(pci()).unwrap();
/// let iommu = VirtioIommu::new(transport, VdHal::<OsHal>::new(), DriverOptions::default()).unwrap();
/// # let _ = iommu;
/// ```
#[derive(Debug)]
pub struct VdTransport<T> {
    inner: T,
}

impl<T: VdTransportTrait> VdTransport<T> {
    /// Wraps `inner`; [`Error::Unsupported`] for a legacy queue layout.
    pub fn new(inner: T) -> Result<Self> {
        if inner.requires_legacy_layout() {
            return Err(Error::Unsupported("legacy virtqueue layout"));
        }
        Ok(Self { inner })
    }

    /// The virtio-drivers transport (e.g. to acknowledge an interrupt).
    pub fn inner(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Gives the virtio-drivers transport back.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// Splits config accesses the way virtio-mmio asks of a driver: "32 bit
/// wide and aligned accesses for 32 and 64 bit wide fields", 16 bit for 16
/// bit fields, 8 bit otherwise (virtio 1.2 §4.2.2.2). The access width is
/// the widest the offset's alignment and the remaining length allow.
fn chunks(offset: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut at = 0;
    core::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let off = offset + at;
        let left = len - at;
        let w = if off % 4 == 0 && left >= 4 {
            4
        } else if off % 2 == 0 && left >= 2 {
            2
        } else {
            1
        };
        at += w;
        Some((off, w))
    })
}

impl<T: VdTransportTrait + Send> Transport for VdTransport<T> {
    fn device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn set_driver_features(&mut self, features: u64) {
        self.inner.write_driver_features(features);
    }
    fn status(&mut self) -> u8 {
        self.inner.get_status().bits() as u8
    }
    fn set_status(&mut self, status: u8) {
        self.inner.set_status(DeviceStatus::from_bits_retain(status.into()));
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.inner.max_queue_size(queue).min(u16::MAX.into()) as u16
    }
    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        self.inner.queue_set(queue, size.into(), addrs.desc, addrs.avail, addrs.used);
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue);
    }
    /// A config access the transport refuses (no config, or past its end)
    /// reads as zeros, which the driver rejects as a bad config.
    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        let base = offset;
        for (off, w) in chunks(offset, buf.len()) {
            let out = &mut buf[off - base..off - base + w];
            let ok = match w {
                4 => self
                    .inner
                    .read_config_space::<u32>(off)
                    .map(|v| out.copy_from_slice(v.as_bytes())),
                2 => self
                    .inner
                    .read_config_space::<u16>(off)
                    .map(|v| out.copy_from_slice(v.as_bytes())),
                _ => self.inner.read_config_space::<u8>(off).map(|v| out[0] = v),
            };
            if ok.is_err() {
                out.fill(0);
            }
        }
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let base = offset;
        for (off, w) in chunks(offset, data.len()) {
            let part = &data[off - base..off - base + w];
            // A refused write is dropped, as a device ignores one.
            let _ = match w {
                4 => write_as::<T, u32>(&mut self.inner, off, part),
                2 => write_as::<T, u16>(&mut self.inner, off, part),
                _ => self.inner.write_config_space::<u8>(off, part[0]),
            };
        }
    }
    fn config_generation(&mut self) -> u32 {
        self.inner.read_config_generation()
    }
}

fn write_as<T: VdTransportTrait, V: FromBytes + IntoBytes + Immutable>(
    t: &mut T,
    off: usize,
    part: &[u8],
) -> VdResult<()> {
    match V::read_from_bytes(part) {
        Ok(v) => t.write_config_space(off, v),
        Err(_) => Ok(()),
    }
}

/// The transport of a device behind the IOMMU, for virtio-drivers' device
/// drivers (`VirtIOBlk`, `VirtIONet`, ...) used with an [`IommuHal`](super::IommuHal):
///
/// - **accepts VIRTIO_F_ACCESS_PLATFORM** when the device offers it. No
///   virtio-drivers driver lists the feature, and a device that needs it
///   (QEMU's `iommu_platform=on`) refuses FEATURES_OK without it: "If
///   VIRTIO_F_ACCESS_PLATFORM has been offered, the driver MUST accept it"
///   is left to us (virtio 1.2 §6.1 lets a device fail a driver that does
///   not).
/// - **one sync per notify**: `IommuHal::share` only queues its MAP, and
///   [`Transport::notify`] here sends every queued MAP of the domain with
///   one sync before it tells the device. A device takes a descriptor only
///   after the notify that announces it, except while it has notifications
///   suppressed; see [`SharedDma`] for that case.
///
/// Everything else is the wrapped transport's.
///
/// ```no_run
/// # fn pci() -> virtio_drivers::transport::pci::PciTransport { unimplemented!() }
/// # struct OsHal;
/// # unsafe impl virtio_drivers::Hal for OsHal {
/// #     fn dma_alloc(_: usize, _: virtio_drivers::BufferDirection) -> (u64, core::ptr::NonNull<u8>) { unimplemented!() }
/// #     unsafe fn dma_dealloc(_: u64, _: core::ptr::NonNull<u8>, _: usize) -> i32 { 0 }
/// #     unsafe fn mmio_phys_to_virt(_: u64, _: usize) -> core::ptr::NonNull<u8> { unimplemented!() }
/// #     unsafe fn share(_: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) -> u64 { 0 }
/// #     unsafe fn unshare(_: u64, _: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) {}
/// # }
/// # fn dma_domain() -> viommu_driver::DmaDomain { unimplemented!() }
/// use virtio_drivers::device::blk::VirtIOBlk;
/// use viommu_driver::adapter::{IommuHal, IommuTransport, SharedDma};
///
/// viommu_driver::static_dma!(Blk);
/// let dma = Blk::slot().install(SharedDma::new(dma_domain())).ok().unwrap();
/// let mut blk = VirtIOBlk::<IommuHal<OsHal, Blk>, _>::new(IommuTransport::new(pci(), dma)).unwrap();
/// let mut sector = [0u8; 512];
/// blk.read_blocks(0, &mut sector).unwrap(); // its MAPs: one sync, at the notify
/// ```
#[derive(Debug)]
pub struct IommuTransport<T, L: Locks = DefaultLocks> {
    inner: T,
    dma: &'static SharedDma<L>,
}

impl<T: VdTransportTrait, L: Locks> IommuTransport<T, L> {
    /// Wraps `inner`; its notifies sync the MAPs queued in `dma`, which must
    /// be the one the device driver's [`IommuHal`](super::IommuHal) names.
    pub fn new(inner: T, dma: &'static SharedDma<L>) -> Self {
        Self { inner, dma }
    }

    /// The wrapped transport.
    pub fn inner(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: VdTransportTrait, L: Locks> VdTransportTrait for IommuTransport<T, L> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let offered = self.inner.read_device_features() & ACCESS_PLATFORM;
        self.inner.write_driver_features(driver_features | offered);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    /// Syncs the queued MAPs, then notifies. A failed sync still notifies:
    /// the device then faults on the unmapped IOVAs and fails the request,
    /// which the driver sees; without the notify it would wait forever.
    fn notify(&mut self, queue: u16) {
        let _ = self.dma.sync();
        self.inner.notify(queue);
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner.queue_set(queue, size, descriptors, driver_area, device_area);
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue);
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> VdResult<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> VdResult<()> {
        self.inner.write_config_space(offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::chunks;
    use alloc::vec::Vec;

    /// Config accesses are as wide as alignment and length allow, and cover
    /// the range exactly once.
    #[test]
    fn config_accesses_split_by_alignment() {
        let got: Vec<_> = chunks(1, 9).collect();
        assert_eq!(got, [(1, 1), (2, 2), (4, 4), (8, 2)]);
        let got: Vec<_> = chunks(0, 36).map(|c| c.1).collect();
        assert_eq!(got, [4; 9]);
        assert_eq!(chunks(3, 0).count(), 0);
    }
}
