//! `aquifer`: format, mount, umount and inspect volumes. This file declares the commands
//! and dispatches; each command lives in its module.

mod csi;
mod figures;
mod fluid;
mod format;
mod group;
mod inspect;
mod maintenance;
mod mount;
mod mountpoint;
mod objbench;
mod parse;
mod volume;
mod warmup;

pub(crate) use parse::parse_seconds;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
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
    Format(format::FormatArgs),
    /// Mount a volume. With only MOUNTPOINT, uses the embedded default volume.
    Mount(mount::MountArgs),
    /// A member of a volume's peer cache group with no mount: serves the blocks it owns
    /// to the group (dedicated cache nodes, Fluid runtime workers).
    CacheNode(group::CacheNodeArgs),
    /// Unmount a mounted volume.
    Umount(UmountArgs),
    /// Show a volume's settings, sessions and usage as JSON.
    Status(inspect::StatusArgs),
    /// Write a volume's whole namespace (tree, attributes, xattrs, symlinks, hard links,
    /// slice lists, settings) as one JSON document, a record at a time; `-` for stdout.
    Dump(inspect::DumpArgs),
    /// Read a dump into an empty metadata engine (any engine: the way from RocksDB to Redis
    /// and back); `-` for stdin.
    Load(inspect::LoadArgs),
    /// Measure an object store alone: put/get/head/delete latency and throughput.
    Objbench(objbench::ObjbenchArgs),
    /// Find objects no file references (leaked by crashes, failed flushes, lost
    /// compactions) and, with --delete, remove them.
    Gc(maintenance::GcArgs),
    /// Check that every block of every file exists (--deep: and reads back intact).
    Fsck(maintenance::FsckArgs),
    /// Pre-load files and trees under a live mount into its cache (or --check what share is
    /// cached, or --evict them).
    Warmup(warmup::WarmupArgs),
    /// Show a live mount's figures every second: FUSE ops, bytes, cache hits per tier,
    /// object-store requests, writeback backlog, evictions.
    Stats(warmup::StatsArgs),
    /// Serve the CSI driver (Kubernetes PersistentVolumes) on a unix socket, or with
    /// --mode mounter run the node daemon that keeps a node's mounts.
    Csi(csi::CsiArgs),
    /// Mount as the FUSE container of a Fluid ThinRuntime, from the configuration Fluid
    /// writes (k8s/examples/fluid.yaml).
    FluidMount(fluid::FluidMountArgs),
}

#[derive(Args)]
struct UmountArgs {
    mountpoint: PathBuf,
    /// Detach even if busy (lazy unmount).
    #[arg(short, long)]
    force: bool,
}

fn main() -> ExitCode {
    // Private by default whatever the caller's umask: the data dir, metadata files and
    // block files hold every file's bytes and the stored S3 secret.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Format(a) => format::format(a),
        Cmd::Mount(a) => mount::mount(a),
        Cmd::CacheNode(a) => group::cache_node(a),
        Cmd::Umount(a) => mountpoint::umount(&a.mountpoint, a.force),
        Cmd::Status(a) => inspect::status(a),
        Cmd::Dump(a) => inspect::dump(a),
        Cmd::Load(a) => inspect::load(a),
        Cmd::Objbench(a) => objbench::objbench(a),
        Cmd::Gc(a) => maintenance::gc(a),
        Cmd::Fsck(a) => match maintenance::fsck(a) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Cmd::Warmup(a) => match warmup::warmup(a) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Cmd::Stats(a) => warmup::stats(a),
        Cmd::Csi(a) => csi::csi(a),
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

pub(crate) fn init_logging() {
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
pub(crate) fn tune_malloc() {
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
pub(crate) fn trim_malloc_periodically() {
    let _ = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe { libc::malloc_trim(0) };
        });
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
