//! Slices, chunks and the trash ([`crate::Chunks`]): writes, truncate and fallocate on
//! slice lists, compaction, paging for gc and fsck, the slice ids gc spares, and slice lists
//! read fresh at open.

use super::*;

fn spared(m: &dyn Meta, id: u64) -> bool {
    m.live_slice_ranges()
        .unwrap()
        .iter()
        .any(|r| r.contains(&id))
}

pub fn slices_and_truncate(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let s1 = data_slice(m, 100);
    let (a, n) = m.write_slice(f, 0, s1).unwrap();
    assert_eq!((a.length, n), (100, 1));
    // A writer that could not learn whether its commit applied commits the slice again:
    // it is listed once.
    let (a, n) = m.write_slice(f, 0, s1).unwrap();
    assert_eq!((a.length, n), (100, 1));
    assert_eq!(m.read_chunk(f, 0).unwrap(), vec![s1]);
    let s2 = data_slice(m, 10);
    assert_ne!(s1.id, s2.id);
    m.write_slice(f, 2, s2).unwrap();
    assert_eq!(m.getattr(f).unwrap().length, 2 * CHUNK_SIZE + 10);
    // Shrink into chunk 0: chunk 2 goes to the trash, chunk 0 is clamped at the new end.
    let a = m.truncate(&ctx, f, 50).unwrap();
    assert_eq!(a.length, 50);
    assert!(m.read_chunk(f, 2).unwrap().is_empty());
    let c0 = m.read_chunk(f, 0).unwrap();
    assert_eq!(c0, vec![Slice { len: 50, ..s1 }]);
    let trash = m.trash_batch(0, 10).unwrap();
    assert_eq!(trash.len(), 1);
    assert_eq!(trash[0].1, vec![s2]);
    // Compaction replaces a prefix only while it is unchanged.
    let new = data_slice(m, 50);
    assert!(!m.compact_chunk(f, 0, &[s2], &[new]).unwrap());
    assert!(m.compact_chunk(f, 0, &c0, &[new]).unwrap());
    assert_eq!(m.read_chunk(f, 0).unwrap(), vec![new]);
    assert_eq!(
        m.truncate(&ctx, ROOT_INO, 0).unwrap_err().errno(),
        Errno::EISDIR
    );
    // Punch a hole: zero slice, size kept.
    let a = m
        .fallocate(&ctx, f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 20)
        .unwrap();
    assert_eq!(a.length, 50);
    assert_eq!(
        m.read_chunk(f, 0).unwrap().last(),
        Some(&Slice::zero(10, 20))
    );
    assert_eq!(
        errno(m.fallocate(&ctx, f, FALLOC_FL_PUNCH_HOLE, 0, 1)),
        Errno::EOPNOTSUPP
    );
    let a = m.fallocate(&ctx, f, 0, 0, 5000).unwrap();
    assert_eq!(a.length, 5000);
    let a = m.fallocate(&ctx, f, FALLOC_FL_KEEP_SIZE, 0, 9000).unwrap();
    assert_eq!(a.length, 5000);
    assert_eq!(m.usage().unwrap().0, 8192);
}

/// gc and fsck page through every chunk; trash pages go past records still pending.
pub fn chunk_and_trash_paging(m: &dyn Meta) {
    let ctx = ready(m);
    let mut want = Vec::new();
    for name in ["a", "b", "c"] {
        let f = mkfile(m, &ctx, ROOT_INO, name);
        for idx in [0u32, 3] {
            let s = data_slice(m, 10);
            m.write_slice(f, idx, s).unwrap();
            want.push((f, idx, vec![s]));
        }
    }
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = m.scan_chunks(after, 4).unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.0, last.1));
        got.extend(page);
    }
    assert_eq!(got, want);
    // Two trash records; a batch after the first returns only the second.
    m.unlink(&ctx, ROOT_INO, b"a").unwrap();
    m.unlink(&ctx, ROOT_INO, b"b").unwrap();
    let all = m.trash_batch(0, 10).unwrap();
    assert_eq!(all.len(), 2);
    let rest = m.trash_batch(all[0].0, 10).unwrap();
    assert_eq!(rest, all[1..].to_vec());
}

/// gc's view of a session's slice ids: an id is spared from its allocation until it is
/// committed or abandoned, and every allocated id is below the limit.
pub fn slice_ids_spared_until_committed(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let s = data_slice(m, 10);
    let dropped = m.new_slice_id().unwrap();
    let kept = m.new_slice_id().unwrap();
    assert!(m.slice_id_limit().unwrap() > kept);
    for id in [s.id, kept, dropped] {
        assert!(spared(m, id), "{id} is spared before its commit");
    }
    m.write_slice(f, 0, s).unwrap();
    m.abandon_slice_ids(&[dropped]);
    // The record follows at the next heartbeat; until then it only spares more.
    m.heartbeat().unwrap();
    assert!(!spared(m, s.id), "a committed id is not spared");
    assert!(!spared(m, dropped), "an abandoned id is not spared");
    assert!(spared(m, kept), "an id still open is spared");
    let later = m.new_slice_id().unwrap();
    assert!(spared(m, later));
    m.close_session().unwrap();
    assert!(
        m.live_slice_ranges().unwrap().is_empty(),
        "a closed session spares nothing"
    );
}

/// Trash records carry the engine's time, so their age is measured on one clock.
pub fn trash_records_carry_engine_time(m: &dyn Meta) {
    let ctx = ready(m);
    let f = mkfile(m, &ctx, ROOT_INO, "f");
    let before = m.clock().unwrap();
    m.write_slice(f, 0, data_slice(m, 10)).unwrap();
    m.unlink(&ctx, ROOT_INO, b"f").unwrap();
    let after = m.clock().unwrap();
    let trash = m.trash_batch(0, 10).unwrap();
    let at = trash[0].2.expect("a new trash record has a time");
    // Stored in milliseconds.
    let ms = |t: Time| t.sec as i128 * 1000 + t.nsec as i128 / 1_000_000;
    assert!(
        ms(before) <= ms(at) && ms(at) <= ms(after),
        "{before:?} <= {at:?} <= {after:?}"
    );
}

/// What one client may still commit, another's gc spares; not after the session ends.
pub fn live_sessions_slice_ids_seen_by_all(a: &dyn Meta, b: &dyn Meta) {
    ready2(a, b);
    let id = a.new_slice_id().unwrap();
    assert!(b.slice_id_limit().unwrap() > id);
    assert!(spared(b, id), "another client's open id is spared");
    a.close_session().unwrap();
    assert!(!spared(b, id), "a session that ended spares nothing");
}

/// A client may keep slice lists it read, but an open sees what was committed before it
/// (close-to-open), and so does a fresh read.
pub fn slice_lists_fresh_at_open(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let (f, s1) = file_with_slice(a, &ctx, "f", 100);
    b.open(&ctx, f, libc::O_RDONLY).unwrap();
    assert_eq!(b.read_chunk(f, 0).unwrap(), vec![s1]);
    let s2 = data_slice(a, 50);
    a.write_slice(f, 0, s2).unwrap();
    assert_eq!(b.read_chunk_fresh(f, 0).unwrap(), vec![s1, s2]);
    let s3 = data_slice(a, 10);
    a.write_slice(f, 0, s3).unwrap();
    b.open(&ctx, f, libc::O_RDONLY).unwrap();
    assert_eq!(
        b.read_chunk(f, 0).unwrap(),
        vec![s1, s2, s3],
        "an open sees the last commit"
    );
    // A change made by the reading client itself shows at once.
    let s4 = data_slice(b, 5);
    b.write_slice(f, 0, s4).unwrap();
    assert_eq!(b.read_chunk(f, 0).unwrap().len(), 4);
    b.close(f).unwrap();
    b.close(f).unwrap();
}

/// Collect what `f` reports until every change of `want` is among it (or 10 s pass).
fn follow_until(f: &mut dyn Follower, want: &[Change]) -> Vec<Change> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut got = Vec::new();
    while !want.iter().all(|w| got.contains(w)) && std::time::Instant::now() < end {
        got.extend(f.next(std::time::Duration::from_millis(200)).unwrap());
    }
    got
}

/// A client following the volume's changes ([`Volume::follow`]) is told what another
/// commits — new names, removed names, attributes, contents — and its slice lists follow
/// without an open in between.
pub fn changes_are_followed(a: &dyn Meta, b: &dyn Meta) {
    let ctx = ready2(a, b);
    let Some(mut f) = a.follow() else {
        return;
    };
    // The first answer is a start: nothing known before it.
    assert_eq!(
        f.next(std::time::Duration::from_millis(100)).unwrap(),
        vec![Change::Everything]
    );
    let (file, s1) = file_with_slice(b, &ctx, "f", 100);
    let got = follow_until(
        &mut *f,
        &[Change::Entry(ROOT_INO, b"f".to_vec()), Change::Data(file)],
    );
    assert!(
        got.contains(&Change::Entry(ROOT_INO, b"f".to_vec())),
        "{got:?}"
    );
    assert!(got.contains(&Change::Data(file)), "{got:?}");
    // Open once, read the list (cached), then the other client writes: the follower drops
    // the cached list, so a read without a new open sees the commit.
    a.open(&ctx, file, libc::O_RDONLY).unwrap();
    assert_eq!(a.read_chunk(file, 0).unwrap(), vec![s1]);
    let s2 = data_slice(b, 50);
    b.write_slice(file, 0, s2).unwrap();
    let got = follow_until(&mut *f, &[Change::Data(file), Change::Attr(file)]);
    assert!(got.contains(&Change::Data(file)), "{got:?}");
    assert_eq!(a.read_chunk(file, 0).unwrap(), vec![s1, s2]);
    a.close(file).unwrap();
    // chmod, rename and unlink by the other client.
    chmod(b, &ctx, file, 0o600);
    let got = follow_until(&mut *f, &[Change::Attr(file)]);
    assert!(got.contains(&Change::Attr(file)), "{got:?}");
    b.rename(&ctx, ROOT_INO, b"f", ROOT_INO, b"g", 0).unwrap();
    let moved = [
        Change::Entry(ROOT_INO, b"f".to_vec()),
        Change::Entry(ROOT_INO, b"g".to_vec()),
    ];
    let got = follow_until(&mut *f, &moved);
    assert!(moved.iter().all(|m| got.contains(m)), "{got:?}");
    b.unlink(&ctx, ROOT_INO, b"g").unwrap();
    let got = follow_until(&mut *f, &[Change::Entry(ROOT_INO, b"g".to_vec())]);
    assert!(
        got.contains(&Change::Entry(ROOT_INO, b"g".to_vec())),
        "{got:?}"
    );
    // A commit the follower has not read yet when an open comes (it closed just before):
    // the open reads other attributes than the last open here, so the kept list goes.
    let (h, s1) = file_with_slice(b, &ctx, "h", 100);
    follow_until(&mut *f, &[Change::Data(h)]);
    a.open(&ctx, h, libc::O_RDONLY).unwrap();
    assert_eq!(a.read_chunk(h, 0).unwrap(), vec![s1]);
    a.close(h).unwrap();
    let s2 = data_slice(b, 50);
    b.write_slice(h, 0, s2).unwrap();
    a.open(&ctx, h, libc::O_RDONLY).unwrap();
    assert_eq!(
        a.read_chunk(h, 0).unwrap(),
        vec![s1, s2],
        "an open after a commit the follower has not seen read a stale slice list"
    );
    a.close(h).unwrap();
}
