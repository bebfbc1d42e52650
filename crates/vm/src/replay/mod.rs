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
//! Lines `[pid@]time:event args` or `event args` from
//! `-trace virtio_iommu_*,virtio_queue_notify`.
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

mod run;
pub mod trace;

use std::collections::BTreeSet;
use std::fmt;

pub use run::{
    device_config, run, run_virtqueue, QueueReplayError, Report, MAX_FAILURES, SENT_NAMES,
};
use trace::{IommuVdev, TraceLine};

use viommu_proto::{
    AttachBody, DetachBody, MapBody, ProbeBody, Request, UnmapBody, ATTACH_F_BYPASS, MAP_F_MMIO,
    MAP_F_READ, MAP_F_WRITE,
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
        Some(l) if TraceLine::looks_like_trace(l) => parse_qemu_trace(text),
        _ => parse_native(text),
    }
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
        Op::Request(Request::AttachTable(b)) => Some(b.endpoint.get()),
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
            // The draft's page-table requests have no native form: written as raw bytes.
            Op::Request(r @ (Request::AttachTable(_) | Request::Invalidate(_))) => {
                let mut buf = [0u8; 96];
                let n = r.encode(&mut buf).unwrap_or(0);
                format!("raw {}", buf[..n].iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Parses QEMU trace lines.
pub fn parse_qemu_trace(text: &str) -> Result<Stream, ParseError> {
    let mut vdev = IommuVdev::default();
    text.lines().filter_map(TraceLine::parse).for_each(|l| vdev.observe(&l));
    let iommu_vdev = vdev.get();

    let mut ops = Vec::new();
    let mut skipped = 0;
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| ParseError { line: i + 1, message };
        let Some(t) = TraceLine::parse(line) else {
            if !line.trim().is_empty() {
                skipped += 1;
            }
            continue;
        };
        let get = |k: &str| t.arg(k);
        let op = match t.event {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn qemu_trace_errors_name_the_line() {
        let text = "1.0:virtio_iommu_attach domain=0 endpoint=24\n\
                    2.0:virtio_iommu_map domain=0 virt_start=0xzz virt_end=0x1fff phys_start=0 flags=1\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("virt_start"), "{e}");
        let e = parse("1.0:virtio_iommu_unmap domain=0 virt_start=0x1000\n").unwrap_err();
        assert!(e.message.contains("missing virt_end"), "{e}");
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
}
