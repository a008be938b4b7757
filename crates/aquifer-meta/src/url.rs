//! Metadata URLs: `rocksdb://PATH`, `memory://`, later `redis://HOST:PORT/DB`.

use crate::error::{MetaError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaUrl {
    RocksDb { path: String },
    Memory,
}

impl MetaUrl {
    pub fn parse(url: &str) -> Result<MetaUrl> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(MetaError::Config(format!(
                "invalid metadata URL {url:?}: expected SCHEME://..., e.g. rocksdb:///var/lib/aquifer/meta"
            )));
        };
        match scheme {
            "rocksdb" => {
                if rest.is_empty() {
                    return Err(MetaError::Config(format!(
                        "invalid metadata URL {url:?}: rocksdb:// needs a path, e.g. rocksdb:///var/lib/aquifer/meta"
                    )));
                }
                Ok(MetaUrl::RocksDb {
                    path: rest.to_string(),
                })
            }
            "memory" | "mem" => Ok(MetaUrl::Memory),
            other => Err(MetaError::Config(format!(
                "unsupported metadata engine {other:?} in {url:?}: supported are rocksdb://PATH and memory://"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            MetaUrl::parse("rocksdb:///a/b").unwrap(),
            MetaUrl::RocksDb {
                path: "/a/b".into()
            }
        );
        assert!(MetaUrl::parse("rocksdb://").is_err());
        assert!(MetaUrl::parse("/a/b").is_err());
        assert!(MetaUrl::parse("tikv://x").is_err());
    }
}
