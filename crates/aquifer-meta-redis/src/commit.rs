//! The transaction commit: a transaction's reads on its own connection (`Reading`), the
//! arguments of the `COMMIT` script built from what it read and wrote, one attempt, and the
//! loop that runs attempts again after a conflict, a wrong guess or a retryable error —
//! but never after a commit whose answer was lost (`MetaError::Ambiguous`).

use crate::conn::retryable;
use crate::feed::FEED_MAX;
use crate::keys::Stored;
use crate::scripts::COMMIT;
use crate::{engine_err, RedisKv, ENGINE};
use aquifer_meta::encoding::{followed, is_counter, is_lane, LISTED};
use aquifer_meta::{pack_keys, BufferedTxn, KvPair, KvRead, KvTxn, MetaError, Result};
use redis::{Connection, RedisError};
use std::cell::{Cell, RefCell};
use std::time::Duration;

impl RedisKv {
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
        // What other clients follow (feed.rs): a commit that changes none of it (only its
        // lane, a session's records, a counter) adds nothing to the feed.
        // A file's chunks as one key (the first): a delete of a large file writes many, and
        // a follower only needs the inode.
        let mut chunk_of = None;
        let followed: Vec<&Vec<u8>> = w
            .writes
            .keys()
            .filter(|k| followed(k))
            .filter(|k| {
                if k.first() != Some(&b'C') {
                    return true;
                }
                let ino = k.get(1..9);
                let first = chunk_of != Some(ino);
                chunk_of = Some(ino);
                first
            })
            .collect();
        let feed = followed
            .iter()
            .any(|k| !is_lane(k))
            .then(|| pack_keys(followed.iter().map(|k| k.as_slice())));
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
        if let Some(keys) = feed {
            let max = FEED_MAX.to_string();
            let (stream, seq) = (self.feed_key(), self.feed_seq_key());
            op(&mut args, &[b"L", &stream, &seq, max.as_bytes(), &keys]);
        }
        args
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

    /// [`KvEngine::txn`](aquifer_meta::KvEngine::txn): attempts until one commits, is
    /// refused, or the deadline passes.
    pub(crate) fn transact(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let mut backoff = self.retry_policy().start();
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
                        let jitter = (backoff.elapsed().subsec_nanos() % 5000) as u64;
                        std::thread::sleep(Duration::from_micros(
                            jitter * conflicts.min(20) as u64 / 4,
                        ));
                    }
                    if backoff.past_deadline() {
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
                Attempt::Failed(e) if retryable(&e) => {
                    tracing::debug!(error = %e, "metadata transaction failed; retrying");
                    self.reset(&e);
                    if !backoff.wait() {
                        return Err(engine_err(e));
                    }
                }
                Attempt::Failed(e) => return Err(engine_err(e)),
            }
        }
    }
}
