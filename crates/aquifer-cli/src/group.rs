//! Joining a peer cache group (`--cache-group`): who this member is, where it listens, its
//! key, and following the other members through the volume's sessions; and `aquifer
//! cache-node`, a member with no mount.

use anyhow::{anyhow, bail, Context as _, Result};
use aquifer_group::{Config, Group, GroupKey, Member, Peer};
use aquifer_meta::{GroupMember, Meta, SessionInfo};
use clap::Args;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often a member reads the sessions for the others: a member that joins is asked
/// within this long; one that dies is passed over at its first failed request.
const FOLLOW_EVERY: Duration = Duration::from_secs(2);

#[derive(Args, Clone, Debug, Default)]
pub(crate) struct GroupArgs {
    /// Join the volume's peer cache group NAME: each block has one owner among the members
    /// (by cache size), a member that misses a block asks its owner, and the owner reads it
    /// from the store once for all. The same name on another volume is another group.
    #[arg(long, value_name = "NAME", value_parser = parse_group_name)]
    pub cache_group: Option<String>,
    /// In the group, own no blocks: read through the others only (a laptop, a CI job).
    #[arg(long, requires = "cache_group")]
    pub no_sharing: bool,
    /// The address this member listens on and the others dial (default: the node's address,
    /// the one its default route leaves from).
    #[arg(long, value_name = "IP", requires = "cache_group")]
    pub group_ip: Option<IpAddr>,
    /// The port this member listens on (default: any free port).
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = 0,
        requires = "cache_group"
    )]
    pub group_port: u16,
}

fn parse_group_name(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a group name: 1 to 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// This member once it has joined: the group, and what its session says of it.
pub(crate) struct Joined {
    pub group: Arc<Group>,
    pub member: GroupMember,
}

/// The address of this node the others can reach: the source address of its default route
/// (a UDP socket connected to a documentation address: nothing is sent), else loopback.
fn node_ip() -> IpAddr {
    let routed = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
        s.connect((Ipv4Addr::new(192, 0, 2, 1), 9))?;
        s.local_addr()
    });
    match routed {
        Ok(a) => a.ip(),
        Err(e) => {
            tracing::warn!(error = %e, "no default route: the cache group listens on 127.0.0.1, which only members on this node reach; give --group-ip");
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        }
    }
}

/// This member's identity: kept in its cache directory, so a member that restarts with its
/// cache owns the same blocks again; a member without a disk cache is new at every start
/// (its RAM cache starts empty anyway).
fn member_id(cache_root: Option<&Path>) -> Result<String> {
    let fresh = || {
        format!(
            "{}-{}",
            crate::volume::hostname(),
            &crate::volume::new_uuid()[..8]
        )
    };
    let Some(root) = cache_root else {
        return Ok(fresh());
    };
    let path = root.join("group-member");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = fresh();
    std::fs::create_dir_all(root)
        .and_then(|_| std::fs::write(&path, &id))
        .with_context(|| format!("cannot keep the group member id in {}", path.display()))?;
    Ok(id)
}

/// The key of group `name` of volume `uuid` whose secret is `secret`. The group's name is
/// part of it: two groups of one volume never mix.
fn group_key(uuid: &str, name: &str, secret: &aquifer_meta::Secret) -> GroupKey {
    GroupKey::derive(&format!("{uuid}/{name}"), secret.0.as_bytes())
}

/// Join the group `args` names, if any: bind its port and derive its key. `weight` is the
/// cache this member offers; `cache_root` where its identity is kept.
pub(crate) fn join(
    args: &GroupArgs,
    meta: &dyn Meta,
    uuid: &str,
    weight: u64,
    block_size: u32,
    cache_root: Option<&Path>,
) -> Result<Option<Joined>> {
    let Some(name) = &args.cache_group else {
        return Ok(None);
    };
    let secret = meta
        .group_secret()
        .map_err(|e| anyhow!("cannot read the volume's group secret: {e}"))?;
    let me = Member {
        id: member_id(cache_root)?,
        weight,
        owns: !args.no_sharing,
    };
    let ip = args.group_ip.unwrap_or_else(node_ip);
    if ip.is_unspecified() || ip.is_multicast() {
        // The others would dial themselves, or nothing.
        bail!("--group-ip {ip} is not an address the other members can dial");
    }
    let listen = SocketAddr::new(ip, args.group_port);
    // A block is at most the volume's block size: a longer "block" named by a key is no
    // block, and is not allocated for.
    let block_len: aquifer_group::BlockLen = Arc::new(move |key: &str| {
        aquifer_chunk::store::keys::BlockKey::parse(key)
            .filter(|k| k.len > 0 && k.len <= block_size)
            .map(|k| k.len as usize)
    });
    let cfg = Config {
        volume: uuid.to_string(),
        key: group_key(uuid, name, &secret),
        me: me.clone(),
        block_len,
    };
    let group = Group::bind(cfg, listen)
        .with_context(|| format!("cannot listen for the cache group on {listen}"))?;
    tracing::info!(
        group = %name,
        member = %me.id,
        address = %group.addr(),
        owns = me.owns,
        weight,
        "joined the cache group"
    );
    let member = GroupMember {
        name: name.clone(),
        id: me.id,
        addr: group.addr().to_string(),
        weight,
        owns: me.owns,
        warm: Vec::new(),
    };
    Ok(Some(Joined { group, member }))
}

/// The members of group `name` among `sessions`: those alive now (a heartbeat within their
/// timeout on the engine's clock, not being cleaned up after). Of two sessions of one member
/// (it restarted on its cache before its old session timed out), the newer one: the old
/// address is dead.
fn members(sessions: &[SessionInfo], name: &str, now: i64) -> Vec<Peer> {
    let mut live: Vec<&SessionInfo> = sessions
        .iter()
        .filter(|s| s.live(now) && s.group.as_ref().is_some_and(|g| g.name == name))
        .collect();
    live.sort_by_key(|s| std::cmp::Reverse((s.started, s.sid)));
    let mut seen = std::collections::HashSet::new();
    live.into_iter()
        .filter_map(|s| s.group.as_ref())
        .filter(|g| seen.insert(g.id.clone()))
        .map(|g| Peer {
            member: Member {
                id: g.id.clone(),
                weight: g.weight,
                owns: g.owns,
            },
            addr: g.addr.clone(),
        })
        .collect()
}

/// Keep `group`'s member list current from the volume's sessions, until the group goes;
/// and its key, from the volume's group secret as stored now (a failover that lost the
/// first secret before it reached a replica lets a later member make another: every member
/// moves to the stored one).
pub(crate) fn follow(group: &Arc<Group>, meta: Arc<dyn Meta>, name: String) -> Result<()> {
    let weak: Weak<Group> = Arc::downgrade(group);
    let refresh = move |g: &Group| -> aquifer_meta::Result<()> {
        let now = meta.clock()?.sec;
        let sessions = meta.list_sessions()?;
        g.set_members(members(&sessions, &name, now));
        let f = meta.load_format()?;
        let secret = if f.group_secret.is_empty() {
            meta.group_secret()?
        } else {
            f.group_secret
        };
        g.set_key(group_key(&f.uuid, &name, &secret));
        Ok(())
    };
    if let Err(e) = refresh(group) {
        tracing::warn!(error = %e, "cannot list the cache group's members yet");
    }
    std::thread::Builder::new()
        .name("group-members".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(FOLLOW_EVERY);
                let Some(g) = weak.upgrade() else { return };
                // A metadata outage keeps the last list: members still answer meanwhile.
                match refresh(&g) {
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "cache group members not refreshed; the last list stays");
                        failing = true;
                    }
                    Err(_) => {}
                    Ok(()) => failing = false,
                }
            }
        })
        .context("cannot start the group-members thread")?;
    Ok(())
}

/// `aquifer cache-node`: a member of a volume's cache group with no mount.
#[derive(Args)]
pub(crate) struct CacheNodeArgs {
    /// The volume's metadata URL.
    meta_url: String,
    #[command(flatten)]
    group: GroupArgs,
    #[command(flatten)]
    cache: crate::mount::CacheArgs,
    /// Memory in MiB for blocks in flight (as `mount --buffer-size`).
    #[arg(long, default_value_t = 128, value_parser = crate::parse::usize_in(8, 1 << 20))]
    buffer_size: usize,
    /// Blocks fetched from the store at once.
    #[arg(long, default_value_t = 8, value_parser = crate::parse::usize_in(1, 256))]
    max_downloads: usize,
    /// Download bandwidth limit in MiB/s (0 = none).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..1 << 30))]
    download_limit: u64,
    /// Seconds without a heartbeat after which the others take this member for dead.
    #[arg(long, default_value_t = 60.0, value_parser = crate::parse::parse_session_timeout)]
    session_timeout: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics (`none` to not): the member's
    /// figures, its group's and its store's.
    #[arg(long, default_value = "127.0.0.1:9567")]
    metrics: String,
    /// Data directory (the default cache directory is DATA_DIR/cache).
    #[arg(long, env = "AQUIFER_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

pub(crate) fn cache_node(a: CacheNodeArgs) -> Result<()> {
    if a.group.cache_group.is_none() {
        bail!("aquifer cache-node needs --cache-group NAME");
    }
    crate::init_logging();
    crate::tune_malloc();
    let signals = crate::mountpoint::block_signals();
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(crate::volume::default_data_dir);
    let meta = crate::volume::open_meta_with(
        &a.meta_url,
        false,
        false,
        Duration::from_secs_f64(a.session_timeout),
        None,
    )?;
    let format = meta.load_format().map_err(crate::volume::meta_err)?;
    let compression =
        aquifer_chunk::Compression::parse(&format.compression).map_err(|e| anyhow!(e))?;
    let disks = crate::mount::disk_tiers(&a.cache, &format, &data_dir, a.max_downloads)?;
    let half = (a.buffer_size << 20) / 2;
    let (mem, weight) = a.cache.ram_and_weight(half, &disks.0);
    let joined = join(
        &a.group,
        &*meta,
        &format.uuid,
        weight,
        format.block_size,
        disks.2.as_deref(),
    )?
    .expect("--cache-group checked above");
    let stack = aquifer_chunk::store::build(
        &crate::volume::store_spec(&format),
        aquifer_chunk::store::StackOptions {
            download_mib: a.download_limit,
            volume: Some(&format),
            ..Default::default()
        },
    )?;
    let cfg = aquifer_chunk::DataConfig {
        upload_threads: 1,
        write_buffer: half,
        cache_bytes: mem,
        prefetch_threads: a.max_downloads,
        readahead_blocks: 0,
        compression,
        lower_tiers: disks.0,
        group: Some(joined.group.clone()),
        ..Default::default()
    };
    let vfs = aquifer_vfs::Vfs::new(meta.clone(), stack.store.clone(), cfg)
        .map_err(|e| anyhow!("cannot load volume: {e}"))?;
    vfs.start_session(crate::volume::session_info(
        format!("cache-node {}", joined.group.addr()),
        Some(joined.member.clone()),
    ))
    .map_err(|e| anyhow!("cannot start a session: {e}"))?;
    joined.group.serve(vfs.chunk_store().clone());
    follow(&joined.group, meta.clone(), joined.member.name.clone())?;
    if !matches!(a.metrics.as_str(), "" | "none" | "off") {
        let l = crate::figures::bind(&a.metrics)?;
        let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let sources = Arc::new(crate::figures::Sources {
            vfs: vfs.clone(),
            fuse: Default::default(),
            store: stack.counters,
            metrics: parking_lot::Mutex::new(Some(at.clone())),
            staged: None,
            group: Some((joined.group.clone(), joined.member.name.clone())),
        });
        crate::figures::serve(l, sources).context("cannot start the metrics thread")?;
        tracing::info!(address = %at, "serving Prometheus metrics at /metrics");
    }
    let mut sig = 0;
    // SAFETY: signals is a valid signal set and sig a valid out pointer.
    unsafe { libc::sigwait(&signals, &mut sig) };
    tracing::info!(signal = sig, "cache node leaving its group");
    vfs.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(name: &str, id: &str, heartbeat: i64, reaped: bool) -> SessionInfo {
        SessionInfo {
            heartbeat,
            started: heartbeat - 1,
            timeout: 10,
            reaped: reaped.then_some(heartbeat),
            group: Some(GroupMember {
                name: name.into(),
                id: id.into(),
                addr: "127.0.0.2:1".into(),
                weight: 1,
                owns: true,
                warm: Vec::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn members_are_the_live_sessions_of_the_group() {
        let s = vec![
            session("g", "a", 100, false),
            session("g", "stale", 80, false),
            session("g", "reaped", 100, true),
            session("g2", "other-group", 100, false),
            SessionInfo {
                heartbeat: 100,
                ..Default::default()
            },
        ];
        let ids: Vec<String> = members(&s, "g", 105)
            .into_iter()
            .map(|p| p.member.id)
            .collect();
        assert_eq!(ids, ["a"]);
        // A member restarted on its cache: its newer session's address wins.
        let mut again = session("g", "a", 104, false);
        again.started = 103;
        again.group.as_mut().unwrap().addr = "127.0.0.9:2".into();
        let mut s = s;
        s.push(again);
        let m = members(&s, "g", 105);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].addr, "127.0.0.9:2");
    }

    #[test]
    fn group_names_are_checked() {
        assert!(parse_group_name("train-set_1.a").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(64)] {
            assert!(parse_group_name(bad).is_err(), "{bad:?}");
        }
    }
}
