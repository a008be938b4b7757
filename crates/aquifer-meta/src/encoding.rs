//! Key layout and value encodings. All integers are big-endian so keys sort numerically.
//!
//! | key                         | value                         |
//! |-----------------------------|-------------------------------|
//! | `setting`                   | volume [`Format`] as JSON     |
//! | `N` name                    | counter (i64)                 |
//! | `I` ino                     | attributes (varints, ~25 bytes) |
//! | `E` parent name             | type (1) + ino (8)            |
//! | `C` ino idx(u32)            | slice records, 24 bytes each  |
//! | `L` ino                     | symlink target                |
//! | `X` ino name                | xattr value                   |
//! | `T` seq                     | slice records to delete       |
//! | `S` sid                     | session info as JSON          |
//! | `O` sid ino                 | an inode session sid has open |
//! | `o` ino sid                 | the same, found from the inode |
//! | `F` ino                     | BSD locks (sid, owner, type)  |
//! | `P` ino                     | POSIX locks with ranges       |
//! | `K` sid ino                 | session sid holds locks on ino |
//! | `J` object key              | object bytes until the store has them durably |
//! | `W` client lane(u32)        | the lane's last commit: seq (8) + applied (1) (`lanes.rs`) |
//! | `R` sid                     | slice id ranges session sid may still commit (gc spares them) |
//!
//! Engines that keep related keys together (Redis: one hash per group) use [`group_len`] and
//! [`LISTED`]; the others store the keys as they are.
//!
//! [`Format`]: crate::Format

use crate::error::{MetaError, Result};
use crate::types::{Attr, FileType, Ino, Time};

pub const SETTING: &[u8] = b"setting";

pub fn counter(name: &str) -> Vec<u8> {
    let mut k = b"N".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn with_ino(tag: u8, ino: Ino) -> Vec<u8> {
    let mut k = Vec::with_capacity(32);
    k.push(tag);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn attr(ino: Ino) -> Vec<u8> {
    with_ino(b'I', ino)
}

pub fn dentry(parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = with_ino(b'E', parent);
    k.extend_from_slice(name);
    k
}

pub fn dentry_prefix(parent: Ino) -> Vec<u8> {
    with_ino(b'E', parent)
}

pub fn chunk(ino: Ino, idx: u32) -> Vec<u8> {
    let mut k = with_ino(b'C', ino);
    k.extend_from_slice(&idx.to_be_bytes());
    k
}

pub fn chunk_prefix(ino: Ino) -> Vec<u8> {
    with_ino(b'C', ino)
}

pub fn symlink(ino: Ino) -> Vec<u8> {
    with_ino(b'L', ino)
}

pub fn xattr(ino: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = with_ino(b'X', ino);
    k.extend_from_slice(name);
    k
}

pub fn xattr_prefix(ino: Ino) -> Vec<u8> {
    with_ino(b'X', ino)
}

pub fn journal(object: &str) -> Vec<u8> {
    let mut k = b"J".to_vec();
    k.extend_from_slice(object.as_bytes());
    k
}

pub fn trash(seq: u64) -> Vec<u8> {
    with_ino(b'T', seq)
}

pub fn session(sid: u64) -> Vec<u8> {
    with_ino(b'S', sid)
}

/// The slice ids session `sid` has reserved and may still commit (see
/// [`crate::Chunks::live_slice_ranges`]).
pub fn reserved_slices(sid: u64) -> Vec<u8> {
    with_ino(b'R', sid)
}

/// Ranges `[start, end)` of slice ids as stored under [`reserved_slices`]: pairs of u64.
pub fn encode_ranges(ranges: &[std::ops::Range<u64>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranges.len() * 16);
    for r in ranges {
        out.extend_from_slice(&r.start.to_be_bytes());
        out.extend_from_slice(&r.end.to_be_bytes());
    }
    out
}

/// The ranges [`encode_ranges`] stored; `None` when the value is not a list of pairs.
pub fn decode_ranges(b: &[u8]) -> Option<Vec<std::ops::Range<u64>>> {
    if !b.len().is_multiple_of(16) {
        return None;
    }
    Some(
        b.chunks_exact(16)
            .map(|p| u64_at(p, 0)..u64_at(p, 8))
            .collect(),
    )
}

/// A trash record: the slices to delete, then (since the free grace period) the engine
/// time it was made, as 8 bytes of milliseconds since the epoch. A record of 24-byte slices
/// only (an older client's) has no time and counts as old.
pub fn encode_trash(slices: &[crate::Slice], at: Time) -> Vec<u8> {
    let mut v = crate::Slice::encode_list(slices);
    let ms = at.sec.saturating_mul(1000) + (at.nsec / 1_000_000) as i64;
    v.extend_from_slice(&ms.to_be_bytes());
    v
}

/// The slices and the time of a trash record ([`encode_trash`]).
pub fn decode_trash(v: &[u8]) -> Option<(Vec<crate::Slice>, Option<Time>)> {
    let n = crate::Slice::ENCODED_LEN;
    if v.len() % n == 8 {
        let (list, at) = v.split_at(v.len() - 8);
        let ms = i64::from_be_bytes(at.try_into().ok()?);
        let t = Time {
            sec: ms.div_euclid(1000),
            nsec: (ms.rem_euclid(1000) * 1_000_000) as u32,
        };
        return Some((crate::Slice::decode_list(list)?, Some(t)));
    }
    Some((crate::Slice::decode_list(v)?, None))
}

pub fn sustained(sid: u64, ino: Ino) -> Vec<u8> {
    let mut k = with_ino(b'O', sid);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn holder(ino: Ino, sid: u64) -> Vec<u8> {
    let mut k = with_ino(b'o', ino);
    k.extend_from_slice(&sid.to_be_bytes());
    k
}

pub fn holder_prefix(ino: Ino) -> Vec<u8> {
    with_ino(b'o', ino)
}

pub fn sustained_prefix(sid: u64) -> Vec<u8> {
    with_ino(b'O', sid)
}

pub fn lock_index(sid: u64, ino: Ino) -> Vec<u8> {
    let mut k = with_ino(b'K', sid);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

pub fn lock_index_prefix(sid: u64) -> Vec<u8> {
    with_ino(b'K', sid)
}

pub fn lane(client: u64, lane: u32) -> Vec<u8> {
    let mut k = with_ino(b'W', client);
    k.extend_from_slice(&lane.to_be_bytes());
    k
}

pub fn lane_prefix(client: u64) -> Vec<u8> {
    with_ino(b'W', client)
}

/// Tags whose keys are grouped by their first 9 bytes (tag and an id): a directory's entries,
/// a file's chunks, an inode's xattrs, a session's open inodes and locks, an inode's holders,
/// a client's transaction lanes. Every scan inside a transaction stays within one group.
pub const GROUPED: &[u8] = b"ECXOoKW";

/// Tags whose keys are listed across groups or ids (sessions, chunks for gc, trash, journal,
/// locks): engines without ordered keys keep an index of them. No other tag is ever scanned
/// beyond one group.
pub const LISTED: &[u8] = b"SCTJFPOR";

/// Tags whose changes other clients of a shared engine follow (an inode's attributes, a
/// directory's entries, a file's chunks: what a client and its kernel cache), and the lane
/// (`W`) that names the client that committed them ([`crate::KvEngine::feed`]).
pub const FOLLOWED: &[u8] = b"IECW";

/// Whether a commit's write of `key` goes into the engine's change feed.
pub fn followed(key: &[u8]) -> bool {
    key.first().is_some_and(|t| FOLLOWED.contains(t))
}

/// A client's transaction lane (`W` client lane).
pub fn is_lane(key: &[u8]) -> bool {
    key.first() == Some(&b'W')
}

/// The length of the group prefix of `key`, for a key in a group.
pub fn group_len(key: &[u8]) -> Option<usize> {
    match key.first() {
        Some(t) if GROUPED.contains(t) && key.len() > 9 => Some(9),
        _ => None,
    }
}

/// Counters (`N` keys) hold a big-endian i64.
pub fn is_counter(key: &[u8]) -> bool {
    key.first() == Some(&b'N')
}

pub fn flocks(ino: Ino) -> Vec<u8> {
    with_ino(b'F', ino)
}

pub fn plocks(ino: Ino) -> Vec<u8> {
    with_ino(b'P', ino)
}

pub fn u64_at(key: &[u8], at: usize) -> u64 {
    key.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// Length of the fixed-width attribute record (version 1, still read).
const ATTR_V1_LEN: usize = 72;
/// Version 2 flags: the time is the same as the one before it (atime → mtime → ctime).
const MTIME_IS_ATIME: u8 = 1;
const CTIME_IS_MTIME: u8 = 2;

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push(v as u8 | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Attributes as stored: version 2, LEB128 varints, a time equal to the one before it left
/// out (a new file's three times are one). A typical file takes ~25 bytes where the fixed
/// record took 72: on Redis that keeps a bucket of inodes in one compact listpack.
pub fn encode_attr(a: &Attr) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.push(2); // encoding version
    b.push(a.typ as u8);
    let mut flags = 0;
    if a.mtime == a.atime {
        flags |= MTIME_IS_ATIME;
    }
    if a.ctime == a.mtime {
        flags |= CTIME_IS_MTIME;
    }
    b.push(flags);
    for v in [a.mode as u64, a.uid as u64, a.gid as u64] {
        put_varint(&mut b, v);
    }
    let time = |b: &mut Vec<u8>, t: Time| {
        put_varint(b, zigzag(t.sec));
        put_varint(b, t.nsec as u64);
    };
    time(&mut b, a.atime);
    if flags & MTIME_IS_ATIME == 0 {
        time(&mut b, a.mtime);
    }
    if flags & CTIME_IS_MTIME == 0 {
        time(&mut b, a.ctime);
    }
    for v in [a.nlink as u64, a.length, a.rdev as u64, a.parent] {
        put_varint(&mut b, v);
    }
    b
}

pub fn decode_attr(ino: Ino, b: &[u8]) -> Result<Attr> {
    let corrupt = |msg: &str| MetaError::Corrupt {
        key: format!("I{ino}"),
        msg: msg.to_string(),
    };
    match b.first() {
        Some(1) if b.len() == ATTR_V1_LEN => {
            decode_attr_v1(b).ok_or_else(|| corrupt("bad file type"))
        }
        Some(2) => decode_attr_v2(b).ok_or_else(|| corrupt("bad attribute record")),
        _ => Err(corrupt("bad attribute record length or version")),
    }
}

fn decode_attr_v2(b: &[u8]) -> Option<Attr> {
    let mut at = 3;
    let mut varint = || -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(at)?;
            at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    let typ = FileType::from_u8(*b.get(1)?)?;
    let flags = *b.get(2)?;
    let narrow = |v: u64| u32::try_from(v).ok();
    let mode = u16::try_from(varint()?).ok()?;
    let uid = narrow(varint()?)?;
    let gid = narrow(varint()?)?;
    let mut time = || -> Option<Time> {
        Some(Time {
            sec: unzigzag(varint()?),
            nsec: narrow(varint()?)?,
        })
    };
    let atime = time()?;
    let mtime = if flags & MTIME_IS_ATIME != 0 {
        atime
    } else {
        time()?
    };
    let ctime = if flags & CTIME_IS_MTIME != 0 {
        mtime
    } else {
        time()?
    };
    let nlink = narrow(varint()?)?;
    let length = varint()?;
    let rdev = narrow(varint()?)?;
    let parent = varint()?;
    if at != b.len() {
        return None;
    }
    Some(Attr {
        typ,
        mode,
        uid,
        gid,
        atime,
        mtime,
        ctime,
        nlink,
        length,
        rdev,
        parent,
    })
}

fn decode_attr_v1(b: &[u8]) -> Option<Attr> {
    let typ = FileType::from_u8(b[1])?;
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    let time_at = |i: usize| Time {
        sec: u64_at(i) as i64,
        nsec: u32_at(i + 8),
    };
    Some(Attr {
        typ,
        mode: u16_at(2),
        uid: u32_at(4),
        gid: u32_at(8),
        atime: time_at(12),
        mtime: time_at(24),
        ctime: time_at(36),
        nlink: u32_at(48),
        length: u64_at(52),
        rdev: u32_at(60),
        parent: u64_at(64),
    })
}

pub fn encode_dentry(typ: FileType, ino: Ino) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(typ as u8);
    v.extend_from_slice(&ino.to_be_bytes());
    v
}

pub fn decode_dentry(key: &[u8], v: &[u8]) -> Result<(FileType, Ino)> {
    let typ = v.first().and_then(|t| FileType::from_u8(*t));
    match (typ, v.len()) {
        (Some(t), 9) => Ok((t, u64::from_be_bytes(v[1..9].try_into().unwrap()))),
        _ => Err(MetaError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            msg: "bad directory entry".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_roundtrip() {
        let mut a = Attr::new(FileType::File, 0o4755, 7, 8);
        let fresh = encode_attr(&a);
        assert!(
            fresh.len() <= 32,
            "a new file's record is {} bytes",
            fresh.len()
        );
        assert_eq!(decode_attr(3, &fresh).unwrap(), a);
        a.length = 1 << 40;
        a.parent = 99;
        a.rdev = 5;
        a.atime.sec = -5;
        a.uid = u32::MAX;
        a.mtime.nsec = 999_999_999;
        let b = encode_attr(&a);
        assert_eq!(decode_attr(3, &b).unwrap(), a);
        for cut in 0..b.len() {
            assert!(decode_attr(3, &b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_attr(3, &long).is_err());
    }

    #[test]
    fn attr_v1_still_read() {
        let mut v1 = vec![1u8, FileType::Directory as u8];
        v1.extend_from_slice(&0o755u16.to_be_bytes());
        v1.extend_from_slice(&5u32.to_be_bytes());
        v1.extend_from_slice(&6u32.to_be_bytes());
        for (s, n) in [(10i64, 1u32), (20, 2), (30, 3)] {
            v1.extend_from_slice(&s.to_be_bytes());
            v1.extend_from_slice(&n.to_be_bytes());
        }
        v1.extend_from_slice(&2u32.to_be_bytes());
        v1.extend_from_slice(&4096u64.to_be_bytes());
        v1.extend_from_slice(&0u32.to_be_bytes());
        v1.extend_from_slice(&1u64.to_be_bytes());
        let a = decode_attr(9, &v1).unwrap();
        assert_eq!(
            (a.mode, a.uid, a.gid, a.nlink, a.length),
            (0o755, 5, 6, 2, 4096)
        );
        assert_eq!((a.mtime.sec, a.ctime.nsec), (20, 3));
        assert_eq!(decode_attr(9, &encode_attr(&a)).unwrap(), a);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"E\x00\x01"), b"E\x00\x02".to_vec());
        assert_eq!(prefix_end(b"E\x00\xff"), b"E\x01".to_vec());
    }
}
