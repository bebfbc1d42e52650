//! What the driver needs from the bus it sits on: feature negotiation,
//! config access, queue setup and notification. DMA memory is [`Hal`](crate::hal::Hal)'s job.
//!
//! Implementations: the in-process VM (`crates/vm`), Linux userspace over
//! sysfs PCI (`crates/guest`), and the test fakes in this crate.

use alloc::boxed::Box;

/// Virtio device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device has hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest has given up on the device.
    pub const FAILED: u8 = 128;
}

/// Bus addresses of the three parts of one split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// A virtio transport (PCI, MMIO, or an in-process link).
///
/// All methods are infallible register accesses, as on real hardware; the
/// driver checks status bits to detect failure.
pub trait Transport: Send {
    /// Reads the 64 feature bits the device offers.
    fn device_features(&mut self) -> u64;
    /// Writes the feature bits the driver accepts.
    fn set_driver_features(&mut self, features: u64);
    /// Reads the device status byte.
    fn status(&mut self) -> u8;
    /// Writes the device status byte. Writing 0 resets the device.
    fn set_status(&mut self, status: u8);
    /// Largest queue size the device allows for `queue`; 0 if the queue does not exist.
    fn max_queue_size(&mut self, queue: u16) -> u16;
    /// Sets size and addresses of `queue` and enables it.
    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs);
    /// Notifies the device that `queue` has new buffers (a "kick").
    fn notify(&mut self, queue: u16);
    /// Reads device-specific config bytes at `offset`.
    fn read_config(&mut self, offset: usize, buf: &mut [u8]);
    /// Writes device-specific config bytes at `offset`.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// Config generation counter, for consistent multi-field reads.
    fn config_generation(&mut self) -> u32 {
        0
    }
    /// Called while the driver polls `queue` for completions. A transport
    /// with interrupts may block here until the device signals; the default
    /// just spins. The driver re-checks the used ring after every return,
    /// so spurious returns are fine.
    fn wait_for_used(&mut self, queue: u16) {
        let _ = queue;
        core::hint::spin_loop();
    }
    /// A handle that waits for completions without the transport itself,
    /// asked for once when the driver starts.
    ///
    /// The driver serialises calls on the transport, so a thread blocked in
    /// [`Transport::wait_for_used`] would hold up every other thread's
    /// [`Transport::notify`]. With a waiter, any number of threads wait at
    /// once and nobody's kick queues behind a wait. `None` (the default)
    /// keeps the old path: the driver calls `wait_for_used` only when the
    /// transport is free, and otherwise yields.
    fn used_waiter(&mut self) -> Option<Box<dyn UsedWaiter>> {
        None
    }
}

/// Waits for the device to use buffers, shared by all of the driver's
/// threads (see [`Transport::used_waiter`]).
///
/// ```
/// use viommu_driver::transport::UsedWaiter;
/// /// Waits by spinning: fine for a device that completes within a notify.
/// struct Spin;
/// impl UsedWaiter for Spin {
///     fn wait_for_used(&self, _queue: u16) {
///         core::hint::spin_loop();
///     }
/// }
/// Spin.wait_for_used(0);
/// ```
pub trait UsedWaiter: Send + Sync {
    /// Called while a thread polls `queue` for completions, with no driver
    /// lock held. It may block until the device signals (an interrupt), but
    /// should return after a short while anyway (the driver checks its
    /// timeout between calls). The driver re-checks the used ring after
    /// every return, so spurious returns are fine; a missed interrupt is
    /// not: one that comes between the driver's last look at the ring and
    /// this call must still end the wait.
    fn wait_for_used(&self, queue: u16);
}

pub mod pci_caps;
