//! Liveness on the server's clock: clients whose own clocks are off, a reaper racing a
//! heartbeat, and what a reaped session's operations return. The engine is one shared
//! in-memory store seen through a clock the test sets (the metadata server's), so no test
//! waits for time to pass, except where today's behaviour needs the local clock to move.

use crate::conformance::{hosts, test_format, test_session};
use crate::kv::{EntryAttr, KvEngine, KvPair, KvRead, KvTxn, MemKv};
use crate::*;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Hook = Box<dyn FnOnce() + Send>;

/// One client's view of a shared store whose clock the test sets. A hook may run another
/// client's step just before a given later transaction of this client.
struct ServerClock {
    kv: Arc<MemKv>,
    now: Arc<AtomicI64>,
    hook: Mutex<Option<(usize, Hook)>>,
    txns: AtomicUsize,
}

impl ServerClock {
    fn new(kv: &Arc<MemKv>, now: &Arc<AtomicI64>) -> Self {
        ServerClock {
            kv: kv.clone(),
            now: now.clone(),
            hook: Mutex::new(None),
            txns: AtomicUsize::new(0),
        }
    }

    /// Run `f` before the `n`th transaction from now (1: the next one).
    fn before_txn(&self, n: usize, f: impl FnOnce() + Send + 'static) {
        let at = self.txns.load(Ordering::SeqCst) + n;
        *self.hook.lock().unwrap() = Some((at, Box::new(f)));
    }
}

impl KvRead for ServerClock {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.kv.get(key)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.kv.get_many(keys)
    }
    fn get_entry_attr(&self, entry_key: &[u8]) -> Result<EntryAttr> {
        self.kv.get_entry_attr(entry_key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        self.kv.scan(start, end, limit)
    }
}

impl KvEngine for ServerClock {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let n = self.txns.fetch_add(1, Ordering::SeqCst) + 1;
        let due = {
            let mut h = self.hook.lock().unwrap();
            match h.take() {
                Some((at, f)) if at == n => Some(f),
                other => {
                    *h = other;
                    None
                }
            }
        };
        if let Some(hook) = due {
            hook();
        }
        self.kv.txn(f)
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn exclusive(&self) -> bool {
        false
    }
    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64> {
        self.kv.incr_by(key, delta)
    }
    fn clock(&self) -> Result<Time> {
        Ok(Time {
            sec: self.now.load(Ordering::SeqCst),
            nsec: 0,
        })
    }
}

fn client(kv: &Arc<MemKv>, now: &Arc<AtomicI64>, timeout: u64) -> KvMeta<ServerClock> {
    KvMeta::new(ServerClock::new(kv, now)).with_session_timeout(Duration::from_secs(timeout))
}

/// Clients "a" and "b" of one fresh volume on `kv`, their sessions started, timing out after
/// `timeout` seconds of the server's clock.
fn two_clients(
    kv: &Arc<MemKv>,
    now: &Arc<AtomicI64>,
    timeout: u64,
) -> (KvMeta<ServerClock>, KvMeta<ServerClock>) {
    let a = client(kv, now, timeout);
    let b = client(kv, now, timeout);
    a.format(&test_format(4 << 20), false).unwrap();
    a.new_session(test_session("a")).unwrap();
    b.new_session(test_session("b")).unwrap();
    (a, b)
}

fn errno<T: std::fmt::Debug>(r: Result<T>) -> Errno {
    r.expect_err("expected an error").errno()
}

/// The metadata server's clock is 5 minutes ahead of both clients' (as if they ran 5
/// minutes behind): heartbeats and the reaper go by the server's, so a session that
/// heartbeats keeps its lock and its open unlinked file, however long it runs; one whose
/// heartbeats stop is reaped after the timeout of server time, and from then on its
/// operations fail with EIO instead of acting on what it no longer holds.
#[test]
fn liveness_goes_by_the_server_clock_and_a_reaped_session_fails() {
    let kv = Arc::new(MemKv::shared());
    let start = Time::now().sec + 300;
    let now = Arc::new(AtomicI64::new(start));
    let (a, b) = two_clients(&kv, &now, 5);
    let ctx = Context::root();
    let (f, _) = a.create_open(&ctx, ROOT_INO, b"f", 0o644, 0).unwrap();
    b.unlink(&ctx, ROOT_INO, b"f").unwrap();
    let (l, _) = a.create_open(&ctx, ROOT_INO, b"l", 0o644, 0).unwrap();
    a.flock(l, 1, F_WRLCK).unwrap();

    // Thirty seconds of server time, both heartbeating every second of it.
    for _ in 0..30 {
        now.fetch_add(1, Ordering::SeqCst);
        a.heartbeat().unwrap();
        b.heartbeat().unwrap();
        assert_eq!(b.reap_now().unwrap(), 0, "nobody is dead");
    }
    assert_eq!(
        errno(b.flock(l, 2, F_WRLCK)),
        Errno::EAGAIN,
        "A keeps its lock"
    );
    assert!(b.getattr(f).is_ok(), "A's open unlinked file is kept");
    // The times shown are the server's.
    for s in b.list_sessions().unwrap() {
        assert_eq!(s.started, start, "{s:?}");
        assert_eq!(s.heartbeat, start + 30, "{s:?}");
        assert_eq!(s.timeout, 5, "{s:?}");
    }
    assert_eq!(b.clock().unwrap().sec, start + 30);

    // A stops heartbeating (stalled, partitioned); more than its timeout of server time
    // passes while B heartbeats.
    now.fetch_add(6, Ordering::SeqCst);
    b.heartbeat().unwrap();
    b.reap_now().unwrap();
    assert_eq!(hosts(&b), ["b"], "A's session is reaped");
    b.flock(l, 2, F_WRLCK).unwrap();
    assert_eq!(
        errno(b.getattr(f)),
        Errno::ENOENT,
        "A's unlinked file is freed"
    );

    // Before A has heartbeated again: what records something for A finds it gone.
    let (g, _) = b.create_open(&ctx, ROOT_INO, b"g", 0o644, 0).unwrap();
    assert_eq!(
        errno(a.flock(g, 1, F_WRLCK)),
        Errno::EIO,
        "no lock for a dead session"
    );
    // From then on A fails everything with EIO, and its heartbeat brings nothing back.
    a.heartbeat().unwrap();
    assert_eq!(
        hosts(&b),
        ["b"],
        "a heartbeat does not revive a reaped session"
    );
    assert_eq!(errno(a.flock(l, 1, F_UNLCK)), Errno::EIO);
    assert_eq!(errno(a.release_locks(l, 1)), Errno::EIO);
    assert_eq!(errno(a.getattr(ROOT_INO)), Errno::EIO);
    assert_eq!(errno(a.lookup(&ctx, ROOT_INO, b"g")), Errno::EIO);
    assert_eq!(errno(a.open(&ctx, g, libc::O_RDONLY)), Errno::EIO);
    assert_eq!(
        errno(a.mknod(&ctx, ROOT_INO, b"h", FileType::File, 0o644, 0, 0)),
        Errno::EIO
    );
    assert_eq!(errno(a.close(f)), Errno::EIO);
    assert!(b.getattr(g).is_ok() && b.lookup(&ctx, ROOT_INO, b"h").is_err());
    // A new session (a remount) works again.
    a.new_session(test_session("a2")).unwrap();
    assert!(a.getattr(ROOT_INO).is_ok());
    assert_eq!(hosts(&b), ["a2", "b"]);
}

/// A reaper that found a session's heartbeat stale must not clean up after it when the
/// session heartbeats between that look and the clean-up: the clean-up re-checks the
/// heartbeat in the transaction that marks the session reaped.
#[test]
fn a_heartbeat_racing_the_reaper_wins() {
    let kv = Arc::new(MemKv::shared());
    let now = Arc::new(AtomicI64::new(Time::now().sec));
    let (a, b) = two_clients(&kv, &now, 1);
    let a = Arc::new(a);
    let ctx = Context::root();
    let (f, _) = a.create_open(&ctx, ROOT_INO, b"f", 0o644, 0).unwrap();
    a.flock(f, 1, F_WRLCK).unwrap();
    // A misses its heartbeats for longer than the timeout, by the server's clock (and by
    // the local one, for clients that would read that).
    now.fetch_add(3, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2100));
    // B heartbeats (its first transaction) and looks for dead sessions; A's heartbeat
    // lands just before B's next transaction, the first one acting on what B found.
    let late = a.clone();
    b.engine_ref()
        .before_txn(2, move || late.heartbeat().unwrap());
    b.heartbeat().unwrap();
    assert_eq!(hosts(&b), ["a", "b"], "A heartbeated: it is alive");
    assert_eq!(
        errno(b.flock(f, 2, F_WRLCK)),
        Errno::EAGAIN,
        "A keeps its lock"
    );
    a.flock(f, 1, F_UNLCK).unwrap();
    a.close(f).unwrap();
}

/// A client that was stopped for longer than its timeout (SIGSTOP, a long pause) and
/// resumes does not act before its heartbeat thread runs: its first operation finds the
/// session reaped.
#[test]
fn a_resumed_client_looks_before_it_acts() {
    let kv = Arc::new(MemKv::shared());
    let now = Arc::new(AtomicI64::new(Time::now().sec));
    let (a, b) = two_clients(&kv, &now, 1);
    let ctx = Context::root();
    let (l, _) = a.create_open(&ctx, ROOT_INO, b"l", 0o644, 0).unwrap();
    a.flock(l, 1, F_WRLCK).unwrap();
    // A is stopped: no heartbeat of it for longer than the timeout, B reaps it.
    std::thread::sleep(Duration::from_millis(1100));
    now.fetch_add(3, Ordering::SeqCst);
    b.heartbeat().unwrap();
    b.reap_now().unwrap();
    assert_eq!(hosts(&b), ["b"]);
    b.flock(l, 2, F_WRLCK).unwrap();
    // A resumes; before any heartbeat of it, what it does fails.
    assert_eq!(errno(a.getattr(l)), Errno::EIO);
    assert_eq!(errno(a.lookup(&ctx, ROOT_INO, b"l")), Errno::EIO);
}
