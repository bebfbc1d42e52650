//! The event queue: fault records from the device.

use alloc::sync::Arc;
use alloc::vec::Vec;

use viommu_proto::{FaultEvent, EVENT_QUEUE};
use zerocopy::FromBytes;

use crate::hal::{DmaBuffer, Hal};
use crate::iommu::counters::bump;
use crate::iommu::device::VirtioIommu;
use crate::iommu::shared::Shared;
use crate::iommu::types::FaultRecord;
use crate::iommu::FaultHandler;
use crate::queue::{Buffer, SplitQueue};
use crate::sync::Locks;
use crate::transport::Transport;
use crate::Result;

pub(in crate::iommu) struct EventQueue<H: Hal> {
    pub(in crate::iommu) vq: SplitQueue<H>,
    /// The event buffers, freed after the device is reset.
    pub(in crate::iommu) bufs: DmaBuffer<Arc<H>>,
    /// Event buffer index by head token.
    pub(in crate::iommu) buf_of: Vec<u16>,
}

pub(in crate::iommu) const EVENT_BUF: usize = 64;

impl<H: Hal> EventQueue<H> {
    pub(in crate::iommu) fn post(&mut self, buf: u16) -> Result<()> {
        let bus = self.bufs.paddr() + (buf as usize * EVENT_BUF) as u64;
        let head = self.vq.add(&[Buffer::writable(bus, EVENT_BUF as u32)])?;
        self.buf_of[head as usize] = buf;
        Ok(())
    }
}

impl<T: Transport, H: Hal, L: Locks> Shared<T, H, L> {
    /// Takes one used event buffer and posts it again (not notified):
    /// `Ok(None)` when there is none, `Ok(Some(None))` for a buffer too short
    /// for a fault record (counted in `bad_events`).
    fn take_event(&self) -> Result<Option<Option<FaultRecord>>> {
        let mut ev = self.events.lock();
        let Some(used) = ev.vq.pop_used() else { return Ok(None) };
        let buf = ev.buf_of[used.token as usize];
        let mut bytes = [0u8; EVENT_BUF];
        ev.bufs.read(buf as usize * EVENT_BUF, &mut bytes);
        let record = match FaultEvent::read_from_prefix(&bytes) {
            Ok((e, _)) if used.len as usize >= size_of::<FaultEvent>() => Some(FaultRecord {
                reason: e.reason,
                flags: e.flags.get(),
                endpoint: e.endpoint.get(),
                address: (e.flags.get() & viommu_proto::fault::F_ADDRESS != 0)
                    .then(|| e.address.get()),
            }),
            _ => {
                bump(&self.counters.bad_events);
                None
            }
        };
        ev.bufs.fill(buf as usize * EVENT_BUF, EVENT_BUF, 0);
        ev.post(buf)?;
        Ok(Some(record))
    }
}

impl<T: Transport + 'static, H: Hal + 'static, L: Locks> VirtioIommu<T, H, L> {
    /// Registers the handler that receives fault records from [`Self::poll_events`].
    pub fn set_fault_handler(&self, handler: Option<FaultHandler>) {
        *self.shared.fault_handler.lock() = handler;
    }

    /// Consumes the event queue: takes at most
    /// [`DriverOptions::event_budget`](crate::DriverOptions::event_budget) event buffers, hands each fault record
    /// to the handler as it is taken (with the event queue unlocked),
    /// recycles the buffers and notifies the device once. Returns the number
    /// of fault records (also counted, handled or not); a call that used up
    /// its budget may have left events for the next one.
    pub fn poll_events(&self) -> Result<usize> {
        let s = &self.shared;
        let budget = s.opts.event_budget.max(1);
        let mut handler = s.fault_handler.lock();
        let mut records = 0;
        let mut taken = 0;
        let mut result = Ok(());
        while taken < budget {
            let record = match s.take_event() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            taken += 1;
            let Some(r) = record else { continue };
            records += 1;
            bump(&s.counters.faults);
            match handler.as_mut() {
                Some(h) => h(r),
                None => bump(&s.counters.faults_unhandled),
            }
        }
        drop(handler);
        let need = s.events.lock().vq.kick_prepare();
        if need {
            bump(&s.counters.event_kicks);
            s.notify(EVENT_QUEUE);
        }
        result.map(|()| records)
    }
}
