//! Block keys: where block `idx` of slice `id` lives in the store. They are built and parsed
//! here only, so the layout below `chunks/` is written down once.

/// Where a volume's blocks live in its store.
pub const CHUNKS_PREFIX: &str = "chunks/";

/// Block `idx` of slice `id`, whose payload is `len` bytes: what a block key names. The
/// payload length is part of the key so that a reader knows where the checksum trailer is
/// without asking the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub id: u64,
    pub idx: u32,
    pub len: u32,
}

impl BlockKey {
    /// The object key. Spread over two directory levels so no directory of a local store
    /// grows past a thousand entries.
    pub fn name(&self) -> String {
        format!(
            "{CHUNKS_PREFIX}{}/{}/{}_{}_{}",
            self.id / 1_000_000,
            self.id / 1000,
            self.id,
            self.idx,
            self.len
        )
    }

    /// The block an object key names; `None` for any other object (a temporary file of a
    /// put, the volume marker, a block name in the wrong directory).
    pub fn parse(key: &str) -> Option<BlockKey> {
        let name = key.strip_prefix(CHUNKS_PREFIX)?.rsplit('/').next()?;
        let mut parts = name.split('_');
        let k = BlockKey {
            id: parts.next()?.parse().ok()?,
            idx: parts.next()?.parse().ok()?,
            len: parts.next()?.parse().ok()?,
        };
        if parts.next().is_some() || k.name() != key {
            return None;
        }
        Some(k)
    }
}

/// Object key of block `idx` (of length `len`) of slice `id`.
pub fn block_key(id: u64, idx: u32, len: u32) -> String {
    BlockKey { id, idx, len }.name()
}

/// Every block key of a slice of `size` bytes.
pub fn slice_keys(id: u64, size: u32, block_size: u32) -> Vec<String> {
    let n = size.div_ceil(block_size);
    (0..n)
        .map(|i| block_key(id, i, (size - i * block_size).min(block_size)))
        .collect()
}

/// The slice id an object under `chunks/` belongs to: a block's, or that of a temporary
/// file of a put in progress (`<id>_<idx>_<len>.tmp-…`).
pub(crate) fn slice_id_of(key: &str) -> Option<u64> {
    let name = key.strip_prefix(CHUNKS_PREFIX)?.rsplit('/').next()?;
    name.split(['_', '.']).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_parse_back() {
        let k = block_key(1_234_567, 3, 4096);
        let parts = BlockKey {
            id: 1_234_567,
            idx: 3,
            len: 4096,
        };
        assert_eq!(BlockKey::parse(&k), Some(parts));
        assert_eq!(BlockKey::parse("chunks/0/0/5_0_10.tmp-1.2"), None);
        assert_eq!(
            BlockKey::parse("chunks/9/9/5_0_10"),
            None,
            "wrong directory"
        );
        assert_eq!(BlockKey::parse("aquifer.volume"), None);
    }
}
