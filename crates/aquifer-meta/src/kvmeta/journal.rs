//! The object journal ([`ObjectJournal`]): copies of small objects kept under `J` keys until
//! the object store holds them on disk.

use super::KvMeta;
use crate::encoding as key;
use crate::error::Result;
use crate::kv::KvEngine;
use crate::ObjectJournal;

impl<E: KvEngine> ObjectJournal for KvMeta<E> {
    fn journal_put(&self, records: &[(&str, &[u8])]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.txn(|t| {
            for (k, v) in records {
                t.set(&key::journal(k), v.to_vec());
            }
            Ok(())
        })
    }

    fn journal_list(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let p = [b'J'];
        let end = key::prefix_end(&p);
        let mut out = Vec::new();
        let mut start = p.to_vec();
        loop {
            let page = self.kv.scan(&start, &end, 256)?;
            let last = page.len() < 256;
            for (k, v) in page {
                start = k.clone();
                start.push(0);
                // Keys were written from &str: only a damaged record is not UTF-8.
                if let Ok(name) = String::from_utf8(k[1..].to_vec()) {
                    out.push((name, v));
                }
            }
            if last {
                return Ok(out);
            }
        }
    }

    fn journal_remove(&self, keys: &[String]) -> Result<()> {
        for part in keys.chunks(1024) {
            self.txn(|t| {
                for k in part {
                    t.delete(&key::journal(k));
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
