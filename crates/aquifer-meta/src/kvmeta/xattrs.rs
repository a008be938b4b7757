//! Extended attributes ([`Xattrs`]): get, set, list, remove, and which names are allowed
//! (`check_xattr_name`: user., trusted., security.; no POSIX ACLs).

use super::attrs::access_ok;
use super::{get_attr, now, put_attr, KvMeta};
use crate::encoding as key;
use crate::error::{Errno, Result};
use crate::kv::KvEngine;
use crate::types::*;
use crate::{Attrs, Xattrs, MODE_W};

impl<E: KvEngine> Xattrs for KvMeta<E> {
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.alive()?;
        check_xattr_name(name)?;
        match self.kv.get(&key::xattr(ino, name))? {
            Some(v) => Ok(v),
            None => {
                self.getattr(ino)?;
                Err(Errno::ENODATA.into())
            }
        }
    }

    fn setxattr(
        &self,
        ctx: &Context,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.alive()?;
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(Errno::E2BIG.into());
        }
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            if name.starts_with(b"user.") {
                if !matches!(a.typ, FileType::File | FileType::Directory) {
                    return Err(Errno::EPERM.into());
                }
                access_ok(ctx, &a, MODE_W)?;
            } else if name.starts_with(b"trusted.") && ctx.check_permission && ctx.uid != 0 {
                return Err(Errno::EPERM.into());
            }
            let k = key::xattr(ino, name);
            let exists = t.get(&k)?.is_some();
            if flags & XATTR_CREATE != 0 && exists {
                return Err(Errno::EEXIST.into());
            }
            if flags & XATTR_REPLACE != 0 && !exists {
                return Err(Errno::ENODATA.into());
            }
            t.set(&k, value.to_vec());
            a.ctime = now();
            put_attr(t, ino, &a);
            Ok(())
        })
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        self.alive()?;
        self.getattr(ino)?;
        let p = key::xattr_prefix(ino);
        let mut out = Vec::new();
        for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
            out.extend_from_slice(&k[p.len()..]);
            out.push(0);
        }
        Ok(out)
    }

    fn removexattr(&self, ctx: &Context, ino: Ino, name: &[u8]) -> Result<()> {
        self.alive()?;
        check_xattr_name(name)?;
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            if name.starts_with(b"user.") {
                access_ok(ctx, &a, MODE_W)?;
            }
            let k = key::xattr(ino, name);
            if t.get(&k)?.is_none() {
                return Err(Errno::ENODATA.into());
            }
            t.delete(&k);
            a.ctime = now();
            put_attr(t, ino, &a);
            Ok(())
        })
    }
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() {
        return Err(Errno::EINVAL.into());
    }
    if name.len() > MAX_XATTR_NAME {
        return Err(Errno::ERANGE.into());
    }
    let known = [&b"user."[..], b"trusted.", b"security.", b"system."];
    if !known
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        return Err(Errno::EOPNOTSUPP.into());
    }
    // POSIX ACLs are not supported; saying so lets cp -a and tar carry on.
    if name.starts_with(b"system.") {
        return Err(Errno::EOPNOTSUPP.into());
    }
    Ok(())
}
