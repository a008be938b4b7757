//! `aquifer csi`: the CSI driver (or, with `--mode mounter`, the node daemon).

use crate::parse::{parse_duration, parse_seconds};
use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub(crate) struct CsiArgs {
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

pub(crate) fn csi(a: CsiArgs) -> Result<()> {
    crate::init_logging();
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
