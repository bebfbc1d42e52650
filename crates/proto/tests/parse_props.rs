//! Parsing arbitrary bytes never panics and always agrees with the layout.
use proptest::prelude::*;
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
}
