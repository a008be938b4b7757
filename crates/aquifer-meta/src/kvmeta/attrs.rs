//! Attributes ([`Attrs`]): getattr, setattr (chmod, chown, utimes) and access, and the
//! permission checks every role makes when the engine enforces them itself (`access_ok`,
//! the sticky-bit rule `sticky_ok`).

use super::{get_attr, now, put_attr, KvMeta};
use crate::encoding as key;
use crate::error::{Errno, Result};
use crate::kv::KvEngine;
use crate::types::*;
use crate::{Attrs, MODE_W, MODE_X};

impl<E: KvEngine> Attrs for KvMeta<E> {
    fn access(&self, ctx: &Context, ino: Ino, mask: u32) -> Result<()> {
        self.alive()?;
        let a = self.getattr(ino)?;
        let ctx = Context {
            check_permission: true,
            ..ctx.clone()
        };
        access_ok(&ctx, &a, mask)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.alive()?;
        let k = key::attr(ino);
        match self.kv.get(&k)? {
            Some(v) => {
                let a = key::decode_attr(ino, &v)?;
                self.hint(k, Some(v));
                Ok(a)
            }
            None => Err(Errno::ENOENT.into()),
        }
    }

    fn setattr(&self, ctx: &Context, ino: Ino, set: &SetAttr) -> Result<Attr> {
        self.alive()?;
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            let ts = now();
            let owner = !ctx.check_permission || ctx.uid == 0 || ctx.uid == a.uid;
            if let Some(uid) = set.uid {
                if ctx.check_permission && ctx.uid != 0 && uid != a.uid {
                    return Err(Errno::EPERM.into());
                }
            }
            if let Some(gid) = set.gid {
                if ctx.check_permission
                    && ctx.uid != 0
                    && (ctx.uid != a.uid || (gid != a.gid && !ctx.in_group(gid)))
                {
                    return Err(Errno::EPERM.into());
                }
            }
            if set.uid.is_some() || set.gid.is_some() {
                if let Some(uid) = set.uid {
                    a.uid = uid;
                }
                if let Some(gid) = set.gid {
                    a.gid = gid;
                }
                // chown drops set-user-ID, and set-group-ID when group-executable.
                if !a.is_dir() && set.mode.is_none() {
                    a.mode &= !(libc::S_ISUID as u16);
                    if a.mode & 0o010 != 0 {
                        a.mode &= !(libc::S_ISGID as u16);
                    }
                }
            }
            if let Some(mode) = set.mode {
                if !owner {
                    return Err(Errno::EPERM.into());
                }
                let mut m = (mode & 0o7777) as u16;
                if ctx.check_permission && ctx.uid != 0 && !ctx.in_group(a.gid) {
                    m &= !(libc::S_ISGID as u16);
                }
                a.mode = m;
            }
            for (which, target) in [(set.atime, &mut a.atime), (set.mtime, &mut a.mtime)] {
                match which {
                    Some(SetTime::Now) => *target = ts,
                    Some(SetTime::At(tm)) => *target = tm,
                    None => {}
                }
            }
            if ctx.check_permission && ctx.uid != 0 && (set.atime.is_some() || set.mtime.is_some())
            {
                let explicit = matches!(set.atime, Some(SetTime::At(_)))
                    || matches!(set.mtime, Some(SetTime::At(_)));
                if ctx.uid != a.uid {
                    if explicit {
                        return Err(Errno::EPERM.into());
                    }
                    access_ok(ctx, &a, MODE_W)?;
                }
            }
            a.ctime = set.ctime.unwrap_or(ts);
            put_attr(t, ino, &a);
            Ok(a)
        })
    }
}

/// POSIX permission check of `mask` (MODE_R|W|X) on `attr` for `ctx`.
pub(super) fn access_ok(ctx: &Context, attr: &Attr, mask: u32) -> Result<()> {
    if !ctx.check_permission || mask == 0 {
        return Ok(());
    }
    if ctx.uid == 0 {
        // Root may execute only when some execute bit is set (or on directories).
        if mask & MODE_X != 0 && !attr.is_dir() && attr.mode & 0o111 == 0 {
            return Err(Errno::EACCES.into());
        }
        return Ok(());
    }
    let mode = attr.mode as u32;
    let perm = if ctx.uid == attr.uid {
        (mode >> 6) & 7
    } else if ctx.in_group(attr.gid) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    if perm & mask == mask {
        Ok(())
    } else {
        Err(Errno::EACCES.into())
    }
}

/// The sticky-bit rule for removing or renaming `victim` out of `dir`.
pub(super) fn sticky_ok(ctx: &Context, dir: &Attr, victim: &Attr) -> Result<()> {
    if ctx.check_permission
        && ctx.uid != 0
        && dir.mode & libc::S_ISVTX as u16 != 0
        && ctx.uid != dir.uid
        && ctx.uid != victim.uid
    {
        return Err(Errno::EPERM.into());
    }
    Ok(())
}
