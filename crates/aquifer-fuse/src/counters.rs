//! What the adapter counts: requests served per operation and bytes moved, for the
//! mount's figures.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! ops {
    ($($name:ident),* $(,)?) => {
        /// The FUSE operations served, for figures.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug)]
        pub enum Op { $($name),* }
        /// Their names, in [`Op`] order.
        pub const OP_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

ops!(
    lookup,
    getattr,
    setattr,
    readlink,
    mknod,
    mkdir,
    unlink,
    rmdir,
    symlink,
    rename,
    link,
    open,
    read,
    write,
    flush,
    release,
    fsync,
    opendir,
    readdir,
    readdirplus,
    releasedir,
    fsyncdir,
    statfs,
    setxattr,
    getxattr,
    listxattr,
    removexattr,
    access,
    create,
    copy_file_range,
    fallocate,
    ioctl
);

/// Requests served and bytes moved, counted by the adapter.
pub struct FuseCounters {
    ops: Vec<AtomicU64>,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Opens answered with a backing file: their reads never reach the adapter.
    pub passthrough_opens: AtomicU64,
    /// Opens that shared the backing file of passthrough handles of the same file (the
    /// kernel allows no other kind of open beside them): writers among them write into
    /// the copy, mirrored into the file at each close.
    pub shared_opens: AtomicU64,
    /// Changes of other mounts told to the kernel (FUSE notify).
    pub invalidations: AtomicU64,
}

impl Default for FuseCounters {
    fn default() -> Self {
        FuseCounters {
            ops: OP_NAMES.iter().map(|_| AtomicU64::new(0)).collect(),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            shared_opens: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }
}

impl FuseCounters {
    pub(crate) fn tick(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each operation's name and count.
    pub fn ops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        OP_NAMES
            .iter()
            .zip(&self.ops)
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
    }
}
