//! The stored form of a block: its bytes, then a crc32c for every 64 KiB segment, then a
//! 4-byte magic. Every read from the object store is checked against those checksums, so a
//! corrupt or truncated object is EIO and a logged error naming the object — never wrong
//! bytes. Segments (not whole blocks) are checked so that a small random read fetches only
//! the segments it touches plus their few checksum bytes.
//!
//! ```text
//! | payload (len bytes) | crc32c(seg 0) .. crc32c(seg n-1), u32 LE | "AQC1" |
//! ```
//! The payload length is part of the object key, so a reader knows where the trailer is
//! without asking the store.
//!
//! Volumes formatted with compression store a block as
//! ```text
//! | compressed payload | payload len u32 LE | crc32c(compressed payload) u32 LE | "AQL1" or "AQZ1" |
//! ```
//! and fall back to the plain form when compression does not shrink the block, so every
//! object says how it is stored. Compressed blocks are always read whole.

use crate::{DataError, Result};
use aquifer_cache::Cache;
use aquifer_object::ObjectStore;
use bytes::Bytes;

pub const SEGMENT: usize = 64 << 10;
const MAGIC: &[u8; 4] = b"AQC1";
const MAGIC_LZ4: &[u8; 4] = b"AQL1";
const MAGIC_ZSTD: &[u8; 4] = b"AQZ1";
/// Fast enough to keep up with a writer on one core, and most of zstd's gain on tensors.
const ZSTD_LEVEL: i32 = 1;

/// How a volume's blocks are compressed, fixed at format time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn parse(s: &str) -> std::result::Result<Compression, String> {
        match s {
            "" | "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?}: use none, lz4 or zstd"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// The object to store for the payload in `buf`, compressed if that helps.
pub fn seal_with(c: Compression, mut buf: Vec<u8>) -> Bytes {
    let packed = match c {
        Compression::None => None,
        Compression::Lz4 => Some((lz4_flex::block::compress(&buf), MAGIC_LZ4)),
        Compression::Zstd => zstd::bulk::compress(&buf, ZSTD_LEVEL)
            .ok()
            .map(|z| (z, MAGIC_ZSTD)),
    };
    match packed {
        Some((mut z, magic)) if z.len() + 12 < stored_len(buf.len()) => {
            let crc = crc32c::crc32c(&z);
            z.extend_from_slice(&(buf.len() as u32).to_le_bytes());
            z.extend_from_slice(&crc.to_le_bytes());
            z.extend_from_slice(magic);
            Bytes::from(z)
        }
        _ => {
            seal(&mut buf);
            Bytes::from(buf)
        }
    }
}

/// Verify a whole object of the plain form.
fn check_plain(key: &str, len: usize, obj: &[u8]) -> Result<()> {
    let n = obj.len();
    if n != stored_len(len) || &obj[n - 4..] != MAGIC {
        return Err(corrupt(
            key,
            format!(
                "object is truncated or not a block ({n} bytes, expected {})",
                stored_len(len)
            ),
        ));
    }
    let crcs = &obj[len..n - 4];
    for (i, seg) in obj[..len].chunks(SEGMENT).enumerate() {
        let want = u32::from_le_bytes(crcs[4 * i..4 * i + 4].try_into().unwrap());
        if crc32c::crc32c(seg) != want {
            return Err(corrupt(key, format!("checksum mismatch in segment {i}")));
        }
    }
    Ok(())
}

/// The payload of a whole stored object of either form, verified.
pub fn decode(key: &str, len: usize, obj: &[u8]) -> Result<Vec<u8>> {
    let n = obj.len();
    if n < 4 {
        return Err(corrupt(key, format!("object is truncated to {n} bytes")));
    }
    let magic = &obj[n - 4..];
    if magic == MAGIC {
        check_plain(key, len, obj)?;
        return Ok(obj[..len].to_vec());
    }
    if (magic != MAGIC_LZ4 && magic != MAGIC_ZSTD) || n < 12 {
        return Err(corrupt(
            key,
            "object is truncated or not a block (no trailer)".into(),
        ));
    }
    let raw_len = u32::from_le_bytes(obj[n - 12..n - 8].try_into().unwrap()) as usize;
    let want = u32::from_le_bytes(obj[n - 8..n - 4].try_into().unwrap());
    let z = &obj[..n - 12];
    if raw_len != len || crc32c::crc32c(z) != want {
        return Err(corrupt(key, "checksum mismatch in compressed block".into()));
    }
    let out = if magic == MAGIC_LZ4 {
        lz4_flex::block::decompress(z, len).map_err(|e| e.to_string())
    } else {
        zstd::bulk::decompress(z, len).map_err(|e| e.to_string())
    };
    match out {
        Ok(v) if v.len() == len => Ok(v),
        Ok(v) => Err(corrupt(
            key,
            format!("decompressed to {} bytes, expected {len}", v.len()),
        )),
        Err(e) => Err(corrupt(key, format!("cannot decompress: {e}"))),
    }
}

/// Fetch and verify the whole block `key` of payload length `len` in one request.
/// `buf` is filled and returned when the block is stored plain (a recycled buffer).
pub fn read_whole(
    store: &dyn ObjectStore,
    c: Compression,
    key: &str,
    len: usize,
    buf: Vec<u8>,
) -> Result<Vec<u8>> {
    if c == Compression::None {
        // The plain form's size is known. The store's own buffer becomes the block (no
        // copy when it hands over a unique one, as the S3 and file stores do).
        let want = stored_len(len);
        let mut obj = store.get_owned(key, 0, want, buf)?;
        if obj.len() != want {
            return Err(corrupt(
                key,
                format!("object is truncated: {} of {want} bytes", obj.len()),
            ));
        }
        check_plain(key, len, &obj)?;
        obj.truncate(len);
        return Ok(obj);
    }
    let obj = store.get(key, 0, None)?;
    decode(key, len, &obj)
}

fn segments(len: usize) -> usize {
    len.div_ceil(SEGMENT)
}

/// Size of the stored object for a payload of `len` bytes.
pub fn stored_len(len: usize) -> usize {
    len + 4 * segments(len) + MAGIC.len()
}

/// The object to store for `payload`.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(stored_len(payload.len()));
    out.extend_from_slice(payload);
    seal(&mut out);
    Bytes::from(out)
}

/// Turn a buffer holding a payload into the object to store, appending the trailer.
pub fn seal(buf: &mut Vec<u8>) {
    let len = buf.len();
    buf.reserve_exact(stored_len(len) - len);
    for i in 0..segments(len) {
        let seg = &buf[i * SEGMENT..((i + 1) * SEGMENT).min(len)];
        let crc = crc32c::crc32c(seg).to_le_bytes();
        buf.extend_from_slice(&crc);
    }
    buf.extend_from_slice(MAGIC);
}

fn corrupt(key: &str, msg: String) -> DataError {
    tracing::error!(key, "{msg}");
    DataError::Corrupt {
        key: key.to_string(),
        msg,
    }
}

/// Read `dst.len()` payload bytes from `off` of the block `key` whose payload is `len`
/// bytes, checking every segment touched. The checksum trailers fetched are kept in
/// `trailers` (they never change: keys are never reused), so the next small read of the
/// same block is a single request.
pub fn read(
    store: &dyn ObjectStore,
    trailers: Option<&Cache>,
    key: &str,
    len: usize,
    off: usize,
    dst: &mut [u8],
) -> Result<()> {
    let end = off + dst.len();
    if end > len {
        return Err(corrupt(
            key,
            format!("read of [{off}, {end}) past the block length {len}"),
        ));
    }
    if dst.is_empty() {
        return Ok(());
    }
    let (s0, s1) = (off / SEGMENT, end.div_ceil(SEGMENT));
    let seg_start = s0 * SEGMENT;
    let seg_end = (s1 * SEGMENT).min(len);
    // A read touching most of the block: one request for all of it beats two.
    if 2 * (seg_end - seg_start) >= len {
        let whole = read_whole(store, Compression::None, key, len, Vec::new())?;
        dst.copy_from_slice(&whole[off..end]);
        return Ok(());
    }
    let trailer = match trailers.and_then(|c| c.get(key)) {
        Some(t) => t,
        None => {
            let mut t = vec![0u8; 4 * segments(len) + MAGIC.len()];
            let got = store.get_into(key, len as u64, &mut t)?;
            if got != t.len() || &t[t.len() - 4..] != MAGIC {
                return Err(corrupt(
                    key,
                    format!(
                        "object is truncated or not a block (expected {} bytes)",
                        stored_len(len)
                    ),
                ));
            }
            let t = std::sync::Arc::new(t);
            if let Some(c) = trailers {
                c.insert(key, &t);
            }
            t
        }
    };
    let crcs = &trailer[4 * s0..];
    // Segment-aligned data: straight into dst when aligned, else through a bounce buffer.
    if off == seg_start && end == seg_end {
        return fetch_checked(store, key, seg_start, s0, crcs, dst);
    }
    let mut bounce = vec![0u8; seg_end - seg_start];
    fetch_checked(store, key, seg_start, s0, crcs, &mut bounce)?;
    dst.copy_from_slice(&bounce[off - seg_start..end - seg_start]);
    Ok(())
}

/// Read whole segments from `start` (segment `s0`) into `data` and check each against the
/// trailer checksums (the first of which belongs to `s0`).
fn fetch_checked(
    store: &dyn ObjectStore,
    key: &str,
    start: usize,
    s0: usize,
    trailer: &[u8],
    data: &mut [u8],
) -> Result<()> {
    let got = store.get_into(key, start as u64, data)?;
    if got != data.len() {
        return Err(corrupt(
            key,
            format!("object is truncated: {got} of {} bytes", data.len()),
        ));
    }
    for (i, seg) in data.chunks(SEGMENT).enumerate() {
        let want = u32::from_le_bytes(trailer[4 * i..4 * i + 4].try_into().unwrap());
        if crc32c::crc32c(seg) != want {
            return Err(corrupt(
                key,
                format!("checksum mismatch in segment {}", s0 + i),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aquifer_object::MemStore;
    use proptest::prelude::*;

    fn block(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn reads_any_range_and_detects_every_corruption() {
        let s = MemStore::new();
        let p = block(200_000);
        s.put("b", encode(&p)).unwrap();
        let mut d = vec![0u8; 70_000];
        read(&s, None, "b", p.len(), 100_000, &mut d).unwrap();
        assert_eq!(d, p[100_000..170_000]);
        // Flip one byte anywhere in the object: the read that covers it fails.
        let stored = encode(&p).to_vec();
        for pos in [0, 65_535, 65_536, 199_999, p.len() + 3, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x40;
            s.put("bad", Bytes::from(bad)).unwrap();
            let mut d = vec![0u8; p.len()];
            let e = read(&s, None, "bad", p.len(), 0, &mut d).unwrap_err();
            assert!(matches!(e, DataError::Corrupt { .. }), "byte {pos}: {e}");
        }
        s.put(
            "short",
            Bytes::copy_from_slice(&stored[..stored.len() - 10]),
        )
        .unwrap();
        assert!(read(&s, None, "short", p.len(), 0, &mut [0u8; 10]).is_err());
    }

    #[test]
    fn compressed_blocks_roundtrip_and_detect_corruption() {
        let s = MemStore::new();
        let text: Vec<u8> = b"tensor ".iter().cycle().take(300_000).copied().collect();
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            for p in [&text, &noise] {
                let obj = seal_with(c, p.clone());
                if c != Compression::None && p == &text {
                    assert!(obj.len() < p.len() / 10, "{c:?} did not compress");
                }
                s.put("k", obj.clone()).unwrap();
                assert_eq!(&read_whole(&s, c, "k", p.len(), Vec::new()).unwrap(), p);
                for pos in [0, obj.len() / 2, obj.len() - 5, obj.len() - 1] {
                    let mut bad = obj.to_vec();
                    bad[pos] ^= 1;
                    s.put("bad", Bytes::from(bad)).unwrap();
                    let e = read_whole(&s, c, "bad", p.len(), Vec::new()).unwrap_err();
                    assert!(matches!(e, DataError::Corrupt { .. }), "{c:?} byte {pos}");
                }
                s.put("short", obj.slice(..obj.len() - 3)).unwrap();
                assert!(read_whole(&s, c, "short", p.len(), Vec::new()).is_err());
            }
        }
        // A volume may hold plain blocks next to compressed ones: every object says which.
        s.put("plain", seal_with(Compression::None, noise.clone()))
            .unwrap();
        assert_eq!(
            read_whole(&s, Compression::Zstd, "plain", noise.len(), Vec::new()).unwrap(),
            noise
        );
    }

    proptest! {
        #[test]
        fn any_range_roundtrips(len in 1usize..300_000, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
            let s = MemStore::new();
            let p = block(len);
            s.put("k", encode(&p)).unwrap();
            let (x, y) = (a.index(len), b.index(len + 1));
            let (x, y) = (x.min(y), x.max(y));
            let mut d = vec![0u8; y - x];
            read(&s, None, "k", len, x, &mut d).unwrap();
            prop_assert_eq!(&d[..], &p[x..y]);
            // Again with the trailer remembered from the first read.
            let trailers = Cache::memory(1 << 20);
            for _ in 0..2 {
                d.fill(0);
                read(&s, Some(&trailers), "k", len, x, &mut d).unwrap();
                prop_assert_eq!(&d[..], &p[x..y]);
            }
        }
    }
}
