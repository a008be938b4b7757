//! The object journal: an fsync of a little data costs one metadata log flush.
//!
//! On a local-directory store a new block is durable only after an fdatasync of its file and
//! an fsync of the directory its name went into, and the metadata that references it needs a
//! third flush (the RocksDB log). An fsync of a few KiB — `msync` of a mapped page, a database
//! commit — would cost three disk flushes where ext4 costs one. So when everything put since
//! the store was last synced is small, [`Journal::sync_committed`] writes copies of those
//! objects into the metadata engine and syncs it: one log flush makes the data and the
//! metadata that references it durable together. A checkpoint ([`Journal::checkpoint`]: every
//! few seconds, or when much is journaled, and at shutdown) syncs the store the slow way and
//! drops the copies. After a crash the copies are put back into the store ([`replay`]) before
//! the volume is used.
//!
//! A checkpoint runs beside fsyncs, not in their way: every put gets a sequence number, a
//! checkpoint notes the last one before it syncs the store, and afterwards drops only what
//! that sync covered. An fsync during a checkpoint journals what it finds, as at any time.
//!
//! Stores whose puts are durable when they return (S3) are passed through untouched.

use aquifer_meta::Meta;
use aquifer_object::{ObjectInfo, ObjectStore, Result};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Larger objects go to the disk the slow way: a flush per file costs little next to them.
const OBJECT_MAX: usize = 1 << 20;
/// Copies held in memory, waiting for a sync; past this the next sync is a full one.
const PENDING_MAX: usize = 16 << 20;
/// Copies kept in the metadata engine before a checkpoint moves them out.
const JOURNALED_MAX: usize = 32 << 20;
/// Age of the oldest copy (journaled or pending) at which a checkpoint is due.
const CHECKPOINT_AGE: Duration = Duration::from_secs(5);

/// An [`ObjectStore`] that remembers its recent small puts, for [`Journal::sync_committed`].
pub struct Journal {
    inner: Arc<dyn ObjectStore>,
    meta: Arc<dyn Meta>,
    enabled: bool,
    state: Mutex<State>,
    /// One fsync at a time: a sync that finds nothing pending must not return while an
    /// earlier one is still making those objects durable.
    order: Mutex<()>,
    /// One checkpoint at a time (they do not take `order`).
    checkpointing: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Sequence number of the last put seen.
    seq: u64,
    /// Every put up to this one is durable in the store itself (a store sync covered it).
    durable_upto: u64,
    /// The last put that was not recorded (too large, or too many pending). While it is
    /// past `durable_upto`, an fsync must sync the store itself.
    overflow_upto: u64,
    /// Put since the store was last synced and not journaled yet: copies of their bytes.
    pending: HashMap<String, (u64, Bytes)>,
    pending_bytes: usize,
    /// In the metadata journal, waiting for a checkpoint: sequence number and size.
    journaled: HashMap<String, (u64, usize)>,
    journaled_bytes: usize,
    /// When the oldest copy still held (pending or journaled) was made.
    since: Option<Instant>,
}

impl State {
    fn overflowed(&self) -> bool {
        self.overflow_upto > self.durable_upto
    }

    fn reset_since(&mut self) {
        if self.pending.is_empty() && self.journaled.is_empty() {
            self.since = None;
        }
    }
}

impl Journal {
    /// Wrap `inner`, first putting back what an earlier process journaled (see [`replay`]).
    pub fn new(meta: Arc<dyn Meta>, inner: Arc<dyn ObjectStore>) -> Result<Arc<Journal>> {
        replay(&*meta, &*inner)?;
        Ok(Arc::new(Journal {
            enabled: inner.puts_need_sync(),
            inner,
            meta,
            state: Mutex::new(State::default()),
            order: Mutex::new(()),
            checkpointing: Mutex::new(()),
        }))
    }

    /// Make every committed change durable, with every object put so far: through the
    /// journal when they are few and small, else by syncing the store, then the metadata.
    pub fn sync_committed(&self) -> std::result::Result<(), crate::DataError> {
        let _one = self.order.lock();
        if !self.enabled {
            self.meta.sync()?;
            return Ok(());
        }
        let taken = {
            let mut st = self.state.lock();
            if st.overflowed() {
                None
            } else {
                st.pending_bytes = 0;
                Some(std::mem::take(&mut st.pending))
            }
        };
        let Some(recs) = taken else {
            self.sync_store()?;
            self.meta.sync()?;
            return Ok(());
        };
        let r = (|| {
            let list: Vec<(&str, &[u8])> = recs
                .iter()
                .map(|(k, (_, v))| (k.as_str(), &v[..]))
                .collect();
            self.meta.journal_put(&list)?;
            self.meta.sync()
        })();
        let mut st = self.state.lock();
        match r {
            Ok(()) => {
                for (k, (seq, v)) in recs {
                    // A checkpoint that ran meanwhile may already cover it; its copy then
                    // stays journaled until the next one, which is harmless.
                    st.journaled_bytes += v.len();
                    if let Some((_, old)) = st.journaled.insert(k, (seq, v.len())) {
                        st.journaled_bytes -= old;
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Not known to be durable: journal them again next time.
                for (k, (seq, v)) in recs {
                    if seq > st.durable_upto && !st.pending.contains_key(&k) {
                        st.pending_bytes += v.len();
                        st.pending.insert(k, (seq, v));
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Sync the store the slow way, then drop the journal's copies of what it covered.
    /// Runs beside fsyncs: it does not hold their lock while the store syncs.
    pub fn checkpoint(&self) -> std::result::Result<(), crate::DataError> {
        let _one = self.checkpointing.lock();
        self.sync_store()?;
        self.meta.sync()?;
        Ok(())
    }

    /// A checkpoint if the journal holds much or old data; called by a background worker.
    pub fn checkpoint_if_due(&self) -> std::result::Result<(), crate::DataError> {
        let due = {
            let st = self.state.lock();
            st.journaled_bytes > JOURNALED_MAX
                || st.since.is_some_and(|t| t.elapsed() >= CHECKPOINT_AGE)
        };
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Sync the store itself; afterwards every put noted before it began is durable there,
    /// so its copies (pending or journaled) are dropped.
    fn sync_store(&self) -> std::result::Result<(), crate::DataError> {
        let upto = self.state.lock().seq;
        self.inner.sync()?;
        let dropped: Vec<(String, (u64, usize))> = {
            let mut st = self.state.lock();
            st.durable_upto = st.durable_upto.max(upto);
            st.pending.retain(|_, (seq, _)| *seq > upto);
            st.pending_bytes = st.pending.values().map(|(_, v)| v.len()).sum();
            let (drop, keep): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut st.journaled)
                .into_iter()
                .partition(|(_, (seq, _))| *seq <= upto);
            st.journaled = keep;
            st.journaled_bytes = st.journaled.values().map(|(_, n)| n).sum();
            // What is left was put after this sync began: due a full age from now, not at
            // once again.
            st.since = (!st.pending.is_empty() || !st.journaled.is_empty()).then(Instant::now);
            drop.into_iter().collect()
        };
        if !dropped.is_empty() {
            let keys: Vec<String> = dropped.iter().map(|(k, _)| k.clone()).collect();
            if let Err(e) = self.meta.journal_remove(&keys) {
                // The store has them; the copies stay until a later checkpoint drops them.
                let mut st = self.state.lock();
                st.since.get_or_insert_with(Instant::now);
                for (k, (seq, n)) in dropped {
                    if !st.journaled.contains_key(&k) {
                        st.journaled_bytes += n;
                        st.journaled.insert(k, (seq, n));
                    }
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn note_put(&self, key: &str, data: &Bytes) {
        let mut st = self.state.lock();
        st.seq += 1;
        let seq = st.seq;
        if st.overflowed() || data.len() > OBJECT_MAX || st.pending_bytes + data.len() > PENDING_MAX
        {
            // Not recorded: the next fsync syncs the store, which covers what is pending too.
            st.overflow_upto = seq;
            st.pending.clear();
            st.pending_bytes = 0;
            st.since.get_or_insert_with(Instant::now);
            return;
        }
        // A copy: the upload's buffer is a whole block's allocation, recycled once the
        // store is done with it.
        st.pending_bytes += data.len();
        st.since.get_or_insert_with(Instant::now);
        if let Some((_, old)) = st
            .pending
            .insert(key.to_string(), (seq, Bytes::copy_from_slice(data)))
        {
            st.pending_bytes -= old.len();
        }
    }

    fn note_delete(&self, key: &str) -> Result<()> {
        let journaled = {
            let mut st = self.state.lock();
            if let Some((_, old)) = st.pending.remove(key) {
                st.pending_bytes -= old.len();
            }
            let j = st.journaled.remove(key);
            if let Some((_, n)) = j {
                st.journaled_bytes -= n;
            }
            st.reset_since();
            j.is_some()
        };
        if journaled {
            // Else a replay would put a freed object back (a leak for gc, no more).
            self.meta
                .journal_remove(&[key.to_string()])
                .map_err(|e| journal_err(&*self.inner, key, e))?;
        }
        Ok(())
    }
}

/// Put back into `store` every object an earlier process journaled, make them durable and
/// drop the copies. Idempotent: a put of the same bytes again changes nothing. Run before a
/// volume is mounted, checked (fsck) or collected (gc).
pub fn replay(meta: &dyn Meta, store: &dyn ObjectStore) -> Result<usize> {
    let meta_err = |e: aquifer_meta::MetaError| journal_err(store, "", e);
    let recs = meta.journal_list().map_err(meta_err)?;
    if recs.is_empty() {
        return Ok(0);
    }
    let mut keys = Vec::with_capacity(recs.len());
    for (k, v) in recs {
        store.put(&k, Bytes::from(v))?;
        keys.push(k);
    }
    store.sync()?;
    meta.journal_remove(&keys).map_err(meta_err)?;
    meta.sync().map_err(meta_err)?;
    tracing::info!(objects = keys.len(), "put back journaled objects");
    Ok(keys.len())
}

/// A metadata failure while journaling, as the store error its caller expects.
fn journal_err(
    store: &dyn ObjectStore,
    key: &str,
    e: impl std::fmt::Display,
) -> aquifer_object::ObjectError {
    aquifer_object::ObjectError::Io {
        store: store.describe(),
        op: "journal",
        key: key.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl ObjectStore for Journal {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner.put(key, data.clone())?;
        if self.enabled {
            self.note_put(key, &data);
        }
        Ok(())
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        self.inner.get(key, off, len)
    }
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.inner.get_into(key, off, buf)
    }
    fn get_owned(&self, key: &str, off: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.inner.get_owned(key, off, len, buf)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.inner.head(key)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)?;
        if self.enabled {
            self.note_delete(key)?;
        }
        Ok(())
    }
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        self.inner.list(prefix, start_after, limit)
    }
    /// Every put durable in the store itself: a checkpoint.
    fn sync(&self) -> Result<()> {
        match self.checkpoint() {
            Ok(()) => Ok(()),
            Err(crate::DataError::Object(e)) => Err(e),
            Err(e) => Err(journal_err(&*self.inner, "", e)),
        }
    }
    fn puts_need_sync(&self) -> bool {
        self.inner.puts_need_sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aquifer_meta::conformance::test_format;
    use aquifer_meta::{KvMeta, MemKv};
    use aquifer_object::{FaultStore, FileStore};

    type Store = FaultStore<FileStore>;

    fn fixture() -> (Arc<dyn Meta>, Arc<Store>, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(MemKv::new()));
        meta.format(&test_format(4096), false).unwrap();
        let store = Arc::new(FaultStore::new(FileStore::new(d.path()).unwrap()));
        (meta, store, d)
    }

    #[test]
    fn a_small_fsync_goes_to_the_metadata_log_and_comes_back_after_a_crash() {
        let (meta, store, d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/1", Bytes::from_static(b"committed bytes"))
            .unwrap();
        j.sync_committed().unwrap();
        assert_eq!(store.syncs(), 0, "no flush of block files or directories");
        assert_eq!(
            meta.journal_list().unwrap(),
            vec![("chunks/1".to_string(), b"committed bytes".to_vec())]
        );
        // A power cut loses the block file (it was never synced) but not the journal.
        drop(j);
        std::fs::remove_file(d.path().join("chunks/1")).unwrap();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        assert_eq!(j.get("chunks/1", 0, None).unwrap(), &b"committed bytes"[..]);
        assert!(
            meta.journal_list().unwrap().is_empty(),
            "replayed, then dropped"
        );
        assert_eq!(store.syncs(), 1, "the replayed objects are synced before");
    }

    #[test]
    fn large_or_many_objects_sync_the_store_itself() {
        let (meta, store, _d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/big", Bytes::from(vec![1u8; OBJECT_MAX + 1]))
            .unwrap();
        j.put("chunks/small", Bytes::from_static(b"s")).unwrap();
        j.sync_committed().unwrap();
        assert_eq!(store.syncs(), 1);
        assert!(meta.journal_list().unwrap().is_empty());
        // The overflow was settled by that sync: the next small fsync is journaled again.
        j.put("chunks/next", Bytes::from_static(b"n")).unwrap();
        j.sync_committed().unwrap();
        assert_eq!(store.syncs(), 1);
        assert_eq!(meta.journal_list().unwrap().len(), 1);
    }

    #[test]
    fn a_checkpoint_syncs_the_store_and_drops_the_copies() {
        let (meta, store, _d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/a", Bytes::from_static(b"a")).unwrap();
        j.sync_committed().unwrap();
        j.put("chunks/b", Bytes::from_static(b"b")).unwrap();
        j.checkpoint().unwrap();
        assert_eq!(store.syncs(), 1);
        assert!(meta.journal_list().unwrap().is_empty());
        // Nothing new since: the next fsync journals nothing.
        j.sync_committed().unwrap();
        assert!(meta.journal_list().unwrap().is_empty());
        assert_eq!(store.syncs(), 1);
    }

    #[test]
    fn deleted_objects_are_not_replayed() {
        let (meta, store, _d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/a", Bytes::from_static(b"a")).unwrap();
        j.put("chunks/b", Bytes::from_static(b"b")).unwrap();
        j.delete("chunks/b").unwrap();
        j.sync_committed().unwrap();
        assert_eq!(
            meta.journal_list().unwrap().len(),
            1,
            "b was never journaled"
        );
        j.delete("chunks/a").unwrap();
        assert!(meta.journal_list().unwrap().is_empty());
        drop(j);
        let j = Journal::new(meta, store).unwrap();
        assert!(j.list("", "", 10).unwrap().is_empty());
    }

    #[test]
    fn a_failed_store_sync_is_retried_by_the_next_fsync() {
        let (meta, store, _d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/big", Bytes::from(vec![2u8; OBJECT_MAX + 1]))
            .unwrap();
        store.fail_next(1);
        assert!(j.sync_committed().is_err());
        // Still not known durable: the next fsync syncs the store again, not the journal.
        j.sync_committed().unwrap();
        assert_eq!(store.syncs(), 2);
        assert!(meta.journal_list().unwrap().is_empty());
    }

    fn keys(meta: &dyn Meta) -> Vec<String> {
        let mut k: Vec<String> = meta
            .journal_list()
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        k.sort();
        k
    }

    #[test]
    fn an_fsync_does_not_wait_for_a_checkpoint_and_keeps_what_it_did_not_cover() {
        let (meta, store, _d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/a", Bytes::from_static(b"a")).unwrap();
        j.sync_committed().unwrap();
        j.put("chunks/b", Bytes::from_static(b"b")).unwrap();
        store.hold_syncs(true);
        let ckpt = {
            let j = j.clone();
            std::thread::spawn(move || j.checkpoint())
        };
        store.wait_for_a_held_sync();
        // Mid-checkpoint: a new put and its fsync go through the journal at once.
        j.put("chunks/c", Bytes::from_static(b"c")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let j = j.clone();
            std::thread::spawn(move || tx.send(j.sync_committed().is_ok()).unwrap());
        }
        let done = rx.recv_timeout(Duration::from_secs(10));
        store.hold_syncs(false);
        assert_eq!(
            done,
            Ok(true),
            "the fsync waited for the checkpoint's store sync"
        );
        ckpt.join().unwrap().unwrap();
        assert_eq!(
            keys(&*meta),
            vec!["chunks/c".to_string()],
            "a and b were covered by the checkpoint; c was put after it began"
        );
        // c is still not in a synced store: the next checkpoint moves it out.
        j.checkpoint().unwrap();
        assert!(keys(&*meta).is_empty());
    }

    #[test]
    fn an_overflow_during_a_checkpoint_still_needs_a_store_sync() {
        let (meta, store, _d) = fixture();
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/a", Bytes::from_static(b"a")).unwrap();
        store.hold_syncs(true);
        let ckpt = {
            let j = j.clone();
            std::thread::spawn(move || j.checkpoint())
        };
        store.wait_for_a_held_sync();
        j.put("chunks/big", Bytes::from(vec![3u8; OBJECT_MAX + 1]))
            .unwrap();
        store.hold_syncs(false);
        ckpt.join().unwrap().unwrap();
        let before = store.syncs();
        j.sync_committed().unwrap();
        assert_eq!(
            store.syncs(),
            before + 1,
            "the large put came after the checkpoint began: only a store sync covers it"
        );
        assert!(keys(&*meta).is_empty());
    }

    #[test]
    fn stores_with_durable_puts_are_not_journaled() {
        let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(MemKv::new()));
        meta.format(&test_format(4096), false).unwrap();
        let store = Arc::new(FaultStore::new(aquifer_object::MemStore::new()));
        let j = Journal::new(meta.clone(), store.clone()).unwrap();
        j.put("chunks/a", Bytes::from_static(b"a")).unwrap();
        j.sync_committed().unwrap();
        assert!(meta.journal_list().unwrap().is_empty());
        assert_eq!(store.syncs(), 0);
    }
}
