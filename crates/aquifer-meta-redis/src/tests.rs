//! The metadata conformance suite on a real `redis-server` (started here on 127.0.0.1, or the
//! one `AQUIFER_TEST_REDIS` names), and what only this engine does: outages, indexes.

use super::*;
use aquifer_meta::conformance::SHARED_SESSION_TIMEOUT;
use aquifer_meta::url::MetaUrl;
use aquifer_meta::{Attrs, Files, KvMeta, Namespace, Sessions, Volume};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `redis-server` on `port` in `dir`. The child gets SIGKILL when the thread that
/// started it ends, so it is started from a thread that lives as long as the process.
pub(crate) fn start_server(port: u16, dir: &std::path::Path) -> Child {
    let dir = dir.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: prctl in the child before exec touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("redis-server is needed by these tests: run scripts/install-deps.sh --test");
        tx.send(child).unwrap();
        loop {
            std::thread::park();
        }
    });
    let child = rx.recv().unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Remove the data directories of test servers whose test process is gone: a server dies
/// with its process (PR_SET_PDEATHSIG), its directory would stay behind in /tmp.
fn remove_dead_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("aquifer-redis-")
            .and_then(|r| r.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn server() -> &'static String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(u) = std::env::var("AQUIFER_TEST_REDIS") {
            return u;
        }
        remove_dead_runs();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("aquifer-redis-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::mem::forget(start_server(port, &dir));
        format!("redis://127.0.0.1:{port}/0")
    })
}

fn parse(url: &str) -> RedisUrl {
    match MetaUrl::parse(url).unwrap() {
        MetaUrl::Redis(r) => r,
        other => panic!("{other:?}"),
    }
}

/// A volume tag no other case in this process uses.
fn fresh_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn open(tag: &str) -> RedisKv {
    RedisKv::open(&parse(server()))
        .unwrap()
        .with_volume_tag(tag)
}

/// Deletes the case's keys when it ends.
pub(crate) struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = open(&self.0).destroy_volume();
    }
}

fn fresh() -> (KvMeta<RedisKv>, Cleanup) {
    let tag = fresh_tag();
    (KvMeta::new(open(&tag)), Cleanup(tag))
}

fn pair() -> (KvMeta<RedisKv>, KvMeta<RedisKv>, Cleanup) {
    let tag = fresh_tag();
    // Two clients with their own connections, as two mounts would have.
    (
        KvMeta::new(open(&tag)).with_session_timeout(SHARED_SESSION_TIMEOUT),
        KvMeta::new(open(&tag)).with_session_timeout(SHARED_SESSION_TIMEOUT),
        Cleanup(tag),
    )
}

mod conformance {
    use super::*;
    aquifer_meta::meta_conformance!(fresh());
    aquifer_meta::meta_conformance_shared!(pair());
}

/// Every case again with one commit in three losing its answer.
mod lossy {
    use super::*;
    use aquifer_meta::fault::LossyKv;

    fn fresh_every(every: u64) -> (KvMeta<LossyKv<RedisKv>>, Cleanup) {
        let tag = fresh_tag();
        let seed = aquifer_meta::conformance::fault_seed();
        (
            KvMeta::new(LossyKv::new(open(&tag), seed, every)),
            Cleanup(tag),
        )
    }

    type Lossy = KvMeta<LossyKv<RedisKv>>;
    fn pair() -> (Lossy, Lossy, Cleanup) {
        let tag = fresh_tag();
        let seed = aquifer_meta::conformance::fault_seed();
        let t = SHARED_SESSION_TIMEOUT;
        (
            KvMeta::new(LossyKv::new(open(&tag), seed, 3)).with_session_timeout(t),
            KvMeta::new(LossyKv::new(open(&tag), seed + 1, 3)).with_session_timeout(t),
            Cleanup(tag),
        )
    }

    aquifer_meta::meta_conformance!(fresh_every(3));
    aquifer_meta::meta_conformance_shared!(pair());
    aquifer_meta::meta_conformance_lossy!(fresh_every(0));
}

#[test]
fn keys_are_grouped_and_tagged() {
    let (m, _c) = fresh();
    let ctx = aquifer_meta::Context::root();
    m.format(&aquifer_meta::conformance::test_format(4 << 20), false)
        .unwrap();
    m.new_session(aquifer_meta::conformance::test_session("h"))
        .unwrap();
    let d = m
        .mknod(
            &ctx,
            1,
            b"d",
            aquifer_meta::FileType::Directory,
            0o755,
            0,
            0,
        )
        .unwrap()
        .0;
    for i in 0..5 {
        m.mknod(
            &ctx,
            d,
            format!("f{i}").as_bytes(),
            aquifer_meta::FileType::File,
            0o644,
            0,
            0,
        )
        .unwrap();
    }
    let kv = m.engine_ref();
    let mut c = kv.take_connection().unwrap();
    let mut dir_key = kv.prefix.clone();
    dir_key.push(b'E');
    dir_key.extend_from_slice(&d.to_be_bytes());
    let typ: String = redis::cmd("TYPE").arg(&dir_key).query(&mut c).unwrap();
    assert_eq!(typ, "hash", "a directory is one hash");
    let n: usize = redis::cmd("HLEN").arg(&dir_key).query(&mut c).unwrap();
    assert_eq!(n, 5);
    let mut used = kv.prefix.clone();
    used.extend_from_slice(b"NtotalInodes");
    let v: String = redis::cmd("GET").arg(&used).query(&mut c).unwrap();
    assert_eq!(v, "7", "counters are decimal for INCRBY");
    // Attributes: 64 inodes to a hash, kept compact (a listpack), one field per inode.
    let f0 = m.lookup(&ctx, d, b"f0").unwrap().0;
    let mut bucket = kv.prefix.clone();
    bucket.push(b'I');
    bucket.extend_from_slice(&(f0 / 64).to_be_bytes());
    let typ: String = redis::cmd("TYPE").arg(&bucket).query(&mut c).unwrap();
    assert_eq!(typ, "hash");
    let enc: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(&bucket)
        .query(&mut c)
        .unwrap();
    assert_eq!(
        enc, "listpack",
        "attributes stay in Redis's compact encoding"
    );
    let attr: Vec<u8> = redis::cmd("HGET")
        .arg(&bucket)
        .arg(&[(f0 % 64) as u8][..])
        .query(&mut c)
        .unwrap();
    assert!(attr.len() < 40, "attributes are {} bytes", attr.len());
    let mut plain = kv.prefix.clone();
    plain.push(b'I');
    plain.extend_from_slice(&f0.to_be_bytes());
    let n: usize = redis::cmd("EXISTS").arg(&plain).query(&mut c).unwrap();
    assert_eq!(n, 0, "no key per inode");
    // Deleting a session's last open file drops its group from the index.
    let f = m.lookup(&ctx, d, b"f0").unwrap().0;
    m.open(&ctx, f, libc::O_RDONLY).unwrap();
    let idx = kv.index_key(b'O');
    let members: usize = redis::cmd("ZCARD").arg(&idx).query(&mut c).unwrap();
    assert_eq!(members, 1);
    m.close(f).unwrap();
    let members: usize = redis::cmd("ZCARD").arg(&idx).query(&mut c).unwrap();
    assert_eq!(members, 0, "an emptied group leaves the index");
}

#[test]
fn unreachable_server_is_one_clear_error() {
    let port = free_port();
    let t = Instant::now();
    let e = RedisKv::open(&parse(&format!("redis://:hunter2@127.0.0.1:{port}/0")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot connect"), "{e}");
    assert!(!e.contains("hunter2"), "the password is never printed: {e}");
    assert!(t.elapsed() < Duration::from_secs(5), "no retrying at open");
}

#[test]
fn wrong_password_is_refused() {
    let port = free_port();
    let dir = tempdir("auth");
    let mut child = start_server(port, &dir);
    let mut c = Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query::<()>(&mut c)
        .unwrap();
    let e = RedisKv::open(&parse(&format!("redis://:wrong@127.0.0.1:{port}/0")))
        .err()
        .unwrap()
        .to_string();
    assert!(!e.contains("wrong@"), "{e}");
    RedisKv::open(&parse(&format!("redis://:right@127.0.0.1:{port}/0"))).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn volume_of_the_old_layout_is_refused() {
    // Database 15 of the shared server: no other case uses it.
    let url = server().replace("/0", "/15");
    let mut c = Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let old_root = b"{15}I\0\0\0\0\0\0\0\x01".to_vec();
    redis::cmd("SET")
        .arg(&old_root)
        .arg("x")
        .query::<()>(&mut c)
        .unwrap();
    let e = RedisKv::open(&parse(&url)).err().map(|e| e.to_string());
    redis::cmd("DEL")
        .arg(&old_root)
        .query::<()>(&mut c)
        .unwrap();
    let e = e.expect("an old volume is refused");
    assert!(e.contains("older aquifer") && e.contains("dump"), "{e}");
    RedisKv::open(&parse(&url)).unwrap();
    // The same name is now the hash of inodes 64-127: a volume that has them opens.
    redis::cmd("HSET")
        .arg(&old_root)
        .arg(&[1u8][..])
        .arg("x")
        .query::<()>(&mut c)
        .unwrap();
    let r = RedisKv::open(&parse(&url)).map(|_| ());
    redis::cmd("DEL")
        .arg(&old_root)
        .query::<()>(&mut c)
        .unwrap();
    r.unwrap();
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("aquifer-redis-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server restarted under a running workload: operations wait and then succeed; past the
/// deadline they fail with an engine error (EIO), and nothing is half-applied.
#[test]
fn operations_survive_a_restart_and_fail_after_the_deadline() {
    let port = free_port();
    let dir = tempdir("restart");
    let mut child = start_server(port, &dir);
    let url = parse(&format!("redis://127.0.0.1:{port}/0"));
    let m = KvMeta::new(
        RedisKv::open(&url)
            .unwrap()
            .with_retry_deadline(Duration::from_secs(20)),
    );
    let ctx = aquifer_meta::Context::root();
    m.format(&aquifer_meta::conformance::test_format(4 << 20), false)
        .unwrap();
    m.new_session(aquifer_meta::conformance::test_session("h"))
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let made = std::thread::scope(|s| {
        let w = s.spawn(|| {
            let mut made = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("f{made}");
                match m.mknod(
                    &ctx,
                    1,
                    name.as_bytes(),
                    aquifer_meta::FileType::File,
                    0o644,
                    0,
                    0,
                ) {
                    Ok(_) => {}
                    // Its EXEC applied but the reply was lost with the server: the retry
                    // found the file made.
                    Err(e) if e.errno() == aquifer_meta::Errno::EEXIST => {}
                    Err(e) => panic!("a create through a restart waits, then succeeds: {e}"),
                }
                made += 1;
            }
            made
        });
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap();
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        child = start_server(port, &dir);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap()
    });
    assert!(made > 0);
    // Every create acknowledged is there (appendfsync always), and the counters match.
    let names = m.readdir(&ctx, 1, false).unwrap().len() as u64;
    assert_eq!(names, made);
    assert_eq!(m.usage().unwrap().1, names + 1, "counters match the tree");
    // A server gone for good: EIO after the deadline, not a hang.
    child.kill().unwrap();
    child.wait().unwrap();
    let short = KvMeta::new(RedisKv {
        deadline: Duration::from_secs(1),
        ..RedisKv::open_unchecked(&url)
    });
    let t = Instant::now();
    let e = short.getattr(1).unwrap_err();
    assert_eq!(e.errno(), aquifer_meta::Errno::EIO);
    assert!(t.elapsed() < Duration::from_secs(8));
}

/// The change feed: a client is not told its own commits, and whatever may have lost it
/// commits — a sequence number skipped (an entry trimmed, or lost in a failover), the
/// follower's connection cut — is reported as a gap, never passed over.
#[test]
fn the_feed_skips_own_commits_and_reports_gaps() {
    use aquifer_meta::conformance::{test_format, test_session};
    use aquifer_meta::{Change, FileType, ROOT_INO};
    let (a, b, c) = pair();
    let ctx = aquifer_meta::Context::root();
    a.format(&test_format(1 << 16), false).unwrap();
    a.new_session(test_session("a")).unwrap();
    b.new_session(test_session("b")).unwrap();
    let mut f = a.follow().expect("redis keeps a feed");
    let wait = Duration::from_millis(300);
    assert_eq!(f.next(wait).unwrap(), vec![Change::Everything]);
    let mk = |m: &KvMeta<RedisKv>, name: &[u8]| {
        m.mknod(&ctx, ROOT_INO, name, FileType::File, 0o644, 0, 0)
            .unwrap()
    };
    mk(&a, b"mine");
    mk(&b, b"theirs");
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while !got.contains(&Change::Entry(ROOT_INO, b"theirs".to_vec())) && Instant::now() < end {
        got.extend(f.next(wait).unwrap());
    }
    assert!(
        got.contains(&Change::Entry(ROOT_INO, b"theirs".to_vec())),
        "{got:?}"
    );
    assert!(
        !got.contains(&Change::Entry(ROOT_INO, b"mine".to_vec())),
        "{got:?}"
    );
    // An entry the follower never sees: its number is taken, the entry is not written.
    let mut raw = redis::Client::open(server().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let seq_key = format!("{{{}}}feedseq", c.0);
    redis::cmd("INCR")
        .arg(&seq_key)
        .query::<i64>(&mut raw)
        .unwrap();
    mk(&b, b"after-a-gap");
    let got = f.next(Duration::from_secs(2)).unwrap();
    assert_eq!(got, vec![Change::Everything], "a skipped number is a gap");
    // The follower's connection cut: an error, then a gap.
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut raw).unwrap();
    let name = format!("name=aquifer-feed:{{{}}} ", c.0);
    let id = list
        .lines()
        .find(|l| l.contains(&name))
        .and_then(|l| l.strip_prefix("id="))
        .and_then(|l| l.split(' ').next())
        .expect("the follower's connection is named")
        .to_string();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query::<i64>(&mut raw)
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..20 {
        match f.next(wait) {
            Ok(c) => {
                answers.push(c);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    assert_eq!(answers, vec![vec![Change::Everything]]);
}
