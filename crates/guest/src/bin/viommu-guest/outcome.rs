//! Test outcomes: what a test can fail with, and the PASS/FAIL lines the
//! host script counts.

use viommu_guest::mapper::MapError;

/// Why a test failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The guest-side plumbing (sysfs PCI, hugetlb memory, virtio-blk).
    #[error(transparent)]
    Guest(#[from] viommu_guest::Error),
    /// The viommu driver.
    #[error("viommu driver: {0}")]
    Driver(#[from] viommu_driver::Error),
    /// Mapping a workload's buffers.
    #[error(transparent)]
    Map(#[from] MapError),
    /// What the test checks did not hold.
    #[error("{0}")]
    Check(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Check(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure::Check(s.to_string())
    }
}

/// A test's result.
pub type Outcome<T = ()> = Result<T, Failure>;

/// PASS/FAIL bookkeeping.
#[derive(Debug, Default)]
pub struct Results {
    pub passed: u32,
    pub failed: u32,
}

impl Results {
    /// Prints `VG PASS name` or `VG FAIL name: why`; returns whether it passed.
    pub fn record<T>(&mut self, name: &str, r: Outcome<T>) -> bool {
        match r {
            Ok(_) => {
                self.passed += 1;
                println!("VG PASS {name}");
                true
            }
            Err(e) => {
                self.failed += 1;
                println!("VG FAIL {name}: {e}");
                false
            }
        }
    }

    /// Records a check: passes when `ok`, else fails with `why`.
    pub fn check(&mut self, name: &str, ok: bool, why: impl FnOnce() -> String) -> bool {
        self.record(name, if ok { Ok(()) } else { Err(Failure::Check(why())) })
    }
}
