//! QEMU trace lines, one at a time: `event args`, or with a timestamp
//! prefix, `[pid@]time:event args` (QEMU's `log` backend writes either,
//! depending on its options).
//!
//! [`parse_qemu_trace`](super::parse_qemu_trace) builds request streams from
//! them; `viommu trace-report` counts them per workload. Both find the
//! IOMMU's `vdev` the same way, with [`IommuVdev`].
//!
//! ```
//! use viommu_vm::replay::trace::{IommuVdev, TraceLine};
//! let mut vdev = IommuVdev::default();
//! for l in ["1.0:virtio_queue_notify vdev 0xa n 0 vq 0x1", "1.1:virtio_iommu_attach domain=0 endpoint=24"] {
//!     vdev.observe(&TraceLine::parse(l).unwrap());
//! }
//! assert_eq!(vdev.get(), Some("0xa"));
//! ```

use std::collections::HashMap;

/// One trace line, split into its event name and arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceLine<'a> {
    /// The event, e.g. `virtio_iommu_map`.
    pub event: &'a str,
    /// Everything after the event name.
    pub args: &'a str,
}

impl<'a> TraceLine<'a> {
    /// Splits a line; `None` when it is no trace event (QEMU's own messages
    /// in the log, a truncated last line): event names are letters, digits
    /// and `_`.
    pub fn parse(line: &'a str) -> Option<Self> {
        let line = line.trim();
        let rest = match line.split_once(':') {
            Some((pre, rest)) if is_timestamp(pre) => rest,
            _ => line,
        };
        let (event, args) = rest.split_once(' ').unwrap_or((rest, ""));
        let name_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        (!event.is_empty() && event.bytes().all(name_ok)).then_some(Self { event, args })
    }

    /// Whether `line` looks like QEMU trace output rather than the native
    /// format: a timestamp prefix, or a `virtio_` event.
    pub fn looks_like_trace(line: &str) -> bool {
        let has_prefix = line.trim().split_once(':').is_some_and(|(pre, _)| is_timestamp(pre));
        has_prefix || TraceLine::parse(line).is_some_and(|t| t.event.starts_with("virtio_"))
    }

    /// The arguments as `key=value` or `key value` pairs, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut toks = self.args.split_whitespace();
        std::iter::from_fn(move || {
            let tok = toks.next()?;
            Some(tok.split_once('=').unwrap_or_else(|| (tok, toks.next().unwrap_or(""))))
        })
    }

    /// The value of argument `key` (the last one, if repeated).
    pub fn arg(&self, key: &str) -> Option<&'a str> {
        self.pairs().filter(|&(k, _)| k == key).map(|(_, v)| v).last()
    }

    /// Whether the event is a request the IOMMU handled: ATTACH, DETACH,
    /// MAP or UNMAP.
    pub fn is_request(&self) -> bool {
        matches!(
            self.event,
            "virtio_iommu_attach"
                | "virtio_iommu_detach"
                | "virtio_iommu_map"
                | "virtio_iommu_unmap"
        )
    }

    /// For `virtio_queue_notify`: the device and the queue number.
    pub fn notify(&self) -> Option<(&'a str, &'a str)> {
        if self.event != "virtio_queue_notify" {
            return None;
        }
        self.arg("vdev").zip(self.arg("n"))
    }
}

/// Whether a line could start with `pre:`: digits, dots and `@`.
pub fn is_timestamp(pre: &str) -> bool {
    !pre.is_empty() && pre.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'@')
}

/// Finds the IOMMU's `vdev` among the notified devices: each IOMMU request
/// line credits the device notified last before it (once per notify), and
/// the device with the most credit wins. QEMU handles a request queue right
/// after its kick, so the IOMMU's requests follow its own notifications.
#[derive(Clone, Debug, Default)]
pub struct IommuVdev {
    credit: HashMap<String, usize>,
    last: Option<String>,
}

impl IommuVdev {
    /// Takes one line into account.
    pub fn observe(&mut self, line: &TraceLine<'_>) {
        if line.event == "virtio_queue_notify" {
            self.last = line.arg("vdev").map(str::to_owned);
        } else if line.is_request() {
            if let Some(v) = self.last.take() {
                *self.credit.entry(v).or_default() += 1;
            }
        }
    }

    /// The IOMMU's `vdev`, once any request was seen after a notify.
    pub fn get(&self) -> Option<&str> {
        // Ties go to the smaller name, so that the answer does not depend
        // on hash order.
        self.credit
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(v, _)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_into_event_and_arguments() {
        let l = TraceLine::parse("77@5.0:virtio_queue_notify vdev 0xa n 0 vq 0x1").unwrap();
        assert_eq!(l.event, "virtio_queue_notify");
        assert_eq!(l.notify(), Some(("0xa", "0")));
        assert_eq!(l.arg("vq"), Some("0x1"));
        let m = TraceLine::parse("5.1:virtio_iommu_map domain=0 virt_start=0x1000").unwrap();
        assert!(m.is_request());
        assert_eq!(m.arg("virt_start"), Some("0x1000"));
        assert_eq!(m.arg("virt_end"), None);
        assert_eq!(m.notify(), None);
        assert_eq!(TraceLine::parse("1.0:virtio_iommu_set_config").unwrap().args, "");
        assert_eq!(TraceLine::parse("qemu-system-x86_64: terminating on signal"), None);
        // QEMU 10's log backend without timestamps, as scripts/real-guest gets it.
        let bare = TraceLine::parse("virtio_queue_notify vdev 0x564b n 0 vq 0x564c").unwrap();
        assert_eq!((bare.event, bare.notify()), ("virtio_queue_notify", Some(("0x564b", "0"))));
        let colon = TraceLine::parse("virtio_iommu_switch_address_space Device 00:00.0 x").unwrap();
        assert_eq!(colon.event, "virtio_iommu_switch_address_space");
        assert_eq!(
            TraceLine::parse("1795499970.6:virtio_iommu_set_config").unwrap().event,
            "virtio_iommu_set_config"
        );
        assert!(TraceLine::looks_like_trace("virtio_iommu_set_config"));
        assert!(TraceLine::looks_like_trace("1.0:anything"));
        assert!(!TraceLine::looks_like_trace("map 1 0x1000 0x1fff 0x5000 rw"));
        assert_eq!(TraceLine::parse(""), None);
    }

    #[test]
    fn the_iommu_is_the_device_whose_kicks_requests_follow() {
        let text = "\
1.0:virtio_queue_notify vdev 0xb n 0 vq 0x1
1.1:virtio_iommu_translate mr=x rid=40 addr=0x0 flag=1
2.0:virtio_queue_notify vdev 0xa n 0 vq 0x2
2.1:virtio_iommu_attach domain=0 endpoint=40
2.2:virtio_iommu_map domain=0 virt_start=0 virt_end=0xfff phys_start=0 flags=3
3.0:virtio_queue_notify vdev 0xb n 0 vq 0x1
3.1:virtio_iommu_unmap domain=0 virt_start=0 virt_end=0xfff
4.0:virtio_queue_notify vdev 0xa n 0 vq 0x2
4.1:virtio_iommu_unmap domain=0 virt_start=0 virt_end=0xfff
";
        let mut v = IommuVdev::default();
        assert_eq!(v.get(), None);
        text.lines().filter_map(TraceLine::parse).for_each(|l| v.observe(&l));
        assert_eq!(v.get(), Some("0xa"), "2 credits against 1");
    }
}
