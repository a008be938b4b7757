//! What can go wrong on the data path, and the errno each failure becomes: the one place
//! data errors are mapped to errno values (a metadata error keeps the engine's own).

use aquifer_meta::{Errno, MetaError};
use aquifer_object::ObjectError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("an earlier write to this file failed: {0}")]
    Poisoned(String),
    #[error("block {key} is corrupt: {msg}")]
    Corrupt { key: String, msg: String },
    #[error("cannot start the data path: {0}")]
    Setup(String),
}

impl DataError {
    /// The errno a failed data operation reports: a metadata error's own, else EIO.
    pub fn errno(&self) -> Errno {
        match self {
            DataError::Meta(e) => e.errno(),
            _ => Errno::EIO,
        }
    }

    /// The errno of a data path that could not start (EAGAIN, whatever the cause), logged.
    pub fn into_start_errno(self) -> Errno {
        tracing::error!(error = %self, "cannot start the data path");
        Errno::EAGAIN
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

/// Where data-path errors become errno values; I/O failures are logged here with the object.
impl From<DataError> for Errno {
    fn from(e: DataError) -> Errno {
        match e {
            // The engine's mapping, which logs what is not a plain errno.
            DataError::Meta(m) => m.into(),
            other => {
                tracing::error!(error = %other, "data operation failed");
                other.errno()
            }
        }
    }
}
