//! RocksDB engine for aquifer metadata: `rocksdb://PATH`.
//!
//! Transactions are serialised by one commit lock: the closure reads committed state and
//! buffers its writes, which then go to RocksDB as one atomic `WriteBatch`. With a single
//! process owning the database (RocksDB locks its directory) that gives serialisable
//! transactions without RocksDB's transaction layer. Writes go through the WAL without an
//! fsync each, so a committed transaction survives the death of the process; `sync` fsyncs
//! the WAL for fsync(2) callers who also want to survive power loss.

use aquifer_meta::{BufferedTxn, KvEngine, KvPair, KvRead, KvTxn, MetaError, Result};
use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use std::path::Path;
use std::sync::Mutex;

const ENGINE: &str = "rocksdb";

pub struct RocksKv {
    db: DB,
    commit: Mutex<()>,
    counters: Mutex<()>,
}

fn err(e: rocksdb::Error) -> MetaError {
    MetaError::engine(ENGINE, e.into_string())
}

impl RocksKv {
    /// Open the database at `path`; with `create`, make it when missing.
    pub fn open(path: impl AsRef<Path>, create: bool) -> Result<RocksKv> {
        let path = path.as_ref();
        if !create && !path.join("CURRENT").exists() {
            return Err(MetaError::Config(format!(
                "no metadata database at {}: format a volume there first (aquifer format rocksdb://{} NAME)",
                path.display(),
                path.display()
            )));
        }
        if create {
            std::fs::create_dir_all(path)
                .map_err(|e| MetaError::Config(format!("cannot create {}: {e}", path.display())))?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        let db = DB::open(&opts, path).map_err(|e| {
            let msg = e.into_string();
            if msg.contains("LOCK") && (msg.contains("lock") || msg.contains("Resource temporarily")) {
                MetaError::Config(format!(
                    "metadata database {} is in use by another process (is the volume already mounted?)",
                    path.display()
                ))
            } else {
                MetaError::engine(ENGINE, format!("open {}: {msg}", path.display()))
            }
        })?;
        Ok(RocksKv {
            db,
            commit: Mutex::new(()),
            counters: Mutex::new(()),
        })
    }
}

impl RocksKv {
    /// Open without taking the database lock, to inspect a volume that is mounted.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<RocksKv> {
        let path = path.as_ref();
        if !path.join("CURRENT").exists() {
            return Err(MetaError::Config(format!(
                "no metadata database at {}",
                path.display()
            )));
        }
        let db = DB::open_for_read_only(&Options::default(), path, false).map_err(|e| {
            MetaError::engine(
                ENGINE,
                format!("open {}: {}", path.display(), e.into_string()),
            )
        })?;
        Ok(RocksKv {
            db,
            commit: Mutex::new(()),
            counters: Mutex::new(()),
        })
    }
}

impl KvRead for RocksKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get(key).map_err(err)
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_opt(IteratorMode::From(start, Direction::Forward), ro)
        {
            let (k, v) = item.map_err(err)?;
            out.push((k.into_vec(), v.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

impl KvEngine for RocksKv {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let _serial = self
            .commit
            .lock()
            .map_err(|_| MetaError::engine(ENGINE, "commit lock poisoned"))?;
        let mut txn = BufferedTxn::new(self);
        f(&mut txn)?;
        let writes = txn.into_writes();
        if writes.is_empty() {
            return Ok(());
        }
        let writes = writes.folded(self)?;
        let mut batch = WriteBatch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        self.db
            .write_opt(batch, &WriteOptions::default())
            .map_err(err)
    }

    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(err)
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64> {
        // Its own lock, not the commit lock: called from inside transactions. Transactions
        // never write the counters that ids come from (only `format` does).
        let _serial = self
            .counters
            .lock()
            .map_err(|_| MetaError::engine(ENGINE, "counter lock poisoned"))?;
        let cur = self.db.get(key).map_err(err)?;
        let new = aquifer_meta::counter_value(cur.as_deref()).wrapping_add(delta);
        self.db.put(key, new.to_be_bytes()).map_err(err)?;
        Ok(new)
    }
}

#[cfg(test)]
mod conformance {
    use super::RocksKv;
    use aquifer_meta::KvMeta;

    fn fresh() -> (KvMeta<RocksKv>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let kv = RocksKv::open(dir.path().join("meta"), true).unwrap();
        (KvMeta::new(kv), dir)
    }

    aquifer_meta::meta_conformance!(fresh());
    aquifer_meta::meta_conformance_exclusive!(fresh());

    /// Every case again with one commit in three losing its answer.
    mod lossy {
        use super::RocksKv;
        use aquifer_meta::fault::LossyKv;
        use aquifer_meta::KvMeta;

        fn fresh_every(every: u64) -> (KvMeta<LossyKv<RocksKv>>, tempfile::TempDir) {
            let dir = tempfile::tempdir().unwrap();
            let kv = RocksKv::open(dir.path().join("meta"), true).unwrap();
            let seed = aquifer_meta::conformance::fault_seed();
            (KvMeta::new(LossyKv::new(kv, seed, every)), dir)
        }
        aquifer_meta::meta_conformance!(fresh_every(3));
        aquifer_meta::meta_conformance_exclusive!(fresh_every(3));
        aquifer_meta::meta_conformance_lossy!(fresh_every(0));
    }

    #[test]
    fn second_open_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _a = RocksKv::open(dir.path(), true).unwrap();
        let e = RocksKv::open(dir.path(), true).err().unwrap().to_string();
        assert!(e.contains("in use by another process"), "{e}");
    }

    #[test]
    fn missing_database_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = RocksKv::open(dir.path().join("nope"), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no metadata database"), "{e}");
    }

    #[test]
    fn committed_data_survives_reopen() {
        use aquifer_meta::{KvEngine, KvRead};
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = RocksKv::open(dir.path(), true).unwrap();
            kv.txn(&mut |t| {
                t.set(b"k", b"v".to_vec());
                Ok(())
            })
            .unwrap();
        }
        let kv = RocksKv::open(dir.path(), false).unwrap();
        assert_eq!(kv.get(b"k").unwrap(), Some(b"v".to_vec()));
    }
}
