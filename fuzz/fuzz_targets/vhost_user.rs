//! The vhost-user message parser of viommu-vhost-user and the back-end IOTLB it feeds:
//! arbitrary bytes as a stream of front-end messages (and as back-end channel messages and
//! replies), then the IOTLB messages applied and translations made on what they built.
//! A refusal is fine; a panic, an overflow or a translation outside an applied entry is not.
//!
//! Input: records of one byte (the number of fds, mod 9), a 12-byte header, and the
//! payload (as many bytes as the header says, or what is left). Seeds: a QEMU-like
//! session, IOTLB traffic, malformed messages (`fuzz/src/seeds.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_vhost_user::iotlb::VhostIotlb;
use viommu_vhost_user::wire::{self, Header, IotlbType, Request, HEADER_LEN, MAX_PAYLOAD};
use vm_memory::{GuestAddress, Iommu, Permissions};

fuzz_target!(|data: &[u8]| {
    let iotlb = VhostIotlb::default();
    let mut rest = data;
    // Bounded: each record consumes at least 13 bytes.
    while rest.len() > HEADER_LEN {
        let fds = usize::from(rest[0] % 9);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&rest[1..1 + HEADER_LEN]);
        rest = &rest[1 + HEADER_LEN..];
        let header = match Header::parse(&h) {
            Ok(header) => header,
            Err(_) => continue,
        };
        assert!(header.size as usize <= MAX_PAYLOAD);
        let n = (header.size as usize).min(rest.len());
        let (body, tail) = rest.split_at(n);
        rest = tail;
        // The header encodes back to itself.
        assert_eq!(Header::parse(&header.to_bytes()), Ok(header));
        let _ = wire::parse_backend_request(&header, body, fds);
        let _ = wire::parse_u64_reply(header.request, &header, body);
        match wire::parse_request(&header, body, fds) {
            Ok(Request::Iotlb(m)) => {
                // A parsed IOTLB message encodes back to the bytes it came from.
                assert_eq!(&m.to_bytes()[..26], &body[..26]);
                let applied = iotlb.apply(&m);
                if matches!(m.kind, IotlbType::Miss | IotlbType::AccessFail) {
                    assert!(applied.is_err());
                }
                // An applied UPDATE translates its first byte to its user address; an
                // applied INVALIDATE leaves its first byte untranslated.
                let first = iotlb.translate(GuestAddress(m.iova), 1, Permissions::Read);
                match (m.kind, applied.is_ok()) {
                    (IotlbType::Update, true) if m.perm.read => {
                        let r = first.expect("an applied UPDATE translates").next();
                        assert_eq!(r.map(|r| (r.base.0, r.length)), Some((m.uaddr, 1)));
                    }
                    (IotlbType::Invalidate, true) => assert!(first.is_err()),
                    _ => {}
                }
                // Around the range's end, and a page from its start: no panic, no overflow.
                let end = m.iova.wrapping_add(m.size).wrapping_sub(1);
                for (at, len) in [(end, 2usize), (m.iova, 4096), (u64::MAX, 1)] {
                    let _ = iotlb
                        .translate(GuestAddress(at), len, Permissions::ReadWrite)
                        .map(|it| it.count());
                    let _ = iotlb.take_fault();
                }
            }
            Ok(Request::SetMemTable(regions)) => {
                assert_eq!(regions.len(), fds);
                for r in regions {
                    assert!(r.size > 0 && r.user_addr.checked_add(r.size - 1).is_some());
                }
            }
            Ok(Request::SetConfig { data, .. }) => assert!(data.len() <= wire::MAX_CONFIG),
            _ => {}
        }
    }
});
