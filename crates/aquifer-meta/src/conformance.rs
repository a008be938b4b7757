//! The metadata conformance suite: every engine runs every case.
//!
//! An engine crate calls [`meta_conformance!`](crate::meta_conformance) with an expression that
//! builds a fresh, empty engine; each case becomes its own `#[test]`.

use crate::*;

/// Settings of a throwaway test volume on the memory store.
pub fn test_format(block_size: u32) -> Format {
    Format {
        name: "test".into(),
        uuid: "00000000-0000-0000-0000-000000000000".into(),
        storage: "memory".into(),
        bucket: String::new(),
        block_size,
        capacity: 0,
        inodes: 0,
        compression: String::new(),
        region: String::new(),
        endpoint: String::new(),
        access_key: String::new(),
        secret_key: Default::default(),
        prefix: None,
        meta_version: 1,
    }
}

/// A session record for tests.
pub fn test_session(hostname: &str) -> SessionInfo {
    SessionInfo {
        sid: 0,
        hostname: hostname.into(),
        mount_point: "/m".into(),
        pid: 1,
        version: "t".into(),
        ..Default::default()
    }
}

fn fmt() -> Format {
    test_format(4 << 20)
}

fn ready(m: &dyn Meta) -> Context {
    m.format(&fmt(), false).unwrap();
    m.new_session(test_session("h")).unwrap();
    Context::root()
}

fn errno<T: std::fmt::Debug>(r: Result<T>) -> Errno {
    r.expect_err("expected an error").errno()
}

fn mkfile(m: &dyn Meta, ctx: &Context, parent: Ino, name: &str) -> Ino {
    m.mknod(ctx, parent, name.as_bytes(), FileType::File, 0o644, 0, 0)
        .unwrap()
        .0
}

fn mkdir(m: &dyn Meta, ctx: &Context, parent: Ino, name: &str) -> Ino {
    m.mknod(
        ctx,
        parent,
        name.as_bytes(),
        FileType::Directory,
        0o755,
        0,
        0,
    )
    .unwrap()
    .0
}

fn chmod(m: &dyn Meta, ctx: &Context, ino: Ino, mode: u32) {
    m.setattr(
        ctx,
        ino,
        &SetAttr {
            mode: Some(mode),
            ..Default::default()
        },
    )
    .unwrap();
}

fn names(m: &dyn Meta, ctx: &Context, dir: Ino) -> Vec<String> {
    m.readdir(ctx, dir, false)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect()
}

pub fn format_and_load(m: &dyn Meta) {
    assert!(matches!(m.load_format(), Err(MetaError::NotFormatted)));
    m.format(&fmt(), false).unwrap();
    assert_eq!(m.load_format().unwrap(), fmt());
    assert!(
        m.format(&fmt(), false).is_err(),
        "formatting twice must fail without force"
    );
    // --force may update limits and keys, never what decides how blocks are stored.
    let mut f = fmt();
    f.capacity = 1 << 30;
    f.secret_key = crate::Secret("k2".into());
    m.format(&f, true).unwrap();
    assert_eq!(m.load_format().unwrap().capacity, 1 << 30);
    assert_eq!(m.load_format().unwrap().uuid, fmt().uuid);
    f.compression = "zstd".into();
    assert!(m.format(&f, true).is_err(), "compression is fixed");
    let mut f = fmt();
    f.block_size *= 2;
    assert!(m.format(&f, true).is_err(), "block size is fixed");
    assert!(!format!("{:?}", m.load_format().unwrap()).contains("k2"));
    let root = m.getattr(ROOT_INO).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.nlink, 2);
}

pub fn create_lookup_readdir(m: &dyn Meta) {
    let ctx = ready(m);
    let a = mkfile(m, &ctx, ROOT_INO, "b");
    let d = mkdir(m, &ctx, ROOT_INO, "a");
    assert_ne!(a, d);
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"b").unwrap().0, a);
    assert_eq!(errno(m.lookup(&ctx, ROOT_INO, b"zz")), Errno::ENOENT);
    assert_eq!(
        errno(m.mknod(&ctx, ROOT_INO, b"b", FileType::File, 0o644, 0, 0)),
        Errno::EEXIST
    );
    assert_eq!(names(m, &ctx, ROOT_INO), vec!["a", "b"]);
    assert_eq!(
        m.getattr(ROOT_INO).unwrap().nlink,
        3,
        "subdirectory adds a link"
    );
    assert_eq!(m.lookup(&ctx, d, b"..").unwrap().0, ROOT_INO);
    let long = vec![b'x'; MAX_NAME + 1];
    assert_eq!(
        errno(m.mknod(&ctx, ROOT_INO, &long, FileType::File, 0o644, 0, 0)),
        Errno::ENAMETOOLONG
    );
    let ok = vec![b'x'; MAX_NAME];
    m.mknod(&ctx, ROOT_INO, &ok, FileType::File, 0o644, 0, 0)
        .unwrap();
    assert_eq!(
        errno(m.mknod(&ctx, a, b"c", FileType::File, 0o644, 0, 0)),
        Errno::ENOTDIR
    );
    let plus = m.readdir(&ctx, ROOT_INO, true).unwrap();
    assert!(plus.iter().all(|e| e.attr.is_some()));
    let (_, dev) = m
        .mknod(&ctx, ROOT_INO, b"dev", FileType::CharDev, 0o600, 0, 0x0102)
        .unwrap();
    assert_eq!(dev.rdev, 0x0102);
    assert_eq!(m.usage().unwrap().1, 5);
}

/// Paging through a directory returns every entry once, in name order.
pub fn readdir_in_pages(m: &dyn Meta) {
    let ctx = ready(m);
    let d = mkdir(m, &ctx, ROOT_INO, "big");
    let mut want: Vec<String> = (0..250).map(|i| format!("e{i:04}")).collect();
    for n in &want {
        mkfile(m, &ctx, d, n);
    }
    want.sort();
    let mut got = Vec::new();
    let mut after = Vec::new();
    loop {
        let page = m.readdir_page(&ctx, d, &after, 64, true).unwrap();
        assert!(page.entries.len() <= 64);
        assert!(page.entries.iter().all(|e| e.attr.is_some()));
        if let Some(last) = page.entries.last() {
            after = last.name.clone();
        }
        got.extend(
            page.entries
                .into_iter()
                .map(|e| String::from_utf8(e.name).unwrap()),
        );
        if page.end {
            break;
        }
    }
    assert_eq!(got, want);
    let root = m.readdir_page(&ctx, ROOT_INO, b"", 10, false).unwrap();
    assert_eq!(root.entries[0].name, b"big");
    assert!(root.end);
    // A directory of exactly one page says so on that page.
    let exact = m.readdir_page(&ctx, d, b"", 250, false).unwrap();
    assert_eq!((exact.entries.len(), exact.end), (250, true));
    let more = m.readdir_page(&ctx, d, b"", 249, false).unwrap();
    assert_eq!((more.entries.len(), more.end), (249, false));
}

/// A listing read page by page while entries are removed and created between its pages,
/// on this client (whose engine may serve later pages from what it read for the first):
/// every entry that exists for the whole listing is returned exactly once, in name order,
/// and the listing ends only where the engine says it does. Entries removed meanwhile may
/// be returned (with `plus`, without attributes once their inode is gone); never twice.
pub fn readdir_pages_under_concurrent_change(m: &dyn Meta) {
    let ctx = ready(m);
    let d = mkdir(m, &ctx, ROOT_INO, "busy");
    let name = |i: usize| format!("e{i:04}");
    let n = 600;
    for i in 0..n {
        mkfile(m, &ctx, d, &name(i));
    }
    for plus in [true, false] {
        let mut present: std::collections::BTreeSet<String> = (0..n).map(name).collect();
        let mut created: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut removed: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut got: Vec<String> = Vec::new();
        let mut after: Vec<u8> = Vec::new();
        for round in 0.. {
            assert!(round < 100, "the listing never ended");
            let page = m.readdir_page(&ctx, d, &after, 64, plus).unwrap();
            assert!(page.entries.len() <= 64);
            for e in &page.entries {
                let s = String::from_utf8(e.name.clone()).unwrap();
                if plus && e.attr.is_none() {
                    // Only an entry removed meanwhile may lack its attributes.
                    assert!(removed.contains(&s), "{s} has no attributes");
                }
                got.push(s);
            }
            if let Some(last) = page.entries.last() {
                after = last.name.clone();
            }
            if page.end {
                break;
            }
            // Between pages: remove the whole next page and more (ahead of the cursor),
            // some behind it, and create names ahead of and behind it.
            let ahead: Vec<String> = present
                .range(String::from_utf8(after.clone()).unwrap()..)
                .filter(|s| s.as_bytes() > after.as_slice())
                .take(70)
                .cloned()
                .collect();
            let behind: Vec<String> = present
                .range(..String::from_utf8(after.clone()).unwrap())
                .rev()
                .step_by(5)
                .take(6)
                .cloned()
                .collect();
            for s in ahead
                .iter()
                .step_by(if round % 2 == 0 { 1 } else { 3 })
                .chain(&behind)
            {
                m.unlink(&ctx, d, s.as_bytes()).unwrap();
                present.remove(s);
                removed.insert(s.clone());
            }
            for s in [
                format!("e{:04}-new-{plus}", round * 37 % n),
                format!("{}-new-{plus}", String::from_utf8(after.clone()).unwrap()),
                format!("a-new-{round}-{plus}"),
                format!("z-new-{round}-{plus}"),
            ] {
                if present.insert(s.clone()) {
                    mkfile(m, &ctx, d, &s);
                    created.insert(s);
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &got {
            assert!(seen.insert(s.clone()), "{s} listed twice (plus: {plus})");
        }
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "names in order (plus: {plus})"
        );
        for s in &present {
            if !created.contains(s) {
                assert!(
                    seen.contains(s),
                    "{s} existed all along but was never listed (plus: {plus}): {} of {} listed",
                    got.len(),
                    present.len()
                );
            }
        }
        for s in &got {
            assert!(
                present.contains(s) || removed.contains(s),
                "{s} was never in the directory"
            );
        }
        // Start the next pass from a settled directory: everything left, nothing new.
        for s in present.intersection(&created) {
            m.unlink(&ctx, d, s.as_bytes()).unwrap();
        }
        for s in removed.difference(&created) {
            mkfile(m, &ctx, d, s);
        }
    }
}

pub fn unlink_and_rmdir(m: &dyn Meta) {
    let ctx = ready(m);
    let d = mkdir(m, &ctx, ROOT_INO, "d");
    mkfile(m, &ctx, d, "f");
    assert_eq!(errno(m.rmdir(&ctx, ROOT_INO, b"d")), Errno::ENOTEMPTY);
    assert_eq!(errno(m.unlink(&ctx, ROOT_INO, b"d")), Errno::EISDIR);
    assert_eq!(errno(m.rmdir(&ctx, d, b"f")), Errno::ENOTDIR);
    m.unlink(&ctx, d, b"f").unwrap();
    assert_eq!(errno(m.unlink(&ctx, d, b"f")), Errno::ENOENT);
    m.rmdir(&ctx, ROOT_INO, b"d").unwrap();
    assert_eq!(errno(m.getattr(d)), Errno::ENOENT);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 2);
    assert_eq!(m.usage().unwrap().1, 1);
}

pub fn hard_links(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let d = mkdir(m, &ctx, ROOT_INO, "d");
    assert_eq!(m.link(&ctx, f, d, b"g").unwrap().nlink, 2);
    assert_eq!(errno(m.link(&ctx, d, ROOT_INO, b"dd")), Errno::EPERM);
    assert_eq!(errno(m.link(&ctx, f, ROOT_INO, b"d")), Errno::EEXIST);
    m.unlink(&ctx, ROOT_INO, b"f").unwrap();
    assert_eq!(m.getattr(f).unwrap().nlink, 1);
    m.unlink(&ctx, d, b"g").unwrap();
    assert_eq!(errno(m.getattr(f)), Errno::ENOENT);
}

pub fn open_unlinked_kept_until_close(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let id = m.new_slice_id().unwrap();
    m.write_slice(
        f,
        0,
        Slice {
            pos: 0,
            id,
            size: 10,
            off: 0,
            len: 10,
        },
    )
    .unwrap();
    m.open(&ctx, f, libc::O_RDWR).unwrap();
    m.unlink(&ctx, ROOT_INO, b"f").unwrap();
    let a = m.getattr(f).unwrap();
    assert_eq!((a.nlink, a.length), (0, 10));
    assert_eq!(m.read_chunk(f, 0).unwrap().len(), 1);
    assert!(m.trash_batch(0, 10).unwrap().is_empty());
    m.close(f).unwrap();
    assert_eq!(errno(m.getattr(f)), Errno::ENOENT);
    let trash = m.trash_batch(0, 10).unwrap();
    assert_eq!(trash.len(), 1);
    assert_eq!(trash[0].1[0].id, id);
    m.trash_done(trash[0].0).unwrap();
    assert!(m.trash_batch(0, 10).unwrap().is_empty());
}

fn spared(m: &dyn Meta, id: u64) -> bool {
    m.live_slice_ranges()
        .unwrap()
        .iter()
        .any(|r| r.contains(&id))
}

/// gc's view of a session's slice ids: an id is spared from its allocation until it is
/// committed or abandoned, and every allocated id is below the limit.
pub fn slice_ids_spared_until_committed(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let s = data_slice(m, 10);
    let dropped = m.new_slice_id().unwrap();
    let kept = m.new_slice_id().unwrap();
    assert!(m.slice_id_limit().unwrap() > kept);
    for id in [s.id, kept, dropped] {
        assert!(spared(m, id), "{id} is spared before its commit");
    }
    m.write_slice(f, 0, s).unwrap();
    m.abandon_slice_ids(&[dropped]);
    // The record follows at the next heartbeat; until then it only spares more.
    m.heartbeat().unwrap();
    assert!(!spared(m, s.id), "a committed id is not spared");
    assert!(!spared(m, dropped), "an abandoned id is not spared");
    assert!(spared(m, kept), "an id still open is spared");
    let later = m.new_slice_id().unwrap();
    assert!(spared(m, later));
    m.close_session().unwrap();
    assert!(
        m.live_slice_ranges().unwrap().is_empty(),
        "a closed session spares nothing"
    );
}

/// Trash records carry the engine's time, so their age is measured on one clock.
pub fn trash_records_carry_engine_time(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let before = m.clock().unwrap();
    m.write_slice(f, 0, data_slice(m, 10)).unwrap();
    m.unlink(&ctx, ROOT_INO, b"f").unwrap();
    let after = m.clock().unwrap();
    let trash = m.trash_batch(0, 10).unwrap();
    let at = trash[0].2.expect("a new trash record has a time");
    // Stored in milliseconds.
    let ms = |t: Time| t.sec as i128 * 1000 + t.nsec as i128 / 1_000_000;
    assert!(
        ms(before) <= ms(at) && ms(at) <= ms(after),
        "{before:?} <= {at:?} <= {after:?}"
    );
}

pub fn create_open_counts_an_open(m: &dyn Meta) {
    let ctx = ready(m);
    let (f, a) = m.create_open(&ctx, ROOT_INO, b"c", 0o640, 0o022).unwrap();
    assert_eq!((a.typ, a.mode, a.nlink), (FileType::File, 0o640, 1));
    assert_eq!(
        errno(m.create_open(&ctx, ROOT_INO, b"c", 0o640, 0)),
        Errno::EEXIST
    );
    m.unlink(&ctx, ROOT_INO, b"c").unwrap();
    assert_eq!(m.getattr(f).unwrap().nlink, 0, "kept: it is open");
    m.close(f).unwrap();
    assert_eq!(errno(m.getattr(f)), Errno::ENOENT);
}

pub fn rename_cases(m: &dyn Meta) {
    let ctx = ready(m);
    let a = mkdir(m, &ctx, ROOT_INO, "a");
    let b = mkdir(m, &ctx, a, "b");
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let g = mkfile(m, &ctx, ROOT_INO, "g");
    // A directory into its own subtree.
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"a", b, b"x", 0)),
        Errno::EINVAL
    );
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"a", a, b"x", 0)),
        Errno::EINVAL
    );
    // Replace a file.
    m.rename(&ctx, ROOT_INO, b"f", ROOT_INO, b"g", 0).unwrap();
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"g").unwrap().0, f);
    assert_eq!(errno(m.getattr(g)), Errno::ENOENT);
    // NOREPLACE.
    let h = mkfile(m, &ctx, ROOT_INO, "h");
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"h", ROOT_INO, b"g", RENAME_NOREPLACE)),
        Errno::EEXIST
    );
    // EXCHANGE across directories, file with directory.
    m.rename(&ctx, ROOT_INO, b"h", a, b"b", RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(m.lookup(&ctx, a, b"b").unwrap().0, h);
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"h").unwrap().0, b);
    assert_eq!(m.getattr(b).unwrap().parent, ROOT_INO);
    assert_eq!(m.getattr(a).unwrap().nlink, 2);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 4);
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"g", ROOT_INO, b"none", RENAME_EXCHANGE)),
        Errno::ENOENT
    );
    // Directory over file and file over directory.
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"h", ROOT_INO, b"g", 0)),
        Errno::ENOTDIR
    );
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"g", ROOT_INO, b"h", 0)),
        Errno::EISDIR
    );
    // Directory over an empty directory, then over a non-empty one.
    let e = mkdir(m, &ctx, ROOT_INO, "e");
    m.rename(&ctx, ROOT_INO, b"h", ROOT_INO, b"e", 0).unwrap();
    assert_eq!(errno(m.getattr(e)), Errno::ENOENT);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 4);
    mkfile(m, &ctx, ROOT_INO, "x");
    m.rename(&ctx, ROOT_INO, b"x", a, b"x", 0).unwrap();
    assert_eq!(
        errno(m.rename(&ctx, ROOT_INO, b"e", ROOT_INO, b"a", 0)),
        Errno::ENOTEMPTY
    );
    // Directory across parents updates both link counts.
    m.rename(&ctx, ROOT_INO, b"e", a, b"e2", 0).unwrap();
    assert_eq!(m.getattr(a).unwrap().nlink, 3);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 3);
    assert_eq!(m.lookup(&ctx, a, b"e2").unwrap().1.parent, a);
    // Renaming onto itself is a no-op.
    m.rename(&ctx, ROOT_INO, b"g", ROOT_INO, b"g", 0).unwrap();
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"g").unwrap().0, f);
}

pub fn symlinks(m: &dyn Meta) {
    let ctx = ready(m);
    let (s, a) = m.symlink(&ctx, ROOT_INO, b"l", b"/some/where").unwrap();
    assert_eq!(a.typ, FileType::Symlink);
    assert_eq!(a.length, 11);
    assert_eq!(m.readlink(s).unwrap(), b"/some/where");
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    assert_eq!(errno(m.readlink(f)), Errno::EINVAL);
}

pub fn xattrs(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    assert_eq!(errno(m.getxattr(f, b"user.a")), Errno::ENODATA);
    m.setxattr(&ctx, f, b"user.a", b"1", 0).unwrap();
    assert_eq!(
        errno(m.setxattr(&ctx, f, b"user.a", b"2", XATTR_CREATE)),
        Errno::EEXIST
    );
    assert_eq!(
        errno(m.setxattr(&ctx, f, b"user.b", b"2", XATTR_REPLACE)),
        Errno::ENODATA
    );
    m.setxattr(&ctx, f, b"user.a", b"3", XATTR_REPLACE).unwrap();
    m.setxattr(&ctx, f, b"trusted.t", b"", 0).unwrap();
    assert_eq!(m.getxattr(f, b"user.a").unwrap(), b"3");
    assert_eq!(m.listxattr(f).unwrap(), b"trusted.t\0user.a\0");
    assert_eq!(
        errno(m.setxattr(&ctx, f, b"bogus.a", b"", 0)),
        Errno::EOPNOTSUPP
    );
    let big = vec![0u8; MAX_XATTR_VALUE + 1];
    assert_eq!(
        errno(m.setxattr(&ctx, f, b"user.big", &big, 0)),
        Errno::E2BIG
    );
    let long = [b"user.".to_vec(), vec![b'n'; 300]].concat();
    assert_eq!(errno(m.setxattr(&ctx, f, &long, b"", 0)), Errno::ERANGE);
    m.removexattr(&ctx, f, b"user.a").unwrap();
    assert_eq!(errno(m.removexattr(&ctx, f, b"user.a")), Errno::ENODATA);
}

pub fn slices_and_truncate(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let s1 = Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: 100,
        off: 0,
        len: 100,
    };
    let (a, n) = m.write_slice(f, 0, s1).unwrap();
    assert_eq!((a.length, n), (100, 1));
    // A writer that could not learn whether its commit applied commits the slice again:
    // it is listed once.
    let (a, n) = m.write_slice(f, 0, s1).unwrap();
    assert_eq!((a.length, n), (100, 1));
    assert_eq!(m.read_chunk(f, 0).unwrap(), vec![s1]);
    let s2 = Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: 10,
        off: 0,
        len: 10,
    };
    assert_ne!(s1.id, s2.id);
    m.write_slice(f, 2, s2).unwrap();
    assert_eq!(m.getattr(f).unwrap().length, 2 * CHUNK_SIZE + 10);
    // Shrink into chunk 0: chunk 2 goes to the trash, chunk 0 is clamped at the new end.
    let a = m.truncate(&ctx, f, 50).unwrap();
    assert_eq!(a.length, 50);
    assert!(m.read_chunk(f, 2).unwrap().is_empty());
    let c0 = m.read_chunk(f, 0).unwrap();
    assert_eq!(c0, vec![Slice { len: 50, ..s1 }]);
    let trash = m.trash_batch(0, 10).unwrap();
    assert_eq!(trash.len(), 1);
    assert_eq!(trash[0].1, vec![s2]);
    // Compaction replaces a prefix only while it is unchanged.
    let new = Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: 50,
        off: 0,
        len: 50,
    };
    assert!(!m.compact_chunk(f, 0, &[s2], &[new]).unwrap());
    assert!(m.compact_chunk(f, 0, &c0, &[new]).unwrap());
    assert_eq!(m.read_chunk(f, 0).unwrap(), vec![new]);
    assert_eq!(
        m.truncate(&ctx, ROOT_INO, 0).unwrap_err().errno(),
        Errno::EISDIR
    );
    // Punch a hole: zero slice, size kept.
    let a = m
        .fallocate(&ctx, f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 20)
        .unwrap();
    assert_eq!(a.length, 50);
    assert_eq!(
        m.read_chunk(f, 0).unwrap().last(),
        Some(&Slice::zero(10, 20))
    );
    assert_eq!(
        errno(m.fallocate(&ctx, f, FALLOC_FL_PUNCH_HOLE, 0, 1)),
        Errno::EOPNOTSUPP
    );
    let a = m.fallocate(&ctx, f, 0, 0, 5000).unwrap();
    assert_eq!(a.length, 5000);
    let a = m.fallocate(&ctx, f, FALLOC_FL_KEEP_SIZE, 0, 9000).unwrap();
    assert_eq!(a.length, 5000);
    assert_eq!(m.usage().unwrap().0, 8192);
}

/// gc and fsck page through every chunk; trash pages go past records still pending.
pub fn chunk_and_trash_paging(m: &dyn Meta) {
    let ctx = ready(m);
    let mut want = Vec::new();
    for name in ["a", "b", "c"] {
        let f = mkfile(m, &ctx, ROOT_INO, name);
        for idx in [0u32, 3] {
            let s = Slice {
                pos: 0,
                id: m.new_slice_id().unwrap(),
                size: 10,
                off: 0,
                len: 10,
            };
            m.write_slice(f, idx, s).unwrap();
            want.push((f, idx, vec![s]));
        }
    }
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = m.scan_chunks(after, 4).unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.0, last.1));
        got.extend(page);
    }
    assert_eq!(got, want);
    // Two trash records; a batch after the first returns only the second.
    m.unlink(&ctx, ROOT_INO, b"a").unwrap();
    m.unlink(&ctx, ROOT_INO, b"b").unwrap();
    let all = m.trash_batch(0, 10).unwrap();
    assert_eq!(all.len(), 2);
    let rest = m.trash_batch(all[0].0, 10).unwrap();
    assert_eq!(rest, all[1..].to_vec());
}

/// Journaled objects come back in key order, a put replaces, a remove forgets, and the
/// journal is apart from the namespace (statfs does not count it).
pub fn object_journal(m: &dyn Meta) {
    let _ctx = ready(m);
    let before = m.statfs().unwrap();
    let used = m.usage().unwrap();
    assert!(m.journal_list().unwrap().is_empty());
    let big = vec![7u8; 300_000];
    m.journal_put(&[("vol/chunks/2", b"two"), ("vol/chunks/1", &big)])
        .unwrap();
    m.journal_put(&[("vol/chunks/2", b"again")]).unwrap();
    m.sync().unwrap();
    let got = m.journal_list().unwrap();
    assert_eq!(
        got,
        vec![
            ("vol/chunks/1".to_string(), big.clone()),
            ("vol/chunks/2".to_string(), b"again".to_vec()),
        ]
    );
    // More than one page of records.
    let names: Vec<String> = (0..600).map(|i| format!("p/{i:04}")).collect();
    let recs: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    m.journal_put(&recs).unwrap();
    assert_eq!(m.journal_list().unwrap().len(), 602);
    m.journal_remove(&names).unwrap();
    m.journal_remove(&["vol/chunks/1".to_string(), "missing".to_string()])
        .unwrap();
    assert_eq!(
        m.journal_list().unwrap(),
        vec![("vol/chunks/2".to_string(), b"again".to_vec())]
    );
    assert_eq!(m.statfs().unwrap().used_inodes, before.used_inodes);
    assert_eq!(m.usage().unwrap(), used);
}

pub fn setattr_rules(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let a = m
        .setattr(
            &ctx,
            f,
            &SetAttr {
                mode: Some(0o6755),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mode, 0o6755);
    let a = m
        .setattr(
            &ctx,
            f,
            &SetAttr {
                uid: Some(5),
                gid: Some(6),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((a.uid, a.gid), (5, 6));
    assert_eq!(
        a.mode, 0o755,
        "chown clears setuid and setgid on executables"
    );
    let tm = Time {
        sec: 1_000_000_000,
        nsec: 123_456_789,
    };
    let a = m
        .setattr(
            &ctx,
            f,
            &SetAttr {
                mtime: Some(SetTime::At(tm)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mtime, tm);
    let user = Context {
        uid: 7,
        gid: 7,
        check_permission: true,
        ..Default::default()
    };
    assert_eq!(
        errno(m.setattr(
            &user,
            f,
            &SetAttr {
                mode: Some(0o777),
                ..Default::default()
            }
        )),
        Errno::EPERM
    );
    // The root directory is world-writable.
    m.mknod(&user, ROOT_INO, b"x", FileType::File, 0o644, 0, 0)
        .unwrap();
}

pub fn permissions(m: &dyn Meta) {
    let ctx = ready(m);
    let d = mkdir(m, &ctx, ROOT_INO, "d");
    chmod(m, &ctx, d, 0o1777);
    let alice = Context {
        uid: 100,
        gid: 100,
        check_permission: true,
        ..Default::default()
    };
    let bob = Context {
        uid: 200,
        gid: 200,
        gids: vec![300],
        check_permission: true,
        ..Default::default()
    };
    let (fa, _) = m
        .mknod(&alice, d, b"a", FileType::File, 0o640, 0, 0)
        .unwrap();
    // Sticky directory: bob cannot remove alice's file.
    assert_eq!(errno(m.unlink(&bob, d, b"a")), Errno::EPERM);
    assert_eq!(errno(m.open(&bob, fa, libc::O_RDONLY)), Errno::EACCES);
    // Supplementary group grants group access.
    m.setattr(
        &ctx,
        fa,
        &SetAttr {
            gid: Some(300),
            ..Default::default()
        },
    )
    .unwrap();
    m.open(&bob, fa, libc::O_RDONLY).unwrap();
    m.close(fa).unwrap();
    assert_eq!(errno(m.open(&bob, fa, libc::O_WRONLY)), Errno::EACCES);
    m.unlink(&alice, d, b"a").unwrap();
    let priv_dir = mkdir(m, &ctx, ROOT_INO, "p");
    assert_eq!(
        errno(m.mknod(&alice, priv_dir, b"x", FileType::File, 0o644, 0, 0)),
        Errno::EACCES
    );
}

pub fn sessions_clean_up_after_dead_clients(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    m.open(&ctx, f, libc::O_RDONLY).unwrap();
    m.unlink(&ctx, ROOT_INO, b"f").unwrap();
    assert_eq!(m.list_sessions().unwrap().len(), 1);
    // A new session on an exclusive engine knows the old one is gone.
    m.new_session(test_session("h2")).unwrap();
    assert_eq!(errno(m.getattr(f)), Errno::ENOENT);
    let s = m.list_sessions().unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].hostname, "h2");
    m.heartbeat().unwrap();
    m.close_session().unwrap();
    assert!(m.list_sessions().unwrap().is_empty());
}

pub fn statfs_counts(m: &dyn Meta) {
    let _ = ready(m);
    let s = m.statfs().unwrap();
    assert_eq!(s.used_inodes, 1);
    assert!(s.avail_space > 0);
    let mut f = fmt();
    f.capacity = 1 << 20;
    f.inodes = 3;
    m.format(&f, true).unwrap();
    let ctx = Context::root();
    let s = m.statfs().unwrap();
    assert_eq!(s.total_space, 1 << 20);
    let file = mkfile(m, &ctx, ROOT_INO, "a");
    mkfile(m, &ctx, ROOT_INO, "b");
    assert_eq!(
        errno(m.mknod(&ctx, ROOT_INO, b"c", FileType::File, 0o644, 0, 0)),
        Errno::ENOSPC
    );
    let big = Slice {
        pos: 0,
        id: 9,
        size: 2 << 20,
        off: 0,
        len: 2 << 20,
    };
    assert_eq!(errno(m.write_slice(file, 0, big)), Errno::ENOSPC);
}

pub fn posix_and_bsd_locks(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let lk = |typ, start, end| PLock {
        typ,
        start,
        end,
        pid: 1,
    };
    m.setlk(f, 1, &lk(F_WRLCK, 0, 99)).unwrap();
    assert_eq!(errno(m.setlk(f, 2, &lk(F_RDLCK, 50, 60))), Errno::EAGAIN);
    assert_eq!(
        m.getlk(f, 2, &lk(F_RDLCK, 50, 60)).unwrap(),
        Some(lk(F_WRLCK, 0, 99))
    );
    assert_eq!(
        m.getlk(f, 1, &lk(F_WRLCK, 0, 10)).unwrap(),
        None,
        "own locks never conflict"
    );
    // Unlocking the middle splits the lock in two.
    m.setlk(f, 1, &lk(F_UNLCK, 40, 59)).unwrap();
    m.setlk(f, 2, &lk(F_WRLCK, 40, 59)).unwrap();
    assert_eq!(errno(m.setlk(f, 2, &lk(F_RDLCK, 60, 60))), Errno::EAGAIN);
    // Shared locks coexist.
    m.setlk(f, 3, &lk(F_RDLCK, 200, u64::MAX)).unwrap();
    m.setlk(f, 4, &lk(F_RDLCK, 300, 400)).unwrap();
    assert_eq!(errno(m.setlk(f, 4, &lk(F_WRLCK, 300, 400))), Errno::EAGAIN);
    m.release_locks(f, 3).unwrap();
    m.setlk(f, 4, &lk(F_WRLCK, 300, 400)).unwrap();
    assert_eq!(errno(m.setlk(f, 1, &lk(9, 0, 1))), Errno::EINVAL);
    // BSD locks.
    m.flock(f, 1, F_RDLCK).unwrap();
    m.flock(f, 2, F_RDLCK).unwrap();
    assert_eq!(errno(m.flock(f, 1, F_WRLCK)), Errno::EAGAIN);
    m.flock(f, 2, F_UNLCK).unwrap();
    m.flock(f, 1, F_WRLCK).unwrap();
    assert_eq!(errno(m.flock(f, 3, F_RDLCK)), Errno::EAGAIN);
    m.release_locks(f, 1).unwrap();
    m.flock(f, 3, F_WRLCK).unwrap();
}

/// Commits whose answers are lost (`crate::fault`): each operation reports what its one
/// application did — never ENOENT or EEXIST for its own change, never a change made twice
/// (an exchange swapped back, a slice appended twice, a compaction taken for a lost race).
pub fn lost_answers<E: KvEngine>(m: &KvMeta<crate::fault::LossyKv<E>>) {
    use crate::fault::Fault::{AppliedLost, Late, NotApplied};
    let lossy = m.engine_ref();
    let ctx = ready(m);
    let a = mkdir(m, &ctx, ROOT_INO, "a");
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let g = mkfile(m, &ctx, a, "g");
    for (round, fault) in [AppliedLost, NotApplied].into_iter().enumerate() {
        let before = lossy.injected();
        // An exchange applied once, answered once.
        lossy.force(&[fault]);
        m.rename(&ctx, ROOT_INO, b"f", a, b"g", RENAME_EXCHANGE)
            .unwrap();
        assert_eq!(lossy.injected(), before + 1, "{fault:?} was injected");
        assert_eq!(m.lookup(&ctx, ROOT_INO, b"f").unwrap().0, g, "{fault:?}");
        assert_eq!(m.lookup(&ctx, a, b"g").unwrap().0, f, "{fault:?}");
        // Swap back to where the next round starts.
        m.rename(&ctx, ROOT_INO, b"f", a, b"g", RENAME_EXCHANGE)
            .unwrap();
        // Link, rename, unlink: each reports success for its own change.
        lossy.force(&[fault]);
        m.link(&ctx, f, ROOT_INO, b"f2").unwrap();
        assert_eq!(m.getattr(f).unwrap().nlink, 2, "{fault:?}");
        lossy.force(&[fault]);
        m.rename(&ctx, ROOT_INO, b"f2", a, b"f3", 0).unwrap();
        lossy.force(&[fault]);
        m.unlink(&ctx, a, b"f3").unwrap();
        assert_eq!(m.getattr(f).unwrap().nlink, 1, "{fault:?}");
        assert_eq!(errno(m.lookup(&ctx, a, b"f3")), Errno::ENOENT);
        // A create is made once.
        lossy.force(&[fault]);
        let d = mkdir(m, &ctx, ROOT_INO, &format!("d{round}"));
        assert_eq!(m.getattr(d).unwrap().typ, FileType::Directory);
        lossy.force(&[fault]);
        m.rmdir(&ctx, ROOT_INO, format!("d{round}").as_bytes())
            .unwrap();
        // A slice is appended once, and the length and usage grow once.
        let (used, _) = m.usage().unwrap();
        let s1 = Slice {
            pos: 0,
            id: m.new_slice_id().unwrap(),
            size: 4096,
            off: 0,
            len: 4096,
        };
        lossy.force(&[fault]);
        let (attr, n) = m.write_slice(f, 1, s1).unwrap();
        assert_eq!(n, 1, "{fault:?}: one slice");
        assert_eq!(attr.length, CHUNK_SIZE + 4096);
        assert_eq!(m.read_chunk_fresh(f, 1).unwrap(), vec![s1]);
        let s2 = Slice {
            id: m.new_slice_id().unwrap(),
            ..s1
        };
        m.write_slice(f, 1, s2).unwrap();
        // A compaction applied once says so: the caller keeps its new slice.
        let new = Slice {
            id: m.new_slice_id().unwrap(),
            ..s1
        };
        let trash_before = m.trash_batch(0, 1000).unwrap().len();
        lossy.force(&[fault]);
        assert!(
            m.compact_chunk(f, 1, &[s1, s2], &[new]).unwrap(),
            "{fault:?}"
        );
        assert_eq!(m.read_chunk_fresh(f, 1).unwrap(), vec![new]);
        let trash = m.trash_batch(0, 1000).unwrap();
        assert_eq!(
            trash.len(),
            trash_before + 1,
            "{fault:?}: the old slices trashed once"
        );
        // Truncate back: usage is as before.
        lossy.force(&[fault]);
        m.truncate(&ctx, f, 0).unwrap();
        assert_eq!(m.usage().unwrap().0, used, "{fault:?}");
    }
    // A commit that arrives after its client gave up on it applies nothing.
    lossy.force(&[Late]);
    let l = mkdir(m, &ctx, ROOT_INO, "late");
    assert!(
        !lossy.deliver_late().unwrap(),
        "a fenced commit must not apply"
    );
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"late").unwrap().0, l);
    assert_eq!(names(m, &ctx, ROOT_INO), ["a", "f", "late"]);
    m.sync().unwrap();
    // A failover to a replica that never got the last commit: the next sync cannot vouch
    // for it and fails, and so does every fsync and close after it (until a remount).
    lossy.keep_undo();
    mkdir(m, &ctx, ROOT_INO, "lost");
    lossy.fail_over(1).unwrap();
    assert_eq!(errno(m.lookup(&ctx, ROOT_INO, b"lost")), Errno::ENOENT);
    assert_eq!(
        errno(m.sync()),
        Errno::EIO,
        "a sync after a failover that lost a change"
    );
    assert_eq!(errno(m.sync_on_close()), Errno::EIO);
    mkdir(m, &ctx, ROOT_INO, "after");
    assert_eq!(
        errno(m.sync()),
        Errno::EIO,
        "still: the mount vouches for nothing"
    );
}

/// A failover that lost a commit whose answer was lost too: the fence finds the lane
/// behind, so whether the change applied cannot be known. The operation fails (it is not
/// run again on a history it cannot see) and the mount's fsyncs fail from then on.
pub fn lost_answer_across_a_failover<E: KvEngine>(m: &KvMeta<crate::fault::LossyKv<E>>) {
    use crate::fault::Fault::LostInFailover;
    let lossy = m.engine_ref();
    let ctx = ready(m);
    lossy.keep_undo();
    mkdir(m, &ctx, ROOT_INO, "a");
    // "b" is applied, its answer lost, then the failover loses it and "a".
    lossy.force(&[LostInFailover(1)]);
    let r = m.mknod(&ctx, ROOT_INO, b"b", FileType::Directory, 0o755, 0, 0);
    assert_eq!(errno(r), Errno::EIO, "an outcome that cannot be known");
    assert_eq!(errno(m.sync()), Errno::EIO);
}

/// Expand to one `#[test]` per conformance case, each on a fresh engine from `$make`, an
/// expression giving `(meta, guard)`; the guard (a temp dir, a server) lives for the case.
#[macro_export]
macro_rules! meta_conformance {
    ($make:expr) => {
        $crate::meta_conformance!(@cases $make;
            format_and_load, create_lookup_readdir, readdir_in_pages,
            readdir_pages_under_concurrent_change, unlink_and_rmdir, hard_links,
            open_unlinked_kept_until_close, rename_cases, symlinks, xattrs,
            slices_and_truncate, chunk_and_trash_paging, setattr_rules, permissions,
            statfs_counts, posix_and_bsd_locks, object_journal, create_open_counts_an_open,
            slice_ids_spared_until_committed, trash_records_carry_engine_time);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let (m, _guard) = $make;
                $crate::conformance::$case(&m);
            }
        )*
    };
}

/// The case of [`lost_answers`]: `$make` gives `(meta, guard)` where `meta` is a
/// [`KvMeta`] over a [`crate::fault::LossyKv`].
#[macro_export]
macro_rules! meta_conformance_lossy {
    ($make:expr) => {
        #[test]
        fn lost_answers() {
            let (m, _guard) = $make;
            $crate::conformance::lost_answers(&m);
        }

        #[test]
        fn lost_answer_across_a_failover() {
            let (m, _guard) = $make;
            $crate::conformance::lost_answer_across_a_failover(&m);
        }
    };
}

/// The seed of the fault schedule of the suite's lossy runs: `AQUIFER_FAULT_SEED`, or 1.
pub fn fault_seed() -> u64 {
    std::env::var("AQUIFER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The cases of engines only one process can open: a new session knows every older one is
/// dead.
#[macro_export]
macro_rules! meta_conformance_exclusive {
    ($make:expr) => {
        $crate::meta_conformance!(@cases $make; sessions_clean_up_after_dead_clients);
    };
}

/// The cases of engines many clients share: `$make` gives `(a, b, guard)`, two clients of
/// one fresh volume whose sessions time out after [`SHARED_SESSION_TIMEOUT`].
#[macro_export]
macro_rules! meta_conformance_shared {
    ($make:expr) => {
        $crate::meta_conformance_shared!(@cases $make;
            two_clients_one_tree, unlink_elsewhere_keeps_open_file, locks_across_clients,
            dead_session_is_cleaned_up, concurrent_creates_and_counters,
            rename_races_keep_tree_consistent, slice_lists_fresh_at_open,
            stale_guesses_are_caught, live_sessions_slice_ids_seen_by_all);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let (a, b, _guard) = $make;
                $crate::conformance::$case(&a, &b);
            }
        )*
    };
}

/// The session timeout the shared cases expect their clients to have.
pub const SHARED_SESSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Format the volume through `a` and open a session on each client.
fn ready2(a: &dyn Meta, b: &dyn Meta) -> Context {
    a.format(&fmt(), false).unwrap();
    a.new_session(test_session("a")).unwrap();
    b.new_session(test_session("b")).unwrap();
    Context::root()
}

fn data_slice(m: &dyn Meta, len: u32) -> Slice {
    Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: len,
        off: 0,
        len,
    }
}

pub fn two_clients_one_tree(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    assert_eq!(b.load_format().unwrap().name, fmt().name);
    let d = mkdir(a, &ctx, ROOT_INO, "d");
    let f = mkfile(a, &ctx, d, "f");
    assert_eq!(b.lookup(&ctx, d, b"f").unwrap().0, f);
    a.write_slice(f, 0, data_slice(a, 100)).unwrap();
    // What one client committed, the other reads at once (no cache in this layer).
    assert_eq!(b.getattr(f).unwrap().length, 100);
    assert_eq!(b.read_chunk(f, 0).unwrap().len(), 1);
    b.rename(&ctx, d, b"f", ROOT_INO, b"g", 0).unwrap();
    assert_eq!(errno(a.lookup(&ctx, d, b"f")), Errno::ENOENT);
    assert_eq!(a.lookup(&ctx, ROOT_INO, b"g").unwrap().0, f);
    b.setxattr(&ctx, f, b"user.k", b"v", 0).unwrap();
    assert_eq!(a.getxattr(f, b"user.k").unwrap(), b"v".to_vec());
    assert_eq!(names(a, &ctx, ROOT_INO), ["d", "g"]);
    assert_eq!(
        errno(b.mknod(&ctx, ROOT_INO, b"g", FileType::File, 0o644, 0, 0)),
        Errno::EEXIST
    );
    let sessions = a.list_sessions().unwrap();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    // A directory's times may lag a change in it by 5 ms on a shared engine, no more.
    let before = a.getattr(d).unwrap().mtime;
    std::thread::sleep(std::time::Duration::from_millis(10));
    mkfile(b, &ctx, d, "later");
    assert!(
        a.getattr(d).unwrap().mtime > before,
        "a create moves the directory's mtime"
    );
}

pub fn unlink_elsewhere_keeps_open_file(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let f = mkfile(a, &ctx, ROOT_INO, "f");
    let s = data_slice(a, 10);
    a.write_slice(f, 0, s).unwrap();
    b.open(&ctx, f, libc::O_RDONLY).unwrap();
    a.unlink(&ctx, ROOT_INO, b"f").unwrap();
    // B still reads it; nothing went to the trash.
    assert_eq!(b.getattr(f).unwrap().nlink, 0);
    assert_eq!(b.read_chunk(f, 0).unwrap(), vec![s]);
    assert!(a.trash_batch(0, 10).unwrap().is_empty());
    // Opened on A too, closed on B first: A's open keeps it.
    a.open(&ctx, f, libc::O_RDONLY).unwrap();
    b.close(f).unwrap();
    assert_eq!(a.read_chunk(f, 0).unwrap(), vec![s]);
    a.close(f).unwrap();
    assert_eq!(errno(b.getattr(f)), Errno::ENOENT);
    let trash = b.trash_batch(0, 10).unwrap();
    assert_eq!(trash.len(), 1);
    assert_eq!(trash[0].1, vec![s]);
    // An inode count and the space went with it.
    assert_eq!(a.usage().unwrap(), (0, 1));
}

pub fn locks_across_clients(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let f = mkfile(a, &ctx, ROOT_INO, "f");
    let lk = |typ, start, end| PLock {
        typ,
        start,
        end,
        pid: 7,
    };
    // The same owner number on two clients is two owners.
    a.setlk(f, 1, &lk(F_WRLCK, 0, 9)).unwrap();
    assert_eq!(errno(b.setlk(f, 1, &lk(F_WRLCK, 5, 5))), Errno::EAGAIN);
    assert_eq!(
        b.getlk(f, 1, &lk(F_RDLCK, 0, 0)).unwrap(),
        Some(lk(F_WRLCK, 0, 9))
    );
    b.setlk(f, 1, &lk(F_WRLCK, 10, 19)).unwrap();
    a.release_locks(f, 1).unwrap();
    b.setlk(f, 1, &lk(F_WRLCK, 0, 9)).unwrap();
    a.flock(f, 3, F_WRLCK).unwrap();
    assert_eq!(errno(b.flock(f, 3, F_RDLCK)), Errno::EAGAIN);
    a.flock(f, 3, F_UNLCK).unwrap();
    b.flock(f, 3, F_RDLCK).unwrap();
    a.flock(f, 4, F_RDLCK).unwrap();
    assert_eq!(errno(a.flock(f, 4, F_WRLCK)), Errno::EAGAIN);
    // A closed session's locks are gone.
    b.close_session().unwrap();
    a.flock(f, 4, F_WRLCK).unwrap();
    a.setlk(f, 2, &lk(F_WRLCK, 0, u64::MAX)).unwrap();
}

/// What one client may still commit, another's gc spares; not after the session ends.
pub fn live_sessions_slice_ids_seen_by_all(a: &dyn Meta, b: &dyn Meta) {
    ready2(a, b);
    let id = a.new_slice_id().unwrap();
    assert!(b.slice_id_limit().unwrap() > id);
    assert!(spared(b, id), "another client's open id is spared");
    a.close_session().unwrap();
    assert!(!spared(b, id), "a session that ended spares nothing");
}

pub fn dead_session_is_cleaned_up(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let f = mkfile(a, &ctx, ROOT_INO, "f");
    let s = data_slice(a, 10);
    a.write_slice(f, 0, s).unwrap();
    a.open(&ctx, f, libc::O_RDWR).unwrap();
    a.setlk(
        f,
        1,
        &PLock {
            typ: F_WRLCK,
            start: 0,
            end: u64::MAX,
            pid: 1,
        },
    )
    .unwrap();
    a.flock(f, 1, F_WRLCK).unwrap();
    b.unlink(&ctx, ROOT_INO, b"f").unwrap();
    assert_eq!(errno(b.flock(f, 2, F_RDLCK)), Errno::EAGAIN);
    // B keeps heartbeating, A stops (as after kill -9).
    b.heartbeat().unwrap();
    assert!(b.getattr(f).is_ok(), "a live session's open file is kept");
    let wait = SHARED_SESSION_TIMEOUT + std::time::Duration::from_millis(1500);
    std::thread::sleep(wait);
    b.heartbeat().unwrap();
    let left: Vec<String> = b
        .list_sessions()
        .unwrap()
        .into_iter()
        .map(|s| s.hostname)
        .collect();
    assert_eq!(left, ["b"], "the dead session's record is removed");
    assert_eq!(
        errno(b.getattr(f)),
        Errno::ENOENT,
        "its open unlinked file is freed"
    );
    assert_eq!(b.trash_batch(0, 10).unwrap()[0].1, vec![s]);
    let g = mkfile(b, &ctx, ROOT_INO, "g");
    b.flock(g, 2, F_WRLCK).unwrap();
    assert_eq!(a.usage().unwrap().1, 2);
    // A comes back (it was stopped, not dead): it finds itself reaped and fails with EIO
    // rather than act on locks and open files it no longer holds.
    a.heartbeat().unwrap();
    assert_eq!(errno(a.flock(f, 1, F_UNLCK)), Errno::EIO);
    assert_eq!(
        errno(a.setlk(
            g,
            1,
            &PLock {
                typ: F_WRLCK,
                start: 0,
                end: 0,
                pid: 1
            }
        )),
        Errno::EIO
    );
    assert_eq!(errno(a.getattr(g)), Errno::EIO);
    assert_eq!(errno(a.open(&ctx, g, libc::O_RDONLY)), Errno::EIO);
    assert_eq!(
        b.list_sessions().unwrap().len(),
        1,
        "and does not come back to life"
    );
}

pub fn concurrent_creates_and_counters(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let per = 60;
    let inos = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for (i, m) in [a, b, a, b].into_iter().enumerate() {
            let ctx = &ctx;
            let inos = &inos;
            sc.spawn(move || {
                for j in 0..per {
                    let name = format!("f{i}-{j}");
                    let (ino, _) = m
                        .mknod(ctx, ROOT_INO, name.as_bytes(), FileType::File, 0o644, 0, 0)
                        .unwrap();
                    m.write_slice(ino, 0, data_slice(m, 4096)).unwrap();
                    inos.lock().unwrap().push(ino);
                }
            });
        }
    });
    let mut inos = inos.into_inner().unwrap();
    inos.sort();
    inos.dedup();
    assert_eq!(
        inos.len(),
        4 * per,
        "inode numbers are unique across clients"
    );
    assert_eq!(a.readdir(&ctx, ROOT_INO, false).unwrap().len(), 4 * per);
    assert_eq!(
        b.usage().unwrap(),
        (4 * per as u64 * 4096, 4 * per as u64 + 1),
        "no addition to the shared counters was lost"
    );
    let mut ids: Vec<u64> = inos
        .iter()
        .map(|&i| a.read_chunk(i, 0).unwrap()[0].id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4 * per, "slice ids are unique across clients");
}

/// A client may keep slice lists it read, but an open sees what was committed before it
/// (close-to-open), and so does a fresh read.
pub fn slice_lists_fresh_at_open(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let f = mkfile(a, &ctx, ROOT_INO, "f");
    let s1 = data_slice(a, 100);
    a.write_slice(f, 0, s1).unwrap();
    b.open(&ctx, f, libc::O_RDONLY).unwrap();
    assert_eq!(b.read_chunk(f, 0).unwrap(), vec![s1]);
    let s2 = data_slice(a, 50);
    a.write_slice(f, 0, s2).unwrap();
    assert_eq!(b.read_chunk_fresh(f, 0).unwrap(), vec![s1, s2]);
    let s3 = data_slice(a, 10);
    a.write_slice(f, 0, s3).unwrap();
    b.open(&ctx, f, libc::O_RDONLY).unwrap();
    assert_eq!(
        b.read_chunk(f, 0).unwrap(),
        vec![s1, s2, s3],
        "an open sees the last commit"
    );
    // A change made by the reading client itself shows at once.
    let s4 = data_slice(b, 5);
    b.write_slice(f, 0, s4).unwrap();
    assert_eq!(b.read_chunk(f, 0).unwrap().len(), 4);
    b.close(f).unwrap();
    b.close(f).unwrap();
}

/// A client remembers what it last read or wrote and may commit on it without reading again
/// (`KvTxn::guess`); whatever another client changed meanwhile must still decide the result.
pub fn stale_guesses_are_caught(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let user = Context {
        uid: 7,
        gid: 7,
        check_permission: true,
        ..Default::default()
    };
    let d = mkdir(a, &ctx, ROOT_INO, "d");
    chmod(a, &ctx, d, 0o777);
    // B learns d, creates and writes f: it now remembers d, f and f's first chunk.
    assert_eq!(b.lookup(&ctx, ROOT_INO, b"d").unwrap().0, d);
    let (f, _) = b.create_open(&user, d, b"f", 0o644, 0).unwrap();
    let s1 = data_slice(b, 100);
    b.write_slice(f, 0, s1).unwrap();
    // A appends further out, then B writes again on its memory of f.
    let s2 = Slice {
        pos: 1000,
        ..data_slice(a, 50)
    };
    a.write_slice(f, 0, s2).unwrap();
    let s3 = data_slice(b, 10);
    let (attr, _) = b.write_slice(f, 0, s3).unwrap();
    assert_eq!(attr.length, 1050, "B's write kept A's length");
    assert_eq!(a.read_chunk(f, 0).unwrap(), vec![s1, s2, s3]);
    b.close(f).unwrap();
    // A takes write permission away: B's create must be refused, whatever B remembers.
    chmod(a, &ctx, d, 0o555);
    assert_eq!(
        errno(b.create_open(&user, d, b"g", 0o644, 0)),
        Errno::EACCES
    );
    assert_eq!(
        errno(b.mknod(&user, d, b"g", FileType::File, 0o644, 0, 0)),
        Errno::EACCES
    );
    chmod(a, &ctx, d, 0o777);
    // A name A created since is taken.
    mkfile(a, &ctx, d, "h");
    assert_eq!(
        errno(b.create_open(&user, d, b"h", 0o644, 0)),
        Errno::EEXIST
    );
    // A file A removed cannot be opened by B, though B remembers it.
    b.open(&ctx, f, libc::O_RDONLY).unwrap();
    b.close(f).unwrap();
    a.unlink(&ctx, d, b"f").unwrap();
    assert_eq!(errno(b.open(&ctx, f, libc::O_RDONLY)), Errno::ENOENT);
    // And the last close of a file A unlinked while B had it open frees it.
    let (k, _) = b.create_open(&ctx, d, b"k", 0o644, 0).unwrap();
    let sk = data_slice(b, 10);
    b.write_slice(k, 0, sk).unwrap();
    a.unlink(&ctx, d, b"k").unwrap();
    b.close(k).unwrap();
    assert_eq!(
        errno(a.getattr(k)),
        Errno::ENOENT,
        "freed at the last close"
    );
}

/// Renames racing from two clients between two directories: every file ends up in exactly
/// one place, and the directories' link counts are right.
pub fn rename_races_keep_tree_consistent(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let d1 = mkdir(a, &ctx, ROOT_INO, "d1");
    let d2 = mkdir(a, &ctx, ROOT_INO, "d2");
    let n = 20;
    for i in 0..n {
        mkfile(a, &ctx, d1, &format!("f{i}"));
        mkdir(a, &ctx, d1, &format!("s{i}"));
    }
    std::thread::scope(|sc| {
        for (m, from, to) in [(a, d1, d2), (b, d1, d2), (b, d2, d1)] {
            let ctx = &ctx;
            sc.spawn(move || {
                for round in 0..2 {
                    for i in 0..n {
                        for kind in ["f", "s"] {
                            let name = format!("{kind}{i}");
                            let to_name = format!("{kind}{}", (i + round) % n);
                            // Losing a race is ENOENT or, for directories, ENOTEMPTY/EEXIST.
                            let _ = m.rename(ctx, from, name.as_bytes(), to, to_name.as_bytes(), 0);
                        }
                    }
                }
            });
        }
    });
    let mut all = names(a, &ctx, d1);
    all.extend(names(b, &ctx, d2));
    let dirs = |m: &dyn Meta, d| {
        m.readdir(&ctx, d, false)
            .unwrap()
            .iter()
            .filter(|e| e.typ == FileType::Directory)
            .count() as u32
    };
    for d in [d1, d2] {
        assert_eq!(
            a.getattr(d).unwrap().nlink,
            2 + dirs(a, d),
            "nlink of a directory"
        );
        for e in a.readdir(&ctx, d, true).unwrap() {
            let at = e.attr.unwrap();
            if at.is_dir() {
                assert_eq!(at.parent, d, "a directory's parent is where its entry is");
            }
        }
    }
    // Renames over existing files free them: what is left plus what was freed is all.
    let (_, inodes) = b.usage().unwrap();
    assert_eq!(
        inodes as usize,
        3 + all.len(),
        "inode count matches the tree: {all:?}"
    );
}

#[cfg(test)]
mod memory {
    crate::meta_conformance!((crate::KvMeta::new(crate::MemKv::new()), ()));
    crate::meta_conformance_exclusive!((crate::KvMeta::new(crate::MemKv::new()), ()));

    fn pair() -> (
        crate::KvMeta<std::sync::Arc<crate::MemKv>>,
        crate::KvMeta<std::sync::Arc<crate::MemKv>>,
        (),
    ) {
        let kv = std::sync::Arc::new(crate::MemKv::shared());
        let t = super::SHARED_SESSION_TIMEOUT;
        (
            crate::KvMeta::new(kv.clone()).with_session_timeout(t),
            crate::KvMeta::new(kv).with_session_timeout(t),
            (),
        )
    }
    crate::meta_conformance_shared!(pair());

    /// Every case again with one commit in three losing its answer.
    mod lossy {
        use crate::fault::LossyKv;
        use crate::{KvMeta, MemKv};
        use std::sync::Arc;

        fn fresh() -> (KvMeta<LossyKv<MemKv>>, ()) {
            let seed = crate::conformance::fault_seed();
            (KvMeta::new(LossyKv::new(MemKv::new(), seed, 3)), ())
        }
        crate::meta_conformance!(fresh());
        crate::meta_conformance_exclusive!(fresh());
        crate::meta_conformance_lossy!((KvMeta::new(LossyKv::new(MemKv::new(), 0, 0)), ()));

        type Lossy = KvMeta<LossyKv<Arc<MemKv>>>;
        fn pair() -> (Lossy, Lossy, ()) {
            let kv = Arc::new(MemKv::shared());
            let t = crate::conformance::SHARED_SESSION_TIMEOUT;
            let seed = crate::conformance::fault_seed();
            (
                KvMeta::new(LossyKv::new(kv.clone(), seed, 3)).with_session_timeout(t),
                KvMeta::new(LossyKv::new(kv, seed + 1, 3)).with_session_timeout(t),
                (),
            )
        }
        crate::meta_conformance_shared!(pair());
    }
}
