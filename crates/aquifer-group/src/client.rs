//! Asking the other members: the peer tier a mount's cache consults after its own tiers
//! miss, and the warm and check requests of `aquifer warmup`.
//!
//! Every failure is a miss: a member that cannot be reached (refused, timed out, reset) is
//! passed over for a while ([`crate::SUSPECT_FOR`]) and the block comes from the next member
//! on the ring or the store; a block that fails its check is dropped at the member that sent
//! it and fetched again. A reader never sees a peer's error.

use crate::proto::{self, Op, AUTH_HEADER, CRC_HEADER};
use crate::{Group, Peer};
use aquifer_cache::{Block, Tier, Usage};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A member that does not accept a connection this fast is taken for down: on a cluster
/// network a live one answers in microseconds.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait for one block, its owner fetching it from the store included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// While a request waits longer than this, the member is probed with a new connection
/// every as often: a pooled connection to a node that died (powered off, cut off) gets no
/// reset and would wait the whole REQUEST_TIMEOUT, but a new connection to it fails within
/// CONNECT_TIMEOUT. A live member that is slow (fetching from a slow store) still accepts
/// connections, and its request is waited for.
const PROBE_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Client {
    http: hyper_util::client::legacy::Client<HttpConnector, Empty<Bytes>>,
}

impl Client {
    pub(crate) fn new() -> Client {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            // Idle connections go before the server's header timeout (30 s) closes them, so
            // a request never goes out on a connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(8)
            .build(tcp);
        Client { http }
    }
}

/// How a request to a member ended.
enum Outcome {
    /// 2xx, and the body (GET only).
    Ok(Option<(Vec<u8>, Option<u32>)>),
    /// Not asked: the calling thread cannot wait here. The member is not to blame.
    Skipped,
    /// The member answered with this status.
    Status(u16),
    /// The member could not be reached or did not answer in time.
    Down(String),
}

impl Group {
    /// Request `op` on block `key` to `peer`, signed with the group's key.
    fn signed(&self, peer: &Peer, op: Op, key: &str) -> http::Result<http::Request<Empty<Bytes>>> {
        let path = proto::path(op, &self.cfg.volume, key);
        http::Request::builder()
            .method(op.method())
            .uri(format!("http://{}{path}", peer.addr))
            .header(AUTH_HEADER, self.key().sign(op.method(), &path))
            .body(Empty::new())
    }

    /// One request to `peer`, waited for on the group's runtime.
    fn request(&self, peer: &Peer, op: Op, key: &str, limit: usize) -> Outcome {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Only threads outside any runtime ask (FUSE, read-ahead, warm-up threads); a
            // block_on here would panic, so such a caller gets a miss.
            return Outcome::Skipped;
        }
        let req = match self.signed(peer, op, key) {
            Ok(r) => r,
            Err(e) => return Outcome::Down(format!("bad request: {e}")),
        };
        let fut = self.client.http.request(req);
        let addr = peer.addr.clone();
        self.rt.block_on(async move {
            let work = async {
                let resp = fut.await.map_err(|e| format!("{e}"))?;
                let status = resp.status();
                if !status.is_success() {
                    return Ok(Outcome::Status(status.as_u16()));
                }
                if op != Op::Get {
                    return Ok(Outcome::Ok(None));
                }
                let crc = resp
                    .headers()
                    .get(CRC_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u32>().ok());
                let mut body = resp.into_body();
                let mut buf = Vec::with_capacity(limit);
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| format!("{e}"))?;
                    if let Some(d) = frame.data_ref() {
                        if buf.len() + d.len() > limit {
                            // Longer than the block can be: wrong, and not read to the end.
                            return Ok(Outcome::Ok(Some((Vec::new(), None))));
                        }
                        buf.extend_from_slice(d);
                    }
                }
                Ok(Outcome::Ok(Some((buf, crc))))
            };
            let probe = async {
                loop {
                    tokio::time::sleep(PROBE_EVERY).await;
                    let dial = tokio::net::TcpStream::connect(addr.as_str());
                    match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => return format!("waiting for an answer, a new connection failed: {e}"),
                        Err(_) => return "waiting for an answer, a new connection timed out".to_string(),
                    }
                }
            };
            tokio::select! {
                r = tokio::time::timeout(REQUEST_TIMEOUT, work) => match r {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => Outcome::Down(e),
                    Err(_) => Outcome::Down(format!("no answer in {} s", REQUEST_TIMEOUT.as_secs())),
                },
                why = probe => Outcome::Down(why),
            }
        })
    }

    /// Block `key` (of `len` payload bytes) from `peer`, checked; `None` on any failure.
    fn fetch_from(&self, peer: &Peer, key: &str, len: usize) -> Option<Block> {
        let c = &self.counters;
        match self.request(peer, Op::Get, key, len) {
            Outcome::Ok(Some((body, crc))) => {
                if body.len() != len || crc != Some(crc32c::crc32c(&body)) {
                    c.peer_corrupt.fetch_add(1, Ordering::Relaxed);
                    c.peer_misses.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "cache group: block {key} from member {} at {} failed its check ({} bytes, {len} expected); it is dropped there and fetched again",
                        peer.member.id,
                        peer.addr,
                        body.len()
                    );
                    self.drop_at(peer, key);
                    return None;
                }
                c.peer_hits.fetch_add(1, Ordering::Relaxed);
                c.peer_bytes_in.fetch_add(len as u64, Ordering::Relaxed);
                Some(Arc::new(body))
            }
            Outcome::Ok(None) | Outcome::Skipped => None,
            Outcome::Status(s) => {
                c.peer_misses.fetch_add(1, Ordering::Relaxed);
                if s == 403 {
                    // Not a member of this volume's group after all (its key differs): a
                    // configuration error worth a line, and not worth asking again soon.
                    self.suspect(peer, "refused this member's key");
                }
                None
            }
            Outcome::Down(why) => {
                c.peer_misses.fetch_add(1, Ordering::Relaxed);
                self.suspect(peer, &why);
                None
            }
        }
    }

    /// Ask `peer` to drop its copy of `key`, in the background: the reader goes on to the
    /// store meanwhile.
    fn drop_at(&self, peer: &Peer, key: &str) {
        if let Ok(req) = self.signed(peer, Op::Drop, key) {
            let fut = self.client.http.request(req);
            self.rt.spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, fut).await;
            });
        }
    }

    /// A request without a body in the answer (warm, has): `Ok` on 2xx.
    pub(crate) fn ask_status(&self, peer: &Peer, op: Op, key: &str) -> Result<(), String> {
        match self.request(peer, op, key, 0) {
            Outcome::Ok(_) => Ok(()),
            Outcome::Skipped => Err("not asked from an async context".into()),
            Outcome::Status(s) => Err(format!("member {} answered {s}", peer.addr)),
            Outcome::Down(why) => {
                self.suspect(peer, &why);
                Err(format!("member {} at {}: {why}", peer.member.id, peer.addr))
            }
        }
    }
}

/// The group as a tier of a mount's cache: a block this member does not own is asked of
/// its owner, which serves it from its cache or fetches it from the store once for all.
pub struct PeerTier {
    group: Arc<Group>,
}

impl PeerTier {
    pub fn new(group: Arc<Group>) -> PeerTier {
        PeerTier { group }
    }
}

impl Tier for PeerTier {
    fn name(&self) -> String {
        "group".into()
    }

    fn get(&self, key: &str) -> Option<Block> {
        let len = (self.group.cfg.block_len)(key)?;
        let peer = self.group.owner(key)?;
        self.group.fetch_from(&peer, key, len)
    }

    fn contains(&self, _key: &str) -> bool {
        false
    }

    // Blocks are not pushed to their owners: an owner caches what it is asked for.
    fn insert(&self, _key: &str, _block: &Block) {}

    fn remove(&self, _key: &str) {}

    fn usage(&self) -> Usage {
        Usage::default()
    }

    fn writes_through(&self) -> bool {
        false
    }

    fn remote(&self) -> bool {
        true
    }
}
