//! Attributes and permissions ([`crate::Attrs`]): setattr's rules for chmod, chown and
//! times, and the permission checks an engine makes when asked to.

use super::*;

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
    let user = unprivileged(7);
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
    let alice = unprivileged(100);
    let bob = Context {
        gids: vec![300],
        ..unprivileged(200)
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
