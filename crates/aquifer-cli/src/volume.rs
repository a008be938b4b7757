//! Opening what a command works on: the metadata engine behind a URL, the block store a
//! volume's settings describe (its layers stacked by [`aquifer_chunk::store::build`]), new
//! volume settings.

use anyhow::{anyhow, bail, Result};
use aquifer_meta::url::MetaUrl;
use aquifer_meta::{Format, KvMeta, MemKv, Meta, MetaError};
use aquifer_meta_rocksdb::RocksKv;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where an S3 bucket is and how to sign requests to it.
#[derive(Args, Clone, Default)]
pub(crate) struct S3Args {
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    pub(crate) region: Option<String>,
    /// Endpoint of an S3-compatible server for `s3://BUCKET` (http(s)://HOST:PORT).
    #[arg(long)]
    pub(crate) endpoint: Option<String>,
    /// Access key; without one, the standard AWS chain is used (AWS_ACCESS_KEY_ID,
    /// profile files, web identity, instance roles).
    #[arg(long)]
    pub(crate) access_key: Option<String>,
    /// Secret key (or set AQUIFER_SECRET_KEY to keep it off the command line).
    #[arg(long, env = "AQUIFER_SECRET_KEY", hide_env_values = true)]
    pub(crate) secret_key: Option<String>,
}

impl S3Args {
    /// Record these settings in a volume's settings.
    pub(crate) fn apply(&self, f: &mut Format) {
        f.region = self.region.clone().unwrap_or_default();
        f.endpoint = self.endpoint.clone().unwrap_or_default();
        f.access_key = self.access_key.clone().unwrap_or_default();
        f.secret_key = aquifer_meta::Secret(self.secret_key.clone().unwrap_or_default());
    }
}

/// How long freed blocks stay by default on an engine other clients share: longer than a
/// failover takes, so a replica promoted without the freeing change finds its blocks.
pub(crate) const SHARED_FREE_GRACE: Duration = Duration::from_secs(600);

/// The free grace period: as given, or the engine's default.
pub(crate) fn free_grace(given: Option<Duration>, meta: &dyn Meta) -> Duration {
    given.unwrap_or(match meta.engine() {
        "redis" => SHARED_FREE_GRACE,
        _ => Duration::ZERO,
    })
}

pub(crate) fn meta_err(e: MetaError) -> anyhow::Error {
    anyhow!("{e}")
}

/// Open the metadata engine behind `url`.
pub(crate) fn open_meta(url: &str, create: bool, read_only: bool) -> Result<Arc<dyn Meta>> {
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
pub(crate) fn open_meta_with(
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

pub(crate) fn new_format(
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
        // Made when a cache group is first joined (`Volume::group_secret`).
        group_secret: Default::default(),
    })
}

/// This node's name, as the kernel has it (a pod's name in a pod).
pub(crate) fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    h.trim().to_string()
}

/// The session record of this process, serving `mount_point` (or what it does instead),
/// a member of `group` if any.
pub(crate) fn session_info(
    mount_point: String,
    group: Option<aquifer_meta::GroupMember>,
) -> aquifer_meta::SessionInfo {
    aquifer_meta::SessionInfo {
        hostname: hostname(),
        mount_point,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        group,
        ..Default::default()
    }
}

pub(crate) fn new_uuid() -> String {
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

/// The block store a volume's settings describe.
pub(crate) fn store_spec(f: &Format) -> aquifer_object::StoreSpec {
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
/// Returns the store, at the volume's prefix. This is the bare backend, without the layers
/// of [`aquifer_chunk::store::build`]: format probes the store itself, and creating an S3
/// bucket needs the S3 store's own type.
pub(crate) fn check_store(f: &Format) -> Result<Arc<dyn aquifer_object::ObjectStore>> {
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

pub(crate) fn default_data_dir() -> PathBuf {
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

/// A volume that is not mounted, opened for gc and fsck.
pub(crate) struct Volume {
    pub(crate) meta: Arc<dyn Meta>,
    pub(crate) format: Format,
    pub(crate) store: Arc<dyn aquifer_object::ObjectStore>,
}

pub(crate) fn open_volume(url: &str) -> Result<Volume> {
    let meta = open_meta(url, false, false)?;
    let format = meta.load_format().map_err(meta_err)?;
    let opts = aquifer_chunk::store::StackOptions {
        volume: Some(&format),
        ..Default::default()
    };
    let store = aquifer_chunk::store::build(&store_spec(&format), opts)?.store;
    Ok(Volume {
        meta,
        format,
        store,
    })
}
