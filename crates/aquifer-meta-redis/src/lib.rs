//! Redis engine for aquifer metadata: `redis://`, `rediss://`, Sentinel and Cluster URLs.
//!
//! The namespace logic is [`aquifer_meta::KvMeta`]'s; this crate maps its keys onto Redis and
//! runs its transactions optimistically:
//!
//! - **Layout.** Every key of a volume starts with the hash tag `{DB}`, so in a cluster the
//!   whole volume lives in one slot and a transaction never crosses nodes. A key in a group
//!   (a directory's entries, a file's chunks, an inode's xattrs, a session's open files and
//!   locks: [`aquifer_meta::encoding::GROUPED`]) is a field of one hash per group; any other
//!   key is a string. Counters are decimal strings so that `INCRBY` works on them. Tags that
//!   are listed across groups ([`aquifer_meta::encoding::LISTED`]: sessions, chunks for gc,
//!   trash, journal, locks) have a sorted set `{DB}#TAG` of their ids, scanned with
//!   `ZRANGEBYLEX`.
//! - **Transactions.** Reads are plain `GET`/`HGET`s, remembered with the values seen; the
//!   commit is one Lua script (`COMMIT`) that checks every such field still holds what was
//!   read (and every [`KvTxn::guess`] taken in place of a read) and then applies the writes,
//!   or applies nothing, and the closure runs again on fresh state: serialisable across
//!   clients, with conflicts per field rather than per key (two creates in one directory do
//!   not conflict). A scan within a group `WATCH`es the group's hash, and the script then
//!   runs inside `MULTI`/`EXEC`. Counter additions are `INCRBY`s in the script, never
//!   checked, so clients do not conflict on the usage counters. Attributes live 64 inodes to
//!   a hash (`ATTR_BUCKET`, keys.rs).
//! - **Failures.** A lost connection, a server restarting (`LOADING`), a failover
//!   (`READONLY`, `MASTERDOWN`) or a moved slot (`MOVED`) makes the operation run again on a
//!   new connection to the current master, with backoff, until a deadline; then it fails
//!   with the engine's error (EIO above). A transaction is all or nothing, so nothing is
//!   half-applied. A commit sent without an answer coming back (a timeout, a reset
//!   connection) is never run again here: it is answered [`MetaError::Ambiguous`], and
//!   [`aquifer_meta::KvMeta`] learns from the transaction's lane whether it was applied.
//!
//! One file per role: `conn.rs` (connections, topology, failover and the retry of plain
//! operations), `keys.rs` (key layout and stored values), `scripts.rs` (the Lua scripts),
//! `scan.rs` (scans and paged listings), `commit.rs` (a transaction's reads, its commit and
//! its retries), `durability.rs` (what a sync waits for), `feed.rs` (the change feed other
//! clients follow). This file holds the `RedisKv`
//! type, its constructors and the `KvRead`/`KvEngine` wiring.

mod commit;
mod conn;
mod durability;
mod feed;
mod keys;
mod scan;
mod scripts;
pub use durability::{Durability, Server};

use aquifer_meta::url::RedisUrl;
use aquifer_meta::{EntryAttr, KvEngine, KvPair, KvRead, KvTxn, MetaError, Result};
use redis::{Client, Connection};
use scan::Listing;
use scripts::{COMMIT, ENTRY_ATTR};
use std::sync::Mutex;
use std::time::Duration;

const ENGINE: &str = "redis";
/// How long an operation keeps retrying through outages before it fails.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(30);

pub struct RedisKv {
    url: RedisUrl,
    prefix: Vec<u8>,
    /// The client for the current master; `None` until resolved (again, after a failover or
    /// a moved slot).
    master: Mutex<Option<Client>>,
    pool: Mutex<Vec<Connection>>,
    deadline: Duration,
    /// Directories being listed a page at a time: the sorted entries fetched for the first
    /// page serve the next pages for a moment, so listing a directory of n entries costs one
    /// HGETALL, not one per page (a hash has no order to page by).
    listings: Mutex<Vec<Listing>>,
    /// A lookup in one round trip: the entry, then the attributes of the inode it names
    /// (same hash slot: `{DB}`), read by the server.
    entry_attr: redis::Script,
    commit: redis::Script,
    /// What a sync waits for, and how this master gives it (`None`: not learnt yet, or
    /// the master changed).
    durability: Durability,
    plan: Mutex<Option<durability::Plan>>,
    /// Bumped whenever the master may have changed ([`KvEngine::epoch`]).
    epoch: std::sync::atomic::AtomicU64,
}

fn engine_err(e: impl std::fmt::Display) -> MetaError {
    MetaError::engine(ENGINE, e)
}

impl RedisKv {
    /// Connect to the volume at `url` (checking that a server answers).
    pub fn open(url: &RedisUrl) -> Result<RedisKv> {
        let kv = Self::open_unchecked(url);
        // One quick attempt: a wrong address or password is reported at once, not after
        // the retry deadline.
        let mut c = kv.new_connection().map_err(|e| {
            MetaError::Config(format!(
                "cannot connect to the metadata engine at {}: {e}",
                url.display()
            ))
        })?;
        redis::cmd("PING")
            .query::<()>(&mut c)
            .map_err(|e| MetaError::Config(format!("{}: {e}", url.display())))?;
        // Before attributes shared hashes, the root's were a string key of their own (the
        // name is now that of the hash of inodes 64-127): such a volume would look empty here,
        // so it is refused with what to do instead.
        let mut old_root = kv.prefix.clone();
        old_root.push(b'I');
        old_root.extend_from_slice(&1u64.to_be_bytes());
        let typ: String = redis::cmd("TYPE")
            .arg(&old_root)
            .query(&mut c)
            .map_err(|e| MetaError::Config(format!("{}: {e}", url.display())))?;
        if typ == "string" {
            return Err(MetaError::Config(format!(
                "{}: this volume was formatted by an older aquifer (one Redis key per inode); \
                 move it with that version's `aquifer dump` and this version's `aquifer load`",
                url.display()
            )));
        }
        kv.pool.lock().unwrap().push(c);
        Ok(kv)
    }

    /// The engine for `url`, connecting at its first operation.
    pub fn open_unchecked(url: &RedisUrl) -> RedisKv {
        RedisKv {
            url: url.clone(),
            prefix: format!("{{{}}}", url.db).into_bytes(),
            master: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            deadline: DEFAULT_RETRY_DEADLINE,
            listings: Mutex::new(Vec::new()),
            entry_attr: redis::Script::new(ENTRY_ATTR),
            commit: redis::Script::new(COMMIT),
            durability: Durability::DEFAULT,
            plan: Mutex::new(None),
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// What fsync and close wait for (`--meta-durability`).
    pub fn with_durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Read the server's settings; refuse a memory policy that may evict metadata, and a
    /// server that cannot give the durability the operator chose (the default only warns).
    /// For `format` and `mount`.
    pub fn check_server(&self) -> Result<Server> {
        let server = self.run(Server::read)?;
        server.check_eviction().map_err(MetaError::Config)?;
        self.learn_plan(&server)?;
        Ok(server)
    }

    fn learn_plan(&self, server: &Server) -> Result<durability::Plan> {
        let plan = match server.plan(&self.durability) {
            Ok(p) => p,
            Err(msg) if self.durability.strict => {
                return Err(MetaError::Config(format!(
                    "--meta-durability {}: {msg}",
                    self.durability
                )))
            }
            Err(msg) => {
                tracing::warn!("metadata durability: {msg}");
                durability::Plan {
                    waitaof: false,
                    replicas: self.durability.replicas,
                }
            }
        };
        *self.plan.lock().unwrap() = Some(plan);
        Ok(plan)
    }

    /// Keep this volume's keys under the hash tag `{tag}` instead of `{DB}` (tests put many
    /// volumes in one database).
    pub fn with_volume_tag(mut self, tag: &str) -> Self {
        self.prefix = format!("{{{tag}}}").into_bytes();
        self
    }

    /// How long an operation keeps retrying through an outage before it fails.
    pub fn with_retry_deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }
}

impl KvRead for RedisKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.run(|c| Ok(self.get_many_on(c, &[key])?.pop().flatten()))
    }

    fn get_entry_attr(&self, entry_key: &[u8]) -> Result<EntryAttr> {
        let (rk, field) = self.locate(entry_key);
        let Some(field) = field else {
            return Ok((self.get(entry_key)?, None));
        };
        let mut attr_prefix = self.prefix.clone();
        attr_prefix.push(b'I');
        self.run(|c| {
            let r: Vec<Option<Vec<u8>>> = self
                .entry_attr
                .key(&rk)
                .arg(&field)
                .arg(&attr_prefix)
                .invoke(c)?;
            let mut it = r.into_iter();
            Ok((it.next().flatten(), it.next().flatten()))
        })
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.run(|c| self.get_many_on(c, keys))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        self.run(|c| self.scan_on(c, start, end, limit, false))
    }
}

impl KvEngine for RedisKv {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        self.transact(f)
    }

    /// Wait until every change acknowledged so far is as durable as `--meta-durability`
    /// asks: on the master's disk, on N replicas (docs/semantics.md).
    fn sync(&self) -> Result<()> {
        if !self.durability.waits() {
            return Ok(());
        }
        let known = *self.plan.lock().unwrap();
        let plan = match known {
            Some(p) => p,
            None => {
                let server = self.run(Server::read)?;
                self.learn_plan(&server)?
            }
        };
        // Every close of a written file comes here: a plan that waits for nothing (a
        // server that fsyncs each write, or one that cannot give the default) costs no
        // connection at all.
        if !plan.waits() {
            return Ok(());
        }
        let mut marker = self.prefix.clone();
        marker.extend_from_slice(b"durable");
        self.run(|c| plan.wait(c, &marker))?
            .map_err(|msg| engine_err(format!("sync: {msg}")))
    }

    fn sync_on_close(&self) -> Result<()> {
        self.sync()
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn may_lose_replies(&self) -> bool {
        true
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn feed(&self) -> Option<Box<dyn aquifer_meta::KvFeed>> {
        Some(Box::new(self.new_feed()))
    }

    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64> {
        let (rk, _) = self.locate(key);
        self.run(|c| redis::cmd("INCRBY").arg(&rk).arg(delta).query(c))
    }

    fn clock(&self) -> Result<aquifer_meta::Time> {
        // TIME answers seconds and microseconds as two strings.
        let (sec, usec): (i64, u32) = self.run(|c| redis::cmd("TIME").query(c))?;
        Ok(aquifer_meta::Time {
            sec,
            nsec: usec.saturating_mul(1000),
        })
    }
}

#[cfg(test)]
mod tests;
