//! `aquifer gc` and `aquifer fsck` on a volume that is not mounted.

use crate::parse::parse_duration;
use crate::volume::{free_grace, open_volume, Volume};
use anyhow::{anyhow, Result};
use clap::Args;
use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub(crate) struct GcArgs {
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
pub(crate) struct FsckArgs {
    meta_url: String,
    /// Only check files below this path of the volume.
    #[arg(long, default_value = "/")]
    path: String,
    /// Read every block and verify its checksums (otherwise only its presence and size).
    #[arg(long)]
    deep: bool,
}

/// A progress bar on a terminal, nothing otherwise.
pub(crate) fn progress(what: &str) -> indicatif::ProgressBar {
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

pub(crate) fn gc(a: GcArgs) -> Result<()> {
    crate::init_logging();
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

pub(crate) fn fsck(a: FsckArgs) -> Result<ExitCode> {
    crate::init_logging();
    let Volume {
        meta,
        format: f,
        store,
    } = open_volume(&a.meta_url)?;
    let compression = aquifer_chunk::Compression::parse(&f.compression).map_err(|e| anyhow!(e))?;
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
