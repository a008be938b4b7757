//! Where a lock is taken ([`Locks`]): flock and fcntl locks are kept per inode in two tables
//! (their records and conflict rules are `crate::locks`), changed in one transaction by
//! `lock_txn`, with a per-session index (`K` sid ino) so that a dead session's locks are
//! found and dropped without scanning every lock (`drop_session_locks`, from `sessions.rs`).

use super::{get_attr, KvMeta};
use crate::encoding as key;
use crate::error::{Errno, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::locks::{self, PLock, F_UNLCK};
use crate::types::*;
use crate::Locks;

impl<E: KvEngine> Locks for KvMeta<E> {
    fn flock(&self, ino: Ino, owner: u64, typ: i32) -> Result<()> {
        self.alive()?;
        let sid = self.sid();
        self.lock_txn(ino, typ != F_UNLCK, |fl, _| {
            *fl = locks::flock_apply(std::mem::take(fl), sid, owner, typ)?;
            Ok(())
        })
    }

    fn getlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<Option<PLock>> {
        self.alive()?;
        locks::check_range(lock)?;
        let sid = self.sid();
        let recs = locks::decode_plocks(&self.kv.get(&key::plocks(ino))?.unwrap_or_default());
        Ok(locks::conflict(&recs, sid, owner, lock))
    }

    fn setlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<()> {
        self.alive()?;
        locks::check_range(lock)?;
        let sid = self.sid();
        self.lock_txn(ino, lock.typ != F_UNLCK, |_, pl| {
            if lock.typ != F_UNLCK && locks::conflict(pl, sid, owner, lock).is_some() {
                return Err(Errno::EAGAIN.into());
            }
            *pl = locks::apply(std::mem::take(pl), sid, owner, *lock);
            Ok(())
        })
    }

    fn release_locks(&self, ino: Ino, owner: u64) -> Result<()> {
        if !self.locked.lock().unwrap().contains(&ino) {
            // No lock of this session on the inode: nothing to ask the engine.
            return Ok(());
        }
        // A lost session's locks were released by the client that reaped it.
        self.alive()?;
        let sid = self.sid();
        self.lock_txn(ino, false, |fl, pl| {
            fl.retain(|r| (r.0, r.1) != (sid, owner));
            pl.retain(|r| (r.sid, r.owner) != (sid, owner));
            Ok(())
        })
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// Change the lock tables of `ino` in one transaction, keeping the session's lock index
    /// and this client's set of locked inodes true. `taking`: the change may add a lock (the
    /// inode must exist).
    fn lock_txn(
        &self,
        ino: Ino,
        taking: bool,
        mut f: impl FnMut(&mut Vec<(u64, u64, i32)>, &mut Vec<locks::PRecord>) -> Result<()>,
    ) -> Result<()> {
        let sid = self.sid();
        let mut locked = self.locked.lock().unwrap();
        let holds = self.txn(|t| {
            if taking {
                get_attr(t, ino)?;
            }
            // A lock recorded for a session another client reaped would never be released.
            self.check_session(t)?;
            Self::edit_locks(t, ino, sid, &mut f)
        })?;
        if holds {
            locked.insert(ino);
        } else {
            locked.remove(&ino);
        }
        Ok(())
    }

    /// Change the lock tables of `ino` within a transaction (both read in one round trip),
    /// keeping session `sid`'s lock index true. Returns whether `sid` still holds a lock.
    fn edit_locks(t: &mut dyn KvTxn, ino: Ino, sid: u64, f: &mut LockEdit<'_>) -> Result<bool> {
        let (fk, pk) = (key::flocks(ino), key::plocks(ino));
        let got = t.get_many(&[&fk, &pk])?;
        let mut fl = locks::decode_flocks(got[0].as_deref().unwrap_or_default());
        let mut pl = locks::decode_plocks(got[1].as_deref().unwrap_or_default());
        f(&mut fl, &mut pl)?;
        Self::put_flocks(t, ino, &fl);
        Self::put_plocks(t, ino, &pl);
        Self::index_locks(t, sid, ino, &fl, &pl);
        Ok(fl.iter().any(|r| r.0 == sid) || pl.iter().any(|r| r.sid == sid))
    }

    /// Drop every lock record of `sid` on `ino`.
    pub(super) fn drop_session_locks(t: &mut dyn KvTxn, sid: u64, ino: Ino) -> Result<()> {
        Self::edit_locks(t, ino, sid, &mut |fl, pl| {
            fl.retain(|r| r.0 != sid);
            pl.retain(|r| r.sid != sid);
            Ok(())
        })
        .map(|_| ())
    }

    /// Keep the per-session lock index true: `K sid ino` exists while `sid` holds a lock on
    /// `ino`, so a dead session's locks are found without scanning every lock.
    fn index_locks(
        t: &mut dyn KvTxn,
        sid: u64,
        ino: Ino,
        flocks: &[(u64, u64, i32)],
        plocks: &[locks::PRecord],
    ) {
        if flocks.iter().any(|r| r.0 == sid) || plocks.iter().any(|r| r.sid == sid) {
            t.set(&key::lock_index(sid, ino), Vec::new());
        } else {
            t.delete(&key::lock_index(sid, ino));
        }
    }

    fn put_flocks(t: &mut dyn KvTxn, ino: Ino, recs: &[(u64, u64, i32)]) {
        if recs.is_empty() {
            t.delete(&key::flocks(ino));
        } else {
            t.set(&key::flocks(ino), locks::encode_flocks(recs));
        }
    }

    fn put_plocks(t: &mut dyn KvTxn, ino: Ino, recs: &[locks::PRecord]) {
        if recs.is_empty() {
            t.delete(&key::plocks(ino));
        } else {
            t.set(&key::plocks(ino), locks::encode_plocks(recs));
        }
    }
}

/// A change of an inode's flock and fcntl lock tables.
type LockEdit<'a> =
    dyn FnMut(&mut Vec<(u64, u64, i32)>, &mut Vec<locks::PRecord>) -> Result<()> + 'a;
