//! The vhost-user route for a Rust VMM that embeds viommu-device, end to end in one process:
//! guest RAM in a memfd, our device's `Iommu`, a vhost-user-blk back-end in another thread
//! over a unix socket, and the front-end's IOTLB listener on endpoint 8.
//!
//! ```text
//! cargo run -p viommu-vhost-user --example vmm_frontend
//! ```
//!
//! The guest's MAP becomes an UPDATE (the guest-physical address turned into this
//! process's address of the RAM), its UNMAP an INVALIDATE that the back-end acknowledged
//! before the UNMAP completed. A full block workload over this route, driven by our guest
//! driver with data checked, is `crates/vm/tests/vhost_user.rs`.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use viommu_device::{DeviceConfig, EndpointConfig, Iommu};
use viommu_proto::{AttachBody, MapBody, Request, Status, UnmapBody, MAP_F_READ, MAP_F_WRITE};
use viommu_vhost_user::backend::Backend;
use viommu_vhost_user::blk::{self, BlockDevice};
use viommu_vhost_user::frontend::{Frontend, FrontendOptions, SharedRegion};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const EP: u32 = 8;
const RAM: usize = 4 << 20;

fn memfd(len: u64) -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name, no other pointer.
    let fd = unsafe { libc::memfd_create(c"viommu-example".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned here only.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The VMM: guest RAM in a memfd (shareable with the back-end), and our device.
    let ram_file = memfd(RAM as u64)?;
    let ram = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        RAM,
        Some(FileOffset::new(ram_file.try_clone()?, 0)),
    )])?;
    let host = ram.get_host_address(GuestAddress(0))? as u64;
    let cfg = DeviceConfig { endpoints: vec![EndpointConfig::new(EP)], ..Default::default() };
    let iommu = Arc::new(Iommu::new(cfg)?); // or VirtioIommu::iommu()

    // The back-end: normally another process (examples/vhost_user_blk.rs); a thread here.
    let (fe_sock, be_sock) = UnixStream::pair()?;
    let disk = BlockDevice::new(memfd(1 << 20)?, "example")?;
    let mut backend = Backend::new(disk, be_sock);
    let stats = backend.stats();
    let thread = std::thread::spawn(move || backend.run());

    // The front-end: negotiation, memory table, and the listener for endpoint 8.
    let region = SharedRegion { gpa: 0, size: RAM as u64, host, file: ram_file, offset: 0 };
    let features = blk::F_FLUSH | blk::F_SEG_MAX | blk::F_BLK_SIZE;
    let mut fe =
        Frontend::connect(fe_sock, &iommu, EP, features, &[region], FrontendOptions::default())?;
    fe.iotlb_listener(&iommu);

    // The guest programs the IOMMU (here by hand; a guest driver does it in a real VM).
    let ok = |r: &Request| assert_eq!(iommu.execute(r, &mut []), Status::Ok, "{r:?}");
    ok(&Request::Attach(AttachBody {
        domain: 1.into(),
        endpoint: EP.into(),
        ..Default::default()
    }));
    ok(&Request::Map(MapBody {
        domain: 1.into(),
        virt_start: 0x4000_0000.into(),
        virt_end: 0x4000_ffff.into(),
        phys_start: 0x10_0000.into(),
        flags: (MAP_F_READ | MAP_F_WRITE).into(),
    }));
    let after_map = fe.counts();
    ok(&Request::Unmap(UnmapBody {
        domain: 1.into(),
        virt_start: 0x4000_0000.into(),
        virt_end: 0x4000_ffff.into(),
        ..Default::default()
    }));
    let after_unmap = fe.counts();
    println!(
        "MAP: {} UPDATE sent; UNMAP: {} INVALIDATE sent and acknowledged before it completed",
        after_map.updates,
        after_unmap.invalidates - after_map.invalidates
    );
    assert_eq!((after_map.updates, after_unmap.invalidates - after_map.invalidates), (1, 1));

    drop(fe); // closes the socket: the back-end's loop ends
    thread.join().expect("back-end thread")?;
    let b = stats.snapshot();
    println!(
        "back-end received {} UPDATE, {} INVALIDATE (the ATTACH's, the UNMAP's)",
        b.updates, b.invalidates
    );
    Ok(())
}
