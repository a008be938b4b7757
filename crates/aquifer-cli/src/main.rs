//! `aquifer`: format, mount, umount and inspect volumes.

mod mountpoint;
mod objbench;

use anyhow::{anyhow, bail, Context as _, Result};
use aquifer_chunk::DataConfig;
use aquifer_meta::url::MetaUrl;
use aquifer_meta::{Format, KvMeta, MemKv, Meta, MetaError, SessionInfo};
use aquifer_meta_rocksdb::RocksKv;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
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
    /// Measure an object store alone: put/get/head/delete latency and throughput.
    Objbench(ObjbenchArgs),
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
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
    /// Number of large objects.
    #[arg(long, default_value_t = 64)]
    objects: usize,
    /// Number of 4 KiB objects (per-request latency).
    #[arg(long, default_value_t = 256)]
    small_objects: usize,
    /// Concurrent requests.
    #[arg(long, default_value_t = 4)]
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
    #[arg(long, default_value_t = 0)]
    capacity: u64,
    /// Inode limit (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    inodes: u64,
    /// Update the settings of an existing volume.
    #[arg(long)]
    force: bool,
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
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Threads uploading blocks to the object store.
    #[arg(long, default_value_t = 8)]
    max_uploads: usize,
    /// Threads fetching blocks ahead of sequential readers, and how many blocks ahead they
    /// go: on object stores throughput comes from many GETs in flight.
    #[arg(long, default_value_t = 8)]
    max_downloads: usize,
    /// Memory in MiB for blocks in flight: half for blocks queued for upload (writers wait,
    /// not fail, when it is full), half for blocks read ahead.
    #[arg(long, default_value_t = 128)]
    buffer_size: usize,
    /// Kernel attribute cache time in seconds.
    #[arg(long, default_value_t = 1.0)]
    attr_cache: f64,
    /// Allow other users to access the mount (default when run as root).
    #[arg(long)]
    allow_other: bool,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// Upload bandwidth limit in MiB/s (0 = none), so a checkpoint writer keeps to its share.
    #[arg(long, default_value_t = 0)]
    upload_limit: u64,
    /// Download bandwidth limit in MiB/s (0 = none).
    #[arg(long, default_value_t = 0)]
    download_limit: u64,
    /// Mount even if the mount point is not empty.
    #[arg(long)]
    nonempty: bool,
    /// Data directory of the embedded default volume.
    #[arg(long, env = "AQUIFER_DATA_DIR")]
    data_dir: Option<PathBuf>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Format(a) => format(a),
        Cmd::Mount(a) => mount(a),
        Cmd::Umount(a) => mountpoint::umount(&a.mountpoint, a.force),
        Cmd::Status(a) => status(a),
        Cmd::Objbench(a) => objbench(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aquifer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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

fn meta_err(e: MetaError) -> anyhow::Error {
    anyhow!("{e}")
}

/// Open the metadata engine behind `url`.
fn open_meta(url: &str, create: bool, read_only: bool) -> Result<Arc<dyn Meta>> {
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
    check_store(&f)?;
    let meta = open_meta(&a.meta_url, true, false)?;
    meta.format(&f, a.force).map_err(meta_err)?;
    meta.sync().map_err(meta_err)?;
    let f = meta.load_format().map_err(meta_err)?;
    println!(
        "formatted volume {} (uuid {}) at {}, blocks in {}{}",
        f.name,
        f.uuid,
        a.meta_url,
        f.bucket,
        if f.storage == "s3" {
            format!(" under {}/", f.name)
        } else {
            String::new()
        }
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
        // Volumes can share a bucket: each keeps its blocks under its own name.
        prefix: if f.storage == "s3" {
            format!("{}/", f.name)
        } else {
            String::new()
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
fn check_store(f: &Format) -> Result<()> {
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
        .map_err(|e| anyhow!("the block store is not usable: {e}"))
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
    let meta = open_meta(&url, embedded, false)?;
    if embedded && matches!(meta.load_format(), Err(MetaError::NotFormatted)) {
        let blocks = data_dir.join("default").join("blocks");
        let f = new_format("default", "file", &blocks.display().to_string(), 4096, 0, 0)?;
        meta.format(&f, false).map_err(meta_err)?;
        tracing::info!(url, blocks = %blocks.display(), "formatted the embedded default volume");
    }
    let format = meta.load_format().map_err(meta_err)?;
    let compression =
        aquifer_chunk::codec::Compression::parse(&format.compression).map_err(|e| anyhow!(e))?;
    let store = layered_store(&store_spec(&format), a.upload_limit, a.download_limit)?;
    let half = (a.buffer_size.max(8) << 20) / 2;
    let cfg = DataConfig {
        upload_threads: a.max_uploads.max(1),
        upload_queue: (half / format.block_size as usize).max(1),
        cache_bytes: half,
        prefetch_threads: a.max_downloads.max(1),
        readahead_blocks: a.max_downloads.clamp(2, 32) as u32,
        compression,
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
        started: 0,
        heartbeat: 0,
    })
    .map_err(|e| anyhow!("cannot start a session: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let opts = aquifer_fuse::MountOptions {
        fs_name: format!("aquifer:{}", format.name),
        threads: a.threads,
        allow_other: a.allow_other || root,
        read_only: a.read_only,
        attr_ttl: Duration::from_secs_f64(a.attr_cache.max(0.0)),
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
    tracing::info!(mountpoint = %mp.display(), volume = %format.name, meta = %url, "mounted");
    mountpoint::handle_signals(signals, session.unmount_callable(), vfs.clone(), mp.clone());
    let r = session.run();
    vfs.shutdown();
    tracing::info!(mountpoint = %mp.display(), "unmounted");
    r.map_err(|e| anyhow!("FUSE session ended with an error: {e}"))
}

/// The block store as a mount uses it: `Retrying(RateLimited(backend))`.
fn layered_store(
    spec: &aquifer_object::StoreSpec,
    up_mib: u64,
    down_mib: u64,
) -> Result<Arc<dyn aquifer_object::ObjectStore>> {
    use aquifer_object::{RateLimited, RetryPolicy, Retrying, TokenBucket};
    let backend = aquifer_object::create(spec).map_err(|e| anyhow!("{e}"))?;
    let bucket_of = |mib: u64| (mib > 0).then(|| TokenBucket::new(mib << 20));
    let limited = RateLimited::new(backend, bucket_of(up_mib), bucket_of(down_mib));
    Ok(Arc::new(Retrying::new(limited, RetryPolicy::default())))
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
    let sessions = meta.list_sessions().map_err(meta_err)?;
    let (used, inodes) = meta.usage().map_err(meta_err)?;
    let out = serde_json::json!({
        "setting": f.redacted(),
        "sessions": sessions,
        "usage": { "used_bytes": used, "inodes": inodes },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
