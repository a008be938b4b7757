//! The key of a group: a peer answers only requests made with it.
//!
//! The key is derived from the volume (its UUID and a secret only the volume's members can
//! read), so the same group name on another volume has another key and gets nothing. A
//! request carries the HMAC-SHA256 of its method and path under that key. There is no
//! timestamp in it: the clocks of a cluster's nodes are minutes apart often enough that a
//! freshness window would refuse members; a replayed request gets only the block whose
//! request was seen, which the eavesdropper saw already.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Version prefix of the header value, so the scheme can change without confusing members.
const SCHEME: &str = "v1";

/// A group's key.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupKey([u8; 32]);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never printed: a log line must not hand out the key.
        f.write_str("GroupKey(..)")
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials, or not in the form `v1:HEX`.
    Malformed,
    /// Credentials made with another key (another volume, or none).
    Wrong,
}

impl GroupKey {
    /// The key of the groups of the volume `uuid` whose members can read `secret`.
    pub fn derive(uuid: &str, secret: &[u8]) -> GroupKey {
        let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        m.update(b"aquifer-group-key/v1/");
        m.update(uuid.as_bytes());
        GroupKey(m.finalize().into_bytes().into())
    }

    fn mac(&self, method: &str, path: &str) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(method.as_bytes());
        m.update(b"\n");
        m.update(path.as_bytes());
        m
    }

    /// The credentials of a request: `v1:` and the hex HMAC of its method and path.
    pub fn sign(&self, method: &str, path: &str) -> String {
        let tag = self.mac(method, path).finalize().into_bytes();
        let mut out = String::with_capacity(SCHEME.len() + 1 + 64);
        out.push_str(SCHEME);
        out.push(':');
        for b in tag {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Check a request's credentials (`None`: it had none), in constant time.
    pub fn verify(&self, method: &str, path: &str, creds: Option<&str>) -> Result<(), AuthError> {
        let hex = creds
            .and_then(|c| c.strip_prefix(SCHEME))
            .and_then(|c| c.strip_prefix(':'))
            .ok_or(AuthError::Malformed)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Malformed);
        }
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        self.mac(method, path)
            .verify_slice(&tag)
            .map_err(|_| AuthError::Wrong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/v1/block/chunks/1/0_0_4194304";

    #[test]
    fn a_request_signed_with_the_key_is_answered() {
        let k = GroupKey::derive("uuid-1", b"secret");
        let c = k.sign("GET", PATH);
        assert_eq!(k.verify("GET", PATH, Some(&c)), Ok(()));
        // The same volume's key derived again on another member agrees.
        let again = GroupKey::derive("uuid-1", b"secret");
        assert_eq!(again.verify("GET", PATH, Some(&c)), Ok(()));
    }

    #[test]
    fn requests_without_the_key_or_for_something_else_are_refused() {
        let k = GroupKey::derive("uuid-1", b"secret");
        let c = k.sign("GET", PATH);
        assert_eq!(k.verify("GET", PATH, None), Err(AuthError::Malformed));
        assert_eq!(
            k.verify("GET", PATH, Some("v1:zz")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            k.verify("GET", PATH, Some(&c[1..])),
            Err(AuthError::Malformed)
        );
        // Credentials of one request do not open another.
        assert_eq!(k.verify("DELETE", PATH, Some(&c)), Err(AuthError::Wrong));
        assert_eq!(
            k.verify("GET", "/v1/block/other", Some(&c)),
            Err(AuthError::Wrong)
        );
        // Another volume (same group name or not), or the same UUID without the secret.
        for other in [
            GroupKey::derive("uuid-2", b"secret"),
            GroupKey::derive("uuid-1", b"guess"),
        ] {
            assert_eq!(other.verify("GET", PATH, Some(&c)), Err(AuthError::Wrong));
        }
    }

    #[test]
    fn the_key_is_never_printed() {
        let k = GroupKey::derive("uuid-1", b"secret");
        assert_eq!(format!("{k:?}"), "GroupKey(..)");
    }
}
