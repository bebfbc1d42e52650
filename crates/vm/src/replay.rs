//! Recorded request streams: a native text format, an importer for QEMU's
//! `virtio_iommu_*` trace lines, and a runner feeding a stream to a device
//! through its raw request path.
//!
//! # Native format
//! One request per line; `#` starts a comment; numbers are decimal or `0x` hex.
//! ```text
//! attach DOMAIN ENDPOINT [bypass]
//! detach DOMAIN ENDPOINT
//! map    DOMAIN VIRT_START VIRT_END PHYS_START FLAGS   # FLAGS: number, or letters r w m
//! unmap  DOMAIN VIRT_START VIRT_END
//! probe  ENDPOINT
//! raw    HEXBYTES        # head+body bytes as sent, e.g. a malformed request
//! kick                   # end of a batch: the driver notified the device here
//! ```
//! `virt_end` is inclusive, as on the wire.
//!
//! # QEMU trace
//! Lines `[pid@]time:event args` from `-trace virtio_iommu_*,virtio_queue_notify`.
//! `virtio_iommu_{attach,detach,map,unmap}` become requests. The IOMMU's
//! request-queue notifications (`virtio_queue_notify ... n 0`) become kicks:
//! the IOMMU's `vdev` is the one whose notifications are followed by
//! `virtio_iommu_*` lines. Other lines are counted and skipped.
//!
//! ```
//! use viommu_vm::replay::{parse, Op};
//! let s = parse("attach 1 24\nmap 1 0x1000 0x1fff 0x5000 rw\nkick\n").unwrap();
//! assert_eq!(s.ops.len(), 3);
//! assert!(matches!(s.ops[2], Op::Kick));
//! assert_eq!(s.endpoints, vec![24]);
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use viommu_device::{ConfigError, DeviceConfig, EndpointConfig, Iommu};

use viommu_proto::{
    AttachBody, DetachBody, MapBody, ProbeBody, Request, RequestType, Status, UnmapBody,
    ATTACH_F_BYPASS, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE,
};

/// One step of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A well-formed request.
    Request(Request),
    /// Raw head+body bytes, sent as they are.
    Raw(Vec<u8>),
    /// The driver kicked the request queue: the end of a batch.
    Kick,
}

/// Which syntax a stream was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The native one-request-per-line format.
    Native,
    /// QEMU trace lines.
    QemuTrace,
}

/// A parsed stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// The steps, in order.
    pub ops: Vec<Op>,
    /// Every endpoint named by ATTACH, DETACH or PROBE (sorted): the device
    /// running the stream must know them.
    pub endpoints: Vec<u32>,
    /// The syntax it came from.
    pub format: Format,
    /// Lines ignored (other trace events, other devices' notifications).
    pub skipped_lines: usize,
}

/// A line that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses either format, chosen by looking at the first meaningful line.
pub fn parse(text: &str) -> Result<Stream, ParseError> {
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
    match first {
        Some(l) if is_trace_line(l) => parse_qemu_trace(text),
        _ => parse_native(text),
    }
}

fn is_trace_line(l: &str) -> bool {
    l.split_once(':').is_some_and(|(pre, _)| {
        !pre.is_empty() && pre.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'@')
    })
}

fn num<T: TryFrom<u64>>(tok: Option<&str>, what: &str) -> Result<T, String> {
    let tok = tok.ok_or_else(|| format!("missing {what}"))?;
    let v = match tok.strip_prefix("0x").or_else(|| tok.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => tok.parse::<u64>(),
    }
    .map_err(|_| format!("bad {what} {tok:?}"))?;
    T::try_from(v).map_err(|_| format!("{what} {tok} out of range"))
}

fn map_flags(tok: Option<&str>) -> Result<u32, String> {
    let tok = tok.ok_or("missing flags")?;
    if tok.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return num(Some(tok), "flags");
    }
    tok.chars().try_fold(0, |acc, c| match c {
        'r' => Ok(acc | MAP_F_READ),
        'w' => Ok(acc | MAP_F_WRITE),
        'm' => Ok(acc | MAP_F_MMIO),
        '-' => Ok(acc),
        _ => Err(format!("bad flag letter {c:?} (use r, w, m or a number)")),
    })
}

/// Builds a MAP request.
pub fn map_request(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Request {
    Request::Map(MapBody {
        domain: domain.into(),
        virt_start: start.into(),
        virt_end: end.into(),
        phys_start: phys.into(),
        flags: flags.into(),
    })
}

/// Builds an UNMAP request.
pub fn unmap_request(domain: u32, start: u64, end: u64) -> Request {
    Request::Unmap(UnmapBody {
        domain: domain.into(),
        virt_start: start.into(),
        virt_end: end.into(),
        reserved: [0; 4],
    })
}

/// Builds an ATTACH request.
pub fn attach_request(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(AttachBody {
        domain: domain.into(),
        endpoint: endpoint.into(),
        flags: flags.into(),
        reserved: [0; 4],
    })
}

/// Builds a DETACH request.
pub fn detach_request(domain: u32, endpoint: u32) -> Request {
    Request::Detach(DetachBody {
        domain: domain.into(),
        endpoint: endpoint.into(),
        reserved: [0; 8],
    })
}

/// Builds a PROBE request.
pub fn probe_request(endpoint: u32) -> Request {
    Request::Probe(ProbeBody { endpoint: endpoint.into(), ..ProbeBody::default() })
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad hex {:?}", &s[i..i + 2]))
        })
        .collect()
}

fn endpoint_of(op: &Op) -> Option<u32> {
    match op {
        Op::Request(Request::Attach(b)) => Some(b.endpoint.get()),
        Op::Request(Request::Detach(b)) => Some(b.endpoint.get()),
        Op::Request(Request::Probe(b)) => Some(b.endpoint.get()),
        _ => None,
    }
}

fn finish(ops: Vec<Op>, format: Format, skipped_lines: usize) -> Stream {
    let endpoints: BTreeSet<u32> = ops.iter().filter_map(endpoint_of).collect();
    Stream { ops, endpoints: endpoints.into_iter().collect(), format, skipped_lines }
}

/// Parses the native format.
pub fn parse_native(text: &str) -> Result<Stream, ParseError> {
    let mut ops = Vec::new();
    for (i, raw_line) in text.lines().enumerate() {
        let line = raw_line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let op = native_line(line).map_err(|message| ParseError { line: i + 1, message })?;
        ops.push(op);
    }
    Ok(finish(ops, Format::Native, 0))
}

fn native_line(line: &str) -> Result<Op, String> {
    let mut t = line.split_whitespace();
    let verb = t.next().unwrap_or_default();
    let op = match verb {
        "attach" => {
            let (d, e) = (num(t.next(), "domain")?, num(t.next(), "endpoint")?);
            let flags = match t.next() {
                None => 0,
                Some("bypass") => ATTACH_F_BYPASS,
                Some(f) => num(Some(f), "attach flags")?,
            };
            Op::Request(attach_request(d, e, flags))
        }
        "detach" => {
            Op::Request(detach_request(num(t.next(), "domain")?, num(t.next(), "endpoint")?))
        }
        "map" => Op::Request(map_request(
            num(t.next(), "domain")?,
            num(t.next(), "virt_start")?,
            num(t.next(), "virt_end")?,
            num(t.next(), "phys_start")?,
            map_flags(t.next())?,
        )),
        "unmap" => Op::Request(unmap_request(
            num(t.next(), "domain")?,
            num(t.next(), "virt_start")?,
            num(t.next(), "virt_end")?,
        )),
        "probe" => Op::Request(probe_request(num(t.next(), "endpoint")?)),
        "raw" => return Ok(Op::Raw(parse_hex(line["raw".len()..].trim())?)),
        "kick" => Op::Kick,
        _ => return Err(format!("unknown request {verb:?}")),
    };
    match t.next() {
        Some(extra) => Err(format!("unexpected {extra:?} after {verb}")),
        None => Ok(op),
    }
}

/// Writes a stream in the native format (the inverse of [`parse_native`]).
pub fn to_native(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        let line = match op {
            Op::Kick => "kick".to_string(),
            Op::Raw(bytes) => {
                format!("raw {}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
            Op::Request(Request::Attach(b)) => {
                let bypass = if b.flags.get() == ATTACH_F_BYPASS { " bypass" } else { "" };
                format!("attach {} {}{bypass}", b.domain, b.endpoint)
            }
            Op::Request(Request::Detach(b)) => format!("detach {} {}", b.domain, b.endpoint),
            Op::Request(Request::Map(b)) => format!(
                "map {} {:#x} {:#x} {:#x} {}",
                b.domain, b.virt_start, b.virt_end, b.phys_start, b.flags
            ),
            Op::Request(Request::Unmap(b)) => {
                format!("unmap {} {:#x} {:#x}", b.domain, b.virt_start, b.virt_end)
            }
            Op::Request(Request::Probe(b)) => format!("probe {}", b.endpoint),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Arguments `key=value` or `key value` of one trace line.
fn trace_args(args: &str) -> HashMap<&str, &str> {
    let mut map = HashMap::new();
    let mut toks = args.split_whitespace();
    while let Some(tok) = toks.next() {
        match tok.split_once('=') {
            Some((k, v)) => map.insert(k, v),
            None => map.insert(tok, toks.next().unwrap_or("")),
        };
    }
    map
}

/// Parses QEMU trace lines.
pub fn parse_qemu_trace(text: &str) -> Result<Stream, ParseError> {
    // First pass: which vdev is the IOMMU? Credit the last notified vdev for
    // each virtio_iommu_* line that follows it.
    let mut credit: HashMap<&str, usize> = HashMap::new();
    let mut last_vdev: Option<&str> = None;
    for line in text.lines() {
        let Some((event, args)) = trace_event(line) else { continue };
        if event == "virtio_queue_notify" {
            last_vdev = trace_args(args).get("vdev").copied();
        } else if is_request_event(event) {
            if let Some(v) = last_vdev.take() {
                *credit.entry(v).or_default() += 1;
            }
        }
    }
    let iommu_vdev = credit.into_iter().max_by_key(|&(_, n)| n).map(|(v, _)| v);

    let mut ops = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| ParseError { line: i + 1, message };
        let Some((event, args)) = trace_event(line) else {
            if !line.trim().is_empty() {
                skipped += 1;
            }
            continue;
        };
        let a = trace_args(args);
        let get = |k: &str| a.get(k).copied();
        let op = match event {
            "virtio_queue_notify" if get("vdev") == iommu_vdev && get("n") == Some("0") => Op::Kick,
            "virtio_iommu_attach" => Op::Request(attach_request(
                num(get("domain"), "domain").map_err(err)?,
                num(get("endpoint"), "endpoint").map_err(err)?,
                0,
            )),
            "virtio_iommu_detach" => Op::Request(detach_request(
                num(get("domain"), "domain").map_err(err)?,
                num(get("endpoint"), "endpoint").map_err(err)?,
            )),
            "virtio_iommu_map" => Op::Request(map_request(
                num(get("domain"), "domain").map_err(err)?,
                num(get("virt_start"), "virt_start").map_err(err)?,
                num(get("virt_end"), "virt_end").map_err(err)?,
                num(get("phys_start"), "phys_start").map_err(err)?,
                num(get("flags"), "flags").map_err(err)?,
            )),
            "virtio_iommu_unmap" => Op::Request(unmap_request(
                num(get("domain"), "domain").map_err(err)?,
                num(get("virt_start"), "virt_start").map_err(err)?,
                num(get("virt_end"), "virt_end").map_err(err)?,
            )),
            _ => {
                skipped += 1;
                continue;
            }
        };
        ops.push(op);
    }
    Ok(finish(ops, Format::QemuTrace, skipped))
}

fn is_request_event(event: &str) -> bool {
    matches!(
        event,
        "virtio_iommu_attach" | "virtio_iommu_detach" | "virtio_iommu_map" | "virtio_iommu_unmap"
    )
}

/// Splits `[pid@]time:event args` into event and args.
fn trace_event(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    let (pre, rest) = line.split_once(':')?;
    if pre.is_empty() || !pre.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'@') {
        return None;
    }
    Some(rest.split_once(' ').unwrap_or((rest, "")))
}

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
    fn native_round_trips() {
        let text = "attach 1 24\nattach 2 25 bypass\nmap 1 0x1000 0x1fff 0x5000 3\n\
                    unmap 1 0x0 0xffffffffffffffff\nprobe 24\ndetach 1 24\nraw 0500ff\nkick\n";
        let s = parse_native(text).unwrap();
        assert_eq!(s.ops.len(), 8);
        assert_eq!(s.endpoints, vec![24, 25]);
        assert_eq!(to_native(&s.ops), text);
        assert_eq!(s.ops[6], Op::Raw(vec![5, 0, 0xff]));
    }

    #[test]
    fn native_flag_letters_and_comments() {
        let s = parse("# hi\nmap 7 0 4095 8192 rwm # trailing\n").unwrap();
        assert_eq!(s.ops, vec![Op::Request(map_request(7, 0, 4095, 8192, 7))]);
    }

    #[test]
    fn native_errors_name_the_line() {
        let e = parse_native("kick\nmap 1 2\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("virt_end"), "{e}");
        assert!(parse_native("attach 1 2 3 4").is_err());
        assert!(parse_native("frob 1").is_err());
        assert!(parse_native("attach 99999999999 1").unwrap_err().message.contains("range"));
        assert!(parse_native("raw 123").is_err());
    }

    #[test]
    fn qemu_trace_finds_the_iommu_vdev() {
        let text = "\
1.0:virtio_queue_notify vdev 0xb n 0 vq 0x1
2.0:virtio_queue_notify vdev 0xa n 0 vq 0x2
2.1:virtio_iommu_attach domain=0 endpoint=24
3.0:virtio_queue_notify vdev 0xa n 0 vq 0x2
3.1:virtio_iommu_map domain=0 virt_start=0xffffe000 virt_end=0xffffffff phys_start=0x4b6e000 flags=3
4.0:virtio_queue_notify vdev 0xa n 1 vq 0x3
77@5.0:virtio_iommu_unmap domain=0 virt_start=0xffffe000 virt_end=0xffffffff
5.1:virtio_iommu_translate mr=x rid=1 addr=0x0 flag=1
";
        let s = parse(text).unwrap();
        assert_eq!(s.format, Format::QemuTrace);
        assert_eq!(
            s.ops,
            vec![
                Op::Kick,
                Op::Request(attach_request(0, 24, 0)),
                Op::Kick,
                Op::Request(map_request(0, 0xffffe000, 0xffffffff, 0x4b6e000, 3)),
                Op::Request(unmap_request(0, 0xffffe000, 0xffffffff)),
            ]
        );
        assert_eq!(s.skipped_lines, 3, "other vdev, event queue, translate");
        assert_eq!(s.endpoints, vec![24]);
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
        assert_eq!(r.statuses[Status::Unsupp as usize], 1, "unknown type 9");
        assert_eq!(r.malformed, 1, "truncated MAP");
        assert_eq!(r.failures.len(), 4);
        assert_eq!(r.failures[0].0, 3);
        assert_eq!(r.domains_left, 0);
    }
}
