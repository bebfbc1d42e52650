//! What the guest prints on its console for the host: `VG MARK` and
//! `VG PERF` lines (see `crates/guest/src/bin/viommu-guest`).

/// `VG MARK <name> cfgw=<K>`: the guest's K-th traced config write starts
/// workload `name` (the transport counts its config writes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The workload that starts here.
    pub name: String,
    /// Which `virtio_iommu_set_config` line of the trace it is (1-based);
    /// `None` when the line had none, so that no trace line matches it.
    pub cfgw: Option<u64>,
}

/// `VG PERF <name> k=v...`: one finished workload, with the guest's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Perf {
    /// The workload.
    pub name: String,
    /// The `k=v` fields, in order.
    pub fields: Vec<(String, String)>,
}

impl Perf {
    /// The value of field `key`, as printed.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Field `key` as a count.
    pub fn count(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

/// The marks and PERF lines of one boot's console, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Console {
    /// Every mark, in the order the guest made them.
    pub marks: Vec<Mark>,
    /// Every PERF line.
    pub perf: Vec<Perf>,
}

impl Console {
    /// Takes one console line; others than MARK and PERF are ignored.
    pub fn add_line(&mut self, line: &str) {
        let mut t = line.split_whitespace();
        if t.next() != Some("VG") {
            return;
        }
        let (kind, Some(name)) = (t.next(), t.next()) else { return };
        let name = name.to_string();
        let fields: Vec<(String, String)> = t
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match kind {
            Some("MARK") => {
                let cfgw =
                    fields.iter().find(|(k, _)| k == "cfgw").and_then(|(_, v)| v.parse().ok());
                self.marks.push(Mark { name, cfgw });
            }
            Some("PERF") => self.perf.push(Perf { name, fields }),
            _ => {}
        }
    }

    /// The 1-based number of the last mark named `name`: the segment of the
    /// trace that belongs to that workload.
    pub fn segment_of(&self, name: &str) -> Option<usize> {
        self.marks.iter().rposition(|m| m.name == name).map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_perf_lines_are_read_and_the_rest_ignored() {
        let mut c = Console::default();
        for l in [
            "VG BOOTED hugepages=64",
            "VG MARK read-4k-qd1 cfgw=3",
            "VG PERF read-4k-qd1 ios=4 reqs=4 bytes=16384 mbps=12.5 map=4 kicks=4 blk_kicks=4",
            "VG PASS lazy-read-4k-qd1",
            "VG MARK end",
            "[    1.0] random kernel line",
            "VG",
        ] {
            c.add_line(l);
        }
        assert_eq!(
            c.marks,
            [
                Mark { name: "read-4k-qd1".into(), cfgw: Some(3) },
                Mark { name: "end".into(), cfgw: None }
            ]
        );
        let p = &c.perf[0];
        assert_eq!(
            (p.name.as_str(), p.get("mbps"), p.count("kicks")),
            ("read-4k-qd1", Some("12.5"), Some(4))
        );
        assert_eq!(p.count("unmap"), None);
        assert_eq!(c.segment_of("read-4k-qd1"), Some(1));
        assert_eq!(c.segment_of("end"), Some(2));
        assert_eq!(c.segment_of("write-4k-qd1"), None);
    }
}
