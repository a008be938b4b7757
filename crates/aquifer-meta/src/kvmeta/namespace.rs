//! Names ([`Namespace`]): where lookup, create (`create_node`, shared by mknod, symlink and
//! create_open), link, unlink, rmdir, rename and readdir live. Each change of names is one
//! transaction; a directory's times follow its entries (`touch_parent`), and a name's last
//! link dropped frees its inode unless a session holds it open (`drop_link`).

use super::attrs::{access_ok, sticky_ok};
use super::{add, get_attr, get_dentry, now, put_attr, KvMeta, C_USED_INODES};
use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::types::*;
use crate::{Attrs, Namespace, MODE_R, MODE_W, MODE_X};

const MAX_LINKS: u32 = 65000;

/// On a shared engine a directory's times are not rewritten by a change of an entry made
/// within this long of the last rewrite: every create, unlink and rename in a directory
/// would otherwise write the directory's attributes, and concurrent changes in one
/// directory from many clients would all conflict on that one key. JuiceFS skips 100 ms;
/// 5 ms keeps most of the gain and stays below what programs that sleep between a change
/// and a look at the directory's times (pjdfstest naps 10 ms) can see.
const DIR_TIME_SLACK_NS: i128 = 5_000_000;

impl<E: KvEngine> Namespace for KvMeta<E> {
    fn lookup(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)> {
        self.alive()?;
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        if !ctx.check_permission && !matches!(name, b"." | b"..") {
            // The kernel checked the search permission and only looks up in directories:
            // the entry and its inode decide, read together (one round trip on Redis).
            let k = key::dentry(parent, name);
            return match self.kv.get_entry_attr(&k)? {
                (Some(d), Some(a)) => {
                    let ino = key::decode_dentry(&k, &d)?.1;
                    let attr = key::decode_attr(ino, &a)?;
                    self.hint(key::attr(ino), Some(a));
                    self.hint(k, Some(d));
                    Ok((ino, attr))
                }
                // Unlinked between the two reads.
                (Some(_), None) => Err(Errno::ENOENT.into()),
                (None, _) => {
                    // ENOTDIR or ENOENT of the parent, as before.
                    let pattr = self.getattr(parent)?;
                    if !pattr.is_dir() {
                        return Err(Errno::ENOTDIR.into());
                    }
                    Err(Errno::ENOENT.into())
                }
            };
        }
        let pattr = self.getattr(parent)?;
        if !pattr.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        access_ok(ctx, &pattr, MODE_X)?;
        let ino = match name {
            b"." => parent,
            b".." => {
                if parent == ROOT_INO {
                    ROOT_INO
                } else {
                    pattr.parent
                }
            }
            _ => {
                let k = key::dentry(parent, name);
                match self.kv.get(&k)? {
                    Some(v) => key::decode_dentry(&k, &v)?.1,
                    None => return Err(Errno::ENOENT.into()),
                }
            }
        };
        Ok((ino, self.getattr(ino)?))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        typ: FileType,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Attr)> {
        self.alive()?;
        self.create_node(ctx, parent, name, typ, mode & !umask, rdev, None, false)
    }

    fn symlink(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<(Ino, Attr)> {
        self.alive()?;
        if target.is_empty() {
            return Err(Errno::ENOENT.into());
        }
        if target.len() >= MAX_SYMLINK {
            return Err(Errno::ENAMETOOLONG.into());
        }
        self.create_node(
            ctx,
            parent,
            name,
            FileType::Symlink,
            0o777,
            0,
            Some(target),
            false,
        )
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.alive()?;
        match self.kv.get(&key::symlink(ino))? {
            Some(v) => Ok(v),
            None => {
                let a = self.getattr(ino)?;
                if a.typ != FileType::Symlink {
                    return Err(Errno::EINVAL.into());
                }
                Err(MetaError::Corrupt {
                    key: format!("L{ino}"),
                    msg: "symlink without target".into(),
                })
            }
        }
    }

    fn link(&self, ctx: &Context, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.alive()?;
        check_name(name)?;
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            if a.is_dir() {
                return Err(Errno::EPERM.into());
            }
            if a.nlink >= MAX_LINKS {
                return Err(Errno::EMLINK.into());
            }
            if a.nlink == 0 {
                return Err(Errno::ENOENT.into());
            }
            let mut p = get_attr(t, parent)?;
            may_add_entry(ctx, &p)?;
            if get_dentry(t, parent, name)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            let ts = now();
            t.set(&key::dentry(parent, name), key::encode_dentry(a.typ, ino));
            touch_dir(&mut p, ts);
            put_attr(t, parent, &p);
            a.nlink += 1;
            a.parent = 0;
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok(a)
        })
    }

    fn unlink(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        self.alive()?;
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        let (pk, dk) = (key::attr(parent), key::dentry(parent, name));
        self.txn(|t| {
            let got = t.get_many(&[&pk, &dk])?;
            let mut p = match &got[0] {
                Some(v) => key::decode_attr(parent, v)?,
                None => return Err(Errno::ENOENT.into()),
            };
            if !p.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            access_ok(ctx, &p, MODE_W | MODE_X)?;
            let (typ, ino) = match &got[1] {
                Some(v) => key::decode_dentry(&dk, v)?,
                None => return Err(Errno::ENOENT.into()),
            };
            if typ == FileType::Directory {
                return Err(Errno::EISDIR.into());
            }
            let a = get_attr(t, ino)?;
            sticky_ok(ctx, &p, &a)?;
            let ts = now();
            t.delete(&key::dentry(parent, name));
            self.touch_parent(t, parent, &mut p, ts);
            self.drop_link(t, ino, a, ts)
        })
    }

    fn rmdir(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        self.alive()?;
        match name {
            b"." => return Err(Errno::EINVAL.into()),
            b".." => return Err(Errno::ENOTEMPTY.into()),
            _ => {}
        }
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        self.txn(|t| {
            let mut p = get_attr(t, parent)?;
            if !p.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            access_ok(ctx, &p, MODE_W | MODE_X)?;
            let (typ, ino) = get_dentry(t, parent, name)?.ok_or(Errno::ENOENT)?;
            if typ != FileType::Directory {
                return Err(Errno::ENOTDIR.into());
            }
            let a = get_attr(t, ino)?;
            sticky_ok(ctx, &p, &a)?;
            let dp = key::dentry_prefix(ino);
            if !t.scan(&dp, &key::prefix_end(&dp), 1)?.is_empty() {
                return Err(Errno::ENOTEMPTY.into());
            }
            let ts = now();
            t.delete(&key::dentry(parent, name));
            p.nlink = p.nlink.saturating_sub(1);
            touch_dir(&mut p, ts);
            put_attr(t, parent, &p);
            self.destroy_inode(t, ino, &a)
        })
    }

    fn rename(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.alive()?;
        if flags & RENAME_WHITEOUT != 0 || flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0 {
            return Err(Errno::EINVAL.into());
        }
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        check_name(new_name)?;
        if matches!(name, b"." | b"..") {
            return Err(Errno::EINVAL.into());
        }
        self.txn(|t| {
            let mut sp = get_attr(t, parent)?;
            if !sp.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            let (styp, sino) = get_dentry(t, parent, name)?.ok_or(Errno::ENOENT)?;
            let mut sa = get_attr(t, sino)?;
            let mut dp = if new_parent == parent {
                sp.clone()
            } else {
                get_attr(t, new_parent)?
            };
            if !dp.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            if dp.nlink == 0 {
                return Err(Errno::ENOENT.into());
            }
            let dp_links = dp.nlink;
            access_ok(ctx, &sp, MODE_W | MODE_X)?;
            access_ok(ctx, &dp, MODE_W | MODE_X)?;
            sticky_ok(ctx, &sp, &sa)?;
            let dst = get_dentry(t, new_parent, new_name)?;
            if parent == new_parent && name == new_name {
                return if flags & RENAME_NOREPLACE != 0 {
                    Err(Errno::EEXIST.into())
                } else {
                    Ok(())
                };
            }
            if let Some((_, dino)) = dst {
                if dino == sino {
                    // Two links to one inode: POSIX says do nothing.
                    return if flags & RENAME_NOREPLACE != 0 {
                        Err(Errno::EEXIST.into())
                    } else {
                        Ok(())
                    };
                }
            }
            if flags & RENAME_EXCHANGE != 0 && dst.is_none() {
                return Err(Errno::ENOENT.into());
            }
            if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
                return Err(Errno::EEXIST.into());
            }
            // A directory may not move into its own subtree.
            let moves_dir = |t: &mut dyn KvTxn, dir: Ino, target_parent: Ino| -> Result<()> {
                let mut cur = target_parent;
                let mut depth = 0;
                while cur != ROOT_INO && depth < 100_000 {
                    if cur == dir {
                        return Err(Errno::EINVAL.into());
                    }
                    cur = get_attr(t, cur)?.parent;
                    depth += 1;
                }
                if cur == dir {
                    return Err(Errno::EINVAL.into());
                }
                Ok(())
            };
            if styp == FileType::Directory && parent != new_parent {
                moves_dir(t, sino, new_parent)?;
                // Moving a directory rewrites its "..": needs write permission on it.
                access_ok(ctx, &sa, MODE_W)?;
            }
            let ts = now();
            if flags & RENAME_EXCHANGE != 0 {
                let (dtyp, dino) = dst.ok_or(Errno::ENOENT)?;
                let mut da = get_attr(t, dino)?;
                sticky_ok(ctx, &dp, &da)?;
                if dtyp == FileType::Directory && parent != new_parent {
                    moves_dir(t, dino, parent)?;
                }
                t.set(&key::dentry(parent, name), key::encode_dentry(dtyp, dino));
                t.set(
                    &key::dentry(new_parent, new_name),
                    key::encode_dentry(styp, sino),
                );
                if parent != new_parent {
                    let sdir = (styp == FileType::Directory) as i64;
                    let ddir = (dtyp == FileType::Directory) as i64;
                    sp.nlink = (sp.nlink as i64 - sdir + ddir) as u32;
                    dp.nlink = (dp.nlink as i64 - ddir + sdir) as u32;
                    if sa.nlink == 1 || sa.is_dir() {
                        sa.parent = new_parent;
                    }
                    if da.nlink == 1 || da.is_dir() {
                        da.parent = parent;
                    }
                }
                sa.ctime = ts;
                da.ctime = ts;
                put_attr(t, dino, &da);
            } else {
                if let Some((dtyp, dino)) = dst {
                    let da = get_attr(t, dino)?;
                    sticky_ok(ctx, &dp, &da)?;
                    if styp == FileType::Directory {
                        if dtyp != FileType::Directory {
                            return Err(Errno::ENOTDIR.into());
                        }
                        let pfx = key::dentry_prefix(dino);
                        if !t.scan(&pfx, &key::prefix_end(&pfx), 1)?.is_empty() {
                            return Err(Errno::ENOTEMPTY.into());
                        }
                    } else if dtyp == FileType::Directory {
                        return Err(Errno::EISDIR.into());
                    }
                    if dtyp == FileType::Directory {
                        dp.nlink = dp.nlink.saturating_sub(1);
                        self.destroy_inode(t, dino, &da)?;
                    } else {
                        self.drop_link(t, dino, da, ts)?;
                    }
                }
                t.delete(&key::dentry(parent, name));
                t.set(
                    &key::dentry(new_parent, new_name),
                    key::encode_dentry(styp, sino),
                );
                if parent != new_parent {
                    if styp == FileType::Directory {
                        sp.nlink = sp.nlink.saturating_sub(1);
                        dp.nlink += 1;
                    }
                    if sa.nlink == 1 || sa.is_dir() {
                        sa.parent = new_parent;
                    }
                }
                sa.ctime = ts;
            }
            if parent == new_parent && dp.nlink == dp_links {
                // A rename within one directory changes only its times.
                self.touch_parent(t, parent, &mut dp, ts);
            } else if parent == new_parent {
                // One directory: nlink changed only through `dp` (a replaced subdirectory).
                touch_dir(&mut dp, ts);
                put_attr(t, parent, &dp);
            } else {
                touch_dir(&mut sp, ts);
                touch_dir(&mut dp, ts);
                put_attr(t, parent, &sp);
                put_attr(t, new_parent, &dp);
            }
            put_attr(t, sino, &sa);
            Ok(())
        })
    }

    fn readdir(&self, ctx: &Context, ino: Ino, plus: bool) -> Result<Vec<DirEntry>> {
        self.alive()?;
        Ok(self.readdir_page(ctx, ino, b"", usize::MAX, plus)?.entries)
    }

    fn readdir_page(
        &self,
        ctx: &Context,
        ino: Ino,
        after: &[u8],
        limit: usize,
        plus: bool,
    ) -> Result<DirPage> {
        self.alive()?;
        let a = self.getattr(ino)?;
        if !a.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        access_ok(ctx, &a, MODE_R)?;
        if limit == 0 {
            return Ok(DirPage::default());
        }
        let p = key::dentry_prefix(ino);
        let start = if after.is_empty() {
            p.clone()
        } else {
            // The first key after `after` itself: the cursor is a name, not a count, so
            // entries removed or created before it do not shift the rest.
            let mut k = key::dentry(ino, after);
            k.push(0);
            k
        };
        // One row more than the page tells whether this page is the last one, without
        // trusting the page's length (and without a round trip for an empty last page).
        let mut rows = self
            .kv
            .scan(&start, &key::prefix_end(&p), limit.saturating_add(1))?;
        let end = rows.len() <= limit;
        rows.truncate(limit);
        let mut entries = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            let (typ, child) = key::decode_dentry(k, v)?;
            entries.push((k[p.len()..].to_vec(), typ, child));
        }
        // The attributes of a page in one read (one round trip on Redis), not one each.
        let attrs = if plus {
            let keys: Vec<Vec<u8>> = entries.iter().map(|e| key::attr(e.2)).collect();
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
            self.kv.get_many(&refs)?
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(entries.len());
        for (i, (name, typ, child)) in entries.into_iter().enumerate() {
            // `None`: removed since the entry was read. It stays in the page (without
            // attributes) so that the page still ends at the last name scanned: the caller
            // continues from there and decides what to show of it.
            let attr = match attrs.get(i) {
                Some(Some(v)) => Some(key::decode_attr(child, v)?),
                _ => None,
            };
            out.push(DirEntry {
                name,
                ino: child,
                typ,
                attr,
            });
        }
        Ok(DirPage { entries: out, end })
    }
}

impl<E: KvEngine> KvMeta<E> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_node(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        typ: FileType,
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
        open: bool,
    ) -> Result<(Ino, Attr)> {
        check_name(name)?;
        let sid = self.sid();
        let shared = !self.kv.exclusive();
        for _ in 0..8 {
            let ino = self.alloc_ino()?;
            let mut taken = false;
            // The new inode is opened in the creating transaction: no other client can know it
            // before, and the open costs no transaction of its own. On an exclusive engine
            // it is counted once committed (the kernel's lock on the directory keeps an
            // unlink of the new name out until the create is answered), and not under the
            // shard's lock: transactions take it (has_holders).
            let mut opened = (open && shared).then(|| self.open_shard(ino));
            let (_, max_inodes) = self.limits();
            let (pk, dk, ak) = (key::attr(parent), key::dentry(parent, name), key::attr(ino));
            let r = self
                .txn(|t| {
                    taken = false;
                    // The kernel looked the name up before asking to create it.
                    t.guess(&dk, None);
                    // The parent and the name in one read (one round trip on Redis). On a shared
                    // engine the new inode's attributes too, guessed absent (no round trip): an
                    // id counter a failover set back may hand out an inode in use.
                    let got = if shared {
                        t.guess(&ak, None);
                        let got = t.get_many(&[&pk, &dk, &ak])?;
                        if got[2].is_some() {
                            taken = true;
                            return Err(Errno::EEXIST.into());
                        }
                        got
                    } else {
                        t.get_many(&[&pk, &dk])?
                    };
                    let mut p = match &got[0] {
                        Some(v) => key::decode_attr(parent, v)?,
                        None => return Err(Errno::ENOENT.into()),
                    };
                    may_add_entry(ctx, &p)?;
                    if got[1].is_some() {
                        return Err(Errno::EEXIST.into());
                    }
                    if typ == FileType::Directory && p.nlink >= MAX_LINKS {
                        return Err(Errno::EMLINK.into());
                    }
                    if max_inodes > 0 && self.counter(C_USED_INODES)?.max(0) as u64 >= max_inodes {
                        return Err(Errno::ENOSPC.into());
                    }
                    add(t, C_USED_INODES, 1);
                    let mut a = Attr::new(typ, mode as u16, ctx.uid, ctx.gid);
                    if p.mode & libc::S_ISGID as u16 != 0 {
                        // BSD group semantics in a set-group-ID directory.
                        a.gid = p.gid;
                        if typ == FileType::Directory {
                            a.mode |= libc::S_ISGID as u16;
                        }
                    }
                    if matches!(typ, FileType::BlockDev | FileType::CharDev) {
                        a.rdev = rdev;
                    }
                    a.parent = parent;
                    if let Some(target) = target {
                        a.length = target.len() as u64;
                        t.set(&key::symlink(ino), target.to_vec());
                    }
                    put_attr(t, ino, &a);
                    t.set(&key::dentry(parent, name), key::encode_dentry(typ, ino));
                    if typ == FileType::Directory {
                        p.nlink += 1;
                        touch_dir(&mut p, a.ctime);
                        put_attr(t, parent, &p);
                    } else {
                        self.touch_parent(t, parent, &mut p, a.ctime);
                    }
                    if open && shared {
                        self.check_session(t)?;
                        t.set(&key::holder(ino, sid), Vec::new());
                        t.set(&key::sustained(sid, ino), Vec::new());
                    }
                    Ok((ino, a))
                })
                .inspect(|_| {
                    if let Some(o) = opened.as_mut() {
                        *o.entry(ino).or_insert(0) += 1;
                    } else if open {
                        *self.open_shard(ino).entry(ino).or_insert(0) += 1;
                    }
                    // A new file has no slice list: its first write need not read one.
                    if typ == FileType::File {
                        self.hint(key::chunk(ino, 0), None);
                    }
                });
            if !(shared && taken) {
                return r;
            }
            // A failover undid the increment that handed `ino` out, and another client
            // took it again (see `fresh_batch`): move the counter past it and take another.
            let mut b = self.inos.lock().unwrap();
            b.high = b.high.max(ino + 1);
            b.epoch = u64::MAX;
        }
        Err(MetaError::engine(
            self.kv.name(),
            "the inode counter keeps handing out inodes in use",
        ))
    }

    /// Set a directory's mtime and ctime to `ts` for a change of its entries alone, and
    /// write its attributes — unless, on a shared engine, its times are less than
    /// [`DIR_TIME_SLACK_NS`] old (see there).
    fn touch_parent(&self, t: &mut dyn KvTxn, ino: Ino, p: &mut Attr, ts: Time) {
        let age = ns(ts) - ns(p.mtime).max(ns(p.ctime));
        if !self.kv.exclusive() && (0..DIR_TIME_SLACK_NS).contains(&age) {
            return;
        }
        touch_dir(p, ts);
        put_attr(t, ino, p);
    }

    /// Drop one link of `ino` (its dentry is already removed). Deletes the inode at zero links
    /// unless a session has it open, in which case the last close frees it.
    fn drop_link(&self, t: &mut dyn KvTxn, ino: Ino, mut a: Attr, ts: Time) -> Result<()> {
        a.nlink = a.nlink.saturating_sub(1);
        a.ctime = ts;
        if a.nlink > 0 || self.has_holders(t, ino)? {
            put_attr(t, ino, &a);
        } else {
            self.destroy_inode(t, ino, &a)?;
        }
        Ok(())
    }
}

/// Whether `ctx` may add a name to the directory whose attributes are `p` (create, link):
/// ENOTDIR, ENOENT once it was removed, EACCES without write and search permission.
fn may_add_entry(ctx: &Context, p: &Attr) -> Result<()> {
    if !p.is_dir() {
        return Err(Errno::ENOTDIR.into());
    }
    if p.nlink == 0 {
        return Err(Errno::ENOENT.into());
    }
    access_ok(ctx, p, MODE_W | MODE_X)
}

pub(super) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Errno::ENAMETOOLONG.into());
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL.into());
    }
    Ok(())
}

fn ns(t: Time) -> i128 {
    t.sec as i128 * 1_000_000_000 + t.nsec as i128
}

fn touch_dir(a: &mut Attr, t: Time) {
    a.mtime = t;
    a.ctime = t;
}
