//! `aquifer objbench`: latency and throughput of an object store alone, so a slow store can
//! be told from a slow filesystem.

use crate::parse::usize_in;
use crate::volume::{new_format, new_uuid, store_spec, S3Args};
use anyhow::{anyhow, bail, Result};
use aquifer_object::ObjectStore;
use bytes::Bytes;
use clap::Args;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Plan {
    pub objects: usize,
    pub size: usize,
    pub small_objects: usize,
    pub threads: usize,
}

struct Row {
    op: &'static str,
    count: usize,
    size: usize,
    wall: Duration,
    lat: Vec<Duration>,
}

/// Run `f(i)` for i in 0..n on `threads` threads; per-call latencies and wall time.
fn parallel(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<()> + Sync,
) -> Result<(Duration, Vec<Duration>)> {
    let next = AtomicUsize::new(0);
    let lat = Mutex::new(Vec::with_capacity(n));
    let err = Mutex::new(None);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || err.lock().unwrap().is_some() {
                    return;
                }
                let t = Instant::now();
                match f(i) {
                    Ok(()) => lat.lock().unwrap().push(t.elapsed()),
                    Err(e) => *err.lock().unwrap() = Some(e),
                }
            });
        }
    });
    if let Some(e) = err.into_inner().unwrap() {
        return Err(e);
    }
    Ok((start.elapsed(), lat.into_inner().unwrap()))
}

fn pattern(i: usize, size: usize) -> Bytes {
    let mut v = vec![0u8; size];
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    Bytes::from(v)
}

pub fn run(store: Arc<dyn ObjectStore>, plan: &Plan) -> Result<()> {
    let prefix = format!(
        "objbench/{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let key = |kind: &str, i: usize| format!("{prefix}/{kind}/{i:06}");
    let mut rows = Vec::new();
    for (kind, n, size) in [
        ("large", plan.objects, plan.size),
        ("small", plan.small_objects, 4096),
    ] {
        if n == 0 {
            continue;
        }
        let data: Vec<Bytes> = (0..n).map(|i| pattern(i, size)).collect();
        let (wall, lat) = parallel(n, plan.threads, |i| {
            store
                .put(&key(kind, i), data[i].clone())
                .map_err(|e| anyhow!("{e}"))
        })?;
        rows.push(Row {
            op: if kind == "large" { "put" } else { "put small" },
            count: n,
            size,
            wall,
            lat,
        });
        let (wall, lat) = parallel(n, plan.threads, |i| {
            let got = store
                .get(&key(kind, i), 0, None)
                .map_err(|e| anyhow!("{e}"))?;
            if got != data[i] {
                return Err(anyhow!("object {} read back different bytes", key(kind, i)));
            }
            Ok(())
        })?;
        rows.push(Row {
            op: if kind == "large" { "get" } else { "get small" },
            count: n,
            size,
            wall,
            lat,
        });
        let (wall, lat) = parallel(n, plan.threads, |i| {
            store
                .head(&key(kind, i))
                .map(|_| ())
                .map_err(|e| anyhow!("{e}"))
        })?;
        rows.push(Row {
            op: if kind == "large" {
                "head"
            } else {
                "head small"
            },
            count: n,
            size: 0,
            wall,
            lat,
        });
        let (wall, lat) = parallel(n, plan.threads, |i| {
            store.delete(&key(kind, i)).map_err(|e| anyhow!("{e}"))
        })?;
        rows.push(Row {
            op: if kind == "large" {
                "delete"
            } else {
                "delete small"
            },
            count: n,
            size: 0,
            wall,
            lat,
        });
    }
    println!(
        "object store: {} ({} threads)",
        store.describe(),
        plan.threads
    );
    println!(
        "{:<13} {:>7} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "op", "objects", "size", "MiB/s", "ops/s", "avg ms", "p50 ms", "p99 ms"
    );
    for mut r in rows {
        r.lat.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let pct = |p: f64| {
            r.lat
                .get(((r.lat.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        let avg = r.lat.iter().sum::<Duration>() / r.lat.len().max(1) as u32;
        let secs = r.wall.as_secs_f64().max(1e-9);
        let mibs = if r.size > 0 {
            format!("{:.1}", (r.count * r.size) as f64 / secs / 1048576.0)
        } else {
            "-".into()
        };
        let size = if r.size >= 1 << 20 {
            format!("{} MiB", r.size >> 20)
        } else if r.size > 0 {
            format!("{} KiB", r.size >> 10)
        } else {
            "-".into()
        };
        println!(
            "{:<13} {:>7} {:>9} {:>10} {:>9.0} {:>9.2} {:>9.2} {:>9.2}",
            r.op,
            r.count,
            size,
            mibs,
            r.count as f64 / secs,
            ms(avg),
            ms(pct(0.5)),
            ms(pct(0.99))
        );
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct ObjbenchArgs {
    /// Object storage kind: file or s3.
    #[arg(long, default_value = "file")]
    storage: String,
    /// The bucket to measure: a directory for --storage file,
    /// http(s)://HOST:PORT/BUCKET or s3://BUCKET for --storage s3.
    #[arg(long)]
    bucket: String,
    #[command(flatten)]
    s3: S3Args,
    /// Size of the large objects in KiB (the block size).
    #[arg(long, default_value_t = 4096, value_parser = usize_in(1, 1 << 20))]
    block_size: usize,
    /// Number of large objects.
    #[arg(long, default_value_t = 64, value_parser = usize_in(0, 1 << 20))]
    objects: usize,
    /// Number of 4 KiB objects (per-request latency).
    #[arg(long, default_value_t = 256, value_parser = usize_in(0, 1 << 20))]
    small_objects: usize,
    /// Concurrent requests.
    #[arg(long, default_value_t = 4, value_parser = usize_in(1, 1024))]
    threads: usize,
}

pub(crate) fn objbench(a: ObjbenchArgs) -> Result<()> {
    if a.block_size == 0 || a.threads == 0 {
        bail!("--block-size and --threads must be positive");
    }
    let mut f = new_format("objbench", &a.storage, "", 4096, 0, 0)?;
    f.bucket = match a.storage.as_str() {
        "file" => a.bucket.trim_start_matches("file://").to_string(),
        _ => a.bucket.clone(),
    };
    a.s3.apply(&mut f);
    let mut spec = store_spec(&f);
    // Its own prefix in the bucket, removed again by the benchmark.
    spec.prefix = format!("objbench-{}/", new_uuid());
    let store = aquifer_chunk::store::build(&spec, Default::default())?.store;
    run(
        store,
        &Plan {
            objects: a.objects,
            size: a.block_size * 1024,
            small_objects: a.small_objects,
            threads: a.threads,
        },
    )
}
