//! Ids across a failover that lost the increments which handed them out: the new server
//! hands the same ids to other clients, and no two files, slices or sessions may end up
//! sharing one. Two (or three) clients of one shared in-memory store seen through
//! [`LossyKv`], whose `fail_over` undoes the last writes, bare increments included.

use crate::conformance::{test_format, test_session};
use crate::fault::LossyKv;
use crate::kv::MemKv;
use crate::*;
use std::collections::HashSet;
use std::sync::Arc;

type Client = KvMeta<Arc<LossyKv<MemKv>>>;

fn volume() -> (Arc<LossyKv<MemKv>>, Client, Client) {
    let kv = Arc::new(LossyKv::new(MemKv::shared(), 1, 0));
    let a = KvMeta::new(kv.clone());
    a.format(&test_format(1 << 16), false).unwrap();
    a.new_session(test_session("a")).unwrap();
    let b = KvMeta::new(kv.clone());
    b.new_session(test_session("b")).unwrap();
    (kv, a, b)
}

#[test]
fn inodes_handed_out_again_never_share_a_file() {
    let (kv, a, b) = volume();
    let ctx = Context::root();
    // A takes a batch of inode numbers and creates a file; the failover loses both.
    kv.keep_undo();
    a.mknod(&ctx, ROOT_INO, b"lost", FileType::File, 0o600, 0, 0)
        .unwrap();
    kv.fail_over(usize::MAX).unwrap();
    assert_eq!(
        b.lookup(&ctx, ROOT_INO, b"lost").unwrap_err().errno(),
        Errno::ENOENT
    );
    // Both clients create files, interleaved: A from the batch it still holds (without
    // the fix), B from the counter the failover set back. Each file's mode says who made
    // it.
    let mut made = Vec::new();
    for i in 0..50 {
        for (c, mode, who) in [(&a, 0o600u32, "a"), (&b, 0o640, "b")] {
            let name = format!("{who}{i}");
            let (ino, _) = c
                .mknod(&ctx, ROOT_INO, name.as_bytes(), FileType::File, mode, 0, 0)
                .unwrap();
            made.push((name, ino, mode));
        }
    }
    let mut inos = HashSet::new();
    for (name, ino, mode) in &made {
        let (found, attr) = b.lookup(&ctx, ROOT_INO, name.as_bytes()).unwrap();
        assert_eq!(found, *ino, "{name}");
        assert_eq!(
            u32::from(attr.mode) & 0o777,
            *mode,
            "{name}: another file's inode"
        );
        assert!(inos.insert(*ino), "{name} shares inode {ino}");
    }
}

#[test]
fn slice_ids_handed_out_again_are_never_reused() {
    let (kv, a, b) = volume();
    kv.keep_undo();
    // A takes a batch and hands out one id; the failover loses the batch.
    let mut a_ids = HashSet::from([a.new_slice_id().unwrap()]);
    kv.fail_over(usize::MAX).unwrap();
    // B takes ids from the counter set back: the ids of A's lost batch. (The one id A
    // handed out before it could see the failover is the window left: a writer's upload
    // in flight at the failover; `--meta-durability replicas:N` closes it.)
    let b_ids: HashSet<u64> = (0..100).map(|_| b.new_slice_id().unwrap()).collect();
    for _ in 0..100 {
        let id = a.new_slice_id().unwrap();
        assert!(!b_ids.contains(&id), "slice id {id} handed to both clients");
        a_ids.insert(id);
    }
    // Nor does B get, from now on, any id A handed out.
    for _ in 0..2100 {
        let id = b.new_slice_id().unwrap();
        assert!(!a_ids.contains(&id), "slice id {id} handed to both clients");
    }
}

#[test]
fn a_session_id_handed_out_again_is_not_shared() {
    let (kv, a, _b) = volume();
    let ctx = Context::root();
    kv.keep_undo();
    // C's session starts; the failover loses its id and its record.
    let c = KvMeta::new(kv.clone());
    let c_sid = c.new_session(test_session("c")).unwrap();
    kv.fail_over(usize::MAX).unwrap();
    // D starts after the failover: the counter hands out C's id again.
    let d = KvMeta::new(kv.clone());
    let d_sid = d.new_session(test_session("d")).unwrap();
    assert_eq!(d_sid, c_sid, "the failover set the session counter back");
    // D's record must not keep C alive: C's open files and locks would be D's.
    let r = c.create_open(&ctx, ROOT_INO, b"c-file", 0o644, 0);
    assert_eq!(r.expect_err("C's session is gone").errno(), Errno::EIO);
    let (d_ino, _) = d.create_open(&ctx, ROOT_INO, b"d-file", 0o644, 0).unwrap();
    let lock = |l_type| PLock {
        typ: l_type,
        start: 0,
        end: u64::MAX,
        pid: 1,
    };
    d.setlk(d_ino, 7, &lock(libc::F_WRLCK)).unwrap();
    a.mknod(&ctx, ROOT_INO, b"a-file", FileType::File, 0o644, 0, 0)
        .unwrap();
    // C unmounts: what is recorded under the id is D's and stays.
    c.close_session().unwrap();
    assert!(
        a.list_sessions().unwrap().iter().any(|s| s.sid == d_sid),
        "C's unmount removed D's session"
    );
    assert_eq!(
        a.setlk(d_ino, 9, &lock(libc::F_WRLCK)).unwrap_err().errno(),
        Errno::EAGAIN,
        "C's unmount released D's lock"
    );
    d.getattr(d_ino).unwrap();
}
