//! The hostile device behind the driver's `Transport`: it answers in `notify` and, as a
//! slow device would, in the driver's waits.

use std::sync::{Arc, Mutex};

use viommu_driver::{QueueAddrs, Transport, UsedWaiter};
use viommu_proto::features::{self as f, bit};
use viommu_proto::{probe, Request, RequestType, EVENT_QUEUE, REQUEST_QUEUE};

use super::rings::{gather, scatter, writable_len, Ring};
use super::{Pool, Script};
use crate::input::Input;

/// Device status bits (virtio 1.2 §2.1).
const FEATURES_OK: u8 = 8;
const DEVICE_NEEDS_RESET: u8 = 64;
/// Bytes of a fault event (§5.13.6.9).
const FAULT_EVENT: usize = 24;

/// The device proper: both rings and the script it answers from.
pub struct Hostile {
    script: Script,
    pool: Arc<Pool>,
    rings: [Option<Ring>; 2],
}

impl Hostile {
    /// One round of device work: answers requests (each as the script says), then
    /// delivers up to 3 fault events, maybe moves ring fields.
    fn step(&mut self) {
        let Self { script, pool, rings } = self;
        if let Some(r) = rings[usize::from(REQUEST_QUEUE)].as_mut() {
            r.take_avail(pool);
            while let Some(head) = r.pending.pop_front() {
                if !answer_request(script, pool, r, head) {
                    r.pending.push_front(head);
                    break;
                }
            }
        }
        let ctl = script.u8();
        if let Some(r) = rings[usize::from(EVENT_QUEUE)].as_mut() {
            r.take_avail(pool);
            for _ in 0..ctl % 4 {
                let Some(head) = r.pending.pop_front() else { break };
                deliver_event(script, pool, r, head);
            }
        }
        let Some(r) = rings[usize::from(ctl >> 7)].as_mut() else { return };
        match ctl {
            0xff | 0x7f => r.set_used_idx(pool, script.read(|i| i.u16())),
            0xfe | 0x7e => r.set_avail_event(pool, script.read(|i| i.u16())),
            _ => {}
        }
    }
}

/// Answers one request as the script says; false leaves it (and those after it) pending.
/// With the script over, every request gets a correct OK answer.
fn answer_request(script: &Script, pool: &Pool, r: &mut Ring, head: u16) -> bool {
    let how = script.u8();
    let bufs = r.chain(pool, head);
    let w = writable_len(&bufs);
    let ty = Request::parse(&gather(pool, &bufs, 128)).ok().map(|q| q.request_type());
    let reply = script.read(|i| reply_bytes(i, w, ty == Some(RequestType::Probe)));
    let id = u32::from(head);
    let len = w.min(u64::from(u32::MAX)) as u32;
    match how % 8 {
        5 if !script.is_empty() => return false,
        6 => r.push_used(pool, script.read(|i| i.u32()), script.read(|i| i.u32())),
        7 => {
            scatter(pool, &bufs, &reply);
            r.push_used(pool, id, len);
            r.push_used(pool, id, len);
        }
        4 => {
            scatter(pool, &bufs, &reply);
            r.push_used(pool, id, script.read(|i| i.u32()));
        }
        _ => {
            scatter(pool, &bufs, &reply);
            r.push_used(pool, id, len);
        }
    }
    true
}

/// The writable part of an answer, `w` bytes: properties (for PROBE) then the tail. One
/// byte chooses: bit 7 clear: status OK, else status = bits 0-6 (defined or not); bits 5-6:
/// zero properties, one RESV_MEM property from the script, or raw script bytes.
fn reply_bytes(i: &mut Input, w: u64, probe: bool) -> Vec<u8> {
    let sel = i.u8();
    let mut out = vec![0u8; w.min(1 << 16) as usize];
    let n = out.len();
    if n >= 4 {
        out[n - 4] = if sel & 0x80 == 0 { 0 } else { sel & 0x7f };
    }
    if probe {
        let props = n.saturating_sub(4);
        let src: Vec<u8> = match (sel >> 5) & 3 {
            1 => resv_mem_property(i),
            2 => i.string().to_vec(),
            _ => Vec::new(),
        };
        let k = src.len().min(props);
        out[..k].copy_from_slice(&src[..k]);
    }
    out
}

/// A RESV_MEM property (§5.13.6.8.2) with subtype, start and end from the script.
fn resv_mem_property(i: &mut Input) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&probe::T_RESV_MEM.to_le_bytes());
    p.extend_from_slice(&20u16.to_le_bytes());
    p.extend_from_slice(&[i.u8() % 3, 0, 0, 0]);
    p.extend_from_slice(&i.u64().to_le_bytes());
    p.extend_from_slice(&i.u64().to_le_bytes());
    p
}

/// Puts one fault event (raw script bytes) in an event buffer; the used length is right,
/// or from the script.
fn deliver_event(script: &Script, pool: &Pool, r: &mut Ring, head: u16) {
    let bufs = r.chain(pool, head);
    let (event, exact, len) =
        script.read(|i| (i.bytes(FAULT_EVENT).to_vec(), i.u8() & 1 == 0, i.u32()));
    scatter(pool, &bufs, &event);
    r.push_used(pool, u32::from(head), if exact { FAULT_EVENT as u32 } else { len });
}

/// The transport: register accesses answered from the script, device work on kicks and
/// waits. Its setup (features, config, quirks) is read when it is made.
pub struct HostileTransport {
    dev: Arc<Mutex<Hostile>>,
    script: Script,
    offered: u64,
    config: [u8; 40],
    /// 0: stable generation; 1: changes on every read; 2: changes on the first
    /// `gen_changes` reads; 3: as 2, and each change also rewrites a config byte.
    gen_mode: u8,
    gen_changes: u8,
    generation: u32,
    status: u8,
    /// Bit 0: FEATURES_OK does not stick. Bit 1: DEVICE_NEEDS_RESET after
    /// `needs_reset_after` status reads. Bit 2: status stays non-zero after a reset.
    quirks: u8,
    needs_reset_after: u8,
    max_sizes: [u16; 2],
    waiter: bool,
}

impl HostileTransport {
    /// A device over `pool`, set up from the script.
    pub fn new(script: Script, pool: Arc<Pool>) -> Self {
        let dev = Hostile { script: script.clone(), pool, rings: [None, None] };
        let mut t = script.read(|i| Self {
            dev: Arc::new(Mutex::new(dev)),
            script: script.clone(),
            offered: offered_features(i),
            config: config_bytes(i),
            gen_mode: i.u8() % 4,
            gen_changes: i.u8(),
            generation: 0,
            status: 0,
            quirks: i.u8(),
            needs_reset_after: i.u8(),
            max_sizes: [i.u16(), i.u16()],
            waiter: i.u8() & 1 != 0,
        });
        if t.max_sizes == [0, 0] {
            // The script's default: sizes that work.
            t.max_sizes = [64, 16];
        }
        t
    }

    fn step(&self) {
        self.dev.lock().unwrap_or_else(|e| e.into_inner()).step();
    }
}

/// Offered features: one selector byte; then either 8 raw bytes, or 2 bytes choosing
/// which of the optional features the driver knows come with VERSION_1 and MAP_UNMAP.
fn offered_features(i: &mut Input) -> u64 {
    if i.u8() & 1 != 0 {
        return i.u64();
    }
    let pick = !i.u16();
    let optional = [
        f::INPUT_RANGE,
        f::DOMAIN_RANGE,
        f::PROBE,
        f::MMIO,
        f::BYPASS_CONFIG,
        f::RING_EVENT_IDX,
        f::RING_INDIRECT_DESC,
        f::ACCESS_PLATFORM,
        f::BYPASS,
    ];
    let on = optional.iter().enumerate().filter(|(n, _)| pick & (1 << n) != 0);
    on.fold(bit(f::VERSION_1) | bit(f::MAP_UNMAP), |acc, (_, &b)| acc | bit(b))
}

/// Config bytes (§5.13.4): one selector byte; then either 40 raw bytes, or a few bytes
/// making a plausible config (granule, input_range, domain_range, probe_size).
fn config_bytes(i: &mut Input) -> [u8; 40] {
    let mut c = [0u8; 40];
    if i.u8() & 1 != 0 {
        let raw = i.bytes(40);
        c[..raw.len()].copy_from_slice(raw);
        return c;
    }
    let granule_shift = 12 + u32::from(i.u8() % 10);
    let input_bits = 20 + u32::from(i.u8() % 45);
    let input_end = if input_bits >= 64 { u64::MAX } else { (1u64 << input_bits) - 1 };
    let domain_end = u32::from(i.u8()).max(1);
    let probe_size = 4 * u32::from(i.u8()) + if i.u8() & 1 == 0 { 512 } else { 0 };
    c[0..8].copy_from_slice(&(!0u64 << granule_shift).to_le_bytes());
    c[16..24].copy_from_slice(&input_end.to_le_bytes());
    c[28..32].copy_from_slice(&domain_end.to_le_bytes());
    c[32..36].copy_from_slice(&probe_size.to_le_bytes());
    c
}

impl Transport for HostileTransport {
    fn device_features(&mut self) -> u64 {
        self.offered
    }

    fn set_driver_features(&mut self, _features: u64) {}

    fn status(&mut self) -> u8 {
        if self.quirks & 2 != 0 {
            if self.needs_reset_after == 0 {
                self.status |= DEVICE_NEEDS_RESET;
            } else {
                self.needs_reset_after -= 1;
            }
        }
        self.status
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            let mut d = self.dev.lock().unwrap_or_else(|e| e.into_inner());
            d.rings = [None, None];
            self.status = if self.quirks & 4 != 0 { 1 } else { 0 };
            return;
        }
        let sticky = if self.quirks & 1 != 0 { !FEATURES_OK } else { !0 };
        self.status = (status & sticky) | (self.status & DEVICE_NEEDS_RESET);
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.max_sizes.get(usize::from(queue)).copied().unwrap_or(0)
    }

    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        let mut d = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = d.rings.get_mut(usize::from(queue)) {
            *slot = Some(Ring::new(size, addrs));
        }
    }

    fn notify(&mut self, _queue: u16) {
        self.step();
    }

    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        for (k, b) in buf.iter_mut().enumerate() {
            *b = offset.checked_add(k).and_then(|o| self.config.get(o)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        for (k, &b) in data.iter().enumerate() {
            if let Some(c) = offset.checked_add(k).and_then(|o| self.config.get_mut(o)) {
                *c = b;
            }
        }
    }

    fn config_generation(&mut self) -> u32 {
        let change = match self.gen_mode {
            0 => false,
            1 => true,
            _ if self.gen_changes == 0 => false,
            _ => {
                self.gen_changes -= 1;
                true
            }
        };
        if change {
            self.generation = self.generation.wrapping_add(1);
            if self.gen_mode == 3 {
                let (at, v) = self.script.read(|i| (i.u8(), i.u8()));
                self.config[usize::from(at) % 40] = v;
            }
        }
        self.generation
    }

    fn wait_for_used(&mut self, _queue: u16) {
        // A slow device: it works in some of the driver's polls only.
        if self.script.u8() & 1 == 0 {
            self.step();
        }
    }

    fn used_waiter(&mut self) -> Option<Box<dyn UsedWaiter>> {
        self.waiter.then(|| Box::new(Waiter(self.dev.clone(), self.script.clone())) as _)
    }
}

/// The waiter path: waits run the device too, without the transport.
struct Waiter(Arc<Mutex<Hostile>>, Script);

impl UsedWaiter for Waiter {
    fn wait_for_used(&self, _queue: u16) {
        if self.1.u8() & 1 == 0 {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).step();
        }
    }
}
