//! What a volume's blocks are stored in, and as what.
//!
//! * [`keys`]: the object key of every block, built and parsed here only;
//! * [`codec`]: a block's stored form (checksums, compression);
//! * [`journal`]: the layer that makes a small fsync one metadata log flush;
//! * [`staging`]: the writeback layer (`--writeback`);
//! * `marker`: the object that says which volume owns a store prefix;
//! * `cache`: the block cache's tiers as the data path wires them (RAM, then the caller's
//!   disks; written blocks enter them).

pub(crate) mod cache;
pub mod codec;
pub mod journal;
pub mod keys;
mod marker;
pub mod staging;

pub use marker::{check_volume, claim_volume, MARKER};
