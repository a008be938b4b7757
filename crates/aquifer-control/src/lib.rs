//! The control channel between `aquifer` commands and a live mount: ioctls on files and
//! directories of the mount itself. They reach the daemon through the kernel wherever the
//! mount is visible — another process, a container sharing the mount — with no socket to
//! find, and the caller's open file names what to act on.
//!
//! Restricted FUSE ioctls: each command's size is encoded in its number, and the kernel
//! copies that many bytes in and out.
//!
//! - [`STATS`] on any file or directory: the mount's figures as JSON; the ioctl returns the
//!   JSON's length.
//! - [`WARM`] on a regular file: warm, check or evict the cached blocks of a byte range;
//!   request and reply share one 32-byte buffer ([`WarmRequest`], [`WarmReply`]). On a
//!   directory, [`WarmOp::Mark`] and [`WarmOp::Unmark`] say that `aquifer warmup` has warmed
//!   (or evicted) everything under it.
//! - [`MARKS`] on any file or directory: the directories marked so far, for the node daemon
//!   that labels Kubernetes nodes holding warm volumes.
//!
//! Figures, marks and [`WarmOp::Check`] are open to every caller; warm, evict, mark and
//! unmark change what every pod on the node shares and fail with EPERM unless the caller is
//! the mount's owner or holds CAP_SYS_ADMIN (`aquifer_vfs::privilege` decides).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const TYPE: u32 = 0xAC;
const READ: u32 = 2;
const WRITE: u32 = 1;

const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (TYPE << 8) | nr
}

/// Room for the figures' JSON (the largest a restricted ioctl can carry is 16383 bytes).
pub const STATS_SIZE: usize = 16000;
pub const STATS: u32 = ioc(READ, 1, STATS_SIZE as u32);
pub const WARM_SIZE: usize = 32;
pub const WARM: u32 = ioc(READ | WRITE, 2, WARM_SIZE as u32);
/// Room for [`MAX_MARKS`] marks of 8 bytes.
pub const MARKS_SIZE: usize = 4096;
pub const MARKS: u32 = ioc(READ, 3, MARKS_SIZE as u32);
/// A mount remembers this many marked directories (the latest of each).
pub const MAX_MARKS: usize = MARKS_SIZE / 8;

/// What a [`WARM`] request does with the range's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarmOp {
    /// Fetch the blocks not cached yet.
    Warm = 1,
    /// Only count what is cached.
    Check = 2,
    /// Drop the blocks from every cache tier.
    Evict = 3,
    /// On a directory: everything under it has been warmed (the range is ignored).
    Mark = 4,
    /// On a directory: it has been evicted.
    Unmark = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmRequest {
    pub op: WarmOp,
    pub off: u64,
    pub len: u64,
}

/// Bytes of the blocks under the range: all of them, those cached before the request, and
/// those it fetched or evicted; `errno` 0 or why it stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarmReply {
    pub errno: i32,
    pub total: u64,
    pub cached: u64,
    pub done: u64,
}

impl WarmRequest {
    pub fn encode(&self) -> [u8; WARM_SIZE] {
        let mut b = [0u8; WARM_SIZE];
        b[..4].copy_from_slice(&(self.op as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.off.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<WarmRequest> {
        if b.len() < WARM_SIZE {
            return None;
        }
        let op = match u32::from_le_bytes(b[..4].try_into().ok()?) {
            1 => WarmOp::Warm,
            2 => WarmOp::Check,
            3 => WarmOp::Evict,
            4 => WarmOp::Mark,
            5 => WarmOp::Unmark,
            _ => return None,
        };
        Some(WarmRequest {
            op,
            off: u64::from_le_bytes(b[8..16].try_into().ok()?),
            len: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }
}

impl WarmReply {
    pub fn encode(&self) -> [u8; WARM_SIZE] {
        let mut b = [0u8; WARM_SIZE];
        b[..4].copy_from_slice(&self.errno.to_le_bytes());
        b[8..16].copy_from_slice(&self.total.to_le_bytes());
        b[16..24].copy_from_slice(&self.cached.to_le_bytes());
        b[24..32].copy_from_slice(&self.done.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; WARM_SIZE]) -> WarmReply {
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        WarmReply {
            errno: i32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            total: u(8..16),
            cached: u(16..24),
            done: u(24..32),
        }
    }
}

fn not_aquifer(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::ENOSYS) | Some(libc::EINVAL) => io::Error::new(
            io::ErrorKind::Unsupported,
            "not on an aquifer mount (or the mount is too old for this command)",
        ),
        _ => e,
    }
}

/// The figures of the mount holding `f`, as JSON.
pub fn stats(f: &File) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; STATS_SIZE];
    // SAFETY: the buffer is STATS_SIZE bytes, the size the command number encodes.
    let n = unsafe { libc::ioctl(f.as_raw_fd(), STATS as _, buf.as_mut_ptr()) };
    if n < 0 {
        return Err(not_aquifer(io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Run a [`WARM`] request on the open file `f`.
pub fn warm(f: &File, req: WarmRequest) -> io::Result<WarmReply> {
    let mut buf = req.encode();
    // SAFETY: the buffer is WARM_SIZE bytes, the size the command number encodes.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), WARM as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(not_aquifer(io::Error::last_os_error()));
    }
    Ok(WarmReply::decode(&buf))
}

/// Marks as [`MARKS`] carries them: the inode number shifted left by one, the low bit set
/// for warm.
pub fn encode_marks(marks: &[(u64, bool)]) -> Vec<u8> {
    marks
        .iter()
        .take(MAX_MARKS)
        .flat_map(|&(ino, warm)| ((ino << 1) | warm as u64).to_le_bytes())
        .collect()
}

pub fn decode_marks(b: &[u8]) -> Vec<(u64, bool)> {
    b.chunks_exact(8)
        .map(|c| {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            (v >> 1, v & 1 == 1)
        })
        .collect()
}

/// The directories marked warm (true) or evicted (false) on the mount holding `f`.
pub fn marks(f: &File) -> io::Result<Vec<(u64, bool)>> {
    let mut buf = vec![0u8; MARKS_SIZE];
    // SAFETY: the buffer is MARKS_SIZE bytes, the size the command number encodes.
    let n = unsafe { libc::ioctl(f.as_raw_fd(), MARKS as _, buf.as_mut_ptr()) };
    if n < 0 {
        return Err(not_aquifer(io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(decode_marks(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_numbers_carry_their_sizes() {
        assert_eq!((STATS >> 16) & 0x3fff, STATS_SIZE as u32);
        assert_eq!(STATS >> 30, READ);
        assert_eq!((WARM >> 16) & 0x3fff, WARM_SIZE as u32);
        assert_eq!(WARM >> 30, READ | WRITE);
        assert_eq!((MARKS >> 16) & 0x3fff, MARKS_SIZE as u32);
        let m = vec![(1, true), (u64::MAX >> 1, false)];
        assert_eq!(decode_marks(&encode_marks(&m)), m);
    }

    #[test]
    fn requests_and_replies_roundtrip() {
        let r = WarmRequest {
            op: WarmOp::Evict,
            off: 1 << 40,
            len: 12345,
        };
        assert_eq!(WarmRequest::decode(&r.encode()), Some(r));
        assert_eq!(WarmRequest::decode(&[0u8; WARM_SIZE]), None);
        let a = WarmReply {
            errno: 5,
            total: 1,
            cached: 2,
            done: u64::MAX,
        };
        assert_eq!(WarmReply::decode(&a.encode()), a);
    }
}
