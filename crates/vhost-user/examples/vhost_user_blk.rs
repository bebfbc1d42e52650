//! A vhost-user-blk back-end behind an IOMMU, serving a file on a unix socket, for QEMU's
//! `-device vhost-user-blk-pci,iommu_platform=on` (or any front-end speaking IOTLB_MSG).
//!
//! ```text
//! cargo run --release -p viommu-vhost-user --example vhost_user_blk -- SOCKET DISK [--once]
//! ```
//!
//! It listens on SOCKET and serves one front-end at a time (only one with `--once`); at
//! the end of each connection it prints the IOTLB message counts and the request counts.

use std::fs::OpenOptions;
use std::os::unix::net::UnixListener;

use std::sync::{Arc, OnceLock};

use viommu_vhost_user::backend::{Backend, BackendStats};
use viommu_vhost_user::blk::BlockDevice;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(socket), Some(disk)) = (args.first(), args.get(1)) else {
        eprintln!("usage: vhost_user_blk SOCKET DISK [--once]");
        std::process::exit(2);
    };
    let once = args.iter().any(|a| a == "--once");
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    eprintln!("vhost_user_blk: serving {disk} on {socket}");
    loop {
        let (sock, _) = listener.accept()?;
        let file = OpenOptions::new().read(true).write(true).open(disk)?;
        // Each GET_ID (a guest reading the disk's serial) prints the counts so far: the
        // guest marks its workloads with it.
        let stats = Arc::new(OnceLock::<Arc<BackendStats>>::new());
        let (s, mut n) = (stats.clone(), 0u64);
        let dev = BlockDevice::new(file, "viommu-vhost-blk")?.on_get_id(move || {
            n += 1;
            if let Some(c) = s.get().map(|s| s.snapshot()) {
                println!(
                    "vhost_user_blk: MARK {n} requests={} miss={} update={} invalidate={} access_fail={}",
                    c.requests, c.misses, c.updates, c.invalidates, c.access_fails
                );
            }
        });
        let mut backend = Backend::new(dev, sock);
        let _ = stats.set(backend.stats());
        let result = backend.run();
        let c = backend.stats().snapshot();
        let b = backend.device().counts();
        println!(
            "vhost_user_blk: connection closed ({}); requests {} (ok {}, ioerr {}, unsupp {}), {} data bytes; \
             IOTLB: {} UPDATE, {} INVALIDATE received, {} MISS, {} ACCESS_FAIL sent, {} UPDATE refused",
            match &result {
                Ok(()) => "by the front-end".to_string(),
                Err(e) => format!("error: {e}"),
            },
            c.requests, b.ok, b.ioerr, b.unsupp, b.bytes, c.updates, c.invalidates, c.misses, c.access_fails,
            c.refused_updates
        );
        if once {
            return Ok(result?);
        }
    }
}
