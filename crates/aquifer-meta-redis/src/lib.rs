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
//!   a hash (`ATTR_BUCKET`).
//! - **Failures.** A lost connection, a server restarting (`LOADING`), a failover
//!   (`READONLY`, `MASTERDOWN`) or a moved slot (`MOVED`) makes the operation run again on a
//!   new connection to the current master, with backoff, until a deadline; then it fails
//!   with the engine's error (EIO above). A transaction is all or nothing, so nothing is
//!   half-applied. A commit sent without an answer coming back (a timeout, a reset
//!   connection) is never run again here: it is answered [`MetaError::Ambiguous`], and
//!   [`aquifer_meta::KvMeta`] learns from the transaction's lane whether it was applied.

mod durability;
pub use durability::{Durability, Server};

use aquifer_meta::encoding::{group_len, is_counter, GROUPED, LISTED};
use aquifer_meta::url::{RedisTopology, RedisUrl};
use aquifer_meta::{BufferedTxn, EntryAttr, KvEngine, KvPair, KvRead, KvTxn, MetaError, Result};
use redis::{Client, Connection, ErrorKind, RedisError, ServerErrorKind, Value};
use std::cell::{Cell, RefCell};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const ENGINE: &str = "redis";
/// Idle connections kept for reuse.
const POOL_MAX: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an operation keeps retrying through outages before it fails.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// Ids read per page when scanning a listed tag's index.
const INDEX_PAGE: usize = 256;

/// A transaction's commit, run by the server: check that every value the transaction read
/// (or guessed) is still what it saw, then apply its writes — or apply nothing and answer 0.
///
/// `ARGV[1]` is the number of checks; each check is five arguments: `s` (string) or `h`
/// (hash field), the key, the field (empty for a string), `1` and the value it must hold, or
/// `0` and anything when it must be absent. The writes follow, each an op code and its
/// arguments: `S key value`, `D key`, `H key field value`, `X key field` (HDEL), `A key n`
/// (INCRBY), `Z index id` (ZADD), `R index id` (ZREM), and `U key index id` (drop a group's id
/// from its index once the group's hash is gone).
const COMMIT: &str = r"
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local cur
  if ARGV[i] == 'h' then cur = redis.call('HGET', ARGV[i+1], ARGV[i+2])
  else cur = redis.call('GET', ARGV[i+1]) end
  if ARGV[i+3] == '1' then
    if cur ~= ARGV[i+4] then return 0 end
  elseif cur then return 0 end
  i = i + 5
end
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'H' then redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3]) i = i + 4
  elseif op == 'X' then redis.call('HDEL', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'S' then redis.call('SET', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'D' then redis.call('DEL', ARGV[i+1]) i = i + 2
  elseif op == 'A' then redis.call('INCRBY', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'Z' then redis.call('ZADD', ARGV[i+1], 0, ARGV[i+2]) i = i + 3
  elseif op == 'R' then redis.call('ZREM', ARGV[i+1], ARGV[i+2]) i = i + 3
  elseif op == 'U' then
    if redis.call('EXISTS', ARGV[i+1]) == 0 then redis.call('ZREM', ARGV[i+2], ARGV[i+3]) end
    i = i + 4
  else return redis.error_reply('aquifer commit: unknown op') end
end
return 1
";

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

const ENTRY_ATTR: &str = r"
local d = redis.call('HGET', KEYS[1], ARGV[1])
if not d then return {false, false} end
if string.len(d) ~= 9 then return {d, false} end
local low = string.byte(d, 9)
return {d, redis.call('HGET', ARGV[2] .. string.sub(d, 2, 8) .. string.char(math.floor(low / 64)),
  string.char(low % 64))}
";

/// Inodes whose attributes share one hash (`{DB}I` + ino / 64, field ino % 64). A hash this
/// small with values this short (~25 bytes, [`aquifer_meta::encoding::encode_attr`]) stays a
/// listpack (`hash-max-listpack-entries` 128, `-value` 64 by default): about 30 bytes an
/// inode, where a key of its own costs ~100 bytes of Redis bookkeeping. Transactions check
/// the fields they read, not the whole hash, so inodes in one bucket do not conflict.
const ATTR_BUCKET: u8 = 64;

/// A value as stored: its Redis key, hash field (for a key in a group) and raw value.
struct Stored {
    rk: Vec<u8>,
    field: Option<Vec<u8>>,
    raw: Option<Vec<u8>>,
}

struct Listing {
    group: Vec<u8>,
    at: Instant,
    rows: std::sync::Arc<Vec<KvPair>>,
}

/// How long a listing's first page serves the later ones, and how many listings are kept.
const LISTING_TTL: Duration = Duration::from_secs(2);
const LISTINGS_MAX: usize = 4;

fn engine_err(e: impl std::fmt::Display) -> MetaError {
    MetaError::engine(ENGINE, e)
}

/// Errors after which the same operation may succeed on a new connection or a new master.
fn retryable(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    // A WAIT cut short because the master became a replica (a failover); inside a
    // pipeline the code is only in the message.
    if e.code() == Some("UNBLOCKED") || e.to_string().contains("UNBLOCKED") {
        return true;
    }
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        ) | ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::EmptySentinelList
    )
}

/// Errors that mean the master we talk to is no longer the right one.
fn wrong_master(e: &RedisError) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain)
    )
}

fn conn_info(
    url: &RedisUrl,
    host: &str,
    port: u16,
    db: i64,
    password: Option<&str>,
    username: Option<&str>,
) -> redis::RedisResult<Client> {
    let addr = if url.tls {
        redis::ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: url.insecure,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(host.to_string(), port)
    };
    let mut settings = redis::RedisConnectionInfo::default().set_db(db);
    if let Some(u) = username {
        settings = settings.set_username(u);
    }
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    let info = redis::IntoConnectionInfo::into_connection_info(addr)?.set_redis_settings(settings);
    if url.tls && (url.ca_cert_file.is_some() || url.cert_file.is_some()) {
        let read = |f: &str| {
            std::fs::read(f).map_err(|e| {
                RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "cannot read a TLS file",
                    format!("{f}: {e}"),
                ))
            })
        };
        let client_tls = match (&url.cert_file, &url.key_file) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            _ => None,
        };
        let root_cert = url.ca_cert_file.as_deref().map(read).transpose()?;
        Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
    } else {
        Client::open(info)
    }
}

fn connect(client: &Client) -> redis::RedisResult<Connection> {
    let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(c)
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

    /// Resolve the master for this volume's keys: the one server, the master the sentinels
    /// name, or the cluster node serving the volume's hash slot.
    fn resolve(&self) -> redis::RedisResult<Client> {
        let u = &self.url;
        let pw = u.password.as_ref().map(|s| s.0.as_str());
        let user = u.username.as_deref();
        match &u.topology {
            RedisTopology::Single { host, port } => {
                conn_info(u, host, *port, u.db as i64, pw, user)
            }
            RedisTopology::Sentinel { master, sentinels } => {
                let spw = u.sentinel_password.as_ref().map(|s| s.0.as_str()).or(pw);
                let mut last = RedisError::from((ErrorKind::EmptySentinelList, "no sentinel"));
                for (h, p) in sentinels {
                    let addr = conn_info(u, h, *p, 0, spw, None)
                        .and_then(|c| connect(&c))
                        .and_then(|mut c| {
                            redis::cmd("SENTINEL")
                                .arg("get-master-addr-by-name")
                                .arg(master)
                                .query::<Option<(String, u16)>>(&mut c)
                        });
                    match addr {
                        Ok(Some((mh, mp))) => {
                            let client = conn_info(u, &mh, mp, u.db as i64, pw, user)?;
                            // A just-demoted master may still be named: check its role.
                            let mut c = connect(&client)?;
                            let role: Vec<Value> = redis::cmd("ROLE").query(&mut c)?;
                            match role.first() {
                                Some(Value::BulkString(r)) if r == b"master" => return Ok(client),
                                _ => {
                                    last = RedisError::from((
                                        ErrorKind::Server(ServerErrorKind::ReadOnly),
                                        "the master named by the sentinels is not a master yet",
                                    ))
                                }
                            }
                        }
                        Ok(None) => {
                            last = RedisError::from((
                                ErrorKind::MasterNameNotFoundBySentinel,
                                "sentinel does not know the master",
                                master.clone(),
                            ))
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            RedisTopology::Cluster { nodes } => {
                let mut last = RedisError::from((ErrorKind::Io, "no cluster node answered"));
                for (h, p) in nodes {
                    let r = conn_info(u, h, *p, 0, pw, user)
                        .and_then(|c| connect(&c))
                        .and_then(|mut c| {
                            let slot: i64 = redis::cmd("CLUSTER")
                                .arg("KEYSLOT")
                                .arg(&self.prefix[..])
                                .query(&mut c)?;
                            let slots: Vec<Value> =
                                redis::cmd("CLUSTER").arg("SLOTS").query(&mut c)?;
                            Ok((slot, slots))
                        });
                    let (slot, slots) = match r {
                        Ok(v) => v,
                        Err(e) => {
                            last = e;
                            continue;
                        }
                    };
                    if let Some((mh, mp)) = slot_master(&slots, slot, h) {
                        return conn_info(u, &mh, mp, 0, pw, user);
                    }
                    last = RedisError::from((
                        ErrorKind::Server(ServerErrorKind::ClusterDown),
                        "no node serves the volume's slot",
                    ));
                }
                Err(last)
            }
        }
    }

    fn new_connection(&self) -> redis::RedisResult<Connection> {
        let client = {
            let mut m = self.master.lock().unwrap();
            match &*m {
                Some(c) => c.clone(),
                None => {
                    let c = self.resolve()?;
                    *m = Some(c.clone());
                    c
                }
            }
        };
        connect(&client)
    }

    fn take_connection(&self) -> redis::RedisResult<Connection> {
        if let Some(c) = self.pool.lock().unwrap().pop() {
            return Ok(c);
        }
        self.new_connection()
    }

    fn put_connection(&self, c: Connection) {
        let mut p = self.pool.lock().unwrap();
        if p.len() < POOL_MAX {
            p.push(c);
        }
    }

    /// After an error that a retry may fix: forget every connection (they all go to the old
    /// server) and, when the master may have moved, the master too.
    fn reset(&self, e: &RedisError) {
        self.pool.lock().unwrap().clear();
        if wrong_master(e) {
            self.epoch
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *self.master.lock().unwrap() = None;
            // A new master may be configured otherwise.
            *self.plan.lock().unwrap() = None;
        }
    }

    /// Run `op` on a connection, again on a new one after a retryable error, with backoff,
    /// until the deadline.
    fn run<T>(&self, mut op: impl FnMut(&mut Connection) -> redis::RedisResult<T>) -> Result<T> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut warned = false;
        loop {
            let r = self.take_connection().and_then(|mut c| {
                let r = op(&mut c);
                if r.is_ok() {
                    self.put_connection(c);
                }
                r
            });
            match r {
                Ok(v) => {
                    if warned {
                        tracing::info!("metadata engine reachable again");
                    }
                    return Ok(v);
                }
                Err(e) if retryable(&e) && start.elapsed() < self.deadline => {
                    if !warned {
                        tracing::warn!(error = %e, "metadata engine unavailable; retrying");
                        warned = true;
                    }
                    self.reset(&e);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(engine_err(e)),
            }
        }
    }

    /// The Redis key of a metadata key, and the hash field when it is in a group.
    fn locate(&self, key: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut rk = self.prefix.clone();
        if key.len() == 9 && key[0] == b'I' {
            // Attributes: 64 inodes per hash (see ATTR_BUCKET).
            let low = key[8];
            rk.extend_from_slice(&key[..8]);
            rk.push(low / ATTR_BUCKET);
            return (rk, Some(vec![low % ATTR_BUCKET]));
        }
        match group_len(key) {
            Some(n) => {
                rk.extend_from_slice(&key[..n]);
                (rk, Some(key[n..].to_vec()))
            }
            None => {
                rk.extend_from_slice(key);
                (rk, None)
            }
        }
    }

    fn index_key(&self, tag: u8) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(b'#');
        k.push(tag);
        k
    }

    /// Get several keys in one round trip: where each lives in Redis and its stored value
    /// (counters still decimal).
    fn get_raw_on(&self, c: &mut Connection, keys: &[&[u8]]) -> redis::RedisResult<Vec<Stored>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let located: Vec<_> = keys.iter().map(|k| self.locate(k)).collect();
        let mut p = redis::pipe();
        for (rk, field) in &located {
            match field {
                Some(f) => p.cmd("HGET").arg(rk).arg(f),
                None => p.cmd("GET").arg(rk),
            };
        }
        let vals: Vec<Option<Vec<u8>>> = p.query(c)?;
        Ok(located
            .into_iter()
            .zip(vals)
            .map(|((rk, field), raw)| Stored { rk, field, raw })
            .collect())
    }

    /// Get several keys in one round trip.
    fn get_many_on(
        &self,
        c: &mut Connection,
        keys: &[&[u8]],
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        Ok(keys
            .iter()
            .zip(self.get_raw_on(c, keys)?)
            .map(|(k, s)| Self::decode_value(k, s.raw))
            .collect())
    }

    fn decode_value(key: &[u8], v: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match v {
            Some(v) if is_counter(key) => {
                let n: i64 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                Some(n.to_be_bytes().to_vec())
            }
            v => v,
        }
    }

    /// The keys of one group in `[start, end)`, sorted.
    fn group_rows(
        &self,
        c: &mut Connection,
        group: &[u8],
        start: &[u8],
        end: &[u8],
        watch: bool,
    ) -> redis::RedisResult<Vec<KvPair>> {
        let mut rk = self.prefix.clone();
        rk.extend_from_slice(group);
        let mut p = redis::pipe();
        if watch {
            p.cmd("WATCH").arg(&rk).ignore();
        }
        p.cmd("HGETALL").arg(&rk);
        let (flat,): (Vec<Vec<u8>>,) = p.query(c)?;
        let mut rows: Vec<KvPair> = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            let mut k = group.to_vec();
            k.extend_from_slice(&f);
            if k.as_slice() >= start && k.as_slice() < end {
                rows.push((k, v));
            }
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(rows)
    }

    /// A page of a directory listing (not in a transaction): the first page fetches the
    /// whole directory and keeps it for the pages after it (see [`RedisKv::listings`]).
    fn listing_page(
        &self,
        c: &mut Connection,
        group: &[u8],
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> redis::RedisResult<Vec<KvPair>> {
        let page = |rows: &[KvPair]| -> Vec<KvPair> {
            let from = rows.partition_point(|r| r.0.as_slice() < start);
            rows[from..]
                .iter()
                .take_while(|r| r.0.as_slice() < end)
                .take(limit)
                .cloned()
                .collect()
        };
        let first = start == group;
        if !first {
            let l = self.listings.lock().unwrap();
            if let Some(hit) = l
                .iter()
                .find(|x| x.group == group && x.at.elapsed() < LISTING_TTL)
            {
                return Ok(page(&hit.rows));
            }
        }
        let rows = self.group_rows(
            c,
            group,
            group,
            &aquifer_meta::encoding::prefix_end(group),
            false,
        )?;
        let out = page(&rows);
        if rows.len() > out.len() {
            let mut l = self.listings.lock().unwrap();
            l.retain(|x| x.group != group && x.at.elapsed() < LISTING_TTL);
            if l.len() >= LISTINGS_MAX {
                l.remove(0);
            }
            l.push(Listing {
                group: group.to_vec(),
                at: Instant::now(),
                rows: std::sync::Arc::new(rows),
            });
        }
        Ok(out)
    }

    fn scan_on(
        &self,
        c: &mut Connection,
        start: &[u8],
        end: &[u8],
        limit: usize,
        watch: bool,
    ) -> redis::RedisResult<Vec<KvPair>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let tag = start[0];
        // Within one group: one hash.
        if GROUPED.contains(&tag) && start.len() >= 9 {
            let group = &start[..9];
            let group_end = aquifer_meta::encoding::prefix_end(group);
            if end <= group_end.as_slice() {
                if !watch && tag == b'E' {
                    return self.listing_page(c, group, start, end, limit);
                }
                let mut rows = self.group_rows(c, group, start, end, watch)?;
                rows.truncate(limit);
                return Ok(rows);
            }
        }
        if !LISTED.contains(&tag) || end.first().is_some_and(|&e| e < tag) {
            return Err(unsupported(start, end));
        }
        // Across the ids of a listed tag, through its index.
        let idx = self.index_key(tag);
        if watch {
            redis::cmd("WATCH").arg(&idx).query::<()>(c)?;
        }
        let grouped = GROUPED.contains(&tag);
        let id_len = |k: &[u8]| if grouped { k.len().min(9) } else { k.len() };
        let mut min = b"[".to_vec();
        min.extend_from_slice(&start[1..id_len(start)]);
        let max = if end[0] == tag {
            let mut m = b"(".to_vec();
            m.extend_from_slice(&end[1..]);
            m
        } else {
            b"+".to_vec()
        };
        let mut out = Vec::new();
        loop {
            let ids: Vec<Vec<u8>> = redis::cmd("ZRANGEBYLEX")
                .arg(&idx)
                .arg(&min)
                .arg(&max)
                .arg("LIMIT")
                .arg(0)
                .arg(INDEX_PAGE)
                .query(c)?;
            let last_page = ids.len() < INDEX_PAGE;
            if grouped {
                for id in &ids {
                    let mut group = vec![tag];
                    group.extend_from_slice(id);
                    for row in self.group_rows(c, &group, start, end, false)? {
                        out.push(row);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            } else if !ids.is_empty() {
                let keys: Vec<Vec<u8>> = ids
                    .iter()
                    .map(|id| {
                        let mut k = self.prefix.clone();
                        k.push(tag);
                        k.extend_from_slice(id);
                        k
                    })
                    .collect();
                let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query(c)?;
                for (id, v) in ids.iter().zip(vals) {
                    let mut k = vec![tag];
                    k.extend_from_slice(id);
                    if let Some(v) = v {
                        if k.as_slice() >= start && k.as_slice() < end {
                            out.push((k, v));
                            if out.len() >= limit {
                                return Ok(out);
                            }
                        }
                    }
                }
            }
            match ids.last() {
                Some(l) if !last_page => {
                    min = b"(".to_vec();
                    min.extend_from_slice(l);
                }
                _ => return Ok(out),
            }
        }
    }

    /// The arguments of [`COMMIT`] for a transaction that read `reads` and leaves `w`.
    fn commit_args(&self, reads: Vec<Stored>, w: aquifer_meta::TxnWrites) -> Vec<Vec<u8>> {
        let mut checks: Vec<Stored> = reads;
        for (k, v) in w.guesses {
            let (rk, field) = self.locate(&k);
            let raw = match v {
                Some(v) if is_counter(&k) => Some(
                    aquifer_meta::counter_value(Some(&v))
                        .to_string()
                        .into_bytes(),
                ),
                v => v,
            };
            checks.push(Stored { rk, field, raw });
        }
        let mut args: Vec<Vec<u8>> = vec![checks.len().to_string().into_bytes()];
        for c in checks {
            args.push(if c.field.is_some() { b"h" } else { b"s" }.to_vec());
            args.push(c.rk);
            args.push(c.field.unwrap_or_default());
            match c.raw {
                Some(v) => {
                    args.push(b"1".to_vec());
                    args.push(v);
                }
                None => {
                    args.push(b"0".to_vec());
                    args.push(Vec::new());
                }
            }
        }
        let op = |args: &mut Vec<Vec<u8>>, parts: &[&[u8]]| {
            args.extend(parts.iter().map(|p| p.to_vec()));
        };
        let mut emptied: Vec<(Vec<u8>, u8, Vec<u8>)> = Vec::new();
        for (k, v) in w.writes {
            let (rk, field) = self.locate(&k);
            let tag = k[0];
            // Index member: the id of a plain key, the group id of a grouped one.
            let member = if field.is_some() { &k[1..9] } else { &k[1..] };
            let written = v.is_some();
            match (v, &field) {
                (Some(v), None) if is_counter(&k) => {
                    let n = aquifer_meta::counter_value(Some(&v)).to_string();
                    op(&mut args, &[b"S", &rk, n.as_bytes()]);
                }
                (Some(v), None) => op(&mut args, &[b"S", &rk, &v]),
                (Some(v), Some(f)) => op(&mut args, &[b"H", &rk, f, &v]),
                (None, None) => op(&mut args, &[b"D", &rk]),
                (None, Some(f)) => op(&mut args, &[b"X", &rk, f]),
            }
            if !LISTED.contains(&tag) {
                continue;
            }
            let idx = self.index_key(tag);
            match (written, field.is_some()) {
                (true, _) => op(&mut args, &[b"Z", &idx, member]),
                (false, false) => op(&mut args, &[b"R", &idx, member]),
                // A group leaves the index once its hash is empty (checked at the end).
                (false, true) => {
                    if !emptied.iter().any(|e| e.0 == rk) {
                        emptied.push((rk, tag, member.to_vec()));
                    }
                }
            }
        }
        for (k, d) in w.adds {
            let (rk, _) = self.locate(&k);
            op(&mut args, &[b"A", &rk, d.to_string().as_bytes()]);
        }
        for (rk, tag, id) in emptied {
            op(&mut args, &[b"U", &rk, &self.index_key(tag), &id]);
        }
        args
    }

    /// Delete every key of this volume (tests; `aquifer load` into a used database is
    /// refused instead).
    pub fn destroy_volume(&self) -> Result<u64> {
        let mut pattern = self.prefix.clone();
        // `{` `}` are glob-safe; escape nothing else: the prefix is `{DB}`.
        pattern.extend_from_slice(b"*");
        let mut pat = Vec::new();
        for &b in &pattern {
            if b == b'[' || b == b']' || b == b'?' || b == b'\\' {
                pat.push(b'\\');
            }
            pat.push(b);
        }
        self.run(|c| {
            let mut cursor: u64 = 0;
            let mut n = 0u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pat)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                if !keys.is_empty() {
                    n += redis::cmd("DEL").arg(&keys).query::<u64>(c)?;
                }
                if next == 0 {
                    return Ok(n);
                }
                cursor = next;
            }
        })
    }
}

fn unsupported(start: &[u8], end: &[u8]) -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "scan across groups of an unlisted tag",
        format!(
            "{}..{}",
            String::from_utf8_lossy(start),
            String::from_utf8_lossy(end)
        ),
    ))
}

/// The master of `slot` in a `CLUSTER SLOTS` reply. A node that reports an empty host means
/// "the address you reached me at".
fn slot_master(slots: &[Value], slot: i64, asked: &str) -> Option<(String, u16)> {
    let int = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        _ => None,
    };
    for range in slots {
        let Value::Array(r) = range else { continue };
        let (Some(lo), Some(hi)) = (r.first().and_then(int), r.get(1).and_then(int)) else {
            continue;
        };
        if slot < lo || slot > hi {
            continue;
        }
        let Some(Value::Array(node)) = r.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let host = if host.is_empty() || host == "?" {
            asked.to_string()
        } else {
            host
        };
        let port = node.get(1).and_then(int)?;
        return Some((host, port as u16));
    }
    None
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

/// The reads of one transaction, on the transaction's connection. Point reads are
/// remembered with the values seen, and [`COMMIT`] checks them again; a scan `WATCH`es the
/// hash or index it read (a hash has no cheap "unchanged since" check). The first Redis error
/// is kept to decide whether to retry.
struct Reading<'a> {
    kv: &'a RedisKv,
    conn: RefCell<&'a mut Connection>,
    failed: RefCell<Option<RedisError>>,
    reads: RefCell<Vec<Stored>>,
    watched: Cell<bool>,
}

impl Reading<'_> {
    fn note<T>(&self, r: redis::RedisResult<T>) -> Result<T> {
        r.map_err(|e| {
            let m = engine_err(&e);
            self.failed.borrow_mut().get_or_insert(e);
            m
        })
    }
}

impl KvRead for Reading<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.get_many(&[key])?.pop().flatten())
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let r = self.kv.get_raw_on(&mut self.conn.borrow_mut(), keys);
        let stored = self.note(r)?;
        let mut reads = self.reads.borrow_mut();
        Ok(keys
            .iter()
            .zip(stored)
            .map(|(k, s)| {
                let v = RedisKv::decode_value(k, s.raw.clone());
                reads.push(s);
                v
            })
            .collect())
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        self.watched.set(true);
        let r = self
            .kv
            .scan_on(&mut self.conn.borrow_mut(), start, end, limit, true);
        self.note(r)
    }
}

enum Attempt {
    Done,
    /// Something the transaction read changed before it committed.
    Conflict,
    /// A guess was wrong (or the transaction failed on one): run again without guesses.
    Misguessed,
    Failed(RedisError),
    /// The commit was sent and no answer came back: it may have been applied.
    Unknown(RedisError),
    Refused(MetaError),
}

impl RedisKv {
    fn attempt(
        &self,
        c: &mut Connection,
        f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>,
        guessing: bool,
    ) -> Attempt {
        let view = Reading {
            kv: self,
            conn: RefCell::new(c),
            failed: RefCell::new(None),
            reads: RefCell::new(Vec::new()),
            watched: Cell::new(false),
        };
        let mut txn = BufferedTxn::with_guesses(&view, guessing);
        let r = f(&mut txn);
        let writes = txn.into_writes();
        let failed = view.failed.borrow_mut().take();
        let watched = view.watched.get();
        let reads = view.reads.into_inner();
        let c = view.conn.into_inner();
        let unwatch = |c: &mut Connection| -> Option<RedisError> {
            if !watched {
                return None;
            }
            redis::cmd("UNWATCH").query::<()>(c).err()
        };
        if let Some(e) = failed {
            // A read failed: the closure saw an error that is the engine's, not its own.
            return Attempt::Failed(e);
        }
        let guessed = !writes.guesses.is_empty();
        if r.is_err() || writes.is_empty() {
            if let Some(e) = unwatch(c) {
                return Attempt::Failed(e);
            }
            return match r {
                // The answer may rest on a wrong guess: find out with real reads.
                _ if guessed => Attempt::Misguessed,
                Err(e) => Attempt::Refused(e),
                Ok(()) => Attempt::Done,
            };
        }
        let args = self.commit_args(reads, writes);
        let applied: redis::RedisResult<Option<i64>> = if watched {
            // WATCH stands for the scans; MULTI/EXEC makes it apply to the script.
            let mut p = redis::pipe();
            p.atomic();
            p.cmd("EVAL").arg(COMMIT).arg(0).arg(&args);
            p.query::<Option<(i64,)>>(c).map(|r| r.map(|(n,)| n))
        } else {
            let mut inv = self.commit.prepare_invoke();
            for a in &args {
                inv.arg(a);
            }
            inv.invoke::<i64>(c).map(Some)
        };
        match applied {
            Ok(Some(1)) => Attempt::Done,
            Ok(_) if guessed => Attempt::Misguessed,
            Ok(_) => Attempt::Conflict,
            // The commit may have reached the server and run: only the caller can find out.
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                Attempt::Unknown(e)
            }
            // An error reply (READONLY, LOADING, ...): the server did not run it.
            Err(e) => Attempt::Failed(e),
        }
    }
}

impl KvEngine for RedisKv {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut conflicts = 0u32;
        let mut guessing = true;
        loop {
            let attempt = self
                .take_connection()
                .map(|mut c| {
                    let a = self.attempt(&mut c, f, guessing);
                    if !matches!(a, Attempt::Failed(_) | Attempt::Unknown(_)) {
                        self.put_connection(c);
                    }
                    a
                })
                .unwrap_or_else(Attempt::Failed);
            match attempt {
                Attempt::Done => return Ok(()),
                Attempt::Refused(e) => return Err(e),
                Attempt::Misguessed => guessing = false,
                Attempt::Conflict => {
                    conflicts += 1;
                    if conflicts > 3 {
                        // Many clients on one key: spread the retries out.
                        let jitter = (start.elapsed().subsec_nanos() % 5000) as u64;
                        std::thread::sleep(Duration::from_micros(
                            jitter * conflicts.min(20) as u64 / 4,
                        ));
                    }
                    if start.elapsed() > self.deadline {
                        return Err(engine_err(format!(
                            "transaction still conflicting after {conflicts} tries"
                        )));
                    }
                }
                // Running it again could apply it twice: the caller (KvMeta's lanes) learns
                // what happened first.
                Attempt::Unknown(e) => {
                    self.reset(&e);
                    return Err(MetaError::ambiguous(ENGINE, e));
                }
                Attempt::Failed(e) if retryable(&e) && start.elapsed() < self.deadline => {
                    tracing::debug!(error = %e, "metadata transaction failed; retrying");
                    self.reset(&e);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Attempt::Failed(e) => return Err(engine_err(e)),
            }
        }
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
