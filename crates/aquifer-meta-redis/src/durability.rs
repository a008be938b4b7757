//! What fsync and close wait for on a Redis volume (`--meta-durability`), and the server
//! settings a volume cannot live with.
//!
//! Redis answers a write once it is in memory; whether it survives a crash of the server
//! depends on its AOF (`appendonly`, `appendfsync`), and whether it survives a failover on
//! the replicas having it. A sync writes one key and then waits, on the same connection, for
//! that write to be on disk (`WAITAOF`, Redis 7.2+) or on N replicas (`WAIT`): both streams
//! are ordered, so every write acknowledged before it is covered too, from any connection.

use redis::{Connection, RedisResult};
use std::fmt;
use std::time::Duration;

/// How long a sync waits for the AOF or the replicas before it fails.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The durability a sync waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durability {
    /// The master's AOF has the write on disk.
    pub aof: bool,
    /// This many replicas have the write.
    pub replicas: u32,
    /// Chosen by the operator: refuse a server that cannot give it (the default only warns).
    pub strict: bool,
}

impl Durability {
    /// The default: the AOF on disk where the server keeps one, so that a crash of a
    /// single server loses nothing acknowledged; a warning where it cannot.
    pub const DEFAULT: Durability = Durability {
        aof: true,
        replicas: 0,
        strict: false,
    };

    /// `none`, `aof`, `replicas:N` or `aof+replicas:N`.
    pub fn parse(s: &str) -> Result<Durability, String> {
        let mut d = Durability {
            aof: false,
            replicas: 0,
            strict: true,
        };
        if s == "none" {
            return Ok(d);
        }
        for part in s.split('+') {
            match part.split_once(':') {
                None if part == "aof" && !d.aof => d.aof = true,
                Some(("replicas", n)) if d.replicas == 0 => {
                    d.replicas = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| format!("replicas:N needs N from 1 to 64, got {n:?}"))?;
                }
                _ => {
                    return Err(format!(
                        "unknown metadata durability {s:?}: use none, aof, replicas:N or aof+replicas:N"
                    ))
                }
            }
        }
        Ok(d)
    }

    pub fn waits(&self) -> bool {
        self.aof || self.replicas > 0
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.aof, self.replicas) {
            (false, 0) => write!(f, "none"),
            (true, 0) => write!(f, "aof"),
            (false, n) => write!(f, "replicas:{n}"),
            (true, n) => write!(f, "aof+replicas:{n}"),
        }
    }
}

/// What the server offers, read once per master.
#[derive(Clone, Debug, Default)]
pub struct Server {
    pub version: (u32, u32),
    pub aof_enabled: bool,
    /// `appendfsync`, when CONFIG may be read (managed services often forbid it).
    pub appendfsync: Option<String>,
    pub maxmemory_policy: String,
}

impl Server {
    pub fn read(c: &mut Connection) -> RedisResult<Server> {
        let info: String = redis::cmd("INFO").arg("server").query(c)?;
        let persistence: String = redis::cmd("INFO").arg("persistence").query(c)?;
        let memory: String = redis::cmd("INFO").arg("memory").query(c)?;
        let field = |text: &str, name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let version = field(&info, "redis_version").unwrap_or_default();
        let mut v = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let version = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        let appendfsync = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query::<Vec<String>>(c)
            .ok()
            .and_then(|r| r.get(1).cloned());
        Ok(Server {
            version,
            aof_enabled: field(&persistence, "aof_enabled").as_deref() == Some("1"),
            appendfsync,
            maxmemory_policy: field(&memory, "maxmemory_policy").unwrap_or_default(),
        })
    }

    /// WAITAOF exists (Redis 7.2+).
    fn has_waitaof(&self) -> bool {
        self.version >= (7, 2)
    }

    /// Every write is on disk before the server answers it.
    fn fsyncs_every_write(&self) -> bool {
        self.aof_enabled && self.appendfsync.as_deref() == Some("always")
    }

    /// Refuse a memory policy that may evict keys without a TTL: a volume's keys have none,
    /// and an evicted attribute or directory entry is a file lost.
    pub fn check_eviction(&self) -> Result<(), String> {
        if self.maxmemory_policy.starts_with("allkeys-") {
            return Err(format!(
                "the Redis server's maxmemory-policy is {}: it may evict metadata keys (files would vanish); \
                 set it to noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf)",
                self.maxmemory_policy
            ));
        }
        Ok(())
    }

    /// What a sync must do for `d` on this server: `Ok(None)` nothing; `Err` the server
    /// cannot give `d` (the message says why).
    pub fn plan(&self, d: &Durability) -> Result<Plan, String> {
        let mut plan = Plan::default();
        if d.aof {
            if !self.aof_enabled {
                return Err(
                    "the Redis server keeps no AOF (appendonly no): a crash of the server \
                            loses changes it acknowledged; set appendonly yes"
                        .into(),
                );
            }
            if self.has_waitaof() {
                plan.waitaof = !self.fsyncs_every_write();
            } else if !self.fsyncs_every_write() {
                return Err(format!(
                    "the Redis server ({}.{}) has no WAITAOF and does not fsync every write \
                     (appendfsync {}): a crash of the server may lose up to a second of changes; \
                     set appendfsync always or use Redis 7.2+",
                    self.version.0,
                    self.version.1,
                    self.appendfsync.as_deref().unwrap_or("unknown")
                ));
            }
        }
        plan.replicas = d.replicas;
        Ok(plan)
    }
}

/// What one sync does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub waitaof: bool,
    pub replicas: u32,
}

impl Plan {
    pub fn waits(&self) -> bool {
        self.waitaof || self.replicas > 0
    }

    /// Write `marker` and wait until that write (and so every earlier one) is as durable as
    /// planned. Fails when the AOF or the replicas did not confirm in time.
    pub fn wait(&self, c: &mut Connection, marker: &[u8]) -> RedisResult<Result<(), String>> {
        if !self.waits() {
            return Ok(Ok(()));
        }
        let ms = WAIT_TIMEOUT.as_millis() as u64;
        let mut p = redis::pipe();
        p.cmd("INCR").arg(marker).ignore();
        if self.waitaof {
            p.cmd("WAITAOF").arg(1).arg(self.replicas).arg(ms);
            let ((local, replicas),): ((i64, i64),) = p.query(c)?;
            if local < 1 {
                return Ok(Err(format!(
                    "the Redis server did not write its AOF to disk within {}s",
                    WAIT_TIMEOUT.as_secs()
                )));
            }
            if replicas < self.replicas as i64 {
                return Ok(Err(format!(
                    "{replicas} of {} Redis replicas wrote their AOF within {}s",
                    self.replicas,
                    WAIT_TIMEOUT.as_secs()
                )));
            }
            return Ok(Ok(()));
        }
        p.cmd("WAIT").arg(self.replicas).arg(ms);
        let (acked,): (i64,) = p.query(c)?;
        if acked < self.replicas as i64 {
            return Ok(Err(format!(
                "{acked} of {} Redis replicas acknowledged within {}s",
                self.replicas,
                WAIT_TIMEOUT.as_secs()
            )));
        }
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_settings() {
        assert_eq!(Durability::parse("none").unwrap().to_string(), "none");
        assert_eq!(Durability::parse("aof").unwrap().to_string(), "aof");
        let d = Durability::parse("replicas:2").unwrap();
        assert_eq!((d.aof, d.replicas, d.strict), (false, 2, true));
        assert_eq!(
            Durability::parse("aof+replicas:1").unwrap().to_string(),
            "aof+replicas:1"
        );
        for bad in [
            "",
            "fast",
            "replicas",
            "replicas:0",
            "replicas:x",
            "aof+aof",
        ] {
            assert!(Durability::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plans() {
        let aof = Durability::parse("aof").unwrap();
        let mut s = Server {
            version: (7, 0),
            aof_enabled: true,
            appendfsync: Some("always".into()),
            maxmemory_policy: "noeviction".into(),
        };
        assert_eq!(s.plan(&aof).unwrap(), Plan::default());
        s.appendfsync = Some("everysec".into());
        assert!(s.plan(&aof).unwrap_err().contains("appendfsync everysec"));
        s.version = (7, 2);
        assert!(s.plan(&aof).unwrap().waitaof);
        s.aof_enabled = false;
        assert!(s.plan(&aof).unwrap_err().contains("appendonly no"));
        let r = Durability::parse("replicas:2").unwrap();
        assert_eq!(s.plan(&r).unwrap().replicas, 2);
        s.maxmemory_policy = "allkeys-lru".into();
        assert!(s.check_eviction().is_err());
        s.maxmemory_policy = "volatile-lru".into();
        assert!(s.check_eviction().is_ok());
    }
}
