//! Host models for the modelled cost: what one VM exit (a kick of the IOMMU
//! request queue) and one completion interrupt cost the host. The presets
//! are stated assumptions, orders of magnitude, not measurements of any
//! machine; measure your own host with `perf kvm stat` (docs/cli.md).

use clap::ValueEnum;

/// A named host model (`--host`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Host {
    /// Current x86 KVM, notify handled in the kernel (ioeventfd): exit
    /// 1.5 us, interrupt 1 us.
    Kvm,
    /// KVM with the notify handled by the VMM in user space: exit 5 us,
    /// interrupt 2 us.
    Userspace,
    /// A nested guest (L2 on KVM on KVM): exit 20 us, interrupt 10 us.
    Nested,
    /// A confidential guest (SEV-SNP / TDX), exits through the security
    /// monitor: exit 20 us, interrupt 10 us.
    Confidential,
}

impl Host {
    /// The assumed cost of one exit and one interrupt, in ns.
    pub fn costs(self) -> HostCosts {
        let (exit_ns, irq_ns) = match self {
            Host::Kvm => (1_500, 1_000),
            Host::Userspace => (5_000, 2_000),
            Host::Nested => (20_000, 10_000),
            Host::Confidential => (20_000, 10_000),
        };
        HostCosts { exit_ns, irq_ns }
    }

    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Host::Kvm => "kvm",
            Host::Userspace => "userspace",
            Host::Nested => "nested",
            Host::Confidential => "confidential",
        }
    }
}

/// Cost of one exit and one interrupt, in ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCosts {
    /// One kick of the request queue (a VM exit).
    pub exit_ns: u64,
    /// One completion interrupt delivered to the guest.
    pub irq_ns: u64,
}

/// Text for `--help`: where the preset figures come from and how to
/// measure a host.
pub const GUIDANCE: &str = "\
Exit and interrupt costs (assumed orders of magnitude, not measurements):
  kvm           exit 1.5 us, irq 1 us   in-kernel ioeventfd exit on current x86 KVM (about 1-2 us)
  userspace     exit 5 us,   irq 2 us   exit to the VMM in user space (several us)
  nested        exit 20 us,  irq 10 us  an L2 exit is handled by L0 and L1 (tens of us)
  confidential  exit 20 us,  irq 10 us  SEV-SNP/TDX exits pass the security monitor (tens of us)
Measure your own host: `perf kvm stat live` (or `perf kvm stat record -p PID` then `report`) on the host
while the guest does I/O; use the average time of the IO_INSTRUCTION/EPT_MISCONFIG (MMIO notify) or
HLT/interrupt-window exits. Sources and caveats: docs/cli.md, section \"Exit cost\".";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_name_their_figures_in_the_guidance() {
        for h in Host::value_variants() {
            let c = h.costs();
            let line = GUIDANCE.lines().find(|l| l.trim_start().starts_with(h.name())).unwrap();
            let us = |ns: u64| format!("{}", ns as f64 / 1000.0);
            assert!(line.contains(&format!("exit {} us", us(c.exit_ns))), "{line}");
            assert!(line.contains(&format!("irq {} us", us(c.irq_ns))), "{line}");
        }
    }
}
