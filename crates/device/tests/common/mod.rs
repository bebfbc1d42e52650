//! Driver side for tests: guest memory, the two virtqueues (laid out by `rings`), and
//! request builders.
#![allow(dead_code)]

pub mod concurrent;
pub mod rings;

pub use rings::Rings;
use viommu_device::{DeviceConfig, EndpointConfig, ResvRegion, VirtioIommu};
use viommu_proto::features::{bit, BYPASS_CONFIG, MAP_UNMAP, MMIO, PROBE, RING_EVENT_IDX};
use viommu_proto::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::little_endian::{U32, U64};

pub type Mem = GuestMemoryMmap<()>;

pub const MEM_SIZE: usize = 16 << 20;
pub const QSIZE: u16 = 256;
pub const REQ_Q: u64 = 0;
pub const EVT_Q: u64 = 0x8000;
pub const DATA: u64 = 0x10_0000;
pub const DATA_END: u64 = 0x80_0000;
pub const F_WRITE: u16 = 2;
pub const F_NEXT: u16 = 1;

pub fn new_mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn cfg(endpoints: &[u32]) -> DeviceConfig {
    DeviceConfig {
        endpoints: endpoints.iter().map(|&e| EndpointConfig::new(e)).collect(),
        ..Default::default()
    }
}

/// Endpoint 1 with an MSI region, endpoint 2 with a reserved region, endpoints 3 and 4 plain.
pub fn cfg_with_resv() -> DeviceConfig {
    DeviceConfig {
        endpoints: vec![
            EndpointConfig::new(1).with_resv(ResvRegion::msi(0xfee0_0000, 0xfeef_ffff)),
            EndpointConfig::new(2).with_resv(ResvRegion::reserved(0x8000_0000, 0x8fff_ffff)),
            EndpointConfig::new(3),
            EndpointConfig::new(4),
        ],
        ..Default::default()
    }
}

/// The features a Linux driver would accept.
pub fn all_features(dev: &VirtioIommu) -> u64 {
    dev.device_features()
}

pub fn attach(domain: u32, endpoint: u32) -> Request {
    attach_flags(domain, endpoint, 0)
}

pub fn attach_flags(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(AttachBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        flags: U32::new(flags),
        reserved: [0; 4],
    })
}

pub fn detach(domain: u32, endpoint: u32) -> Request {
    Request::Detach(DetachBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        reserved: [0; 8],
    })
}

pub fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Request {
    Request::Map(MapBody {
        domain: U32::new(domain),
        virt_start: U64::new(start),
        virt_end: U64::new(end),
        phys_start: U64::new(phys),
        flags: U32::new(flags),
    })
}

pub fn unmap(domain: u32, start: u64, end: u64) -> Request {
    Request::Unmap(UnmapBody {
        domain: U32::new(domain),
        virt_start: U64::new(start),
        virt_end: U64::new(end),
        reserved: [0; 4],
    })
}

pub fn probe(endpoint: u32) -> Request {
    Request::Probe(ProbeBody { endpoint: U32::new(endpoint), reserved: [0; 64] })
}

pub fn encode(req: &Request) -> Vec<u8> {
    let mut b = vec![0u8; 128];
    let n = req.encode(&mut b).unwrap();
    b.truncate(n);
    b
}

pub const RW: u32 = MAP_F_READ | MAP_F_WRITE;

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// One used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// The driver: owns the queue layout in guest memory and a bump allocator for buffers.
pub struct Driver<'a> {
    pub mem: &'a Mem,
    pub rq: Rings,
    pub eq: Rings,
    next_desc: [u16; 2],
    next_buf: u64,
    seen_used: [u16; 2],
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a Mem) -> Self {
        Self {
            mem,
            rq: Rings::at(REQ_Q, QSIZE),
            eq: Rings::at(EVT_Q, QSIZE),
            next_desc: [0; 2],
            next_buf: DATA,
            seen_used: [0; 2],
        }
    }

    /// A device with `cfg`, features negotiated (all offered ones), queues set, activated.
    pub fn device(&self, cfg: DeviceConfig) -> VirtioIommu {
        let mut dev = VirtioIommu::new(cfg).unwrap();
        let f = dev.device_features();
        dev.ack_features(f);
        self.setup_queues(&mut dev);
        dev
    }

    /// The same driver on a copy of this guest memory (for migration tests).
    pub fn fork<'b>(&self, mem: &'b Mem) -> Driver<'b> {
        let d = Driver {
            mem,
            rq: self.rq,
            eq: self.eq,
            next_desc: self.next_desc,
            next_buf: self.next_buf,
            seen_used: self.seen_used,
        };
        let mut buf = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        mem.write_slice(&buf, GuestAddress(0)).unwrap();
        d
    }

    pub fn setup_queues(&self, dev: &mut VirtioIommu) {
        for (i, q) in [self.rq, self.eq].into_iter().enumerate() {
            dev.set_queue(i as u16, q.size, q.desc, q.avail, q.used).unwrap();
        }
        dev.activate().unwrap();
    }

    fn q(&self, qi: usize) -> Rings {
        if qi == 0 {
            self.rq
        } else {
            self.eq
        }
    }

    fn store_desc(&self, qi: usize, index: u16, d: RawDescriptor) {
        self.mem.write_obj(d, GuestAddress(self.q(qi).desc_addr(index))).unwrap();
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1).next_multiple_of(16);
        if self.next_buf + len > DATA_END {
            self.next_buf = DATA;
        }
        let a = self.next_buf;
        self.next_buf += len;
        a
    }

    /// Writes `descs` (their `next` fields are relative: i means "the i-th of this batch")
    /// into the table and makes the first one available. Returns the head index.
    pub fn push_chain(&mut self, qi: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let base = self.next_desc[qi];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (base + i as u16) % QSIZE;
            let next = (idx + 1) % QSIZE;
            let flags = if i + 1 < descs.len() { flags | F_NEXT } else { flags & !F_NEXT };
            self.store_desc(qi, idx, desc(addr, len, flags, next));
        }
        self.next_desc[qi] = (base + descs.len().max(1) as u16) % QSIZE;
        self.make_available(qi, base);
        base
    }

    /// Stores raw descriptors at table index `at` (no rewriting) and makes `head` available.
    pub fn push_raw(&mut self, qi: usize, at: u16, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            self.store_desc(qi, at + i as u16, *d);
        }
        self.make_available(qi, head);
    }

    pub fn make_available(&mut self, qi: usize, head: u16) {
        let q = self.q(qi);
        let idx = Rings::read_u16(self.mem, q.avail_idx_addr());
        Rings::write_u16(self.mem, q.avail_entry_addr(idx), head);
        Rings::write_u16(self.mem, q.avail_idx_addr(), idx.wrapping_add(1));
    }

    /// Sets `used_event` (EVENT_IDX) of a queue.
    pub fn set_used_event(&self, qi: usize, v: u16) {
        Rings::write_u16(self.mem, self.q(qi).used_event_addr(), v);
    }

    /// Submits a request as [readable head+body][writable props+tail]; returns the address
    /// of the writable part.
    pub fn submit_bytes(&mut self, readable: &[u8], writable_len: u32) -> u64 {
        let r = self.alloc(readable.len() as u64);
        self.mem.write_slice(readable, GuestAddress(r)).unwrap();
        let w = self.alloc(u64::from(writable_len));
        self.mem.write_slice(&vec![0xaa; writable_len as usize], GuestAddress(w)).unwrap();
        self.push_chain(0, &[(r, readable.len() as u32, 0), (w, writable_len, F_WRITE)]);
        w
    }

    pub fn submit(&mut self, req: &Request, probe_size: u32) -> u64 {
        let wlen = if matches!(req, Request::Probe(_)) { probe_size + 4 } else { 4 };
        self.submit_bytes(&encode(req), wlen)
    }

    /// New used entries of a queue since the last call.
    pub fn take_used(&mut self, qi: usize) -> Vec<Used> {
        let q = self.q(qi);
        let idx = Rings::read_u16(self.mem, q.used_idx_addr());
        let mut out = vec![];
        let mut seen = self.seen_used[qi];
        while seen != idx {
            let [id, len]: [u32; 2] =
                self.mem.read_obj(GuestAddress(q.used_entry_addr(seen))).unwrap();
            out.push(Used { id, len });
            seen = seen.wrapping_add(1);
        }
        self.seen_used[qi] = seen;
        out
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// Sends one request, kicks, and returns its status (panics if used length is 0).
    pub fn request(&mut self, dev: &mut VirtioIommu, req: &Request) -> Status {
        let ps = dev.iommu().config().probe_size;
        let w = self.submit(req, ps);
        dev.process_request_queue(self.mem).unwrap();
        let used = self.take_used(0);
        assert_eq!(used.len(), 1);
        let off = if matches!(req, Request::Probe(_)) { ps as usize } else { 0 };
        assert_eq!(used[0].len as usize, off + 4, "used length");
        Status::from_u8(self.read(w + off as u64, 1)[0]).unwrap()
    }

    /// Adds an event buffer of `len` bytes; returns its address.
    pub fn add_event_buffer(&mut self, len: u32) -> u64 {
        let a = self.alloc(u64::from(len));
        self.push_chain(1, &[(a, len, F_WRITE)]);
        a
    }
}

pub fn features_min() -> u64 {
    bit(MAP_UNMAP) | bit(PROBE) | bit(MMIO) | bit(BYPASS_CONFIG) | bit(RING_EVENT_IDX)
}
