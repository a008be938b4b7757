//! The control ioctls a mount answers ([`aquifer_control`]): figures, warming, checking
//! and evicting cached ranges, and the warm marks the node daemon reads. Who may change
//! shared state is [`crate::privilege`]'s to say.

use crate::{privilege, CacheOp, Result, Vfs};
use aquifer_control as control;
use aquifer_meta::{Errno, Ino};
use parking_lot::Mutex;
use std::sync::{Arc, OnceLock};

/// The mount's figures as JSON, for [`control::STATS`].
pub type FiguresFn = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Who sent a control request, as the kernel says.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    /// 0 when the caller is in a PID namespace the daemon cannot see (every pod).
    pub pid: u32,
}

/// The control channel's state.
pub(crate) struct Control {
    figures: OnceLock<FiguresFn>,
    /// Directories `aquifer warmup` marked warm (true) or evicted, latest last: the node
    /// daemon reads them to label Kubernetes nodes holding warm volumes.
    marks: Mutex<Vec<(u64, bool)>>,
    /// The user that runs the daemon: it (or CAP_SYS_ADMIN) may warm, evict and mark.
    owner_uid: u32,
}

impl Control {
    pub(crate) fn new() -> Self {
        Control {
            figures: OnceLock::new(),
            marks: Mutex::new(Vec::new()),
            // SAFETY: geteuid has no preconditions.
            owner_uid: unsafe { libc::geteuid() },
        }
    }
}

/// What a control ioctl answers: the ioctl's result and the bytes copied out.
pub type ControlReply = (i32, Vec<u8>);

impl Vfs {
    /// In a cache group, tell the other members (through this session's record) that the
    /// directory `ino` was warmed in the group (`warm`) or evicted here.
    fn mark_in_group(&self, ino: u64, warm: bool) {
        let mut change = |s: &mut aquifer_meta::SessionInfo| {
            if let Some(g) = s.group.as_mut() {
                g.warm.retain(|i| *i != ino);
                if warm {
                    if g.warm.len() >= control::MAX_MARKS {
                        g.warm.remove(0);
                    }
                    g.warm.push(ino);
                }
            }
        };
        if let Err(e) = self.meta.update_session(&mut change) {
            tracing::warn!(ino, error = %e, "the group does not know of this warm mark yet");
        }
    }

    /// The directories warmed in this mount's cache group, by any live member: the group
    /// holds their blocks, so this node reads them from the group, not the store.
    fn group_marks(&self) -> Vec<(u64, bool)> {
        let Some(name) = self.meta.session().and_then(|s| s.group).map(|g| g.name) else {
            return Vec::new();
        };
        let (Ok(now), Ok(all)) = (self.meta.clock(), self.meta.list_sessions()) else {
            return Vec::new();
        };
        let mut out: Vec<(u64, bool)> = Vec::new();
        for s in all.iter().filter(|s| s.live(now.sec)) {
            if let Some(g) = s.group.as_ref().filter(|g| g.name == name) {
                for ino in &g.warm {
                    if !out.iter().any(|(i, _)| i == ino) {
                        out.push((*ino, true));
                    }
                }
            }
        }
        out
    }

    /// Answer [`control::STATS`] with `f` (set once, by whoever reports figures).
    pub fn set_figures(&self, f: FiguresFn) {
        let _ = self.control.figures.set(f);
    }

    /// A control ioctl `cmd` on `ino` from `caller`, with `input` copied in and room for
    /// `out_size` bytes out. An unknown command is ENOTTY, a malformed one EINVAL, a
    /// change of shared state by whom may not EPERM; a warm request that fails carries
    /// its errno in the reply.
    pub fn control(
        &self,
        caller: Caller,
        ino: Ino,
        cmd: u32,
        input: &[u8],
        out_size: u32,
    ) -> Result<ControlReply> {
        let c = &self.control;
        match cmd {
            control::STATS => {
                let f = c.figures.get().ok_or(Errno(libc::ENOTTY))?;
                let mut json = f();
                json.truncate((out_size as usize).min(control::STATS_SIZE));
                Ok((json.len() as i32, json))
            }
            control::WARM => {
                let r = control::WarmRequest::decode(input).ok_or(Errno::EINVAL)?;
                if !privilege::allowed(r.op, caller.uid, c.owner_uid, || {
                    privilege::caller_has_cap_sys_admin(caller.pid, caller.uid)
                }) {
                    return Err(Errno::EPERM);
                }
                let op = match r.op {
                    control::WarmOp::Warm => CacheOp::Warm,
                    control::WarmOp::Check => CacheOp::Check,
                    control::WarmOp::Evict => CacheOp::Evict,
                    control::WarmOp::Mark | control::WarmOp::Unmark => {
                        let mut m = c.marks.lock();
                        m.retain(|(i, _)| *i != ino);
                        if m.len() >= control::MAX_MARKS {
                            m.remove(0);
                        }
                        let warm = r.op == control::WarmOp::Mark;
                        m.push((ino, warm));
                        drop(m);
                        self.mark_in_group(ino, warm);
                        return Ok((0, control::WarmReply::default().encode().to_vec()));
                    }
                };
                let out = match self.cache_range(ino, op, r.off, r.len) {
                    Ok(c) => control::WarmReply {
                        errno: 0,
                        total: c.total,
                        cached: c.cached,
                        done: c.done,
                    },
                    Err(e) => control::WarmReply {
                        errno: e.0,
                        ..Default::default()
                    },
                };
                Ok((0, out.encode().to_vec()))
            }
            control::MARKS => {
                let mut marks = self.group_marks();
                marks.extend(c.marks.lock().iter().copied());
                let keep = marks.len().saturating_sub(control::MAX_MARKS);
                let b = control::encode_marks(&marks[keep..]);
                Ok((b.len() as i32, b))
            }
            _ => Err(Errno(libc::ENOTTY)),
        }
    }
}
