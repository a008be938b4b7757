//! The Identity, Controller and Node services. Every call is idempotent: its effect is
//! checked against the filesystem and the kernel's mount table before it is made.

use crate::keeper::{Keeper, Mounter};
use crate::mounts::{self, State};
use crate::owner::{self, Claim, Release};
use crate::pb::{self, controller_server, identity_server, node_server};
use crate::volume::{dir_name, volume_dir, Filesystem};
use crate::{io_status, not_answering, Config, Mode, DRIVER_NAME};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Driver {
    node_id: String,
    version: String,
    mounter: Arc<Mounter>,
    /// This process keeps its node mounts and releases them at once (`--release-after 0`):
    /// the last unpublish of a filesystem unmounts it before answering.
    release_on_unpublish: bool,
}

type Reply<T> = Result<Response<T>, Status>;

/// Check the capabilities a volume is asked to have: files (not blocks), any access mode
/// (one filesystem, shared by every node).
fn check_capabilities(caps: &[pb::VolumeCapability]) -> Result<(), Status> {
    use pb::volume_capability::{access_mode::Mode as M, AccessType};
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    for c in caps {
        match c.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => {
                return Err(Status::invalid_argument(
                    "aquifer volumes are filesystems: block access is not supported",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "a volume capability has no access type",
                ))
            }
        }
        let mode = c
            .access_mode
            .as_ref()
            .and_then(|m| M::try_from(m.mode).ok())
            .unwrap_or(M::Unknown);
        if mode == M::Unknown {
            return Err(Status::invalid_argument(
                "a volume capability has no access mode",
            ));
        }
    }
    Ok(())
}

/// True for the access modes that only read.
fn reader_only(cap: &pb::VolumeCapability) -> bool {
    use pb::volume_capability::access_mode::Mode as M;
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| M::try_from(m.mode).ok())
        .unwrap_or(M::Unknown);
    matches!(mode, M::SingleNodeReaderOnly | M::MultiNodeReaderOnly)
}

impl Driver {
    pub fn new(cfg: &Config) -> Driver {
        Driver {
            node_id: cfg.node_id.clone(),
            version: cfg.version.clone(),
            mounter: Arc::new(Mounter::new(
                cfg.aquifer.clone(),
                cfg.state_dir.clone(),
                cfg.specs_dir.clone(),
                cfg.external_mounts,
                cfg.cache_root.clone(),
            )),
            release_on_unpublish: !cfg.external_mounts && cfg.release_after.is_zero(),
        }
    }

    /// The directory of `volume_id` in the filesystem `secrets` name, mounted here for the
    /// controller.
    async fn locate(
        &self,
        secrets: &HashMap<String, String>,
        volume_id: &str,
    ) -> Result<PathBuf, Status> {
        let fs = Filesystem::from_secrets(secrets)?;
        let mp = self.mounter.controller_mount(&fs).await?;
        Ok(mp.join(volume_dir(volume_id)?))
    }
}

#[tonic::async_trait]
impl identity_server::Identity for Arc<Driver> {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Reply<pb::GetPluginInfoResponse> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: self.version.clone(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Reply<pb::GetPluginCapabilitiesResponse> {
        use pb::plugin_capability::{service::Type, Service, Type as Cap};
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![pb::PluginCapability {
                r#type: Some(Cap::Service(Service {
                    r#type: Type::ControllerService as i32,
                })),
            }],
        }))
    }

    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Reply<pb::ProbeResponse> {
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(pb::BoolValue { value: true }),
        }))
    }
}

#[tonic::async_trait]
impl controller_server::Controller for Arc<Driver> {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Reply<pb::CreateVolumeResponse> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        check_capabilities(&r.volume_capabilities)?;
        let capacity = r
            .capacity_range
            .map(|c| {
                if c.required_bytes > 0 {
                    c.required_bytes
                } else {
                    c.limit_bytes
                }
            })
            .unwrap_or(0)
            .max(0);
        // The PV's name is the owner a volume id carries ahead of a `:` (see owner).
        if r.name.contains(':') {
            return Err(Status::invalid_argument(
                "a volume name must not contain ':'",
            ));
        }
        let name = dir_name(&r.name, &r.parameters)?;
        let rel = volume_dir(&name)?;
        if rel.as_os_str().is_empty() {
            return Err(Status::invalid_argument(
                "the volume would be the whole filesystem: give a pathPattern below it",
            ));
        }
        let fs = Filesystem::from_secrets(&r.secrets)?;
        let mp = self.mounter.controller_mount(&fs).await?;
        let (root, rel2, pv) = (mp.clone(), rel.clone(), r.name.clone());
        let claimed =
            tokio::task::spawn_blocking(move || owner::claim(&root, &rel2, &pv, capacity))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| io_status(&mp.join(&rel), e))?;
        match claimed {
            Claim::Created | Claim::Again => {}
            // The caller's own volume: its size is its own to know, not another's.
            Claim::OtherCapacity => {
                return Err(Status::already_exists(format!(
                    "volume {} exists with another capacity than {capacity}",
                    r.name
                )))
            }
            // Another PV's directory (or no PV's, or inside another volume): say nothing of it.
            Claim::Taken => {
                return Err(Status::already_exists(format!(
                    "volume {}: its directory belongs to another volume; use another claim \
                     name or pathPattern",
                    r.name
                )))
            }
        }
        tracing::info!(volume = %r.name, path = %name, capacity, ?claimed, "volume created");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(pb::Volume {
                capacity_bytes: capacity,
                volume_id: owner::volume_id(&r.name, &name),
                volume_context: HashMap::from([("path".to_string(), format!("/{name}"))]),
            }),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Reply<pb::DeleteVolumeResponse> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let (pv, path) = owner::parse_volume_id(&r.volume_id);
        if volume_dir(path)?.as_os_str().is_empty() {
            return Err(Status::invalid_argument(
                "the volume is the whole filesystem; it is not deleted",
            ));
        }
        let dir = self.locate(&r.secrets, path).await?;
        let (d, p) = (dir.clone(), pv.to_string());
        match tokio::task::spawn_blocking(move || owner::release(&d, &p))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
        {
            Ok(Release::Removed) => tracing::info!(volume = %r.volume_id, "volume deleted"),
            // Deleted before: done.
            Ok(Release::Gone) => {}
            // Not this PV's directory (another PV's, a static PV's path, a volume made
            // before owners were recorded): the PV goes, the directory stays.
            Ok(Release::NotOwned) => tracing::warn!(
                volume = %r.volume_id,
                "the directory is not this volume's own: left in place"
            ),
            Err(e) => return Err(io_status(&dir, e)),
        }
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<pb::ValidateVolumeCapabilitiesResponse> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        check_capabilities(&r.volume_capabilities)?;
        if !r.secrets.is_empty() {
            let dir = match r.volume_context.get("path") {
                Some(p) => self.locate(&r.secrets, p).await?,
                None => {
                    // No context (it is optional here): a dynamic volume's id names its
                    // owner and directory, and the directory's owner record says so;
                    // any other id is a static handle, the path whole, as a publish
                    // without context takes it.
                    let (pv, d) = owner::parse_volume_id(&r.volume_id);
                    let dynamic = self.locate(&r.secrets, d).await?;
                    let pv = pv.to_string();
                    let probe = dynamic.clone();
                    let owned = tokio::task::spawn_blocking(move || owner::owned_by(&probe, &pv))
                        .await
                        .unwrap_or(false);
                    if owned {
                        dynamic
                    } else {
                        self.locate(&r.secrets, &r.volume_id).await?
                    }
                }
            };
            if !dir.is_dir() {
                return Err(Status::not_found(format!(
                    "volume {} does not exist",
                    r.volume_id
                )));
            }
        }
        Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
            }),
            message: String::new(),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Reply<pb::ControllerGetCapabilitiesResponse> {
        use pb::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![pb::ControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: Type::CreateDeleteVolume as i32,
                })),
            }],
        }))
    }
}

#[tonic::async_trait]
impl node_server::Node for Arc<Driver> {
    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Reply<pb::NodePublishVolumeResponse> {
        use pb::volume_capability::AccessType;
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let cap = r
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        check_capabilities(std::slice::from_ref(&cap))?;
        let options = match &cap.access_type {
            Some(AccessType::Mount(m)) => m.mount_flags.clone(),
            _ => Vec::new(),
        };
        // A dynamic volume says its path in its context; a static PV may name any path of
        // the filesystem there, else its id is the path.
        let path = owner::published_dir(&r.volume_id, &r.volume_context);
        let sub = volume_dir(&path)?;
        // A reader-only access mode is published read-only whatever the pod asks.
        let readonly = r.readonly || reader_only(&cap);
        let target = PathBuf::from(&r.target_path);
        let stale = match mounts::state_in_time(&target)
            .await
            .ok_or_else(|| not_answering(&target))?
        {
            State::Mounted => {
                // Published already: fine if it is this volume the same way (a repeated
                // call), not if the target shows another volume or mode.
                let abs = std::path::absolute(&target).unwrap_or_else(|_| target.clone());
                if let Some(e) = mounts::entry(&abs) {
                    if e.root != Path::new("/").join(&sub) || e.read_only != readonly {
                        return Err(Status::already_exists(format!(
                            "{} is published already as {} ({}), asked for /{} ({})",
                            target.display(),
                            e.root.display(),
                            if e.read_only {
                                "read-only"
                            } else {
                                "read-write"
                            },
                            sub.display(),
                            if readonly { "read-only" } else { "read-write" },
                        )));
                    }
                }
                return Ok(Response::new(pb::NodePublishVolumeResponse {}));
            }
            State::Stale => {
                // Bound over, not replaced: a pod's copy of the target follows mounts made
                // on top of it (see keeper).
                tracing::warn!(target = %target.display(), "repairing a target whose filesystem daemon died");
                true
            }
            State::Absent => false,
        };
        let fs = Filesystem::from_secrets(&r.secrets)?;
        // Held until the target is bound: the mount is not released under the publish.
        let (mp, _publishing) = self.mounter.node_mount(&fs, &options, &sub).await?;
        let src = mp.join(&sub);
        match std::fs::metadata(&src) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Status::failed_precondition(format!(
                    "volume {}: {path} is not a directory of the filesystem",
                    r.volume_id
                )))
            }
            Err(_) => {
                return Err(Status::not_found(format!(
                    "volume {}: {path} does not exist in the filesystem",
                    r.volume_id
                )))
            }
        }
        if !stale {
            std::fs::create_dir_all(&target).map_err(|e| io_status(&target, e))?;
        }
        mounts::bind(&src, &target, readonly).map_err(|e| io_status(&target, e))?;
        tracing::info!(volume = %r.volume_id, target = %target.display(), readonly, "published");
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Reply<pb::NodeUnpublishVolumeResponse> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if r.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let target = PathBuf::from(&r.target_path);
        let abs = std::path::absolute(&target).unwrap_or_else(|_| target.clone());
        let devs: Vec<String> = mounts::entries_at(&abs)
            .into_iter()
            .map(|e| e.dev)
            .collect();
        // Every mount stacked here goes (a repaired target may have two). The mount table
        // says what is here, not the mount: a stuck daemon must not hold the unpublish.
        while mounts::is_mountpoint(&abs) {
            if let Err(e) = mounts::unmount(&target, false) {
                // Busy (a process still in it) or dead: detach, it goes once unused.
                tracing::warn!(target = %target.display(), error = %e, "detaching");
                mounts::unmount(&target, true).map_err(|e| io_status(&target, e))?;
            }
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_status(&target, e)),
        }
        if self.release_on_unpublish {
            for key in self.mounter.node_mounts_of(&devs) {
                self.mounter.release(&key, std::time::Duration::ZERO).await;
            }
        }
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Reply<pb::NodeGetVolumeStatsResponse> {
        use pb::volume_usage::Unit;
        let r = req.into_inner();
        if r.volume_id.is_empty() || r.volume_path.is_empty() {
            return Err(Status::invalid_argument(
                "volume_id and volume_path are required",
            ));
        }
        let p = PathBuf::from(&r.volume_path);
        if mounts::state_in_time(&p)
            .await
            .ok_or_else(|| not_answering(&p))?
            != State::Mounted
        {
            return Err(Status::not_found(format!(
                "{} is not a published volume",
                p.display()
            )));
        }
        let (b, i) = mounts::usage_in_time(&p)
            .await
            .ok_or_else(|| not_answering(&p))?
            .map_err(|e| io_status(&p, e))?;
        let usage = |unit: Unit, [total, available, used]: [u64; 3]| pb::VolumeUsage {
            total: total as i64,
            available: available as i64,
            used: used as i64,
            unit: unit as i32,
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage: vec![usage(Unit::Bytes, b), usage(Unit::Inodes, i)],
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Reply<pb::NodeGetCapabilitiesResponse> {
        use pb::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![pb::NodeServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: Type::GetVolumeStats as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Reply<pb::NodeGetInfoResponse> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
        }))
    }
}

/// The keeper of this process's node mounts, if it keeps them.
fn keeper(cfg: &Config, mounter: Arc<Mounter>) -> Result<Option<Keeper>, String> {
    let keeps = match cfg.mode {
        Mode::Mounter => true,
        Mode::Node | Mode::All => !cfg.external_mounts,
        Mode::Controller => false,
    };
    if !keeps || cfg.keep_interval.is_zero() {
        return Ok(None);
    }
    let labels = match cfg.label_node.as_deref() {
        None => None,
        Some("in-cluster") => Some(crate::node_labels::NodeLabels::in_cluster(&cfg.node_id)?),
        Some(api) => Some(crate::node_labels::NodeLabels::new(
            api,
            None,
            None,
            &cfg.node_id,
        )?),
    };
    Ok(Some(Keeper::new(
        mounter,
        cfg.keep_interval,
        cfg.release_after,
        labels,
    )))
}

async fn until_stopped() -> Result<(), String> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Serve the CSI services of `cfg.mode` on its unix socket until SIGTERM or SIGINT; or, as
/// the node daemon (`Mode::Mounter`), keep the node's mounts until then. Mounts outlive
/// both.
pub async fn serve(cfg: Config) -> Result<(), String> {
    let driver = Arc::new(Driver::new(&cfg));
    let keeper = keeper(&cfg, driver.mounter.clone())?;
    if cfg.mode == Mode::Mounter {
        let keeper = keeper.ok_or("the node daemon needs a --keep-interval above 0")?;
        tracing::info!(state_dir = %cfg.state_dir.display(), node = %cfg.node_id, "node daemon keeping mounts");
        tokio::select! {
            _ = keeper.run() => {}
            r = until_stopped() => r?,
        }
        return Ok(());
    }
    if let Some(k) = keeper {
        tokio::spawn(k.run());
    }
    let path = crate::socket_path(&cfg.endpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // A socket left by an earlier run (kill -9, restart) would make bind fail.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let controller = matches!(cfg.mode, Mode::Controller | Mode::All)
        .then(|| controller_server::ControllerServer::new(driver.clone()));
    let node = matches!(cfg.mode, Mode::Node | Mode::All)
        .then(|| node_server::NodeServer::new(driver.clone()));
    tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_id, mode = ?cfg.mode, "CSI driver serving");
    let stop = async move {
        if let Err(e) = until_stopped().await {
            tracing::error!("{e}");
            std::future::pending::<()>().await
        }
    };
    tonic::transport::Server::builder()
        .add_service(identity_server::IdentityServer::new(driver.clone()))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop,
        )
        .await
        .map_err(|e| format!("CSI server: {e}"))?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
