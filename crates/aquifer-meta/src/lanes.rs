//! Knowing whether a commit whose answer was lost was applied.
//!
//! On an engine over a network ([`KvEngine::may_lose_replies`]) a commit can be applied
//! while its answer never arrives (a timeout after the server ran it, a reset connection, a
//! failover). Running the transaction again would then see its own result and take it for
//! someone else's: a rename reports ENOENT, `RENAME_EXCHANGE` swaps back, a compaction
//! deletes the slices it has just committed. So every writing transaction of such an engine
//! also moves a *lane*: a key of this client (`W` client lane) that it expects to hold the
//! lane's last value and sets to the next one, in the same commit. A lane serves one
//! transaction at a time, so its expected value is always known here.
//!
//! When a commit's outcome is unknown, a *fence* reads the lane: the transaction's value
//! means it was applied; the lane's old value means it was not, and the fence moves the
//! lane to an "aborted" value in its own commit — so that commit, should it still reach the
//! server late (a queued request, a paused server), finds the lane moved and applies
//! nothing. Either way the outcome is then known, and the transaction runs again only when
//! it was not applied.
//!
//! Lanes cost one key per concurrent transaction of a client (a hash field on Redis),
//! written with each commit; embedded engines, whose answers cannot be lost, use none.

use crate::encoding as key;
use crate::error::{MetaError, Result};
use crate::kv::KvEngine;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

const APPLIED: u8 = 1;
/// How long a fence keeps trying once it has tried three times.
const FENCE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
const ABORTED: u8 = 0;

/// One lane: its id and the value its key holds now (`None`: never written).
pub(crate) struct Lane {
    id: u32,
    cur: Option<Vec<u8>>,
    seq: u64,
}

impl Lane {
    fn value(seq: u64, status: u8) -> Vec<u8> {
        let mut v = seq.to_be_bytes().to_vec();
        v.push(status);
        v
    }

    /// What the lane holds now, which a commit moving it must still find.
    pub(crate) fn expected(&self) -> Option<Vec<u8>> {
        self.cur.clone()
    }

    /// The value a commit of the lane's next transaction writes.
    pub(crate) fn next(&self) -> Vec<u8> {
        Self::value(self.seq + 1, APPLIED)
    }

    fn aborted(&self) -> Vec<u8> {
        Self::value(self.seq + 1, ABORTED)
    }

    /// The lane was found holding `v` by a transaction's own read (after a failover to a
    /// server that lost changes it had acknowledged, it can be behind): that transaction
    /// expected it, and a fence of it must too.
    pub(crate) fn found(&mut self, v: Option<Vec<u8>>) {
        self.cur = v;
    }

    /// The lane's transaction committed (or was found applied).
    pub(crate) fn advance(&mut self) {
        self.cur = Some(self.next());
        self.seq += 1;
    }

    /// The lane's transaction was fenced off: it never applies.
    fn abort(&mut self) {
        self.cur = Some(self.aborted());
        self.seq += 1;
    }
}

/// The lanes of one client.
pub(crate) struct Lanes {
    /// Random: names this client's lanes, unique among the volume's clients.
    client: u64,
    free: Mutex<Vec<Lane>>,
    /// Every lane's value as this client knows it, and, while a transaction holds it, the
    /// values that transaction may leave there: a check of the server against them stays
    /// true whatever transactions run meanwhile.
    known: Mutex<std::collections::HashMap<u32, Known>>,
    next_id: AtomicU32,
    /// How long a fence keeps trying before the outcome stays unknown.
    pub(crate) fence_deadline: std::time::Duration,
}

struct Known {
    cur: Option<Vec<u8>>,
    /// While in use: what its transaction writes, or its fence.
    pending: Option<(Vec<u8>, Vec<u8>)>,
}

/// What a fence learnt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fenced {
    Applied,
    NotApplied,
    /// The lane held neither what this client left there nor what the transaction wrote:
    /// the server lost changes it had acknowledged (a failover) or the lane was removed (the
    /// session was taken for dead). Whether the transaction applied is unknowable; it was
    /// fenced off all the same.
    Behind,
}

impl Lanes {
    pub(crate) fn new() -> Self {
        // RandomState is seeded from the OS once per process and varied per instance; the
        // time and pid make clients of different processes and hosts differ too.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.write_u32(std::process::id());
        // And bytes from the kernel's generator, read as a file: a clock or a random call
        // a test replaces (libfaketime) must not make two clients one.
        let mut b = [0u8; 8];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            if f.read_exact(&mut b).is_ok() {
                h.write(&b);
            }
        }
        Lanes {
            client: h.finish() | 1,
            free: Mutex::new(Vec::new()),
            known: Mutex::new(std::collections::HashMap::new()),
            next_id: AtomicU32::new(0),
            fence_deadline: FENCE_DEADLINE,
        }
    }

    /// Whether the server holds what this client knows of its lanes: each lane idle holds
    /// its last value; one in use holds that or what its transaction (or fence) writes.
    /// Lanes are not handed out while the server is read, so the answer is not disturbed
    /// by transactions running meanwhile.
    pub(crate) fn check<E: KvEngine>(&self, kv: &E) -> Result<bool> {
        let free = self.free.lock().unwrap();
        let known = self.known.lock().unwrap();
        let ids: Vec<u32> = known.keys().copied().collect();
        let keys: Vec<Vec<u8>> = ids.iter().map(|&id| key::lane(self.client, id)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let got = kv.get_many(&refs)?;
        drop(free);
        Ok(ids.iter().zip(got).all(|(id, v)| {
            let k = &known[id];
            v == k.cur
                || k.pending
                    .as_ref()
                    .is_some_and(|(n, a)| v.as_ref() == Some(n) || v.as_ref() == Some(a))
        }))
    }

    pub(crate) fn client(&self) -> u64 {
        self.client
    }

    /// A lane no other transaction of this client uses until it is given back.
    pub(crate) fn take(&self) -> Lane {
        let mut free = self.free.lock().unwrap();
        let lane = free.pop().unwrap_or_else(|| Lane {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cur: None,
            seq: 0,
        });
        self.known.lock().unwrap().insert(
            lane.id,
            Known {
                cur: lane.cur.clone(),
                pending: Some((lane.next(), lane.aborted())),
            },
        );
        lane
    }

    /// Give a lane back whose value is known. (A lane whose fence failed is dropped
    /// instead: what it holds is unknown, and a later commit expecting a wrong value would
    /// never apply.)
    pub(crate) fn give_back(&self, lane: Lane) {
        let mut free = self.free.lock().unwrap();
        self.known.lock().unwrap().insert(
            lane.id,
            Known {
                cur: lane.cur.clone(),
                pending: None,
            },
        );
        free.push(lane);
    }

    /// A lane whose value is unknown is never used again, nor checked.
    pub(crate) fn drop_lane(&self, lane: Lane) {
        self.known.lock().unwrap().remove(&lane.id);
    }

    /// The lanes' keys were deleted (the session closed): start again from none.
    pub(crate) fn forget(&self) {
        self.free.lock().unwrap().clear();
        self.known.lock().unwrap().clear();
        self.next_id.store(0, Ordering::Relaxed);
    }

    pub(crate) fn key(&self, lane: &Lane) -> Vec<u8> {
        key::lane(self.client, lane.id)
    }

    /// Find out whether the commit of `lane`'s transaction was applied, and make sure that
    /// it never is when it was not: [`Fenced`]. An error leaves the outcome unknown.
    pub(crate) fn fence<E: KvEngine>(&self, kv: &E, lane: &mut Lane) -> Result<Fenced> {
        let k = self.key(lane);
        let (cur, next, aborted) = (lane.expected(), lane.next(), lane.aborted());
        let mut found = None;
        let mut last = None;
        // A fence whose own answer is lost is run again: it reads what it did. Each try
        // waits out the engine's own retry deadline; after a minute the outcome stays
        // unknown.
        let mut backoff = aquifer_retry::RetryPolicy::new(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(1),
        )
        .start();
        for tries in 0.. {
            // At least three tries, however long each took.
            if tries >= 3 && backoff.elapsed() > self.fence_deadline {
                break;
            }
            if tries > 0 {
                backoff.wait();
            }
            let r = kv.txn(&mut |t| {
                let v = t.get(&k)?;
                found = if v.as_ref() == Some(&next) {
                    Some(Fenced::Applied)
                } else if v.as_ref() == Some(&aborted) {
                    // An earlier try of this fence, whose answer was lost.
                    Some(Fenced::NotApplied)
                } else {
                    t.set(&k, aborted.clone());
                    Some(if v == cur {
                        Fenced::NotApplied
                    } else {
                        tracing::warn!(
                            lane = %format!("{:x}/{}", self.client, lane.id),
                            found = %show(v.as_deref()),
                            left = %show(cur.as_deref()),
                            "a transaction lane is behind: the metadata server lost changes it had acknowledged (a failover?), or the session was taken for dead"
                        );
                        Fenced::Behind
                    })
                };
                Ok(())
            });
            match r {
                Ok(()) => {
                    let f = found.take().unwrap_or(Fenced::NotApplied);
                    if f == Fenced::Applied {
                        lane.advance();
                    } else {
                        lane.abort();
                    }
                    return Ok(f);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| MetaError::ambiguous(kv.name(), "fence did not run")))
    }
}

/// A lane value for messages: its sequence number and whether it applied.
fn show(v: Option<&[u8]>) -> String {
    match v {
        None => "nothing".into(),
        Some(v) if v.len() == 9 => {
            let seq = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            format!("#{seq}{}", if v[8] == APPLIED { "" } else { " (aborted)" })
        }
        Some(v) => format!("{} bytes", v.len()),
    }
}
