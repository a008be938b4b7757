//! BSD (flock) and POSIX (fcntl) locks, kept in the metadata engine so that every mount of a
//! volume sees the same locks. Records are keyed by inode; an owner is (session, lock owner).
//! All operations are non-blocking: a conflict is EAGAIN, and a caller that wants to wait
//! retries.

use crate::error::{Errno, Result};

pub const F_RDLCK: i32 = libc::F_RDLCK;
pub const F_WRLCK: i32 = libc::F_WRLCK;
pub const F_UNLCK: i32 = libc::F_UNLCK;

/// A POSIX lock on the byte range `[start, end]` (inclusive; `end = u64::MAX` to the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PLock {
    pub typ: i32,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PRecord {
    pub sid: u64,
    pub owner: u64,
    pub lock: PLock,
}

const PREC_LEN: usize = 37;
const FREC_LEN: usize = 17;

fn typ_byte(t: i32) -> u8 {
    (t == F_WRLCK) as u8
}

fn byte_typ(b: u8) -> i32 {
    if b == 1 {
        F_WRLCK
    } else {
        F_RDLCK
    }
}

pub(crate) fn encode_plocks(recs: &[PRecord]) -> Vec<u8> {
    let mut v = Vec::with_capacity(recs.len() * PREC_LEN);
    for r in recs {
        v.extend_from_slice(&r.sid.to_be_bytes());
        v.extend_from_slice(&r.owner.to_be_bytes());
        v.push(typ_byte(r.lock.typ));
        v.extend_from_slice(&r.lock.start.to_be_bytes());
        v.extend_from_slice(&r.lock.end.to_be_bytes());
        v.extend_from_slice(&r.lock.pid.to_be_bytes());
    }
    v
}

pub(crate) fn decode_plocks(v: &[u8]) -> Vec<PRecord> {
    let u64_at = |b: &[u8], i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    v.chunks_exact(PREC_LEN)
        .map(|b| PRecord {
            sid: u64_at(b, 0),
            owner: u64_at(b, 8),
            lock: PLock {
                typ: byte_typ(b[16]),
                start: u64_at(b, 17),
                end: u64_at(b, 25),
                pid: u32::from_be_bytes(b[33..37].try_into().unwrap()),
            },
        })
        .collect()
}

/// (sid, owner, type) of whole-file BSD locks.
pub(crate) fn encode_flocks(recs: &[(u64, u64, i32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(recs.len() * FREC_LEN);
    for (sid, owner, typ) in recs {
        v.extend_from_slice(&sid.to_be_bytes());
        v.extend_from_slice(&owner.to_be_bytes());
        v.push(typ_byte(*typ));
    }
    v
}

pub(crate) fn decode_flocks(v: &[u8]) -> Vec<(u64, u64, i32)> {
    v.chunks_exact(FREC_LEN)
        .map(|b| {
            (
                u64::from_be_bytes(b[0..8].try_into().unwrap()),
                u64::from_be_bytes(b[8..16].try_into().unwrap()),
                byte_typ(b[16]),
            )
        })
        .collect()
}

fn overlaps(a: &PLock, b: &PLock) -> bool {
    a.start <= b.end && b.start <= a.end
}

/// The first lock of another owner that conflicts with `want`.
pub(crate) fn conflict(recs: &[PRecord], sid: u64, owner: u64, want: &PLock) -> Option<PLock> {
    recs.iter()
        .filter(|r| (r.sid, r.owner) != (sid, owner))
        .find(|r| overlaps(&r.lock, want) && (r.lock.typ == F_WRLCK || want.typ == F_WRLCK))
        .map(|r| r.lock)
}

/// Apply `want` (a lock or F_UNLCK) for one owner: its own records in the range are cut out,
/// then the new lock is added. Conflicts must have been checked.
pub(crate) fn apply(recs: Vec<PRecord>, sid: u64, owner: u64, want: PLock) -> Vec<PRecord> {
    let mut out = Vec::with_capacity(recs.len() + 2);
    for r in recs {
        if (r.sid, r.owner) != (sid, owner) || !overlaps(&r.lock, &want) {
            out.push(r);
            continue;
        }
        if r.lock.start < want.start {
            out.push(PRecord {
                lock: PLock {
                    end: want.start - 1,
                    ..r.lock
                },
                ..r
            });
        }
        if r.lock.end > want.end {
            out.push(PRecord {
                lock: PLock {
                    start: want.end + 1,
                    ..r.lock
                },
                ..r
            });
        }
    }
    if want.typ != F_UNLCK {
        out.push(PRecord {
            sid,
            owner,
            lock: want,
        });
    }
    out
}

pub(crate) fn check_range(lock: &PLock) -> Result<()> {
    if lock.start > lock.end || ![F_RDLCK, F_WRLCK, F_UNLCK].contains(&lock.typ) {
        return Err(Errno::EINVAL.into());
    }
    Ok(())
}

/// New BSD lock table for `(sid, owner)` asking for `typ`, or EAGAIN.
pub(crate) fn flock_apply(
    recs: Vec<(u64, u64, i32)>,
    sid: u64,
    owner: u64,
    typ: i32,
) -> Result<Vec<(u64, u64, i32)>> {
    if ![F_RDLCK, F_WRLCK, F_UNLCK].contains(&typ) {
        return Err(Errno::EINVAL.into());
    }
    let others = || recs.iter().filter(|r| (r.0, r.1) != (sid, owner));
    if typ == F_WRLCK && others().next().is_some()
        || typ == F_RDLCK && others().any(|r| r.2 == F_WRLCK)
    {
        return Err(Errno::EAGAIN.into());
    }
    let mut out: Vec<_> = others().copied().collect();
    if typ != F_UNLCK {
        out.push((sid, owner, typ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Byte-level reference model: for every byte, the lock type each owner holds.
        #[test]
        fn posix_locks_match_byte_model(ops in prop::collection::vec((0u64..3, 0i32..3, 0u64..40, 0u64..40), 1..40)) {
            let types = [F_RDLCK, F_WRLCK, F_UNLCK];
            let mut recs: Vec<PRecord> = Vec::new();
            let mut model = vec![[F_UNLCK; 3]; 40];
            for (owner, t, a, b) in ops {
                let (start, end) = (a.min(b), a.max(b));
                let want = PLock { typ: types[t as usize], start, end, pid: 0 };
                let model_conflict = (start..=end).any(|i| (0..3).any(|o| {
                    o != owner as usize && model[i as usize][o] != F_UNLCK
                        && (model[i as usize][o] == F_WRLCK || want.typ == F_WRLCK)
                }));
                let got = want.typ != F_UNLCK && conflict(&recs, 0, owner, &want).is_some();
                prop_assert_eq!(got, want.typ != F_UNLCK && model_conflict);
                if !got {
                    recs = apply(recs, 0, owner, want);
                    for i in start..=end { model[i as usize][owner as usize] = want.typ; }
                }
                // Records of one owner never overlap.
                for x in &recs { for y in &recs {
                    if x != y && x.owner == y.owner { prop_assert!(!overlaps(&x.lock, &y.lock)); }
                }}
                prop_assert_eq!(decode_plocks(&encode_plocks(&recs)), recs.clone());
            }
        }
    }
}
