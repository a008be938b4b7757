//! `aquifer mount`: the engine, the store and the cache tiers a mount stacks, then the
//! FUSE session (in the background with `-d`).

use crate::parse::{
    parse_duration, parse_ratio, parse_seconds, parse_session_timeout, parse_size, usize_in,
};
use crate::volume::*;
use anyhow::{anyhow, bail, Context as _, Result};
use aquifer_chunk::store::{Stack, StackOptions, StagingOptions};
use aquifer_chunk::DataConfig;
use aquifer_meta::{Format, MetaError};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub(crate) struct MountArgs {
    /// `[META_URL] MOUNTPOINT`: with one argument it is the mount point of the embedded default.
    #[arg(num_args = 1..=2, required = true, value_names = ["META_URL", "MOUNTPOINT"])]
    args: Vec<String>,
    /// Run in the background, logging to --log.
    #[arg(short = 'd', long = "background")]
    background: bool,
    /// Log file for background mounts.
    #[arg(long)]
    log: Option<PathBuf>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 16, value_parser = usize_in(1, 1024))]
    threads: usize,
    /// Threads uploading blocks to the object store.
    #[arg(long, default_value_t = 8, value_parser = usize_in(1, 256))]
    max_uploads: usize,
    /// Threads fetching blocks ahead of sequential readers, and how many blocks ahead they
    /// go: on object stores throughput comes from many GETs in flight.
    #[arg(long, default_value_t = 8, value_parser = usize_in(1, 256))]
    max_downloads: usize,
    /// Memory in MiB for data in flight: half for buffered writes (open files' tails and
    /// blocks queued for upload; writers wait, not fail, when it is full), half for blocks
    /// read ahead.
    #[arg(long, default_value_t = 128, value_parser = usize_in(8, 1 << 20))]
    buffer_size: usize,
    /// Kernel attribute cache time in seconds (0 to 86400). Default: an hour while the
    /// mount keeps the kernel's caches true by invalidation (one mount of an embedded
    /// volume; on Redis, while it follows the volume's changes), else 1.
    #[arg(long, value_parser = parse_seconds)]
    attr_cache: Option<f64>,
    /// Kernel cache time of name lookups in seconds (0 to 86400). Default as --attr-cache.
    #[arg(long, value_parser = parse_seconds)]
    entry_cache: Option<f64>,
    #[command(flatten)]
    pub(crate) cache: CacheArgs,
    #[command(flatten)]
    group: crate::group::GroupArgs,
    /// Which written blocks the cache disks keep on their way to the store: `small` (files
    /// smaller than one block, stored at close or fsync), `all`, or `none`.
    /// A checkpoint's full blocks are rarely read back on the node that wrote them; kept,
    /// they would take the room of the blocks training reads hit.
    #[arg(long, default_value = "small", value_parser = aquifer_chunk::CacheWrites::parse)]
    cache_writes: aquifer_chunk::CacheWrites,
    /// Stage written blocks on the (first) cache disk and upload them in the background:
    /// fsync returns once they are on the local disk; blocks still staged at a crash are
    /// uploaded at the next mount first. Other mounts see a block once it is uploaded.
    #[arg(long)]
    writeback: bool,
    /// FUSE passthrough: a file opened read-only whose blocks are all on the cache disk is
    /// read by the kernel from a whole-file copy there, at local-disk speed (Linux 6.9+ and
    /// CAP_SYS_ADMIN; without them the daemon serves reads as usual). On by default with
    /// --read-only. A file opened for writing while it is open in passthrough is written
    /// through the copy (the kernel allows no other kind of open then) and stored at each
    /// close, which then reads the whole file; see docs/semantics.md for what that
    /// changes (mmap stores after close, writers on two mounts): for read-mostly datasets.
    #[arg(long, conflicts_with = "no_passthrough")]
    passthrough: bool,
    /// No FUSE passthrough, even with --read-only.
    #[arg(long)]
    no_passthrough: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (`none` to not); when the port is
    /// taken by another mount, the next free one of the 9 after it.
    #[arg(long, default_value = "127.0.0.1:9567")]
    metrics: String,
    /// Blocks fetched ahead of sequential readers, all readers of the mount together
    /// (default: --max-downloads, 2 to 32; at most what half the RAM cache holds).
    #[arg(long, value_parser = usize_in(0, 256))]
    prefetch: Option<usize>,
    /// Allow other users to access the mount (default when run as root).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// Opens and closes of files never reach the daemon (the kernel's no-open mode): a
    /// file read again costs no request at all while its pages are cached. Needs
    /// --read-only; turns passthrough off; locks are this node's alone, and another mount's
    /// change is seen within the invalidation bound rather than at the next open
    /// (docs/semantics.md).
    #[arg(long)]
    no_open: bool,
    /// Upload bandwidth limit in MiB/s (0 = none), so a checkpoint writer keeps to its share.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..1 << 30))]
    upload_limit: u64,
    /// Download bandwidth limit in MiB/s (0 = none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..1 << 30))]
    download_limit: u64,
    /// Mount even if the mount point is not empty.
    #[arg(long)]
    nonempty: bool,
    /// Data directory of the embedded default volume.
    #[arg(long, env = "AQUIFER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds without a heartbeat after which other mounts of a shared volume (Redis) take
    /// this mount for dead and clean up after it: its locks are released and the files it
    /// had open but were unlinked are freed. Heartbeats go every sixth of it (at most 10 s).
    #[arg(long, default_value_t = 60.0, value_parser = parse_session_timeout)]
    session_timeout: f64,
    /// What fsync and close wait for on a Redis volume: `aof` (the server's AOF on disk:
    /// WAITAOF on Redis 7.2+, or a server with appendfsync always), `replicas:N` (N replicas
    /// have it: WAIT), `aof+replicas:N`, or `none`. A server that cannot give the chosen
    /// setting is refused. Default: `aof` where the server keeps an AOF, with a warning
    /// where it cannot.
    #[arg(long, value_parser = aquifer_meta_redis::Durability::parse)]
    meta_durability: Option<aquifer_meta_redis::Durability>,
    /// How long the blocks of deleted and overwritten data stay after the change that freed
    /// them, measured on the metadata server's clock: 90s, 10m, 1h or a number of seconds,
    /// 0 to free at once. Default 10m on Redis (outlasts a failover to a replica that had not
    /// received the change), 0 on RocksDB (no failover).
    #[arg(long, value_parser = parse_duration)]
    free_grace: Option<Duration>,
}

/// Where blocks are cached on this node: flags of `mount` and `cache-node`.
#[derive(Args)]
pub(crate) struct CacheArgs {
    /// Block cache directories on local disks, `DIR[:DIR...]`; blocks are spread over them
    /// by hash. `memory` (or `none`) for RAM only. Default: `DATA_DIR/cache` for object
    /// stores, none for a local `file` store (its blocks are on a local disk already).
    #[arg(long)]
    pub(crate) cache_dir: Option<String>,
    /// Quota of the disk cache, split across its directories: `512M`, `100G`, `1T`; a bare
    /// number is MiB. Counted as the disk counts it (allocated blocks).
    #[arg(long, default_value = "100G", value_parser = parse_size)]
    pub(crate) cache_size: u64,
    /// Eviction starts when the disk cache passes this share of --cache-size...
    #[arg(long, default_value_t = 0.95, value_parser = parse_ratio)]
    pub(crate) cache_high: f64,
    /// ...and stops when it is down to this share.
    #[arg(long, default_value_t = 0.70, value_parser = parse_ratio)]
    pub(crate) cache_low: f64,
    /// Keep at least this share of each cache disk free, evicting if others fill it.
    #[arg(long, default_value_t = 0.1, value_parser = parse_ratio)]
    pub(crate) free_space_ratio: f64,
    /// Seconds before a cache disk taken out of use after a failure is tried again.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds, hide = true)]
    pub(crate) cache_retry: f64,
    /// RAM for cached blocks (units as --cache-size). Default: half of --buffer-size.
    #[arg(long, value_parser = parse_size)]
    pub(crate) mem_cache_size: Option<u64>,
}

impl CacheArgs {
    /// The RAM tier's size (`--mem-cache-size`, else `half` of the buffer) and the cache a
    /// group member offers: its disk cache, or its RAM without one.
    pub(crate) fn ram_and_weight(&self, half: usize, disks: &aquifer_chunk::Tiers) -> (usize, u64) {
        let ram = self
            .mem_cache_size
            .map(|b| b.min(usize::MAX as u64) as usize)
            .unwrap_or(half);
        let weight = if disks.0.is_empty() {
            ram as u64
        } else {
            self.cache_size
        };
        (ram, weight)
    }
}

pub(crate) fn mount(a: MountArgs) -> Result<()> {
    let (url, mp) = match a.args.as_slice() {
        [mp] => (None, PathBuf::from(mp)),
        [url, mp] => (Some(url.clone()), PathBuf::from(mp)),
        _ => bail!("usage: aquifer mount [META_URL] MOUNTPOINT"),
    };
    if a.no_open && !a.read_only {
        bail!("--no-open needs --read-only: without opens there is no close to store writes at");
    }
    if a.no_open && a.passthrough {
        bail!("--no-open and --passthrough exclude each other: passthrough is answered at open");
    }
    crate::mountpoint::check(&mp, a.nonempty)?;
    let mp = std::fs::canonicalize(&mp).with_context(|| format!("mount point {}", mp.display()))?;
    let data_dir = a.data_dir.clone().unwrap_or_else(default_data_dir);
    if a.background && std::env::var_os(crate::mountpoint::DAEMON_ENV).is_none() {
        let log = a
            .log
            .clone()
            .unwrap_or_else(|| data_dir.join("aquifer.log"));
        return crate::mountpoint::spawn_background(&mp, &log);
    }
    crate::init_logging();
    crate::tune_malloc();
    // Signals are blocked before any thread starts (RocksDB's and ours) so that only the
    // signal thread sees them.
    let signals = crate::mountpoint::block_signals();
    let (url, embedded) = match url {
        Some(u) => (u, false),
        None => {
            let vol = data_dir.join("default");
            (format!("rocksdb://{}", vol.join("meta").display()), true)
        }
    };
    let meta = open_meta_with(
        &url,
        embedded,
        false,
        Duration::from_secs_f64(a.session_timeout),
        Some(
            a.meta_durability
                .unwrap_or(aquifer_meta_redis::Durability::DEFAULT),
        ),
    )?;
    if embedded && matches!(meta.load_format(), Err(MetaError::NotFormatted)) {
        let blocks = data_dir.join("default").join("blocks");
        let f = new_format("default", "file", &blocks.display().to_string(), 4096, 0, 0)?;
        let store = check_store(&f)?;
        aquifer_chunk::store::claim_volume(&*store, &f.name, &f.uuid)
            .map_err(|e| anyhow!("{e}"))?;
        meta.format(&f, false).map_err(meta_err)?;
        tracing::info!(url, blocks = %blocks.display(), "formatted the embedded default volume");
    }
    let format = meta.load_format().map_err(meta_err)?;
    let compression =
        aquifer_chunk::Compression::parse(&format.compression).map_err(|e| anyhow!(e))?;
    // The cache disks before the store: the first of them is where --writeback stages.
    let (lower_tiers, place, cache_root) = disk_tiers(&a.cache, &format, &data_dir, a.max_uploads)?;
    let staging = match (a.writeback, place) {
        (false, _) => None,
        (true, None) => bail!("--writeback stages blocks on a cache disk: give --cache-dir"),
        (true, Some(p)) => Some(p),
    };
    let Stack {
        store,
        counters: store_counters,
        staging,
    } = aquifer_chunk::store::build(
        &store_spec(&format),
        StackOptions {
            upload_mib: a.upload_limit,
            download_mib: a.download_limit,
            volume: Some(&format),
            staging,
        },
    )?;
    let metrics = match a.metrics.as_str() {
        "" | "none" | "off" => None,
        addr => {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                bail!("--metrics {addr:?} is not an address like 127.0.0.1:9567 (or none)");
            }
            // Figures are not worth failing a mount for.
            crate::figures::bind(addr)
                .map_err(|e| tracing::warn!(error = %e, "no Prometheus metrics"))
                .ok()
        }
    };
    let half = (a.buffer_size << 20) / 2;
    let (mem_cache, weight) = a.cache.ram_and_weight(half, &lower_tiers);
    let joined = crate::group::join(
        &a.group,
        &*meta,
        &format.uuid,
        weight,
        format.block_size,
        cache_root.as_deref(),
    )?;
    let cfg = DataConfig {
        upload_threads: a.max_uploads,
        // The write budget bounds memory; the queue only has to keep the uploaders busy.
        upload_queue: (half / format.block_size as usize).max(1) + a.max_uploads,
        write_buffer: half,
        cache_bytes: mem_cache,
        prefetch_threads: a.max_downloads.max(1),
        readahead_blocks: a.prefetch.unwrap_or(a.max_downloads.clamp(2, 32)) as u32,
        compression,
        lower_tiers,
        group: joined.as_ref().map(|j| j.group.clone()),
        cache_writes: a.cache_writes,
        free_grace: free_grace(a.free_grace, &*meta),
        ..Default::default()
    };
    let vfs = aquifer_vfs::Vfs::new(meta.clone(), store, cfg)
        .map_err(|e| anyhow!("cannot load volume: {e}"))?;
    vfs.start_session(session_info(
        mp.display().to_string(),
        joined.as_ref().map(|j| j.member.clone()),
    ))
    .map_err(|e| anyhow!("cannot start a session: {e}"))?;
    if let Some(j) = &joined {
        j.group.serve(vfs.chunk_store().clone());
        crate::group::follow(&j.group, meta.clone(), j.member.name.clone())?;
    }
    let fuse_counters = Arc::new(aquifer_fuse::FuseCounters::default());
    let sources = Arc::new(crate::figures::Sources {
        vfs: vfs.clone(),
        fuse: fuse_counters.clone(),
        store: store_counters,
        metrics: parking_lot::Mutex::new(None),
        staged: staging
            .clone()
            .map(|s| Box::new(move || s.backlog()) as Box<dyn Fn() -> (u64, u64) + Send + Sync>),
        group: joined
            .as_ref()
            .map(|j| (j.group.clone(), j.member.name.clone())),
    });
    if let Some(l) = metrics {
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if !a.metrics.ends_with(&at) {
            tracing::warn!(asked = %a.metrics, serving = %at, "metrics address taken; using the next free port");
        }
        crate::figures::serve(l, sources.clone()).context("cannot start the metrics thread")?;
        tracing::info!(address = %at, "serving Prometheus metrics at /metrics");
        *sources.metrics.lock() = Some(at);
    }
    let figures_fn: aquifer_fuse::FiguresFn = {
        let s = sources.clone();
        Arc::new(move || serde_json::to_vec(&s.snapshot()).unwrap_or_default())
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let opts = aquifer_fuse::MountOptions {
        fs_name: format!("aquifer:{}", format.name),
        threads: a.threads,
        allow_other: a.allow_other || root,
        read_only: a.read_only,
        ttls: aquifer_fuse::Ttls {
            attr: a.attr_cache.map(Duration::from_secs_f64),
            entry: a.entry_cache.map(Duration::from_secs_f64),
        },
        counters: fuse_counters,
        figures: Some(figures_fn),
        passthrough: (a.passthrough || a.read_only) && !a.no_passthrough,
        no_open: a.no_open,
    };
    // Held until the process exits, after the metadata engine is closed: `aquifer umount`
    // returns only then.
    if let Some(lock) = crate::mountpoint::hold_mount_lock(&mp) {
        std::mem::forget(lock);
    }
    let mut session = match aquifer_fuse::mount(vfs.clone(), &mp, &opts) {
        Ok(s) => s,
        Err(e) => {
            vfs.shutdown();
            bail!("cannot mount at {}: {e}", mp.display());
        }
    };
    crate::trim_malloc_periodically();
    tracing::info!(mountpoint = %mp.display(), volume = %format.name, meta = %aquifer_meta::url::redact(&url), "mounted");
    crate::mountpoint::handle_signals(signals, session.unmount_callable(), vfs.clone(), mp.clone());
    let r = session.run();
    vfs.shutdown();
    if let Some(s) = &staging {
        s.shutdown(Duration::from_secs(10));
    }
    tracing::info!(mountpoint = %mp.display(), "unmounted");
    r.map_err(|e| anyhow!("FUSE session ended with an error: {e}"))
}

/// The disk cache tiers `--cache-dir` asks for, each under a directory named by the volume's
/// UUID (volumes sharing a disk never mix blocks); where --writeback would stage blocks
/// (the first cache disk, whose quota counts them, with `uploads` threads); and that first
/// disk's directory.
pub(crate) fn disk_tiers(
    a: &CacheArgs,
    f: &Format,
    data_dir: &Path,
    uploads: usize,
) -> Result<(
    aquifer_chunk::Tiers,
    Option<StagingOptions>,
    Option<PathBuf>,
)> {
    use aquifer_cache::{DiskConfig, DiskTier, Spread, Tier};
    if a.cache_low >= a.cache_high {
        bail!(
            "--cache-low ({}) must be below --cache-high ({})",
            a.cache_low,
            a.cache_high
        );
    }
    let dirs: Vec<PathBuf> = match a.cache_dir.as_deref() {
        Some("memory") | Some("none") => Vec::new(),
        Some(list) => {
            let v: Vec<PathBuf> = list
                .split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect();
            if v.is_empty() {
                bail!("--cache-dir {list:?} names no directory");
            }
            v
        }
        None if f.storage == "file" => Vec::new(),
        None => vec![data_dir.join("cache")],
    };
    if dirs.is_empty() || a.cache_size == 0 {
        return Ok((aquifer_chunk::Tiers::default(), None, None));
    }
    let cfg = DiskConfig {
        capacity: a.cache_size / dirs.len() as u64,
        high: a.cache_high,
        low: a.cache_low,
        free_ratio: a.free_space_ratio,
        retry: Duration::from_secs_f64(a.cache_retry),
    };
    let mut parts: Vec<Arc<dyn Tier>> = Vec::new();
    let mut staging = None;
    for d in &dirs {
        let root = d.join(&f.uuid);
        let t = DiskTier::open(&root, cfg.clone())
            .with_context(|| format!("cannot use cache directory {}", root.display()))?;
        tracing::info!(dir = %root.display(), quota = cfg.capacity, "disk cache");
        if staging.is_none() {
            staging = Some(StagingOptions {
                dir: root.join("staging"),
                pinned: t.pinned(),
                // Half the disk's quota at most: the rest stays a read cache.
                limit: cfg.capacity / 2,
                threads: uploads,
            });
        }
        parts.push(Arc::new(t));
    }
    let tier: Arc<dyn Tier> = if parts.len() == 1 {
        parts.pop().expect("one")
    } else {
        Arc::new(Spread::new(parts))
    };
    let first = dirs.first().map(|d| d.join(&f.uuid));
    Ok((aquifer_chunk::Tiers(vec![tier]), staging, first))
}
