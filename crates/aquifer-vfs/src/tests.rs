use super::*;
use crate::dir::DIR_PAGE;
use aquifer_meta::conformance::{test_format, test_session};
use aquifer_object::{FaultStore, MemStore};

fn vfs() -> (Arc<Vfs>, Arc<MemStore>) {
    let store = Arc::new(MemStore::new());
    (vfs_on(store.clone()), store)
}

fn vfs_on(store: Arc<dyn ObjectStore>) -> Arc<Vfs> {
    vfs_over(Arc::new(KvMeta::new(MemKv::new())), store)
}

/// A mount of `meta`, formatted here, with its blocks in `store` and a session open.
fn vfs_over(meta: Arc<dyn Meta>, store: Arc<dyn ObjectStore>) -> Arc<Vfs> {
    meta.format(&test_format(1 << 16), false).unwrap();
    let v = Vfs::new(meta, store, DataConfig::default()).unwrap();
    v.start_session(test_session("h")).unwrap();
    v
}

/// A mount whose store goes down, refuses or slows down on command.
fn faulty_vfs() -> (Arc<Vfs>, Arc<FaultStore<MemStore>>) {
    let faults = Arc::new(FaultStore::new(MemStore::new()));
    (vfs_on(faults.clone()), faults)
}

fn root() -> Context {
    Context::root()
}

/// Create `name` (0644) in the root, opened read-write: its inode and handle.
fn new_file(v: &Vfs, name: &[u8]) -> (Ino, u64) {
    let (ino, _, fh) = v
        .create(&root(), ROOT_INO, name, 0o644, 0, libc::O_RDWR)
        .unwrap();
    (ino, fh)
}

/// Create `name` in the root holding `data`, closed again: its inode.
fn file_with(v: &Vfs, name: &[u8], data: &[u8]) -> Ino {
    let (ino, fh) = new_file(v, name);
    v.write(fh, 0, data).unwrap();
    v.release(fh, None).unwrap();
    ino
}

/// A plain file `name` (0644) in `dir`, not opened.
fn mkfile(v: &Vfs, dir: Ino, name: &[u8]) {
    v.mknod(&root(), dir, name, libc::S_IFREG | 0o644, 0, 0)
        .unwrap();
}

/// A directory `name` in the root holding `n` files named e00000, e00001, ...
fn fill_dir(v: &Vfs, name: &[u8], n: usize) -> Ino {
    let d = v.mkdir(&root(), ROOT_INO, name, 0o755, 0).unwrap().0;
    for i in 0..n {
        mkfile(v, d, format!("e{i:05}").as_bytes());
    }
    d
}

/// What a fresh read-only open of `ino` reads from offset 0 (`len` bytes at most); the
/// handle is released again.
fn read_back(v: &Vfs, ino: Ino, len: u32) -> Vec<u8> {
    let fh = v.open(&root(), ino, libc::O_RDONLY).unwrap();
    let got = v.read(fh, 0, len).unwrap();
    v.release(fh, None).unwrap();
    got
}

/// Open `ino` with `flags` and release it at once: what the open answered.
fn open_and_close(v: &Vfs, ino: Ino, flags: i32) -> Opened {
    let o = v.open_file(&root(), ino, flags).unwrap();
    v.release(o.fh, None).unwrap();
    o
}

#[test]
fn write_read_across_blocks_and_chunks() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"f");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let off = CHUNK_SIZE - 100_000;
    assert_eq!(v.write(fh, off, &data).unwrap(), data.len() as u32);
    assert_eq!(
        v.getattr(ino).unwrap().length,
        off + data.len() as u64,
        "size includes buffered data"
    );
    assert_eq!(v.read(fh, off, data.len() as u32).unwrap(), data);
    assert_eq!(
        v.read(fh, 0, 10).unwrap(),
        vec![0; 10],
        "hole reads as zeros"
    );
    v.flush(fh, None).unwrap();
    v.release(fh, None).unwrap();
    let fh = v.open(&root(), ino, libc::O_RDONLY).unwrap();
    assert_eq!(v.read(fh, off + 1000, 10).unwrap(), &data[1000..1010]);
    assert_eq!(v.write(fh, 0, b"x").unwrap_err(), Errno::EBADF);
    v.release(fh, None).unwrap();
}

#[test]
fn large_offsets_past_4gib() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"big");
    let off = (5u64 << 30) + 12345;
    v.write(fh, off, b"hello").unwrap();
    v.release(fh, None).unwrap();
    let fh = v.open(&root(), ino, libc::O_RDONLY).unwrap();
    assert_eq!(v.getattr(ino).unwrap().length, off + 5);
    assert_eq!(v.read(fh, off - 2, 10).unwrap(), b"\0\0hello");
}

#[test]
fn unlinked_open_file_readable_until_close() {
    let (v, store) = vfs();
    let (ino, fh) = new_file(&v, b"f");
    v.write(fh, 0, &[9u8; 200_000]).unwrap();
    v.flush(fh, None).unwrap();
    v.unlink(&root(), ROOT_INO, b"f").unwrap();
    assert_eq!(
        v.lookup(&root(), ROOT_INO, b"f").unwrap_err(),
        Errno::ENOENT
    );
    assert_eq!(v.read(fh, 0, 5).unwrap(), vec![9; 5]);
    v.write(fh, 200_000, b"more").unwrap();
    assert!(!store.is_empty());
    v.release(fh, None).unwrap();
    assert_eq!(v.getattr(ino).unwrap_err(), Errno::ENOENT);
    v.chunk_store().empty_trash().unwrap();
    assert!(store.is_empty(), "all blocks of the deleted file are freed");
}

/// A directory larger than a page lists every entry once, resuming at any offset, and an
/// open directory holds one page, not the whole directory.
#[test]
fn large_directories_are_listed_a_page_at_a_time() {
    let (v, _) = vfs();
    let n = 2 * DIR_PAGE + 10;
    let d = fill_dir(&v, b"big", n);
    let dh = v.opendir(&root(), d).unwrap();
    let mut names = Vec::new();
    let mut off = 0;
    loop {
        // The kernel takes what fits in its buffer: here 100 entries a call.
        let got = v.readdir(&root(), dh, off, true).unwrap();
        let Some(&(_, _)) = got.first() else { break };
        for (next, e) in got.into_iter().take(100) {
            names.push(String::from_utf8(e.name).unwrap());
            off = next;
        }
        let Handle::Dir(h) = &*v.handle(dh).unwrap() else {
            unreachable!()
        };
        assert!(h.listing.lock().held() <= DIR_PAGE + 2);
    }
    assert_eq!(names.len(), n + 2);
    assert_eq!(&names[..3], &[".", "..", "e00000"]);
    let want: Vec<String> = (0..n).map(|i| format!("e{i:05}")).collect();
    assert_eq!(names[2..], want[..]);
    // Seeking back to an earlier offset lists from there again.
    let again = v.readdir(&root(), dh, 5, false).unwrap();
    assert_eq!(again[0].1.name, b"e00003");
    v.release(dh, None).unwrap();
}

#[test]
fn readdir_offsets_stable_while_directory_changes() {
    let (v, _) = vfs();
    for i in 0..50 {
        mkfile(&v, ROOT_INO, format!("f{i:02}").as_bytes());
    }
    let dh = v.opendir(&root(), ROOT_INO).unwrap();
    let first = v.readdir(&root(), dh, 0, false).unwrap();
    assert_eq!(first.len(), 52);
    assert_eq!(first[0].1.name, b".");
    let (resume, _) = first[20];
    // Changes after the listing started do not shift the remaining offsets.
    v.unlink(&root(), ROOT_INO, b"f00").unwrap();
    mkfile(&v, ROOT_INO, b"a-new");
    let rest = v.readdir(&root(), dh, resume, false).unwrap();
    assert_eq!(rest[0].1.name, first[21].1.name);
    assert_eq!(rest.len(), 31);
    v.release(dh, None).unwrap();
}

#[test]
fn truncate_discards_and_zero_extends() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"f");
    v.write(fh, 0, &[1u8; 1000]).unwrap();
    v.setattr(&root(), ino, &SetAttr::default(), Some(100))
        .unwrap();
    v.setattr(&root(), ino, &SetAttr::default(), Some(500))
        .unwrap();
    let got = v.read(fh, 0, 1000).unwrap();
    assert_eq!(got.len(), 500);
    assert!(got[..100].iter().all(|b| *b == 1));
    assert!(got[100..].iter().all(|b| *b == 0));
    v.fallocate(
        &root(),
        fh,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        10,
        20,
    )
    .unwrap();
    let got = v.read(fh, 0, 40).unwrap();
    assert_eq!(&got[..10], &[1; 10]);
    assert_eq!(&got[10..30], &[0; 20]);
    v.release(fh, None).unwrap();
}

#[test]
fn open_with_trunc_and_excl() {
    let (v, _) = vfs();
    let ino = file_with(&v, b"f", b"abc");
    assert_eq!(
        v.create(
            &root(),
            ROOT_INO,
            b"f",
            0o644,
            0,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL
        )
        .unwrap_err(),
        Errno::EEXIST
    );
    let fh = v
        .open(&root(), ino, libc::O_WRONLY | libc::O_TRUNC)
        .unwrap();
    assert_eq!(v.getattr(ino).unwrap().length, 0);
    v.release(fh, None).unwrap();
}

#[test]
fn permissions_enforced_for_checked_contexts() {
    let (v, _) = vfs();
    let (ino, _, fh) = v
        .create(&root(), ROOT_INO, b"secret", 0o600, 0, libc::O_RDWR)
        .unwrap();
    v.release(fh, None).unwrap();
    let user = Context {
        uid: 1000,
        gid: 1000,
        check_permission: true,
        ..Default::default()
    };
    assert_eq!(
        v.open(&user, ino, libc::O_RDONLY).unwrap_err(),
        Errno::EACCES
    );
    assert_eq!(v.access(&user, ino, MODE_R).unwrap_err(), Errno::EACCES);
    v.access(&root(), ino, MODE_R | MODE_W).unwrap();
}

#[test]
fn shutdown_commits_buffered_writes() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"f");
    v.write(fh, 0, b"pending").unwrap();
    v.shutdown();
    assert_eq!(v.meta().getattr(ino).unwrap().length, 7);
}

#[test]
fn explicit_mtime_survives_buffered_writes() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"f");
    v.write(fh, 0, b"data").unwrap();
    let t = Time {
        sec: 981_173_106,
        nsec: 123_456_789,
    };
    let set = SetAttr {
        mtime: Some(SetTime::At(t)),
        ..Default::default()
    };
    v.setattr(&root(), ino, &set, None).unwrap();
    v.flush(fh, None).unwrap();
    v.release(fh, None).unwrap();
    assert_eq!(v.getattr(ino).unwrap().mtime, t);
}

#[test]
fn store_outage_fails_flush_and_close_never_silently() {
    let (v, faults) = faulty_vfs();
    let (ino, fh) = new_file(&v, b"f");
    v.write(fh, 0, b"committed").unwrap();
    v.fsync(fh, false).unwrap();
    faults.set_down(true);
    v.write(fh, 0, &vec![7u8; 200_000]).unwrap();
    assert_eq!(
        v.fsync(fh, false).unwrap_err(),
        Errno::EIO,
        "fsync reports the failed upload"
    );
    // Nothing of the failed write was committed: the file still has its acknowledged bytes.
    assert_eq!(v.meta().getattr(ino).unwrap().length, 9);
    assert_eq!(
        v.read(fh, 0, 100).unwrap_err(),
        Errno::EIO,
        "reads fail while the store is down"
    );
    faults.set_down(false);
    // The failed write is still buffered (for a retry), so a reader sees it.
    assert_eq!(v.read(fh, 0, 100).unwrap(), vec![7u8; 100]);
    v.write(fh, 9, b"!").unwrap();
    // This handle has reported the failure once already; the retry now succeeds.
    v.release(fh, None).unwrap();
    let mut want = vec![7u8; 200_000];
    want[9] = b'!';
    assert_eq!(read_back(&v, ino, 200_000), want);
}

/// A flush that fails on someone else's behalf (another descriptor's close) is still
/// reported to the writer — once per handle — and the data is retried, not dropped.
#[test]
fn a_failure_seen_by_another_handle_reaches_the_writer() {
    let (v, faults) = faulty_vfs();
    let (ino, writer) = new_file(&v, b"ckpt");
    let other = v.open(&root(), ino, libc::O_WRONLY).unwrap();
    let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    v.write(writer, 0, &data).unwrap();
    // A store that refuses writes (not retried): the other descriptor's close triggers the
    // flush and gets the error.
    faults.set_refuse_writes(true);
    assert_eq!(v.flush(other, None).unwrap_err(), Errno::EIO);
    faults.set_refuse_writes(false);
    v.release(other, None).unwrap();
    // The writer's own fsync must not return 0 as if nothing happened...
    assert_eq!(v.fsync(writer, false).unwrap_err(), Errno::EIO);
    // ...and reports it only once; the data was kept and stored by the retry.
    v.fsync(writer, false).unwrap();
    assert_eq!(v.meta().getattr(ino).unwrap().length, data.len() as u64);
    assert_eq!(v.read(writer, 0, data.len() as u32).unwrap(), data);
    // A handle opened after the failure has nothing to report.
    let late = v.open(&root(), ino, libc::O_WRONLY).unwrap();
    v.release(late, None).unwrap();
    v.release(writer, None).unwrap();
}

/// The unmount flush (SIGTERM) failing is reported by the writer's close.
#[test]
fn a_failed_shutdown_flush_is_reported_by_close() {
    let (v, faults) = faulty_vfs();
    let (_, fh) = new_file(&v, b"f");
    v.write(fh, 0, b"data").unwrap();
    faults.set_refuse_writes(true);
    v.flush_all();
    assert_eq!(v.release(fh, None).unwrap_err(), Errno::EIO);
}

/// A reader of a file being written sees the buffered bytes without committing them.
#[test]
fn reads_of_buffered_writes_do_not_commit_them() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"log");
    let reader = v.open(&root(), ino, libc::O_RDONLY).unwrap();
    let mut model = Vec::new();
    for i in 0..50u32 {
        let line = format!("line {i}\n").into_bytes();
        v.write(fh, model.len() as u64, &line).unwrap();
        model.extend_from_slice(&line);
        assert_eq!(v.read(reader, 0, 4096).unwrap(), model);
        // Overwrite in the middle: the newest bytes win in the overlay too.
        if i == 25 {
            v.write(fh, 2, b"NE").unwrap();
            model[2..4].copy_from_slice(b"NE");
        }
    }
    assert!(
        v.meta().read_chunk(ino, 0).unwrap().is_empty(),
        "reads committed nothing"
    );
    v.flush(fh, None).unwrap();
    assert_eq!(v.read(reader, 0, 4096).unwrap(), model);
    v.release(reader, None).unwrap();
    v.release(fh, None).unwrap();
}

/// stat of a file whose blocks are uploading answers at once with the buffered size.
#[test]
fn getattr_does_not_wait_for_uploads() {
    use std::time::Duration;
    let (v, faults) = faulty_vfs();
    let (ino, fh) = new_file(&v, b"slow");
    v.write(fh, 0, &[1u8; 100_000]).unwrap();
    faults.set_latency(Duration::from_secs(3));
    let flusher = {
        let v = v.clone();
        std::thread::spawn(move || v.flush(fh, None))
    };
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let v = v.clone();
        std::thread::spawn(move || {
            let _ = tx.send((v.getattr(ino), v.lookup(&root(), ROOT_INO, b"slow")));
        });
    }
    // Not a timing assertion: a stat stuck behind the flush would not answer before the
    // 3 s upload ends, and the flush is still running when we look.
    let (a, l) = rx
        .recv_timeout(Duration::from_millis(2500))
        .expect("getattr waited for the upload");
    assert_eq!(a.unwrap().length, 100_000);
    assert_eq!(l.unwrap().1.length, 100_000);
    assert!(!flusher.is_finished());
    flusher.join().unwrap().unwrap();
    faults.set_latency(Duration::ZERO);
    v.release(fh, None).unwrap();
}

#[test]
fn transient_faults_are_retried_transparently() {
    use aquifer_object::{FaultStore, RetryPolicy, Retrying};
    use std::time::Duration;
    let faults = Arc::new(FaultStore::new(MemStore::new()));
    let policy = RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(5))
        .with_max_attempts(10)
        .with_deadline(Duration::from_secs(60));
    let v = vfs_on(Arc::new(Retrying::new(faults.clone(), policy)));
    let (_, fh) = new_file(&v, b"f");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    v.write(fh, 0, &data).unwrap();
    faults.fail_next(3);
    v.flush(fh, None).unwrap();
    faults.fail_next(2);
    assert_eq!(v.read(fh, 0, data.len() as u32).unwrap(), data);
    v.release(fh, None).unwrap();
}

#[test]
fn readdir_plus_gives_every_entry_attributes() {
    let (v, _) = vfs();
    let (d, _) = v.mkdir(&root(), ROOT_INO, b"d", 0o755, 0).unwrap();
    v.mknod(&root(), d, b"f", libc::S_IFREG | 0o600, 0, 0)
        .unwrap();
    let dh = v.opendir(&root(), d).unwrap();
    let all = v.readdir(&root(), dh, 0, true).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|(_, e)| e.attr.is_some()));
    assert_eq!(all[1].1.ino, ROOT_INO);
    assert_eq!(all[2].1.attr.as_ref().unwrap().mode, 0o600);
    v.release(dh, None).unwrap();
}

#[test]
fn the_page_cache_is_kept_only_across_opens_of_an_unchanged_file() {
    let (v, _) = vfs();
    let ino = file_with(&v, b"kc", b"epoch data");
    let keep = |flags| open_and_close(&v, ino, flags).keep_cache;
    assert!(!keep(libc::O_RDONLY), "written since it was created");
    assert!(keep(libc::O_RDONLY), "unchanged since the last open");
    assert!(keep(libc::O_RDONLY));
    // Rewritten in place (same length): the next open drops the cached pages.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let fh = v.open(&root(), ino, libc::O_WRONLY).unwrap();
    v.write(fh, 0, b"EPOCH").unwrap();
    v.release(fh, None).unwrap();
    assert!(!keep(libc::O_RDONLY), "rewritten");
    assert!(keep(libc::O_RDONLY));
    // Truncated: dropped again; an O_TRUNC open never keeps.
    v.setattr(&root(), ino, &SetAttr::default(), Some(3))
        .unwrap();
    assert!(!keep(libc::O_RDONLY), "truncated");
    assert!(!keep(libc::O_WRONLY | libc::O_TRUNC));
    assert!(!keep(libc::O_RDONLY), "emptied by the O_TRUNC open");
}

/// Commits whose answers are lost on the data path (`aquifer_meta::fault`): appends,
/// compaction, truncate, unlink and the trash come out as if every answer had arrived —
/// the file reads back exactly, and only the blocks of what was freed are deleted.
#[test]
fn lost_answers_on_the_data_path() {
    use aquifer_meta::fault::LossyKv;
    let seed = aquifer_meta::conformance::fault_seed();
    let lossy = Arc::new(LossyKv::new(MemKv::new(), seed, 2));
    let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(lossy.clone()));
    let store = Arc::new(MemStore::new());
    let v = vfs_over(meta.clone(), store.clone());
    let cs = v.chunk_store().clone();
    let (ino, fh) = new_file(&v, b"f");
    // Many small committed appends: a chunk of many slices to compact.
    let mut model = Vec::new();
    for i in 0..40u32 {
        let piece: Vec<u8> = (0..10_000u32).map(|j| (i * 31 + j) as u8).collect();
        v.write(fh, model.len() as u64, &piece).unwrap();
        model.extend_from_slice(&piece);
        v.flush(fh, None).unwrap();
    }
    // (The background compactor may have run meanwhile.)
    while cs.compact(ino, 0).unwrap() {}
    assert_eq!(meta.read_chunk_fresh(ino, 0).unwrap().len(), 1);
    // Truncate, then overwrite the middle and compact again.
    v.setattr(&root(), ino, &SetAttr::default(), Some(300_000))
        .unwrap();
    model.truncate(300_000);
    v.write(fh, 1000, &[7u8; 5000]).unwrap();
    model[1000..6000].fill(7);
    v.flush(fh, None).unwrap();
    cs.compact(ino, 0).unwrap();
    // Another file, unlinked: its blocks go with the trash.
    file_with(&v, b"g", &[9u8; 200_000]);
    v.unlink(&root(), ROOT_INO, b"g").unwrap();
    while cs.empty_trash().unwrap() > 0 {}
    assert!(
        lossy.injected() > 10,
        "faults were injected: {}",
        lossy.injected()
    );
    // What is left in the store is exactly the blocks of f.
    let referenced: usize = meta
        .read_chunk_fresh(ino, 0)
        .unwrap()
        .iter()
        .filter(|s| s.id != 0)
        .map(|s| s.size.div_ceil(1 << 16) as usize)
        .sum();
    assert_eq!(
        store.len(),
        referenced,
        "no block of f lost, none freed kept"
    );
    v.release(fh, None).unwrap();
    assert_eq!(read_back(&v, ino, model.len() as u32 + 10), model);
}

/// A slice commit applied whose outcome the writer cannot learn (the engine stays away
/// through the fence), then a compaction that replaces the slice and frees its blocks:
/// the writer must not commit the slice again (it would list blocks already deleted).
#[test]
fn a_commit_of_unknown_outcome_is_not_retried() {
    use aquifer_meta::fault::{Fault, LossyKv};
    use std::time::Duration;
    let lossy = Arc::new(LossyKv::new(MemKv::new(), 1, 0));
    let meta: Arc<dyn Meta> =
        Arc::new(KvMeta::new(lossy.clone()).with_fence_deadline(Duration::ZERO));
    let v = vfs_over(meta.clone(), Arc::new(MemStore::new()));
    let cs = v.chunk_store().clone();
    let (ino, fh) = new_file(&v, b"f");
    v.write(fh, 0, &[1u8; 10_000]).unwrap();
    v.flush(fh, None).unwrap();
    v.write(fh, 0, &[2u8; 10_000]).unwrap();
    // The second slice's commit applies, its answer is lost, and the fence's three tries
    // get no answer either.
    lossy.force(&[Fault::AppliedThenAway(3)]);
    assert_eq!(
        v.flush(fh, None).unwrap_err(),
        Errno::EIO,
        "an outcome not known"
    );
    // The engine is back; a compaction merges both slices and frees the old ones.
    while cs.compact(ino, 0).unwrap() {}
    while cs.empty_trash().unwrap() > 0 {}
    let _ = v.flush(fh, None);
    let _ = v.release(fh, None);
    let chunk = meta.read_chunk_fresh(ino, 0).unwrap();
    assert_eq!(chunk.len(), 1, "the slice was committed again: {chunk:?}");
    assert_eq!(read_back(&v, ino, 20_000), vec![2u8; 10_000]);
}

fn whole(typ: i32) -> PLock {
    PLock {
        typ,
        start: 0,
        end: u64::MAX,
        pid: 0,
    }
}

/// A blocking lock waits on a thread of its own: the waiter's result, once it returns.
fn setlkw_on_thread(
    v: &Arc<Vfs>,
    request: u64,
    ino: Ino,
    owner: u64,
    flock: bool,
) -> std::thread::JoinHandle<Result<()>> {
    let wait = v.begin_lock_wait(request).unwrap();
    let v = v.clone();
    std::thread::spawn(move || v.setlkw(wait, 0, ino, owner, &whole(libc::F_WRLCK), flock))
}

#[test]
fn a_blocking_lock_waits_until_granted_whatever_the_caller_pid() {
    let (v, _) = vfs();
    let (ino, _) = new_file(&v, b"l");
    for flock in [false, true] {
        v.setlk(0, ino, 1, &whole(libc::F_WRLCK), flock).unwrap();
        // Request pid 0 (a caller the daemon cannot see) is all the lock carries.
        let w = setlkw_on_thread(&v, 10, ino, 2, flock);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !w.is_finished(),
            "a wait ended without an interrupt: {:?}",
            w.join()
        );
        v.setlk(0, ino, 1, &whole(libc::F_UNLCK), flock).unwrap();
        assert_eq!(w.join().unwrap(), Ok(()));
        assert_eq!(
            v.setlk(0, ino, 3, &whole(libc::F_WRLCK), flock),
            Err(Errno::EAGAIN),
            "granted to the waiter"
        );
        v.setlk(0, ino, 2, &whole(libc::F_UNLCK), flock).unwrap();
        assert_eq!(v.lock_waits.waiting(), 0);
    }
}

#[test]
fn an_interrupt_ends_only_its_wait_and_takes_no_lock() {
    let (v, _) = vfs();
    let (ino, _) = new_file(&v, b"l");
    v.setlk(0, ino, 1, &whole(libc::F_WRLCK), false).unwrap();
    let a = setlkw_on_thread(&v, 20, ino, 2, false);
    let b = setlkw_on_thread(&v, 22, ino, 3, false);
    v.interrupt(20);
    assert_eq!(a.join().unwrap(), Err(Errno(libc::EINTR)));
    assert!(!b.is_finished());
    v.setlk(0, ino, 1, &whole(libc::F_UNLCK), false).unwrap();
    assert_eq!(b.join().unwrap(), Ok(()));
    // Owner 2 holds nothing: only owner 3's lock is there.
    let l = v.getlk(ino, 4, &whole(libc::F_RDLCK)).unwrap();
    assert!(l.is_some());
    v.release_locks(ino, 3).unwrap();
    assert_eq!(v.getlk(ino, 4, &whole(libc::F_WRLCK)).unwrap(), None);
}

#[test]
fn an_interrupt_read_before_its_request_still_ends_the_wait() {
    let (v, _) = vfs();
    let (ino, _) = new_file(&v, b"l");
    v.setlk(0, ino, 1, &whole(libc::F_WRLCK), true).unwrap();
    v.interrupt(30);
    let w = setlkw_on_thread(&v, 30, ino, 2, true);
    assert_eq!(w.join().unwrap(), Err(Errno(libc::EINTR)));
}

#[test]
fn shutdown_ends_lock_waits_and_refuses_new_ones() {
    let (v, _) = vfs();
    let (ino, _) = new_file(&v, b"l");
    v.setlk(0, ino, 1, &whole(libc::F_WRLCK), false).unwrap();
    let w = setlkw_on_thread(&v, 40, ino, 2, false);
    v.shutdown();
    assert_eq!(w.join().unwrap(), Err(Errno(libc::ENOLCK)));
    assert_eq!(v.begin_lock_wait(42).err(), Some(Errno(libc::ENOLCK)));
}

#[test]
fn blocking_lock_requests_are_bounded() {
    let (v, _) = vfs();
    let waits: Vec<_> = (0..LOCK_WAITERS_MAX as u64)
        .map(|r| v.begin_lock_wait(r).unwrap())
        .collect();
    assert_eq!(
        v.begin_lock_wait(LOCK_WAITERS_MAX as u64).err(),
        Some(Errno(libc::ENOLCK))
    );
    drop(waits);
    assert!(v.begin_lock_wait(0).is_ok());
}

#[test]
fn closes_are_flushed_once_the_mount_took_a_posix_lock() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"l");
    let flushed = |flags| open_and_close(&v, ino, flags).flush_at_close;
    assert!(
        !flushed(libc::O_RDONLY),
        "nothing to do at a read-only close"
    );
    assert!(flushed(libc::O_RDWR));
    v.setlk(0, ino, 1, &whole(libc::F_WRLCK), true).unwrap();
    assert!(!flushed(libc::O_RDONLY), "flock locks go at the last close");
    v.setlk(0, ino, 1, &whole(libc::F_RDLCK), false).unwrap();
    // Any close by the owner must drop its POSIX locks: read-only ones too.
    assert!(flushed(libc::O_RDONLY));
    v.release(fh, None).unwrap();
}

#[test]
fn a_posix_lock_through_an_unflushed_handle_goes_at_its_release() {
    let (v, _) = vfs();
    let (ino, fh) = new_file(&v, b"l");
    v.release(fh, None).unwrap();
    // Opened before the mount's first POSIX lock: its close is not flushed (NOFLUSH).
    let o = v.open_file(&root(), ino, libc::O_RDONLY).unwrap();
    assert!(!o.flush_at_close);
    v.setlk(o.fh, ino, 7, &whole(libc::F_RDLCK), false).unwrap();
    assert!(v.getlk(ino, 8, &whole(libc::F_WRLCK)).unwrap().is_some());
    // The kernel names no owner at this release: the handle remembers it.
    v.release(o.fh, None).unwrap();
    assert_eq!(v.getlk(ino, 8, &whole(libc::F_WRLCK)).unwrap(), None);
}

#[test]
fn a_release_after_a_flush_leaves_locks_taken_anew_elsewhere() {
    let (v, _) = vfs();
    let (ino, first) = new_file(&v, b"l");
    v.setlk(first, ino, 7, &whole(libc::F_WRLCK), false)
        .unwrap();
    // close(2) by owner 7 drops its locks...
    v.flush(first, Some(7)).unwrap();
    assert_eq!(v.getlk(ino, 8, &whole(libc::F_WRLCK)).unwrap(), None);
    // ...which then locks again through another descriptor, while a child still holds
    // the first open: the first handle's last release must not drop the new lock.
    let second = v.open(&root(), ino, libc::O_RDWR).unwrap();
    v.setlk(second, ino, 7, &whole(libc::F_WRLCK), false)
        .unwrap();
    v.release(first, None).unwrap();
    assert!(v.getlk(ino, 8, &whole(libc::F_WRLCK)).unwrap().is_some());
    v.release(second, Some(7)).unwrap();
    assert_eq!(v.getlk(ino, 8, &whole(libc::F_WRLCK)).unwrap(), None);
}

/// With READDIRPLUS_AUTO the kernel mixes plain and plus calls on one handle: a plus call
/// on a page read plain gets every entry with its attributes, and the listing goes on to
/// the end. (Before, such entries came without attributes, the adapter left them out, and
/// an empty reply ended the listing.) Seeking back with `seekdir` lands after the same name
/// even after entries before it were removed.
#[test]
fn mixed_plain_and_plus_reads_list_every_entry() {
    let (v, _) = vfs();
    let n = DIR_PAGE + 300;
    let d = fill_dir(&v, b"d", n);
    let dh = v.opendir(&root(), d).unwrap();
    let mut names = Vec::new();
    let mut off = 0;
    let mut mark = None;
    for call in 0.. {
        // The first call plus, then plain ones across the page boundary, then plus again.
        let plus = call == 0 || names.len() > DIR_PAGE + 50;
        let got = v.readdir(&root(), dh, off, plus).unwrap();
        if got.is_empty() {
            break;
        }
        for (next, e) in got.into_iter().take(40) {
            assert!(!plus || e.attr.is_some(), "{:?} without attributes", e.name);
            if e.name == b"e00100" {
                mark = Some(next);
            }
            names.push(String::from_utf8(e.name).unwrap());
            off = next;
        }
    }
    let want: Vec<String> = [".".to_string(), "..".to_string()]
        .into_iter()
        .chain((0..n).map(|i| format!("e{i:05}")))
        .collect();
    assert_eq!(names, want);
    for i in 0..50 {
        v.unlink(&root(), d, format!("e{i:05}").as_bytes()).unwrap();
    }
    let back = v.readdir(&root(), dh, mark.unwrap(), true).unwrap();
    assert_eq!(back[0].1.name, b"e00101");
    v.release(dh, None).unwrap();
}

#[test]
fn passthrough_backings_are_shared_per_version_and_a_refusal_turns_passthrough_off() {
    let (v, _) = vfs();
    v.set_passthrough(true);
    let dir = tempfile::tempdir().unwrap();
    let copy = |n: &str| std::fs::File::create(dir.path().join(n)).unwrap();
    let b: Backings<u32> = Backings::default();
    let opened = std::sync::atomic::AtomicU32::new(0);
    let open = |_: &std::fs::File| {
        Ok::<_, std::io::Error>(opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1)
    };
    let first = b.backing_for(&v, 5, b"v1", copy("a"), open).unwrap();
    b.keep(10, 5, first.clone(), false);
    // A second handle of the same version shares the kernel's one backing file.
    let second = b.backing_for(&v, 5, b"v1", copy("a"), open).unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    b.keep(11, 5, second, false);
    drop(first);
    assert!(b.in_use(5));
    // Changed elsewhere while open: no new backing; the open must share the live one.
    assert!(b.backing_for(&v, 5, b"v2", copy("b"), open).is_none());
    let live = b.live(5).unwrap();
    assert_eq!((live.version.as_slice(), live.writers), (&b"v1"[..], 0));
    // Nor may any handle read through the page cache beside it.
    assert!(!b.cached_open(5, 12));
    // A writer shares it and writes into its copy, which then is the file's length here.
    b.keep(13, 5, live.id.clone(), true);
    assert!(b.written_by(13).is_some() && b.written_copy(5).is_some());
    assert!(b.written_by(10).is_none());
    assert_eq!(b.live(5).unwrap().writers, 1);
    b.set_version(5, b"v3".to_vec());
    assert_eq!(b.live(5).unwrap().version, b"v3");
    drop(live);
    for fh in [10, 11, 13] {
        b.forget(fh);
    }
    assert!(!b.in_use(5) && b.written_copy(5).is_none());
    assert_eq!(*b.backing_for(&v, 5, b"v2", copy("b"), open).unwrap(), 2);
    // The kernel refuses (no CAP_SYS_ADMIN): read-only opens stop offering copies.
    let refused = b.backing_for(&v, 6, b"v1", copy("c"), |_| {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    });
    assert!(refused.is_none());
    assert!(!v.passthrough.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn a_copy_is_mirrored_into_its_file_and_refreshed_from_it() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let (v, _) = vfs();
    let ctx = root();
    let (ino, _, fh) = v
        .create(&ctx, ROOT_INO, b"f", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let old: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    v.write(fh, 0, &old).unwrap();
    v.flush(fh, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy");
    std::fs::write(&path, &old).unwrap();
    let copy = std::fs::File::open(&path).unwrap();
    // Written through the kernel into the copy: a change in the middle, then cut shorter.
    let mut new = old.clone();
    new[1_500_000..1_500_010].copy_from_slice(b"0123456789");
    new.truncate(2_200_000);
    let mut w = crate::passthrough::writable(&copy).unwrap();
    w.set_len(0).unwrap();
    w.write_all(&new).unwrap();
    let s0 = v.copy_stamp(ino).unwrap();
    v.mirror_copy(fh, &copy).unwrap();
    v.flush(fh, None).unwrap();
    assert_eq!(v.read(fh, 0, 4_000_000).unwrap(), new);
    assert_eq!(v.getattr(ino).unwrap().length, new.len() as u64);
    assert_ne!(v.copy_stamp(ino).unwrap(), s0);
    // Longer again, through the copy.
    w.write_all_at(b"tail", new.len() as u64).unwrap();
    new.extend_from_slice(b"tail");
    v.mirror_copy(fh, &copy).unwrap();
    v.flush(fh, None).unwrap();
    assert_eq!(v.read(fh, 0, 4_000_000).unwrap(), new);
    // The file changed another way: the copy is brought up to date in place.
    v.write(fh, 10, b"abc").unwrap();
    v.flush(fh, None).unwrap();
    v.setattr(&ctx, ino, &SetAttr::default(), Some(1_000_000))
        .unwrap();
    new[10..13].copy_from_slice(b"abc");
    new.truncate(1_000_000);
    v.refresh_copy(fh, &copy).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), new);
    // A read-only handle cannot mirror.
    let r = v.open(&ctx, ino, libc::O_RDONLY).unwrap();
    assert_eq!(v.mirror_copy(r, &copy), Err(Errno::EBADF));
    v.release(r, None).unwrap();
    v.release(fh, None).unwrap();
}

#[test]
fn control_requests_answer_figures_marks_and_refuse_strangers() {
    use aquifer_control as control;
    let (v, _) = vfs();
    let owner = Caller {
        // SAFETY: geteuid has no preconditions.
        uid: unsafe { libc::geteuid() },
        pid: 0,
    };
    let stranger = Caller {
        uid: owner.uid.wrapping_add(4242),
        pid: 0,
    };
    assert_eq!(
        v.control(owner, ROOT_INO, control::STATS, &[], 100).err(),
        Some(Errno(libc::ENOTTY)),
        "no figures to give"
    );
    v.set_figures(Arc::new(|| b"{\"figures\":1}".to_vec()));
    let (n, json) = v
        .control(stranger, ROOT_INO, control::STATS, &[], 5)
        .unwrap();
    assert_eq!(
        (n, json.as_slice()),
        (5, &b"{\"fig"[..]),
        "cut to the room given"
    );
    assert_eq!(
        v.control(owner, ROOT_INO, 0xdead, &[], 0).err(),
        Some(Errno(libc::ENOTTY))
    );
    assert_eq!(
        v.control(owner, ROOT_INO, control::WARM, &[1, 2, 3], 32)
            .err(),
        Some(Errno::EINVAL)
    );
    let req = |op| {
        control::WarmRequest {
            op,
            off: 0,
            len: u64::MAX,
        }
        .encode()
    };
    // A caller the daemon cannot see (pid 0) with another uid may look, not change.
    let ino = file_with(&v, b"f", &[7u8; 3000]);
    for op in [
        control::WarmOp::Warm,
        control::WarmOp::Evict,
        control::WarmOp::Mark,
    ] {
        assert_eq!(
            v.control(stranger, ino, control::WARM, &req(op), 32).err(),
            Some(Errno::EPERM)
        );
    }
    let (_, out) = v
        .control(
            stranger,
            ino,
            control::WARM,
            &req(control::WarmOp::Check),
            32,
        )
        .unwrap();
    let reply = control::WarmReply::decode(&out.try_into().unwrap());
    assert_eq!((reply.errno, reply.total), (0, 3000));
    // The owner marks directories; the node daemon reads them back, latest last.
    for (dir, op) in [
        (ROOT_INO, control::WarmOp::Mark),
        (ino, control::WarmOp::Mark),
        (ROOT_INO, control::WarmOp::Unmark),
    ] {
        v.control(owner, dir, control::WARM, &req(op), 32).unwrap();
    }
    let (_, b) = v
        .control(stranger, ROOT_INO, control::MARKS, &[], 4096)
        .unwrap();
    assert_eq!(
        control::decode_marks(&b),
        vec![(ino, true), (ROOT_INO, false)]
    );
}

#[test]
fn reads_without_a_handle_see_committed_bytes_and_refuse_directories() {
    // The kernel's no-open mode (read-only mounts): READ carries no handle.
    let (v, _) = vfs();
    let ctx = root();
    let (ino, _, fh) = v
        .create(&ctx, ROOT_INO, b"f", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    v.write(fh, 0, &data).unwrap();
    v.release(fh, None).unwrap();
    assert_eq!(v.read_ino(ino, 0, 400_000).unwrap(), data);
    assert_eq!(v.read_ino(ino, 299_990, 100).unwrap(), data[299_990..]);
    assert!(v.read_ino(ino, 400_000, 10).unwrap().is_empty());
    assert_eq!(v.read_ino(ROOT_INO, 0, 10), Err(Errno::EISDIR));
    assert!(v.read_ino(9_999_999, 0, 10).is_err());
}
