use crate::{ObjectError, ObjectInfo, ObjectStore, Result};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;
use std::time::SystemTime;

/// In-memory object store for tests.
#[derive(Default)]
pub struct MemStore {
    objects: RwLock<BTreeMap<String, (Bytes, SystemTime)>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.objects.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ObjectStore for MemStore {
    fn describe(&self) -> String {
        "memory://".into()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.objects
            .write()
            .unwrap()
            .insert(key.to_string(), (data, SystemTime::now()));
        Ok(())
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let objects = self.objects.read().unwrap();
        let (data, _) = objects.get(key).ok_or_else(|| ObjectError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        })?;
        let start = (off as usize).min(data.len());
        let end = match len {
            Some(l) => (start + l as usize).min(data.len()),
            None => data.len(),
        };
        Ok(data.slice(start..end))
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let objects = self.objects.read().unwrap();
        let (data, at) = objects.get(key).ok_or_else(|| ObjectError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        })?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: data.len() as u64,
            modified: Some(*at),
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.objects.write().unwrap().remove(key);
        Ok(())
    }

    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        let objects = self.objects.read().unwrap();
        let lower = if start_after.is_empty() {
            Bound::Included(prefix.to_string())
        } else {
            Bound::Excluded(start_after.to_string())
        };
        Ok(objects
            .range::<String, _>((lower, Bound::Unbounded))
            .skip_while(|(k, _)| !k.starts_with(prefix) && k.as_str() < prefix)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, (v, at))| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
                modified: Some(*at),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    crate::object_conformance!((super::MemStore::new(), ()));
}
