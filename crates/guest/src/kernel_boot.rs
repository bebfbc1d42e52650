//! Bringing up the Linux kernel's own drivers in the guest, for the
//! same-run comparison with ours (see [`crate::kernel_io`]): loading modules,
//! waiting for the block device, and marking QEMU's trace while the kernel's
//! virtio-iommu driver owns the device.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pci::{Mmio, PciDevice};
use crate::virtio_pci::virtio_caps;
use crate::Error;

/// Loads an (uncompressed) kernel module; one that is already loaded is fine.
///
/// ```no_run
/// viommu_guest::kernel_boot::load_module("/lib/modules/virtio_blk.ko").unwrap();
/// ```
pub fn load_module(path: &str) -> Result<(), Error> {
    load_module_with(path, "")
}

/// Loads the kernel module at `path` with the parameter string `params`
/// (`name=value ...`); loaded already is fine.
pub fn load_module_with(path: &str, params: &str) -> Result<(), Error> {
    let f = File::open(path).map_err(|e| Error::io(format!("open {path}"), e))?;
    let params = std::ffi::CString::new(params)
        .map_err(|_| Error::Device(format!("module parameters {params:?} hold a NUL")))?;
    // SAFETY: finit_module reads the module from our open file; the
    // parameter string is a NUL-terminated C string that outlives the call.
    let r = unsafe {
        libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0 as libc::c_int)
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(Error::io(format!("finit_module {path}"), e));
        }
    }
    Ok(())
}

/// Waits until `path` exists (a device node the kernel creates once its
/// driver has probed), for at most `limit`.
pub fn wait_for(path: &str, limit: Duration) -> Result<Duration, Error> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > limit {
            return Err(Error::Timeout(format!("{path} did not appear within {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(start.elapsed())
}

/// The type of the default domain of the IOMMU group of PCI function
/// `bdf` (`DMA-FQ` lazy, `DMA` strict, `identity`), or `None` when the
/// function has no IOMMU group.
pub fn iommu_domain_type(bdf: &str) -> Option<String> {
    let p = format!("/sys/bus/pci/devices/{bdf}/iommu_group/type");
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Marks moments in QEMU's trace, like [`crate::virtio_pci::ConfigMarker`],
/// but on a virtio device whose kernel driver stays bound: one byte of its
/// device config, mapped through sysfs, is rewritten with the value it holds.
/// QEMU traces the write (for the virtio-iommu, `virtio_iommu_set_config`);
/// it changes nothing. A kernel with `CONFIG_IO_STRICT_DEVMEM` needs
/// `iomem=relaxed` for the mapping while the driver is bound.
#[derive(Debug)]
pub struct BoundMarker {
    bar: Arc<Mmio>,
    at: usize,
    writes: AtomicU64,
}

impl BoundMarker {
    /// Maps the device config of `bdf` and checks that byte `offset` of it exists.
    pub fn open(bdf: &str, offset: usize) -> Result<Self, Error> {
        let pci = PciDevice::open(bdf)?;
        let caps = virtio_caps(&pci)?;
        let dev =
            caps.device.ok_or_else(|| Error::Device(format!("{bdf} has no device config")))?;
        if offset >= dev.length as usize {
            return Err(Error::Device(format!("{bdf}: config byte {offset} out of range")));
        }
        let bar = pci.map_bar(dev.bar)?;
        let at = dev.offset as usize + offset;
        if at >= bar.len() {
            return Err(Error::Device(format!("{bdf}: device config outside BAR {}", dev.bar)));
        }
        Ok(Self { bar, at, writes: AtomicU64::new(0) })
    }

    /// Makes the traced write; returns how many this marker has made.
    pub fn mark(&self) -> u64 {
        let v = self.bar.read8(self.at);
        self.bar.write8(self.at, v);
        self.writes.fetch_add(1, Ordering::Relaxed) + 1
    }
}
