//! `aquifer fsck`: every block of every file checked against its slices.
//!
//! **fsck** walks the namespace and checks that every block of every file's slices exists
//! with the size its slice implies (`deep`: reads it and verifies its checksums), naming each
//! broken file by path.

use crate::store::codec;
use crate::store::keys::slice_keys;
use crate::Result;
use aquifer_meta::{Context, FileType, Ino, Meta, Slice, CHUNK_SIZE, ROOT_INO};
use aquifer_object::ObjectStore;
use std::collections::HashSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub path: String,
    pub ino: Ino,
    pub key: String,
    pub problem: String,
}

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub files: u64,
    pub blocks: u64,
    pub broken: Vec<Broken>,
}

/// Check every block of every regular file below `path` (`/` for the whole volume).
pub fn fsck(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    block_size: u32,
    compression: codec::Compression,
    path: &str,
    deep: bool,
    progress: &dyn Fn(u64),
) -> Result<FsckReport> {
    // Blocks an fsync left only in the metadata journal are not broken: put them back first.
    crate::store::journal::replay(meta, store)?;
    let ctx = Context::root();
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        ino = meta.lookup(&ctx, ino, part.as_bytes())?.0;
    }
    let start = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let mut report = FsckReport::default();
    let mut seen = HashSet::new();
    let mut stack = vec![(ino, start.trim_end_matches('/').to_string())];
    while let Some((ino, p)) = stack.pop() {
        let a = meta.getattr(ino)?;
        match a.typ {
            FileType::Directory => {
                for e in meta.readdir(&ctx, ino, false)? {
                    let name = String::from_utf8_lossy(&e.name);
                    stack.push((e.ino, format!("{p}/{name}")));
                }
            }
            FileType::File if seen.insert(ino) => {
                report.files += 1;
                let path = if p.is_empty() { "/".to_string() } else { p };
                let chunks = a.length.div_ceil(CHUNK_SIZE) as u32;
                let mut slices: Vec<Slice> = Vec::new();
                for idx in 0..chunks {
                    slices.extend(meta.read_chunk(ino, idx)?.into_iter().filter(|s| s.id != 0));
                }
                let mut done = HashSet::new();
                for s in slices.into_iter().filter(|s| done.insert(s.id)) {
                    for (i, key) in slice_keys(s.id, s.size, block_size).into_iter().enumerate() {
                        report.blocks += 1;
                        progress(1);
                        let len = (s.size - i as u32 * block_size).min(block_size) as usize;
                        if let Some(problem) = check_block(store, compression, &key, len, deep) {
                            report.broken.push(Broken {
                                path: path.clone(),
                                ino,
                                key,
                                problem,
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

/// What is wrong with one block, if anything.
fn check_block(
    store: &dyn ObjectStore,
    c: codec::Compression,
    key: &str,
    len: usize,
    deep: bool,
) -> Option<String> {
    if deep {
        return codec::read_whole(store, c, key, len, Vec::new())
            .err()
            .map(|e| e.to_string());
    }
    match store.head(key) {
        Err(e) if e.is_not_found() => Some("missing".into()),
        Err(e) => Some(e.to_string()),
        // A compressed block is smaller; a plain one is exactly its payload and checksums.
        Ok(o) if c == codec::Compression::None && o.size != codec::stored_len(len) as u64 => {
            Some(format!(
                "{} bytes stored, {} expected",
                o.size,
                codec::stored_len(len)
            ))
        }
        Ok(o) if o.size == 0 => Some("empty".into()),
        Ok(_) => None,
    }
}
