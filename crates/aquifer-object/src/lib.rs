//! Object stores hold the blocks of a volume. The trait is small on purpose: put, ranged get,
//! head, delete, list. Keys are never overwritten with different content (slice ids are never
//! reused), so a retried put is always safe.

mod fault;
mod file;
mod layers;
mod memory;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "s3")]
mod s3_http;

pub mod conformance;

pub use fault::FaultStore;
pub use file::FileStore;
pub use layers::{
    object_retry_policy, Counting, RateLimited, RetryPolicy, Retrying, StoreCounters, TokenBucket,
};
pub use memory::MemStore;

use bytes::Bytes;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object {key} not found in {store}")]
    NotFound { store: String, key: String },
    #[error("{store}: {op} {key}: {source}")]
    Io {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{store}: object {key} is corrupt: {msg}")]
    Corrupt {
        store: String,
        key: String,
        msg: String,
    },
    #[error("invalid storage settings: {0}")]
    Config(String),
    /// The store could not be reached or asked us to slow down: worth retrying.
    #[error("{store} is unavailable: {msg}")]
    Unavailable { store: String, msg: String },
}

impl ObjectError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ObjectError::NotFound { .. })
    }

    /// Transient failures (outages, throttling, interrupted I/O) are retried; a missing or
    /// corrupt object, a bad setting or a full disk are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ObjectError::Unavailable { .. } => true,
            ObjectError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, ObjectError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// When the object was written, where the store says (gc spares young objects).
    pub modified: Option<std::time::SystemTime>,
}

pub trait ObjectStore: Send + Sync {
    /// A description for messages, e.g. `file:///var/lib/aquifer/blocks`.
    fn describe(&self) -> String;
    /// Store `data` under `key` atomically: readers see the whole object or none of it.
    fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Read `len` bytes from `off` (to the end when `len` is None). Fewer bytes are returned
    /// only when the object ends first.
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes>;
    /// Read `buf.len()` bytes from `off` straight into `buf`; returns how many were read
    /// (fewer only when the object ends first). Backends that can avoid a copy override it.
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        let data = self.get(key, off, Some(buf.len() as u64))?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }
    /// Read `len` bytes from `off` into `buf` (its old content is discarded) and return it,
    /// shorter only when the object ends first. Lets a caller recycle block buffers; backends
    /// that fill a buffer of their own override it to fill this one instead.
    fn get_owned(&self, key: &str, off: u64, len: usize, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        buf.clear();
        buf.resize(len, 0);
        let n = self.get_into(key, off, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo>;
    /// Delete `key`; deleting a missing key succeeds.
    fn delete(&self, key: &str) -> Result<()>;
    /// Keys starting with `prefix`, after `start_after`, in order, at most `limit`.
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>>;
    /// Make every put that has returned durable: after `sync` returns, those objects survive
    /// a power cut. Stores whose puts are durable when they return (S3) need not override it.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Whether a returned put still needs [`ObjectStore::sync`] to be durable (a local
    /// directory: yes; S3: no). The data path journals small objects only for such stores.
    fn puts_need_sync(&self) -> bool {
        false
    }
}

/// What a volume's settings say about its block store.
#[derive(Clone, Debug, Default)]
pub struct StoreSpec {
    /// `file`, `memory` or `s3`.
    pub storage: String,
    /// A directory for `file`; `http(s)://HOST:PORT/BUCKET` or `s3://BUCKET` for `s3`.
    pub bucket: String,
    /// Prepended to every key (e.g. the volume name, so volumes can share a bucket).
    pub prefix: String,
    #[cfg(feature = "s3")]
    pub s3: s3::S3Options,
    /// For `s3://` buckets on a server other than AWS.
    pub endpoint: Option<String>,
}

/// Build a store from the volume settings.
pub fn create(spec: &StoreSpec) -> Result<Arc<dyn ObjectStore>> {
    match spec.storage.as_str() {
        // The prefix is a directory of its own in a file store.
        "file" => Ok(Arc::new(FileStore::new(
            std::path::Path::new(&spec.bucket).join(spec.prefix.trim_end_matches('/')),
        )?)),
        "memory" | "mem" => Ok(Arc::new(MemStore::new())),
        #[cfg(feature = "s3")]
        "s3" => Ok(Arc::new(s3_store(spec)?)),
        other => Err(ObjectError::Config(format!(
            "unsupported storage {other:?}: supported are {}",
            if cfg!(feature = "s3") {
                "file, s3 and memory"
            } else {
                "file and memory"
            }
        ))),
    }
}

/// The S3 store a `storage = "s3"` spec describes, as its own type (for bucket set-up).
#[cfg(feature = "s3")]
pub fn s3_store(spec: &StoreSpec) -> Result<s3::S3Store> {
    let mut loc = s3::S3Location::parse(&spec.bucket, spec.endpoint.as_deref())?;
    loc.prefix.push_str(&spec.prefix);
    s3::S3Store::new(loc, &spec.s3)
}
