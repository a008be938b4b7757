//! Locks ([`crate::Locks`]): POSIX record locks and BSD locks, on one client and across
//! two.

use super::*;

pub fn posix_and_bsd_locks(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let lk = |typ, start, end| plock(typ, start, end, 1);
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

pub fn locks_across_clients(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let f = mkfile(a, &ctx, ROOT_INO, "f");
    let lk = |typ, start, end| plock(typ, start, end, 7);
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
