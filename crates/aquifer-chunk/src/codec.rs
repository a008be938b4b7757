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

use crate::{DataError, Result};
use aquifer_object::ObjectStore;
use bytes::Bytes;

pub const SEGMENT: usize = 64 << 10;
const MAGIC: &[u8; 4] = b"AQC1";

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
/// bytes, checking every segment touched.
pub fn read(
    store: &dyn ObjectStore,
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
    // The checksums of the touched segments, and the magic that closes the object.
    let nseg = segments(len);
    let mut trailer = vec![0u8; 4 * (nseg - s0) + MAGIC.len()];
    let got = store.get_into(key, (len + 4 * s0) as u64, &mut trailer)?;
    if got != trailer.len() || &trailer[trailer.len() - 4..] != MAGIC {
        return Err(corrupt(
            key,
            format!(
                "object is truncated or not a block (expected {} bytes)",
                stored_len(len)
            ),
        ));
    }
    // Segment-aligned data: straight into dst when aligned, else through a bounce buffer.
    if off == seg_start && end == seg_end {
        return fetch_checked(store, key, seg_start, s0, &trailer, dst);
    }
    let mut bounce = vec![0u8; seg_end - seg_start];
    fetch_checked(store, key, seg_start, s0, &trailer, &mut bounce)?;
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
        read(&s, "b", p.len(), 100_000, &mut d).unwrap();
        assert_eq!(d, p[100_000..170_000]);
        // Flip one byte anywhere in the object: the read that covers it fails.
        let stored = encode(&p).to_vec();
        for pos in [0, 65_535, 65_536, 199_999, p.len() + 3, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[pos] ^= 0x40;
            s.put("bad", Bytes::from(bad)).unwrap();
            let mut d = vec![0u8; p.len()];
            let e = read(&s, "bad", p.len(), 0, &mut d).unwrap_err();
            assert!(matches!(e, DataError::Corrupt { .. }), "byte {pos}: {e}");
        }
        s.put(
            "short",
            Bytes::copy_from_slice(&stored[..stored.len() - 10]),
        )
        .unwrap();
        assert!(read(&s, "short", p.len(), 0, &mut [0u8; 10]).is_err());
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
            read(&s, "k", len, x, &mut d).unwrap();
            prop_assert_eq!(&d[..], &p[x..y]);
        }
    }
}
