//! A file's data layout ([`Chunks`]): slice ids (handed out by `ids.rs`), each chunk's
//! slice list (read through a per-inode cache on a shared engine, dropped at each change
//! made here or followed from others, and at each open unless the follower is live:
//! `follow.rs`), writes and compactions of slice lists, and the trash of
//! slices whose objects gc deletes.

use super::{add, now, put_attr, KvMeta, C_NEXT_SLICE, C_NEXT_TRASH, C_USED_SPACE, TRASH_BATCH};
use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::types::*;
use crate::Chunks;

impl<E: KvEngine> Chunks for KvMeta<E> {
    fn new_slice_id(&self) -> Result<u64> {
        self.alloc_slice_id()
    }

    fn abandon_slice_ids(&self, ids: &[u64]) {
        self.settle_slice_ids(ids.iter().copied());
    }

    fn slice_id_limit(&self) -> Result<u64> {
        Ok(self.counter(C_NEXT_SLICE)?.max(0) as u64)
    }

    fn live_slice_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
        let p = [b'R'];
        let records = self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)?;
        let live: std::collections::HashSet<u64> = if self.kv.exclusive() {
            // Nobody else can have this store open: only this client's session is alive.
            [self.sid()].into_iter().filter(|&s| s != 0).collect()
        } else {
            // A session that was cleaned up is dead, whatever record is left of it.
            let p = [b'S'];
            self.kv
                .scan(&p, &key::prefix_end(&p), usize::MAX)?
                .iter()
                .map(|(k, _)| key::u64_at(k, 1))
                .collect()
        };
        let mut out = Vec::new();
        for (k, v) in records {
            if live.contains(&key::u64_at(&k, 1)) {
                out.extend(key::decode_ranges(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("R{}", key::u64_at(&k, 1)),
                    msg: "reserved slice ranges are not pairs of u64".into(),
                })?);
            }
        }
        Ok(out)
    }

    fn read_chunk(&self, ino: Ino, idx: u32) -> Result<Vec<Slice>> {
        self.alive()?;
        let cached = !self.kv.exclusive();
        let generation = self.chunks.generation();
        if cached {
            if let Some(list) = self.chunks.get(ino, idx) {
                return Ok(list);
            }
        }
        let list = match self.kv.get(&key::chunk(ino, idx))? {
            Some(v) => Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                key: format!("C{ino}/{idx}"),
                msg: "slice list length is not a multiple of 24".into(),
            })?,
            None => Vec::new(),
        };
        if cached {
            // Not if a change of any chunk was seen meanwhile: it may be this one.
            self.chunks.put(generation, ino, idx, list.clone());
        }
        Ok(list)
    }

    fn read_chunk_fresh(&self, ino: Ino, idx: u32) -> Result<Vec<Slice>> {
        self.alive()?;
        self.forget_chunks(ino);
        self.read_chunk(ino, idx)
    }

    fn write_slice(&self, ino: Ino, idx: u32, slice: Slice) -> Result<(Attr, usize)> {
        self.alive()?;
        let _forget = ForgetChunks(self, ino);
        let (ak, k) = (key::attr(ino), key::chunk(ino, idx));
        self.txn(|t| {
            let got = t.get_many(&[&ak, &k])?;
            let mut a = match &got[0] {
                Some(v) => key::decode_attr(ino, v)?,
                None => return Err(Errno::ENOENT.into()),
            };
            if a.typ != FileType::File {
                return Err(Errno::EBADF.into());
            }
            let mut v = got[1].clone().unwrap_or_default();
            // A slice id is used once: finding it listed means this is a writer's retry of
            // a commit that applied but whose outcome it could not learn (the engine went
            // away during the fence). Listed twice, the slice would overlay whatever was
            // written over it since, and its space would be counted twice.
            if slice.id != 0 && Slice::listed(&v, slice.id) {
                return Ok((a, v.len() / Slice::ENCODED_LEN));
            }
            slice.encode(&mut v);
            let count = v.len() / Slice::ENCODED_LEN;
            t.set(&k, v);
            let end = idx as u64 * CHUNK_SIZE + slice.end() as u64;
            if end > a.length {
                let grow = align4k(end) - align4k(a.length);
                self.check_space(grow)?;
                add(t, C_USED_SPACE, grow as i64);
                a.length = end;
            }
            let ts = now();
            a.mtime = ts;
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok((a, count))
        })
        .inspect(|_| self.settle_slice_ids([slice.id]))
    }

    fn compact_chunk(&self, ino: Ino, idx: u32, replaced: &[Slice], new: &[Slice]) -> Result<bool> {
        let _forget = ForgetChunks(self, ino);
        self.txn(|t| {
            let k = key::chunk(ino, idx);
            let Some(v) = t.get(&k)? else {
                return Ok(false);
            };
            let cur = Slice::decode_list(&v).unwrap_or_default();
            if cur.len() < replaced.len() || cur[..replaced.len()] != *replaced {
                return Ok(false);
            }
            let mut list = new.to_vec();
            list.extend_from_slice(&cur[replaced.len()..]);
            if list.is_empty() {
                t.delete(&k);
            } else {
                t.set(&k, Slice::encode_list(&list));
            }
            let dead: Vec<Slice> = replaced.iter().copied().filter(|s| s.id != 0).collect();
            self.trash_slices(t, &dead)?;
            Ok(true)
        })
        // Committed, or certainly not (the caller frees them): gc need not spare them.
        .inspect(|_| self.settle_slice_ids(new.iter().map(|s| s.id)))
    }

    fn trash_batch(&self, after: u64, limit: usize) -> Result<Vec<crate::TrashRecord>> {
        let p = [b'T'];
        Ok(self
            .kv
            .scan(
                &key::trash(after.saturating_add(1)),
                &key::prefix_end(&p),
                limit,
            )?
            .into_iter()
            .map(|(k, v)| {
                let (slices, at) = key::decode_trash(&v).unwrap_or_default();
                (key::u64_at(&k, 1), slices, at)
            })
            .collect())
    }

    fn trash_done(&self, id: u64) -> Result<()> {
        self.txn(|t| {
            t.delete(&key::trash(id));
            Ok(())
        })
    }

    fn scan_chunks(
        &self,
        after: Option<(Ino, u32)>,
        limit: usize,
    ) -> Result<Vec<(Ino, u32, Vec<Slice>)>> {
        let p = [b'C'];
        let start = match after {
            Some((ino, idx)) => {
                let mut k = key::chunk(ino, idx);
                k.push(0);
                k
            }
            None => p.to_vec(),
        };
        self.kv
            .scan(&start, &key::prefix_end(&p), limit)?
            .into_iter()
            .map(|(k, v)| {
                let ino = key::u64_at(&k, 1);
                let idx = k
                    .get(9..13)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                let slices = Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("C{ino}/{idx}"),
                    msg: "slice list length is not a multiple of 24".into(),
                })?;
                Ok((ino, idx, slices))
            })
            .collect()
    }
}

impl<E: KvEngine> KvMeta<E> {
    pub(super) fn forget_chunks(&self, ino: Ino) {
        if self.kv.exclusive() {
            return;
        }
        self.chunks.forget(ino);
    }

    pub(super) fn trash_slices(&self, t: &mut dyn KvTxn, slices: &[Slice]) -> Result<()> {
        if slices.is_empty() {
            return Ok(());
        }
        // Ids come from a batch outside the transaction: a shared counter read and written
        // in every delete would make concurrent deletes of all clients conflict.
        let seq = self.alloc(&self.trash_ids, C_NEXT_TRASH, TRASH_BATCH, 1)?;
        // Stamped with the engine's time: the grace before the blocks go is measured on one
        // clock, whichever client frees them.
        t.set(
            &key::trash(seq),
            key::encode_trash(slices, self.engine_now()?),
        );
        Ok(())
    }
}

/// Drops an inode's cached slice lists when a change of them ends, committed or not (drop
/// runs after the transaction).
pub(super) struct ForgetChunks<'a, E: KvEngine>(pub(super) &'a KvMeta<E>, pub(super) Ino);

impl<E: KvEngine> Drop for ForgetChunks<'_, E> {
    fn drop(&mut self) {
        self.0.forget_chunks(self.1);
    }
}
