//! The seed corpus (`fuzz/corpus/<target>/`), written by `cargo run --bin seeds` in the
//! byte format of [`crate::input`]: a few inputs per target that reach each path, so a
//! short run starts deep instead of rediscovering the request layouts.

use crate::input::Seed;

/// Every seed: (target, file name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut v = Vec::new();
    for (name, s) in device_request() {
        v.push(("device_request", name, s.0));
    }
    for (name, s) in device_chain() {
        v.push(("device_chain", name, s.0));
    }
    for (name, s) in driver() {
        v.push(("driver", name, s.0));
    }
    for (name, bytes) in vhost_user() {
        v.push(("vhost_user", name, bytes));
    }
    v
}

/// vhost-user records as the `vhost_user` target reads them: fd count, header, payload.
fn vhost_user() -> Vec<(&'static str, Vec<u8>)> {
    use viommu_vhost_user::wire::{req, Header, IotlbMsg, IotlbPerm, FLAG_NEED_REPLY};
    fn rec(out: &mut Vec<u8>, fds: u8, request: u32, flags: u32, body: &[u8]) {
        out.push(fds);
        out.extend_from_slice(&Header::new(request, flags, body.len()).to_bytes());
        out.extend_from_slice(body);
    }
    let u64b = |v: u64| v.to_ne_bytes().to_vec();
    let state = |a: u32, b: u32| [a.to_ne_bytes(), b.to_ne_bytes()].concat();
    let mut session = Vec::new();
    rec(&mut session, 0, req::GET_FEATURES, 0, &[]);
    rec(&mut session, 0, req::GET_PROTOCOL_FEATURES, 0, &[]);
    rec(&mut session, 0, req::SET_PROTOCOL_FEATURES, 0, &u64b(0x228));
    rec(&mut session, 1, req::SET_BACKEND_REQ_FD, FLAG_NEED_REPLY, &[]);
    rec(&mut session, 0, req::SET_OWNER, 0, &[]);
    rec(
        &mut session,
        0,
        req::GET_CONFIG,
        0,
        &[[0u8; 4], 60u32.to_ne_bytes(), [0; 4]]
            .concat()
            .into_iter()
            .chain([0u8; 60])
            .collect::<Vec<_>>(),
    );
    rec(
        &mut session,
        0,
        req::SET_FEATURES,
        FLAG_NEED_REPLY,
        &u64b((1 << 32) | (1 << 33) | (1 << 30)),
    );
    let mut table = vec![0u8; 8 + 32];
    table[0] = 1;
    table[8 + 8..8 + 16].copy_from_slice(&(1u64 << 30).to_ne_bytes());
    table[8 + 16..8 + 24].copy_from_slice(&0x7f00_0000_0000u64.to_ne_bytes());
    rec(&mut session, 1, req::SET_MEM_TABLE, FLAG_NEED_REPLY, &table);
    rec(&mut session, 0, req::SET_VRING_NUM, 0, &state(0, 256));
    rec(&mut session, 0, req::SET_VRING_BASE, 0, &state(0, 0));
    let mut addr = vec![0u8; 40];
    addr[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
    rec(&mut session, 0, req::SET_VRING_ADDR, 0, &addr);
    rec(&mut session, 1, req::SET_VRING_KICK, 0, &u64b(0));
    rec(&mut session, 0, req::SET_VRING_CALL, 0, &u64b(0x100));
    rec(&mut session, 0, req::SET_VRING_ENABLE, 0, &state(0, 1));
    rec(&mut session, 0, req::GET_VRING_BASE, 0, &state(0, 0));

    let mut iotlb = Vec::new();
    let up = IotlbMsg::update(0xfffff000, 0x2000, 0x7f00_0000_1000, IotlbPerm::RW);
    rec(&mut iotlb, 0, req::IOTLB_MSG, FLAG_NEED_REPLY, &up.to_bytes());
    let ro = IotlbMsg::update(0x1_0000_0000, 0x1000, 0x7f00_0000_4000, IotlbPerm::RO);
    rec(&mut iotlb, 0, req::IOTLB_MSG, 0, &ro.to_bytes());
    rec(
        &mut iotlb,
        0,
        req::IOTLB_MSG,
        FLAG_NEED_REPLY,
        &IotlbMsg::invalidate(0x1_0000_0000, 0x800).to_bytes(),
    );
    let top = IotlbMsg::update(u64::MAX - 0xfff, 0x1000, 0, IotlbPerm::WO);
    rec(&mut iotlb, 0, req::IOTLB_MSG, 0, &top.to_bytes());
    rec(
        &mut iotlb,
        0,
        req::IOTLB_MSG,
        FLAG_NEED_REPLY,
        &IotlbMsg::invalidate(0, u64::MAX).to_bytes(),
    );

    let mut bad = Vec::new();
    rec(&mut bad, 0, req::SET_FEATURES, 0, &[1, 2, 3]);
    rec(&mut bad, 2, req::SET_VRING_KICK, 0, &u64b(0x100));
    rec(&mut bad, 0, 99, 0, &[]);
    let mut wrong_type = up.to_bytes();
    wrong_type[25] = 7;
    rec(&mut bad, 0, req::IOTLB_MSG, 0, &wrong_type);
    rec(&mut bad, 0, 1, 4, &u64b(0)); // a reply on the back-end channel
    vec![("session", session), ("iotlb", iotlb), ("malformed", bad)]
}

/// Request kinds of `device::good_request`.
const ATTACH: u8 = 0;
const DETACH: u8 = 1;
const MAP: u8 = 2;
const UNMAP: u8 = 3;
const PROBE: u8 = 4;
const ATTACH_TABLE: u8 = 5;
const INVALIDATE: u8 = 6;

/// A configuration as `device::config` reads it: feature bits, granule choice, endpoints
/// 1 (an MSI region), 2 and 3 (a reserved region), generous limits.
fn config(s: &mut Seed, features: u16, granule: u8, bypass: bool) {
    s.u16(features).u8(granule).u8(128).u8(bypass.into()).u8(0xff).u8(0xff);
    s.u8(3);
    s.u8(1).u8(1).u8(1).u8(0xee).u8(0);
    s.u8(2).u8(0);
    s.u8(3).u8(1).u8(0).u8(0x40).u8(3);
}

/// All optional features (MAP_UNMAP is bit 2 inverted).
const ALL: u16 = 0x1fb;
/// And page-table mode (experimental).
const TABLES: u16 = ALL | 1 << 9;

/// A format-3 table at `base` (levels 0–3 on four pages): IOVA pages 0–3 map guest pages
/// 1–4 read-write; entry 4 of the last level points at a table (malformed there).
fn table_bytes(base: u64) -> Vec<u8> {
    let mut t = vec![0u8; 4 * 4096];
    let mut set = |page: usize, index: usize, v: u64| {
        t[page * 4096 + 8 * index..][..8].copy_from_slice(&v.to_le_bytes());
    };
    set(0, 0, (base + 0x1000) | 3);
    set(1, 0, (base + 0x2000) | 3);
    set(2, 0, (base + 0x3000) | 3);
    for i in 0..4 {
        set(3, i, ((i as u64 + 1) << 12) | 0xd);
    }
    set(3, 4, base | 3);
    t
}

fn good(s: &mut Seed, kind: u8, d: u8, e: u8, page: u8, pages: u8, flags: u8) {
    s.u8(kind).u8(d).u8(e).u8(page).u8(pages).u8(flags);
}

fn device_request() -> Vec<(&'static str, Seed)> {
    let req = |s: &mut Seed, kind, d, e, page, pages, flags| {
        s.u8(1);
        good(s, kind, d, e, page, pages, flags);
    };
    let mut lifecycle = Seed::default();
    config(&mut lifecycle, ALL, 0, false);
    req(&mut lifecycle, ATTACH, 1, 1, 0, 0, 0);
    req(&mut lifecycle, MAP, 1, 0, 0, 3, 3);
    lifecycle.u8(2).u8(1).u32(0x1000).u16(16).u8(0);
    req(&mut lifecycle, PROBE, 0, 1, 0, 0, 0);
    req(&mut lifecycle, PROBE, 0, 3, 0, 0, 0);
    req(&mut lifecycle, UNMAP, 1, 0, 0, 3, 0);
    req(&mut lifecycle, DETACH, 1, 1, 0, 0, 0);

    let mut raw = Seed::default();
    config(&mut raw, ALL, 0, false);
    let attach = [1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    raw.u8(0).string(&attach).u16(4);
    raw.u8(0).string(&attach[..12]).u16(4);
    raw.u8(0).string(&[9, 0, 0, 0, 1]).u16(4);
    let mut probe = vec![5, 0, 0, 0, 1];
    probe.resize(72, 0);
    raw.u8(0).string(&probe).u16(10);
    raw.u8(0).string(&probe).u16(516);

    let mut limits = Seed::default();
    config(&mut limits, ALL, 0, true);
    req(&mut limits, ATTACH, 2, 2, 0, 0, 0x80);
    req(&mut limits, ATTACH, 1, 1, 0, 0, 0);
    for page in 0..6 {
        req(&mut limits, MAP, 1, 0, page * 40, 31, 7);
    }
    req(&mut limits, UNMAP, 1, 0, 0, 255, 0);
    limits.u8(2).u8(2).u32(0x3000).u16(64).u8(1);

    let mut big_granule = Seed::default();
    config(&mut big_granule, ALL & !(1 << 3), 2, false);
    req(&mut big_granule, ATTACH, 0, 3, 0, 0, 0);
    req(&mut big_granule, MAP, 0, 0, 16, 15, 3);
    req(&mut big_granule, PROBE, 0, 3, 0, 0, 0);
    big_granule.u8(2).u8(3).u32(0x10_0000).u16(0x100).u8(2);

    // Page-table mode: the table written into the walker's memory (op 3), ATTACH_TABLE,
    // translations (a hit, a malformed entry, an invalid one), INVALIDATE by range and domain.
    let mut pgtable = Seed::default();
    config(&mut pgtable, TABLES, 0, false);
    pgtable.u8(3).u8(0).u16(0x8000).string(&table_bytes(0x8000));
    req(&mut pgtable, ATTACH_TABLE, 1, 1, 8, 0, 0);
    for iova in [0x1010, 0x4000, 0x5000] {
        pgtable.u8(2).u8(1).u32(iova).u16(16).u8(2);
    }
    req(&mut pgtable, INVALIDATE, 1, 0, 1, 0, 0);
    req(&mut pgtable, INVALIDATE, 1, 0, 0, 0, 1);
    req(&mut pgtable, PROBE, 0, 1, 0, 0, 0);

    vec![
        ("lifecycle", lifecycle),
        ("raw", raw),
        ("limits", limits),
        ("big-granule", big_granule),
        ("pgtable", pgtable),
    ]
}

fn device_chain() -> Vec<(&'static str, Seed)> {
    // Guest addresses as `guest::place` reads them: low region at an offset, high region.
    let low = |s: &mut Seed, off: u16| {
        s.u8(0).u16(off);
    };
    let chain = |s: &mut Seed, kind, d, e, page, pages, layout| {
        s.u8(4);
        good(s, kind, d, e, page, pages, 3);
        s.u8(layout);
    };
    let mut layouts = Seed::default();
    config(&mut layouts, ALL, 0, false);
    layouts.u8(2).u8(0);
    chain(&mut layouts, ATTACH, 1, 1, 0, 0, 0);
    chain(&mut layouts, MAP, 1, 0, 4, 2, 1);
    chain(&mut layouts, PROBE, 0, 1, 0, 0, 2);
    chain(&mut layouts, UNMAP, 1, 0, 4, 2, 3);
    chain(&mut layouts, PROBE, 0, 3, 0, 0, 4);
    layouts.u8(3).u8(0);

    let mut events = Seed::default();
    config(&mut events, ALL, 0, false);
    events.u8(1).u8(0);
    chain(&mut events, ATTACH, 1, 2, 0, 0, 0);
    events.u8(5).u16(24).u8(2);
    events.u8(5).u16(8).u8(2);
    events.u8(6).u8(2).u32(0x5000).u16(8).u8(1);
    events.u8(3).u8(1);

    let mut raw = Seed::default();
    config(&mut raw, ALL, 0, false);
    raw.u8(3).u8(3);
    raw.u8(1).u8(0).u16(0);
    low(&mut raw, 0x4000);
    raw.u32(20).u16(1).u16(1);
    raw.u8(1).u8(0).u16(1);
    low(&mut raw, 0x4100);
    raw.u32(4).u16(2).u16(0);
    raw.u8(0);
    low(&mut raw, 0x4000);
    raw.string(&[1, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    raw.u8(2).u8(0).u16(0).u8(3).u8(0);

    let mut indirect = Seed::default();
    config(&mut indirect, ALL, 0, false);
    indirect.u8(2).u8(0);
    // A table in the high region whose entries chain back to themselves.
    let mut table = Vec::new();
    for i in 0..4u16 {
        table.extend_from_slice(&0x4000u64.to_le_bytes());
        table.extend_from_slice(&16u32.to_le_bytes());
        table.extend_from_slice(&1u16.to_le_bytes());
        table.extend_from_slice(&((i + 1) % 4).to_le_bytes());
    }
    indirect.u8(0).u8(1).u16(0).string(&table);
    indirect.u8(1).u8(0).u16(0).u8(1).u16(0).u32(64).u16(4).u16(0);
    indirect.u8(2).u8(0).u16(0).u8(3).u8(0);
    indirect.u8(8).u8(0);
    indirect.u8(8).u8(1).u8(36).string(&[1]);
    indirect.u8(7).u8(0).u8(0).u16(7).u8(3).u8(0);

    // Page-table mode through the queue: the table written as raw guest bytes (op 0) in
    // the high region, where the chains' ATTACH_TABLE points (flag bit 0), INVALIDATE
    // (domain-wide), translations, an event buffer for the fault.
    let mut pgtable = Seed::default();
    config(&mut pgtable, TABLES, 0, false);
    pgtable.u8(2).u8(0);
    pgtable.u8(0).u8(1).u16(0x8000).string(&table_bytes(0x10_8000));
    chain(&mut pgtable, ATTACH_TABLE, 1, 1, 8, 0, 0);
    pgtable.u8(6).u8(1).u32(0x1010).u16(16).u8(2);
    pgtable.u8(6).u8(1).u32(0x4000).u16(16).u8(0);
    chain(&mut pgtable, INVALIDATE, 1, 0, 0, 3, 1);
    pgtable.u8(5).u16(24).u8(2);
    pgtable.u8(3).u8(1);

    vec![
        ("layouts", layouts),
        ("events", events),
        ("raw", raw),
        ("indirect", indirect),
        ("pgtable", pgtable),
    ]
}

/// Workload opcodes of the driver target.
const PAGING: u8 = 0;
const IDENTITY: u8 = 1;
const BLOCKING: u8 = 2;
const ATTACH_DOMAIN: u8 = 3;
const DETACH_EP: u8 = 4;
const MAP_PAGES: u8 = 5;
const UNMAP_PAGES: u8 = 6;
const SYNC: u8 = 7;
const QUERY: u8 = 8;
const DROP: u8 = 9;

/// A driver input: the workload with its length in front, then the device's script.
fn driver_input(workload: &Seed, device: &Seed) -> Seed {
    let mut s = Seed::default();
    s.u16(workload.0.len() as u16);
    s.0.extend_from_slice(&workload.0);
    s.0.extend_from_slice(&device.0);
    s
}

/// The device's setup as `HostileTransport::new` reads it: every feature the driver
/// knows, a plausible config; then `gen_mode`, quirks, default queue sizes, `waiter`.
fn device_setup(gen_mode: u8, quirks: u8, waiter: bool) -> Seed {
    let mut s = Seed::default();
    s.u8(0).u16(0);
    s.u8(0).u8(0).u8(28).u8(255).u8(0).u8(0);
    s.u8(gen_mode).u8(3).u8(quirks).u8(40).u16(0).u16(0).u8(waiter.into());
    s
}

fn driver() -> Vec<(&'static str, Seed)> {
    let mut work = Seed::default();
    work.u8(27).u8(0).u8(32).u8(0);
    work.u8(PAGING).u8(1);
    work.u8(ATTACH_DOMAIN).u8(1).u8(0);
    work.u8(MAP_PAGES).u8(1).u8(0).u8(1).u8(4).u16(0x10).u8(3);
    work.u8(SYNC).u8(1).u8(0).u8(0);
    work.u8(UNMAP_PAGES).u8(1).u8(0).u8(1).u8(4);
    work.u8(SYNC).u8(1).u8(0).u8(1);
    work.u8(QUERY).u8(1).u8(0);
    work.u8(QUERY).u8(1).u8(1);
    work.u8(IDENTITY).u8(2);
    work.u8(ATTACH_DOMAIN).u8(2).u8(1);
    work.u8(BLOCKING).u8(3);
    work.u8(ATTACH_DOMAIN).u8(3).u8(2);
    work.u8(DETACH_EP).u8(1);
    work.u8(DROP).u8(0).u8(0);
    work.u8(QUERY).u8(0).u8(2);

    let good = device_setup(0, 0, false);
    let unstable = device_setup(1, 0, false);
    let quirky = device_setup(3, 2, false);
    // Answers: a failing status, a used entry with a foreign id, a held request, a
    // duplicate, a wrong used length; events with the waiter on.
    let mut liar = device_setup(0, 0, true);
    liar.u8(0).u8(0x80 | 4).u8(0);
    liar.u8(6).u8(0).u32(77).u32(4).u8(0);
    liar.u8(5).u8(0).u8(0).u8(0).u8(7).u8(0).u8(3);
    liar.u8(4).u8(0).u32(3).u8(3);
    liar.0.extend_from_slice(&[
        4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0,
    ]);
    liar.u8(0).u32(0);
    let mut raw = Seed::default();
    raw.u8(1).u64(u64::MAX).u8(1);
    raw.0.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    raw.u64(0).u64(u64::MAX).u32(0).u32(u32::MAX).u32(u32::MAX).u8(1).u8(0).u8(0).u8(0);
    raw.u8(0).u8(0).u8(0).u8(0).u16(3).u16(1).u8(0);

    vec![
        ("good", driver_input(&work, &good)),
        ("unstable-config", driver_input(&work, &unstable)),
        ("quirky-status", driver_input(&work, &quirky)),
        ("liar", driver_input(&work, &liar)),
        ("raw-config", driver_input(&work, &raw)),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_corpus_is_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (target, name, bytes) in super::all() {
            let on_disk = std::fs::read(root.join(target).join(name)).unwrap_or_default();
            assert_eq!(on_disk, bytes, "{target}/{name}: rerun `cargo run --bin seeds`");
        }
    }
}
