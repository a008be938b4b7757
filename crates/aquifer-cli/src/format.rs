//! `aquifer format`: a new volume's settings, checked against its store, written once.

use crate::volume::{check_store, meta_err, new_format, open_meta_with, store_spec, S3Args};
use anyhow::{anyhow, bail, Result};
use aquifer_meta::MetaError;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct FormatArgs {
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

pub(crate) fn format(mut a: FormatArgs) -> Result<()> {
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
    aquifer_chunk::Compression::parse(&a.compression).map_err(|e| anyhow!(e))?;
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
        aquifer_chunk::store::claim_volume(&*store, &f.name, &f.uuid)
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
