//! POSIX (fcntl) and flock(2) locks as a mount serves them: arbitrated by the metadata
//! engine so they hold across mounts; blocking requests wait in [`crate::lockwait`].

use crate::lockwait::{LockWait, Woken};
use crate::{Handle, Result, Vfs};
use aquifer_meta::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Vfs {
    /// F_GETLK: the first lock of another owner (on any mount) that conflicts with `lock`.
    pub fn getlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<Option<PLock>> {
        Ok(self.meta.getlk(ino, owner, lock)?)
    }

    /// F_SETLK (a whole-file flock(2) lock with `flock`) through handle `fh`: the lock is
    /// arbitrated by the metadata engine, so it holds across mounts. A conflict is EAGAIN.
    pub fn setlk(&self, fh: u64, ino: Ino, owner: u64, lock: &PLock, flock: bool) -> Result<()> {
        if !flock && lock.typ != libc::F_UNLCK {
            // Before the lock is taken: a descriptor opened once it may be held is flushed
            // at close, so its close can drop the lock.
            self.posix_locks_taken.store(true, Ordering::SeqCst);
            // And the handle remembers the owner: a read-only handle opened before carries
            // FOPEN_NOFLUSH, so the lock is dropped at its release instead (see release).
            if let Ok(h) = self.handle(fh) {
                if let Handle::File(f) = &*h {
                    let mut owners = f.lock_owners.lock();
                    if !owners.contains(&owner) {
                        owners.push(owner);
                    }
                }
            }
        }
        let r = if flock {
            self.meta.flock(ino, owner, lock.typ)
        } else {
            self.meta.setlk(ino, owner, lock)
        };
        if r.is_ok() && lock.typ == libc::F_UNLCK {
            self.lock_waits.released();
        }
        Ok(r?)
    }

    /// Register FUSE request `request` as a blocking lock request about to wait (see
    /// [`lockwait`]): ENOLCK when too many wait already or the mount is going away.
    pub fn begin_lock_wait(&self, request: u64) -> Result<LockWait> {
        self.lock_waits.begin(request)
    }

    /// F_SETLKW: [`Vfs::setlk`] until the lock is granted. The waiter asks again after a
    /// pause that grows to 50 ms (at once when a lock on this mount is released), and ends
    /// with EINTR when [`Vfs::interrupt`] names its request, with ENOLCK at shutdown.
    pub fn setlkw(
        &self,
        wait: LockWait,
        fh: u64,
        ino: Ino,
        owner: u64,
        lock: &PLock,
        flock: bool,
    ) -> Result<()> {
        let mut pause = Duration::from_millis(1);
        loop {
            match wait.check() {
                Woken::Interrupted => return Err(Errno(libc::EINTR)),
                Woken::Stopped => return Err(Errno(libc::ENOLCK)),
                Woken::Retry => {}
            }
            match self.setlk(fh, ino, owner, lock, flock) {
                Err(e) if e == Errno::EAGAIN => {}
                r => return r,
            }
            match wait.pause(pause) {
                Woken::Interrupted => return Err(Errno(libc::EINTR)),
                Woken::Stopped => return Err(Errno(libc::ENOLCK)),
                Woken::Retry => pause = (pause * 2).min(Duration::from_millis(50)),
            }
        }
    }

    /// End every lock wait, now and to come, with ENOLCK: the mount is going away (a
    /// waiter holds its file open, so it would keep a lazily detached mount alive).
    pub fn end_lock_waits(&self) {
        self.lock_waits.stop();
    }

    /// FUSE_INTERRUPT: the task waiting for request `request` got a signal. Only lock
    /// waits are cut short; other requests finish as they would.
    pub fn interrupt(&self, request: u64) {
        self.lock_waits.interrupt(request);
    }

    /// Drop the locks `owner` holds on `ino` (close of its descriptor: POSIX locks at
    /// flush, flock locks at release).
    pub fn release_locks(&self, ino: Ino, owner: u64) -> Result<()> {
        self.meta.release_locks(ino, owner)?;
        self.lock_waits.released();
        Ok(())
    }
}
