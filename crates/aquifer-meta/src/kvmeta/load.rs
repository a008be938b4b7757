//! `aquifer load` ([`Load`]): filling a freshly formatted volume from a dump, inode by inode,
//! then the id counters and usage.

use super::chunks::ForgetChunks;
use super::ids::IdBatch;
use super::namespace::check_name;
use super::{put_attr, KvMeta, C_NEXT_INODE, C_NEXT_SLICE, C_USED_INODES, C_USED_SPACE};
use crate::encoding as key;
use crate::error::{MetaError, Result};
use crate::kv::KvEngine;
use crate::types::*;
use crate::Load;

impl<E: KvEngine> Load for KvMeta<E> {
    fn load_inode(&self, ino: Ino, inode: &crate::LoadInode) -> Result<()> {
        let _forget = ForgetChunks(self, ino);
        self.load_inode_impl(ino, inode)
    }

    fn load_entries(&self, parent: Ino, entries: &[(Vec<u8>, Ino, FileType)]) -> Result<()> {
        for part in entries.chunks(512) {
            self.txn(|t| {
                for (name, ino, typ) in part {
                    check_name(name)?;
                    t.set(&key::dentry(parent, name), key::encode_dentry(*typ, *ino));
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn load_finish(
        &self,
        next_inode: Ino,
        next_slice: u64,
        used_space: u64,
        inodes: u64,
    ) -> Result<()> {
        self.txn(|t| {
            for (name, v) in [
                (C_NEXT_INODE, next_inode as i64),
                (C_NEXT_SLICE, next_slice as i64),
                (C_USED_SPACE, used_space as i64),
                (C_USED_INODES, inodes as i64),
            ] {
                t.set(&key::counter(name), v.to_be_bytes().to_vec());
            }
            Ok(())
        })?;
        // Ids handed out before the load came from the old counters.
        *self.inos.lock().unwrap() = IdBatch::default();
        let mut s = self.slices.lock().unwrap();
        (s.next, s.end, s.high) = (0, 0, 0);
        drop(s);
        self.kv.sync()
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// The load operations of [`Load`], written once here for every engine.
    fn load_inode_impl(&self, ino: Ino, inode: &crate::LoadInode) -> Result<()> {
        let attr = inode
            .attr
            .as_ref()
            .ok_or_else(|| MetaError::Config(format!("inode {ino} has no attributes")))?;
        self.txn(|t| {
            put_attr(t, ino, attr);
            if let Some(target) = &inode.symlink {
                t.set(&key::symlink(ino), target.clone());
            }
            for (name, value) in &inode.xattrs {
                t.set(&key::xattr(ino, name), value.clone());
            }
            for (idx, slices) in &inode.chunks {
                t.set(&key::chunk(ino, *idx), Slice::encode_list(slices));
            }
            Ok(())
        })
    }
}
