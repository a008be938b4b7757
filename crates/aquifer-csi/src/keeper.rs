//! The filesystem mounts of a node, and the loop that keeps them.
//!
//! Every volume of a filesystem is published from the one mount of it (per set of mount
//! options) at `STATE/mnt/KEY`. The publish that needs such a mount writes what it is — the
//! secrets and options — to `SPECS/KEY.json` (root only; `STATE/specs` unless `--specs-dir`
//! names another), so that whoever keeps the mounts can mount it again with no request to
//! answer: the plugin itself, or, with `--external-mounts`, the node daemon (`aquifer csi
//! --mode mounter`) in a DaemonSet of its own, so that the plugin's container restarts and
//! upgrades without touching a mount.
//!
//! The keeper, every interval:
//! - mounts again a filesystem whose daemon died, then binds the new mount over every pod
//!   target that showed the dead one: a pod whose volume mount follows the host's
//!   (`mountPropagation: HostToContainer`) sees its files again without restarting;
//! - releases a mount that no target has used for `release_after` (its daemon exits; its
//!   disk cache stays for the next mount);
//! - hands the directories `aquifer warmup` marked warm to the node labeler.

use crate::mounts::{self, Entry, State};
use crate::node_labels::{label_key, NodeLabels};
use crate::volume::{flags, split_password, Filesystem};
use crate::{io_status, not_answering};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use tonic::Status;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a publish waits for the node daemon to mount a filesystem.
const EXTERNAL_WAIT: Duration = Duration::from_secs(60);

/// Mounts of filesystems on this node, one per filesystem and set of options, under
/// `STATE/mnt`.
pub struct Mounter {
    aquifer: PathBuf,
    state_dir: PathBuf,
    /// Where the specs are: they hold secrets, so a host tmpfs (`/run`) is the place, gone at
    /// a reboot with the mounts they describe.
    specs_dir: PathBuf,
    /// Node mounts are made by the node daemon; a publish only asks and waits.
    external: bool,
    /// Cache directories go under `CACHE_ROOT/KEY` unless the options name one (a host
    /// directory, so a restarted daemon finds its cache and its staged writes).
    cache_root: Option<PathBuf>,
    /// Formats and mounts one at a time: two publishes of one filesystem must not both
    /// start a daemon.
    lock: tokio::sync::Mutex<()>,
    /// Targets that showed a dead mount which could not be mounted again yet, by mount
    /// point: bound again once it is.
    pending: parking_lot::Mutex<HashMap<PathBuf, Vec<Entry>>>,
}

/// Held from writing a spec until the target is bound, and by the keeper while it releases
/// the mount: a publish never binds a mount that is being released. An exclusive `flock` on
/// `SPECS/KEY.lock`, so it holds across the plugin and the node daemon, and a slow
/// mount of one filesystem does not hold up publishes of another.
struct SpecLock {
    _file: std::fs::File,
}

impl SpecLock {
    fn open(dir: &Path, key: &str) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{key}.lock")))
    }

    fn flock(f: &std::fs::File, wait: bool) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    async fn take(dir: PathBuf, key: String) -> Result<SpecLock, Status> {
        tokio::task::spawn_blocking(move || {
            let f = Self::open(&dir, &key)?;
            Self::flock(&f, true)?;
            Ok(SpecLock { _file: f })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e: std::io::Error| Status::internal(format!("spec lock: {e}")))
    }

    fn try_take(dir: &Path, key: &str) -> Option<SpecLock> {
        let f = Self::open(dir, key).ok()?;
        Self::flock(&f, false).ok()?;
        Some(SpecLock { _file: f })
    }
}

/// A node mount as its spec file says.
struct Spec {
    key: String,
    fs: Filesystem,
    options: Vec<String>,
    /// Directories of the filesystem published from the mount (the latest last), so that
    /// warm marks, which name inodes, can be told apart after their pods are gone.
    volumes: Vec<PathBuf>,
    /// Since the spec was last written (by the last publish that needed the mount).
    age: Duration,
}

/// A spec remembers this many volume directories.
const MAX_SPEC_VOLUMES: usize = 256;

impl Mounter {
    pub fn new(
        aquifer: PathBuf,
        state_dir: PathBuf,
        specs_dir: Option<PathBuf>,
        external: bool,
        cache_root: Option<PathBuf>,
    ) -> Mounter {
        Mounter {
            aquifer,
            specs_dir: specs_dir.unwrap_or_else(|| state_dir.join("specs")),
            state_dir,
            external,
            cache_root,
            lock: tokio::sync::Mutex::new(()),
            pending: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn mnt_dir(&self) -> PathBuf {
        self.state_dir.join("mnt")
    }

    /// `SPECS/KEY.EXT`: the spec (`json`), the keeper's last error (`err`), the lock.
    fn spec_file(&self, key: &str, ext: &str) -> PathBuf {
        self.specs_dir.join(format!("{key}.{ext}"))
    }

    /// Drop the spec of `key` and its files: the mount is no longer kept.
    fn forget(&self, key: &str) {
        for ext in ["json", "err", "lock"] {
            let _ = std::fs::remove_file(self.spec_file(key, ext));
        }
    }

    /// True while a target shows the mount at `mp`, or waits to be bound to it again.
    fn in_use(&self, mp: &Path) -> bool {
        !self.binds_of(mp).is_empty() || self.pending.lock().contains_key(mp)
    }

    pub fn mount_point(&self, fs: &Filesystem, options: &[String]) -> PathBuf {
        self.mnt_dir().join(fs.key(options))
    }

    /// The controller's own mount of `fs`, to make and remove volume directories: apart
    /// from the node mounts (`--mode all`), which the keeper may release under it.
    pub async fn controller_mount(&self, fs: &Filesystem) -> Result<PathBuf, Status> {
        let mp = self.state_dir.join("controller").join(fs.key(&[]));
        self.ensure_at(fs, &[], mp).await
    }

    /// Run `aquifer ARGS` for `fs` (its passwords in the environment); the last line of its
    /// error output becomes the status message.
    async fn aquifer(&self, fs: &Filesystem, args: &[String]) -> Result<(), Status> {
        let (_, password) = split_password(&fs.metaurl);
        let mut cmd = tokio::process::Command::new(&self.aquifer);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = password {
            cmd.env("META_PASSWORD", p);
        }
        if let Some(k) = &fs.secret_key {
            cmd.env("AQUIFER_SECRET_KEY", k);
        }
        let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("aquifer {} timed out", args[0])))?
            .map_err(|e| Status::internal(format!("cannot run {}: {e}", self.aquifer.display())))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        Err(Status::internal(format!(
            "aquifer {}: {}",
            args[0],
            line.trim()
        )))
    }

    /// Format `fs` unless it is formatted already.
    async fn format(&self, fs: &Filesystem) -> Result<(), Status> {
        let url = split_password(&fs.metaurl).0;
        let mut args = vec![
            "format".to_string(),
            "--if-not-formatted".into(),
            url,
            fs.name.clone(),
        ];
        if let Some(s) = &fs.storage {
            args.extend(["--storage".into(), s.clone()]);
        }
        if let Some(b) = &fs.bucket {
            args.extend(["--bucket".into(), b.clone()]);
        }
        if let Some(a) = &fs.access_key {
            args.extend(["--access-key".into(), a.clone()]);
        }
        args.extend(fs.format_options.iter().cloned());
        self.aquifer(fs, &args).await
    }

    /// The mount a node publish of `volume` (a directory of `fs`) binds from: its spec
    /// written (so it is kept and mounted again if its daemon dies), mounted here or, with
    /// external mounts, by the node daemon. The returned lock is to be held until the target
    /// is bound.
    pub async fn node_mount(
        &self,
        fs: &Filesystem,
        options: &[String],
        volume: &Path,
    ) -> Result<(PathBuf, impl Sized), Status> {
        let specs = &self.specs_dir;
        mkdir_private(specs).map_err(|e| io_status(specs, e))?;
        let key = fs.key(options);
        let guard = SpecLock::take(specs.clone(), key.clone()).await?;
        let path = self.spec_file(&key, "json");
        let mut volumes = read_spec(&path).map(|s| s.2).unwrap_or_default();
        volumes.retain(|v| v != volume);
        volumes.push(volume.to_path_buf());
        let extra = volumes.len().saturating_sub(MAX_SPEC_VOLUMES);
        volumes.drain(..extra);
        let body =
            serde_json::json!({ "secrets": fs.secrets, "options": options, "volumes": volumes })
                .to_string();
        write_private(&path, body.as_bytes()).map_err(|e| io_status(specs, e))?;
        let mp = if self.external {
            self.wait_mounted(fs, options).await?
        } else {
            self.ensure(fs, options).await?
        };
        Ok((mp, guard))
    }

    /// Wait for the node daemon to mount `fs`; its last error, if it wrote one since the
    /// wait began, is the answer.
    async fn wait_mounted(&self, fs: &Filesystem, options: &[String]) -> Result<PathBuf, Status> {
        let mp = self.mount_point(fs, options);
        let err_file = self.spec_file(&fs.key(options), "err");
        let start = Instant::now();
        // The keeper tries again at once for a spec written after its last failure; file
        // times are coarse (a jiffy), hence the margin.
        let since = SystemTime::now() - Duration::from_millis(50);
        loop {
            if mounts::state_in_time(&mp).await == Some(State::Mounted) {
                return Ok(mp);
            }
            if let Ok(m) = std::fs::metadata(&err_file) {
                if m.modified().is_ok_and(|t| t >= since) {
                    let e = std::fs::read_to_string(&err_file).unwrap_or_default();
                    return Err(Status::internal(format!(
                        "the node daemon cannot mount {}: {}",
                        fs.name,
                        e.trim()
                    )));
                }
            }
            if start.elapsed() > EXTERNAL_WAIT {
                return Err(Status::unavailable(format!(
                    "the node daemon has not mounted {} at {} in {}s: is the aquifer-node \
                     DaemonSet running on this node (its log: {})?",
                    fs.name,
                    mp.display(),
                    EXTERNAL_WAIT.as_secs(),
                    self.log_file(fs, options).display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_file(&self, fs: &Filesystem, options: &[String]) -> PathBuf {
        self.state_dir
            .join("log")
            .join(format!("{}.log", fs.key(options)))
    }

    /// Make sure `fs` is formatted and mounted here with `options` (mount flags from the
    /// StorageClass) if it has to be mounted now; returns its mount point. A mount whose
    /// daemon died is detached and mounted again, and the targets bound from it are bound
    /// again from the new mount.
    pub async fn ensure(&self, fs: &Filesystem, options: &[String]) -> Result<PathBuf, Status> {
        self.ensure_at(fs, options, self.mount_point(fs, options))
            .await
    }

    async fn ensure_at(
        &self,
        fs: &Filesystem,
        options: &[String],
        mp: PathBuf,
    ) -> Result<PathBuf, Status> {
        let _one = self.lock.lock().await;
        let stale = match mounts::state_in_time(&mp).await {
            Some(State::Mounted) => return Ok(mp),
            Some(State::Stale) => true,
            Some(State::Absent) => false,
            // Alive but stuck: not dead, so not mounted again under its users.
            None => return Err(not_answering(&mp)),
        };
        // The dead mount stays until the filesystem answers (format checks that): it is
        // what tells which targets showed it.
        self.format(fs).await?;
        // Targets to bind again: those showing the dead mount, and those a failed attempt
        // before this one had found.
        let mut rebind = self.pending.lock().remove(&mp).unwrap_or_default();
        if stale {
            for t in self.binds_of(&mp) {
                if !rebind.iter().any(|r: &Entry| r.point == t.point) {
                    rebind.push(t);
                }
            }
            tracing::warn!(mount_point = %mp.display(), targets = rebind.len(), "filesystem daemon gone; mounting again");
            if let Err(e) = mounts::unmount(&mp, true) {
                self.pending.lock().insert(mp.clone(), rebind);
                return Err(Status::internal(format!("detach {}: {e}", mp.display())));
            }
        }
        let mounted = match std::fs::create_dir_all(&mp) {
            Ok(()) => self.mount(fs, &mp, options).await,
            Err(e) => Err(Status::internal(format!("{}: {e}", mp.display()))),
        };
        if let Err(e) = mounted {
            // Leave no empty mount point for a filesystem that could not be mounted, and
            // remember whom to bind again when it can.
            let _ = std::fs::remove_dir(&mp);
            if !rebind.is_empty() {
                self.pending.lock().insert(mp.clone(), rebind);
            }
            return Err(e);
        }
        for t in rebind {
            let src = mp.join(t.root.strip_prefix("/").unwrap_or(&t.root));
            // Over the dead mount, not instead of it: the pod's copy of the target follows
            // mounts made on top of it, while an unmount would leave it the dead one.
            match mounts::bind(&src, &t.point, t.read_only) {
                Ok(()) => {
                    tracing::info!(target = %t.point.display(), "target bound again to the new mount")
                }
                Err(e) => {
                    tracing::warn!(target = %t.point.display(), error = %e, "cannot bind the target again")
                }
            }
        }
        Ok(mp)
    }

    /// The targets showing the mount at `mp` (the topmost mount at each, so a target
    /// already repaired is not counted): binds of it outside the state directory.
    fn binds_of(&self, mp: &Path) -> Vec<Entry> {
        let mnt = self.mnt_dir();
        let mut top: HashMap<PathBuf, Entry> = HashMap::new();
        for e in mounts::table() {
            top.insert(e.point.clone(), e);
        }
        let Some(dev) = top.get(mp).map(|e| e.dev.clone()) else {
            return Vec::new();
        };
        top.into_values()
            .filter(|e| e.dev == dev && !e.point.starts_with(&mnt))
            .collect()
    }

    async fn mount(&self, fs: &Filesystem, mp: &Path, options: &[String]) -> Result<(), Status> {
        let logs = self.state_dir.join("log");
        let _ = std::fs::create_dir_all(&logs);
        // The controller's mount of a filesystem logs apart from the node's.
        let log = if mp.starts_with(self.state_dir.join("controller")) {
            logs.join(format!("controller-{}.log", fs.key(options)))
        } else {
            self.log_file(fs, options)
        };
        let mut args = vec![
            "mount".to_string(),
            "-d".into(),
            split_password(&fs.metaurl).0,
            mp.display().to_string(),
            "--log".into(),
            log.display().to_string(),
        ];
        let mut has_cache_dir = false;
        for o in options {
            for f in flags(o) {
                has_cache_dir |= f.starts_with("--cache-dir");
                args.push(f);
            }
        }
        if let (Some(root), false) = (&self.cache_root, has_cache_dir) {
            args.push(format!(
                "--cache-dir={}",
                root.join(fs.key(options)).display()
            ));
        }
        self.aquifer(fs, &args).await?;
        if mounts::state_in_time(mp).await != Some(State::Mounted) {
            return Err(Status::internal(format!(
                "aquifer mount returned but {} is not mounted",
                mp.display()
            )));
        }
        Ok(())
    }

    /// Unmount the node mount `key` if no target shows it and no publish wrote its spec in
    /// the last `min_age`, unless a publish of it is under way; true if released.
    pub async fn release(&self, key: &str, min_age: Duration) -> bool {
        let Some(_guard) = SpecLock::try_take(&self.specs_dir, key) else {
            return false;
        };
        let _one = self.lock.lock().await;
        let mp = self.mnt_dir().join(key);
        // A publish may have come between the caller's look and the lock.
        let fresh = age(&self.spec_file(key, "json")).is_some_and(|a| a < min_age);
        if fresh || !self.binds_of(&mp).is_empty() {
            return false;
        }
        self.forget(key);
        if let Err(e) = mounts::unmount(&mp, false) {
            tracing::warn!(mount_point = %mp.display(), error = %e, "busy; detaching");
            let _ = mounts::unmount(&mp, true);
        }
        let _ = std::fs::remove_dir(&mp);
        tracing::info!(mount_point = %mp.display(), "no volume of this filesystem is published here any more: released");
        true
    }

    /// The keys of the node mounts among the filesystems of `devs` (mountinfo devices).
    pub fn node_mounts_of(&self, devs: &[String]) -> Vec<String> {
        let mnt = self.mnt_dir();
        mounts::table()
            .into_iter()
            .filter(|e| e.point.parent() == Some(mnt.as_path()) && devs.contains(&e.dev))
            .filter_map(|e| e.point.file_name()?.to_str().map(str::to_string))
            .collect()
    }

    /// The node mounts the spec files name.
    fn specs(&self) -> Vec<Spec> {
        let Ok(rd) = std::fs::read_dir(&self.specs_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            let Some(key) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            let parsed = read_spec(&p);
            match parsed {
                Ok((fs, options, volumes)) if fs.key(&options) == key => out.push(Spec {
                    key,
                    fs,
                    options,
                    volumes,
                    age: age(&p).unwrap_or_default(),
                }),
                Ok(_) => tracing::warn!(spec = %p.display(), "spec of another mount; ignored"),
                Err(e) => {
                    tracing::warn!(spec = %p.display(), error = %e, "unreadable spec; ignored")
                }
            }
        }
        out
    }
}

/// Since `p` was last written.
fn age(p: &Path) -> Option<Duration> {
    std::fs::metadata(p).ok()?.modified().ok()?.elapsed().ok()
}

/// A spec file: the filesystem, its mount options and the volumes published from it.
fn read_spec(p: &Path) -> Result<(Filesystem, Vec<String>, Vec<PathBuf>), String> {
    let b = std::fs::read(p).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
    let secrets: HashMap<String, String> =
        serde_json::from_value(v["secrets"].clone()).map_err(|e| e.to_string())?;
    let options: Vec<String> =
        serde_json::from_value(v["options"].clone()).map_err(|e| e.to_string())?;
    let volumes: Vec<PathBuf> = serde_json::from_value(v["volumes"].clone()).unwrap_or_default();
    let fs = Filesystem::from_secrets(&secrets).map_err(|e| e.message().to_string())?;
    Ok((fs, options, volumes))
}

fn mkdir_private(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Write `p` whole (a reader never sees half a spec), readable by root only: it holds the
/// filesystem's secrets.
fn write_private(p: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p)
}

#[derive(Default)]
struct Kept {
    idle_since: Option<Instant>,
    failures: u32,
    /// Not before then, unless a publish wrote the spec again after `failed_at`.
    next_try: Option<Instant>,
    failed_at: Option<Instant>,
    /// Volume directories seen bound from this mount, by inode: warm marks name inodes.
    volumes: HashMap<u64, PathBuf>,
    looked_up: std::collections::HashSet<PathBuf>,
}

/// The volumes of the mount at `mp` that `aquifer warmup` marked warm (true) or evicted.
///
/// Marks are read even with no pod left (a short warmup may be over before a look), and name
/// inodes: the spec and the targets name the directories published from this mount, each
/// looked up once per mount, not every tick (a metadata round trip per volume). On a thread
/// of its own and in bounded time: a stuck daemon must not stop the keeper from looking
/// after the other mounts.
async fn warm_marks(k: &mut Kept, spec: &Spec, binds: &[Entry], mp: &Path) -> Vec<(String, bool)> {
    let todo: Vec<PathBuf> = spec
        .volumes
        .iter()
        .chain(binds.iter().map(|b| &b.root))
        .map(|r| r.strip_prefix("/").unwrap_or(r).to_path_buf())
        .filter(|r| !k.looked_up.contains(r))
        .collect();
    let at = mp.to_path_buf();
    let looked = mounts::in_time(move || {
        let inos: Vec<(PathBuf, u64)> = todo
            .into_iter()
            .filter_map(|r| Some((r.clone(), std::fs::metadata(at.join(&r)).ok()?.ino())))
            .collect();
        let marks = std::fs::File::open(&at).and_then(|f| aquifer_control::marks(&f));
        (inos, marks)
    })
    .await;
    let Some((inos, marks)) = looked else {
        tracing::warn!(mount_point = %mp.display(), "no answer for the warm marks");
        return Vec::new();
    };
    for (rel, ino) in inos {
        k.volumes.insert(ino, rel.clone());
        k.looked_up.insert(rel);
    }
    match marks {
        Ok(marks) => marks
            .into_iter()
            .filter_map(|(ino, is_warm)| Some((label_key(k.volumes.get(&ino)?), is_warm)))
            .collect(),
        Err(e) => {
            tracing::debug!(mount_point = %mp.display(), error = %e, "no warm marks");
            Vec::new()
        }
    }
}

/// The loop that keeps a node's mounts (see the module's doc).
pub struct Keeper {
    mounter: std::sync::Arc<Mounter>,
    pub interval: Duration,
    pub release_after: Duration,
    labels: Option<NodeLabels>,
    kept: HashMap<String, Kept>,
    /// Labels as last set on the node: true for set, false for removed.
    labeled: BTreeMap<String, bool>,
}

impl Keeper {
    pub fn new(
        mounter: std::sync::Arc<Mounter>,
        interval: Duration,
        release_after: Duration,
        labels: Option<NodeLabels>,
    ) -> Keeper {
        Keeper {
            mounter,
            interval,
            release_after,
            labels,
            kept: HashMap::new(),
            labeled: BTreeMap::new(),
        }
    }

    pub async fn run(mut self) {
        loop {
            self.tick().await;
            tokio::time::sleep(self.interval).await;
        }
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        let mut warm: BTreeMap<String, bool> = BTreeMap::new();
        for spec in self.mounter.specs() {
            let k = self.kept.entry(spec.key.clone()).or_default();
            let rewritten = k
                .failed_at
                .is_some_and(|f| spec.age < now.duration_since(f));
            if k.next_try.is_some_and(|t| now < t) && !rewritten {
                continue;
            }
            let err_file = self.mounter.spec_file(&spec.key, "err");
            let mp = match self.mounter.ensure(&spec.fs, &spec.options).await {
                Ok(mp) => {
                    k.failures = 0;
                    k.next_try = None;
                    k.failed_at = None;
                    let _ = std::fs::remove_file(&err_file);
                    mp
                }
                Err(e) => {
                    tracing::warn!(filesystem = %spec.fs.name, error = %e.message(), "cannot mount");
                    let _ = write_private(&err_file, e.message().as_bytes());
                    let mp = self.mounter.mount_point(&spec.fs, &spec.options);
                    if spec.age >= self.release_after && !self.mounter.in_use(&mp) {
                        // Nobody has asked for it lately, and no pod shows it: give up
                        // until a publish does. (Pods' targets keep it tried for ever.)
                        // (Its error stays, for a publish waiting on it.)
                        let _ = std::fs::remove_file(self.mounter.spec_file(&spec.key, "json"));
                        self.kept.remove(&spec.key);
                        continue;
                    }
                    // Back off, up to a minute: an unreachable metadata server is retried,
                    // not hammered.
                    k.failures += 1;
                    let wait =
                        (self.interval * (1 << k.failures.min(6))).min(Duration::from_secs(60));
                    k.next_try = Some(now + wait);
                    k.failed_at = Some(Instant::now());
                    continue;
                }
            };
            let binds = self.mounter.binds_of(&mp);
            if self.labels.is_some() {
                warm.extend(warm_marks(k, &spec, &binds, &mp).await);
            }
            if binds.is_empty() {
                let idle = *k.idle_since.get_or_insert(now);
                if now.duration_since(idle) >= self.release_after
                    && spec.age >= self.release_after
                    && self.mounter.release(&spec.key, self.release_after).await
                {
                    self.kept.remove(&spec.key);
                }
                continue;
            }
            k.idle_since = None;
        }
        let changes: BTreeMap<String, bool> = warm
            .into_iter()
            .filter(|(k, v)| self.labeled.get(k) != Some(v))
            .collect();
        if let (Some(l), false) = (&self.labels, changes.is_empty()) {
            match l.apply(&changes).await {
                Ok(()) => {
                    tracing::info!(labels = ?changes, "node labels set");
                    self.labeled.extend(changes);
                }
                Err(e) => tracing::warn!(error = %e, "cannot label the node; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_private_and_whole() {
        let d = std::env::temp_dir().join(format!("aquifer-keeper-{}", std::process::id()));
        let specs = d.join("specs");
        mkdir_private(&specs).unwrap();
        mkdir_private(&specs).unwrap();
        let p = specs.join("fs-1.json");
        write_private(&p, b"{}").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&specs).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(!p.with_extension("tmp").exists());
        let m = Mounter::new("aquifer".into(), d.clone(), None, false, None);
        // The spec of another key, and an unreadable one, are skipped.
        assert!(m.specs().is_empty());
        let secrets: HashMap<String, String> = [("name", "v"), ("metaurl", "redis://h/1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let fs = Filesystem::from_secrets(&secrets).unwrap();
        let opts = vec!["upload-limit=10".to_string()];
        let body = serde_json::json!({ "secrets": secrets, "options": opts }).to_string();
        write_private(
            &specs.join(format!("{}.json", fs.key(&opts))),
            body.as_bytes(),
        )
        .unwrap();
        let got = m.specs();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key, fs.key(&opts));
        assert_eq!(got[0].options, opts);
        // Two holders of the spec lock exclude each other, in one process too.
        let a = SpecLock::try_take(&specs, "k").expect("free");
        assert!(SpecLock::try_take(&specs, "k").is_none());
        assert!(
            SpecLock::try_take(&specs, "other").is_some(),
            "one key holds up no other"
        );
        drop(a);
        assert!(SpecLock::try_take(&specs, "k").is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
