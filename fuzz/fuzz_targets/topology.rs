//! The firmware-topology parsers of the driver: arbitrary bytes as an ACPI VIOT table and
//! as a flattened device tree. A refusal is fine; a panic, a hang or a look-up that
//! disagrees with the parsed nodes is not.
//!
//! Input: the table itself. The seeds are QEMU's VIOT tables and device trees
//! (crates/driver/tests/data).
#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_driver::topology::devicetree::DeviceTree;
use viommu_driver::topology::viot::{Viot, ViotEndpoint};

fuzz_target!(|data: &[u8]| {
    if let Ok(viot) = Viot::parse(data) {
        for e in viot.endpoints() {
            match *e {
                ViotEndpoint::PciRange {
                    endpoint_start, segment_start, bdf_start, iommu, ..
                } => {
                    // The first function of every range is found, under its own IOMMU and ID.
                    assert_eq!(
                        viot.pci_endpoint(segment_start, bdf_start),
                        Some((endpoint_start, iommu))
                    );
                }
                ViotEndpoint::Mmio { endpoint, base, iommu } => {
                    assert_eq!(viot.mmio_endpoint(base), Some((endpoint, iommu)));
                }
            }
        }
    }
    if let Ok(dt) = DeviceTree::parse(data) {
        for m in dt.iommu_maps() {
            // Where the host bridge's path names it (names may repeat or not be UTF-8), the
            // look-up of its first requester ID finds an entry.
            let host = dt.path(m.node);
            if m.rid_base & m.mask == m.rid_base && dt.node(&host) == Some(m.node) {
                assert!(dt.pci_endpoint(&host, m.rid_base).is_some());
            }
        }
        for d in dt.devices() {
            let _ = dt.device_endpoint(&dt.path(d.node));
        }
    }
});
