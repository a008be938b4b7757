//! The disk tier as its users see it: through the [`Tier`](crate::Tier) calls, across
//! restarts, damaged files, a full quota, a deleted directory and a failing disk. Shaped as
//! one file because each case crosses several of the tier's parts (queue, io, index,
//! eviction, health).

use super::blockfile::MAGIC;
use super::*;
use crate::file;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;

fn cfg(capacity: u64) -> DiskConfig {
    DiskConfig {
        capacity,
        high: 0.95,
        low: 0.70,
        free_ratio: 0.0,
        retry: Duration::from_millis(50),
    }
}

fn open(root: &Path, capacity: u64) -> DiskTier {
    let t = DiskTier::open(root, cfg(capacity)).unwrap();
    assert!(t.wait_indexed(Duration::from_secs(60)));
    t
}

fn block(n: usize, fill: u8) -> Block {
    Arc::new((0..n).map(|i| fill.wrapping_add(i as u8)).collect())
}

fn put_whole(t: &DiskTier, key: &str, stamp: &[u8], data: &[u8]) -> bool {
    let mut fill = |w: &mut dyn Write| w.write_all(data);
    t.whole_put(key, stamp, data.len() as u64, &mut fill)
}

fn read_all(mut f: File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn whole_copies_are_checked_by_stamp_and_checksum_and_survive_restart() {
    let d = tempfile::tempdir().unwrap();
    let data = block(300_000, 7);
    {
        let t = open(d.path(), 64 << 20);
        assert!(t.whole_open("files/1", b"v1").is_none());
        assert!(put_whole(&t, "files/1", b"v1", &data));
        assert_eq!(read_all(t.whole_open("files/1", b"v1").unwrap()), *data);
        // Another version of the file: the old copy is not served, and is gone.
        assert!(t.whole_open("files/1", b"v2").is_none());
        assert!(t.whole_open("files/1", b"v1").is_none());
        assert!(put_whole(&t, "files/1", b"v2", &data));
        assert!(t.usage().bytes >= 300_000);
        // A fill that writes less than it promised leaves no copy.
        let mut short = |w: &mut dyn Write| w.write_all(&data[..10]);
        assert!(!t.whole_put("files/2", b"v1", 300_000, &mut short));
        assert!(t.whole_open("files/2", b"v1").is_none());
    }
    // Indexed again at restart, with its weight.
    let t = open(d.path(), 64 << 20);
    assert!(t.usage().bytes >= 300_000);
    assert_eq!(read_all(t.whole_open("files/1", b"v2").unwrap()), *data);
    // A flipped byte: a miss, counted, and the copy removed.
    let path = t.inner.path("~files/1");
    let mut raw = fs::read(&path).unwrap();
    raw[1234] ^= 1;
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &raw[1234..1235], 1234).unwrap();
    assert!(t.whole_open("files/1", b"v2").is_none());
    assert_eq!(t.corrupt_found(), 1);
    assert!(!path.exists());
}

#[test]
fn a_whole_copy_never_evicts_to_make_room() {
    let d = tempfile::tempdir().unwrap();
    let t = open(d.path(), 4 << 20);
    let big = block(4 << 20, 1);
    assert!(!put_whole(&t, "files/9", b"v", &big));
    assert!(t.whole_open("files/9", b"v").is_none());
}

/// What `du` says: every file's and directory's allocated blocks. A file the background
/// eviction deletes while it is walked counts as gone, as in `du`.
fn du(p: &Path) -> u64 {
    let m = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => panic!("{}: {e}", p.display()),
    };
    let mut n = m.blocks() * 512;
    if m.is_dir() {
        let Ok(entries) = fs::read_dir(p) else {
            return n;
        };
        for e in entries.flatten() {
            n += du(&e.path());
        }
    }
    n
}

#[test]
fn blocks_survive_a_restart_and_the_index_is_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    {
        let t = open(d.path(), 64 << 20);
        for i in 0..20 {
            t.insert(&format!("chunks/0/0/{i}_0_5000"), &block(5000, i as u8));
        }
        t.flush();
        assert_eq!(t.usage().entries, 20);
    }
    let t = open(d.path(), 64 << 20);
    assert_eq!(t.usage().entries, 20);
    for i in 0..20 {
        let b = t.get(&format!("chunks/0/0/{i}_0_5000")).expect("cached");
        assert_eq!(*b, *block(5000, i as u8));
    }
    assert!(t.get("chunks/0/0/99_0_5000").is_none());
}

#[test]
fn reads_before_the_index_is_rebuilt_find_files_by_name() {
    let d = tempfile::tempdir().unwrap();
    {
        let t = open(d.path(), 64 << 20);
        t.insert("k", &block(100, 1));
    }
    let t = DiskTier::open(d.path(), cfg(64 << 20)).unwrap();
    // Whether or not the scan has finished, the block is there.
    assert_eq!(*t.get("k").unwrap(), *block(100, 1));
    assert!(t.wait_indexed(Duration::from_secs(10)));
    assert_eq!(t.usage().entries, 1);
}

#[test]
fn a_damaged_file_is_a_miss_and_is_replaced() {
    let d = tempfile::tempdir().unwrap();
    let t = open(d.path(), 64 << 20);
    type Damage<'a> = (&'a str, &'a dyn Fn(&Path));
    let damage: [Damage; 4] = [
        ("flipped", &|p| {
            let mut v = fs::read(p).unwrap();
            let n = v.len();
            v[n / 2] ^= 0x10;
            fs::write(p, v).unwrap();
        }),
        ("truncated", &|p| {
            let v = fs::read(p).unwrap();
            fs::write(p, &v[..v.len() - 1]).unwrap();
        }),
        ("other version", &|p| {
            let mut v = fs::read(p).unwrap();
            v[4] = 9;
            fs::write(p, v).unwrap();
        }),
        ("emptied", &|p| fs::write(p, b"").unwrap()),
    ];
    for (i, (what, f)) in damage.iter().enumerate() {
        let key = format!("k{i}");
        t.insert(&key, &block(10_000, 3));
        t.flush();
        let p = t.inner.path(&key);
        f(&p);
        assert!(t.get(&key).is_none(), "{what}: served");
        assert!(!p.exists(), "{what}: not removed");
        assert!(!t.contains(&key));
        t.insert(&key, &block(10_000, 3));
        t.flush();
        assert_eq!(*t.get(&key).unwrap(), *block(10_000, 3), "{what}");
    }
    assert_eq!(t.corrupt_found(), 4);
}

#[test]
fn du_stays_within_the_quota_and_eviction_runs_from_high_to_low() {
    let d = tempfile::tempdir().unwrap();
    let cap = 8 << 20;
    let t = open(d.path(), cap);
    // 3x the quota, written as fast as the tier takes it.
    for i in 0..(3 * cap / 100_000) {
        t.insert(&format!("b{i}"), &block(100_000, i as u8));
        if i % 8 == 0 {
            t.flush();
            t.housekeep_now();
        }
        let du = du(d.path());
        assert!(du <= cap + 200_000, "du {du} over the quota {cap}");
    }
    t.flush();
    t.housekeep_now();
    let u = t.usage();
    assert!(u.bytes <= cap, "{u:?}");
    assert!(u.evicted > 0);
    assert!(du(d.path()) <= cap);
    // Past the high watermark, eviction goes down to the low one.
    let before = t.usage().bytes;
    assert!(before as f64 <= 0.96 * cap as f64, "{before}");
}

#[test]
fn a_hot_set_survives_a_scan_of_three_times_the_cache() {
    let d = tempfile::tempdir().unwrap();
    // The directories take about 1 MiB of it.
    let cap = 16 << 20;
    let t = DiskTier::open(d.path(), cfg(cap)).unwrap();
    assert!(t.wait_indexed(Duration::from_secs(10)));
    let sz = 40_000;
    // A quarter of the cache, read again more than a rehit apart.
    for i in 0..100 {
        t.insert(&format!("hot{i}"), &block(sz, 1));
    }
    t.flush();
    std::thread::sleep(crate::mem::REHIT);
    for i in 0..100 {
        assert!(t.get(&format!("hot{i}")).is_some());
    }
    for i in 0..(3 * cap as usize / sz) {
        t.insert(&format!("scan{i}"), &block(sz, 2));
        if i % 20 == 0 {
            t.flush();
            t.housekeep_now();
        }
    }
    t.flush();
    t.housekeep_now();
    let kept = (0..100).filter(|i| t.contains(&format!("hot{i}"))).count();
    assert!(
        kept >= 90,
        "only {kept} of 100 hot blocks survived the scan"
    );
}

/// The hot set's second read is answered by RAM: the disk tier must still count it, or a
/// scan pushes the hot set off the disk as soon as RAM lets it go.
#[test]
fn a_hot_set_read_from_ram_survives_a_scan_on_disk() {
    let d = tempfile::tempdir().unwrap();
    let cap = 16 << 20;
    let disk = Arc::new(open(d.path(), cap));
    let ram = Arc::new(crate::MemTier::new(8 << 20));
    let cache = crate::Cache::new(vec![ram.clone(), disk.clone()]);
    let sz = 40_000;
    for i in 0..100 {
        cache.insert(&format!("hot{i}"), &block(sz, 1));
    }
    disk.flush();
    std::thread::sleep(crate::mem::REHIT);
    for i in 0..100 {
        assert!(ram.contains(&format!("hot{i}")));
        assert!(cache.get(&format!("hot{i}")).is_some());
    }
    for i in 0..(3 * cap as usize / sz) {
        cache.insert(&format!("scan{i}"), &block(sz, 2));
        if i % 20 == 0 {
            disk.flush();
            disk.housekeep_now();
        }
    }
    disk.flush();
    disk.housekeep_now();
    let kept = (0..100)
        .filter(|i| disk.contains(&format!("hot{i}")))
        .count();
    assert!(kept >= 90, "only {kept} of 100 hot blocks kept on disk");
}

#[test]
fn a_deleted_directory_is_a_miss_then_made_again() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("vol");
    let t = open(&root, 64 << 20);
    t.insert("a", &block(1000, 1));
    t.flush();
    fs::remove_dir_all(&root).unwrap();
    assert!(t.get("a").is_none());
    t.housekeep_now();
    t.insert("b", &block(1000, 2));
    t.flush();
    assert_eq!(*t.get("b").unwrap(), *block(1000, 2));
    assert_eq!(t.usage().entries, 1);
}

#[test]
fn a_failing_disk_is_taken_out_of_use_and_tried_again() {
    let d = tempfile::tempdir().unwrap();
    let t = open(d.path(), 64 << 20);
    t.insert("a", &block(1000, 1));
    t.flush();
    // Writes fail: `tmp` is a file now.
    let tmp = d.path().join("tmp");
    fs::remove_dir_all(&tmp).unwrap();
    fs::write(&tmp, b"in the way").unwrap();
    t.insert("b", &block(1000, 2));
    t.flush();
    assert!(!t.in_use());
    assert!(t.get("a").is_none(), "out of use: every read is a miss");
    // Still broken at the retry: still out.
    std::thread::sleep(Duration::from_millis(60));
    t.housekeep_now();
    assert!(!t.in_use());
    fs::remove_file(&tmp).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    t.housekeep_now();
    assert!(t.in_use());
    assert_eq!(*t.get("a").unwrap(), *block(1000, 1));
}

#[test]
fn an_index_of_100000_blocks_is_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let n = 100_000;
    {
        let t = open(d.path(), 1 << 40);
        // Written straight to their places: the write path is tested elsewhere.
        for i in 0..n {
            let k = format!("chunks/0/{}/{i}_0_64", i / 1000);
            let b = block(64, i as u8);
            let mut v = file::header(MAGIC, &b).to_vec();
            v.extend_from_slice(&b);
            fs::write(t.inner.path(&k), v).unwrap();
        }
    }
    let start = Instant::now();
    let t = open(d.path(), 1 << 40);
    eprintln!("indexed {n} blocks in {:?}", start.elapsed());
    assert_eq!(t.usage().entries, n);
    let k = "chunks/0/54/54321_0_64";
    assert_eq!(*t.get(k).unwrap(), *block(64, 54321u32 as u8));
}
