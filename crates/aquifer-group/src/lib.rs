//! A peer cache group (issue 25): the nodes' block caches shared, so a cluster reads a
//! dataset from the object store once.
//!
//! * [`ring`]: which member owns a block — consistent hashing with virtual nodes weighted by
//!   each member's cache size, so a member that joins or leaves moves only its share.
//! * [`auth`]: the group's key, derived from the volume, and the credentials of a request.

pub mod auth;
pub mod ring;

pub use auth::{AuthError, GroupKey};
pub use ring::{Member, Ring};
