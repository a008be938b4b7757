//! Members on loopback: what one asks, another serves, and what goes wrong on the way.

use super::*;
use aquifer_cache::{Cache, MemTier, Tier};
use std::io::{Read, Write};
use std::sync::atomic::AtomicUsize;

/// A member's cache as a map; `fetched` counts what came "from the store".
#[derive(Default)]
struct MapSource {
    held: Mutex<HashMap<String, Block>>,
    fetched: AtomicUsize,
}

impl Source for MapSource {
    fn fetch(&self, key: &str) -> Result<Block, String> {
        let mut held = self.held.lock();
        let b = held
            .entry(key.to_string())
            .or_insert_with(|| {
                self.fetched.fetch_add(1, Ordering::SeqCst);
                Arc::new(payload(key))
            })
            .clone();
        Ok(b)
    }
    fn warm(&self, key: &str) -> Result<(), String> {
        self.fetch(key).map(|_| ())
    }
    fn holds(&self, key: &str) -> bool {
        self.held.lock().contains_key(key)
    }
    fn drop_block(&self, key: &str) {
        self.held.lock().remove(key);
    }
}

/// The bytes of block `key`: its length is the number after the last `_`.
fn payload(key: &str) -> Vec<u8> {
    let len = block_len(key).unwrap();
    (0..len)
        .map(|i| (i as u8).wrapping_add(key.len() as u8))
        .collect()
}

fn block_len(key: &str) -> Option<usize> {
    key.strip_prefix("chunks/")?
        .rsplit('_')
        .next()?
        .parse()
        .ok()
}

fn member(id: &str, volume: &str, secret: &[u8]) -> (Arc<Group>, Arc<MapSource>) {
    let cfg = Config {
        volume: volume.into(),
        key: GroupKey::derive(volume, secret),
        me: Member {
            id: id.into(),
            weight: 1 << 30,
            owns: true,
        },
        block_len: Arc::new(block_len),
    };
    let g = Group::bind(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let src = Arc::new(MapSource::default());
    g.serve(src.clone());
    (g, src)
}

fn peer(g: &Group) -> Peer {
    Peer {
        member: g.me().clone(),
        addr: g.addr().to_string(),
    }
}

/// A key `a` owns as `b` sees the group.
fn key_owned_by(b: &Group, a: &Group) -> String {
    (0..1000)
        .map(|i| format!("chunks/0/0/{i}_0_{}", 1000 + i))
        .find(|k| b.owner(k).is_some_and(|p| p.member.id == a.me().id))
        .expect("some key falls to each member")
}

fn cache_of(g: &Arc<Group>) -> Cache {
    Cache::new(vec![
        Arc::new(MemTier::new(1 << 20)),
        Arc::new(PeerTier::new(g.clone())) as Arc<dyn Tier>,
    ])
}

#[test]
fn a_block_is_fetched_from_the_store_once_by_its_owner() {
    let (a, sa) = member("a", "vol", b"s");
    let (b, sb) = member("b", "vol", b"s");
    let (c, sc) = member("c", "vol", b"s");
    for g in [&a, &b, &c] {
        g.set_members(vec![peer(&a), peer(&b), peer(&c)]);
    }
    let key = key_owned_by(&b, &a);
    for g in [&b, &c] {
        let cache = cache_of(g);
        let got = cache
            .get_or_fetch::<()>(&key, || panic!("the owner serves it"))
            .unwrap();
        assert_eq!(*got, payload(&key));
    }
    assert_eq!(sa.fetched.load(Ordering::SeqCst), 1);
    assert_eq!(sb.fetched.load(Ordering::SeqCst), 0);
    assert_eq!(sc.fetched.load(Ordering::SeqCst), 0);
    assert_eq!(a.figures().served, 2);
    assert_eq!(b.figures().peer_hits, 1);
    assert_eq!(b.figures().peer_bytes_in, payload(&key).len() as u64);
    // The owner asks nobody: its own cache or the store.
    assert!(a.owner(&key).is_none() && a.owns(&key));
    assert_eq!(a.held_at_owner(&key), None);
    assert_eq!(b.held_at_owner(&key), Some(true));
}

/// A member that answers every GET with `body` and a crc32c of other bytes (a block damaged
/// on the way), and records the request lines it gets.
fn damaging_member(body: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut head = Vec::new();
            let mut byte = [0u8];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let line = String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let get = line.starts_with("GET");
            log.lock().push(line);
            let crc = crc32c::crc32c(&body) ^ 1;
            let resp = if get {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{CRC_HEADER}: {crc}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            } else {
                b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".to_vec()
            };
            let _ = s.write_all(&resp);
        }
    });
    (addr, seen)
}

#[test]
fn a_block_damaged_on_the_way_is_a_miss_and_is_dropped_at_its_owner() {
    let (a, _) = member("a", "vol", b"s");
    let (b, _) = member("b", "vol", b"s");
    b.set_members(vec![peer(&a), peer(&b)]);
    let key = key_owned_by(&b, &a);
    let (addr, seen) = damaging_member(payload(&key));
    let bad = Peer {
        member: a.me().clone(),
        addr,
    };
    b.set_members(vec![bad, peer(&b)]);
    let cache = cache_of(&b);
    let got = cache
        .get_or_fetch::<()>(&key, || Ok(Arc::new(payload(&key))))
        .unwrap();
    assert_eq!(*got, payload(&key));
    assert_eq!(b.figures().peer_corrupt, 1);
    assert_eq!(b.figures().peer_hits, 0);
    // The DELETE goes in the background.
    for _ in 0..100 {
        if seen.lock().len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[0].starts_with("GET ") && seen[1].starts_with("DELETE "),
        "{seen:?}"
    );
    // A block of the wrong length is refused the same way, whatever its crc.
    let short = payload(&key)[1..].to_vec();
    let (addr, _) = damaging_member(short);
    b.set_members(vec![
        Peer {
            member: a.me().clone(),
            addr,
        },
        peer(&b),
    ]);
    let cache = cache_of(&b);
    cache
        .get_or_fetch::<()>(&key, || Ok(Arc::new(payload(&key))))
        .unwrap();
    assert_eq!(b.figures().peer_corrupt, 2);
}

#[test]
fn a_dead_member_is_passed_over_at_once() {
    let (a, _) = member("a", "vol", b"s");
    let (b, sb) = member("b", "vol", b"s");
    let (c, sc) = member("c", "vol", b"s");
    // a was killed: its session is still listed, but nothing listens at its address.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = Peer {
        member: a.me().clone(),
        addr: gone.local_addr().unwrap().to_string(),
    };
    drop(gone);
    for g in [&b, &c] {
        g.set_members(vec![dead.clone(), peer(&b), peer(&c)]);
    }
    let key = key_owned_by(&b, &a);
    let t = Instant::now();
    let cache = cache_of(&b);
    let got = cache.get_or_fetch::<()>(&key, || Ok(Arc::new(payload(&key))));
    assert_eq!(*got.unwrap(), payload(&key));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(b.figures().suspects, 1);
    // Meanwhile the next member on the ring (or b itself) takes the block over.
    let next = b.owner(&key);
    assert_ne!(next.as_ref().map(|p| p.member.id.as_str()), Some("a"));
    let _ = (sb, sc);
}

#[test]
fn a_member_whose_node_died_mid_request_is_passed_over_without_the_full_timeout() {
    let (a, _) = member("a", "vol", b"s");
    let (b, _) = member("b", "vol", b"s");
    b.set_members(vec![peer(&a), peer(&b)]);
    let key = key_owned_by(&b, &a);
    // A node that took the connection, then died: the connection stays open and silent
    // (no reset comes from a node that is gone), and new connections fail.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let (conn, _) = l.accept().unwrap();
        drop(l);
        std::thread::sleep(Duration::from_secs(20));
        drop(conn);
    });
    b.set_members(vec![
        Peer {
            member: a.me().clone(),
            addr,
        },
        peer(&b),
    ]);
    let t = Instant::now();
    let cache = cache_of(&b);
    let got = cache.get_or_fetch::<()>(&key, || Ok(Arc::new(payload(&key))));
    assert_eq!(*got.unwrap(), payload(&key));
    // The request would otherwise wait its 15 s; the probe finds the node gone in ~1.5 s.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(b.figures().suspects, 1);
    drop(held);
}

#[test]
fn members_that_move_to_a_new_key_serve_each_other_again() {
    let (a, sa) = member("a", "vol", b"s");
    let (b, _) = member("b", "vol", b"s");
    for g in [&a, &b] {
        g.set_members(vec![peer(&a), peer(&b)]);
    }
    let key = key_owned_by(&b, &a);
    // The owner moved to the secret stored now, the asker not yet: refused, a miss.
    a.set_key(GroupKey::derive("vol", b"made again"));
    let cache = cache_of(&b);
    cache
        .get_or_fetch::<()>(&key, || Ok(Arc::new(payload(&key))))
        .unwrap();
    assert_eq!(b.figures().peer_hits, 0);
    assert_eq!(a.figures().refused, 1);
    // Once the asker reads it too, and the owner is asked again, it serves.
    b.set_key(GroupKey::derive("vol", b"made again"));
    b.suspects.lock().clear();
    let other = (0..1000)
        .map(|i| format!("chunks/0/1/{i}_0_{}", 2000 + i))
        .find(|k| b.owner(k).is_some_and(|p| p.member.id == "a"))
        .unwrap();
    cache
        .get_or_fetch::<()>(&other, || panic!("the owner serves it"))
        .unwrap();
    assert_eq!(b.figures().peer_hits, 1);
    assert_eq!(sa.fetched.load(Ordering::SeqCst), 1);
}

/// Raw HTTP to a member: the status line.
fn raw(addr: SocketAddr, req: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn requests_without_the_key_or_for_another_volume_get_nothing() {
    let (a, sa) = member("a", "vol", b"s");
    let key = "chunks/0/0/1_0_100";
    sa.fetch(key).unwrap();
    let path = proto::path(Op::Get, "vol", key);
    let plain = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!(raw(a.addr(), &plain).contains(" 403 "), "no key");
    let wrong = GroupKey::derive("vol", b"guess").sign("GET", &path);
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\n{AUTH_HEADER}: {wrong}\r\nconnection: close\r\n\r\n"
    );
    assert!(raw(a.addr(), &req).contains(" 403 "), "a wrong key");
    let right = a.key().sign("GET", &path);
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\n{AUTH_HEADER}: {right}\r\nconnection: close\r\n\r\n"
    );
    assert!(raw(a.addr(), &req).contains(" 200 "), "the key");
    // Another volume whose group has the same name: its key and its UUID are its own.
    let (other, so) = member("x", "vol-2", b"s2");
    other.set_members(vec![peer(&a), peer(&other)]);
    let cache = cache_of(&other);
    let got = cache
        .get_or_fetch::<()>(key, || Ok(Arc::new(vec![7; 100])))
        .unwrap();
    assert_eq!(got[0], 7);
    assert_eq!(a.figures().served, 1, "only the keyed request was served");
    assert!(a.figures().refused >= 2);
    let _ = so;
}

use proto::{Op, AUTH_HEADER, CRC_HEADER};
