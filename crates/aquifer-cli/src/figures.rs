//! A mount's figures: one snapshot of its counters, served as JSON to `aquifer stats`
//! (through the control ioctl) and in the Prometheus text format at `--metrics ADDR`.
//!
//! The counters live where the work happens (the FUSE adapter, the cache tiers, the store
//! layer) as plain atomics; only this module knows about Prometheus, through the
//! `prometheus-client` crate (the Prometheus project's own Rust client: the text format and
//! its escaping are its business, not ours).

use aquifer_fuse::FuseCounters;
use aquifer_object::StoreCounters;
use aquifer_vfs::Vfs;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Figures {
    pub fuse_ops: BTreeMap<String, u64>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Opens handed to the kernel with a backing file (FUSE passthrough): their reads
    /// are the kernel's and are not counted in `read_bytes` or `fuse_ops.read`.
    #[serde(default)]
    pub passthrough_opens: u64,
    /// Opens that shared the backing file of passthrough handles of the same file (the
    /// kernel allows no other kind of open beside them); writes through them go to the
    /// copy and are mirrored into the file at each close.
    #[serde(default)]
    pub shared_opens: u64,
    /// Changes other mounts made, told to the kernel (FUSE notify).
    #[serde(default)]
    pub invalidations: u64,
    pub tiers: Vec<TierFigures>,
    pub store: StoreFig,
    /// Write data buffered in memory (tails, uploads in flight).
    pub buffered_bytes: u64,
    /// Blocks staged on the cache disk, not uploaded yet (--writeback).
    pub staged_blocks: u64,
    pub staged_bytes: u64,
    /// Where the Prometheus figures are served.
    pub metrics: Option<String>,
    /// The peer cache group this mount is a member of (`--cache-group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupFig>,
}

/// A member's share of its cache group's traffic.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GroupFig {
    pub name: String,
    pub member: String,
    pub address: String,
    /// Peer hits and bytes in, blocks served and bytes out, misses, damaged blocks,
    /// refused requests, members and suspects ([`aquifer_group::Figures`]).
    #[serde(flatten)]
    pub figures: aquifer_group::Figures,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TierFigures {
    /// `memory` or `disk`, for labels.
    pub tier: String,
    pub name: String,
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub blocks: u64,
    pub capacity: u64,
    pub evicted: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreFig {
    pub gets: u64,
    pub get_bytes: u64,
    pub puts: u64,
    pub put_bytes: u64,
    pub deletes: u64,
    pub heads: u64,
    pub lists: u64,
    pub errors: u64,
}

/// Where a mount's counters are.
pub struct Sources {
    pub vfs: Arc<Vfs>,
    pub fuse: Arc<FuseCounters>,
    pub store: Arc<StoreCounters>,
    pub metrics: parking_lot::Mutex<Option<String>>,
    /// Blocks and bytes staged for upload (--writeback).
    pub staged: Option<Box<dyn Fn() -> (u64, u64) + Send + Sync>>,
    /// The cache group joined, and its name.
    pub group: Option<(Arc<aquifer_group::Group>, String)>,
}

impl Sources {
    pub fn snapshot(&self) -> Figures {
        let cs = self.vfs.data();
        let cache = cs.cache();
        let tiers = cache
            .tiers()
            .iter()
            .zip(cache.hits())
            .enumerate()
            .map(|(i, (t, h))| {
                let u = t.usage();
                let kind = match i {
                    0 => "memory",
                    _ if t.remote() => "group",
                    _ => "disk",
                };
                TierFigures {
                    tier: kind.to_string(),
                    name: t.name(),
                    hits: h.hits,
                    misses: h.misses,
                    bytes: u.bytes,
                    blocks: u.entries,
                    capacity: u.capacity,
                    evicted: u.evicted,
                }
            })
            .collect();
        let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let s = &self.store;
        let staged = self.staged.as_ref().map(|f| f()).unwrap_or_default();
        Figures {
            fuse_ops: self.fuse.ops().map(|(n, c)| (n.to_string(), c)).collect(),
            read_bytes: l(&self.fuse.read_bytes),
            write_bytes: l(&self.fuse.write_bytes),
            passthrough_opens: l(&self.fuse.passthrough_opens),
            shared_opens: l(&self.fuse.shared_opens),
            invalidations: l(&self.fuse.invalidations),
            tiers,
            store: StoreFig {
                gets: l(&s.gets),
                get_bytes: l(&s.get_bytes),
                puts: l(&s.puts),
                put_bytes: l(&s.put_bytes),
                deletes: l(&s.deletes),
                heads: l(&s.heads),
                lists: l(&s.lists),
                errors: l(&s.errors),
            },
            buffered_bytes: cs.buffered_bytes() as u64,
            staged_blocks: staged.0,
            staged_bytes: staged.1,
            metrics: self.metrics.lock().clone(),
            group: self.group.as_ref().map(|(g, name)| GroupFig {
                name: name.clone(),
                member: g.me().id.clone(),
                address: g.addr().to_string(),
                figures: g.figures(),
            }),
        }
    }
}

type Labels = Vec<(String, String)>;

fn counter_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v);
    }
    reg.register(name, help, f);
}

fn gauge_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in rows {
        f.get_or_create(&l).set(v.min(i64::MAX as u64) as i64);
    }
    reg.register(name, help, f);
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

/// The figures in the Prometheus (OpenMetrics) text format.
pub fn prometheus_text(f: &Figures) -> String {
    let mut reg = Registry::with_prefix("aquifer");
    counter_family(
        &mut reg,
        "fuse_ops",
        "FUSE requests served",
        f.fuse_ops.iter().map(|(op, n)| (label("op", op), *n)),
    );
    counter_family(
        &mut reg,
        "fuse_bytes",
        "Bytes read and written through FUSE",
        [
            (label("direction", "read"), f.read_bytes),
            (label("direction", "write"), f.write_bytes),
        ],
    );
    counter_family(
        &mut reg,
        "fuse_passthrough_opens",
        "Opens served by the kernel from a whole-file copy (FUSE passthrough)",
        [(vec![], f.passthrough_opens)],
    );
    counter_family(
        &mut reg,
        "fuse_shared_opens",
        "Opens that shared the backing file of passthrough handles of the same file",
        [(vec![], f.shared_opens)],
    );
    counter_family(
        &mut reg,
        "fuse_invalidations",
        "Changes other mounts made, told to the kernel (FUSE notify)",
        [(vec![], f.invalidations)],
    );
    let tier = |t: &TierFigures| label("tier", &t.tier);
    counter_family(
        &mut reg,
        "cache_hits",
        "Block lookups a cache tier answered",
        f.tiers.iter().map(|t| (tier(t), t.hits)),
    );
    counter_family(
        &mut reg,
        "cache_misses",
        "Block lookups that went past a cache tier",
        f.tiers.iter().map(|t| (tier(t), t.misses)),
    );
    counter_family(
        &mut reg,
        "cache_evictions",
        "Blocks evicted from a cache tier",
        f.tiers.iter().map(|t| (tier(t), t.evicted)),
    );
    gauge_family(
        &mut reg,
        "cache_bytes",
        "Bytes a cache tier holds, as its medium counts them",
        f.tiers.iter().map(|t| (tier(t), t.bytes)),
    );
    gauge_family(
        &mut reg,
        "cache_blocks",
        "Blocks a cache tier holds",
        f.tiers.iter().map(|t| (tier(t), t.blocks)),
    );
    gauge_family(
        &mut reg,
        "cache_capacity_bytes",
        "Quota of a cache tier",
        f.tiers.iter().map(|t| (tier(t), t.capacity)),
    );
    let s = &f.store;
    counter_family(
        &mut reg,
        "object_requests",
        "Requests sent to the object store",
        [
            ("get", s.gets),
            ("put", s.puts),
            ("delete", s.deletes),
            ("head", s.heads),
            ("list", s.lists),
        ]
        .map(|(op, n)| (label("op", op), n)),
    );
    counter_family(
        &mut reg,
        "object_bytes",
        "Bytes moved to and from the object store",
        [
            (label("direction", "download"), s.get_bytes),
            (label("direction", "upload"), s.put_bytes),
        ],
    );
    counter_family(
        &mut reg,
        "object_errors",
        "Object store requests that failed",
        [(Vec::new(), s.errors)],
    );
    gauge_family(
        &mut reg,
        "write_buffer_bytes",
        "Write data buffered in memory",
        [(Vec::new(), f.buffered_bytes)],
    );
    gauge_family(
        &mut reg,
        "writeback_blocks",
        "Blocks staged on the cache disk, not uploaded yet",
        [(Vec::new(), f.staged_blocks)],
    );
    gauge_family(
        &mut reg,
        "writeback_bytes",
        "Bytes staged on the cache disk, not uploaded yet",
        [(Vec::new(), f.staged_bytes)],
    );
    if let Some(g) = &f.group {
        let by = |k: &str, v: &str| {
            vec![
                ("group".to_string(), g.name.clone()),
                (k.to_string(), v.to_string()),
            ]
        };
        let of = || vec![("group".to_string(), g.name.clone())];
        counter_family(
            &mut reg,
            "group_blocks",
            "Blocks this member got from their owners in its cache group (in) and served the others (out)",
            [(by("direction", "in"), g.figures.peer_hits), (by("direction", "out"), g.figures.served)],
        );
        counter_family(
            &mut reg,
            "group_bytes",
            "Block bytes between this member and the others of its cache group",
            [
                (by("direction", "in"), g.figures.peer_bytes_in),
                (by("direction", "out"), g.figures.peer_bytes_out),
            ],
        );
        counter_family(
            &mut reg,
            "group_peer_misses",
            "Requests to an owner that got no block (read from the store instead)",
            [(of(), g.figures.peer_misses)],
        );
        counter_family(
            &mut reg,
            "group_peer_corrupt",
            "Blocks from an owner that failed their check",
            [(of(), g.figures.peer_corrupt)],
        );
        counter_family(
            &mut reg,
            "group_refused",
            "Requests refused: without the group's key, or for another volume",
            [(of(), g.figures.refused)],
        );
        gauge_family(
            &mut reg,
            "group_members",
            "Members of the cache group now",
            [(of(), g.figures.members)],
        );
        gauge_family(
            &mut reg,
            "group_suspects",
            "Members passed over for failing a request",
            [(of(), g.figures.suspects)],
        );
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Bind the metrics listener: `addr`, or when it is taken (another mount on this node), one
/// of the next ports.
pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let sa: SocketAddr = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("{addr:?} is not an address like 127.0.0.1:9567"))?;
    let mut last = None;
    for i in 0..10u16 {
        let mut a = sa;
        a.set_port(sa.port().saturating_add(i));
        match TcpListener::bind(a) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && sa.port() != 0 => last = Some(e),
            Err(e) => return Err(anyhow::anyhow!("cannot serve metrics at {a}: {e}")),
        }
    }
    Err(anyhow::anyhow!(
        "cannot serve metrics at {addr} or the 9 ports after it: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Serve `GET /metrics` on `l` until the process ends.
pub fn serve(l: TcpListener, src: Arc<Sources>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in l.incoming().flatten() {
                let _ = answer(conn, &src);
            }
        })?;
    Ok(())
}

fn answer(mut c: TcpStream, src: &Sources) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            prometheus_text(&src.snapshot()),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics here\n".to_string(),
        )
    };
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    c.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_every_family() {
        let mut f = Figures::default();
        f.fuse_ops.insert("lookup".into(), 7);
        f.tiers.push(TierFigures {
            tier: "disk".into(),
            hits: 3,
            ..Default::default()
        });
        f.store.gets = 11;
        let t = prometheus_text(&f);
        assert!(t.contains("aquifer_fuse_ops_total{op=\"lookup\"} 7"), "{t}");
        assert!(
            t.contains("aquifer_cache_hits_total{tier=\"disk\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("aquifer_object_requests_total{op=\"get\"} 11"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
        assert!(!t.contains("aquifer_group"), "no group, no group figures");
        f.group = Some(GroupFig {
            name: "g".into(),
            figures: aquifer_group::Figures {
                served: 5,
                peer_bytes_in: 9,
                members: 3,
                ..Default::default()
            },
            ..Default::default()
        });
        let t = prometheus_text(&f);
        for want in [
            "aquifer_group_blocks_total{group=\"g\",direction=\"out\"} 5",
            "aquifer_group_bytes_total{group=\"g\",direction=\"in\"} 9",
            "aquifer_group_members{group=\"g\"} 3",
        ] {
            assert!(t.contains(want), "{want} in {t}");
        }
    }
}
