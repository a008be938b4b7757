//! Who may change the node's shared state through the control ioctls.
//!
//! Every process that can open a file on the mount can send a control ioctl. Reading the
//! figures, the marks and what is cached (`warmup --check`) is open to all. Warming and
//! evicting move the node's shared cache (every pod's reads), and marking a directory warm
//! sets a node label that other pods' scheduling follows: those need the mount's owner (the
//! user that runs the daemon) or CAP_SYS_ADMIN.
//!
//! The uid is the request's, which the kernel fills in. CAP_SYS_ADMIN is read from
//! `/proc/PID/status` of the request's pid, and only trusted when that process is plainly
//! the caller: a pid of 0 (a caller in a PID namespace the daemon cannot see, as every
//! application pod is from a node daemon's pod), a `/proc` of another PID namespace than
//! the daemon's, a process gone, one whose filesystem uid is not the request's (a pid
//! reused meanwhile), or one in another user namespace (whose capabilities say nothing over
//! this one) is unprivileged. So `/proc` can only ever
//! confirm a capability, never stand in for a uid.

use aquifer_control::WarmOp;

/// Whether `op` changes shared state (and needs privilege).
pub fn changes_shared_state(op: WarmOp) -> bool {
    match op {
        WarmOp::Check => false,
        WarmOp::Warm | WarmOp::Evict | WarmOp::Mark | WarmOp::Unmark => true,
    }
}

/// Whether a request from `uid` may run `op` on a mount owned by `owner`; `has_cap_sys_admin`
/// is asked only when the uid is not enough.
pub fn allowed(op: WarmOp, uid: u32, owner: u32, has_cap_sys_admin: impl FnOnce() -> bool) -> bool {
    !changes_shared_state(op) || uid == owner || has_cap_sys_admin()
}

const CAP_SYS_ADMIN: u32 = 21;

/// Whether process `pid`, the sender of a request from `uid`, holds CAP_SYS_ADMIN in this
/// process's user namespace (see the module doc for what counts as unprivileged).
pub fn caller_has_cap_sys_admin(pid: u32, uid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // A /proc of another PID namespace (not mounted again after an unshare) numbers
    // processes otherwise: PID would be someone else there.
    let own = std::fs::read_link("/proc/self").ok();
    if own.as_deref().and_then(|p| p.to_str()) != Some(std::process::id().to_string().as_str()) {
        return false;
    }
    let proc = format!("/proc/{pid}");
    let same_userns = |a: &str, b: &str| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    };
    if !same_userns(&format!("{proc}/ns/user"), "/proc/self/ns/user") {
        return false;
    }
    match std::fs::read_to_string(format!("{proc}/status")) {
        Ok(s) => status_has_cap_sys_admin(&s, uid),
        Err(_) => false,
    }
}

/// From a `/proc/PID/status`: CAP_SYS_ADMIN in `CapEff`, and `uid` as the filesystem uid
/// (the fourth of `Uid:`, the one the kernel puts in FUSE requests).
fn status_has_cap_sys_admin(status: &str, uid: u32) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let fsuid = field("Uid:").and_then(|v| v.split_whitespace().nth(3)?.parse::<u32>().ok());
    let eff = field("CapEff:").and_then(|v| u64::from_str_radix(v, 16).ok());
    match (fsuid, eff) {
        (Some(f), Some(e)) => f == uid && e & (1 << CAP_SYS_ADMIN) != 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_state_needs_the_owner_or_cap_sys_admin() {
        let never = || -> bool { panic!("the capability is not asked for") };
        // Figures of what is cached: anyone.
        assert!(allowed(WarmOp::Check, 1001, 0, never));
        for op in [WarmOp::Warm, WarmOp::Evict, WarmOp::Mark, WarmOp::Unmark] {
            assert!(allowed(op, 0, 0, never), "{op:?} by the owner");
            assert!(allowed(op, 1001, 1001, never), "{op:?} by a non-root owner");
            assert!(!allowed(op, 1001, 0, || false), "{op:?} by another user");
            assert!(
                !allowed(op, 0, 1001, || false),
                "{op:?}: root is not the owner"
            );
            assert!(allowed(op, 1001, 0, || true), "{op:?} with CAP_SYS_ADMIN");
        }
    }

    #[test]
    fn capabilities_are_read_only_for_the_caller() {
        let status = |uids: &str, eff: &str| {
            format!("Name:\tx\nUid:\t{uids}\nGid:\t0\t0\t0\t0\nCapInh:\t0\nCapEff:\t{eff}\n")
        };
        assert!(status_has_cap_sys_admin(
            &status("0\t0\t0\t0", "000001ffffffffff"),
            0
        ));
        assert!(status_has_cap_sys_admin(
            &status("5\t5\t5\t1001", "0000000000200000"),
            1001
        ));
        // Without the bit.
        assert!(!status_has_cap_sys_admin(
            &status("0\t0\t0\t0", "00000000001fffff"),
            0
        ));
        // Another process under that pid (its fsuid is not the request's).
        assert!(!status_has_cap_sys_admin(
            &status("0\t0\t0\t0", "000001ffffffffff"),
            1001
        ));
        assert!(!status_has_cap_sys_admin("garbage", 0));
        // A caller whose pid the daemon cannot see.
        assert!(!caller_has_cap_sys_admin(0, 0));
        // This process: root in the test environment holds it, others do not.
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            caller_has_cap_sys_admin(std::process::id(), uid),
            status_has_cap_sys_admin(&me, uid)
        );
    }
}
