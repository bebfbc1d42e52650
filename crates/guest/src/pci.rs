//! PCI functions through Linux sysfs: config space, enable, bus mastering,
//! and BAR mappings. Needs root.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::Error;

/// Config space offsets and bits (PCI local bus spec).
pub mod regs {
    /// Vendor ID, 16 bits.
    pub const VENDOR_ID: u64 = 0x00;
    /// Device ID, 16 bits.
    pub const DEVICE_ID: u64 = 0x02;
    /// Command register, 16 bits.
    pub const COMMAND: u64 = 0x04;
    /// Status register, 16 bits.
    pub const STATUS: u64 = 0x06;
    /// Pointer to the first capability, 8 bits.
    pub const CAP_PTR: u64 = 0x34;
    /// Command: respond to memory-space accesses.
    pub const CMD_MEM: u16 = 1 << 1;
    /// Command: the function may master the bus (DMA).
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// Command: legacy INTx interrupts disabled.
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    /// Status: a capability list is present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Capability ID of vendor-specific capabilities (virtio uses them).
    pub const CAP_ID_VENDOR: u8 = 0x09;
}

/// Longest capability we copy out (virtio's notify capability is 20 bytes).
pub const CAP_BYTES: usize = 24;

/// One entry of the capability list, as raw bytes from config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID (byte 0).
    pub id: u8,
    /// Where the capability starts in config space.
    pub offset: u8,
    /// The first [`CAP_BYTES`] bytes, starting with the ID.
    pub bytes: [u8; CAP_BYTES],
}

/// A PCI function, named by its bus/device/function (e.g. `0000:00:04.0`).
#[derive(Debug)]
pub struct PciDevice {
    bdf: String,
    dir: PathBuf,
    config: File,
}

impl PciDevice {
    /// Opens `/sys/bus/pci/devices/<bdf>`; `bdf` may omit the domain.
    ///
    /// ```no_run
    /// let dev = viommu_guest::pci::PciDevice::open("00:04.0").unwrap();
    /// dev.unbind().unwrap();
    /// dev.enable().unwrap();
    /// ```
    pub fn open(bdf: &str) -> Result<Self, Error> {
        let bdf = if bdf.matches(':').count() == 1 { format!("0000:{bdf}") } else { bdf.into() };
        let dir = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("config"))
            .map_err(|e| Error::io(format!("open {}/config", dir.display()), e))?;
        Ok(Self { bdf, dir, config })
    }

    /// The function's full name, `DDDD:BB:DD.F`.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The name of the bound kernel driver, if any.
    pub fn driver(&self) -> Option<String> {
        let link = std::fs::read_link(self.dir.join("driver")).ok()?;
        link.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Unbinds the kernel driver, if one is bound.
    pub fn unbind(&self) -> Result<(), Error> {
        if self.driver().is_none() {
            return Ok(());
        }
        std::fs::write(self.dir.join("driver/unbind"), &self.bdf)
            .map_err(|e| Error::io(format!("unbind {}", self.bdf), e))
    }

    /// Enables the function (assigns and turns on its resources).
    pub fn enable(&self) -> Result<(), Error> {
        std::fs::write(self.dir.join("enable"), "1")
            .map_err(|e| Error::io(format!("enable {}", self.bdf), e))
    }

    /// Reads config-space bytes at `offset`.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.config
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("read config of {} at {offset:#x}", self.bdf), e))
    }

    /// Writes config-space bytes at `offset`.
    pub fn write_config(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.config
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("write config of {} at {offset:#x}", self.bdf), e))
    }

    /// Reads a 16-bit config register.
    pub fn read_config_u16(&self, offset: u64) -> Result<u16, Error> {
        let mut b = [0; 2];
        self.read_config(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Sets `bits` in the command register, e.g. memory space and bus mastering.
    pub fn set_command(&self, bits: u16) -> Result<u16, Error> {
        let cmd = self.read_config_u16(regs::COMMAND)? | bits;
        self.write_config(regs::COMMAND, &cmd.to_le_bytes())?;
        Ok(cmd)
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> Result<(u16, u16), Error> {
        Ok((self.read_config_u16(regs::VENDOR_ID)?, self.read_config_u16(regs::DEVICE_ID)?))
    }

    /// Walks the capability list of the standard config space.
    pub fn capabilities(&self) -> Result<Vec<Capability>, Error> {
        let mut space = [0u8; 256];
        self.read_config(0, &mut space)?;
        Ok(parse_capabilities(&space))
    }

    /// Maps BAR `bar` (its sysfs `resource<bar>` file) for register access.
    pub fn map_bar(&self, bar: u8) -> Result<Arc<Mmio>, Error> {
        let path = self.dir.join(format!("resource{bar}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let len =
            file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len()
                as usize;
        if len == 0 {
            return Err(Error::Device(format!("{}: BAR {bar} is empty", self.bdf)));
        }
        // SAFETY: a fresh shared mapping of a sysfs BAR file; the kernel
        // checks bounds and permissions, and nothing else aliases it in Rust.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(format!("mmap {}", path.display()), io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap never returns NULL on success");
        Ok(Arc::new(Mmio { ptr, len }))
    }
}

/// Walks a capability list in a 256-byte config space image. Bounded: at most
/// 48 entries (the most that fit), and pointers below 0x40 end the walk.
pub fn parse_capabilities(space: &[u8; 256]) -> Vec<Capability> {
    let status = u16::from_le_bytes([space[6], space[7]]);
    let mut caps = Vec::new();
    if status & regs::STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = space[regs::CAP_PTR as usize] & !3;
    while ptr >= 0x40 && caps.len() < 48 {
        let start = ptr as usize;
        let mut bytes = [0u8; CAP_BYTES];
        let end = (start + CAP_BYTES).min(256);
        bytes[..end - start].copy_from_slice(&space[start..end]);
        caps.push(Capability { id: bytes[0], offset: ptr, bytes });
        ptr = bytes[1] & !3;
    }
    caps
}

/// A mapped BAR. Registers are accessed with volatile loads and stores of
/// their natural width; offsets are checked against the mapping.
#[derive(Debug)]
pub struct Mmio {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain device memory; every access is a single
// volatile load or store, which the device serialises.
unsafe impl Send for Mmio {}
// SAFETY: as above: no Rust references into the mapping are ever handed out.
unsafe impl Sync for Mmio {}

macro_rules! mmio_rw {
    ($read:ident, $write:ident, $t:ty) => {
        /// Volatile read at `offset`. Panics when out of the mapping or misaligned.
        pub fn $read(&self, offset: usize) -> $t {
            let p = self.at::<$t>(offset);
            // SAFETY: `at` checked that the access lies inside the live
            // mapping and is naturally aligned.
            <$t>::from_le(unsafe { p.read_volatile() })
        }

        /// Volatile write at `offset`. Panics when out of the mapping or misaligned.
        pub fn $write(&self, offset: usize, value: $t) {
            let p = self.at::<$t>(offset);
            // SAFETY: as in the read: in bounds, aligned, device memory.
            unsafe { p.write_volatile(value.to_le()) }
        }
    };
}

impl Mmio {
    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, once created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        let size = size_of::<T>();
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len) && offset % size == 0,
            "MMIO access of {size} bytes at {offset:#x} outside a {:#x}-byte BAR",
            self.len
        );
        // SAFETY: offset + size <= len, so the pointer stays in the mapping.
        unsafe { self.ptr.as_ptr().add(offset).cast() }
    }

    mmio_rw!(read8, write8, u8);
    mmio_rw!(read16, write16, u16);
    mmio_rw!(read32, write32, u32);
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and nothing uses them
        // after the last Arc is dropped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_walk_follows_links_and_stops() {
        let mut s = [0u8; 256];
        s[6] = regs::STATUS_CAP_LIST as u8;
        s[0x34] = 0x40;
        s[0x40] = 0x09;
        s[0x41] = 0x54;
        s[0x54] = 0x11;
        s[0x55] = 0x00;
        let caps = parse_capabilities(&s);
        assert_eq!(
            caps.iter().map(|c| (c.id, c.offset)).collect::<Vec<_>>(),
            [(9, 0x40), (0x11, 0x54)]
        );
        // A loop in the list is cut off at 48 entries.
        s[0x55] = 0x40;
        assert_eq!(parse_capabilities(&s).len(), 48);
        // Without the status bit there is no list.
        s[6] = 0;
        assert!(parse_capabilities(&s).is_empty());
    }

    #[test]
    fn capability_near_end_of_space_is_truncated_not_overrun() {
        let mut s = [0u8; 256];
        s[6] = regs::STATUS_CAP_LIST as u8;
        s[0x34] = 0xfc;
        s[0xfc] = 0x09;
        let caps = parse_capabilities(&s);
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].bytes[4..], [0; CAP_BYTES - 4]);
    }
}
