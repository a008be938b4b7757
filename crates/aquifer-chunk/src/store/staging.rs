//! Writeback (`--writeback`): blocks are staged on the local cache disk and uploaded in the
//! background. A put returns once the block is in a staging file; [`ObjectStore::sync`]
//! makes the files written since the last one durable (fsync of each, then of the
//! directory), so an fsync through the mount returns once its blocks are on the local disk,
//! whether or not the object store is reachable.
//!
//! Staged blocks are uploaded oldest first, as soon as an uploader is free (a failed upload
//! is retried with backoff, for as long as it takes); they are never evicted: the files
//! live apart from the cache's blocks, and what they hold is pinned in the cache disk's
//! quota. Reads of a staged block are served from its file. Files left by a crash are found
//! at the next start and uploaded before any block staged after them. A file that fails its
//! checksum was never made durable by a sync (a power cut tore it), so no fsync promised it:
//! it is dropped.
//!
//! Another mount does not see a staged block until it is uploaded: reading it there fails
//! (the block is missing from the store) until then.
//!
//! File format: the cache disk's header ([`aquifer_cache::file`]) with magic `AQST`, then
//! the object exactly as it goes to the store.

use aquifer_cache::file::{self, HEADER};
use aquifer_object::{ObjectError, ObjectInfo, ObjectStore, Result};
use aquifer_retry::RetryPolicy;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"AQST";
/// A put waits at most this long for staging room before it goes to the store itself.
const ROOM_WAIT: Duration = Duration::from_secs(300);

pub struct Staging {
    sh: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    dir: PathBuf,
    inner: Arc<dyn ObjectStore>,
    st: Mutex<State>,
    cv: Condvar,
    /// Staged bytes beyond which puts wait for uploads.
    limit: u64,
    /// Staged bytes, also counted by the cache disk as pinned.
    pinned: Arc<AtomicU64>,
    stop: AtomicBool,
    seq: AtomicU64,
}

#[derive(Default)]
struct State {
    /// key → (sequence, file bytes).
    staged: HashMap<String, (u64, u64)>,
    /// Upload order: sequence → key, oldest first; keys being uploaded are not here.
    queue: BTreeMap<u64, String>,
    uploading: usize,
    /// Files written since the last sync.
    unsynced: Vec<PathBuf>,
}

fn io_err(dir: &Path, op: &'static str, key: &str, e: io::Error) -> ObjectError {
    ObjectError::Io {
        store: format!("staging {}", dir.display()),
        op,
        key: key.to_string(),
        source: e,
    }
}

impl Staging {
    /// Stage in `dir` (created if missing) in front of `inner`, uploading with `threads`
    /// threads; puts wait once `limit` bytes are staged. `pinned` is kept equal to the
    /// staged bytes (for the cache disk's quota). Files left by an earlier run are queued
    /// first.
    pub fn open(
        dir: &Path,
        inner: Arc<dyn ObjectStore>,
        threads: usize,
        limit: u64,
        pinned: Arc<AtomicU64>,
    ) -> io::Result<Arc<Staging>> {
        // Staged blocks are uploaded as they are found: another user's directory could hand
        // us theirs.
        aquifer_cache::private_dir(dir)?;
        fs::create_dir_all(dir.join("tmp"))?;
        for e in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        let mut found = Vec::new();
        for e in fs::read_dir(dir)?.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if !m.is_file() {
                continue;
            }
            match e.file_name().to_str().and_then(file::key_of) {
                Some(k) => found.push((m.modified().ok(), e.file_name(), k, m.len())),
                None => {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // Oldest first, as they were staged.
        found.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut st = State::default();
        let mut bytes = 0;
        for (seq, (_, _, k, len)) in found.into_iter().enumerate() {
            st.staged.insert(k.clone(), (seq as u64, len));
            st.queue.insert(seq as u64, k);
            bytes += len;
        }
        if !st.staged.is_empty() {
            tracing::info!(
                blocks = st.staged.len(),
                bytes,
                "blocks staged before the last stop; uploading them first"
            );
        }
        pinned.store(bytes, Ordering::Relaxed);
        let sh = Arc::new(Shared {
            dir: dir.to_path_buf(),
            inner,
            seq: AtomicU64::new(st.staged.len() as u64),
            st: Mutex::new(st),
            cv: Condvar::new(),
            limit,
            pinned,
            stop: AtomicBool::new(false),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let sh = sh.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("writeback-{i}"))
                    .spawn(move || sh.upload_loop())?,
            );
        }
        Ok(Arc::new(Staging {
            sh,
            threads: Mutex::new(handles),
        }))
    }

    /// Blocks and bytes staged, not uploaded yet.
    pub fn backlog(&self) -> (u64, u64) {
        let st = self.sh.st.lock();
        (
            st.staged.len() as u64,
            st.staged.values().map(|v| v.1).sum(),
        )
    }

    /// Upload what is staged for up to `timeout`, then stop the uploaders; what is left is
    /// uploaded at the next start.
    pub fn shutdown(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        {
            let mut st = self.sh.st.lock();
            while !st.staged.is_empty() && Instant::now() < end {
                self.sh.cv.wait_for(&mut st, Duration::from_millis(100));
            }
            if !st.staged.is_empty() {
                tracing::warn!(
                    blocks = st.staged.len(),
                    "blocks still staged at stop; they are uploaded at the next mount"
                );
            }
        }
        self.sh.stop.store(true, Ordering::Release);
        self.sh.cv.notify_all();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Release);
        self.sh.cv.notify_all();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file::file_name(key))
    }

    /// The staged object, verified; None if it is not (or no longer) staged.
    fn read(&self, key: &str) -> Result<Option<Bytes>> {
        let p = self.path(key);
        let raw = match fs::read(&p) {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&self.dir, "read", key, e)),
        };
        match file::check(MAGIC, &raw) {
            Ok(payload) => Ok(Some(Bytes::from(raw).slice(payload))),
            Err(msg) => Err(ObjectError::Corrupt {
                store: format!("staging {}", self.dir.display()),
                key: key.to_string(),
                msg,
            }),
        }
    }

    fn upload_loop(&self) {
        // For as long as it takes: a staged block is acknowledged data.
        let mut backoff =
            RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(10)).start();
        loop {
            let (seq, key) = {
                let mut st = self.st.lock();
                loop {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    if let Some((seq, key)) = st.queue.pop_first() {
                        st.uploading += 1;
                        break (seq, key);
                    }
                    self.cv.wait_for(&mut st, Duration::from_millis(500));
                }
            };
            let r = match self.read(&key) {
                Ok(Some(obj)) => self.inner.put(&key, obj).map(|_| true),
                // Deleted meanwhile.
                Ok(None) => Ok(false),
                Err(ObjectError::Corrupt { msg, .. }) => {
                    // Torn before any sync made it durable: nothing was promised.
                    tracing::warn!(key, msg, "dropping a torn staged block no fsync covered");
                    Ok(false)
                }
                Err(e) => Err(e),
            };
            let mut st = self.st.lock();
            st.uploading -= 1;
            match r {
                Ok(_) => {
                    backoff.reset();
                    // Unless it was deleted and staged again meanwhile (keys are never
                    // reused, but a retry of the same put is possible).
                    if st.staged.get(&key).is_some_and(|v| v.0 == seq) {
                        let (_, len) = st.staged.remove(&key).expect("present");
                        self.pinned.fetch_sub(len, Ordering::Relaxed);
                        let _ = fs::remove_file(self.path(&key));
                    }
                    self.cv.notify_all();
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "upload of a staged block failed; retrying");
                    if st.staged.get(&key).is_some_and(|v| v.0 == seq) {
                        st.queue.insert(seq, key);
                    }
                    // Waited out under the lock's condition variable, so that shutdown
                    // (which joins this thread) need not wait for the store to come back.
                    // (No deadline or attempt limit: there is always a next wait.)
                    if let Some(wait) = backoff.next_wait() {
                        let until = Instant::now() + wait;
                        while !self.stop.load(Ordering::Acquire) {
                            if self.cv.wait_until(&mut st, until).timed_out() {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    fn stage(&self, key: &str, data: &Bytes) -> io::Result<u64> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!("{seq}"));
        let mut f = File::create(&tmp)?;
        f.write_all(&file::header(MAGIC, data))?;
        f.write_all(data)?;
        drop(f);
        let dst = self.path(key);
        fs::rename(&tmp, &dst)?;
        Ok(seq)
    }
}

impl ObjectStore for Staging {
    fn describe(&self) -> String {
        format!("{} (writeback)", self.sh.inner.describe())
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let sh = &self.sh;
        let len = (HEADER + data.len()) as u64;
        {
            let end = Instant::now() + ROOM_WAIT;
            let mut st = sh.st.lock();
            while sh.pinned.load(Ordering::Relaxed) + len > sh.limit && !st.staged.is_empty() {
                if Instant::now() > end {
                    drop(st);
                    // The uploads are stuck: the store decides (and reports) this one.
                    return sh.inner.put(key, data);
                }
                sh.cv.wait_for(&mut st, Duration::from_millis(200));
            }
        }
        let seq = match sh.stage(key, &data) {
            Ok(s) => s,
            Err(e) => {
                // A failing cache disk must not fail writes: upload directly.
                tracing::warn!(error = %e, "cannot stage a block; uploading it directly");
                return sh.inner.put(key, data);
            }
        };
        let mut st = sh.st.lock();
        if let Some((old, olen)) = st.staged.insert(key.to_string(), (seq, len)) {
            // The same key staged again (a retried put): one file, one upload.
            st.queue.remove(&old);
            sh.pinned.fetch_sub(olen, Ordering::Relaxed);
        }
        sh.pinned.fetch_add(len, Ordering::Relaxed);
        st.queue.insert(seq, key.to_string());
        let p = sh.path(key);
        st.unsynced.push(p);
        drop(st);
        sh.cv.notify_one();
        Ok(())
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        if self.sh.st.lock().staged.contains_key(key) {
            if let Some(obj) = self.sh.read(key)? {
                let a = (off as usize).min(obj.len());
                let b = match len {
                    Some(n) => (a + n as usize).min(obj.len()),
                    None => obj.len(),
                };
                return Ok(obj.slice(a..b));
            }
        }
        self.sh.inner.get(key, off, len)
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        if let Some((_, len)) = self.sh.st.lock().staged.get(key) {
            return Ok(ObjectInfo {
                key: key.to_string(),
                size: len - HEADER as u64,
                modified: Some(std::time::SystemTime::now()),
            });
        }
        self.sh.inner.head(key)
    }

    fn delete(&self, key: &str) -> Result<()> {
        {
            let mut st = self.sh.st.lock();
            if let Some((seq, len)) = st.staged.remove(key) {
                st.queue.remove(&seq);
                self.sh.pinned.fetch_sub(len, Ordering::Relaxed);
                let _ = fs::remove_file(self.sh.path(key));
            }
        }
        // It may have been uploaded already (or be being uploaded: then the uploader finds
        // it gone from `staged` and the store's copy is deleted here or by gc).
        self.sh.inner.delete(key)
    }

    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        let mut v = self.sh.inner.list(prefix, start_after, limit)?;
        {
            let st = self.sh.st.lock();
            for (k, (_, len)) in &st.staged {
                if k.starts_with(prefix)
                    && k.as_str() > start_after
                    && !v.iter().any(|o| &o.key == k)
                {
                    v.push(ObjectInfo {
                        key: k.clone(),
                        size: len - HEADER as u64,
                        modified: Some(std::time::SystemTime::now()),
                    });
                }
            }
        }
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v.truncate(limit);
        Ok(v)
    }

    fn sync(&self) -> Result<()> {
        let files = std::mem::take(&mut self.sh.st.lock().unsynced);
        if files.is_empty() {
            return Ok(());
        }
        let mut failed = None;
        for p in &files {
            match File::open(p).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Uploaded (and removed) meanwhile: the store has it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let dir = File::open(&self.sh.dir).and_then(|d| d.sync_all());
        if let Some(e) = failed.or(dir.err()) {
            // Synced again next time; the caller reports this one.
            self.sh.st.lock().unsynced.extend(files);
            return Err(io_err(&self.sh.dir, "sync", "", e));
        }
        Ok(())
    }

    fn puts_need_sync(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aquifer_object::{FaultStore, MemStore};

    fn open(dir: &Path, inner: Arc<dyn ObjectStore>, limit: u64) -> Arc<Staging> {
        Staging::open(dir, inner, 2, limit, Arc::new(AtomicU64::new(0))).unwrap()
    }

    fn wait_empty(s: &Staging) {
        let end = Instant::now() + Duration::from_secs(10);
        while s.backlog().0 > 0 {
            assert!(Instant::now() < end, "backlog not uploaded");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn puts_are_staged_while_the_store_is_down_and_uploaded_when_it_is_back() {
        let d = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemStore::new());
        let store = Arc::new(FaultStore::new(mem.clone()));
        store.set_down(true);
        let s = open(d.path(), store.clone(), 1 << 30);
        s.put("chunks/0/0/1_0_3", Bytes::from_static(b"abc"))
            .unwrap();
        s.sync().unwrap();
        assert_eq!(s.backlog().0, 1);
        // Served from the staging file.
        assert_eq!(&s.get("chunks/0/0/1_0_3", 1, Some(2)).unwrap()[..], b"bc");
        store.set_down(false);
        wait_empty(&s);
        assert_eq!(&mem.get("chunks/0/0/1_0_3", 0, None).unwrap()[..], b"abc");
    }

    #[test]
    fn blocks_staged_before_a_crash_are_uploaded_oldest_first_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemStore::new());
        let down = Arc::new(FaultStore::new(mem.clone()));
        down.set_down(true);
        {
            let s = open(d.path(), down.clone(), 1 << 30);
            for i in 0..5 {
                s.put(&format!("k{i}"), Bytes::from(vec![i as u8; 100]))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            s.sync().unwrap();
            // A crash: no shutdown, the files stay.
            std::mem::forget(s);
        }
        // A torn file no sync covered is dropped, not uploaded.
        fs::write(d.path().join("torn"), b"AQST\x01\x00garbage").unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        struct Recording(Arc<MemStore>, Arc<Mutex<Vec<String>>>);
        impl ObjectStore for Recording {
            fn describe(&self) -> String {
                "rec".into()
            }
            fn put(&self, key: &str, data: Bytes) -> Result<()> {
                self.1.lock().push(key.to_string());
                self.0.put(key, data)
            }
            fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
                self.0.get(key, off, len)
            }
            fn head(&self, key: &str) -> Result<ObjectInfo> {
                self.0.head(key)
            }
            fn delete(&self, key: &str) -> Result<()> {
                self.0.delete(key)
            }
            fn list(&self, p: &str, s: &str, l: usize) -> Result<Vec<ObjectInfo>> {
                self.0.list(p, s, l)
            }
        }
        let rec = Arc::new(Recording(mem.clone(), order.clone()));
        let s = Staging::open(d.path(), rec, 1, 1 << 30, Arc::new(AtomicU64::new(0))).unwrap();
        wait_empty(&s);
        assert_eq!(*order.lock(), vec!["k0", "k1", "k2", "k3", "k4"]);
        assert!(mem.get("torn", 0, None).is_err());
    }

    #[test]
    fn puts_wait_for_room_and_deletes_cancel_uploads() {
        let d = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemStore::new());
        let store = Arc::new(FaultStore::new(mem.clone()));
        store.set_down(true);
        let pinned = Arc::new(AtomicU64::new(0));
        let s = Staging::open(d.path(), store.clone(), 1, 300, pinned.clone()).unwrap();
        s.put("a", Bytes::from(vec![1u8; 200])).unwrap();
        assert_eq!(pinned.load(Ordering::Relaxed), 216);
        // Over the limit: this put waits until the store is back and `a` is uploaded.
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.put("b", Bytes::from(vec![2u8; 200])));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!t.is_finished(), "a put past the limit did not wait");
        store.set_down(false);
        t.join().unwrap().unwrap();
        s.delete("b").unwrap();
        wait_empty(&s);
        assert!(mem.get("a", 0, None).is_ok());
        assert!(
            mem.get("b", 0, None).is_err(),
            "a deleted block was uploaded"
        );
        assert_eq!(pinned.load(Ordering::Relaxed), 0);
    }
}
