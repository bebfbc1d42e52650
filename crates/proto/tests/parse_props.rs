//! Parsing arbitrary bytes never panics and always agrees with the layout.
use proptest::prelude::*;
use viommu_proto::pgtable::{self, walk, Entry, WalkError};
use viommu_proto::{ParseError, Property, PropertyIter, Request, RequestType};

proptest! {
    #[test]
    fn request_parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        match Request::parse(&bytes) {
            Ok(req) => {
                let ty = req.request_type();
                prop_assert_eq!(ty as u8, bytes[0]);
                prop_assert!(bytes.len() >= 4 + ty.body_len());
                let mut out = [0u8; 96];
                let n = req.encode(&mut out).unwrap();
                prop_assert_eq!(&out[4..n], &bytes[4..n]);
            }
            Err(ParseError::UnknownRequestType(t)) => prop_assert!(RequestType::from_u8(t).is_none()),
            Err(ParseError::Truncated { needed, available }) => prop_assert!(available < needed),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn property_iter_is_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut seen = 0usize;
        for p in PropertyIter::new(&bytes) {
            seen += 1;
            // Each property consumes at least its 4-byte header.
            prop_assert!(seen <= bytes.len() / 4);
            if let Ok(Property::Unknown { value, .. }) = p {
                prop_assert!(value.len() <= bytes.len());
            }
        }
    }

    /// A walk over hostile memory (every entry random, some reads outside memory) reads
    /// at most four entries, each once, and a translation it returns agrees with the
    /// last entry it read.
    #[test]
    fn walk_over_random_memory_is_bounded(
        root in any::<u64>(),
        iova in any::<u64>(),
        entries in proptest::collection::vec(any::<u64>(), 4),
        holes in proptest::collection::vec(any::<bool>(), 4),
    ) {
        let mut reads = Vec::new();
        let r = walk(root, iova, |gpa| {
            let i = reads.len().min(3);
            reads.push(gpa);
            (!holes[i]).then_some(entries[i])
        });
        prop_assert!(reads.len() <= pgtable::LEVELS);
        prop_assert!(reads.iter().all(|g| g % 8 == 0 && *g < 1 << 52));
        match r {
            Ok(t) => {
                let last = reads.len() - 1;
                let Ok(Entry::Leaf { oa, .. }) = pgtable::decode(entries[last], last) else {
                    return Err(TestCaseError::fail("leaf without a leaf entry"));
                };
                prop_assert_eq!(t.oa, oa);
                prop_assert_eq!(t.size, pgtable::level_size(last));
                prop_assert!(t.contains(iova));
                prop_assert!(iova <= pgtable::IOVA_MAX);
            }
            Err(WalkError::OutOfRange) => prop_assert!(iova > pgtable::IOVA_MAX && reads.is_empty()),
            Err(WalkError::TableOutsideMemory { level, gpa }) => {
                prop_assert!(holes[level]);
                prop_assert_eq!(gpa, reads[level]);
            }
            Err(WalkError::NotMapped { level } | WalkError::Malformed { level, .. }) => {
                prop_assert_eq!(level + 1, reads.len())
            }
        }
    }
}
