//! [`VirtioBackend`] for the viommu device model.

use viommu_device::VirtioIommu;
use viommu_driver::QueueAddrs;
use viommu_proto::{EVENT_QUEUE, REQUEST_QUEUE};
use vm_memory::GuestMemoryMmap;

use crate::transport::VirtioBackend;

impl VirtioBackend for VirtioIommu {
    fn device_features(&self) -> u64 {
        VirtioIommu::device_features(self)
    }

    fn ack_features(&mut self, features: u64) -> bool {
        VirtioIommu::ack_features(self, features);
        // The device keeps what it offered; refuse a driver asking for more.
        self.acked_features() == features
    }

    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        VirtioIommu::read_config(self, offset as u64, buf);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        // A refused write is ignored, as a register write to a read-only field.
        let _ = VirtioIommu::write_config(self, offset as u64, data);
    }

    fn reset(&mut self) {
        VirtioIommu::reset(self);
    }

    fn max_queue_size(&self, queue: u16) -> u16 {
        if queue == REQUEST_QUEUE || queue == EVENT_QUEUE {
            viommu_device::QUEUE_MAX_SIZE
        } else {
            0
        }
    }

    fn set_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        // A bad setup leaves the queue not ready; activation then fails and
        // the transport reports DEVICE_NEEDS_RESET.
        let _ = VirtioIommu::set_queue(self, queue, size, addrs.desc, addrs.avail, addrs.used);
    }

    fn activate(&mut self, _mem: &GuestMemoryMmap) -> bool {
        VirtioIommu::activate(self).is_ok()
    }

    fn process_queue(&mut self, queue: u16, mem: &GuestMemoryMmap) -> Result<bool, String> {
        let r = match queue {
            REQUEST_QUEUE => self.process_request_queue(mem),
            // Fault events are pushed by the fault notifier poking this queue.
            EVENT_QUEUE => self.process_event_queue(mem),
            _ => return Ok(false),
        };
        r.map_err(|e| e.to_string())
    }
}
