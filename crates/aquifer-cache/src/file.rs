//! Names and headers of the files kept on a cache disk: cache files (`AQCB`) and blocks
//! staged for upload (`AQST`, in aquifer-chunk). One header layout for both, 16 bytes,
//! little-endian: magic, format version (u16), flags (u16), payload length (u32), crc32c
//! of the payload (u32).

pub const HEADER: usize = 16;
const VERSION: u16 = 1;

/// `%` and `/` escaped, so a key is one file name and the name gives the key back.
pub fn file_name(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            c => s.push(c),
        }
    }
    s
}

/// The key a [`file_name`] came from; None for a name it cannot have made.
pub fn key_of(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut it = name.split('%');
    out.push_str(it.next()?);
    for part in it {
        match part.get(..2)? {
            "25" => out.push('%'),
            "2F" => out.push('/'),
            _ => return None,
        }
        out.push_str(&part[2..]);
    }
    Some(out)
}

/// The header of a file holding `payload`.
pub fn header(magic: &[u8; 4], payload: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(magic);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h
}

/// The payload length and crc32c a header announces, or why it is not one of ours.
pub fn parse_header(magic: &[u8; 4], h: &[u8]) -> Result<(usize, u32), String> {
    if h.len() < HEADER || &h[..4] != magic {
        return Err("not a file of this kind".into());
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(format!("format version {version}"));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    Ok((len, crc))
}

/// Check a whole file (header then payload); the payload's range on success.
pub fn check(magic: &[u8; 4], raw: &[u8]) -> Result<std::ops::Range<usize>, String> {
    let (len, crc) = parse_header(magic, raw)?;
    if raw.len() != HEADER + len {
        return Err(format!(
            "{} bytes for a {len}-byte payload (truncated or extended)",
            raw.len()
        ));
    }
    if crc32c::crc32c(&raw[HEADER..]) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(HEADER..raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_and_come_back() {
        for k in ["chunks/0/1/123_0_4096", "a%2Fb/%", "plain", ""] {
            assert_eq!(key_of(&file_name(k)).as_deref(), Some(k));
            assert!(!file_name(k).contains('/'));
        }
        assert_eq!(key_of("bad%zz"), None);
    }

    #[test]
    fn a_file_checks_only_whole_and_of_its_kind() {
        let mut raw = header(b"TEST", b"payload").to_vec();
        raw.extend_from_slice(b"payload");
        assert_eq!(check(b"TEST", &raw), Ok(HEADER..HEADER + 7));
        assert!(check(b"OTHR", &raw).is_err());
        assert!(check(b"TEST", &raw[..raw.len() - 1]).is_err());
        let mut flipped = raw.clone();
        flipped[HEADER + 2] ^= 1;
        assert!(check(b"TEST", &flipped).is_err());
        let mut v2 = raw.clone();
        v2[4] = 2;
        assert!(check(b"TEST", &v2).is_err());
    }
}
