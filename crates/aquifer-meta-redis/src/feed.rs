//! The change feed ([`KvEngine::feed`](aquifer_meta::KvEngine::feed)): every commit that
//! writes followed keys (attributes, entries, chunks) also appends them, in the same script,
//! to the stream `{DB}feed` with a sequence number from `{DB}feedseq`; followers read the
//! stream with a blocking `XREAD` on a connection of their own. The sequence number is how a
//! follower knows it missed nothing: a number that does not follow the last one seen (the
//! stream trimmed past it, a failover to a server that lacks some entries) is a gap, as is
//! every (re)connection.

use crate::{engine_err, RedisKv};
use aquifer_meta::{unpack_keys, FeedBatch, KvFeed, Result};
use redis::{Connection, Value};
use std::time::Duration;

/// Entries the stream keeps (about: `MAXLEN ~`). A follower more than this many commits
/// behind sees a gap and drops what it cached; at ~60 bytes an entry, 20,000 cost ~1 MiB.
pub(crate) const FEED_MAX: u64 = 20_000;
/// Entries read at once.
const BATCH: usize = 1024;

impl RedisKv {
    pub(crate) fn feed_key(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"feed");
        k
    }

    pub(crate) fn feed_seq_key(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"feedseq");
        k
    }

    pub(crate) fn new_feed(&self) -> RedisFeed {
        // A client of its own: its connection blocks in XREAD, and it finds the master
        // again by itself after a failover.
        let mut kv = RedisKv::open_unchecked(&self.url);
        kv.prefix = self.prefix.clone();
        RedisFeed {
            kv,
            conn: None,
            last_id: String::new(),
            seq: 0,
        }
    }
}

pub(crate) struct RedisFeed {
    kv: RedisKv,
    conn: Option<Connection>,
    /// The id of the last entry read (where XREAD goes on from).
    last_id: String,
    /// Its sequence number.
    seq: u64,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// One stream entry: its id, sequence number and packed keys.
fn entry(v: &Value) -> Option<(String, u64, Vec<u8>)> {
    let Value::Array(e) = v else { return None };
    let id = text(e.first()?)?;
    let Value::Array(fields) = e.get(1)? else {
        return None;
    };
    let (mut seq, mut keys) = (None, None);
    for kv in fields.chunks(2) {
        match (kv.first().and_then(text).as_deref(), kv.get(1)) {
            (Some("s"), Some(v)) => seq = text(v).and_then(|s| s.parse().ok()),
            (Some("k"), Some(Value::BulkString(b))) => keys = Some(b.clone()),
            _ => {}
        }
    }
    Some((id, seq?, keys?))
}

impl RedisFeed {
    /// Connect and start after the stream's last entry (a gap: what happened before is not
    /// known to this follower).
    fn start(&mut self, wait: Duration) -> redis::RedisResult<()> {
        let mut c = self.kv.new_connection()?;
        c.set_read_timeout(Some(wait + Duration::from_secs(2)))?;
        // Named, so an operator (and a test) can tell the followers in CLIENT LIST; a
        // server that refuses the name (an ACL) is followed all the same.
        let name = format!("aquifer-feed:{}", String::from_utf8_lossy(&self.kv.prefix));
        let _ = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name.replace(' ', "_"))
            .query::<()>(&mut c);
        let mut p = redis::pipe();
        p.atomic()
            .cmd("XREVRANGE")
            .arg(self.kv.feed_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("GET")
            .arg(self.kv.feed_seq_key());
        let (last, seq): (Value, Option<u64>) = p.query(&mut c)?;
        let last = match &last {
            Value::Array(v) => v.first().and_then(entry),
            _ => None,
        };
        match last {
            Some((id, s, _)) => (self.last_id, self.seq) = (id, s),
            // No entry: the next one is numbered after the counter (which an empty stream
            // may have left behind).
            None => (self.last_id, self.seq) = ("0-0".into(), seq.unwrap_or(0)),
        }
        self.conn = Some(c);
        Ok(())
    }

    fn read(&mut self, wait: Duration) -> redis::RedisResult<FeedBatch> {
        let Some(c) = self.conn.as_mut() else {
            self.start(wait)?;
            return Ok(FeedBatch::Gap);
        };
        // ROLE first: a master demoted while this connection was between reads goes on
        // answering as a replica (stale, or fed by a new master after a resync), and a
        // follower reading it would look live while other mounts write elsewhere.
        let mut p = redis::pipe();
        p.cmd("ROLE")
            .cmd("XREAD")
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(self.kv.feed_key())
            .arg(&self.last_id);
        let (role, v): (Value, Value) = p.query(c)?;
        let master = match &role {
            Value::Array(r) => r.first().and_then(text).as_deref() == Some("master"),
            _ => false,
        };
        if !master {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the change feed's server is no longer the master",
            )));
        }
        let entries = match &v {
            Value::Array(streams) => match streams.first() {
                Some(Value::Array(s)) => match s.get(1) {
                    Some(Value::Array(e)) => e.as_slice(),
                    _ => &[],
                },
                _ => &[],
            },
            // RESP3 answers a map; the connection speaks RESP2, but be lenient.
            Value::Map(m) => match m.first() {
                Some((_, Value::Array(e))) => e.as_slice(),
                _ => &[],
            },
            _ => &[],
        };
        let mut out = Vec::with_capacity(entries.len());
        let mut gap = false;
        for e in entries {
            let Some((id, seq, keys)) = entry(e) else {
                // Not ours to read (another version's?): a gap, but read past it.
                gap = true;
                if let Some(id) = match e {
                    Value::Array(e) => e.first().and_then(text),
                    _ => None,
                } {
                    self.last_id = id;
                }
                continue;
            };
            if seq != self.seq + 1 {
                gap = true;
            }
            (self.last_id, self.seq) = (id, seq);
            out.push(unpack_keys(&keys));
        }
        Ok(if gap {
            FeedBatch::Gap
        } else {
            FeedBatch::Commits(out)
        })
    }
}

impl KvFeed for RedisFeed {
    fn next(&mut self, wait: Duration) -> Result<FeedBatch> {
        self.read(wait).map_err(|e| {
            // Whatever it was, the next call starts again (with a gap).
            self.conn = None;
            self.kv.reset(&e);
            engine_err(e)
        })
    }
}
