//! Keeping a volume's blocks in order: what runs in the background of every mount, and the
//! offline commands.
//!
//! * `compact`: fragmented chunks rewritten as few slices (a background worker);
//! * `trash`: the objects of freed slices deleted once that is safe (a background worker,
//!   which also checkpoints the object journal), and by `aquifer gc --delete`;
//! * `gc`: objects no metadata references, found (and deleted) offline;
//! * `fsck`: every block of every file checked offline.
//!
//! gc and fsck work through the [`Meta`](aquifer_meta::Meta) and
//! [`ObjectStore`](aquifer_object::ObjectStore) traits only, so they run on every metadata
//! engine and every store.

mod compact;
mod fsck;
mod gc;
#[cfg(test)]
mod tests;
mod trash;

pub(crate) use compact::Compactor;
pub use fsck::{fsck, Broken, FsckReport};
pub use gc::{gc, referenced_slices, GcOptions, GcReport};
pub use trash::{free_trash, TrashRound};

use crate::ChunkStore;
use aquifer_meta::Ino;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Start the background workers of `cs`: the compactor, fed by `rx`, and the trash worker.
pub(crate) fn start(
    cs: &Arc<ChunkStore>,
    rx: Receiver<(Ino, u32)>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let weak = Arc::downgrade(cs);
    let compactor = std::thread::Builder::new()
        .name("compact".into())
        .spawn(move || compact::compact_loop(weak, rx))?;
    let weak = Arc::downgrade(cs);
    let stop = cs.stop.clone();
    let trash = std::thread::Builder::new()
        .name("trash".into())
        .spawn(move || trash::trash_loop(weak, stop))?;
    Ok(vec![compactor, trash])
}
