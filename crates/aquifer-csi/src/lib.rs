//! A CSI driver (spec v1) that serves directories of aquifer volumes as Kubernetes
//! PersistentVolumes, ReadWriteMany.
//!
//! - **Identity** answers who we are and that we are ready.
//! - **Controller** provisions a volume as a directory of an aquifer filesystem: the
//!   filesystem is named by the CSI secrets (`metaurl`, `name`, `storage`, `bucket`,
//!   `access-key`, `secret-key`, `format-options`, the keys JuiceFS CSI users know), is
//!   formatted at its first CreateVolume, and is mounted under the driver's state directory to
//!   make, size and remove directories.
//! - **Node** makes sure the filesystem is mounted on the node (one `aquifer mount` daemon per
//!   filesystem and set of mount options), then bind-mounts the volume's directory onto the
//!   pod's target path, read-only when asked. The daemons run apart from the plugin: in
//!   their own sessions, or with `--external-mounts` in the node daemon's container
//!   (`--mode mounter`), so that restarting or upgrading the plugin touches no mount.
//! - **The keeper** ([`keeper`]) mounts a filesystem again when its daemon dies and binds
//!   the pods' targets to the new mount, releases mounts no pod uses, and labels the node
//!   after the volumes warmed on it ([`node_labels`]).
//!
//! What is mounted is the kernel's mount table, and what should be is in the spec files
//! under the state directory, so a restarted plugin or node daemon finds its mounts and
//! targets again, and a publish repairs a target whose daemon died ("Transport endpoint is
//! not connected").

pub mod keeper;
pub mod mounts;
pub mod node_labels;
pub mod owner;
mod service;
pub mod volume;

/// The messages and services of `proto/csi.proto`.
pub mod pb {
    tonic::include_proto!("csi.v1");
}

use std::path::{Path, PathBuf};

pub use service::serve;

/// FNV-1a of `bytes`: short stable names (mount keys, long label names) that must come out
/// the same in every process and release.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A mount at `p` that did not answer a look in [`mounts::LOOK_LIMIT`]: its daemon is alive
/// but stuck (stopped, or waiting on its metadata engine). The caller may retry.
pub(crate) fn not_answering(p: &Path) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "{} does not answer in {}s: its filesystem daemon is stuck",
        p.display(),
        mounts::LOOK_LIMIT.as_secs()
    ))
}

/// An I/O error on `what` as a gRPC status: NOT_FOUND when it is missing, else INTERNAL.
pub(crate) fn io_status(what: &Path, e: std::io::Error) -> tonic::Status {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            tonic::Status::not_found(format!("{}: {e}", what.display()))
        }
        _ => tonic::Status::internal(format!("{}: {e}", what.display())),
    }
}

/// The plugin name Kubernetes objects refer to (CSIDriver, StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "csi.aquifer.dev";

/// Which CSI services this process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
    /// No CSI service: the node daemon, which keeps the node's filesystem mounts for a node
    /// plugin run with `--external-mounts`.
    Mounter,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "controller" => Ok(Mode::Controller),
            "node" => Ok(Mode::Node),
            "all" => Ok(Mode::All),
            "mounter" => Ok(Mode::Mounter),
            _ => Err(format!(
                "unknown mode {s:?}: controller, node, all or mounter"
            )),
        }
    }
}

pub struct Config {
    /// `unix:///PATH` of the socket to serve.
    pub endpoint: String,
    pub node_id: String,
    pub mode: Mode,
    /// The `aquifer` binary run for `format` and `mount`.
    pub aquifer: PathBuf,
    /// Where filesystems are mounted (`mnt/KEY`), described (`specs/KEY.json`) and log.
    pub state_dir: PathBuf,
    pub version: String,
    /// Where node mounts are described (`KEY.json`); `STATE/specs` when `None`.
    pub specs_dir: Option<PathBuf>,
    /// Node mounts are made by the node daemon (`--mode mounter` on the same state dir).
    pub external_mounts: bool,
    /// Cache directories of node mounts go under it (`CACHE_ROOT/KEY`).
    pub cache_root: Option<PathBuf>,
    /// How often the keeper looks at the mounts; zero for never (node mounts are then
    /// repaired only by a publish, and never released).
    pub keep_interval: std::time::Duration,
    /// A node mount no target has used this long is unmounted.
    pub release_after: std::time::Duration,
    /// Label the node after warm volumes: through this API URL, or the cluster's
    /// (`in-cluster`).
    pub label_node: Option<String>,
}

/// The socket path of a `unix:///PATH` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let p = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| format!("--endpoint must be unix:///PATH, got {endpoint:?}"))?;
    if !p.starts_with('/') {
        return Err(format!(
            "--endpoint must be an absolute unix:///PATH, got {endpoint:?}"
        ));
    }
    Ok(PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://rel/csi.sock").is_err());
        assert_eq!("node".parse::<Mode>().unwrap(), Mode::Node);
        assert_eq!("mounter".parse::<Mode>().unwrap(), Mode::Mounter);
        assert!("both".parse::<Mode>().is_err());
    }
}
