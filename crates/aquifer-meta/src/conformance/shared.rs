//! Cases of engines many clients share that span the roles: one tree seen alike by two
//! clients, creates racing on the shared counters, and stale guesses caught at commit.

use super::*;

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
    // Members of a cache group: both clients derive its key from one secret, and each
    // finds the other's membership in the sessions.
    let (sa, sb) = (a.group_secret().unwrap(), b.group_secret().unwrap());
    assert!(!sa.is_empty() && sa == sb);
    let member = GroupMember {
        name: "g".into(),
        id: "node-1".into(),
        addr: "127.0.0.2:7000".into(),
        weight: 1 << 30,
        owns: true,
        warm: vec![7],
    };
    b.new_session(SessionInfo {
        group: Some(member.clone()),
        ..test_session("b2")
    })
    .unwrap();
    let listed = a.list_sessions().unwrap();
    assert!(
        listed.iter().any(|s| s.group.as_ref() == Some(&member)),
        "{listed:?}"
    );
    // What a member tells the others later (a directory warmed) reaches them at once.
    b.update_session(&mut |s| s.group.as_mut().unwrap().warm.push(9))
        .unwrap();
    assert_eq!(b.session().unwrap().group.unwrap().warm, [7, 9]);
    let listed = a.list_sessions().unwrap();
    assert!(
        listed
            .iter()
            .any(|s| s.group.as_ref().is_some_and(|g| g.warm == [7, 9])),
        "{listed:?}"
    );
    // A directory's times may lag a change in it by 5 ms on a shared engine, no more.
    let before = a.getattr(d).unwrap().mtime;
    std::thread::sleep(std::time::Duration::from_millis(10));
    mkfile(b, &ctx, d, "later");
    assert!(
        a.getattr(d).unwrap().mtime > before,
        "a create moves the directory's mtime"
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

/// A client remembers what it last read or wrote and may commit on it without reading again
/// (`KvTxn::guess`); whatever another client changed meanwhile must still decide the result.
pub fn stale_guesses_are_caught(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let user = unprivileged(7);
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
