//! The volume marker: the object naming the volume that owns a store prefix, so two volumes
//! never share (and delete) each other's blocks.

use super::keys::CHUNKS_PREFIX;
use aquifer_meta::Format;
use aquifer_object::ObjectStore;

/// The object naming the volume that owns a store prefix.
pub const MARKER: &str = "aquifer.volume";

fn marker_text(name: &str, uuid: &str) -> String {
    format!("aquifer volume marker v1\nname={name}\nuuid={uuid}\n")
}

/// (name, uuid) recorded in a marker.
fn parse_marker(b: &[u8]) -> Option<(String, String)> {
    let t = std::str::from_utf8(b).ok()?;
    let field = |k: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
    };
    Some((field("name=")?, field("uuid=")?))
}

/// Whether `store` holds the marker of volume `uuid`: `Ok(false)` when there is no marker,
/// an error when it names another volume (or cannot be read).
pub fn check_volume(
    store: &dyn ObjectStore,
    name: &str,
    uuid: &str,
) -> std::result::Result<bool, String> {
    match store.get(MARKER, 0, None) {
        Ok(b) => match parse_marker(&b) {
            Some((_, u)) if u == uuid => Ok(true),
            Some((n, u)) => Err(format!(
                "{} holds volume {n} (uuid {u}), not {name} (uuid {uuid}): two volumes must not share blocks; choose another --bucket or name",
                store.describe()
            )),
            None => Err(format!(
                "{}: {MARKER} is not a volume marker; refusing to use this place",
                store.describe()
            )),
        },
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(format!("cannot read the volume marker: {e}")),
    }
}

/// Write the marker of volume `uuid` unless the store already has it; refuses a store
/// that holds another volume's marker or, without one, any objects of another volume.
pub fn claim_volume(
    store: &dyn ObjectStore,
    name: &str,
    uuid: &str,
) -> std::result::Result<(), String> {
    if check_volume(store, name, uuid)? {
        return Ok(());
    }
    let stray = store
        .list(CHUNKS_PREFIX, "", 1)
        .map_err(|e| format!("cannot list {}: {e}", store.describe()))?;
    if !stray.is_empty() {
        return Err(format!(
            "{} already holds blocks of an unknown volume (e.g. {}): refusing to mix volumes",
            store.describe(),
            stray[0].key
        ));
    }
    store
        .put(MARKER, bytes::Bytes::from(marker_text(name, uuid)))
        .and_then(|_| store.sync())
        .map_err(|e| format!("cannot write the volume marker: {e}"))
}

/// The store must hold the marker of volume `f`: a volume whose `--bucket` now names another
/// volume's place (or nothing) would read and delete someone else's blocks.
pub(super) fn check_marker(store: &dyn ObjectStore, f: &Format) -> std::result::Result<(), String> {
    match check_volume(store, &f.name, &f.uuid) {
        Ok(true) => Ok(()),
        // A volume from before markers: it gets one now.
        Ok(false) if f.prefix.is_none() => claim_volume(store, &f.name, &f.uuid),
        Ok(false) => Err(format!(
            "{} does not hold volume {} (uuid {}): its marker is missing (was the bucket moved or wiped?)",
            store.describe(),
            f.name,
            f.uuid
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::block_key;
    use aquifer_object::MemStore;
    use bytes::Bytes;

    #[test]
    fn a_store_belongs_to_one_volume() {
        let store = MemStore::new();
        assert_eq!(check_volume(&store, "v", "u1"), Ok(false));
        claim_volume(&store, "v", "u1").unwrap();
        assert_eq!(check_volume(&store, "v", "u1"), Ok(true));
        // The same volume again (format --force) is fine; another volume is refused.
        claim_volume(&store, "v", "u1").unwrap();
        let e = claim_volume(&store, "v", "u2").unwrap_err();
        assert!(e.contains("uuid u1"), "{e}");
        assert!(check_volume(&store, "v", "u2").is_err());
        // Blocks with no marker are someone else's.
        let other = MemStore::new();
        other
            .put(&block_key(1, 0, 1), Bytes::from_static(b"x"))
            .unwrap();
        assert!(claim_volume(&other, "w", "u3").is_err());
    }
}
