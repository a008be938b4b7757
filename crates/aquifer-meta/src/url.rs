//! Metadata URLs: `rocksdb://PATH`, `memory://`, and Redis in the forms JuiceFS users write:
//!
//! - `redis://[[USER]:PASS@]HOST[:PORT][/DB]`, `rediss://...` for TLS;
//! - Sentinel: `redis://[[USER]:PASS@]MASTER_NAME,SENTINEL_HOST[:PORT][,SENTINEL_HOST[:PORT]...][/DB]`
//!   (a host without a port takes the port of the last one that has one, else 26379);
//! - Cluster: `redis://HOST:PORT,HOST:PORT[,...][/DB]`.
//!
//! Options come as a query: `?tls-ca-cert-file=F&tls-cert-file=F&tls-key-file=F&insecure-skip-verify=true`.
//! The password may come from `META_PASSWORD` instead of the URL (and a Sentinel's from
//! `SENTINEL_PASSWORD`); it is a [`Secret`] and never printed.

use crate::error::{MetaError, Result};
use crate::types::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaUrl {
    RocksDb { path: String },
    Memory,
    Redis(RedisUrl),
}

/// Where the Redis servers of a volume are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    Single {
        host: String,
        port: u16,
    },
    Sentinel {
        master: String,
        sentinels: Vec<(String, u16)>,
    },
    Cluster {
        nodes: Vec<(String, u16)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub sentinel_password: Option<Secret>,
    pub topology: RedisTopology,
    /// The database number; in a cluster (which has only database 0) it names the volume's
    /// hash tag instead.
    pub db: u32,
    pub ca_cert_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub insecure: bool,
}

impl RedisUrl {
    /// The URL with the password left out, for messages.
    pub fn display(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let user = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:****@"),
            (Some(u), None) => format!("{u}@"),
            (None, Some(_)) => ":****@".to_string(),
            (None, None) => String::new(),
        };
        let hosts = |v: &[(String, u16)]| {
            v.iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let where_ = match &self.topology {
            RedisTopology::Single { host, port } => format!("{host}:{port}"),
            RedisTopology::Sentinel { master, sentinels } => {
                format!("{master},{}", hosts(sentinels))
            }
            RedisTopology::Cluster { nodes } => hosts(nodes),
        };
        format!("{scheme}://{user}{where_}/{}", self.db)
    }
}

fn config(url: &str, msg: impl std::fmt::Display) -> MetaError {
    // Never echo a URL that may hold a password.
    let shown = redact(url);
    MetaError::Config(format!("invalid metadata URL {shown:?}: {msg}"))
}

/// `url` with any password replaced by `****`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => {
            let user = &rest[..at];
            let user = match user.split_once(':') {
                Some((u, _)) => format!("{u}:****"),
                None => user.to_string(),
            };
            format!("{scheme}://{user}{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host[:port]` or `[v6]:port`; `None` port when absent.
fn host_port(url: &str, s: &str) -> Result<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| config(url, format!("unclosed '[' in host {s:?}")))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(config(url, "empty host name"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| config(url, format!("bad port {p:?}")))?,
        ),
    };
    Ok((host, port))
}

fn parse_redis(url: &str, tls: bool, rest: &str) -> Result<RedisUrl> {
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, q),
        None => (rest, ""),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let (mut username, mut password) = (None, None);
    if let Some(ui) = userinfo {
        let (u, p) = match ui.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (ui, None),
        };
        if !u.is_empty() {
            username = Some(percent_decode(u));
        }
        if let Some(p) = p.filter(|p| !p.is_empty()) {
            password = Some(Secret(percent_decode(p)));
        }
    }
    if password.is_none() {
        if let Ok(p) = std::env::var("META_PASSWORD") {
            if !p.is_empty() {
                password = Some(Secret(p));
            }
        }
    }
    let sentinel_password = std::env::var("SENTINEL_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(Secret);
    let db = match path.trim_end_matches('/') {
        "" => 0,
        p => p
            .parse::<u32>()
            .map_err(|_| config(url, format!("database {p:?} is not a number")))?,
    };
    if hosts.is_empty() {
        return Err(config(
            url,
            "no host: expected redis://[[USER]:PASS@]HOST:PORT/DB",
        ));
    }
    let items: Vec<&str> = hosts.split(',').collect();
    if items.iter().any(|s| s.is_empty()) {
        return Err(config(url, "empty host in a comma-separated list"));
    }
    let topology = if items.len() == 1 {
        let (host, port) = host_port(url, items[0])?;
        RedisTopology::Single {
            host,
            port: port.unwrap_or(6379),
        }
    } else {
        let first = host_port(url, items[0])?;
        let sentinel = first.1.is_none();
        let list = if sentinel { &items[1..] } else { &items[..] };
        let parsed = list
            .iter()
            .map(|s| host_port(url, s))
            .collect::<Result<Vec<_>>>()?;
        let default = if sentinel { 26379 } else { 6379 };
        // A host without a port takes the port of the last one that has one.
        let last = parsed.iter().rev().find_map(|(_, p)| *p).unwrap_or(default);
        let addrs: Vec<(String, u16)> = parsed
            .into_iter()
            .map(|(h, p)| (h, p.unwrap_or(last)))
            .collect();
        if sentinel {
            RedisTopology::Sentinel {
                master: first.0,
                sentinels: addrs,
            }
        } else {
            RedisTopology::Cluster { nodes: addrs }
        }
    };
    let mut r = RedisUrl {
        tls,
        username,
        password,
        sentinel_password,
        topology,
        db,
        ca_cert_file: None,
        cert_file: None,
        key_file: None,
        insecure: false,
    };
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        let v = percent_decode(v);
        match k {
            "tls-ca-cert-file" => r.ca_cert_file = Some(v),
            "tls-cert-file" => r.cert_file = Some(v),
            "tls-key-file" => r.key_file = Some(v),
            "insecure-skip-verify" => {
                r.insecure = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(config(url, format!("{k} takes true or false, not {v:?}"))),
                }
            }
            _ => {
                return Err(config(
                    url,
                    format!(
                        "unknown option {k:?} (known: tls-ca-cert-file, tls-cert-file, tls-key-file, insecure-skip-verify)"
                    ),
                ))
            }
        }
    }
    if !tls && (r.ca_cert_file.is_some() || r.cert_file.is_some() || r.insecure) {
        return Err(config(url, "TLS options need rediss://"));
    }
    if r.cert_file.is_some() != r.key_file.is_some() {
        return Err(config(url, "tls-cert-file and tls-key-file go together"));
    }
    Ok(r)
}

impl MetaUrl {
    pub fn parse(url: &str) -> Result<MetaUrl> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(MetaError::Config(format!(
                "invalid metadata URL {:?}: expected SCHEME://..., e.g. rocksdb:///var/lib/aquifer/meta or redis://127.0.0.1:6379/1",
                redact(url)
            )));
        };
        match scheme {
            "rocksdb" => {
                if rest.is_empty() {
                    return Err(MetaError::Config(format!(
                        "invalid metadata URL {url:?}: rocksdb:// needs a path, e.g. rocksdb:///var/lib/aquifer/meta"
                    )));
                }
                Ok(MetaUrl::RocksDb {
                    path: rest.to_string(),
                })
            }
            "memory" | "mem" => Ok(MetaUrl::Memory),
            "redis" => Ok(MetaUrl::Redis(parse_redis(url, false, rest)?)),
            "rediss" => Ok(MetaUrl::Redis(parse_redis(url, true, rest)?)),
            other => Err(MetaError::Config(format!(
                "unsupported metadata engine {other:?} in {:?}: supported are rocksdb://PATH, redis://HOST:PORT/DB (rediss:// for TLS) and memory://",
                redact(url)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(url: &str) -> RedisUrl {
        match MetaUrl::parse(url).unwrap() {
            MetaUrl::Redis(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses() {
        assert_eq!(
            MetaUrl::parse("rocksdb:///a/b").unwrap(),
            MetaUrl::RocksDb {
                path: "/a/b".into()
            }
        );
        assert!(MetaUrl::parse("rocksdb://").is_err());
        assert!(MetaUrl::parse("/a/b").is_err());
        assert!(MetaUrl::parse("tikv://x").is_err());
    }

    #[test]
    fn redis_forms() {
        let r = redis("redis://127.0.0.1:6380/3");
        assert_eq!(
            r.topology,
            RedisTopology::Single {
                host: "127.0.0.1".into(),
                port: 6380
            }
        );
        assert_eq!((r.db, r.tls, r.password.is_none()), (3, false, true));
        let r =
            redis("rediss://user:p%40ss@h/1?tls-ca-cert-file=/ca.pem&insecure-skip-verify=true");
        assert_eq!(r.username.as_deref(), Some("user"));
        assert_eq!(r.password.as_ref().unwrap().0, "p@ss");
        assert!(r.tls && r.insecure);
        assert_eq!(r.ca_cert_file.as_deref(), Some("/ca.pem"));
        assert!(
            !format!("{r:?}").contains("p@ss"),
            "Debug shows no password"
        );
        assert!(!r.display().contains("p@ss"));
        let r = redis("redis://:pw@mymaster,10.0.0.1,10.0.0.2:26380/2");
        assert_eq!(
            r.topology,
            RedisTopology::Sentinel {
                master: "mymaster".into(),
                sentinels: vec![("10.0.0.1".into(), 26380), ("10.0.0.2".into(), 26380)]
            }
        );
        let r = redis("redis://a:7000,b:7001,[::1]:7002/0");
        assert_eq!(
            r.topology,
            RedisTopology::Cluster {
                nodes: vec![("a".into(), 7000), ("b".into(), 7001), ("::1".into(), 7002)]
            }
        );
        assert_eq!(
            redis("redis://h").topology,
            RedisTopology::Single {
                host: "h".into(),
                port: 6379
            }
        );
    }

    #[test]
    fn bad_redis_urls_say_why_without_the_password() {
        for (url, want) in [
            ("redis://:secret@h:99999/0", "bad port"),
            ("redis://:secret@h/x", "not a number"),
            ("redis://:secret@/0", "no host"),
            ("redis://:secret@h/0?tls-ca-cert-file=x", "rediss"),
            ("redis://:secret@h/0?foo=1", "unknown option"),
            ("redis://:secret@a:1,,b:2/0", "empty host"),
        ] {
            let e = MetaUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: {e}");
        }
        assert_eq!(redact("redis://u:pw@h:1/2"), "redis://u:****@h:1/2");
    }
}
