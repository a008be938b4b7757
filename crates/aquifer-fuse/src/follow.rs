//! What the kernel caches, and how it is kept true: the inodes and names the kernel was
//! given (counted as the kernel counts its lookups, forgotten when it forgets them), the
//! times it may keep them, and the thread that follows the volume's changes
//! ([`aquifer_meta::Follower`]) and tells the kernel what another mount changed (FUSE
//! notify: inval inode, inval entry).
//!
//! The kernel may keep attributes and names for long (`AUTO_TTL`) only while that holds:
//! on an engine nobody else changes (no follower: the kernel saw every change), or while
//! the follower is live. Otherwise replies carry the short time. A reply built from what
//! was read before an invalidation that is sent while it is on its way carries the short
//! time too (`Kernel::ttls` with the invalidation count taken before the read), so a stale
//! answer is never cached for long.

use fuser::INodeNo;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Kernel cache times when the options leave them to the mount and the caches are kept
/// true by invalidation.
pub const AUTO_TTL: Duration = Duration::from_secs(3600);
/// ... and when they are not (a follower cut off from the engine): the old default.
pub const SHORT_TTL: Duration = Duration::from_secs(1);
/// A follower that has not heard from the engine for this long is not live.
const LIVE: Duration = Duration::from_secs(2);
/// Names kept per inode (hard links beyond are rare; their names expire on their own).
const NAMES_MAX: usize = 4;
/// Names this mount renamed to, kept for a gap (the kernel moved its entries there).
const RENAMED_MAX: usize = 65536;
const SHARDS: usize = 16;

/// A name the kernel found an inode under: the parent directory and the name.
type Name = (u64, Box<[u8]>);

#[derive(Default)]
struct Known {
    /// The kernel's lookup count.
    lookups: u64,
    /// (parent, name) the kernel found it under.
    names: Vec<Name>,
}

/// Cache times as the options give them: `None` leaves one to the mount.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    pub attr: Option<Duration>,
    pub entry: Option<Duration>,
}

pub(crate) struct Kernel {
    known: Vec<Mutex<HashMap<u64, Known>>>,
    /// Names renamed to on this mount, newest last.
    renamed: Mutex<std::collections::VecDeque<Name>>,
    /// The invalidation count when each open directory listing started.
    listings: Mutex<HashMap<u64, u64>>,
    /// Invalidations sent so far.
    gen: AtomicU64,
    ttls: Ttls,
    /// A follower runs (a shared engine); None: the engine is this mount's alone.
    following: AtomicBool,
    born: Instant,
    /// When the follower last heard from the engine (ms since `born`; 0: never).
    heard_ms: AtomicU64,
    pub(crate) stop: AtomicBool,
    /// No open asks the daemon (no-open mode): while the follower cannot follow, the
    /// kernel's pages are dropped every second instead, as no open would check them.
    pub(crate) no_open: AtomicBool,
}

impl Kernel {
    pub(crate) fn new(ttls: Ttls) -> Kernel {
        Kernel {
            known: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            renamed: Mutex::new(Default::default()),
            listings: Mutex::new(HashMap::new()),
            gen: AtomicU64::new(0),
            ttls,
            following: AtomicBool::new(false),
            born: Instant::now(),
            heard_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            no_open: AtomicBool::new(false),
        }
    }

    fn shard(&self, ino: u64) -> MutexGuard<'_, HashMap<u64, Known>> {
        self.known[(ino as usize) % SHARDS].lock().unwrap()
    }

    /// The invalidation count, taken before reading what a reply will carry.
    pub(crate) fn snapshot(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Whether the kernel may keep what a reply carries for long.
    fn trusted(&self, snap: u64) -> bool {
        if self.gen.load(Ordering::Acquire) != snap {
            return false;
        }
        if !self.following.load(Ordering::Acquire) {
            return true;
        }
        let h = self.heard_ms.load(Ordering::Acquire);
        h != 0 && (self.born.elapsed().as_millis() as u64) <= h + LIVE.as_millis() as u64
    }

    /// Attribute and entry times for a reply built from what was read after `snap`.
    pub(crate) fn ttls(&self, snap: u64) -> (Duration, Duration) {
        let auto = if self.trusted(snap) {
            AUTO_TTL
        } else {
            SHORT_TTL
        };
        (
            self.ttls.attr.unwrap_or(auto),
            self.ttls.entry.unwrap_or(auto),
        )
    }

    /// The short attribute time (the options' if they give one).
    pub(crate) fn short_attr(&self) -> Duration {
        self.ttls.attr.unwrap_or(SHORT_TTL)
    }

    /// A directory listing `fh` started after `snap`.
    pub(crate) fn listing_opened(&self, fh: u64, snap: u64) {
        let mut l = self.listings.lock().unwrap();
        if l.len() > 65536 {
            // Handles the kernel never released (none should be): their replies go short.
            l.clear();
        }
        l.insert(fh, snap);
    }

    pub(crate) fn listing_closed(&self, fh: u64) {
        self.listings.lock().unwrap().remove(&fh);
    }

    /// The invalidation count when listing `fh` started (0, the oldest, if unknown).
    pub(crate) fn listing_snapshot(&self, fh: u64) -> u64 {
        self.listings.lock().unwrap().get(&fh).copied().unwrap_or(0)
    }

    /// This mount renamed something to `name` in `parent`.
    pub(crate) fn renamed(&self, parent: u64, name: &[u8]) {
        if !self.following.load(Ordering::Acquire) {
            return;
        }
        let mut r = self.renamed.lock().unwrap();
        if r.len() >= RENAMED_MAX {
            r.pop_front();
        }
        r.push_back((parent, name.into()));
    }

    /// The kernel was given `ino` under `name` in `parent` (one lookup). Tracked only where
    /// a follower may have to invalidate everything.
    pub(crate) fn looked_up(&self, parent: u64, name: &[u8], ino: u64) {
        if ino == fuser::INodeNo::ROOT.0 || !self.following.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.shard(ino);
        let k = s.entry(ino).or_default();
        k.lookups += 1;
        if k.names.len() < NAMES_MAX && !k.names.iter().any(|(p, n)| *p == parent && **n == *name) {
            k.names.push((parent, name.into()));
        }
    }

    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut s = self.shard(ino);
        if let Some(k) = s.get_mut(&ino) {
            k.lookups = k.lookups.saturating_sub(n);
            if k.lookups == 0 {
                s.remove(&ino);
            }
        }
    }

    /// Every known inode and name (a gap: all of it is invalidated).
    fn everything(&self) -> (Vec<u64>, Vec<Name>) {
        let (mut inos, mut names) = (vec![fuser::INodeNo::ROOT.0], Vec::new());
        names.extend(self.renamed.lock().unwrap().drain(..));
        for s in &self.known {
            for (ino, k) in s.lock().unwrap().iter() {
                inos.push(*ino);
                names.extend(k.names.iter().cloned());
            }
        }
        (inos, names)
    }

    fn heard(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.heard_ms.store(ms.max(1), Ordering::Release);
    }
}

/// Follow the volume's changes until the mount ends, telling the kernel what changed.
pub(crate) fn spawn_follower(
    kernel: Arc<Kernel>,
    counters: Arc<crate::FuseCounters>,
    mut follower: Box<dyn aquifer_meta::Follower>,
    notifier: fuser::Notifier,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    kernel.following.store(true, Ordering::Release);
    std::thread::Builder::new()
        .name("fuse-follow".into())
        .spawn(move || {
            let mut warned = false;
            let mut dropped = Instant::now();
            while !kernel.stop.load(Ordering::Acquire) {
                match follower.next(Duration::from_secs(1)) {
                    Ok(changes) => {
                        if warned {
                            tracing::info!("following the volume's changes again");
                            warned = false;
                        }
                        let sent = tell(&kernel, &notifier, &changes);
                        counters.invalidations.fetch_add(sent, Ordering::Relaxed);
                        // Heard only once the kernel was told: trusted from here.
                        kernel.heard();
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "cannot follow the volume's changes; the kernel caches for 1 s until it can");
                            warned = true;
                        }
                        if kernel.no_open.load(Ordering::Acquire)
                            && dropped.elapsed() >= Duration::from_secs(1)
                        {
                            let all = [aquifer_meta::Change::Everything];
                            let sent = tell(&kernel, &notifier, &all);
                            counters.invalidations.fetch_add(sent, Ordering::Relaxed);
                            dropped = Instant::now();
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        })
}

/// Tell the kernel; the number of notifications sent.
fn tell(kernel: &Kernel, n: &fuser::Notifier, changes: &[aquifer_meta::Change]) -> u64 {
    use aquifer_meta::Change;
    if changes.is_empty() {
        return 0;
    }
    // First: replies built from reads before this point are not kept for long.
    kernel.gen.fetch_add(1, Ordering::AcqRel);
    // Answers are ignored: an inode or name the kernel does not hold is ENOENT, nothing to
    // drop.
    let inode = |ino: u64| {
        // Attributes and every cached page: a truncate and a write back to the same
        // length change bytes without changing the size.
        let _ = n.inval_inode(INodeNo(ino), 0, 0);
    };
    let entry = |parent: u64, name: &[u8]| {
        let _ = n.inval_entry(INodeNo(parent), OsStr::from_bytes(name));
    };
    let mut sent = 0u64;
    for c in changes {
        match c {
            Change::Attr(ino) | Change::Data(ino) => {
                inode(*ino);
                sent += 1;
            }
            Change::Entry(parent, name) => {
                entry(*parent, name);
                inode(*parent);
                sent += 2;
            }
            Change::Everything => {
                let (inos, names) = kernel.everything();
                for (p, name) in &names {
                    entry(*p, name);
                }
                for ino in &inos {
                    inode(*ino);
                }
                sent += (inos.len() + names.len()) as u64;
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_counted_and_forgotten() {
        let k = Kernel::new(Ttls {
            attr: None,
            entry: None,
        });
        // Not tracked where nothing follows (one mount of an embedded volume).
        k.looked_up(1, b"a", 5);
        assert_eq!(k.everything().0, vec![1]);
        k.following.store(true, Ordering::Release);
        k.looked_up(1, b"a", 5);
        k.renamed(1, b"moved");
        k.looked_up(1, b"a", 5);
        k.looked_up(2, b"b", 5);
        let (inos, names) = k.everything();
        assert_eq!(inos, vec![1, 5]);
        assert_eq!(names.len(), 3, "{names:?}");
        k.forget(5, 2);
        assert_eq!(k.everything().0, vec![1, 5]);
        k.forget(5, 1);
        assert_eq!(k.everything().0, vec![1]);
    }

    #[test]
    fn long_times_only_while_trusted() {
        let k = Kernel::new(Ttls {
            attr: None,
            entry: Some(Duration::from_secs(7)),
        });
        // An engine nobody else changes: long.
        let s = k.snapshot();
        assert_eq!(k.ttls(s), (AUTO_TTL, Duration::from_secs(7)));
        // An invalidation since the read: short.
        k.gen.fetch_add(1, Ordering::AcqRel);
        assert_eq!(k.ttls(s).0, SHORT_TTL);
        // A follower that has not heard from the engine: short; once it has: long.
        k.following.store(true, Ordering::Release);
        let s = k.snapshot();
        assert_eq!(k.ttls(s).0, SHORT_TTL);
        k.heard();
        assert_eq!(k.ttls(s).0, AUTO_TTL);
    }
}
