//! A peer cache group (issue 25): the nodes' block caches shared, so a cluster reads a
//! dataset from the object store once.
//!
//! * [`ring`]: which member owns a block — consistent hashing with virtual nodes weighted by
//!   each member's cache size, so a member that joins or leaves moves only its share.
//! * [`auth`]: the group's key, derived from the volume, and the credentials of a request.
//! * [`proto`]: the members' HTTP protocol.
//! * [`Group`] (here): one member — who the others are ([`Group::set_members`], fed by the
//!   caller from the metadata engine's sessions), who owns a block now (the ring, minus
//!   members that just failed), what it asks of them (`client.rs`: [`PeerTier`], a cache
//!   tier whose failure is a miss) and what it serves them (`server.rs`, from a [`Source`]).

pub mod auth;
mod client;
pub mod proto;
pub mod ring;
mod server;

pub use auth::{AuthError, GroupKey};
pub use client::PeerTier;
pub use ring::{Member, Ring};

use aquifer_cache::Block;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long a member that failed a request is passed over: its blocks go to the next
/// member on the ring (or the store) meanwhile, then it is asked again.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// A member as the others reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub member: Member,
    /// `IP:PORT` it listens on.
    pub addr: String,
}

/// What this member is.
pub struct Config {
    /// The volume's UUID: requests name it, and a member answers only for its own.
    pub volume: String,
    pub key: GroupKey,
    /// This member (its id, cache size, whether it owns blocks).
    pub me: Member,
    /// The payload length block `key` must have; `None` for a key that names no block.
    pub block_len: BlockLen,
}

/// The payload length a block key names (`None`: not a block key of this volume).
pub type BlockLen = Arc<dyn Fn(&str) -> Option<usize> + Send + Sync>;

/// What a member serves the others from: its cache, filled from the store.
pub trait Source: Send + Sync {
    /// Block `key` from this member's cache, else fetched from the store into it (once,
    /// however many ask at the same time), never from another member.
    fn fetch(&self, key: &str) -> Result<Block, String>;
    /// Block `key` kept in this member's cache for good (a warm-up): fetched as
    /// [`Source::fetch`] does, then stored in its slowest tier, waiting for room there.
    fn warm(&self, key: &str) -> Result<(), String>;
    /// Whether this member's cache holds block `key` (in its slowest tier: what a warm-up
    /// leaves, and what survives RAM pressure).
    fn holds(&self, key: &str) -> bool;
    /// Drop this member's copies of block `key`.
    fn drop_block(&self, key: &str);
}

/// The figures of one member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    /// Blocks this member got from its peers, and their bytes.
    pub peer_hits: u64,
    pub peer_bytes_in: u64,
    /// Requests to peers that got no block: the peer was down, refused or failed.
    pub peer_misses: u64,
    /// Blocks from peers that failed their check (length or crc32c).
    pub peer_corrupt: u64,
    /// Blocks this member served its peers, and their bytes.
    pub served: u64,
    pub peer_bytes_out: u64,
    /// Requests refused for want of the group's key or for another volume.
    pub refused: u64,
    /// Members in the group now (this one included), and those passed over for failing.
    pub members: u64,
    pub suspects: u64,
}

#[derive(Default)]
struct Counters {
    peer_hits: AtomicU64,
    peer_bytes_in: AtomicU64,
    peer_misses: AtomicU64,
    peer_corrupt: AtomicU64,
    served: AtomicU64,
    peer_bytes_out: AtomicU64,
    refused: AtomicU64,
}

/// The group as this member sees it now.
struct View {
    peers: Vec<Peer>,
    ring: Ring,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(member {} at {})", self.cfg.me.id, self.addr)
    }
}

/// One member of a group.
pub struct Group {
    cfg: Config,
    /// Where this member listens and what it advertises.
    addr: SocketAddr,
    view: RwLock<Arc<View>>,
    /// The key requests are signed and checked with: `cfg.key` until [`Group::set_key`].
    key: RwLock<GroupKey>,
    /// Members passed over until the given time, by id and address (a member restarted
    /// at a new address is not passed over for its old one's failure).
    suspects: Mutex<HashMap<(String, String), Instant>>,
    counters: Counters,
    source: OnceLock<Arc<dyn Source>>,
    listener: Mutex<Option<TcpListener>>,
    rt: tokio::runtime::Runtime,
    client: client::Client,
}

impl Group {
    /// Join as `cfg.me`, listening on `listen` (port 0: any free port). Nothing is served
    /// until [`Group::serve`].
    pub fn bind(cfg: Config, listen: SocketAddr) -> std::io::Result<Arc<Group>> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        // Two threads: the protocol is I/O; serving a block that must come from the store
        // runs on the runtime's blocking pool.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("aquifer-group")
            .enable_all()
            .build()?;
        let me = Peer {
            member: cfg.me.clone(),
            addr: addr.to_string(),
        };
        let view = View {
            ring: Ring::new(vec![me.member.clone()]),
            peers: vec![me],
        };
        Ok(Arc::new(Group {
            key: RwLock::new(cfg.key.clone()),
            cfg,
            addr,
            view: RwLock::new(Arc::new(view)),
            suspects: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            source: OnceLock::new(),
            listener: Mutex::new(Some(listener)),
            rt,
            client: client::Client::new(),
        }))
    }

    /// The key requests are signed and checked with now.
    pub fn key(&self) -> GroupKey {
        self.key.read().clone()
    }

    /// Sign and check requests with `key` from now on: the volume's group secret was made
    /// again (a failover lost the first one before it reached a replica, and a member that
    /// joined later made another). Every member reads the secret as it follows the
    /// membership, so all of them move to the stored one.
    pub fn set_key(&self, key: GroupKey) {
        if *self.key.read() == key {
            return;
        }
        tracing::warn!("cache group: the volume's group secret changed; using the stored one");
        *self.key.write() = key;
    }

    /// The address this member listens on, as the others should dial it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn me(&self) -> &Member {
        &self.cfg.me
    }

    /// Start answering the other members from `source`.
    pub fn serve(self: &Arc<Self>, source: Arc<dyn Source>) {
        if self.source.set(source).is_err() {
            return;
        }
        if let Some(l) = self.listener.lock().take() {
            server::start(self.clone(), l);
        }
    }

    /// The members now (from the live sessions of the volume that name this group). This
    /// member is always one of them. Of two entries with one id the first is kept: the
    /// caller lists a member's newest session first.
    pub fn set_members(&self, mut peers: Vec<Peer>) {
        peers.retain(|p| p.member.id != self.cfg.me.id);
        peers.push(Peer {
            member: self.cfg.me.clone(),
            addr: self.addr.to_string(),
        });
        // A stable sort: of one id's entries, the caller's first stays first.
        peers.sort_by(|a, b| a.member.id.cmp(&b.member.id));
        peers.dedup_by(|later, first| later.member.id == first.member.id);
        if self.view.read().peers == peers {
            return;
        }
        let ring = Ring::new(peers.iter().map(|p| p.member.clone()).collect());
        tracing::info!(
            "cache group: {} members ({})",
            peers.len(),
            peers
                .iter()
                .map(|p| format!("{} at {}", p.member.id, p.addr))
                .collect::<Vec<_>>()
                .join(", ")
        );
        *self.view.write() = Arc::new(View { peers, ring });
    }

    /// The member to ask for block `key`: its owner, or the next member on the ring while
    /// the owner is passed over; `None` when this member is the one to fetch it (it owns
    /// the block, or every member before it on the ring failed).
    pub fn owner(&self, key: &str) -> Option<Peer> {
        let view = self.view.read().clone();
        let now = Instant::now();
        let suspects = self.suspects.lock();
        for m in view.ring.successors(key, view.peers.len()) {
            if m.id == self.cfg.me.id {
                return None;
            }
            let Some(p) = view.peers.iter().find(|p| p.member.id == m.id) else {
                continue;
            };
            let k = (p.member.id.clone(), p.addr.clone());
            if suspects.get(&k).is_some_and(|until| *until > now) {
                continue;
            }
            return Some(p.clone());
        }
        None
    }

    /// Whether this member owns block `key` (no other member is asked for it first).
    pub fn owns(&self, key: &str) -> bool {
        self.cfg.me.owns && self.owner(key).is_none()
    }

    /// Pass over `peer` for [`SUSPECT_FOR`]: it failed a request.
    fn suspect(&self, peer: &Peer, why: &str) {
        let mut s = self.suspects.lock();
        let now = Instant::now();
        // Members come and go (a member without a disk cache is new at each start): the
        // map keeps only those still passed over.
        s.retain(|_, until| *until > now);
        let k = (peer.member.id.clone(), peer.addr.clone());
        let fresh = !s.contains_key(&k);
        s.insert(k, now + SUSPECT_FOR);
        if fresh {
            tracing::warn!(
                "cache group: member {} at {} failed ({why}); its blocks come from the next member or the store for {} s",
                peer.member.id,
                peer.addr,
                SUSPECT_FOR.as_secs()
            );
        }
    }

    pub fn figures(&self) -> Figures {
        let c = &self.counters;
        let now = Instant::now();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Figures {
            peer_hits: get(&c.peer_hits),
            peer_bytes_in: get(&c.peer_bytes_in),
            peer_misses: get(&c.peer_misses),
            peer_corrupt: get(&c.peer_corrupt),
            served: get(&c.served),
            peer_bytes_out: get(&c.peer_bytes_out),
            refused: get(&c.refused),
            members: self.view.read().peers.len() as u64,
            suspects: self.suspects.lock().values().filter(|u| **u > now).count() as u64,
        }
    }

    /// Have block `key` cached at its owner: `Ok(true)` when the owner (another member)
    /// has it now, `Ok(false)` when this member is the one to cache it, `Err` when the
    /// owner failed.
    pub fn warm_at_owner(&self, key: &str) -> Result<bool, String> {
        match self.owner(key) {
            None => Ok(false),
            Some(p) => self.ask_status(&p, proto::Op::Warm, key).map(|_| true),
        }
    }

    /// Whether block `key` is cached at its owner (`None`: this member owns it, so the
    /// caller looks in its own cache).
    pub fn held_at_owner(&self, key: &str) -> Option<bool> {
        let p = self.owner(key)?;
        Some(self.ask_status(&p, proto::Op::Has, key).is_ok())
    }
}

#[cfg(test)]
mod tests;
