//! Scans: the keys of one group (one hash, `HGETALL`, sorted here), a directory listed a
//! page at a time from one fetch, and a scan across the ids of a listed tag through its
//! sorted-set index (`ZRANGEBYLEX`). Inside a transaction a scan `WATCH`es what it read.

use crate::RedisKv;
use aquifer_meta::encoding::{GROUPED, LISTED};
use aquifer_meta::KvPair;
use redis::{Connection, ErrorKind, RedisError};
use std::time::{Duration, Instant};

/// Ids read per page when scanning a listed tag's index.
const INDEX_PAGE: usize = 256;

pub(crate) struct Listing {
    group: Vec<u8>,
    at: Instant,
    rows: std::sync::Arc<Vec<KvPair>>,
}

/// How long a listing's first page serves the later ones, and how many listings are kept.
const LISTING_TTL: Duration = Duration::from_secs(2);
const LISTINGS_MAX: usize = 4;

impl RedisKv {
    /// The keys of one group in `[start, end)`, sorted.
    fn group_rows(
        &self,
        c: &mut Connection,
        group: &[u8],
        start: &[u8],
        end: &[u8],
        watch: bool,
    ) -> redis::RedisResult<Vec<KvPair>> {
        let mut rk = self.prefix.clone();
        rk.extend_from_slice(group);
        let mut p = redis::pipe();
        if watch {
            p.cmd("WATCH").arg(&rk).ignore();
        }
        p.cmd("HGETALL").arg(&rk);
        let (flat,): (Vec<Vec<u8>>,) = p.query(c)?;
        let mut rows: Vec<KvPair> = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            let mut k = group.to_vec();
            k.extend_from_slice(&f);
            if k.as_slice() >= start && k.as_slice() < end {
                rows.push((k, v));
            }
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(rows)
    }

    /// A page of a directory listing (not in a transaction): the first page fetches the
    /// whole directory and keeps it for the pages after it (see [`RedisKv::listings`]).
    fn listing_page(
        &self,
        c: &mut Connection,
        group: &[u8],
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> redis::RedisResult<Vec<KvPair>> {
        let page = |rows: &[KvPair]| -> Vec<KvPair> {
            let from = rows.partition_point(|r| r.0.as_slice() < start);
            rows[from..]
                .iter()
                .take_while(|r| r.0.as_slice() < end)
                .take(limit)
                .cloned()
                .collect()
        };
        let first = start == group;
        if !first {
            let l = self.listings.lock().unwrap();
            if let Some(hit) = l
                .iter()
                .find(|x| x.group == group && x.at.elapsed() < LISTING_TTL)
            {
                return Ok(page(&hit.rows));
            }
        }
        let rows = self.group_rows(
            c,
            group,
            group,
            &aquifer_meta::encoding::prefix_end(group),
            false,
        )?;
        let out = page(&rows);
        if rows.len() > out.len() {
            let mut l = self.listings.lock().unwrap();
            l.retain(|x| x.group != group && x.at.elapsed() < LISTING_TTL);
            if l.len() >= LISTINGS_MAX {
                l.remove(0);
            }
            l.push(Listing {
                group: group.to_vec(),
                at: Instant::now(),
                rows: std::sync::Arc::new(rows),
            });
        }
        Ok(out)
    }

    pub(crate) fn scan_on(
        &self,
        c: &mut Connection,
        start: &[u8],
        end: &[u8],
        limit: usize,
        watch: bool,
    ) -> redis::RedisResult<Vec<KvPair>> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let tag = start[0];
        // Within one group: one hash.
        if GROUPED.contains(&tag) && start.len() >= 9 {
            let group = &start[..9];
            let group_end = aquifer_meta::encoding::prefix_end(group);
            if end <= group_end.as_slice() {
                if !watch && tag == b'E' {
                    return self.listing_page(c, group, start, end, limit);
                }
                let mut rows = self.group_rows(c, group, start, end, watch)?;
                rows.truncate(limit);
                return Ok(rows);
            }
        }
        if !LISTED.contains(&tag) || end.first().is_some_and(|&e| e < tag) {
            return Err(unsupported(start, end));
        }
        // Across the ids of a listed tag, through its index.
        let idx = self.index_key(tag);
        if watch {
            redis::cmd("WATCH").arg(&idx).query::<()>(c)?;
        }
        let grouped = GROUPED.contains(&tag);
        let id_len = |k: &[u8]| if grouped { k.len().min(9) } else { k.len() };
        let mut min = b"[".to_vec();
        min.extend_from_slice(&start[1..id_len(start)]);
        let max = if end[0] == tag {
            let mut m = b"(".to_vec();
            m.extend_from_slice(&end[1..]);
            m
        } else {
            b"+".to_vec()
        };
        let mut out = Vec::new();
        loop {
            let ids: Vec<Vec<u8>> = redis::cmd("ZRANGEBYLEX")
                .arg(&idx)
                .arg(&min)
                .arg(&max)
                .arg("LIMIT")
                .arg(0)
                .arg(INDEX_PAGE)
                .query(c)?;
            let last_page = ids.len() < INDEX_PAGE;
            if grouped {
                for id in &ids {
                    let mut group = vec![tag];
                    group.extend_from_slice(id);
                    for row in self.group_rows(c, &group, start, end, false)? {
                        out.push(row);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            } else if !ids.is_empty() {
                let keys: Vec<Vec<u8>> = ids
                    .iter()
                    .map(|id| {
                        let mut k = self.prefix.clone();
                        k.push(tag);
                        k.extend_from_slice(id);
                        k
                    })
                    .collect();
                let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query(c)?;
                for (id, v) in ids.iter().zip(vals) {
                    let mut k = vec![tag];
                    k.extend_from_slice(id);
                    if let Some(v) = v {
                        if k.as_slice() >= start && k.as_slice() < end {
                            out.push((k, v));
                            if out.len() >= limit {
                                return Ok(out);
                            }
                        }
                    }
                }
            }
            match ids.last() {
                Some(l) if !last_page => {
                    min = b"(".to_vec();
                    min.extend_from_slice(l);
                }
                _ => return Ok(out),
            }
        }
    }
}

fn unsupported(start: &[u8], end: &[u8]) -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "scan across groups of an unlisted tag",
        format!(
            "{}..{}",
            String::from_utf8_lossy(start),
            String::from_utf8_lossy(end)
        ),
    ))
}
