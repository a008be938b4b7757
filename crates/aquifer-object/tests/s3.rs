//! The S3 backend against a real S3-protocol server. `scripts/test.sh` starts s3s-fs on
//! 127.0.0.1 and sets `AQUIFER_TEST_S3` to `http://127.0.0.1:PORT/BUCKET` with the keys in
//! the standard AWS variables. Without a server the cases are skipped, except under CI where
//! a missing server is a failure.
#![cfg(feature = "s3")]

use aquifer_object::s3::{S3Credentials, S3Location, S3Options, S3Store};
use aquifer_object::{ObjectError, ObjectStore};
use bytes::Bytes;
use std::sync::atomic::{AtomicU32, Ordering};

fn server() -> Option<String> {
    match std::env::var("AQUIFER_TEST_S3") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("AQUIFER_TEST_S3 is not set: scripts/test.sh starts the S3 test server")
        }
        _ => {
            eprintln!("skipped: AQUIFER_TEST_S3 is not set (scripts/test.sh starts a server)");
            None
        }
    }
}

fn static_keys(access_key: &str, secret_key: &str) -> S3Options {
    S3Options {
        credentials: Some(S3Credentials {
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            session_token: None,
        }),
        ..Default::default()
    }
}

/// Deletes everything under the test's prefix when the test ends.
struct Cleanup(S3Store);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(all) = self.0.list("", "", 10_000) {
            for o in all {
                let _ = self.0.delete(&o.key);
            }
        }
    }
}

/// A store on a prefix of its own, so cases run in parallel without seeing each other.
fn store() -> Option<(S3Store, Cleanup)> {
    static N: AtomicU32 = AtomicU32::new(0);
    let url = server()?;
    let prefix = format!(
        "conformance-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let loc = S3Location::parse(&format!("{url}/{prefix}"), None).unwrap();
    // Keys come from the standard AWS environment variables.
    let make = || S3Store::new(loc.clone(), &S3Options::default()).unwrap();
    make().ensure_bucket().unwrap();
    Some((make(), Cleanup(make())))
}

mod conformance {
    aquifer_object::object_conformance!(optional super::store());
}

#[test]
fn many_threads_share_one_store() {
    let Some((s, _g)) = store() else { return };
    std::thread::scope(|t| {
        for i in 0..8u8 {
            let s = &s;
            t.spawn(move || {
                for j in 0..8u8 {
                    let key = format!("t{i}/{j}");
                    let data = Bytes::from(vec![i ^ j; 300_000]);
                    s.put(&key, data.clone()).unwrap();
                    let mut buf = vec![0u8; 300_000];
                    assert_eq!(s.get_into(&key, 0, &mut buf).unwrap(), 300_000);
                    assert_eq!(buf, data);
                }
            });
        }
    });
    assert_eq!(s.list("", "", 1000).unwrap().len(), 64);
}

#[test]
fn large_ranges_are_fetched_in_parallel_parts_and_reassembled() {
    let Some((s, _g)) = store() else { return };
    let data: Vec<u8> = (0..(10u32 << 20) + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    s.put("big", Bytes::from(data.clone())).unwrap();
    assert_eq!(s.get("big", 0, Some(data.len() as u64)).unwrap(), data);
    // Parts cross the object's end, and a range starts mid-part.
    assert_eq!(
        s.get("big", 3 << 20, Some(20 << 20)).unwrap(),
        data[3 << 20..]
    );
    let mut buf = vec![0u8; 7 << 20];
    assert_eq!(s.get_into("big", 1_000_001, &mut buf).unwrap(), buf.len());
    assert_eq!(buf, data[1_000_001..1_000_001 + (7 << 20)]);
    assert!(s.get("big", 30 << 20, Some(8 << 20)).unwrap().is_empty());
}

#[test]
fn clients_racing_to_create_a_bucket_all_succeed() {
    let Some(url) = server() else { return };
    let bucket = format!("race-{}", std::process::id());
    let loc = S3Location::parse(
        &format!("{}/{bucket}", url.rsplit_once('/').unwrap().0),
        None,
    )
    .unwrap();
    std::thread::scope(|t| {
        for _ in 0..6 {
            let loc = loc.clone();
            t.spawn(move || {
                S3Store::new(loc, &S3Options::default())
                    .unwrap()
                    .ensure_bucket()
                    .unwrap()
            });
        }
    });
}

#[test]
fn wrong_keys_are_a_clear_error_that_is_not_retried() {
    let Some(url) = server() else { return };
    let opts = static_keys("nobody", "not-the-secret");
    let s = S3Store::new(S3Location::parse(&url, None).unwrap(), &opts).unwrap();
    let e = s.put("x", Bytes::from_static(b"x")).unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    let msg = e.to_string();
    assert!(!msg.contains("not-the-secret"), "{msg}");
}

#[test]
fn an_unreachable_server_is_unavailable_and_retryable() {
    // Port 9 (discard) on loopback: nothing listens there.
    let loc = S3Location::parse("http://127.0.0.1:9/bucket", None).unwrap();
    // Static keys, so that no credential provider looks beyond loopback.
    let opts = static_keys("a", "b");
    let s = S3Store::new(loc, &opts).unwrap();
    let e = s.get("k", 0, None).unwrap_err();
    assert!(matches!(e, ObjectError::Unavailable { .. }), "{e}");
    assert!(e.is_retryable());
}

/// A fault, not a server: answers every request with headers and the first bytes of the
/// promised body, then goes silent with the connection open.
fn stalling_server() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut req = [0u8; 4096];
            let _ = c.read(&mut req);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nContent-Type: binary/octet-stream\r\n\r\n0123456789",
            );
            held.push(c);
        }
    });
    addr
}

#[test]
fn a_body_that_stops_arriving_is_an_error_not_a_hang() {
    let addr = stalling_server();
    let loc = S3Location::parse(&format!("http://{addr}/bucket"), None).unwrap();
    let opts = S3Options {
        request_timeout: std::time::Duration::from_secs(1),
        ..static_keys("a", "b")
    };
    let s = S3Store::new(loc, &opts).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(s.get("k", 0, None).map(|b| b.len()));
    });
    // Far longer than the 1 s deadline: only a hang fails here.
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("get() still blocked on a silent body after 60 s");
    let e = r.unwrap_err();
    assert!(matches!(e, ObjectError::Unavailable { .. }), "{e}");
    assert!(e.is_retryable());
}
