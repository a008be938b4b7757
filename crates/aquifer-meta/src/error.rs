//! Metadata errors. POSIX outcomes carry their errno; engine failures are EIO to callers
//! but keep the engine's message for the log.

use std::fmt;

/// A POSIX error number (always positive).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const EDEADLK: Errno = Errno(libc::EDEADLK);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const EDQUOT: Errno = Errno(libc::EDQUOT);
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: strerror returns a pointer to a static (or thread-local) NUL-terminated string.
        let s = unsafe { std::ffi::CStr::from_ptr(libc::strerror(self.0)) };
        write!(f, "{} (errno {})", s.to_string_lossy(), self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A POSIX outcome of the operation (ENOENT, EEXIST, ...), not a failure of the engine.
    #[error("{0}")]
    Sys(Errno),
    /// The engine failed; the message names the engine and what it was doing.
    #[error("metadata engine {engine}: {msg}")]
    Engine { engine: &'static str, msg: String },
    /// A stored value could not be decoded.
    #[error("corrupt metadata at key {key}: {msg}")]
    Corrupt { key: String, msg: String },
    /// The volume has not been formatted.
    #[error("volume is not formatted: run `aquifer format META_URL NAME` first")]
    NotFormatted,
    /// A bad metadata URL or setting.
    #[error("{0}")]
    Config(String),
    /// A change was sent to the engine and no answer came back (a timeout, a reset
    /// connection, a failover): it may or may not have been applied. Callers must not undo
    /// anything (delete blocks, say) on this outcome; [`crate::KvMeta`] resolves it itself
    /// whenever the engine answers again, so it reaches callers only after an outage
    /// outlasted the retry deadline.
    #[error("metadata engine {engine}: outcome unknown: {msg}")]
    Ambiguous { engine: &'static str, msg: String },
}

impl MetaError {
    /// The one place metadata errors become errno values.
    pub fn errno(&self) -> Errno {
        match self {
            MetaError::Sys(e) => *e,
            _ => Errno::EIO,
        }
    }

    /// True when the change may have been applied although it failed (see
    /// [`MetaError::Ambiguous`]).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, MetaError::Ambiguous { .. })
    }

    pub fn ambiguous(engine: &'static str, msg: impl fmt::Display) -> Self {
        MetaError::Ambiguous {
            engine,
            msg: msg.to_string(),
        }
    }

    pub fn engine(engine: &'static str, msg: impl fmt::Display) -> Self {
        MetaError::Engine {
            engine,
            msg: msg.to_string(),
        }
    }
}

impl From<Errno> for MetaError {
    fn from(e: Errno) -> Self {
        MetaError::Sys(e)
    }
}

pub type Result<T> = std::result::Result<T, MetaError>;

/// Where metadata errors become errno values for the layers above. Failures of the engine
/// itself (not POSIX outcomes) are logged here, once, with their detail.
impl From<MetaError> for Errno {
    fn from(e: MetaError) -> Errno {
        if !matches!(e, MetaError::Sys(_)) {
            tracing::error!(error = %e, "metadata operation failed");
        }
        e.errno()
    }
}
