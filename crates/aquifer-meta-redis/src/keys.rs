//! The key layout: where a metadata key lives in Redis (the `{DB}` hash tag, a field of its
//! group's hash or a string of its own, attributes 64 inodes to a hash), the sorted-set
//! index of a listed tag, how values are stored (counters as decimal strings) and read back,
//! and which keys are a volume's (`destroy_volume`).

use crate::RedisKv;
use aquifer_meta::encoding::{group_len, is_counter};
use aquifer_meta::Result;
use redis::Connection;

/// Inodes whose attributes share one hash (`{DB}I` + ino / 64, field ino % 64). A hash this
/// small with values this short (~25 bytes, [`aquifer_meta::encoding::encode_attr`]) stays a
/// listpack (`hash-max-listpack-entries` 128, `-value` 64 by default): about 30 bytes an
/// inode, where a key of its own costs ~100 bytes of Redis bookkeeping. Transactions check
/// the fields they read, not the whole hash, so inodes in one bucket do not conflict.
pub(crate) const ATTR_BUCKET: u8 = 64;

/// A value as stored: its Redis key, hash field (for a key in a group) and raw value.
pub(crate) struct Stored {
    pub(crate) rk: Vec<u8>,
    pub(crate) field: Option<Vec<u8>>,
    pub(crate) raw: Option<Vec<u8>>,
}

impl RedisKv {
    /// The Redis key of a metadata key, and the hash field when it is in a group.
    pub(crate) fn locate(&self, key: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut rk = self.prefix.clone();
        if key.len() == 9 && key[0] == b'I' {
            // Attributes: 64 inodes per hash (see ATTR_BUCKET).
            let low = key[8];
            rk.extend_from_slice(&key[..8]);
            rk.push(low / ATTR_BUCKET);
            return (rk, Some(vec![low % ATTR_BUCKET]));
        }
        match group_len(key) {
            Some(n) => {
                rk.extend_from_slice(&key[..n]);
                (rk, Some(key[n..].to_vec()))
            }
            None => {
                rk.extend_from_slice(key);
                (rk, None)
            }
        }
    }

    pub(crate) fn index_key(&self, tag: u8) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(b'#');
        k.push(tag);
        k
    }

    /// Get several keys in one round trip: where each lives in Redis and its stored value
    /// (counters still decimal).
    pub(crate) fn get_raw_on(
        &self,
        c: &mut Connection,
        keys: &[&[u8]],
    ) -> redis::RedisResult<Vec<Stored>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let located: Vec<_> = keys.iter().map(|k| self.locate(k)).collect();
        let mut p = redis::pipe();
        for (rk, field) in &located {
            match field {
                Some(f) => p.cmd("HGET").arg(rk).arg(f),
                None => p.cmd("GET").arg(rk),
            };
        }
        let vals: Vec<Option<Vec<u8>>> = p.query(c)?;
        Ok(located
            .into_iter()
            .zip(vals)
            .map(|((rk, field), raw)| Stored { rk, field, raw })
            .collect())
    }

    /// Get several keys in one round trip.
    pub(crate) fn get_many_on(
        &self,
        c: &mut Connection,
        keys: &[&[u8]],
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        Ok(keys
            .iter()
            .zip(self.get_raw_on(c, keys)?)
            .map(|(k, s)| Self::decode_value(k, s.raw))
            .collect())
    }

    pub(crate) fn decode_value(key: &[u8], v: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match v {
            Some(v) if is_counter(key) => {
                let n: i64 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                Some(n.to_be_bytes().to_vec())
            }
            v => v,
        }
    }

    /// Delete every key of this volume (tests; `aquifer load` into a used database is
    /// refused instead).
    pub fn destroy_volume(&self) -> Result<u64> {
        let mut pattern = self.prefix.clone();
        // `{` `}` are glob-safe; escape nothing else: the prefix is `{DB}`.
        pattern.extend_from_slice(b"*");
        let mut pat = Vec::new();
        for &b in &pattern {
            if b == b'[' || b == b']' || b == b'?' || b == b'\\' {
                pat.push(b'\\');
            }
            pat.push(b);
        }
        self.run(|c| {
            let mut cursor: u64 = 0;
            let mut n = 0u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pat)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)?;
                if !keys.is_empty() {
                    n += redis::cmd("DEL").arg(&keys).query::<u64>(c)?;
                }
                if next == 0 {
                    return Ok(n);
                }
                cursor = next;
            }
        })
    }
}
