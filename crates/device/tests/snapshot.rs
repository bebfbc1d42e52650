//! Snapshot and restore: "A restored device behaves exactly like the original."
//! The state goes through serde (JSON), the restored device runs on a copy of guest memory,
//! and both then receive the same requests, translations and event buffers.

mod common;
use common::*;
use proptest::prelude::*;
use viommu_device::{Access, DeviceState, VirtioIommu};
use viommu_proto::*;

fn req() -> impl Strategy<Value = Request> {
    let d = 0u32..4;
    let e = 0u32..6;
    let page = 0u64..16;
    prop_oneof![
        3 => (d.clone(), e.clone(), prop::bool::weighted(0.2))
            .prop_map(|(d, e, b)| attach_flags(d, e, u32::from(b))),
        1 => (d.clone(), e.clone()).prop_map(|(d, e)| detach(d, e)),
        5 => (d.clone(), page.clone(), 1u64..4, page.clone(), 1u32..4)
            .prop_map(|(d, s, n, p, f)| map(d, s << 12, ((s + n) << 12) - 1, p << 12, f)),
        2 => (d, page, 1u64..6).prop_map(|(d, s, n)| unmap(d, s << 12, ((s + n) << 12) - 1)),
        1 => e.prop_map(probe),
    ]
}

fn translations(dev: &VirtioIommu) -> Vec<Option<u64>> {
    let i = dev.iommu();
    let mut v = vec![];
    for e in 0..5 {
        for page in 0..18u64 {
            let t = i.translate(e, (page << 12) + 4, 4, Access::Read).ok();
            v.push(t.map(|t| t.segments()[0].addr));
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn restored_device_behaves_like_original(
        before in prop::collection::vec(req(), 0..40),
        faults in prop::collection::vec((0u32..5, 0u64..32), 0..6),
        after in prop::collection::vec(req(), 1..40),
    ) {
        let mem1 = new_mem();
        let mut drv1 = Driver::new(&mem1);
        let mut dev1 = drv1.device(cfg_with_resv());
        for r in &before {
            drv1.request(&mut dev1, r);
        }
        for &(e, page) in &faults {
            let _ = dev1.iommu().translate(e, page << 12, 8, Access::Write);
        }
        let state = dev1.snapshot();
        let json = serde_json::to_string(&state).unwrap();
        let state2: DeviceState = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&state, &state2);

        let mem2 = new_mem();
        let mut drv2 = drv1.fork(&mem2);
        let mut dev2 = VirtioIommu::new(cfg_with_resv()).unwrap();
        dev2.restore(state2).unwrap();
        prop_assert_eq!(dev2.snapshot(), state);
        prop_assert_eq!(translations(&dev1), translations(&dev2));

        // Pending faults come out identically.
        let b1 = drv1.add_event_buffer(24);
        let b2 = drv2.add_event_buffer(24);
        prop_assert_eq!(dev1.process_event_queue(&mem1).unwrap(), dev2.process_event_queue(&mem2).unwrap());
        prop_assert_eq!(drv1.take_used(1), drv2.take_used(1));
        prop_assert_eq!(drv1.read(b1, 24), drv2.read(b2, 24));

        for r in &after {
            prop_assert_eq!(drv1.request(&mut dev1, r), drv2.request(&mut dev2, r), "{:?}", r);
        }
        prop_assert_eq!(translations(&dev1), translations(&dev2));
        prop_assert_eq!(dev1.snapshot(), dev2.snapshot());
        prop_assert_eq!(dev1.iommu().pending_faults(), dev2.iommu().pending_faults());
    }
}

/// A snapshot naming an endpoint this device does not have is refused.
#[test]
fn restore_refuses_foreign_state() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    let state = dev.snapshot();
    let mut other = VirtioIommu::new(cfg(&[1])).unwrap();
    assert!(other.restore(state.clone()).is_err());
    let mut bad = state.clone();
    bad.domains[0].mappings.push(viommu_device::Mapping { start: 5, end: 1, phys: 0, flags: 1 });
    assert!(dev.restore(bad).is_err());
    // A failed restore leaves the device reset, not half restored.
    assert_eq!(dev.iommu().domain_count(), 0);
    assert_eq!(dev.iommu().endpoint_domain(2), None);
    assert!(dev.restore(state).is_ok());
    assert_eq!(dev.iommu().endpoint_domain(2), Some(1));
}
