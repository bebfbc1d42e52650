//! The guest-side IOMMU modes of this driver, named once for the bench, the
//! guest binary and the docs: how each sets up the endpoint's domain and the
//! DMA layer, and which Linux setting it corresponds to.
//!
//! ```
//! use viommu_driver::{Mode, Policy};
//! let m: Mode = "lazy-single".parse().unwrap();
//! assert_eq!(m.policy(), Some(Policy::LazySingle));
//! assert_eq!(m.flush_queue().unwrap().entries, 32768);
//! assert_eq!(Mode::from_name(m.name()), Some(m));
//! assert_eq!(Mode::Lazy.linux(), Some("6.7+ default (DMA-FQ)"));
//! ```

use core::fmt;
use core::str::FromStr;

use crate::dma::{DmaOptions, FlushQueueConfig, Policy};

/// How the guest uses the IOMMU for one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Identity (ATTACH with `VIRTIO_IOMMU_ATTACH_F_BYPASS`) domain: no MAP
    /// or UNMAP; the device still checks every access against the domain.
    Identity,
    /// Strict, with a sync after every MAP and every UNMAP.
    StrictEverySync,
    /// Strict: one sync per map call (`iotlb_sync_map`), one per unmap.
    Strict,
    /// Lazy: UNMAPs wait in per-CPU flush queues ([`FlushQueueConfig::LAZY`]).
    Lazy,
    /// Lazy with one shared flush queue ([`FlushQueueConfig::LAZY_SINGLE`]).
    LazySingle,
    /// Lazy, plus the batch API (one sync per I/O) and UNMAP coalescing.
    Best,
    /// Page-table mode (drafts): the driver writes the table, no MAP; one
    /// INVALIDATE per I/O, synced (batch API). Needs a device that offers
    /// F_ATTACH_TABLE: no Linux or QEMU speaks it.
    PgtableStrict,
    /// Page-table mode (drafts), INVALIDATEs deferred to the per-CPU flush
    /// queues, one per flush (batch API).
    PgtableLazy,
}

/// How long a freed buffer can stay reachable by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// No translation: the device reaches all guest memory.
    None,
    /// An unmap returns only once the device has dropped the mapping.
    Full,
    /// Freed IOVAs stay mapped until their flush queue flushes: at most
    /// `timeout_ns` or `entries` allocations per queue.
    Deferred(FlushQueueConfig),
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 6] = [
        Mode::Identity,
        Mode::StrictEverySync,
        Mode::Strict,
        Mode::Lazy,
        Mode::LazySingle,
        Mode::Best,
    ];

    /// The page-table modes (drafts): outside [`Mode::ALL`], since only a
    /// device that offers F_ATTACH_TABLE (ours, when asked) can run them.
    pub const TABLE: [Mode; 2] = [Mode::PgtableStrict, Mode::PgtableLazy];

    /// The name on command lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Identity => "identity",
            Mode::StrictEverySync => "strict-every-sync",
            Mode::Strict => "strict",
            Mode::Lazy => "lazy",
            Mode::LazySingle => "lazy-single",
            Mode::Best => "best",
            Mode::PgtableStrict => "pgtable-strict",
            Mode::PgtableLazy => "pgtable-lazy",
        }
    }

    /// Parses a [`Mode::name`].
    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().chain(Mode::TABLE).find(|m| m.name() == s)
    }

    /// One line on what the mode does.
    pub const fn describe(self) -> &'static str {
        match self {
            Mode::Identity => "identity domain: no MAP/UNMAP, every access still checked",
            Mode::StrictEverySync => "strict, a sync after every MAP and every UNMAP",
            Mode::Strict => "strict, one sync per map call and one per unmap",
            Mode::Lazy => "lazy, UNMAPs deferred to per-CPU flush queues",
            Mode::LazySingle => "lazy, UNMAPs deferred to one shared flush queue",
            Mode::Best => "lazy + batch API (one sync per I/O) + UNMAP coalescing",
            Mode::PgtableStrict => {
                "page-table mode (draft): PTEs written, no MAP; one INVALIDATE per I/O, synced"
            }
            Mode::PgtableLazy => {
                "page-table mode (draft): PTEs written, no MAP; one INVALIDATE per flush queue flush"
            }
        }
    }

    /// The Linux virtio-iommu setting that behaves like this mode, or `None`
    /// when Linux has no equivalent (a Linux guest cannot choose it).
    pub const fn linux(self) -> Option<&'static str> {
        match self {
            Mode::Identity => Some("iommu.passthrough=1"),
            Mode::StrictEverySync => Some("before 6.7 (always strict)"),
            Mode::Strict => Some("6.7+ iommu.strict=1"),
            Mode::Lazy => Some("6.7+ default (DMA-FQ)"),
            Mode::LazySingle | Mode::Best | Mode::PgtableStrict | Mode::PgtableLazy => None,
        }
    }

    /// Whether the endpoint's domain is in page-table mode (the device must
    /// offer it: see [`crate::VirtioIommu::alloc_paging`]).
    pub const fn page_table(self) -> bool {
        matches!(self, Mode::PgtableStrict | Mode::PgtableLazy)
    }

    /// Whether the endpoint is attached to an identity domain rather than a
    /// paging one.
    pub const fn identity(self) -> bool {
        matches!(self, Mode::Identity)
    }

    /// The DMA layer's unmap policy (`None` for identity: nothing is mapped).
    pub const fn policy(self) -> Option<Policy> {
        match self {
            Mode::Identity => None,
            Mode::StrictEverySync | Mode::Strict | Mode::PgtableStrict => Some(Policy::Strict),
            Mode::Lazy | Mode::Best | Mode::PgtableLazy => Some(Policy::Lazy),
            Mode::LazySingle => Some(Policy::LazySingle),
        }
    }

    /// Whether each I/O is mapped through the batch API ([`crate::DmaDomain::begin`]).
    pub const fn batch(self) -> bool {
        matches!(self, Mode::Best | Mode::PgtableStrict | Mode::PgtableLazy)
    }

    /// Whether adjacent freed ranges go out as one UNMAP.
    pub const fn coalesce_unmaps(self) -> bool {
        matches!(self, Mode::Best)
    }

    /// Whether every MAP request is synced on its own.
    pub const fn sync_every_map(self) -> bool {
        matches!(self, Mode::StrictEverySync)
    }

    /// The flush queue that holds this mode's deferred UNMAPs.
    pub const fn flush_queue(self) -> Option<FlushQueueConfig> {
        match self.policy() {
            Some(Policy::Lazy) => Some(FlushQueueConfig::LAZY),
            Some(Policy::LazySingle) => Some(FlushQueueConfig::LAZY_SINGLE),
            _ => None,
        }
    }

    /// What the mode gives up in isolation.
    pub const fn isolation(self) -> Isolation {
        match (self.identity(), self.flush_queue()) {
            (true, _) => Isolation::None,
            (false, Some(fq)) => Isolation::Deferred(fq),
            (false, None) => Isolation::Full,
        }
    }

    /// The DMA layer's options for this mode (identity: the policy is unused).
    pub fn dma_options(self) -> DmaOptions {
        let base = DmaOptions::default();
        DmaOptions {
            policy: self.policy().unwrap_or(base.policy),
            sync_every_map: self.sync_every_map(),
            coalesce_unmaps: self.coalesce_unmaps(),
            ..base
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`Mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownMode;

impl fmt::Display for UnknownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "unknown mode (identity, strict-every-sync, strict, lazy, lazy-single, best, \
             pgtable-strict, pgtable-lazy)",
        )
    }
}

impl core::error::Error for UnknownMode {}

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::from_name(s).ok_or(UnknownMode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mode::ALL.into_iter().chain(Mode::TABLE) {
            assert_eq!(Mode::from_name(m.name()), Some(m));
            assert_eq!(m.name().parse::<Mode>(), Ok(m));
            assert_eq!(alloc::format!("{m}"), m.name());
        }
    }

    #[test]
    fn old_and_linux_names_are_not_modes() {
        for s in ["bypass", "lazy-batch", "none", "linux-lazy", "Strict", ""] {
            assert_eq!(s.parse::<Mode>(), Err(UnknownMode), "{s}");
        }
    }

    #[test]
    fn names_are_distinct() {
        let all: alloc::vec::Vec<Mode> = Mode::ALL.into_iter().chain(Mode::TABLE).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn dma_options_follow_the_mode() {
        let o = Mode::StrictEverySync.dma_options();
        assert_eq!((o.policy, o.sync_every_map, o.coalesce_unmaps), (Policy::Strict, true, false));
        let o = Mode::Best.dma_options();
        assert_eq!((o.policy, o.sync_every_map, o.coalesce_unmaps), (Policy::Lazy, false, true));
        assert!(Mode::Best.batch() && !Mode::Lazy.batch());
        assert_eq!(Mode::LazySingle.dma_options().policy, Policy::LazySingle);
        assert!(!Mode::Lazy.dma_options().coalesce_unmaps);
        assert_eq!(Mode::PgtableStrict.dma_options().policy, Policy::Strict);
        assert_eq!(Mode::PgtableLazy.dma_options().policy, Policy::Lazy);
        assert!(Mode::TABLE.iter().all(|m| m.batch() && m.page_table() && m.linux().is_none()));
        assert!(Mode::ALL.iter().all(|m| !m.page_table()));
    }

    #[test]
    fn isolation_windows_come_from_the_flush_queues() {
        assert_eq!(Mode::Identity.isolation(), Isolation::None);
        assert_eq!(Mode::Strict.isolation(), Isolation::Full);
        assert_eq!(Mode::StrictEverySync.isolation(), Isolation::Full);
        assert_eq!(Mode::Lazy.isolation(), Isolation::Deferred(FlushQueueConfig::LAZY));
        assert_eq!(Mode::Best.isolation(), Isolation::Deferred(FlushQueueConfig::LAZY));
        let single = Isolation::Deferred(FlushQueueConfig::LAZY_SINGLE);
        assert_eq!(Mode::LazySingle.isolation(), single);
    }

    #[test]
    fn only_linux_usable_modes_have_a_linux_equivalent() {
        let usable: alloc::vec::Vec<_> =
            Mode::ALL.into_iter().filter(|m| m.linux().is_some()).collect();
        assert_eq!(usable, [Mode::Identity, Mode::StrictEverySync, Mode::Strict, Mode::Lazy]);
    }
}
