//! Open files ([`crate::Files`]): an open file outlives its last unlink, by this client
//! or another, until its last close; create_open counts an open.

use super::*;

pub fn open_unlinked_kept_until_close(m: &dyn Meta) {
    let ctx = ready(m);
    let (f, s) = file_with_slice(m, &ctx, "f", 10);
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
    assert_eq!(trash[0].1[0].id, s.id);
    m.trash_done(trash[0].0).unwrap();
    assert!(m.trash_batch(0, 10).unwrap().is_empty());
    // Two opens, replaced by a rename over its name, opened again by inode while it has no
    // name: it goes with the last of the three closes, not before.
    let g = mkfile(m, &ctx, ROOT_INO, "g");
    let h = mkfile(m, &ctx, ROOT_INO, "h");
    m.open(&ctx, g, libc::O_RDONLY).unwrap();
    m.open(&ctx, g, libc::O_RDONLY).unwrap();
    m.rename(&ctx, ROOT_INO, b"h", ROOT_INO, b"g", 0).unwrap();
    m.close(g).unwrap();
    assert_eq!(m.getattr(g).unwrap().nlink, 0, "one open left");
    m.open(&ctx, g, libc::O_RDONLY).unwrap();
    m.close(g).unwrap();
    assert_eq!(m.getattr(g).unwrap().nlink, 0, "one open left");
    m.close(g).unwrap();
    assert_eq!(errno(m.getattr(g)), Errno::ENOENT);
    assert_eq!(m.lookup(&ctx, ROOT_INO, b"g").unwrap().0, h);
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

pub fn unlink_elsewhere_keeps_open_file(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let (f, s) = file_with_slice(a, &ctx, "f", 10);
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
