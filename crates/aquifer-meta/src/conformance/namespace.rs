//! Names ([`crate::Namespace`]): create, lookup, readdir (whole and in pages, under
//! change), unlink and rmdir, hard links, rename in all its cases and under races, symlinks.

use super::*;

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

pub fn rename_cases(m: &dyn Meta) {
    let ctx = ready(m);
    let a = mkdir(m, &ctx, ROOT_INO, "a");
    let b = mkdir(m, &ctx, a, "b");
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let g = mkfile(m, &ctx, ROOT_INO, "g");
    // The error of a rename that must fail.
    let refused = |from_dir, from: &[u8], to_dir, to: &[u8], flags| {
        errno(m.rename(&ctx, from_dir, from, to_dir, to, flags))
    };
    // A directory into its own subtree.
    assert_eq!(refused(ROOT_INO, b"a", b, b"x", 0), Errno::EINVAL);
    assert_eq!(refused(ROOT_INO, b"a", a, b"x", 0), Errno::EINVAL);
    // Replace a file.
    m.rename(&ctx, ROOT_INO, b"f", ROOT_INO, b"g", 0).unwrap();
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"g").unwrap().0, f);
    assert_eq!(errno(m.getattr(g)), Errno::ENOENT);
    // NOREPLACE.
    let h = mkfile(m, &ctx, ROOT_INO, "h");
    assert_eq!(
        refused(ROOT_INO, b"h", ROOT_INO, b"g", RENAME_NOREPLACE),
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
        refused(ROOT_INO, b"g", ROOT_INO, b"none", RENAME_EXCHANGE),
        Errno::ENOENT
    );
    // Directory over file and file over directory.
    assert_eq!(refused(ROOT_INO, b"h", ROOT_INO, b"g", 0), Errno::ENOTDIR);
    assert_eq!(refused(ROOT_INO, b"g", ROOT_INO, b"h", 0), Errno::EISDIR);
    // Directory over an empty directory, then over a non-empty one.
    let e = mkdir(m, &ctx, ROOT_INO, "e");
    m.rename(&ctx, ROOT_INO, b"h", ROOT_INO, b"e", 0).unwrap();
    assert_eq!(errno(m.getattr(e)), Errno::ENOENT);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 4);
    mkfile(m, &ctx, ROOT_INO, "x");
    m.rename(&ctx, ROOT_INO, b"x", a, b"x", 0).unwrap();
    assert_eq!(refused(ROOT_INO, b"e", ROOT_INO, b"a", 0), Errno::ENOTEMPTY);
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
