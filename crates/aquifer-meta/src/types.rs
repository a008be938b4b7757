//! Value types shared by every metadata engine and by the layers above.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Files are cut into chunks of this size; each chunk has its own slice list.
pub const CHUNK_SIZE: u64 = 64 << 20;
/// Longest file name in bytes.
pub const MAX_NAME: usize = 255;
/// Largest file size (2^56: far beyond any real file, small enough for chunk indexes).
pub const MAX_FILE_SIZE: u64 = 1 << 56;
pub const MAX_SYMLINK: usize = 4096;
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 65536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileType {
    File = 1,
    Directory = 2,
    Symlink = 3,
    Fifo = 4,
    BlockDev = 5,
    CharDev = 6,
    Socket = 7,
}

impl FileType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FileType::File,
            2 => FileType::Directory,
            3 => FileType::Symlink,
            4 => FileType::Fifo,
            5 => FileType::BlockDev,
            6 => FileType::CharDev,
            7 => FileType::Socket,
            _ => return None,
        })
    }

    /// From the S_IFMT bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileType::File,
            libc::S_IFDIR => FileType::Directory,
            libc::S_IFLNK => FileType::Symlink,
            libc::S_IFIFO => FileType::Fifo,
            libc::S_IFBLK => FileType::BlockDev,
            libc::S_IFCHR => FileType::CharDev,
            libc::S_IFSOCK => FileType::Socket,
            _ => return None,
        })
    }

    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::File => libc::S_IFREG,
            FileType::Directory => libc::S_IFDIR,
            FileType::Symlink => libc::S_IFLNK,
            FileType::Fifo => libc::S_IFIFO,
            FileType::BlockDev => libc::S_IFBLK,
            FileType::CharDev => libc::S_IFCHR,
            FileType::Socket => libc::S_IFSOCK,
        }
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    /// The only clock read in the metadata layer.
    pub fn now() -> Time {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Time {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(_) => Time::default(),
        }
    }
}

/// Attributes of one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub typ: FileType,
    /// Permission bits including setuid/setgid/sticky (07777).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub nlink: u32,
    pub length: u64,
    pub rdev: u32,
    /// Parent directory; 0 for files with more than one link.
    pub parent: Ino,
}

impl Attr {
    pub fn new(typ: FileType, mode: u16, uid: u32, gid: u32) -> Attr {
        let now = Time::now();
        Attr {
            typ,
            mode: mode & 0o7777,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            nlink: if typ == FileType::Directory { 2 } else { 1 },
            length: 0,
            rdev: 0,
            parent: 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.typ == FileType::Directory
    }

    /// st_mode: type bits and permission bits.
    pub fn full_mode(&self) -> u32 {
        self.typ.mode_bits() | self.mode as u32
    }

    /// 512-byte blocks for st_blocks: the length rounded up to 4 KiB.
    pub fn blocks(&self) -> u64 {
        align4k(self.length) / 512
    }
}

pub fn align4k(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// Which attributes `setattr` changes.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Time>,
}

#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(Time),
}

/// The caller of an operation.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub gids: Vec<u32>,
    pub pid: u32,
    /// When false the kernel has checked permissions already (`default_permissions`).
    pub check_permission: bool,
}

impl Context {
    pub fn root() -> Context {
        Context::default()
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.gids.contains(&gid)
    }
}

/// A piece of one immutable slice placed in a chunk. `id == 0` is a hole that reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Offset of this piece within the chunk.
    pub pos: u32,
    /// Slice id (object keys derive from it; never reused). 0 = zeros.
    pub id: u64,
    /// Total stored size of the slice.
    pub size: u32,
    /// Offset of this piece within the slice.
    pub off: u32,
    /// Length of this piece.
    pub len: u32,
}

impl Slice {
    pub const ENCODED_LEN: usize = 24;

    pub fn zero(pos: u32, len: u32) -> Slice {
        Slice {
            pos,
            id: 0,
            size: len,
            off: 0,
            len,
        }
    }

    pub fn end(&self) -> u32 {
        self.pos + self.len
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pos.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.off.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }

    pub fn decode_list(buf: &[u8]) -> Option<Vec<Slice>> {
        if !buf.len().is_multiple_of(Self::ENCODED_LEN) {
            return None;
        }
        Some(
            buf.chunks_exact(Self::ENCODED_LEN)
                .map(|b| Slice {
                    pos: u32::from_be_bytes(b[0..4].try_into().unwrap()),
                    id: u64::from_be_bytes(b[4..12].try_into().unwrap()),
                    size: u32::from_be_bytes(b[12..16].try_into().unwrap()),
                    off: u32::from_be_bytes(b[16..20].try_into().unwrap()),
                    len: u32::from_be_bytes(b[20..24].try_into().unwrap()),
                })
                .collect(),
        )
    }

    /// Whether the encoded list `buf` holds a slice with this id (without decoding it).
    pub fn listed(buf: &[u8], id: u64) -> bool {
        buf.chunks_exact(Self::ENCODED_LEN)
            .any(|b| b[4..12] == id.to_be_bytes())
    }

    pub fn encode_list(slices: &[Slice]) -> Vec<u8> {
        let mut out = Vec::with_capacity(slices.len() * Self::ENCODED_LEN);
        for s in slices {
            s.encode(&mut out);
        }
        out
    }
}

/// One directory entry as returned by readdir.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub typ: FileType,
    /// With `plus`: the inode's attributes, or `None` when the inode was removed between
    /// reading the entry and reading its attributes (the entry is being removed now).
    pub attr: Option<Attr>,
}

/// One page of a directory listing ([`crate::Namespace::readdir_page`]).
#[derive(Clone, Debug, Default)]
pub struct DirPage {
    /// Entries in name order. The next page continues after the last one's name.
    pub entries: Vec<DirEntry>,
    /// Whether the directory has no entries after this page. A page may be shorter than
    /// asked for without being the last: only this says the listing is complete.
    pub end: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatFs {
    pub total_space: u64,
    pub avail_space: u64,
    pub used_inodes: u64,
    pub avail_inodes: u64,
}

/// Volume settings, fixed at format time (stored as JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    pub uuid: String,
    /// Object store kind: "file", "memory", later "s3".
    pub storage: String,
    /// Where the blocks live: a directory for `file`, a URL for `s3`.
    pub bucket: String,
    /// Block size in bytes.
    pub block_size: u32,
    /// Capacity limit in bytes; 0 = unlimited.
    #[serde(default)]
    pub capacity: u64,
    /// Inode limit; 0 = unlimited.
    #[serde(default)]
    pub inodes: u64,
    /// Block compression: "none" (or empty), "lz4", "zstd".
    #[serde(default)]
    pub compression: String,
    pub meta_version: u32,
    /// S3 region; empty means the environment's or us-east-1.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// Endpoint for `s3://` buckets outside AWS.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// Static object store keys given at format time; empty means the standard AWS chain
    /// (environment, profile files, web identity, instance roles) at mount time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access_key: String,
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub secret_key: Secret,
    /// Where in the store this volume's objects live (`NAME/`), next to its marker
    /// `NAME/aquifer.volume` naming its uuid. `None` for volumes formatted before volumes
    /// had markers: blocks at the top of a file store, under `NAME/` in a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Random bytes (hex) the keys of the volume's cache groups derive from: only who can
    /// read the volume's metadata can make them. Made the first time a group is joined
    /// ([`crate::Volume::group_secret`]), kept by `format --force`.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub group_secret: Secret,
}

impl Format {
    /// The settings as they may be shown: secrets replaced.
    pub fn redacted(&self) -> Format {
        let mut f = self.clone();
        if !f.secret_key.is_empty() {
            f.secret_key = Secret("removed".into());
        }
        // A copy loaded elsewhere is another volume: it makes a group secret of its own.
        f.group_secret = Secret::default();
        f
    }
}

/// A string that never appears in Debug output.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

/// One mounted client of a volume.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub sid: u64,
    pub hostname: String,
    pub mount_point: String,
    pub pid: u32,
    pub version: String,
    /// Unix seconds on the engine's clock ([`crate::KvEngine::clock`]: the metadata
    /// server's on a shared engine), as are `heartbeat` and `reaped`: the mount's own clock
    /// may be minutes off, and these are compared across mounts.
    pub started: i64,
    pub heartbeat: i64,
    /// The client's lane id (`lanes.rs`), so that its lanes go with the session.
    #[serde(default)]
    pub client: u64,
    /// The session timeout this mount runs with, in seconds (0: not recorded): other
    /// clients wait at least this long without a heartbeat before taking it for dead.
    #[serde(default)]
    pub timeout: u64,
    /// Set when another client took the session for dead and began cleaning up after it;
    /// the record goes when the clean-up is done. The session never heartbeats again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaped: Option<i64>,
    /// The cache group this client is a member of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupMember>,
}

/// A session's membership of a cache group of the volume (`--cache-group`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    /// The group's name.
    pub name: String,
    /// The member's identity, stable across its restarts (its cache keeps its blocks).
    pub id: String,
    /// `IP:PORT` the member listens on.
    pub addr: String,
    /// Bytes of cache it offers.
    pub weight: u64,
    /// False for a member that reads through the group but owns nothing (`--no-sharing`).
    pub owns: bool,
    /// Directories (inodes) `aquifer warmup` warmed in the group through this member: the
    /// group holds them, so every member's node is labelled warm for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<u64>,
}

impl SessionInfo {
    /// Whether the session is alive at `now` (the engine's clock): not being cleaned up
    /// after, and a heartbeat within its timeout (60 s where it recorded none).
    pub fn live(&self, now: i64) -> bool {
        let timeout = if self.timeout > 0 {
            self.timeout as i64
        } else {
            60
        };
        self.reaped.is_none() && now - self.heartbeat <= timeout
    }
}

/// Flags of rename(2).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const RENAME_WHITEOUT: u32 = 4;

/// Flags of setxattr(2).
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

/// Modes of fallocate(2).
pub const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
