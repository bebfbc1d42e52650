//! Running a stream: through the device's raw request path, or through the
//! full virtqueue path with the device on its I/O thread.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use viommu_device::{ConfigError, DeviceConfig, EndpointConfig, Iommu};
use viommu_proto::{RequestType, Status};

use super::{Op, Stream};

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Requests sent, by type (ATTACH, DETACH, MAP, UNMAP, PROBE), then raw.
    pub sent: [u64; 6],
    /// Answers by status code (index = status byte; 0 = OK).
    pub statuses: [u64; 9],
    /// Requests answered with used length 0 (malformed).
    pub malformed: u64,
    /// Kicks in the stream (batches).
    pub kicks: u64,
    /// Time spent in the device's request path, in total.
    pub elapsed: Duration,
    /// Time per request type, as `sent`.
    pub elapsed_by_type: [Duration; 6],
    /// The first requests not answered OK: (index in the stream, request, status or
    /// `None` for malformed).
    pub failures: Vec<(usize, Op, Option<Status>)>,
    /// Domains alive at the end.
    pub domains_left: usize,
}

/// Names of the `sent` slots.
pub const SENT_NAMES: [&str; 6] = ["ATTACH", "DETACH", "MAP", "UNMAP", "PROBE", "raw"];

/// How many failures a report keeps.
pub const MAX_FAILURES: usize = 20;

impl Report {
    /// Requests sent.
    pub fn total(&self) -> u64 {
        self.sent.iter().sum()
    }

    /// Mean device time per request.
    pub fn per_request(&self) -> Duration {
        self.elapsed.checked_div(self.total().max(1) as u32).unwrap_or_default()
    }
}

/// The device a stream is replayed on: every endpoint the stream names, the
/// whole 64-bit IOVA space, every 32-bit domain ID, 4 KiB granule.
pub fn device_config(stream: &Stream) -> DeviceConfig {
    DeviceConfig {
        input_range: (0, u64::MAX),
        domain_range: (0, u32::MAX),
        endpoints: stream.endpoints.iter().map(|&id| EndpointConfig::new(id)).collect(),
        ..DeviceConfig::default()
    }
}

/// Feeds `stream` through a fresh device's raw request path
/// ([`Iommu::handle_request`]), timing each request.
pub fn run(stream: &Stream) -> Result<Report, ConfigError> {
    let iommu = Iommu::new(device_config(stream))?;
    let probe_size = iommu.config().probe_size as usize;
    let mut writable = vec![0u8; probe_size + 4];
    let mut readable = [0u8; 128];
    let mut report = Report::default();
    for (index, op) in stream.ops.iter().enumerate() {
        let (bytes, slot): (&[u8], usize) = match op {
            Op::Kick => {
                report.kicks += 1;
                continue;
            }
            Op::Raw(b) => (b, 5),
            Op::Request(r) => {
                let n = r.encode(&mut readable).expect("128 bytes hold any request");
                (&readable[..n], r.request_type() as usize - 1)
            }
        };
        // The device-writable part: PROBE properties, then the tail.
        let is_probe = bytes.first() == Some(&(RequestType::Probe as u8));
        let wlen = if is_probe { probe_size + 4 } else { 4 };
        let start = Instant::now();
        let used = iommu.handle_request(bytes, &mut writable[..wlen]) as usize;
        let took = start.elapsed();
        report.elapsed += took;
        report.elapsed_by_type[slot] += took;
        report.sent[slot] += 1;
        let status = if used >= 4 { Status::from_u8(writable[used - 4]) } else { None };
        match status {
            Some(s) => report.statuses[s as usize] += 1,
            None => report.malformed += 1,
        }
        if status != Some(Status::Ok) && report.failures.len() < MAX_FAILURES {
            report.failures.push((index, op.clone(), status));
        }
    }
    report.domains_left = iommu.domain_count();
    Ok(report)
}

/// Why a replay through the virtqueue could not run.
#[derive(Debug, thiserror::Error)]
pub enum QueueReplayError {
    /// The device refused its configuration.
    #[error("device: {0}")]
    Device(#[from] viommu_device::Error),
    /// Guest RAM or a ring could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// The device did not accept the features or failed.
    #[error("device status {0:#x}")]
    Status(u8),
}

/// Feeds `stream` through the full virtqueue path: a fresh device on its own
/// I/O thread ([`crate::DeviceLink`]), a split request queue in guest RAM, one
/// descriptor chain per request. Requests between two `kick`s are added
/// together and notified once, as recorded; the replay then waits for all of
/// them, as the driver did. A stream without kicks is sent in batches of up
/// to the queue size. `elapsed` is the wall time of the whole replay;
/// per-type times are not measured (requests complete in batches).
pub fn run_virtqueue(stream: &Stream) -> Result<Report, QueueReplayError> {
    use viommu_driver::queue::{Buffer, SplitQueue};
    use viommu_driver::transport::status;
    use viommu_driver::Transport;

    let setup = |e: &dyn fmt::Display| QueueReplayError::Setup(e.to_string());
    let ram = crate::GuestRam::new(16 << 20).map_err(|e| setup(&e))?;
    let device = viommu_device::VirtioIommu::new(device_config(stream))?;
    let iommu = device.iommu();
    let link = crate::DeviceLink::start(device, ram.clone()).map_err(|e| setup(&e))?;
    let mut t = link.transport();
    t.set_status(0);
    t.set_status(status::ACKNOWLEDGE | status::DRIVER);
    let features = t.device_features();
    t.set_driver_features(features);
    t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    if t.status() & status::FEATURES_OK == 0 {
        return Err(QueueReplayError::Status(t.status()));
    }
    let event_idx =
        features & viommu_proto::features::bit(viommu_proto::features::RING_EVENT_IDX) != 0;
    let hal = std::sync::Arc::new(crate::GuestHal::new(ram.clone()));
    let size = t.max_queue_size(0).min(1024);
    let mut rq = SplitQueue::new(hal.clone(), 0, size, event_idx).map_err(|e| setup(&e))?;
    let evq = SplitQueue::new(hal, 1, 8, event_idx).map_err(|e| setup(&e))?;
    rq.setup(&mut t);
    evq.setup(&mut t);
    t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    if t.status() & status::DEVICE_NEEDS_RESET != 0 {
        return Err(QueueReplayError::Status(t.status()));
    }

    // One slot per chain: 128 readable bytes, then the writable part.
    let probe_size = iommu.config().probe_size as usize;
    let slot_len = (128 + probe_size + 4).next_multiple_of(64);
    let nslots = usize::from(size / 2);
    let slots = ram
        .alloc_pages((nslots * slot_len).div_ceil(viommu_driver::PAGE_SIZE))
        .ok_or_else(|| setup(&"guest RAM exhausted"))?;
    let slot_gpa = |i: usize| slots.gpa + (i * slot_len) as u64;

    let mut report = Report::default();
    let mut readable = [0u8; 128];
    // In flight: token -> (index in stream, slot, writable length).
    let mut inflight: HashMap<u16, (usize, usize, usize)> = HashMap::new();
    let mut free_slots: Vec<usize> = (0..nslots).rev().collect();
    let start = Instant::now();

    let complete = |rq: &mut SplitQueue<crate::GuestHal>,
                    t: &mut crate::VmTransport<viommu_device::VirtioIommu>,
                    inflight: &mut HashMap<u16, (usize, usize, usize)>,
                    free_slots: &mut Vec<usize>,
                    report: &mut Report| {
        while !inflight.is_empty() {
            match rq.pop_used() {
                Some(u) => {
                    let Some((index, slot, wlen)) = inflight.remove(&u.token) else { continue };
                    free_slots.push(slot);
                    let used = u.len as usize;
                    let mut tail = [0u8; 4];
                    let st = if (4..=wlen).contains(&used)
                        && ram.read(slot_gpa(slot) + 128 + used as u64 - 4, &mut tail).is_ok()
                    {
                        Status::from_u8(tail[0])
                    } else {
                        None
                    };
                    match st {
                        Some(s) => report.statuses[s as usize] += 1,
                        None => report.malformed += 1,
                    }
                    if st != Some(Status::Ok) && report.failures.len() < MAX_FAILURES {
                        report.failures.push((index, stream.ops[index].clone(), st));
                    }
                }
                None => t.wait_for_used(0),
            }
        }
    };

    let mut pending_kick = false;
    for (index, op) in stream.ops.iter().enumerate() {
        let (bytes, slot_type): (&[u8], usize) = match op {
            Op::Kick => {
                report.kicks += 1;
                if rq.kick_prepare() {
                    t.notify(0);
                }
                pending_kick = false;
                complete(&mut rq, &mut t, &mut inflight, &mut free_slots, &mut report);
                continue;
            }
            Op::Raw(b) => (b.as_slice(), 5),
            Op::Request(r) => {
                let n = r.encode(&mut readable).expect("128 bytes hold any request");
                (&readable[..n], r.request_type() as usize - 1)
            }
        };
        let bytes = &bytes[..bytes.len().min(128)];
        let is_probe = bytes.first() == Some(&(RequestType::Probe as u8));
        let wlen = if is_probe { probe_size + 4 } else { 4 };
        if free_slots.is_empty() || rq.num_free() < 2 {
            // Full: send what is there and wait, as a driver does.
            if rq.kick_prepare() {
                t.notify(0);
            }
            complete(&mut rq, &mut t, &mut inflight, &mut free_slots, &mut report);
        }
        let slot = free_slots.pop().expect("slots were just freed");
        let gpa = slot_gpa(slot);
        ram.write(gpa, bytes).map_err(|e| setup(&e))?;
        let chain = [
            Buffer::readable(gpa, bytes.len().max(1) as u32),
            Buffer::writable(gpa + 128, wlen as u32),
        ];
        let token = rq.add(&chain).map_err(|e| setup(&e))?;
        inflight.insert(token, (index, slot, wlen));
        report.sent[slot_type] += 1;
        pending_kick = true;
    }
    if pending_kick || !inflight.is_empty() {
        if rq.kick_prepare() {
            t.notify(0);
        }
        complete(&mut rq, &mut t, &mut inflight, &mut free_slots, &mut report);
    }
    report.elapsed = start.elapsed();
    report.domains_left = iommu.domain_count();
    t.set_status(0);
    drop(link);
    ram.free_pages(slots);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::parse_native;

    #[test]
    fn virtqueue_replay_agrees_with_the_raw_path() {
        let text =
            "attach 1 24\nkick\nmap 1 0x1000 0x1fff 0x5000 rw\nmap 1 0x1000 0x1fff 0x9000 r\n\
                    kick\nunmap 1 0x1000 0x17ff\nunmap 1 0 0xffffffffffffffff\nprobe 24\n\
                    raw 09000000\nraw 03\ndetach 1 24\n";
        let s = parse_native(text).unwrap();
        let raw = run(&s).unwrap();
        let vq = run_virtqueue(&s).unwrap();
        assert_eq!(vq.sent, raw.sent);
        assert_eq!(vq.statuses, raw.statuses);
        assert_eq!(vq.malformed, raw.malformed);
        assert_eq!(vq.kicks, 2);
        assert_eq!(
            vq.failures.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>(),
            raw.failures.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>()
        );
        // A long stream without kicks goes out in queue-sized batches.
        let many: String = (0..3000u64)
            .map(|i| format!("map 1 {:#x} {:#x} 0 r\n", i << 12, (i << 12) | 0xfff))
            .collect();
        let s = parse_native(&format!("attach 1 5\n{many}")).unwrap();
        let r = run_virtqueue(&s).unwrap();
        assert_eq!(r.statuses[Status::Ok as usize], 3001);
    }

    #[test]
    fn run_reports_statuses_and_counts() {
        let text =
            "attach 1 24\nkick\nmap 1 0x1000 0x1fff 0x5000 rw\nmap 1 0x1000 0x1fff 0x9000 r\n\
                    kick\nunmap 1 0x1000 0x17ff\nunmap 1 0 0xffffffffffffffff\nprobe 24\nprobe 5\n\
                    raw 09000000\nraw 03\ndetach 1 24\n";
        let s = parse_native(text).unwrap();
        let r = run(&s).unwrap();
        assert_eq!(r.sent, [1, 1, 2, 2, 2, 2]);
        assert_eq!(r.kicks, 2);
        // OK: attach, first map, full unmap, both probes (every endpoint named is known), detach.
        assert_eq!(r.statuses[Status::Ok as usize], 6);
        assert_eq!(r.statuses[Status::Inval as usize], 1, "overlapping map");
        assert_eq!(r.statuses[Status::Range as usize], 1, "split unmap");
        assert_eq!(r.statuses[Status::Unsupp as usize], 0);
        assert_eq!(r.malformed, 2, "unknown type 9 and truncated MAP: used length 0");
        assert_eq!(r.failures.len(), 4);
        assert_eq!(r.failures[0].0, 3);
        assert_eq!(r.domains_left, 0);
    }
}
