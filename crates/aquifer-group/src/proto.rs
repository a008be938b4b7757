//! The members' protocol: HTTP/1.1, one block per request.
//!
//! ```text
//! GET    /v1/{volume uuid}/block/{block key}   the block: 200, its payload, x-aquifer-crc32c
//! HEAD   /v1/{volume uuid}/block/{block key}   200 if the member holds it, else 404
//! DELETE /v1/{volume uuid}/block/{block key}   drop the member's copy (it failed its check)
//! POST   /v1/{volume uuid}/warm/{block key}    fetch it into the member's cache: 204
//! ```
//! Every request carries `x-aquifer-group: v1:HEX`, the HMAC of its method and path under the
//! group's key ([`crate::auth`]); without it a member answers 403 and nothing else. The volume
//! UUID in the path is checked too: a member answers only for its own volume.
//!
//! A block travels with the crc32c of its payload, computed by the member that serves it
//! from the bytes it serves; the asker checks it and the length the block key names before
//! the block enters its cache. The owner checked the block when it came from the store (the
//! object's segment checksums, made by the writer) and its disk tier checks every cache file
//! when it reads it, so a block is checked on every hop between the store and the reader:
//! on the wire, on the owner's disk, in the store. Not covered: memory of the owner that
//! flips a bit between its check and the transfer checksum, as on a node's own reads.

/// The credentials header.
pub const AUTH_HEADER: &str = "x-aquifer-group";
/// The crc32c (decimal) of a block's payload.
pub const CRC_HEADER: &str = "x-aquifer-crc32c";
/// Longest path a member reads: a UUID and a block key are far shorter.
pub const MAX_PATH: usize = 512;

/// What a request asks of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Has,
    Drop,
    Warm,
}

impl Op {
    pub fn method(self) -> &'static str {
        match self {
            Op::Get => "GET",
            Op::Has => "HEAD",
            Op::Drop => "DELETE",
            Op::Warm => "POST",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Op::Warm => "warm",
            _ => "block",
        }
    }
}

/// The path of `op` on block `key` of volume `uuid`.
pub fn path(op: Op, uuid: &str, key: &str) -> String {
    format!("/v1/{uuid}/{}/{key}", op.noun())
}

/// The request a method and path make: the operation, the volume UUID and the block key.
pub fn parse(method: &str, path: &str) -> Option<(Op, String, String)> {
    let rest = path.strip_prefix("/v1/")?;
    let (uuid, rest) = rest.split_once('/')?;
    let (noun, key) = rest.split_once('/')?;
    let op = match (method, noun) {
        ("GET", "block") => Op::Get,
        ("HEAD", "block") => Op::Has,
        ("DELETE", "block") => Op::Drop,
        ("POST", "warm") => Op::Warm,
        _ => return None,
    };
    (!uuid.is_empty() && !key.is_empty()).then(|| (op, uuid.to_string(), key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for op in [Op::Get, Op::Has, Op::Drop, Op::Warm] {
            let p = path(op, "u-1", "chunks/0/0/7_1_4096");
            assert_eq!(
                parse(op.method(), &p),
                Some((op, "u-1".to_string(), "chunks/0/0/7_1_4096".to_string()))
            );
        }
        assert_eq!(parse("PUT", "/v1/u/block/k"), None);
        assert_eq!(parse("POST", "/v1/u/block/k"), None);
        assert_eq!(parse("GET", "/v1/u/block/"), None);
        assert_eq!(parse("GET", "/v2/u/block/k"), None);
        assert_eq!(parse("GET", "/v1//block/k"), None);
    }
}
