//! `aquifer`: format, mount, umount and inspect volumes.

mod figures;
mod fluid;
mod mountpoint;
mod objbench;
mod warmup;

use anyhow::{anyhow, bail, Context as _, Result};
use aquifer_chunk::DataConfig;
use aquifer_meta::url::MetaUrl;
use aquifer_meta::{Format, KvMeta, MemKv, Meta, MetaError, SessionInfo};
use aquifer_meta_rocksdb::RocksKv;
use clap::{Args, Parser, Subcommand};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "aquifer",
    version,
    about = "A distributed POSIX filesystem for AI pipelines"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format a new volume (or update the settings of one with --force).
    Format(FormatArgs),
    /// Mount a volume. With only MOUNTPOINT, uses the embedded default volume.
    Mount(MountArgs),
    /// Unmount a mounted volume.
    Umount(UmountArgs),
    /// Show a volume's settings, sessions and usage as JSON.
    Status(StatusArgs),
    /// Write a volume's whole namespace (tree, attributes, xattrs, symlinks, hard links,
    /// slice lists, settings) as one JSON document, a record at a time; `-` for stdout.
    Dump(DumpArgs),
    /// Read a dump into an empty metadata engine (any engine: the way from RocksDB to Redis
    /// and back); `-` for stdin.
    Load(LoadArgs),
    /// Measure an object store alone: put/get/head/delete latency and throughput.
    Objbench(ObjbenchArgs),
    /// Find objects no file references (leaked by crashes, failed flushes, lost
    /// compactions) and, with --delete, remove them.
    Gc(GcArgs),
    /// Check that every block of every file exists (--deep: and reads back intact).
    Fsck(FsckArgs),
    /// Pre-load files and trees under a live mount into its cache (or --check what share is
    /// cached, or --evict them).
    Warmup(warmup::WarmupArgs),
    /// Show a live mount's figures every second: FUSE ops, bytes, cache hits per tier,
    /// object-store requests, writeback backlog, evictions.
    Stats(warmup::StatsArgs),
    /// Serve the CSI driver (Kubernetes PersistentVolumes) on a unix socket, or with
    /// --mode mounter run the node daemon that keeps a node's mounts.
    Csi(CsiArgs),
    /// Mount as the FUSE container of a Fluid ThinRuntime, from the configuration Fluid
    /// writes (k8s/examples/fluid.yaml).
    FluidMount(fluid::FluidMountArgs),
}

#[derive(Args)]
struct CsiArgs {
    /// Where to serve: unix:///PATH/csi.sock (not needed with --mode mounter).
    #[arg(long, default_value = "")]
    endpoint: String,
    /// This node's name (NodeGetInfo, node labels), usually the Kubernetes node name.
    #[arg(long)]
    node_id: String,
    /// Which services to serve: controller, node or all; or `mounter`, the node daemon
    /// that keeps the node's filesystem mounts for a node plugin run with
    /// --external-mounts.
    #[arg(long, default_value = "all")]
    mode: aquifer_csi::Mode,
    /// Where filesystems are mounted on the node, described and logged.
    #[arg(long, default_value = "/var/lib/aquifer-csi")]
    state_dir: PathBuf,
    /// Where node mounts are described, secrets included (root only): a tmpfs such as
    /// /run/aquifer-csi/specs keeps them off disks and drops them at a reboot. Default:
    /// STATE_DIR/specs. The plugin and the node daemon must agree.
    #[arg(long)]
    specs_dir: Option<PathBuf>,
    /// Node mounts are made by the node daemon (`--mode mounter` on the same --state-dir):
    /// the plugin only asks and waits, so restarting it touches no mount.
    #[arg(long)]
    external_mounts: bool,
    /// Put the cache of each node mount under this directory (a host directory, so a
    /// restarted daemon finds its cache), unless its mount options name a cache-dir.
    #[arg(long)]
    cache_root: Option<PathBuf>,
    /// Unmount a filesystem on the node once no volume of it has been published here for
    /// this long: 10m, 90s, or 0 for at once (the last unpublish unmounts it, when the
    /// plugin keeps its own mounts). A delay keeps the daemon and its RAM cache for the
    /// next pod.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    release_after: Duration,
    /// Label this node `warm.aquifer.dev/VOLUME=true` once `aquifer warmup` has warmed a
    /// volume on it: `in-cluster` (the pod's service account) or an API URL.
    #[arg(long)]
    label_node: Option<String>,
    /// Seconds between looks at the mounts (0: never; publishes still repair).
    #[arg(long, default_value_t = 2.0, value_parser = parse_seconds, hide = true)]
    keep_interval: f64,
}

#[derive(Args)]
struct GcArgs {
    meta_url: String,
    /// Delete the leaked objects (otherwise only report them).
    #[arg(long)]
    delete: bool,
    /// Spare leftovers of dead mounts younger than this: 1h, 30m, 90s, 2d or a number of
    /// seconds. What live mounts may still commit is spared whatever its age.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    min_age: Duration,
    /// Free trash records only this long after the change that freed them, as mounts do
    /// (default: 10m on Redis, 0 on RocksDB; see `mount --free-grace`).
    #[arg(long, value_parser = parse_duration)]
    free_grace: Option<Duration>,
    /// Concurrent deletes.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
}

#[derive(Args)]
struct FsckArgs {
    meta_url: String,
    /// Only check files below this path of the volume.
    #[arg(long, default_value = "/")]
    path: String,
    /// Read every block and verify its checksums (otherwise only its presence and size).
    #[arg(long)]
    deep: bool,
}

/// Where an S3 bucket is and how to sign requests to it.
#[derive(Args, Clone, Default)]
struct S3Args {
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    region: Option<String>,
    /// Endpoint of an S3-compatible server for `s3://BUCKET` (http(s)://HOST:PORT).
    #[arg(long)]
    endpoint: Option<String>,
    /// Access key; without one, the standard AWS chain is used (AWS_ACCESS_KEY_ID,
    /// profile files, web identity, instance roles).
    #[arg(long)]
    access_key: Option<String>,
    /// Secret key (or set AQUIFER_SECRET_KEY to keep it off the command line).
    #[arg(long, env = "AQUIFER_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
}

impl S3Args {
    /// Record these settings in a volume's settings.
    fn apply(&self, f: &mut Format) {
        f.region = self.region.clone().unwrap_or_default();
        f.endpoint = self.endpoint.clone().unwrap_or_default();
        f.access_key = self.access_key.clone().unwrap_or_default();
        f.secret_key = aquifer_meta::Secret(self.secret_key.clone().unwrap_or_default());
    }
}

#[derive(Args)]
struct ObjbenchArgs {
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

#[derive(Args)]
struct FormatArgs {
    /// Metadata URL, e.g. rocksdb:///var/lib/aquifer/vol/meta
    meta_url: String,
    /// Volume name.
    name: String,
    /// Object storage kind: file or s3 (minio is accepted as s3).
    #[arg(long, default_value = "file")]
    storage: String,
    /// Where the blocks go: a directory for --storage file; http(s)://HOST:PORT/BUCKET
    /// (path style: MinIO, Ceph RGW, Garage) or s3://BUCKET for --storage s3. Blocks are
    /// kept under the volume name inside the bucket.
    #[arg(long)]
    bucket: Option<String>,
    #[command(flatten)]
    s3: S3Args,
    /// Block compression: none, lz4 or zstd (fixed at format time).
    #[arg(long, default_value = "none")]
    compression: String,
    /// Block size in KiB (fixed at format time).
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Capacity limit in GiB (0 = unlimited).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..1 << 33))]
    capacity: u64,
    /// Inode limit (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    inodes: u64,
    /// Update the settings of an existing volume.
    #[arg(long)]
    force: bool,
    /// Succeed without changing anything when a volume is already formatted here (for
    /// provisioners that format on first use, such as `aquifer csi`).
    #[arg(long, conflicts_with = "force")]
    if_not_formatted: bool,
}

#[derive(Args)]
struct MountArgs {
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
    /// Kernel attribute cache time in seconds (0 to 86400).
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
    attr_cache: f64,
    /// Kernel cache time of name lookups in seconds (0 to 86400).
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
    entry_cache: f64,
    /// Block cache directories on local disks, `DIR[:DIR...]`; blocks are spread over them
    /// by hash. `memory` (or `none`) for RAM only. Default: `DATA_DIR/cache` for object
    /// stores, none for a local `file` store (its blocks are on a local disk already).
    #[arg(long)]
    cache_dir: Option<String>,
    /// Quota of the disk cache, split across its directories: `512M`, `100G`, `1T`; a bare
    /// number is MiB. Counted as the disk counts it (allocated blocks).
    #[arg(long, default_value = "100G", value_parser = parse_size)]
    cache_size: u64,
    /// Eviction starts when the disk cache passes this share of --cache-size...
    #[arg(long, default_value_t = 0.95, value_parser = parse_ratio)]
    cache_high: f64,
    /// ...and stops when it is down to this share.
    #[arg(long, default_value_t = 0.70, value_parser = parse_ratio)]
    cache_low: f64,
    /// Keep at least this share of each cache disk free, evicting if others fill it.
    #[arg(long, default_value_t = 0.1, value_parser = parse_ratio)]
    free_space_ratio: f64,
    /// Stage written blocks on the (first) cache disk and upload them in the background:
    /// fsync returns once they are on the local disk; blocks still staged at a crash are
    /// uploaded at the next mount first. Other mounts see a block once it is uploaded.
    #[arg(long)]
    writeback: bool,
    /// FUSE passthrough: a file opened read-only whose blocks are all on the cache disk is
    /// read by the kernel from a whole-file copy there, at local-disk speed (Linux 6.9+ and
    /// CAP_SYS_ADMIN; without them the daemon serves reads as usual). On by default with
    /// --read-only. On a writable mount, opening a file for writing while it is open in
    /// passthrough fails with ETXTBSY (the kernel allows no other kind of open then), so
    /// it is for read-mostly datasets.
    #[arg(long, conflicts_with = "no_passthrough")]
    passthrough: bool,
    /// No FUSE passthrough, even with --read-only.
    #[arg(long)]
    no_passthrough: bool,
    /// Seconds before a cache disk taken out of use after a failure is tried again.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds, hide = true)]
    cache_retry: f64,
    /// RAM for cached blocks (units as --cache-size). Default: half of --buffer-size.
    #[arg(long, value_parser = parse_size)]
    mem_cache_size: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (`none` to not); when the port is
    /// taken by another mount, the next free one of the 9 after it.
    #[arg(long, default_value = "127.0.0.1:9567")]
    metrics: String,
    /// Blocks fetched ahead of each sequential reader (default: --max-downloads, 2 to 32).
    #[arg(long, value_parser = usize_in(0, 256))]
    prefetch: Option<usize>,
    /// Allow other users to access the mount (default when run as root).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
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

/// How long freed blocks stay by default on an engine other clients share: longer than a
/// failover takes, so a replica promoted without the freeing change finds its blocks.
const SHARED_FREE_GRACE: Duration = Duration::from_secs(600);

/// The free grace period: as given, or the engine's default.
fn free_grace(given: Option<Duration>, meta: &dyn Meta) -> Duration {
    given.unwrap_or(match meta.engine() {
        "redis" => SHARED_FREE_GRACE,
        _ => Duration::ZERO,
    })
}

fn parse_session_timeout(v: &str) -> std::result::Result<f64, String> {
    let s: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number of seconds"))?;
    if !(1.0..=86400.0).contains(&s) {
        return Err(format!("{s} is not between 1 and 86400 seconds"));
    }
    Ok(s)
}

#[derive(Args)]
struct UmountArgs {
    mountpoint: PathBuf,
    /// Detach even if busy (lazy unmount).
    #[arg(short, long)]
    force: bool,
}

#[derive(Args)]
struct StatusArgs {
    meta_url: String,
}

#[derive(Args)]
struct DumpArgs {
    meta_url: String,
    /// Where to write: a file, or `-` for stdout.
    file: String,
    /// Keep the object store's secret key in the dump (removed by default).
    #[arg(long)]
    keep_secret_key: bool,
}

#[derive(Args)]
struct LoadArgs {
    meta_url: String,
    /// The dump to read: a file, or `-` for stdin.
    file: String,
}

/// A whole number in `[lo, hi]`, for flags whose extremes would overflow or exhaust the
/// machine (threads, buffer sizes).
fn usize_in(lo: usize, hi: usize) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone {
    move |v: &str| {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| format!("{v:?} is not a whole number"))?;
        if n < lo || n > hi {
            return Err(format!("{n} is not in {lo}..={hi}"));
        }
        Ok(n)
    }
}

/// A size: `512M`, `100G`, `1.5T`, `64K`, `4096B`, with or without `iB`; a bare number is
/// MiB, as in juicefs.
fn parse_size(v: &str) -> std::result::Result<u64, String> {
    let t = v.trim();
    let bad = || format!("{v:?} is not a size (e.g. 512M, 100G; a bare number is MiB)");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| bad())?;
    let mul: u64 = match unit.trim().to_ascii_uppercase().trim_end_matches("IB") {
        "" | "M" => 1 << 20,
        "B" => 1,
        "K" => 1 << 10,
        "G" => 1 << 30,
        "T" => 1 << 40,
        "P" => 1 << 50,
        _ => return Err(bad()),
    };
    let bytes = x * mul as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 / 2.0 {
        return Err(format!("{v:?} is too large"));
    }
    Ok(bytes as u64)
}

/// A share between 0 and 1.
fn parse_ratio(v: &str) -> std::result::Result<f64, String> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number between 0 and 1"))?;
    if !x.is_finite() || !(0.0..=1.0).contains(&x) {
        return Err(format!("{v} is not between 0 and 1"));
    }
    Ok(x)
}

/// Seconds for a kernel cache timeout: finite, 0 to a day.
pub(crate) fn parse_seconds(v: &str) -> std::result::Result<f64, String> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number of seconds"))?;
    if !x.is_finite() || !(0.0..=86400.0).contains(&x) {
        return Err(format!("{v} is not between 0 and 86400 seconds"));
    }
    Ok(x)
}

/// `90s`, `30m`, `1h`, `2d` or a number of seconds.
fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    let t = v.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration (like 90s, 30m, 1h, 2d)"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{v:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mul)
        .filter(|&s| s <= 100 * 365 * 86400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{v:?} is too long"))
}

fn main() -> ExitCode {
    // Private by default whatever the caller's umask: the data dir, metadata files and
    // block files hold every file's bytes and the stored S3 secret.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Format(a) => format(a),
        Cmd::Mount(a) => mount(a),
        Cmd::Umount(a) => mountpoint::umount(&a.mountpoint, a.force),
        Cmd::Status(a) => status(a),
        Cmd::Dump(a) => dump(a),
        Cmd::Load(a) => load(a),
        Cmd::Objbench(a) => objbench(a),
        Cmd::Gc(a) => gc(a),
        Cmd::Fsck(a) => match fsck(a) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Cmd::Warmup(a) => match warmup::warmup(a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Cmd::Stats(a) => warmup::stats(a),
        Cmd::Csi(a) => csi(a),
        Cmd::FluidMount(a) => fluid::fluid_mount(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aquifer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn csi(a: CsiArgs) -> Result<()> {
    init_logging();
    if a.node_id.is_empty() {
        bail!("--node-id must not be empty");
    }
    let mounter = a.mode == aquifer_csi::Mode::Mounter;
    if mounter && a.keep_interval == 0.0 {
        bail!("--mode mounter keeps mounts: --keep-interval must be above 0");
    }
    let cfg = aquifer_csi::Config {
        endpoint: a.endpoint,
        node_id: a.node_id,
        mode: a.mode,
        aquifer: std::env::current_exe().context("cannot find the aquifer binary")?,
        state_dir: a.state_dir,
        version: env!("CARGO_PKG_VERSION").to_string(),
        specs_dir: a.specs_dir,
        external_mounts: a.external_mounts,
        cache_root: a.cache_root,
        keep_interval: Duration::from_secs_f64(a.keep_interval),
        release_after: a.release_after,
        label_node: a.label_node,
    };
    // Fail on a bad endpoint before starting anything.
    if !mounter {
        aquifer_csi::socket_path(&cfg.endpoint).map_err(|e| anyhow!(e))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(aquifer_csi::serve(cfg)).map_err(|e| anyhow!(e))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AQUIFER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Block buffers (4 MiB) are allocated and freed on different threads all the time. With
/// glibc's defaults they stay in per-thread arenas and the daemon's RSS only grows (430 MB
/// after a 2 GiB write and read); mapping anything over 2 MiB directly returns it on free.
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Small-file blocks (below the mmap threshold) come from malloc's arenas; the cache evicts
/// them in another order than they came, and glibc keeps freed pages in the middle of an
/// arena until told. Handing them back every second keeps the daemon's resident memory near
/// what it holds (epoch reads from the disk cache grew it by 100 MiB over the RAM tier).
fn trim_malloc_periodically() {
    let _ = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe { libc::malloc_trim(0) };
        });
}

fn meta_err(e: MetaError) -> anyhow::Error {
    anyhow!("{e}")
}

/// Open the metadata engine behind `url`.
fn open_meta(url: &str, create: bool, read_only: bool) -> Result<Arc<dyn Meta>> {
    open_meta_with(
        url,
        create,
        read_only,
        aquifer_meta::DEFAULT_SESSION_TIMEOUT,
        None,
    )
}

/// Open the engine behind `url`. With `check` (format, mount), a server's settings are
/// checked first: a memory policy that may evict metadata, and the durability fsync and
/// close are to wait for.
fn open_meta_with(
    url: &str,
    create: bool,
    read_only: bool,
    session_timeout: Duration,
    check: Option<aquifer_meta_redis::Durability>,
) -> Result<Arc<dyn Meta>> {
    match MetaUrl::parse(url).map_err(meta_err)? {
        MetaUrl::RocksDb { path } => {
            let kv = if read_only {
                RocksKv::open_read_only(&path)
            } else {
                RocksKv::open(&path, create)
            }
            .map_err(meta_err)?;
            Ok(Arc::new(KvMeta::new(kv)))
        }
        MetaUrl::Memory => Ok(Arc::new(KvMeta::new(MemKv::new()))),
        MetaUrl::Redis(r) => {
            let mut kv = aquifer_meta_redis::RedisKv::open(&r).map_err(meta_err)?;
            if let Some(d) = check {
                kv = kv.with_durability(d);
                kv.check_server().map_err(meta_err)?;
            }
            Ok(Arc::new(
                KvMeta::new(kv).with_session_timeout(session_timeout),
            ))
        }
    }
}

fn new_format(
    name: &str,
    storage: &str,
    bucket: &str,
    block_kib: u32,
    capacity_gib: u64,
    inodes: u64,
) -> Result<Format> {
    if !(64..=16384).contains(&block_kib) || !block_kib.is_power_of_two() {
        bail!("--block-size must be a power of two between 64 and 16384 KiB, got {block_kib}");
    }
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid volume name {name:?}: use letters, digits, '-' and '_'");
    }
    Ok(Format {
        name: name.to_string(),
        uuid: new_uuid(),
        storage: storage.to_string(),
        bucket: bucket.to_string(),
        block_size: block_kib * 1024,
        capacity: capacity_gib << 30,
        inodes,
        compression: "none".into(),
        meta_version: 1,
        region: String::new(),
        endpoint: String::new(),
        access_key: String::new(),
        secret_key: Default::default(),
        // Its own place in the store, next to its marker.
        prefix: Some(format!("{name}/")),
    })
}

fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn format(mut a: FormatArgs) -> Result<()> {
    // JuiceFS users say `--storage minio` for the same path-style S3.
    if a.storage == "minio" {
        a.storage = "s3".into();
    }
    let bucket = match (a.storage.as_str(), &a.bucket) {
        ("file", Some(b)) => {
            let p = PathBuf::from(b.trim_start_matches("file://"));
            std::path::absolute(&p).unwrap_or(p).display().to_string()
        }
        ("file", None) => bail!("--storage file needs --bucket PATH (the block directory)"),
        ("s3", Some(b)) => b.clone(),
        ("s3", None) => {
            bail!("--storage s3 needs --bucket http(s)://HOST:PORT/BUCKET or s3://BUCKET")
        }
        ("memory", _) => String::new(),
        (other, _) => bail!("unsupported storage {other:?}: supported are file and s3"),
    };
    if a.storage != "s3" && (a.s3.endpoint.is_some() || a.s3.access_key.is_some()) {
        bail!("--endpoint and --access-key apply to --storage s3 only");
    }
    if a.s3.access_key.is_some() != a.s3.secret_key.is_some() {
        bail!("--access-key and --secret-key go together");
    }
    aquifer_chunk::codec::Compression::parse(&a.compression).map_err(|e| anyhow!(e))?;
    let mut f = new_format(
        &a.name,
        &a.storage,
        &bucket,
        a.block_size,
        a.capacity,
        a.inodes,
    )?;
    f.compression = a.compression.clone();
    a.s3.apply(&mut f);
    let meta = open_meta_with(
        &a.meta_url,
        true,
        false,
        aquifer_meta::DEFAULT_SESSION_TIMEOUT,
        Some(aquifer_meta_redis::Durability::DEFAULT),
    )?;
    match meta.load_format() {
        Ok(old) if a.force => {
            // The same volume: its uuid (and so its marker) stays, and so do its blocks.
            if old.bucket != f.bucket {
                bail!(
                    "volume {} keeps its blocks in {}: --force cannot move them to {}",
                    old.name,
                    old.bucket,
                    f.bucket
                );
            }
            f.uuid = old.uuid;
            f.prefix = old.prefix;
        }
        Ok(old) if a.if_not_formatted => {
            println!(
                "volume {} (uuid {}) is already formatted",
                old.name, old.uuid
            );
            return Ok(());
        }
        Ok(old) => bail!(
            "volume {:?} is already formatted here (uuid {}); pass --force to update its settings",
            old.name,
            old.uuid
        ),
        Err(MetaError::NotFormatted) => {}
        Err(e) => return Err(meta_err(e)),
    }
    let store = check_store(&f)?;
    if f.prefix.is_some() {
        aquifer_chunk::maintenance::claim_volume(&*store, &f.name, &f.uuid)
            .map_err(|e| anyhow!("{e}"))?;
    }
    meta.format(&f, a.force).map_err(meta_err)?;
    meta.sync().map_err(meta_err)?;
    let f = meta.load_format().map_err(meta_err)?;
    println!(
        "formatted volume {} (uuid {}) at {}, blocks in {} under {}",
        f.name,
        f.uuid,
        aquifer_meta::url::redact(&a.meta_url),
        f.bucket,
        store_spec(&f).prefix
    );
    Ok(())
}

/// The block store a volume's settings describe.
fn store_spec(f: &Format) -> aquifer_object::StoreSpec {
    let creds = (!f.access_key.is_empty()).then(|| aquifer_object::s3::S3Credentials {
        access_key: f.access_key.clone(),
        secret_key: f.secret_key.0.clone(),
        session_token: None,
    });
    aquifer_object::StoreSpec {
        storage: f.storage.clone(),
        bucket: f.bucket.clone(),
        // Volumes can share a bucket: each keeps its blocks under its own name (volumes
        // formatted before markers: only in buckets).
        prefix: match &f.prefix {
            Some(p) => p.clone(),
            None if f.storage == "s3" => format!("{}/", f.name),
            None => String::new(),
        },
        s3: aquifer_object::s3::S3Options {
            region: (!f.region.is_empty()).then(|| f.region.clone()),
            credentials: creds,
            ..Default::default()
        },
        endpoint: (!f.endpoint.is_empty()).then(|| f.endpoint.clone()),
    }
}

/// Make sure the store is reachable and writable before a volume is formatted on it: one
/// object written, read back and deleted (creating the bucket of an S3 store if needed).
/// Returns the store, at the volume's prefix.
fn check_store(f: &Format) -> Result<Arc<dyn aquifer_object::ObjectStore>> {
    let spec = store_spec(f);
    let store: Arc<dyn aquifer_object::ObjectStore> = if f.storage == "s3" {
        let s3 = aquifer_object::s3_store(&spec).map_err(|e| anyhow!("{e}"))?;
        s3.ensure_bucket().map_err(|e| anyhow!("{e}"))?;
        Arc::new(s3)
    } else {
        aquifer_object::create(&spec).map_err(|e| anyhow!("{e}"))?
    };
    let key = format!("probe/{}", new_uuid());
    let data = bytes::Bytes::from_static(b"aquifer format probe");
    store
        .put(&key, data.clone())
        .and_then(|_| store.get(&key, 0, None))
        .and_then(|got| {
            if got == data {
                Ok(())
            } else {
                Err(aquifer_object::ObjectError::Config(format!(
                    "{} returned different bytes than were written",
                    store.describe()
                )))
            }
        })
        .and_then(|_| store.delete(&key))
        .map_err(|e| anyhow!("the block store is not usable: {e}"))?;
    Ok(store)
}

fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/aquifer")
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".aquifer")
    }
}

fn mount(a: MountArgs) -> Result<()> {
    let (url, mp) = match a.args.as_slice() {
        [mp] => (None, PathBuf::from(mp)),
        [url, mp] => (Some(url.clone()), PathBuf::from(mp)),
        _ => bail!("usage: aquifer mount [META_URL] MOUNTPOINT"),
    };
    mountpoint::check(&mp, a.nonempty)?;
    let mp = std::fs::canonicalize(&mp).with_context(|| format!("mount point {}", mp.display()))?;
    let data_dir = a.data_dir.clone().unwrap_or_else(default_data_dir);
    if a.background && std::env::var_os(mountpoint::DAEMON_ENV).is_none() {
        let log = a
            .log
            .clone()
            .unwrap_or_else(|| data_dir.join("aquifer.log"));
        return mountpoint::spawn_background(&mp, &log);
    }
    init_logging();
    tune_malloc();
    // Signals are blocked before any thread starts (RocksDB's and ours) so that only the
    // signal thread sees them.
    let signals = mountpoint::block_signals();
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
        aquifer_chunk::maintenance::claim_volume(&*store, &f.name, &f.uuid)
            .map_err(|e| anyhow!("{e}"))?;
        meta.format(&f, false).map_err(meta_err)?;
        tracing::info!(url, blocks = %blocks.display(), "formatted the embedded default volume");
    }
    let format = meta.load_format().map_err(meta_err)?;
    let compression =
        aquifer_chunk::codec::Compression::parse(&format.compression).map_err(|e| anyhow!(e))?;
    let (store, store_counters) =
        counted_store(&store_spec(&format), a.upload_limit, a.download_limit)?;
    check_marker(&*store, &format)?;
    let metrics = match a.metrics.as_str() {
        "" | "none" | "off" => None,
        addr => {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                bail!("--metrics {addr:?} is not an address like 127.0.0.1:9567 (or none)");
            }
            // Figures are not worth failing a mount for.
            figures::bind(addr)
                .map_err(|e| tracing::warn!(error = %e, "no Prometheus metrics"))
                .ok()
        }
    };
    let half = (a.buffer_size << 20) / 2;
    let (lower_tiers, place) = disk_tiers(&a, &format, &data_dir)?;
    let staging = match (a.writeback, place) {
        (false, _) => None,
        (true, None) => bail!("--writeback stages blocks on a cache disk: give --cache-dir"),
        (true, Some(p)) => {
            // Half the disk's quota at most: the rest stays a read cache.
            let s = aquifer_chunk::staging::Staging::open(
                &p.dir,
                store.clone(),
                a.max_uploads,
                p.capacity / 2,
                p.pinned,
            )
            .with_context(|| format!("cannot stage blocks in {}", p.dir.display()))?;
            tracing::info!(dir = %p.dir.display(), "writeback: blocks are staged here and uploaded in the background");
            Some(s)
        }
    };
    let store: Arc<dyn aquifer_object::ObjectStore> = match &staging {
        Some(s) => s.clone(),
        None => store,
    };
    let cfg = DataConfig {
        upload_threads: a.max_uploads,
        // The write budget bounds memory; the queue only has to keep the uploaders busy.
        upload_queue: (half / format.block_size as usize).max(1) + a.max_uploads,
        write_buffer: half,
        cache_bytes: a
            .mem_cache_size
            .map(|b| b.min(usize::MAX as u64) as usize)
            .unwrap_or(half),
        prefetch_threads: a.max_downloads.max(1),
        readahead_blocks: a.prefetch.unwrap_or(a.max_downloads.clamp(2, 32)) as u32,
        compression,
        lower_tiers,
        free_grace: free_grace(a.free_grace, &*meta),
        ..Default::default()
    };
    let vfs = aquifer_vfs::Vfs::new(meta.clone(), store, cfg)
        .map_err(|e| anyhow!("cannot load volume: {e}"))?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    vfs.start_session(SessionInfo {
        sid: 0,
        hostname: hostname.trim().to_string(),
        mount_point: mp.display().to_string(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    })
    .map_err(|e| anyhow!("cannot start a session: {e}"))?;
    let fuse_counters = Arc::new(aquifer_fuse::FuseCounters::default());
    let sources = Arc::new(figures::Sources {
        vfs: vfs.clone(),
        fuse: fuse_counters.clone(),
        store: store_counters,
        metrics: parking_lot::Mutex::new(None),
        staged: staging
            .clone()
            .map(|s| Box::new(move || s.backlog()) as Box<dyn Fn() -> (u64, u64) + Send + Sync>),
    });
    if let Some(l) = metrics {
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if !a.metrics.ends_with(&at) {
            tracing::warn!(asked = %a.metrics, serving = %at, "metrics address taken; using the next free port");
        }
        figures::serve(l, sources.clone()).context("cannot start the metrics thread")?;
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
        attr_ttl: Duration::from_secs_f64(a.attr_cache),
        entry_ttl: Duration::from_secs_f64(a.entry_cache),
        counters: fuse_counters,
        figures: Some(figures_fn),
        passthrough: (a.passthrough || a.read_only) && !a.no_passthrough,
    };
    // Held until the process exits, after the metadata engine is closed: `aquifer umount`
    // returns only then.
    if let Some(lock) = mountpoint::hold_mount_lock(&mp) {
        std::mem::forget(lock);
    }
    let mut session = match aquifer_fuse::mount(vfs.clone(), &mp, &opts) {
        Ok(s) => s,
        Err(e) => {
            vfs.shutdown();
            bail!("cannot mount at {}: {e}", mp.display());
        }
    };
    trim_malloc_periodically();
    tracing::info!(mountpoint = %mp.display(), volume = %format.name, meta = %aquifer_meta::url::redact(&url), "mounted");
    mountpoint::handle_signals(signals, session.unmount_callable(), vfs.clone(), mp.clone());
    let r = session.run();
    vfs.shutdown();
    if let Some(s) = &staging {
        s.shutdown(Duration::from_secs(10));
    }
    tracing::info!(mountpoint = %mp.display(), "unmounted");
    r.map_err(|e| anyhow!("FUSE session ended with an error: {e}"))
}

/// Where --writeback stages blocks: the first cache disk, whose quota counts them.
struct StagingPlace {
    dir: PathBuf,
    pinned: Arc<std::sync::atomic::AtomicU64>,
    capacity: u64,
}

/// The disk cache tiers `--cache-dir` asks for, each under a directory named by the volume's
/// UUID (volumes sharing a disk never mix blocks).
fn disk_tiers(
    a: &MountArgs,
    f: &Format,
    data_dir: &Path,
) -> Result<(aquifer_chunk::Tiers, Option<StagingPlace>)> {
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
        return Ok((aquifer_chunk::Tiers::default(), None));
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
            staging = Some(StagingPlace {
                dir: root.join("staging"),
                pinned: t.pinned(),
                capacity: cfg.capacity,
            });
        }
        parts.push(Arc::new(t));
    }
    let tier: Arc<dyn Tier> = if parts.len() == 1 {
        parts.pop().expect("one")
    } else {
        Arc::new(Spread::new(parts))
    };
    Ok((aquifer_chunk::Tiers(vec![tier]), staging))
}

/// The store must hold this volume's marker: a volume whose `--bucket` now names another
/// volume's place (or nothing) would read and delete someone else's blocks.
fn check_marker(store: &dyn aquifer_object::ObjectStore, f: &Format) -> Result<()> {
    use aquifer_chunk::maintenance::{check_volume, claim_volume};
    match check_volume(store, &f.name, &f.uuid) {
        Ok(true) => Ok(()),
        // A volume from before markers: it gets one now.
        Ok(false) if f.prefix.is_none() => {
            claim_volume(store, &f.name, &f.uuid).map_err(|e| anyhow!("{e}"))
        }
        Ok(false) => bail!(
            "{} does not hold volume {} (uuid {}): its marker is missing (was the bucket moved or wiped?)",
            store.describe(),
            f.name,
            f.uuid
        ),
        Err(e) => bail!("{e}"),
    }
}

/// The block store as a mount uses it: `Retrying(RateLimited(backend))`.
fn layered_store(
    spec: &aquifer_object::StoreSpec,
    up_mib: u64,
    down_mib: u64,
) -> Result<Arc<dyn aquifer_object::ObjectStore>> {
    Ok(counted_store(spec, up_mib, down_mib)?.0)
}

/// `Retrying(Counting(RateLimited(backend)))`: every attempt is counted and takes its share
/// of the bandwidth.
fn counted_store(
    spec: &aquifer_object::StoreSpec,
    up_mib: u64,
    down_mib: u64,
) -> Result<(
    Arc<dyn aquifer_object::ObjectStore>,
    Arc<aquifer_object::StoreCounters>,
)> {
    use aquifer_object::{Counting, RateLimited, RetryPolicy, Retrying, TokenBucket};
    let backend = aquifer_object::create(spec).map_err(|e| anyhow!("{e}"))?;
    let bucket_of = |mib: u64| (mib > 0).then(|| TokenBucket::new(mib << 20));
    let limited = RateLimited::new(backend, bucket_of(up_mib), bucket_of(down_mib));
    let counted = Counting::new(limited);
    let counters = counted.counters();
    Ok((
        Arc::new(Retrying::new(counted, RetryPolicy::default())),
        counters,
    ))
}

fn objbench(a: ObjbenchArgs) -> Result<()> {
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
    let store = layered_store(&spec, 0, 0)?;
    objbench::run(
        store,
        &objbench::Plan {
            objects: a.objects,
            size: a.block_size * 1024,
            small_objects: a.small_objects,
            threads: a.threads,
        },
    )
}

fn status(a: StatusArgs) -> Result<()> {
    let meta = open_meta(&a.meta_url, false, true)?;
    let f = meta.load_format().map_err(meta_err)?;
    // Heartbeats are stamped with the metadata server's clock; so is their age.
    let now = meta.clock().map_err(meta_err)?.sec;
    let sessions: Vec<serde_json::Value> = meta
        .list_sessions()
        .map_err(meta_err)?
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["heartbeat_age_secs"] = (now - s.heartbeat).into();
            v
        })
        .collect();
    let (used, inodes) = meta.usage().map_err(meta_err)?;
    let out = serde_json::json!({
        "setting": f.redacted(),
        "sessions": sessions,
        "usage": { "used_bytes": used, "inodes": inodes },
    });
    print_out(&format!("{}\n", serde_json::to_string_pretty(&out)?))
}

/// Write to stdout; a reader that went away (`| head`, `| grep -q`) is not an error.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn dump(a: DumpArgs) -> Result<()> {
    let meta = open_meta(&a.meta_url, false, true)?;
    let sum = if a.file == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        aquifer_meta::dump::dump(&*meta, &mut out, a.keep_secret_key).map_err(meta_err)?
    } else {
        // Written beside, renamed when complete: a failed dump leaves no half file.
        let tmp = format!("{}.tmp", a.file);
        let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {tmp}"))?;
        let mut out = std::io::BufWriter::new(f);
        let sum = aquifer_meta::dump::dump(&*meta, &mut out, a.keep_secret_key);
        let sum = match sum {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(meta_err(e));
            }
        };
        out.into_inner()
            .map_err(|e| anyhow!("writing {}: {e}", a.file))?
            .sync_all()
            .with_context(|| format!("writing {}", a.file))?;
        std::fs::rename(&tmp, &a.file).with_context(|| format!("cannot write {}", a.file))?;
        sum
    };
    eprintln!(
        "dumped {} inodes ({} bytes of files)",
        sum.inodes, sum.used_space
    );
    Ok(())
}

fn load(a: LoadArgs) -> Result<()> {
    let mut input: Box<dyn std::io::BufRead> = if a.file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin().lock()))
    } else {
        let f = std::fs::File::open(&a.file).with_context(|| format!("cannot open {}", a.file))?;
        Box::new(std::io::BufReader::new(f))
    };
    let meta = open_meta(&a.meta_url, true, false)?;
    let sum = aquifer_meta::dump::load(&*meta, &mut input).map_err(meta_err)?;
    meta.close_session().map_err(meta_err)?;
    eprintln!(
        "loaded {} inodes ({} bytes of files)",
        sum.inodes, sum.used_space
    );
    Ok(())
}

/// A progress bar on a terminal, nothing otherwise.
fn progress(what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {pos} [{elapsed}] {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A volume that is not mounted, opened for gc and fsck.
struct Volume {
    meta: Arc<dyn Meta>,
    format: Format,
    store: Arc<dyn aquifer_object::ObjectStore>,
}

fn open_volume(url: &str) -> Result<Volume> {
    let meta = open_meta(url, false, false)?;
    let format = meta.load_format().map_err(meta_err)?;
    let store = layered_store(&store_spec(&format), 0, 0)?;
    check_marker(&*store, &format)?;
    Ok(Volume {
        meta,
        format,
        store,
    })
}

fn gc(a: GcArgs) -> Result<()> {
    init_logging();
    let Volume {
        meta,
        format: f,
        store,
    } = open_volume(&a.meta_url)?;
    let pb = progress("objects listed");
    let opts = aquifer_chunk::maintenance::GcOptions {
        delete: a.delete,
        min_age: a.min_age,
        threads: a.threads as usize,
        free_grace: free_grace(a.free_grace, &*meta),
    };
    let r = aquifer_chunk::maintenance::gc(&*meta, &*store, f.block_size, &opts, &|n| pb.inc(n))
        .map_err(|e| anyhow!("gc failed: {e}"))?;
    pb.finish_and_clear();
    let out = serde_json::json!({
        "objects": r.objects,
        "bytes": r.bytes,
        "leaked": r.leaked,
        "leaked_bytes": r.leaked_bytes,
        "spared_young": r.young,
        "spared_live": r.live,
        "deleted": r.deleted,
        "trash_freed": r.trash_freed,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    if !a.delete && r.leaked > r.young + r.live {
        eprintln!(
            "aquifer: {} leaked objects ({} bytes) older than {:?}; run with --delete to remove them",
            r.leaked - r.young - r.live,
            r.leaked_bytes,
            a.min_age
        );
    }
    Ok(())
}

fn fsck(a: FsckArgs) -> Result<ExitCode> {
    init_logging();
    let Volume {
        meta,
        format: f,
        store,
    } = open_volume(&a.meta_url)?;
    let compression =
        aquifer_chunk::codec::Compression::parse(&f.compression).map_err(|e| anyhow!(e))?;
    let pb = progress("blocks checked");
    let r = aquifer_chunk::maintenance::fsck(
        &*meta,
        &*store,
        f.block_size,
        compression,
        &a.path,
        a.deep,
        &|n| pb.inc(n),
    )
    .map_err(|e| anyhow!("fsck failed: {e}"))?;
    pb.finish_and_clear();
    for b in &r.broken {
        println!(
            "broken: {} (inode {}): block {}: {}",
            b.path, b.ino, b.key, b.problem
        );
    }
    let files: HashSet<_> = r.broken.iter().map(|b| b.ino).collect();
    println!(
        "checked {} files, {} blocks: {} broken files, {} broken blocks",
        r.files,
        r.blocks,
        files.len(),
        r.broken.len()
    );
    Ok(if r.broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units_and_a_bare_number_is_mib() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("100G"), Ok(100 << 30));
        assert_eq!(parse_size("100GiB"), Ok(100 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for bad in ["", "G", "12X", "-1G", "1e400", "99999999999P"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_ratio("0.7").is_ok());
        assert!(parse_ratio("1.5").is_err() && parse_ratio("nan").is_err());
    }

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("aquifer").chain(args.iter().copied()))
    }

    #[test]
    fn mount_flags_reject_what_would_panic_or_overflow() {
        let ok = parse(&["mount", "/mnt/x"]);
        assert!(ok.is_ok());
        let cases = [
            ("--attr-cache", "inf", false),
            ("--attr-cache", "NaN", false),
            ("--attr-cache", "-1", false),
            ("--attr-cache", "1e300", false),
            ("--buffer-size", "0", false),
            ("--buffer-size", "18446744073709551615", false),
            ("--buffer-size", "-5", false),
            ("--max-downloads", "1000000000", false),
            ("--max-downloads", "0", false),
            ("--max-uploads", "100000", false),
            ("--threads", "0", false),
            ("--upload-limit", "18446744073709551615", false),
            ("--download-limit", "x", false),
            ("--attr-cache", "0", true),
            ("--attr-cache", "2.5", true),
            ("--buffer-size", "8", true),
            ("--max-downloads", "256", true),
        ];
        for (flag, value, ok) in cases {
            let got = parse(&["mount", "/mnt/x", flag, value]).is_ok();
            assert_eq!(got, ok, "{flag} {value}: accepted = {got}");
        }
    }

    #[test]
    fn format_and_gc_flags_have_bounds() {
        assert!(parse(&["format", "m", "v", "--capacity", "18446744073709551615"]).is_err());
        assert!(parse(&["format", "m", "v", "--capacity", "1024"]).is_ok());
        assert!(parse(&["gc", "m", "--min-age", "1x"]).is_err());
        assert!(parse(&["gc", "m", "--min-age", "-1h"]).is_err());
        assert!(parse(&["gc", "m", "--min-age", "99999999999999999d"]).is_err());
        assert!(parse(&["gc", "m", "--threads", "0"]).is_err());
        assert!(parse(&["objbench", "--bucket", "b", "--threads", "0"]).is_err());
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }
}
