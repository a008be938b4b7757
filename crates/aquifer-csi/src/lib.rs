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
//!   filesystem, in its own session, so it outlives this process), then bind-mounts the
//!   volume's directory onto the pod's target path, read-only when asked.
//!
//! The driver keeps no state of its own: what is mounted is the kernel's mount table, so a
//! restarted driver finds its mounts and targets again, and a publish repairs a target whose
//! daemon died ("Transport endpoint is not connected").

pub mod mounts;
mod service;
pub mod volume;

/// The messages and services of `proto/csi.proto`.
pub mod pb {
    tonic::include_proto!("csi.v1");
}

use std::path::PathBuf;

pub use service::serve;

/// The plugin name Kubernetes objects refer to (CSIDriver, StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "csi.aquifer.dev";

/// Which CSI services this process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "controller" => Ok(Mode::Controller),
            "node" => Ok(Mode::Node),
            "all" => Ok(Mode::All),
            _ => Err(format!("unknown mode {s:?}: controller, node or all")),
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
    /// Where filesystems are mounted (`mnt/KEY`) and their daemons log.
    pub state_dir: PathBuf,
    pub version: String,
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
        assert!("both".parse::<Mode>().is_err());
    }
}
