//! Sessions ([`crate::Sessions`]): what a dead client leaves is cleaned up, by a new
//! session on an exclusive engine or by a live client once the dead one's heartbeat stops.

use super::*;

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

pub fn dead_session_is_cleaned_up(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let (f, s) = file_with_slice(a, &ctx, "f", 10);
    a.open(&ctx, f, libc::O_RDWR).unwrap();
    a.setlk(f, 1, &plock(F_WRLCK, 0, u64::MAX, 1)).unwrap();
    a.flock(f, 1, F_WRLCK).unwrap();
    b.unlink(&ctx, ROOT_INO, b"f").unwrap();
    assert_eq!(errno(b.flock(f, 2, F_RDLCK)), Errno::EAGAIN);
    // B keeps heartbeating, A stops (as after kill -9).
    b.heartbeat().unwrap();
    assert!(b.getattr(f).is_ok(), "a live session's open file is kept");
    let wait = SHARED_SESSION_TIMEOUT + std::time::Duration::from_millis(1500);
    std::thread::sleep(wait);
    b.heartbeat().unwrap();
    assert_eq!(hosts(b), ["b"], "the dead session's record is removed");
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
    assert_eq!(errno(a.setlk(g, 1, &plock(F_WRLCK, 0, 0, 1))), Errno::EIO);
    assert_eq!(errno(a.getattr(g)), Errno::EIO);
    assert_eq!(errno(a.open(&ctx, g, libc::O_RDONLY)), Errno::EIO);
    assert_eq!(
        b.list_sessions().unwrap().len(),
        1,
        "and does not come back to life"
    );
}
