//! The boot's options, from the kernel command line (`vg.*=`), parsed once.

use std::fmt;

use viommu_driver::Mode;

/// Linux's own drivers, for the same-run comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxBoot {
    /// No virtio-iommu device: virtio-blk alone.
    None,
    /// Linux's virtio-iommu driver, lazy (`iommu.strict=0`, domain `DMA-FQ`).
    Lazy,
    /// Linux's virtio-iommu driver, strict (`iommu.strict=1`, domain `DMA`).
    Strict,
}

impl LinuxBoot {
    /// The default-domain type Linux must give the endpoint's IOMMU group;
    /// `None` when there is no IOMMU, hence no group.
    pub fn domain_type(self) -> Option<&'static str> {
        match self {
            LinuxBoot::None => None,
            LinuxBoot::Lazy => Some("DMA-FQ"),
            LinuxBoot::Strict => Some("DMA"),
        }
    }

    /// Whether the boot has the virtio-iommu device (and its module).
    pub fn has_iommu(self) -> bool {
        self != LinuxBoot::None
    }
}

/// Whose drivers run the boot's I/O, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Our virtio-iommu driver (or, for [`Mode::Identity`], none: QEMU's
    /// boot-bypass lets the endpoint reach memory 1:1) and our virtio-blk.
    Ours(Mode),
    /// Linux's drivers.
    Linux(LinuxBoot),
}

impl Policy {
    /// Every policy, in the order of the suite's tables.
    pub const ALL: [Policy; 9] = [
        Policy::Linux(LinuxBoot::None),
        Policy::Linux(LinuxBoot::Lazy),
        Policy::Linux(LinuxBoot::Strict),
        Policy::Ours(Mode::Identity),
        Policy::Ours(Mode::StrictEverySync),
        Policy::Ours(Mode::Strict),
        Policy::Ours(Mode::Lazy),
        Policy::Ours(Mode::LazySingle),
        Policy::Ours(Mode::Best),
    ];

    /// The name in `vg.policy=`, the script and the reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Ours(m) => m.name(),
            Policy::Linux(LinuxBoot::None) => "linux-none",
            Policy::Linux(LinuxBoot::Lazy) => "linux-lazy",
            Policy::Linux(LinuxBoot::Strict) => "linux-strict",
        }
    }

    /// Parses a [`Policy::name`].
    pub fn from_name(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Whether endpoint DMA goes through no translation of ours: no
    /// IOMMU driver, hence no mapper and no negative tests.
    pub fn unmapped(self) -> bool {
        self == Policy::Ours(Mode::Identity)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Options from the kernel command line.
#[derive(Debug)]
pub struct Opts {
    pub policy: Policy,
    /// MiB moved per workload.
    pub mib: u64,
    /// Run the negative tests (in a boot of our driver).
    pub neg: bool,
    /// Also run scattered variants of the sizes above 4 KiB.
    pub sg: bool,
    pub sizes: Vec<usize>,
    pub qds: Vec<usize>,
    /// linux-* boots: let the block layer merge adjacent I/Os into one
    /// request (Linux's default). Off, every I/O is one request, as in ours.
    pub merges: bool,
    /// linux-* boots: mark the trace through a sysfs mapping of the
    /// virtio-iommu's config (needs `iomem=relaxed`). Off only to rule the
    /// marks out while debugging; the trace report needs them.
    pub marks: bool,
    /// Boots of ours: wait for completions by interrupt (INTx through
    /// `vg_intx`) instead of polling.
    pub irq: bool,
    /// linux-* boots: the disk is served by a vhost-user back-end
    /// (viommu-vhost-user's `vhost_user_blk`), which offers split rings only
    /// and reaches them through its IOTLB, not QEMU's ring code: the ring
    /// check expects a split ring, and each mark also reads the disk's
    /// serial (one GET_ID request, at which the back-end logs its counts).
    pub vhost: bool,
    /// Sample QEMU's CPU time and run the calibration loop around each
    /// workload (`vg.cpu=0`: not, as in CI, where nothing reads them).
    pub cpu: bool,
}

/// `4k`, `1m` or a byte count.
pub fn parse_size(s: &str) -> Option<usize> {
    let (n, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    n.parse::<usize>().ok().map(|n| n * mult)
}

fn list<T>(kv: &str, v: &str, item: impl Fn(&str) -> Option<T>) -> Result<Vec<T>, String> {
    v.split(',').map(item).collect::<Option<_>>().ok_or(format!("bad {kv}"))
}

impl Opts {
    /// Parses the `vg.*` options of a kernel command line; others are skipped.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, String> {
        let mut o = Opts {
            policy: Policy::Ours(Mode::Strict),
            mib: 4,
            neg: true,
            sg: true,
            sizes: vec![4 << 10, 64 << 10, 1 << 20],
            qds: vec![1, 32],
            merges: false,
            marks: true,
            irq: false,
            vhost: false,
            cpu: true,
        };
        for kv in cmdline.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else { continue };
            match k {
                "vg.policy" => {
                    o.policy = Policy::from_name(v).ok_or_else(|| {
                        let names: Vec<_> = Policy::ALL.iter().map(|p| p.name()).collect();
                        format!("unknown {kv} (one of {})", names.join(", "))
                    })?
                }
                "vg.mib" => o.mib = v.parse().map_err(|_| format!("bad {kv}"))?,
                "vg.neg" => o.neg = v == "1",
                "vg.sg" => o.sg = v == "1",
                "vg.merges" => o.merges = v == "1",
                "vg.marks" => o.marks = v != "0",
                "vg.irq" => o.irq = v == "1",
                "vg.vhost" => o.vhost = v == "1",
                "vg.cpu" => o.cpu = v != "0",
                "vg.sizes" => o.sizes = list(kv, v, parse_size)?,
                "vg.qds" => o.qds = list(kv, v, |q| q.parse().ok())?,
                _ => {}
            }
        }
        if o.mib == 0 || o.mib > 64 {
            return Err(format!("vg.mib={} outside 1..=64", o.mib));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_the_kernel_command_line() {
        let o = Opts::from_cmdline(
            "console=ttyS0 quiet vg.policy=best vg.mib=8 vg.neg=0 vg.sizes=4k,1m vg.qds=32 vg.merges=1",
        )
        .unwrap();
        assert_eq!((o.policy, o.mib, o.neg, o.sg), (Policy::Ours(Mode::Best), 8, false, true));
        assert_eq!((o.sizes, o.qds, o.merges), (vec![4096, 1 << 20], vec![32], true));
        assert!(!Opts::from_cmdline("").unwrap().merges);
        assert!(Opts::from_cmdline("").unwrap().marks);
        assert!(!Opts::from_cmdline("vg.marks=0").unwrap().marks);
        assert!(!Opts::from_cmdline("").unwrap().irq);
        assert!(Opts::from_cmdline("vg.irq=1").unwrap().irq);
        assert!(Opts::from_cmdline("").unwrap().cpu);
        assert!(!Opts::from_cmdline("vg.cpu=0").unwrap().cpu);
        assert!(Opts::from_cmdline("vg.mib=65").is_err(), "the write region is 64 MiB");
        assert!(Opts::from_cmdline("vg.sizes=4x").is_err());
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("512"), Some(512));
    }

    #[test]
    fn policies_have_one_spelling() {
        for p in Policy::ALL {
            assert_eq!(Policy::from_name(p.name()), Some(p));
        }
        assert_eq!(Policy::from_name("linux-none"), Some(Policy::Linux(LinuxBoot::None)));
        assert_eq!(Policy::from_name("identity"), Some(Policy::Ours(Mode::Identity)));
        // The old names are refused, not guessed at.
        for old in ["bypass", "lazy-batch", "linux-noiommu"] {
            let e = Opts::from_cmdline(&format!("vg.policy={old}")).unwrap_err();
            assert!(e.contains("unknown vg.policy") && e.contains("best"), "{e}");
        }
        assert_eq!(LinuxBoot::Lazy.domain_type(), Some("DMA-FQ"));
        assert!(!LinuxBoot::None.has_iommu());
    }
}
