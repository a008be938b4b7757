//! Caches kept true by following the volume's changes ([`Volume::follow`](crate::Volume)).
//!
//! On a shared engine a client caches slice lists, so a read of an open file costs no round
//! trip. Without a feed the cache holds only between opens: each open drops the inode's
//! lists (close-to-open). With the engine's change feed followed ([`KvEngine::feed`]), a
//! change another client commits drops them as soon as the feed brings it (a Redis round
//! trip after the commit), so an open keeps them — but only while the follower keeps up:
//! once it has not heard from the engine for [`LIVE`], or reports a gap, every list is
//! dropped and opens drop them again until it is back.

use super::KvMeta;
use crate::encoding as key;
use crate::error::Result;
use crate::kv::{FeedBatch, KvEngine, KvFeed};
use crate::types::{Attr, Ino, Slice, Time};
use crate::{Change, Follower};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Inodes whose slice lists are cached at most (then the cache starts over).
const CHUNK_CACHE_INODES: usize = 16384;

/// How long after its last answer from the engine a follower is trusted to have told
/// everything: a follower blocks in the engine for at most a second at a time, so one that
/// has not answered for this long is cut off or stalled.
pub(crate) const LIVE: Duration = Duration::from_secs(2);

/// Slice lists per inode and chunk; `gen` moves at every drop, so a list read while a
/// change was being dropped is not cached.
#[derive(Default)]
pub(crate) struct ChunkCache {
    map: Mutex<HashMap<Ino, HashMap<u32, Vec<Slice>>>>,
    gen: AtomicU64,
    /// Length, mtime and ctime of each inode at its last open here.
    stamps: Mutex<HashMap<Ino, (u64, Time, Time)>>,
}

impl ChunkCache {
    /// An open read `a` for `ino`: whether it differs from what the last open here read
    /// (or there was none), i.e. whether kept slice lists may be older than the file.
    pub(crate) fn opened(&self, ino: Ino, a: &Attr) -> bool {
        let stamp = (a.length, a.mtime, a.ctime);
        let mut s = self.stamps.lock().unwrap();
        if s.len() >= 4 * CHUNK_CACHE_INODES && !s.contains_key(&ino) {
            s.clear();
        }
        s.insert(ino, stamp) != Some(stamp)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    pub(crate) fn get(&self, ino: Ino, idx: u32) -> Option<Vec<Slice>> {
        self.map
            .lock()
            .unwrap()
            .get(&ino)
            .and_then(|m| m.get(&idx))
            .cloned()
    }

    /// Keep `list`, read when the generation was `generation`, unless something was dropped
    /// since.
    pub(crate) fn put(&self, generation: u64, ino: Ino, idx: u32, list: Vec<Slice>) {
        let mut c = self.map.lock().unwrap();
        if self.gen.load(Ordering::Acquire) != generation {
            return;
        }
        if c.len() >= CHUNK_CACHE_INODES {
            c.clear();
        }
        c.entry(ino).or_default().insert(idx, list);
    }

    pub(crate) fn forget(&self, ino: Ino) {
        let mut c = self.map.lock().unwrap();
        self.gen.fetch_add(1, Ordering::AcqRel);
        c.remove(&ino);
    }

    pub(crate) fn clear(&self) {
        let mut c = self.map.lock().unwrap();
        self.gen.fetch_add(1, Ordering::AcqRel);
        c.clear();
    }
}

/// Whether this client follows the feed and is up to date with it.
pub(crate) struct Following {
    born: Instant,
    /// When the follower last heard from the engine, in ms since `born` (0: not following).
    heard_ms: AtomicU64,
}

impl Default for Following {
    fn default() -> Self {
        Following {
            born: Instant::now(),
            heard_ms: AtomicU64::new(0),
        }
    }
}

impl Following {
    fn heard(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.heard_ms.store(ms.max(1), Ordering::Release);
    }

    fn lost(&self) {
        self.heard_ms.store(0, Ordering::Release);
    }

    /// The follower has heard from the engine within [`LIVE`]: what it has not reported
    /// did not happen longer ago than that.
    pub(crate) fn live(&self) -> bool {
        let h = self.heard_ms.load(Ordering::Acquire);
        h != 0 && self.born.elapsed().as_millis() as u64 <= h + LIVE.as_millis() as u64
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// Whether caches may be kept across opens: the follower keeps them true.
    pub(super) fn followed(&self) -> bool {
        self.following.live()
    }

    pub(super) fn new_follower(&self) -> Option<Box<dyn Follower>> {
        let feed = self.kv.feed()?;
        Some(Box::new(KvFollower {
            feed,
            own: self.kv.may_lose_replies().then(|| self.lanes.client()),
            chunks: self.chunks.clone(),
            following: self.following.clone(),
        }))
    }
}

struct KvFollower {
    feed: Box<dyn KvFeed>,
    /// This client's lane id: its own commits carry it, and are not reported back to it.
    own: Option<u64>,
    chunks: Arc<ChunkCache>,
    following: Arc<Following>,
}

/// What a commit's followed keys changed, unless the commit is `own`'s.
fn changes_of(keys: &[Vec<u8>], own: Option<u64>, out: &mut Vec<Change>) {
    if own.is_some_and(|c| {
        keys.iter()
            .any(|k| key::is_lane(k) && key::u64_at(k, 1) == c)
    }) {
        return;
    }
    for k in keys {
        let ino = key::u64_at(k, 1);
        match k.first() {
            Some(b'I') if k.len() == 9 => out.push(Change::Attr(ino)),
            Some(b'E') if k.len() > 9 => out.push(Change::Entry(ino, k[9..].to_vec())),
            Some(b'C') if k.len() == 13 => out.push(Change::Data(ino)),
            _ => {}
        }
    }
}

impl Follower for KvFollower {
    fn next(&mut self, wait: Duration) -> Result<Vec<Change>> {
        let batch = match self.feed.next(wait) {
            Ok(b) => b,
            Err(e) => {
                self.following.lost();
                self.chunks.clear();
                return Err(e);
            }
        };
        let out = match batch {
            FeedBatch::Gap => {
                self.chunks.clear();
                vec![Change::Everything]
            }
            FeedBatch::Commits(commits) => {
                let mut all = Vec::new();
                for keys in &commits {
                    changes_of(keys, self.own, &mut all);
                }
                let mut seen = HashSet::new();
                all.retain(|c| seen.insert(c.clone()));
                for c in &all {
                    if let Change::Data(ino) = c {
                        self.chunks.forget(*ino);
                    }
                }
                all
            }
        };
        // Only now: what it reports is dropped here first.
        self.following.heard();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_becomes_changes_and_own_commits_are_skipped() {
        let keys = vec![
            key::attr(7),
            key::dentry(1, b"name"),
            key::chunk(7, 3),
            key::lane(42, 1),
            key::holder(7, 9),
        ];
        let mut out = Vec::new();
        changes_of(&keys, Some(41), &mut out);
        assert_eq!(
            out,
            vec![
                Change::Attr(7),
                Change::Entry(1, b"name".to_vec()),
                Change::Data(7)
            ]
        );
        out.clear();
        changes_of(&keys, Some(42), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_follower_is_live_only_while_it_hears_from_the_engine() {
        let f = Following::default();
        assert!(!f.live());
        f.heard();
        assert!(f.live());
        f.lost();
        assert!(!f.live());
    }
}
