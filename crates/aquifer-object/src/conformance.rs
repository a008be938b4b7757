//! The object-store conformance suite: every backend runs every case through
//! [`object_conformance!`](crate::object_conformance).

use crate::ObjectStore;
use bytes::Bytes;

pub fn put_get_roundtrip(s: &dyn ObjectStore) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.put("chunks/0/1/1_0_100000", Bytes::from(data.clone()))
        .unwrap();
    assert_eq!(s.get("chunks/0/1/1_0_100000", 0, None).unwrap(), data);
    assert_eq!(s.head("chunks/0/1/1_0_100000").unwrap().size, 100_000);
}

pub fn ranged_get(s: &dyn ObjectStore) {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    s.put("k", Bytes::from(data.clone())).unwrap();
    assert_eq!(s.get("k", 100, Some(50)).unwrap(), data[100..150]);
    assert_eq!(s.get("k", 9_990, Some(50)).unwrap(), data[9_990..]);
    assert_eq!(s.get("k", 5_000, None).unwrap(), data[5_000..]);
    assert!(s.get("k", 20_000, Some(5)).unwrap().is_empty());
    let mut buf = vec![0u8; 64];
    assert_eq!(s.get_into("k", 9_980, &mut buf).unwrap(), 20);
    assert_eq!(&buf[..20], &data[9_980..]);
    assert_eq!(s.get_into("k", 1_000, &mut buf).unwrap(), 64);
    assert_eq!(&buf[..], &data[1_000..1_064]);
}

/// A recycled buffer's old bytes never show through.
pub fn get_owned_fills_a_recycled_buffer(s: &dyn ObjectStore) {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 249) as u8).collect();
    s.put("k", Bytes::from(data.clone())).unwrap();
    let junk = vec![0xAAu8; 50_000];
    assert_eq!(
        s.get_owned("k", 100, 50, junk.clone()).unwrap(),
        data[100..150]
    );
    assert_eq!(
        s.get_owned("k", 9_990, 64, junk.clone()).unwrap(),
        data[9_990..]
    );
    assert_eq!(s.get_owned("k", 0, 10_000, Vec::new()).unwrap(), data);
    assert!(s.get_owned("nope", 0, 10, junk).unwrap_err().is_not_found());
}

pub fn missing_objects(s: &dyn ObjectStore) {
    assert!(s.get("nope", 0, None).unwrap_err().is_not_found());
    assert!(s.head("nope").unwrap_err().is_not_found());
    s.delete("nope").unwrap();
}

pub fn delete_removes(s: &dyn ObjectStore) {
    s.put("a/b", Bytes::from_static(b"x")).unwrap();
    s.delete("a/b").unwrap();
    assert!(s.get("a/b", 0, None).unwrap_err().is_not_found());
}

pub fn put_replaces_whole_object(s: &dyn ObjectStore) {
    s.put("k", Bytes::from_static(b"long value")).unwrap();
    s.put("k", Bytes::from_static(b"v2")).unwrap();
    assert_eq!(s.get("k", 0, None).unwrap(), &b"v2"[..]);
}

pub fn list_in_order(s: &dyn ObjectStore) {
    for k in ["p/2", "p/1", "p/3", "q/1", "p/10"] {
        s.put(k, Bytes::from_static(b"x")).unwrap();
    }
    let keys = |v: Vec<crate::ObjectInfo>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
    assert_eq!(
        keys(s.list("p/", "", 100).unwrap()),
        ["p/1", "p/10", "p/2", "p/3"]
    );
    assert_eq!(keys(s.list("p/", "p/10", 2).unwrap()), ["p/2", "p/3"]);
    assert!(s.list("z/", "", 10).unwrap().is_empty());
}

pub fn empty_object(s: &dyn ObjectStore) {
    s.put("e", Bytes::new()).unwrap();
    assert!(s.get("e", 0, None).unwrap().is_empty());
    assert_eq!(s.head("e").unwrap().size, 0);
}

#[macro_export]
macro_rules! object_conformance {
    ($make:expr) => {
        $crate::object_conformance!(@cases $make; put_get_roundtrip, ranged_get, missing_objects,
            delete_removes, put_replaces_whole_object, list_in_order, empty_object,
            get_owned_fills_a_recycled_buffer);
    };
    // For backends that need a server: `$make` gives an Option and None skips the cases.
    (optional $make:expr) => {
        $crate::object_conformance!(@optional $make; put_get_roundtrip, ranged_get,
            missing_objects, delete_removes, put_replaces_whole_object, list_in_order,
            empty_object, get_owned_fills_a_recycled_buffer);
    };
    (@optional $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let Some((s, _guard)) = $make else { return };
                $crate::conformance::$case(&s);
            }
        )*
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let (s, _guard) = $make;
                $crate::conformance::$case(&s);
            }
        )*
    };
}
