//! Extended attributes ([`crate::Xattrs`]).

use super::*;

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
