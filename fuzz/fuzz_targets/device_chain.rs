//! The device's descriptor-chain path: arbitrary descriptor tables, avail rings, indirect
//! tables and buffers in guest memory, processed by `process_request_queue` and
//! `process_event_queue`, with resets, config accesses and faults in between.
//!
//! Input: a configuration (see `device::config`), the queue size and features, then
//! operations until the input ends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_device::VirtioIommu;
use viommu_fuzz::device::{self, check_counters};
use viommu_fuzz::guest::{self, write_desc_at, Guest, F_INDIRECT, F_WRITE, HIGH_START};
use viommu_fuzz::input::Input;
use viommu_proto::features::{bit, RING_EVENT_IDX, RING_INDIRECT_DESC};
use viommu_proto::{Request, RequestType};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let Ok(dev) = VirtioIommu::new(device::config(&mut inp)) else { return };
    let qsize = 1u16 << (1 + inp.u8() % 8);
    let Some(mut g) = Guest::new(dev, qsize, features(&mut inp)) else { return };
    while !inp.is_empty() {
        op(&mut g, &mut inp);
        check_counters(&g.dev.iommu());
    }
    // Whatever the input left in the rings goes through once more.
    kick(&mut g, 0);
    kick(&mut g, 1);
});

/// Features to ack (one byte, and 8 more for an arbitrary subset): by default all offered.
fn features(inp: &mut Input) -> u64 {
    let sel = inp.u8();
    let mut f = !0u64;
    if sel & 1 != 0 {
        f &= !bit(RING_EVENT_IDX);
    }
    if sel & 2 != 0 {
        f &= !bit(RING_INDIRECT_DESC);
    }
    if sel & 4 != 0 {
        f &= inp.u64();
    }
    f
}

fn op(g: &mut Guest, inp: &mut Input) {
    match inp.u8() % 9 {
        // Raw bytes anywhere: descriptors, rings, buffers, indirect tables.
        0 => {
            let at = guest::place(inp);
            let _ = g.mem.write_slice(inp.string(), GuestAddress(at));
        }
        // One descriptor of either table.
        1 => {
            let (q, idx) = (u16::from(inp.u8() & 1), inp.u16());
            let addr = guest::place(inp);
            let (len, flags, next) = (inp.u32(), inp.u16(), inp.u16());
            g.write_desc(q, idx, addr, len, flags, next);
        }
        2 => {
            let (q, head) = (u16::from(inp.u8() & 1), inp.u16());
            g.make_available(q, head);
        }
        3 => {
            let q = u16::from(inp.u8() & 1);
            kick(g, q);
        }
        4 => well_formed(g, inp),
        // An event buffer of arbitrary length and direction.
        5 => {
            let (len, flags) = (u32::from(inp.u16()), inp.u8());
            let at = g.slot();
            g.push_chain(1, &[(at, len, u16::from(flags & 7))]);
        }
        6 => device::translate(&g.dev.iommu(), inp),
        7 => {
            let (q, used_event, v) = (u16::from(inp.u8() & 1), inp.u8() & 1 != 0, inp.u16());
            g.write_ring_field(q, used_event, v);
        }
        _ => control(g, inp),
    }
}

/// Processes queue `q`. An error means the queue is broken (the VMM would set
/// DEVICE_NEEDS_RESET); the device must still refuse cleanly afterwards.
fn kick(g: &mut Guest, q: u16) {
    let before = next_used(g, q);
    let r = match q {
        0 => g.dev.process_request_queue(&g.mem),
        _ => g.dev.process_event_queue(&g.mem),
    };
    if r.is_ok() {
        let added = next_used(g, q).wrapping_sub(before);
        assert!(added <= g.qsize, "one kick used {added} entries of a {}-entry queue", g.qsize);
    }
}

/// The device's own used index (the one in guest memory is the guest's to clobber).
fn next_used(g: &mut Guest, q: u16) -> u16 {
    g.dev.queue_mut(q).map_or(0, |q| q.next_used())
}

/// A well-formed request (see `device::good_request`) in one of four chain layouts.
fn well_formed(g: &mut Guest, inp: &mut Input) {
    let req = device::good_request(inp);
    let layout = inp.u8();
    let bytes = device::encode(&req);
    let rd = g.slot();
    let _ = g.mem.write_slice(&bytes, GuestAddress(rd));
    let props = match req {
        Request::Probe(_) => g.dev.iommu().config().probe_size,
        _ => 0,
    };
    let wr = rd + 0x80;
    let wlen = props + 4;
    let n = bytes.len() as u32;
    let bufs: Vec<(u64, u32, u16)> = match layout % 4 {
        0 => vec![(rd, n, 0), (wr, wlen, F_WRITE)],
        // Head and body apart, properties and tail apart.
        1 => vec![
            (rd, 4, 0),
            (rd + 4, n - 4, 0),
            (wr, props, F_WRITE),
            (wr + u64::from(props), 4, F_WRITE),
        ],
        // One descriptor naming a table in the high region.
        2 => {
            let table = HIGH_START + u64::from(inp.u8()) * 32;
            write_desc_at(&g.mem, table, rd, n, 1, 1);
            write_desc_at(&g.mem, table + 16, wr, wlen, F_WRITE, 0);
            vec![(table, 32, F_INDIRECT)]
        }
        // Readable part one byte short: the device must refuse it, not read on.
        _ => vec![(rd, n - 1, 0), (wr, wlen, F_WRITE)],
    };
    g.push_chain(0, &bufs);
    if req.request_type() != RequestType::Probe || layout % 8 < 4 {
        kick(g, 0);
    }
}

/// Device-level operations: reset, config space.
fn control(g: &mut Guest, inp: &mut Input) {
    match inp.u8() % 3 {
        0 => {
            g.reset();
        }
        1 => {
            let offset = u64::from(inp.u8() % 48);
            g.dev.write_config(offset, inp.string());
        }
        _ => {
            let (offset, len) = (u64::from(inp.u8()), inp.u8() % 48);
            let mut b = vec![0; usize::from(len)];
            g.dev.read_config(offset, &mut b);
        }
    }
}
