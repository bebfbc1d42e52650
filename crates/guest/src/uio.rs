//! Interrupts for a PCI function driven from userspace, through a uio
//! device.
//!
//! The uio device comes from our module `vg_intx` (`crates/guest/kmod`),
//! which the boot loads with the functions' addresses. Linux's own
//! `uio_pci_generic` would do the same once bound, but the kernel defers
//! binding any driver to a function that the ACPI VIOT puts behind the
//! virtio-iommu until a kernel driver for that IOMMU has registered, and
//! here the IOMMU's driver is ours, in userspace. (Loading Linux's
//! virtio-iommu only to get past that, then unbinding it, oopses in
//! `iommu_deinit_device`.) The Debian cloud kernel has no VFIO no-IOMMU
//! mode either.
//!
//! The module's handler takes the function's legacy INTx and masks it (the
//! command register's INTx Disable bit) when the function's status says it
//! is its own; a `read` of `/dev/uioN` blocks until the count moves, and a
//! `write` of 1 unmasks the line again. The line is level-triggered and
//! stays masked from one interrupt to the next unmask, so an interrupt that
//! fires while nobody waits is counted, not lost: the next wait returns at
//! once.
//!
//! ```no_run
//! use std::time::Duration;
//! let irq = viommu_guest::uio::UioIrq::open("00:05.0").unwrap();
//! irq.unmask().unwrap();
//! let fired = irq.wait(Duration::from_millis(10)).unwrap();
//! # let _ = fired;
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::Error;

/// The kernel module that makes the uio devices, and its parameter.
pub const MODULE: &str = "vg_intx";

/// The parameter string that loads [`MODULE`] for the functions `bdfs`.
pub fn module_params(bdfs: &[&str]) -> String {
    let full: Vec<String> = bdfs.iter().map(|b| full_bdf(b)).collect();
    format!("bdfs={}", full.join(","))
}

fn full_bdf(bdf: &str) -> String {
    if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf.into()
    }
}

/// The interrupt of one PCI function, through `/dev/uioN`.
#[derive(Debug)]
pub struct UioIrq {
    dev: File,
    name: String,
    taken: Arc<AtomicU64>,
}

impl UioIrq {
    /// Opens the uio device of the function at `bdf`, which [`MODULE`]
    /// (loaded with [`module_params`]) made.
    pub fn open(bdf: &str) -> Result<Self, Error> {
        let bdf = full_bdf(bdf);
        let dir = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
        let uio = dir.join("uio");
        let name = std::fs::read_dir(&uio)
            .map_err(|e| Error::io(format!("{} (is {MODULE} loaded?)", uio.display()), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("uio"))
            .ok_or_else(|| Error::Device(format!("{bdf}: {MODULE} made no uio device")))?;
        let path = format!("/dev/{name}");
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {path}"), e))?;
        Ok(Self { dev, name, taken: Arc::default() })
    }

    /// The uio device's name, `uioN`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The count of interrupts [`Self::wait`] has taken, shared.
    pub fn taken(&self) -> Arc<AtomicU64> {
        self.taken.clone()
    }

    /// Unmasks the line: the next interrupt (or one still pending) is delivered.
    pub fn unmask(&self) -> Result<(), Error> {
        (&self.dev)
            .write_all(&1u32.to_ne_bytes())
            .map_err(|e| Error::io(format!("unmask {}", self.name), e))
    }

    /// Waits at most `timeout` for an interrupt; true if one came (and was
    /// taken: the next wait waits for a newer one).
    pub fn wait(&self, timeout: Duration) -> Result<bool, Error> {
        let mut fd = libc::pollfd { fd: self.dev.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fd` is one valid pollfd that outlives the call, and the
        // count passed is 1.
        let r = unsafe { libc::poll(&mut fd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::io(format!("poll {}", self.name), e));
        }
        if r == 0 || fd.revents & libc::POLLIN == 0 {
            return Ok(false);
        }
        let mut count = [0u8; 4];
        (&self.dev)
            .read_exact(&mut count)
            .map_err(|e| Error::io(format!("read {}", self.name), e))?;
        self.taken.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_params_name_full_addresses() {
        assert_eq!(module_params(&["00:04.0", "0000:00:05.0"]), "bdfs=0000:00:04.0,0000:00:05.0");
    }
}
