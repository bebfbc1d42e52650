//! The device's request path: raw request bytes into `Iommu::handle_request`, mixed with
//! well-formed requests (to reach deep states) and translations, against one device.
//!
//! Input: a configuration (see `device::config`), then operations until the input ends.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use viommu_device::Iommu;
use viommu_fuzz::device::{self, check_answer, check_counters, FILL};
use viommu_fuzz::guest;
use viommu_fuzz::input::Input;
use viommu_proto::{Request, RequestType};
use vm_memory::{Bytes, GuestAddress};

/// Writable buffers up to this size: beyond any PROBE reply the configurations allow.
const MAX_WRITABLE: u16 = 1100;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let Ok(iommu) = Iommu::new(device::config(&mut inp)) else { return };
    // Page-table mode walks this memory; op 3 writes input bytes into it (tables).
    let mem = guest::memory();
    iommu.set_table_memory(Some(Arc::new(mem.clone())));
    while !inp.is_empty() {
        match inp.u8() % 4 {
            // Raw bytes: readable part, then the writable length.
            0 => {
                let readable = inp.string();
                let wlen = inp.u16() % MAX_WRITABLE;
                request(&iommu, readable, usize::from(wlen));
            }
            1 => {
                let req = device::good_request(&mut inp);
                let cfg = iommu.config();
                let (wlen, full) = match req.request_type() {
                    RequestType::Probe => (cfg.probe_size as usize + 4, cfg.features.probe),
                    // Without page-table mode the drafts' types are unknown ones.
                    RequestType::AttachTable | RequestType::Invalidate => {
                        (4, cfg.features.attach_table)
                    }
                    _ => (4, true),
                };
                let used = request(&iommu, &device::encode(&req), wlen);
                // §5.13.6.8: without the PROBE feature the buffer is returned unwritten.
                let want = if full { wlen } else { 0 };
                assert_eq!(used as usize, want, "a well-formed request is answered in full");
            }
            2 => device::translate(&iommu, &mut inp),
            _ => {
                let at = guest::place(&mut inp);
                let _ = mem.write_slice(inp.string(), GuestAddress(at));
            }
        }
        check_counters(&iommu);
    }
});

/// Sends one request and checks its answer; a request that parses encodes back to itself.
fn request(iommu: &Iommu, readable: &[u8], wlen: usize) -> u32 {
    if let Ok(req) = Request::parse(readable) {
        assert_eq!(Request::parse(&device::encode(&req)), Ok(req), "encode inverts parse");
    }
    let mut writable = vec![FILL; wlen];
    let used = iommu.handle_request(readable, &mut writable);
    check_answer(&writable, used);
    used
}
