//! Object stores hold the blocks of a volume. The trait is small on purpose: put, ranged get,
//! head, delete, list. Keys are never overwritten with different content (slice ids are never
//! reused), so a retried put is always safe.

mod file;
mod memory;

pub mod conformance;

pub use file::FileStore;
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
}

impl ObjectError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ObjectError::NotFound { .. })
    }
}

pub type Result<T> = std::result::Result<T, ObjectError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
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
    fn head(&self, key: &str) -> Result<ObjectInfo>;
    /// Delete `key`; deleting a missing key succeeds.
    fn delete(&self, key: &str) -> Result<()>;
    /// Keys starting with `prefix`, after `start_after`, in order, at most `limit`.
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>>;
}

/// Build a store from the volume settings (`storage` kind and `bucket`).
pub fn create(storage: &str, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    match storage {
        "file" => Ok(Arc::new(FileStore::new(bucket)?)),
        "memory" | "mem" => Ok(Arc::new(MemStore::new())),
        other => Err(ObjectError::Config(format!(
            "unsupported storage {other:?}: supported are file and memory"
        ))),
    }
}
