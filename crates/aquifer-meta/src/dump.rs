//! `aquifer dump` and `aquifer load`: a whole namespace as one JSON document, written and
//! read a record at a time, so millions of entries take constant memory.
//!
//! The document is valid JSON with one record per line:
//!
//! ```text
//! {"aquifer_dump":1,
//! "setting":{...volume settings, secrets removed unless asked...},
//! "records":[
//! {"ino":1,"attr":{...},"xattrs":[...],"symlink":...,"chunks":[[0,[[pos,id,size,off,len],...]]]},
//! {"dir":1,"entries":[["name",2,"file"],...]},
//! {"journal":"chunks/...","data":{"hex":"..."}},
//! {"end":{"inodes":N,"used_space":B,"next_inode":I,"next_slice":S}}
//! ]}
//! ```
//!
//! Names, targets and xattr values are JSON strings when they are UTF-8, else `{"hex": ...}`.
//! Each inode is written once, however many links it has; directories' entries go in
//! records of at most 1,000. Everything goes through [`Meta`], so any engine dumps and any
//! engine loads: the way from RocksDB to Redis and back.

use crate::error::{MetaError, Result};
use crate::types::*;
use crate::{LoadInode, Meta};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, Write};

const VERSION: u64 = 1;
const PAGE: usize = 1000;

fn io(what: &str, e: impl std::fmt::Display) -> MetaError {
    MetaError::Config(format!("{what}: {e}"))
}

/// Raw bytes in JSON: a string when UTF-8, else hex.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Bytes {
    Text(String),
    Hex { hex: String },
}

impl Bytes {
    fn of(b: &[u8]) -> Bytes {
        match std::str::from_utf8(b) {
            Ok(s) => Bytes::Text(s.to_string()),
            Err(_) => Bytes::Hex {
                hex: b.iter().map(|x| format!("{x:02x}")).collect(),
            },
        }
    }

    fn into_vec(self) -> Result<Vec<u8>> {
        match self {
            Bytes::Text(s) => Ok(s.into_bytes()),
            Bytes::Hex { hex } => {
                if !hex.len().is_multiple_of(2) {
                    return Err(io("bad hex in dump", "odd length"));
                }
                (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                            .ok_or_else(|| io("bad hex in dump", &hex[..hex.len().min(20)]))
                    })
                    .collect()
            }
        }
    }
}

fn type_name(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::BlockDev => "blockdev",
        FileType::CharDev => "chardev",
        FileType::Socket => "socket",
    }
}

fn type_of(s: &str) -> Result<FileType> {
    Ok(match s {
        "file" => FileType::File,
        "dir" => FileType::Directory,
        "symlink" => FileType::Symlink,
        "fifo" => FileType::Fifo,
        "blockdev" => FileType::BlockDev,
        "chardev" => FileType::CharDev,
        "socket" => FileType::Socket,
        other => return Err(io("unknown file type in dump", other)),
    })
}

#[derive(Serialize, Deserialize)]
struct AttrJson {
    #[serde(rename = "type")]
    typ: String,
    mode: u16,
    uid: u32,
    gid: u32,
    atime: (i64, u32),
    mtime: (i64, u32),
    ctime: (i64, u32),
    nlink: u32,
    length: u64,
    rdev: u32,
    parent: Ino,
}

impl AttrJson {
    fn of(a: &Attr) -> AttrJson {
        let t = |t: Time| (t.sec, t.nsec);
        AttrJson {
            typ: type_name(a.typ).into(),
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            atime: t(a.atime),
            mtime: t(a.mtime),
            ctime: t(a.ctime),
            nlink: a.nlink,
            length: a.length,
            rdev: a.rdev,
            parent: a.parent,
        }
    }

    fn attr(&self) -> Result<Attr> {
        let t = |(sec, nsec): (i64, u32)| Time { sec, nsec };
        Ok(Attr {
            typ: type_of(&self.typ)?,
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            atime: t(self.atime),
            mtime: t(self.mtime),
            ctime: t(self.ctime),
            nlink: self.nlink,
            length: self.length,
            rdev: self.rdev,
            parent: self.parent,
        })
    }
}

type SliceJson = (u32, u64, u32, u32, u32);

#[derive(Serialize, Deserialize)]
struct InodeJson {
    ino: Ino,
    attr: AttrJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    symlink: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    xattrs: Vec<(Bytes, Bytes)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chunks: Vec<(u32, Vec<SliceJson>)>,
}

#[derive(Serialize, Deserialize)]
struct EntriesJson {
    dir: Ino,
    entries: Vec<(Bytes, Ino, String)>,
}

#[derive(Serialize, Deserialize)]
struct JournalJson {
    journal: String,
    data: Bytes,
}

#[derive(Serialize, Deserialize, Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub inodes: u64,
    pub used_space: u64,
    pub next_inode: u64,
    pub next_slice: u64,
}

#[derive(Serialize, Deserialize)]
struct EndJson {
    end: Summary,
}

struct Dumper<'a> {
    meta: &'a dyn Meta,
    out: &'a mut dyn Write,
    sum: Summary,
    /// Inodes with more than one link already written.
    linked: HashSet<Ino>,
}

impl Dumper<'_> {
    fn record(&mut self, v: &impl Serialize) -> Result<()> {
        serde_json::to_writer(&mut *self.out, v).map_err(|e| io("writing the dump", e))?;
        self.out
            .write_all(b",\n")
            .map_err(|e| io("writing the dump", e))
    }

    fn inode(&mut self, ino: Ino) -> Result<Option<Attr>> {
        let a = match self.meta.getattr(ino) {
            Ok(a) => a,
            // Removed while we walked: a live volume changes under a dump.
            Err(MetaError::Sys(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if a.nlink > 1 && !a.is_dir() && !self.linked.insert(ino) {
            return Ok(None);
        }
        let symlink = if a.typ == FileType::Symlink {
            Some(Bytes::of(&self.meta.readlink(ino)?))
        } else {
            None
        };
        let mut xattrs = Vec::new();
        let names = self.meta.listxattr(ino)?;
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            match self.meta.getxattr(ino, name) {
                Ok(v) => xattrs.push((Bytes::of(name), Bytes::of(&v))),
                Err(MetaError::Sys(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let mut chunks = Vec::new();
        if a.typ == FileType::File && a.length > 0 {
            for idx in 0..=((a.length - 1) / CHUNK_SIZE) as u32 {
                let slices = self.meta.read_chunk(ino, idx)?;
                if slices.is_empty() {
                    continue;
                }
                for s in &slices {
                    self.sum.next_slice = self.sum.next_slice.max(s.id + 1);
                }
                chunks.push((
                    idx,
                    slices
                        .iter()
                        .map(|s| (s.pos, s.id, s.size, s.off, s.len))
                        .collect(),
                ));
            }
            self.sum.used_space += align4k(a.length);
        }
        self.sum.inodes += 1;
        self.sum.next_inode = self.sum.next_inode.max(ino + 1);
        self.record(&InodeJson {
            ino,
            attr: AttrJson::of(&a),
            symlink,
            xattrs,
            chunks,
        })?;
        Ok(Some(a))
    }

    /// The entries of `dir`, in records of at most [`PAGE`].
    fn directory(&mut self, dir: Ino) -> Result<()> {
        let ctx = Context::root();
        let mut after: Vec<u8> = Vec::new();
        loop {
            let page = self.meta.readdir_page(&ctx, dir, &after, PAGE, false)?;
            let Some(last) = page.entries.last() else {
                break;
            };
            after = last.name.clone();
            self.record(&EntriesJson {
                dir,
                entries: page
                    .entries
                    .iter()
                    .map(|e| (Bytes::of(&e.name), e.ino, type_name(e.typ).to_string()))
                    .collect(),
            })?;
            if page.end {
                break;
            }
        }
        Ok(())
    }
}

/// Write the namespace of `meta` to `out`. Secrets in the settings are removed unless
/// `keep_secrets`.
pub fn dump(meta: &dyn Meta, out: &mut dyn Write, keep_secrets: bool) -> Result<Summary> {
    let setting = meta.load_format()?;
    let setting = if keep_secrets {
        setting
    } else {
        setting.redacted()
    };
    let head = format!(
        "{{\"aquifer_dump\":{VERSION},\n\"setting\":{},\n\"records\":[\n",
        serde_json::to_string(&setting).map_err(|e| io("settings", e))?
    );
    out.write_all(head.as_bytes())
        .map_err(|e| io("writing the dump", e))?;
    let mut d = Dumper {
        meta,
        out,
        sum: Summary {
            next_inode: ROOT_INO + 1,
            next_slice: 1,
            ..Default::default()
        },
        linked: HashSet::new(),
    };
    d.inode(ROOT_INO)?;
    d.directory(ROOT_INO)?;
    // Depth first, a page of a directory at a time: (directory, last name walked).
    let ctx = Context::root();
    let mut stack: Vec<(Ino, Vec<u8>)> = vec![(ROOT_INO, Vec::new())];
    while let Some((dir, after)) = stack.last().cloned() {
        let page = match meta.readdir_page(&ctx, dir, &after, 256, false) {
            Ok(p) => p.entries,
            Err(MetaError::Sys(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let Some(last) = page.last() else {
            stack.pop();
            continue;
        };
        if let Some(top) = stack.last_mut() {
            top.1 = last.name.clone();
        }
        let mut subdirs = Vec::new();
        for e in &page {
            if let Some(a) = d.inode(e.ino)? {
                if a.is_dir() {
                    d.directory(e.ino)?;
                    subdirs.push(e.ino);
                }
            }
        }
        for s in subdirs.into_iter().rev() {
            stack.push((s, Vec::new()));
        }
    }
    for (key, data) in meta.journal_list()? {
        d.record(&JournalJson {
            journal: key,
            data: Bytes::of(&data),
        })?;
    }
    let sum = d.sum;
    serde_json::to_writer(&mut *d.out, &EndJson { end: sum })
        .map_err(|e| io("writing the dump", e))?;
    d.out
        .write_all(b"\n]}\n")
        .and_then(|_| d.out.flush())
        .map_err(|e| io("writing the dump", e))?;
    Ok(sum)
}

/// Read a dump into `meta`, which must not be formatted yet. Returns the summary.
pub fn load(meta: &dyn Meta, input: &mut dyn BufRead) -> Result<Summary> {
    match meta.load_format() {
        Err(MetaError::NotFormatted) => {}
        Ok(f) => {
            return Err(MetaError::Config(format!(
                "the target already holds volume {:?}: load only into an empty database",
                f.name
            )))
        }
        Err(e) => return Err(e),
    }
    let mut line = String::new();
    let mut lineno = 0;
    let mut next = |line: &mut String, lineno: &mut usize| -> Result<bool> {
        line.clear();
        *lineno += 1;
        Ok(input
            .read_line(line)
            .map_err(|e| io("reading the dump", e))?
            > 0)
    };
    let bad = |what: &str| MetaError::Config(format!("not an aquifer dump: {what}"));
    next(&mut line, &mut lineno)?;
    if line.trim() != format!("{{\"aquifer_dump\":{VERSION},") {
        return Err(bad("the first line is not {\"aquifer_dump\":1,"));
    }
    next(&mut line, &mut lineno)?;
    let setting = line
        .trim()
        .strip_prefix("\"setting\":")
        .and_then(|s| s.strip_suffix(','))
        .ok_or_else(|| bad("no settings on the second line"))?;
    let mut setting: Format =
        serde_json::from_str(setting).map_err(|e| io("the dump's settings", e))?;
    if setting.secret_key.0 == "removed" {
        eprintln!(
            "the dump has no secret key (dump with --keep-secret-key to carry it): the volume will use the environment's credentials"
        );
        setting.secret_key = Secret::default();
    }
    next(&mut line, &mut lineno)?;
    if line.trim() != "\"records\":[" {
        return Err(bad("no records"));
    }
    meta.format(&setting, false)?;
    let mut end = None;
    while next(&mut line, &mut lineno)? {
        let rec = line.trim().trim_end_matches(',');
        if rec == "]}" {
            break;
        }
        let v: Value =
            serde_json::from_str(rec).map_err(|e| io(&format!("record on line {lineno}"), e))?;
        let parse = |e: serde_json::Error| io(&format!("record on line {lineno}"), e);
        if v.get("ino").is_some() {
            let r: InodeJson = serde_json::from_value(v).map_err(parse)?;
            let mut inode = LoadInode {
                attr: Some(r.attr.attr()?),
                symlink: r.symlink.map(Bytes::into_vec).transpose()?,
                ..Default::default()
            };
            for (n, val) in r.xattrs {
                inode.xattrs.push((n.into_vec()?, val.into_vec()?));
            }
            inode.chunks = r
                .chunks
                .into_iter()
                .map(|(idx, sl)| {
                    (
                        idx,
                        sl.into_iter()
                            .map(|(pos, id, size, off, len)| Slice {
                                pos,
                                id,
                                size,
                                off,
                                len,
                            })
                            .collect(),
                    )
                })
                .collect();
            meta.load_inode(r.ino, &inode)?;
        } else if v.get("dir").is_some() {
            let r: EntriesJson = serde_json::from_value(v).map_err(parse)?;
            let mut entries = Vec::with_capacity(r.entries.len());
            for (name, ino, typ) in r.entries {
                entries.push((name.into_vec()?, ino, type_of(&typ)?));
            }
            meta.load_entries(r.dir, &entries)?;
        } else if v.get("journal").is_some() {
            let r: JournalJson = serde_json::from_value(v).map_err(parse)?;
            let data = r.data.into_vec()?;
            meta.journal_put(&[(r.journal.as_str(), data.as_slice())])?;
        } else if v.get("end").is_some() {
            let r: EndJson = serde_json::from_value(v).map_err(parse)?;
            end = Some(r.end);
        } else {
            return Err(bad(&format!("unknown record on line {lineno}")));
        }
    }
    let sum = end.ok_or_else(|| bad("it ends before its last record (truncated?)"))?;
    meta.load_finish(sum.next_inode, sum.next_slice, sum.used_space, sum.inodes)?;
    meta.sync()?;
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{test_format, test_session};
    use crate::{Chunks, KvMeta, MemKv, Namespace, Sessions, Volume};

    fn tree(m: &dyn Meta) {
        let ctx = Context::root();
        m.format(&test_format(4 << 20), false).unwrap();
        m.new_session(test_session("h")).unwrap();
        let d = m
            .mknod(&ctx, ROOT_INO, b"dir", FileType::Directory, 0o750, 0, 0)
            .unwrap()
            .0;
        let f = m
            .mknod(&ctx, d, "é\nx".as_bytes(), FileType::File, 0o600, 0, 0)
            .unwrap()
            .0;
        let id = m.new_slice_id().unwrap();
        let s = |pos, len| Slice {
            pos,
            id,
            size: 8192,
            off: 0,
            len,
        };
        m.write_slice(f, 0, s(0, 8192)).unwrap();
        m.write_slice(f, 3, s(100, 10)).unwrap();
        m.setxattr(&ctx, f, b"user.bin", &[0, 255, 1], 0).unwrap();
        m.link(&ctx, f, ROOT_INO, b"hard").unwrap();
        m.symlink(&ctx, d, &[b'l', 0xff], b"../hard").unwrap();
        m.mknod(&ctx, d, b"fifo", FileType::Fifo, 0o644, 0, 0)
            .unwrap();
        for i in 0..2500 {
            m.mknod(
                &ctx,
                d,
                format!("n{i}").as_bytes(),
                FileType::File,
                0o644,
                0,
                0,
            )
            .unwrap();
        }
        m.journal_put(&[("chunks/x", b"data")]).unwrap();
    }

    fn dumped(m: &dyn Meta) -> (Vec<u8>, Summary) {
        let mut out = Vec::new();
        let sum = dump(m, &mut out, false).unwrap();
        (out, sum)
    }

    #[test]
    fn a_dump_loads_into_the_same_namespace() {
        let a = KvMeta::new(MemKv::new());
        tree(&a);
        let (first, sum) = dumped(&a);
        assert_eq!(sum.inodes, 2505, "each inode once, hard links included");
        assert!(std::str::from_utf8(&first).is_ok());
        serde_json::from_slice::<Value>(&first).expect("the dump is one JSON document");
        let b = KvMeta::new(MemKv::new());
        let loaded = load(&b, &mut &first[..]).unwrap();
        assert_eq!(loaded, sum);
        let (second, _) = dumped(&b);
        assert_eq!(
            String::from_utf8_lossy(&first),
            String::from_utf8_lossy(&second)
        );
        assert_eq!(a.usage().unwrap(), b.usage().unwrap());
        // New ids never collide with loaded ones.
        b.new_session(test_session("h")).unwrap();
        let ctx = Context::root();
        let (ino, _) = b
            .mknod(&ctx, ROOT_INO, b"new", FileType::File, 0o644, 0, 0)
            .unwrap();
        assert!(ino >= sum.next_inode);
        assert!(b.new_slice_id().unwrap() >= sum.next_slice);
        // Loading twice is refused; a cut dump is refused.
        assert!(load(&b, &mut &first[..]).is_err());
        let c = KvMeta::new(MemKv::new());
        let cut = &first[..first.len() - 200];
        let e = load(&c, &mut &cut[..]).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("record"), "{e}");
    }
}
