//! The volume as a whole ([`Volume`]): format and settings, space and inode counts (where
//! statfs is answered and ENOSPC decided), the engine's clock, sync. Also the capacity and
//! inode limits the other roles check, read once from the settings.

use super::{put_attr, KvMeta, C_NEXT_INODE, C_NEXT_SLICE, C_USED_INODES, C_USED_SPACE};
use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::KvEngine;
use crate::types::*;
use crate::Volume;
use std::time::{Duration, Instant};

/// How long a reading of a shared engine's clock is extrapolated with this host's
/// monotonic clock before it is read again.
const CLOCK_RESAMPLE: Duration = Duration::from_secs(60);
/// Free space reported when the volume has no capacity limit (1 PiB).
const UNLIMITED_SPACE: u64 = 1 << 50;
const UNLIMITED_INODES: u64 = 10 << 20;

fn later(t: Time, d: Duration) -> Time {
    let ns = t.nsec as u128 + d.subsec_nanos() as u128;
    Time {
        sec: t.sec + d.as_secs() as i64 + (ns / 1_000_000_000) as i64,
        nsec: (ns % 1_000_000_000) as u32,
    }
}

impl<E: KvEngine> Volume for KvMeta<E> {
    fn engine(&self) -> &'static str {
        self.kv.name()
    }

    fn format(&self, format: &Format, force: bool) -> Result<()> {
        let json = serde_json::to_vec(format).map_err(|e| MetaError::Config(e.to_string()))?;
        self.txn(|t| {
            if let Some(old) = t.get(key::SETTING)? {
                let old: Format = serde_json::from_slice(&old).map_err(|e| MetaError::Corrupt {
                    key: "setting".into(),
                    msg: e.to_string(),
                })?;
                if !force {
                    return Err(MetaError::Config(format!(
                        "volume {:?} is already formatted here (uuid {}); pass --force to update its settings",
                        old.name, old.uuid
                    )));
                }
                let codec = |c: &str| if c.is_empty() { "none".to_string() } else { c.to_string() };
                if old.block_size != format.block_size
                    || old.storage != format.storage
                    || codec(&old.compression) != codec(&format.compression)
                {
                    return Err(MetaError::Config(
                        "block size, storage and compression are fixed at format time and cannot change"
                            .into(),
                    ));
                }
                let mut keep = format.clone();
                keep.uuid = old.uuid;
                if keep.group_secret.is_empty() {
                    keep.group_secret = old.group_secret;
                }
                let json = serde_json::to_vec(&keep).map_err(|e| MetaError::Config(e.to_string()))?;
                t.set(key::SETTING, json);
                return Ok(());
            }
            t.set(key::SETTING, json.clone());
            let mut root = Attr::new(FileType::Directory, 0o777, 0, 0);
            root.parent = ROOT_INO;
            put_attr(t, ROOT_INO, &root);
            t.set(&key::counter(C_NEXT_INODE), 2i64.to_be_bytes().to_vec());
            t.set(&key::counter(C_NEXT_SLICE), 1i64.to_be_bytes().to_vec());
            t.set(&key::counter(C_USED_INODES), 1i64.to_be_bytes().to_vec());
            Ok(())
        })?;
        *self.limits.lock().unwrap() = None;
        Ok(())
    }

    fn load_format(&self) -> Result<Format> {
        match self.kv.get(key::SETTING)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| MetaError::Corrupt {
                key: "setting".into(),
                msg: e.to_string(),
            }),
            None => Err(MetaError::NotFormatted),
        }
    }

    fn group_secret(&self) -> Result<Secret> {
        let made = Secret(crate::random_hex(32)?);
        self.txn(|t| {
            let v = t.get(key::SETTING)?.ok_or(MetaError::NotFormatted)?;
            let mut f: Format = serde_json::from_slice(&v).map_err(|e| MetaError::Corrupt {
                key: "setting".into(),
                msg: e.to_string(),
            })?;
            if f.group_secret.is_empty() {
                f.group_secret = made.clone();
                let json = serde_json::to_vec(&f).map_err(|e| MetaError::Config(e.to_string()))?;
                t.set(key::SETTING, json);
            }
            Ok(f.group_secret)
        })
    }

    fn clock(&self) -> Result<Time> {
        self.engine_now()
    }

    fn statfs(&self) -> Result<StatFs> {
        self.alive()?;
        let (used, inodes) = self.usage()?;
        let (cap, max_inodes) = self.limits();
        let total = if cap > 0 {
            cap
        } else {
            UNLIMITED_SPACE.max(used * 2)
        };
        let total_inodes = if max_inodes > 0 {
            max_inodes
        } else {
            (inodes * 2).max(UNLIMITED_INODES)
        };
        Ok(StatFs {
            total_space: total,
            avail_space: total.saturating_sub(used),
            used_inodes: inodes,
            avail_inodes: total_inodes.saturating_sub(inodes),
        })
    }

    fn usage(&self) -> Result<(u64, u64)> {
        let get = |name: &str| -> Result<u64> {
            Ok(match self.kv.get(&key::counter(name))? {
                Some(v) if v.len() == 8 => {
                    i64::from_be_bytes(v[..8].try_into().unwrap()).max(0) as u64
                }
                _ => 0,
            })
        };
        Ok((get(C_USED_SPACE)?, get(C_USED_INODES)?))
    }

    fn sync(&self) -> Result<()> {
        self.kv.sync()?;
        self.check_lanes()
    }

    fn follow(&self) -> Option<Box<dyn crate::Follower>> {
        self.new_follower()
    }

    fn sync_on_close(&self) -> Result<()> {
        self.kv.sync_on_close()?;
        self.check_lanes()
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// The engine's clock without a round trip each time: a shared engine's is read once a
    /// minute and extrapolated with this host's monotonic clock in between (off by half a
    /// round trip, whatever this host's wall clock says).
    pub(super) fn engine_now(&self) -> Result<Time> {
        if self.kv.exclusive() {
            return self.kv.clock();
        }
        let mut base = self.clock_base.lock().unwrap();
        if let Some((t, at)) = *base {
            let age = at.elapsed();
            if age < CLOCK_RESAMPLE {
                return Ok(later(t, age));
            }
        }
        let t = self.kv.clock()?;
        *base = Some((t, Instant::now()));
        Ok(t)
    }

    pub(super) fn limits(&self) -> (u64, u64) {
        let mut l = self.limits.lock().unwrap();
        if l.is_none() {
            if let Ok(f) = self.load_format() {
                *l = Some((f.capacity, f.inodes));
            }
        }
        l.unwrap_or((0, 0))
    }

    /// The capacity check. Reads the committed counter outside the transaction: a limit
    /// shared by many clients is checked, not made a point of conflict (it may be overshot
    /// by what clients add at the same moment).
    pub(super) fn check_space(&self, grow: u64) -> Result<()> {
        let (cap, _) = self.limits();
        if cap > 0 && grow > 0 && self.counter(C_USED_SPACE)?.max(0) as u64 + grow > cap {
            return Err(Errno::ENOSPC.into());
        }
        Ok(())
    }
}
