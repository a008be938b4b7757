//! Commits whose answers are lost, and failovers that lose commits (`crate::fault`): run
//! on [`crate::KvMeta`] over a [`crate::fault::LossyKv`].

use super::*;

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
        let s1 = data_slice(m, 4096);
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
