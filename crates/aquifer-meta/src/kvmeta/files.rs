//! Open files and a file's length ([`Files`]): open and close (recorded in the engine so an
//! unlinked file lives until its last holder closes it: on a shared engine at the first
//! open, on an exclusive one only when an open file loses its last link), truncate and
//! fallocate. Also where an inode is freed (`destroy_inode`): at its last link or its last
//! close, whichever is later, its data going to the trash.

use super::attrs::access_ok;
use super::chunks::ForgetChunks;
use super::{add, get_attr, now, put_attr, KvMeta, C_USED_INODES, C_USED_SPACE};
use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::types::*;
use crate::{Attrs, Files, MODE_R, MODE_W};

impl<E: KvEngine> Files for KvMeta<E> {
    fn open(&self, ctx: &Context, ino: Ino, flags: i32) -> Result<Attr> {
        self.alive()?;
        let mask = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => MODE_R,
            libc::O_WRONLY => MODE_W,
            _ => MODE_R | MODE_W,
        } | if flags & libc::O_TRUNC != 0 {
            MODE_W
        } else {
            0
        };
        // Close-to-open: what another client committed before this open is read fresh.
        // Without a live follower, the kept slice lists go at each open; with one, they go
        // when the attributes read below differ from those of the last open here — the
        // follower may not have seen a commit that closed just before this open.
        let followed = self.followed();
        if !followed {
            self.forget_chunks(ino);
        }
        if self.kv.exclusive() {
            return self.open_here(ctx, ino, mask);
        }
        let mut open = self.open_shard(ino);
        let n = open.get(&ino).copied().unwrap_or(0);
        let a = if n == 0 {
            // First open here: record it in the engine, so that an unlink by any client
            // keeps the file until this session closes it.
            let sid = self.sid();
            self.txn(|t| {
                let a = get_attr(t, ino)?;
                access_ok(ctx, &a, mask)?;
                self.check_session(t)?;
                t.set(&key::holder(ino, sid), Vec::new());
                t.set(&key::sustained(sid, ino), Vec::new());
                Ok(a)
            })?
        } else {
            let a = self.getattr(ino)?;
            access_ok(ctx, &a, mask)?;
            a
        };
        open.insert(ino, n + 1);
        if self.chunks.opened(ino, &a) && followed {
            self.forget_chunks(ino);
        }
        Ok(a)
    }

    fn create_open(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> Result<(Ino, Attr)> {
        self.alive()?;
        self.create_node(
            ctx,
            parent,
            name,
            FileType::File,
            mode & !umask,
            0,
            None,
            true,
        )
    }

    fn close(&self, ino: Ino) -> Result<()> {
        if self.kv.exclusive() {
            return self.close_here(ino);
        }
        let mut open = self.open_shard(ino);
        match open.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                Ok(())
            }
            Some(_) => {
                let sid = self.sid();
                // Forgotten here even if the engine fails: a later cleanup of this session
                // (restart, or another client after the timeout) removes the record.
                open.remove(&ino);
                // A lost session holds nothing any more: the client that reaped it released
                // its open files.
                self.alive()?;
                self.txn(|t| self.release_holder(t, sid, ino))
            }
            None => Ok(()),
        }
    }

    fn truncate(&self, ctx: &Context, ino: Ino, length: u64) -> Result<Attr> {
        self.alive()?;
        if length > MAX_FILE_SIZE {
            return Err(Errno::EFBIG.into());
        }
        let _forget = ForgetChunks(self, ino);
        self.txn(|t| {
            let mut a = writable_file(t, ctx, ino, Errno::EINVAL)?;
            if length > a.length {
                self.check_space(align4k(length) - align4k(a.length))?;
            }
            self.set_length(t, ino, &mut a, length)?;
            let ts = now();
            a.mtime = ts;
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok(a)
        })
    }

    fn fallocate(&self, ctx: &Context, ino: Ino, mode: i32, off: u64, len: u64) -> Result<Attr> {
        self.alive()?;
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(Errno::EOPNOTSUPP.into());
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Errno::EOPNOTSUPP.into());
        }
        if len == 0 {
            return Err(Errno::EINVAL.into());
        }
        let end = off.checked_add(len).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::EFBIG.into());
        }
        let _forget = ForgetChunks(self, ino);
        self.txn(|t| {
            let mut a = writable_file(t, ctx, ino, Errno::ENODEV)?;
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                let zend = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
                    end.min(a.length)
                } else {
                    end
                };
                if zend > off {
                    Self::zero_range(t, ino, off, zend - off)?;
                }
            }
            if mode & FALLOC_FL_KEEP_SIZE == 0 && end > a.length {
                self.check_space(align4k(end) - align4k(a.length))?;
                self.set_length(t, ino, &mut a, end)?;
            }
            let ts = now();
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                a.mtime = ts;
            }
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok(a)
        })
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// An open on an engine no other client uses: counted in memory, no write. The engine
    /// records only the files this client holds when they lose their last link (see
    /// [`KvMeta::has_holders`]), so a training epoch that opens every file costs no commit
    /// per open and per close. The attributes are read in a transaction, so that an unlink
    /// (which commits under the same lock) either sees this open or is seen by it.
    fn open_here(&self, ctx: &Context, ino: Ino, mask: u32) -> Result<Attr> {
        let mut out = None;
        self.txn(|t| {
            let a = get_attr(t, ino)?;
            access_ok(ctx, &a, mask)?;
            if out.is_none() {
                *self.open_shard(ino).entry(ino).or_insert(0) += 1;
            }
            out = Some(a);
            Ok(())
        })?;
        out.ok_or_else(|| Errno::EIO.into())
    }

    fn close_here(&self, ino: Ino) -> Result<()> {
        {
            let mut open = self.open_shard(ino);
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return Ok(());
                }
                Some(_) => {
                    open.remove(&ino);
                }
                None => return Ok(()),
            }
        }
        // Not under the shard's lock: transactions take it (has_holders).
        if !self.recorded.lock().unwrap().remove(&ino) {
            return Ok(());
        }
        self.alive()?;
        let sid = self.sid();
        self.txn(|t| self.release_holder(t, sid, ino))
    }

    /// True when some session (this one included) has `ino` open. On an engine no other
    /// client uses, this client's opens are counted in memory: a file it has open is
    /// recorded in the engine here, as it loses its last link, so that it is freed at its
    /// last close here — or, after a crash, by the next session's cleanup.
    pub(super) fn has_holders(&self, t: &mut dyn KvTxn, ino: Ino) -> Result<bool> {
        if self.kv.exclusive() && self.open_shard(ino).get(&ino).is_some_and(|n| *n > 0) {
            let sid = self.sid();
            t.set(&key::holder(ino, sid), Vec::new());
            t.set(&key::sustained(sid, ino), Vec::new());
            self.recorded.lock().unwrap().insert(ino);
            return Ok(true);
        }
        let p = key::holder_prefix(ino);
        Ok(!t.scan(&p, &key::prefix_end(&p), 1)?.is_empty())
    }

    /// Session `sid` no longer has `ino` open; free the inode if it was the last holder of a
    /// file without links.
    pub(super) fn release_holder(&self, t: &mut dyn KvTxn, sid: u64, ino: Ino) -> Result<()> {
        t.delete(&key::sustained(sid, ino));
        t.delete(&key::holder(ino, sid));
        if let Ok(a) = get_attr(t, ino) {
            if a.nlink == 0 && !self.has_holders(t, ino)? {
                self.destroy_inode(t, ino, &a)?;
            }
        }
        Ok(())
    }

    /// Remove an inode whose last link is gone: its data goes to the trash in this transaction.
    pub(super) fn destroy_inode(&self, t: &mut dyn KvTxn, ino: Ino, attr: &Attr) -> Result<()> {
        if attr.typ == FileType::File {
            let prefix = key::chunk_prefix(ino);
            let chunks = t.scan(&prefix, &key::prefix_end(&prefix), usize::MAX)?;
            let mut dead = Vec::new();
            for (k, v) in chunks {
                let slices = Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("C{ino}"),
                    msg: "bad slice list".into(),
                })?;
                dead.extend(slices.into_iter().filter(|s| s.id != 0));
                t.delete(&k);
            }
            self.trash_slices(t, &dead)?;
            add(t, C_USED_SPACE, -(align4k(attr.length) as i64));
        }
        if attr.typ == FileType::Symlink {
            t.delete(&key::symlink(ino));
        }
        let xp = key::xattr_prefix(ino);
        for (k, _) in t.scan(&xp, &key::prefix_end(&xp), usize::MAX)? {
            t.delete(&k);
        }
        t.delete(&key::attr(ino));
        t.delete(&key::flocks(ino));
        t.delete(&key::plocks(ino));
        add(t, C_USED_INODES, -1);
        Ok(())
    }

    fn set_length(&self, t: &mut dyn KvTxn, ino: Ino, a: &mut Attr, length: u64) -> Result<()> {
        if length < a.length {
            // Chunks wholly past the new end go to the trash.
            let first_gone = length.div_ceil(CHUNK_SIZE) as u32;
            let start = key::chunk(ino, first_gone);
            let end = key::prefix_end(&key::chunk_prefix(ino));
            let mut dead = Vec::new();
            for (k, v) in t.scan(&start, &end, usize::MAX)? {
                if let Some(sl) = Slice::decode_list(&v) {
                    dead.extend(sl.into_iter().filter(|s| s.id != 0));
                }
                t.delete(&k);
            }
            self.trash_slices(t, &dead)?;
            if !length.is_multiple_of(CHUNK_SIZE) {
                // Clamp the chunk that holds the new end, so bytes past it read as zeros
                // when the file grows again.
                let idx = (length / CHUNK_SIZE) as u32;
                let cut = (length % CHUNK_SIZE) as u32;
                let k = key::chunk(ino, idx);
                if let Some(v) = t.get(&k)? {
                    let list = Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                        key: format!("C{ino}/{idx}"),
                        msg: "bad slice list".into(),
                    })?;
                    let mut kept = Vec::with_capacity(list.len());
                    let mut dead = Vec::new();
                    for mut s in list {
                        if s.pos >= cut {
                            if s.id != 0 {
                                dead.push(s);
                            }
                            continue;
                        }
                        s.len = s.len.min(cut - s.pos);
                        kept.push(s);
                    }
                    self.trash_slices(t, &dead)?;
                    if kept.is_empty() {
                        t.delete(&k);
                    } else {
                        t.set(&k, Slice::encode_list(&kept));
                    }
                }
            }
        }
        let delta = align4k(length) as i64 - align4k(a.length) as i64;
        add(t, C_USED_SPACE, delta);
        a.length = length;
        Ok(())
    }

    /// Zero `[off, off+len)` by appending hole slices to each chunk it covers.
    fn zero_range(t: &mut dyn KvTxn, ino: Ino, off: u64, len: u64) -> Result<()> {
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = pos % CHUNK_SIZE;
            let n = (CHUNK_SIZE - cpos).min(end - pos);
            let k = key::chunk(ino, idx);
            if let Some(mut v) = t.get(&k)? {
                Slice::zero(cpos as u32, n as u32).encode(&mut v);
                t.set(&k, v);
            }
            pos += n;
        }
        Ok(())
    }
}

/// The attributes of a regular file whose length or content `ctx` is about to change, read
/// in the transaction: EISDIR for a directory, `other` for any other kind of inode, EACCES
/// without write permission.
fn writable_file(t: &mut dyn KvTxn, ctx: &Context, ino: Ino, other: Errno) -> Result<Attr> {
    let a = get_attr(t, ino)?;
    match a.typ {
        FileType::File => {}
        FileType::Directory => return Err(Errno::EISDIR.into()),
        _ => return Err(other.into()),
    }
    access_ok(ctx, &a, MODE_W)?;
    Ok(a)
}
