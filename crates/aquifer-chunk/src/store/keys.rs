//! Block keys: where block `idx` of slice `id` lives in the store. They are built and parsed
//! here only, so the layout below `chunks/` is written down once.

/// Where a volume's blocks live in its store.
pub const CHUNKS_PREFIX: &str = "chunks/";

/// Object key of block `idx` (of length `len`) of slice `id`. Spread over two directory levels
/// so no directory of a local store grows past a thousand entries.
pub fn block_key(id: u64, idx: u32, len: u32) -> String {
    format!(
        "{CHUNKS_PREFIX}{}/{}/{}_{}_{}",
        id / 1_000_000,
        id / 1000,
        id,
        idx,
        len
    )
}

/// Every block key of a slice of `size` bytes.
pub fn slice_keys(id: u64, size: u32, block_size: u32) -> Vec<String> {
    let n = size.div_ceil(block_size);
    (0..n)
        .map(|i| block_key(id, i, (size - i * block_size).min(block_size)))
        .collect()
}

/// The slice id, block index and payload length a block key names.
pub fn parse_block_key(key: &str) -> Option<(u64, u32, u32)> {
    let name = key.strip_prefix(CHUNKS_PREFIX)?.rsplit('/').next()?;
    let mut parts = name.split('_');
    let id = parts.next()?.parse().ok()?;
    let idx = parts.next()?.parse().ok()?;
    let len = parts.next()?.parse().ok()?;
    if parts.next().is_some() || block_key(id, idx, len) != key {
        return None;
    }
    Some((id, idx, len))
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
        assert_eq!(parse_block_key(&k), Some((1_234_567, 3, 4096)));
        assert_eq!(parse_block_key("chunks/0/0/5_0_10.tmp-1.2"), None);
        assert_eq!(
            parse_block_key("chunks/9/9/5_0_10"),
            None,
            "wrong directory"
        );
        assert_eq!(parse_block_key("aquifer.volume"), None);
    }
}
