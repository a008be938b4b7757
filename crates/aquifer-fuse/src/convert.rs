//! Between the kernel's types and the vfs's: attributes, times, file types, lock
//! requests, errno, the caller's context.

use aquifer_meta::{Attr, Context, Errno, FileType, PLock, SetTime, Time};
use fuser::{FileAttr, INodeNo, Request, TimeOrNow};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) fn ctx(req: &Request) -> Context {
    Context {
        uid: req.uid(),
        gid: req.gid(),
        gids: Vec::new(),
        pid: req.pid(),
        check_permission: false,
    }
}

/// A lock request as the kernel sends it: whether it is a flock(2) lock (kept apart from
/// fcntl locks, as Linux keeps them; the patched fuser marks it in the type), and the lock.
pub(crate) fn lock_request(typ: i32, start: u64, end: u64, pid: u32) -> (bool, PLock) {
    let lock = PLock {
        typ: typ & !fuser::LOCK_FLOCK,
        start,
        end,
        pid,
    };
    (typ & fuser::LOCK_FLOCK != 0, lock)
}

pub(crate) fn err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

pub(crate) fn system_time(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

pub(crate) fn time_of(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Time { sec, nsec }
        }
    }
}

pub(crate) fn kind(t: FileType) -> fuser::FileType {
    match t {
        FileType::File => fuser::FileType::RegularFile,
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::BlockDev => fuser::FileType::BlockDevice,
        FileType::CharDev => fuser::FileType::CharDevice,
        FileType::Socket => fuser::FileType::Socket,
    }
}

pub(crate) fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.length,
        blocks: a.blocks(),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: kind(a.typ),
        perm: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

pub(crate) fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(time_of(st)),
    })
}
