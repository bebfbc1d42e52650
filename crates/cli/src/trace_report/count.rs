//! Counting QEMU trace events per workload.
//!
//! The guest's K-th config write is traced as the K-th
//! `virtio_iommu_set_config` line; a mark names the workload that starts
//! there. Every line from one mark's `set_config` up to the next belongs to
//! that mark's *segment*; segment 0 is everything before the first mark.

use std::collections::HashMap;

use viommu_vm::replay::trace::{IommuVdev, TraceLine};

use super::serial::Mark;

/// What the trace shows in one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// `virtio_iommu_map` lines.
    pub map: u64,
    /// `virtio_iommu_unmap` lines.
    pub unmap: u64,
    /// `virtio_iommu_attach` lines.
    pub attach: u64,
    /// `virtio_iommu_report_fault` lines.
    pub faults: u64,
    /// `virtio_blk_req_complete` lines: one per virtio-blk request.
    pub blk_reqs: u64,
    /// Notifications of queue 0, by `vdev`: only the IOMMU's are kicks of
    /// its request queue, and which `vdev` that is is known at the end.
    queue0_notifies: HashMap<String, u64>,
}

impl Counts {
    /// Request-queue kicks of the device `vdev`.
    pub fn kicks(&self, vdev: Option<&str>) -> u64 {
        vdev.and_then(|v| self.queue0_notifies.get(v)).copied().unwrap_or(0)
    }

    fn add(&mut self, other: &Counts) {
        self.map += other.map;
        self.unmap += other.unmap;
        self.attach += other.attach;
        self.faults += other.faults;
        self.blk_reqs += other.blk_reqs;
    }
}

/// A trace, counted per segment.
#[derive(Clone, Debug)]
pub struct Segments {
    /// Index `i` is segment `i`: 0 before the first mark, `i` from mark `i`.
    pub counts: Vec<Counts>,
    /// `virtio_iommu_set_config` lines seen.
    pub set_configs: u64,
    /// The IOMMU's `vdev`, if it ever handled a request.
    pub iommu_vdev: Option<String>,
}

/// Counts trace lines one by one.
#[derive(Debug)]
pub struct Counter<'m> {
    marks: &'m [Mark],
    current: usize,
    out: Segments,
    vdev: IommuVdev,
}

impl<'m> Counter<'m> {
    /// A counter for a boot whose guest made `marks`.
    pub fn new(marks: &'m [Mark]) -> Self {
        let out = Segments {
            counts: vec![Counts::default(); marks.len() + 1],
            set_configs: 0,
            iommu_vdev: None,
        };
        Self { marks, current: 0, out, vdev: IommuVdev::default() }
    }

    /// Takes one trace line; lines that are not trace events are skipped.
    pub fn add_line(&mut self, line: &str) {
        let Some(t) = TraceLine::parse(line) else { return };
        self.vdev.observe(&t);
        let c = &mut self.out.counts[self.current];
        match t.event {
            "virtio_iommu_set_config" => self.set_config(),
            "virtio_queue_notify" => {
                if let Some((vdev, "0")) = t.notify() {
                    match c.queue0_notifies.get_mut(vdev) {
                        Some(n) => *n += 1,
                        None => {
                            c.queue0_notifies.insert(vdev.to_string(), 1);
                        }
                    }
                }
            }
            "virtio_iommu_map" => c.map += 1,
            "virtio_iommu_unmap" => c.unmap += 1,
            "virtio_iommu_attach" => c.attach += 1,
            "virtio_iommu_report_fault" => c.faults += 1,
            "virtio_blk_req_complete" => c.blk_reqs += 1,
            _ => {}
        }
    }

    /// The K-th `set_config` starts the segment of the mark made at K.
    fn set_config(&mut self) {
        self.out.set_configs += 1;
        let k = self.out.set_configs;
        while self.current < self.marks.len() && self.marks[self.current].cfgw == Some(k) {
            self.current += 1;
        }
    }

    /// The counts.
    pub fn finish(mut self) -> Segments {
        self.out.iommu_vdev = self.vdev.get().map(str::to_owned);
        self.out
    }
}

impl Segments {
    /// The sum over all segments (kicks left out).
    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        self.counts.iter().for_each(|c| t.add(c));
        t
    }

    /// Request-queue kicks of the IOMMU in segment `s`.
    pub fn kicks(&self, s: usize) -> u64 {
        self.counts.get(s).map_or(0, |c| c.kicks(self.iommu_vdev.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(name: &str, cfgw: u64) -> Mark {
        Mark { name: name.into(), cfgw: Some(cfgw) }
    }

    #[test]
    fn lines_land_in_the_segment_of_the_mark_before_them() {
        // Config write 1 is the driver's own; the marks are writes 2 and 3;
        // write 4 is unmarked.
        let marks = [mark("a", 2), mark("b", 3)];
        let mut c = Counter::new(&marks);
        for l in [
            "1.0:virtio_queue_notify vdev 0xi n 0 vq 0x1",
            "1.1:virtio_iommu_attach domain=1 endpoint=40",
            "1.2:virtio_iommu_set_config",
            "1.3:virtio_iommu_map domain=1 virt_start=0 virt_end=0xfff phys_start=0 flags=3",
            "2.0:virtio_iommu_set_config",
            "2.1:virtio_queue_notify vdev 0xi n 0 vq 0x1",
            "2.2:virtio_iommu_map domain=1 virt_start=0x1000 virt_end=0x1fff phys_start=0 flags=3",
            "2.3:virtio_queue_notify vdev 0xb n 0 vq 0x2",
            "2.4:virtio_queue_notify vdev 0xi n 1 vq 0x3",
            "2.5:virtio_blk_req_complete vdev 0xb req 0x1 status 0",
            "2.6:virtio_iommu_report_fault reason 4 flags 1 endpoint 40 address 0x0",
            "3.0:virtio_iommu_set_config",
            "3.1:virtio_iommu_set_config",
            "3.2:virtio_iommu_unmap domain=1 virt_start=0 virt_end=0x1fff",
            "qemu-system-x86_64: terminating on signal 15",
        ] {
            c.add_line(l);
        }
        let s = c.finish();
        assert_eq!(s.iommu_vdev.as_deref(), Some("0xi"));
        assert_eq!(s.set_configs, 4);
        let [before, a, b] = &s.counts[..] else { panic!("3 segments") };
        assert_eq!((before.attach, before.map, s.kicks(0)), (1, 1, 1));
        // Queue 1 (events) and the other device are not kicks.
        assert_eq!((a.map, a.blk_reqs, a.faults, s.kicks(1)), (1, 1, 1, 1));
        assert_eq!((b.map, b.unmap, s.kicks(2)), (0, 1, 0), "the unmarked write stays in b");
        assert_eq!(s.kicks(9), 0);
        let t = s.total();
        assert_eq!((t.map, t.unmap, t.attach, t.faults, t.blk_reqs), (2, 1, 1, 1, 1));
    }

    #[test]
    fn without_iommu_requests_there_are_no_kicks() {
        let mut c = Counter::new(&[]);
        c.add_line("1.0:virtio_queue_notify vdev 0xb n 0 vq 0x2");
        let s = c.finish();
        assert_eq!((s.iommu_vdev.as_deref(), s.kicks(0)), (None, 0));
    }
}
