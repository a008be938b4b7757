//! The volume as a whole ([`crate::Volume`]): format and its `--force`, statfs and the
//! capacity and inode limits.

use super::*;

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
    // The cache groups' secret: made once, kept by --force, never printed.
    let g = m.group_secret().unwrap();
    assert_eq!(g.0.len(), 64, "32 random bytes in hex");
    assert_eq!(m.group_secret().unwrap(), g);
    m.format(&fmt(), true).unwrap();
    assert_eq!(m.group_secret().unwrap(), g, "format --force keeps it");
    assert!(!format!("{:?}", m.load_format().unwrap()).contains(&g.0));
    assert!(m.load_format().unwrap().redacted().group_secret.is_empty());
    let root = m.getattr(ROOT_INO).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.nlink, 2);
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
