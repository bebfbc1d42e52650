//! Allocation bounds, measured with an instrumented global allocator (its own test binary,
//! so no other test's allocations are counted).

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use viommu_device::config::MAX_PROBE_SIZE;
use viommu_device::{ConfigError, DeviceConfig, Error, VirtioIommu};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// `VirtioIommu::new` validates the configuration before it allocates anything sized by it:
/// a `probe_size` of u32::MAX is refused without asking for a 4 GiB reply buffer, and an
/// accepted one costs at most `MAX_PROBE_SIZE` + 4 bytes of reply buffer.
#[test]
fn new_validates_before_allocating() {
    let huge = DeviceConfig { probe_size: u32::MAX, ..Default::default() };
    let reg = Region::new(GLOBAL);
    let r = VirtioIommu::new(huge);
    let allocated = reg.change().bytes_allocated;
    assert!(matches!(r, Err(Error::Config(ConfigError::ProbeSizeTooLarge(u32::MAX)))), "{r:?}");
    assert!(allocated < 64 << 10, "{allocated} bytes allocated for a refused config");

    let small = DeviceConfig { probe_size: 0, ..Default::default() };
    let base = {
        let reg = Region::new(GLOBAL);
        let d = VirtioIommu::new(small).unwrap();
        let n = reg.change().bytes_allocated;
        drop(d);
        n
    };
    let largest = DeviceConfig { probe_size: MAX_PROBE_SIZE, ..Default::default() };
    let reg = Region::new(GLOBAL);
    let dev = VirtioIommu::new(largest).unwrap();
    let extra = reg.change().bytes_allocated - base;
    drop(dev);
    assert!(extra <= MAX_PROBE_SIZE as usize + 4, "{extra} bytes more than with probe_size 0");
}
