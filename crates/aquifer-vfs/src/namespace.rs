//! The namespace as this mount shows it: lookups and attributes (with the sizes of
//! buffered writes folded in), node creation, unlink, rename, links, xattrs, statfs. Most
//! calls go straight to the metadata engine; what is here is what buffering changes.

use crate::{Result, Vfs};
use aquifer_meta::*;

impl Vfs {
    pub fn lookup(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)> {
        // The kernel asks for "." and ".." of a node id when it decodes a file handle
        // (open_by_handle_at, NFS re-export) of an inode it no longer has in its cache.
        if name == b"." {
            return Ok((parent, self.getattr(parent)?));
        }
        if name == b".." {
            let a = self.meta.getattr(parent)?;
            let up = if parent == ROOT_INO || a.parent == 0 {
                ROOT_INO
            } else {
                a.parent
            };
            return Ok((up, self.getattr(up)?));
        }
        let (ino, a) = self.meta.lookup(ctx, parent, name)?;
        let pending = self.pending_end(ino);
        // Re-read the attributes after the buffer (see pending_end) when a write is buffered.
        let a = if pending > 0 {
            self.meta.getattr(ino)?
        } else {
            a
        };
        Ok((ino, Self::view(a, pending)))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let pending = self.pending_end(ino);
        let a = self.meta.getattr(ino)?;
        Ok(Self::view(a, pending))
    }

    pub fn setattr(
        &self,
        ctx: &Context,
        ino: Ino,
        set: &SetAttr,
        size: Option<u64>,
    ) -> Result<Attr> {
        let mut attr = None;
        if let (Some(len), None) = (size, set.mtime) {
            attr = Some(self.truncate_file(ctx, ino, len)?);
        } else if size.is_some() || set.mtime.is_some() {
            // Buffered writes must land before: their commit would otherwise stamp a later
            // mtime over the one being set (cp -a, tar, rsync set times after writing).
            self.settle(ino)?;
            if let Some(size) = size {
                attr = Some(self.meta.truncate(ctx, ino, size)?);
            }
        }
        if set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some()
            || set.ctime.is_some()
        {
            attr = Some(self.meta.setattr(ctx, ino, set)?);
        }
        match attr {
            // Buffered writes, if any, were committed above or are covered by getattr.
            Some(a) if size.is_some() || set.mtime.is_some() => Ok(a),
            _ => self.getattr(ino),
        }
    }

    pub fn mknod(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Attr)> {
        let typ = FileType::from_mode(mode).ok_or(Errno::EINVAL)?;
        if typ == FileType::Directory || typ == FileType::Symlink {
            return Err(Errno::EINVAL);
        }
        Ok(self.meta.mknod(ctx, parent, name, typ, mode, umask, rdev)?)
    }

    pub fn mkdir(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> Result<(Ino, Attr)> {
        Ok(self
            .meta
            .mknod(ctx, parent, name, FileType::Directory, mode, umask, 0)?)
    }

    pub fn unlink(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        Ok(self.meta.unlink(ctx, parent, name)?)
    }

    pub fn rmdir(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        Ok(self.meta.rmdir(ctx, parent, name)?)
    }

    pub fn rename(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        Ok(self
            .meta
            .rename(ctx, parent, name, new_parent, new_name, flags)?)
    }

    pub fn link(&self, ctx: &Context, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.meta.link(ctx, ino, parent, name)?;
        self.getattr(ino)
    }

    pub fn symlink(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<(Ino, Attr)> {
        Ok(self.meta.symlink(ctx, parent, name, target)?)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.meta.readlink(ino)?)
    }

    pub fn access(&self, ctx: &Context, ino: Ino, mask: u32) -> Result<()> {
        Ok(self.meta.access(ctx, ino, mask)?)
    }

    pub fn statfs(&self) -> Result<StatFs> {
        Ok(self.meta.statfs()?)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        Ok(self.meta.getxattr(ino, name)?)
    }

    pub fn setxattr(
        &self,
        ctx: &Context,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        Ok(self.meta.setxattr(ctx, ino, name, value, flags)?)
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.meta.listxattr(ino)?)
    }

    pub fn removexattr(&self, ctx: &Context, ino: Ino, name: &[u8]) -> Result<()> {
        Ok(self.meta.removexattr(ctx, ino, name)?)
    }
}
