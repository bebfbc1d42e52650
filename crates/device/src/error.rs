//! Error types.

use thiserror::Error;

/// Why a [`crate::DeviceConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// Legacy BYPASS and BYPASS_CONFIG must not be offered together.
    #[error("BYPASS and BYPASS_CONFIG must not both be offered")]
    BothBypassFeatures,
    /// Two endpoints share an ID.
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(u32),
    /// `domain_range` has start > end.
    #[error("domain_range is empty")]
    EmptyDomainRange,
    /// `input_range` has start > end.
    #[error("input_range is empty")]
    EmptyInputRange,
    /// `page_size_mask` has no bit set.
    #[error("page_size_mask must have at least one bit set")]
    EmptyPageSizeMask,
    /// A reserved region is empty, overlaps another, or is a second MSI region.
    #[error(
        "endpoint {endpoint}: reserved regions must be non-empty, disjoint, and at most one MSI"
    )]
    BadResvRegion {
        /// The endpoint.
        endpoint: u32,
    },
    /// `probe_size` above [`crate::config::MAX_PROBE_SIZE`].
    #[error("probe_size {0} is too large")]
    ProbeSizeTooLarge(u32),
    /// The endpoint's RESV_MEM properties do not fit in `probe_size`.
    #[error("endpoint {endpoint}: its properties do not fit in probe_size")]
    ProbeSizeTooSmall {
        /// The endpoint.
        endpoint: u32,
    },
}

/// Errors of the virtio device wrapper. A queue error means the device needs a reset.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration was refused.
    #[error("invalid device configuration: {0}")]
    Config(#[from] ConfigError),
    /// A queue index other than 0 (requestq) or 1 (eventq).
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// The queue is not ready or its rings are not in guest memory.
    #[error("queue {0} is not ready or not valid")]
    QueueNotReady(u16),
    /// The available ring index is more than a queue size ahead: the driver is broken.
    #[error("queue {0}: available index is out of range")]
    BadAvailIndex(u16),
    /// A virtqueue operation failed (used ring not writable, bad layout...).
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// A snapshot does not fit this device's configuration.
    #[error("snapshot does not match this device: {0}")]
    Snapshot(String),
}
