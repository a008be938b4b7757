//! `aquifer warmup` and `aquifer stats`: commands that talk to a live mount through its
//! control ioctls ([`aquifer_control`]), so they work wherever the mount is visible.

use crate::figures::Figures;
use anyhow::{anyhow, bail, Context as _, Result};
use aquifer_control::{self as control, WarmOp, WarmRequest};
use clap::Args;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Each request covers at most this much of a file: big files are warmed by many threads,
/// and progress moves in steps of this.
const RANGE: u64 = 64 << 20;

#[derive(Args)]
pub struct WarmupArgs {
    /// Files and directories (recursively) under a mount.
    paths: Vec<PathBuf>,
    /// Also the paths listed in this file, one per line (`-` for stdin).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Requests in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Drop the files' blocks from the cache instead.
    #[arg(long, conflicts_with = "check")]
    evict: bool,
    /// Only report what share of the files is cached.
    #[arg(long)]
    check: bool,
    /// Run in the background and return at once.
    #[arg(long)]
    background: bool,
}

struct Item {
    path: PathBuf,
    off: u64,
    len: u64,
    /// Index of its file in `files`.
    file: usize,
}

#[derive(Default)]
struct Totals {
    total: AtomicU64,
    cached: AtomicU64,
    done: AtomicU64,
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

/// Every regular file under `p` (not following symlinks), with its size.
fn collect(p: &Path, out: &mut Vec<(PathBuf, u64)>, failed: &mut Vec<(PathBuf, String)>) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_file() => out.push((p.to_path_buf(), m.len())),
        Ok(m) if m.is_dir() => match std::fs::read_dir(p) {
            Ok(rd) => {
                let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                names.sort();
                for n in names {
                    collect(&n, out, failed);
                }
            }
            Err(e) => failed.push((p.to_path_buf(), e.to_string())),
        },
        Ok(_) => {}
        Err(e) => failed.push((p.to_path_buf(), e.to_string())),
    }
}

pub fn warmup(a: WarmupArgs) -> Result<bool> {
    if a.background {
        let exe = std::env::current_exe().context("cannot find the aquifer binary")?;
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|x| x != "--background")
            .collect();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // Its own session: the warm-up outlives the shell that started it.
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().context("cannot start the background warm-up")?;
        println!("warming up in the background (pid {})", child.id());
        return Ok(true);
    }
    let mut paths = a.paths.clone();
    if let Some(list) = &a.file {
        let r: Box<dyn BufRead> = if list.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                File::open(list).with_context(|| format!("--file {}", list.display()))?,
            ))
        };
        for line in r.lines() {
            let line = line.context("reading --file")?;
            let t = line.trim();
            if !t.is_empty() {
                paths.push(PathBuf::from(t));
            }
        }
    }
    if paths.is_empty() {
        bail!("no paths to warm up (give PATH... or --file LIST)");
    }
    let mut files = Vec::new();
    let mut failed: Vec<(PathBuf, String)> = Vec::new();
    for p in &paths {
        collect(p, &mut files, &mut failed);
    }
    let op = if a.check {
        WarmOp::Check
    } else if a.evict {
        WarmOp::Evict
    } else {
        WarmOp::Warm
    };
    let mut queue = VecDeque::new();
    for (i, (p, size)) in files.iter().enumerate() {
        let mut off = 0;
        loop {
            let len = RANGE.min(size - off);
            queue.push_back(Item {
                path: p.clone(),
                off,
                len: len.max(1),
                file: i,
            });
            off += len;
            if off >= *size {
                break;
            }
        }
    }
    let bytes: u64 = files.iter().map(|f| f.1).sum();
    let pb = if std::io::stderr().is_terminal() && op != WarmOp::Check {
        let pb = indicatif::ProgressBar::new(bytes);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{elapsed}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let left: Vec<AtomicU64> = files.iter().map(|_| AtomicU64::new(0)).collect();
    for it in &queue {
        left[it.file].fetch_add(1, Ordering::Relaxed);
    }
    let nfiles = files.len() as u64;
    let files_done = AtomicU64::new(0);
    let totals = Totals::default();
    let queue = Mutex::new(queue);
    let errors: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
    let bad_file: Vec<AtomicU64> = files.iter().map(|_| AtomicU64::new(0)).collect();
    // The mount refused the change (EPERM): the whole command is, once.
    let refused = AtomicBool::new(false);
    let start = Instant::now();
    pb.set_message(format!("0/{nfiles} files"));
    std::thread::scope(|s| {
        for _ in 0..a.threads {
            s.spawn(|| loop {
                let Some(it) = queue.lock().pop_front() else {
                    return;
                };
                if refused.load(Ordering::Relaxed) {
                    return;
                }
                if bad_file[it.file].load(Ordering::Relaxed) == 0 {
                    let r = File::open(&it.path)
                        .map_err(|e| e.to_string())
                        .and_then(|f| {
                            control::warm(
                                &f,
                                WarmRequest {
                                    op,
                                    off: it.off,
                                    len: it.len,
                                },
                            )
                            .map_err(|e| {
                                if e.raw_os_error() == Some(libc::EPERM) {
                                    refused.store(true, Ordering::Relaxed);
                                }
                                e.to_string()
                            })
                        })
                        .and_then(|r| {
                            if r.errno != 0 {
                                Err(std::io::Error::from_raw_os_error(r.errno).to_string())
                            } else {
                                Ok(r)
                            }
                        });
                    match r {
                        Ok(r) => {
                            totals.total.fetch_add(r.total, Ordering::Relaxed);
                            totals.cached.fetch_add(r.cached, Ordering::Relaxed);
                            totals.done.fetch_add(r.done, Ordering::Relaxed);
                        }
                        Err(_) if refused.load(Ordering::Relaxed) => return,
                        Err(e) => {
                            // One line per file, not per range.
                            if bad_file[it.file].fetch_add(1, Ordering::Relaxed) == 0 {
                                pb.suspend(|| eprintln!("warmup: {}: {e}", it.path.display()));
                                errors.lock().push((it.path.clone(), e));
                            }
                        }
                    }
                }
                pb.inc(it.len.min(files[it.file].1));
                if left[it.file].fetch_sub(1, Ordering::Relaxed) == 1 {
                    let n = files_done.fetch_add(1, Ordering::Relaxed) + 1;
                    pb.set_message(format!("{n}/{nfiles} files"));
                }
            });
        }
    });
    pb.finish_and_clear();
    if refused.into_inner() {
        bail!("{}", refusal(op));
    }
    for (p, e) in &failed {
        eprintln!("warmup: {}: {e}", p.display());
    }
    let mut errors = errors.into_inner();
    // Files that failed a request (not paths that were never files).
    let ok_files = nfiles - errors.len().min(nfiles as usize) as u64;
    errors.extend(failed);
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    let (total, cached, done) = (
        totals.total.load(Ordering::Relaxed),
        totals.cached.load(Ordering::Relaxed),
        totals.done.load(Ordering::Relaxed),
    );
    let pct = |x: u64| {
        if total == 0 {
            100.0
        } else {
            x as f64 * 100.0 / total as f64
        }
    };
    match op {
        WarmOp::Check => println!(
            "check: {nfiles} files, {} in blocks, {} cached ({:.1}%)",
            human(total),
            human(cached),
            pct(cached)
        ),
        WarmOp::Evict | WarmOp::Unmark => println!(
            "evict: {ok_files} of {nfiles} files, {} evicted in {secs:.1}s",
            human(done)
        ),
        WarmOp::Warm | WarmOp::Mark => println!(
            "warmup: {ok_files} of {nfiles} files, {} in blocks: {} fetched, {} cached already; {:.1}% cached now; {secs:.1}s, {}/s",
            human(total),
            human(done),
            human(cached),
            pct(cached + done),
            human((done as f64 / secs) as u64)
        ),
    }
    if errors.is_empty() && op != WarmOp::Check {
        mark(&paths, op == WarmOp::Warm)?;
    }
    if !errors.is_empty() {
        eprintln!("warmup: {} paths failed:", errors.len());
        for (p, _) in &errors {
            eprintln!("  {}", p.display());
        }
        return Ok(false);
    }
    Ok(true)
}

/// Tell the mount that the directories among `paths` are now warm (or evicted): on
/// Kubernetes the node daemon labels the node after the volumes marked warm on it. A mount
/// too old to know marks is no error: the warm-up itself succeeded.
fn mark(paths: &[PathBuf], warm: bool) -> Result<()> {
    let op = if warm { WarmOp::Mark } else { WarmOp::Unmark };
    for p in paths.iter().filter(|p| p.is_dir()) {
        let r = File::open(p).and_then(|f| control::warm(&f, WarmRequest { op, off: 0, len: 0 }));
        if let Err(e) = r {
            if e.raw_os_error() == Some(libc::EPERM) {
                bail!("{}", refusal(op));
            }
            if e.kind() != std::io::ErrorKind::Unsupported {
                eprintln!("warmup: {}: cannot mark the directory: {e}", p.display());
            }
        }
    }
    Ok(())
}

/// The one line for a change the mount refused (EPERM, see `aquifer_vfs::privilege`).
fn refusal(op: WarmOp) -> String {
    let what = match op {
        WarmOp::Evict | WarmOp::Unmark => "evicting the node's cache",
        _ => "warming the node's cache",
    };
    format!(
        "not permitted: {what} needs the user that runs the mount (or CAP_SYS_ADMIN); \
         `aquifer warmup --check` and `aquifer stats` are open to all"
    )
}

#[derive(Args)]
pub struct StatsArgs {
    /// A mount point (or any path under one).
    mountpoint: PathBuf,
    /// Seconds between rows.
    #[arg(long, default_value_t = 1.0, value_parser = crate::parse_seconds)]
    interval: f64,
    /// Rows to print, then exit (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Print the figures once as JSON (counters since the mount started) and exit.
    #[arg(long)]
    json: bool,
}

fn snapshot(f: &File) -> Result<Figures> {
    let raw = control::stats(f)?;
    serde_json::from_slice(&raw).map_err(|e| anyhow!("the mount sent unreadable figures: {e}"))
}

pub fn stats(a: StatsArgs) -> Result<()> {
    let f = File::open(&a.mountpoint).with_context(|| format!("{}", a.mountpoint.display()))?;
    let first = snapshot(&f).with_context(|| format!("{}", a.mountpoint.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&first)?);
        return Ok(());
    }
    let interval = Duration::from_secs_f64(a.interval.max(0.1));
    // A member of a cache group also shows the block bytes it got from and sent to peers.
    let group = first.group.is_some();
    print!(
        "{:>8} | {:>8} {:>9} {:>9} | {:>6} {:>6} | {:>6} {:>9} {:>6} {:>9} | {:>8} {:>7}",
        "time",
        "fuse/s",
        "read/s",
        "write/s",
        "mem%",
        "disk%",
        "GET/s",
        "down/s",
        "PUT/s",
        "up/s",
        "staged",
        "evict/s"
    );
    println!(
        "{}",
        if group {
            format!(" | {:>9} {:>9}", "peer-in/s", "peer-out/s")
        } else {
            String::new()
        }
    );
    let mut prev = first;
    let mut rows = 0;
    let t0 = Instant::now();
    loop {
        std::thread::sleep(interval);
        let cur = snapshot(&f)?;
        let secs = interval.as_secs_f64();
        let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / secs;
        let ops = |x: &Figures| x.fuse_ops.values().sum::<u64>();
        let hit = |i: usize| {
            let (Some(p), Some(c)) = (prev.tiers.get(i), cur.tiers.get(i)) else {
                return "-".to_string();
            };
            let h = c.hits.saturating_sub(p.hits);
            let m = c.misses.saturating_sub(p.misses);
            if h + m == 0 {
                "-".to_string()
            } else {
                format!("{:.1}", h as f64 * 100.0 / (h + m) as f64)
            }
        };
        let evicted = |x: &Figures| x.tiers.iter().map(|t| t.evicted).sum::<u64>();
        let peers = match (&prev.group, &cur.group) {
            (Some(p), Some(c)) => format!(
                " | {:>9} {:>10}",
                human(rate(p.figures.peer_bytes_in, c.figures.peer_bytes_in) as u64),
                human(rate(p.figures.peer_bytes_out, c.figures.peer_bytes_out) as u64)
            ),
            _ => String::new(),
        };
        print!(
            "{:>7.0}s | {:>8.0} {:>9} {:>9} | {:>6} {:>6} | {:>6.0} {:>9} {:>6.0} {:>9} | {:>8} {:>7.0}",
            t0.elapsed().as_secs_f64(),
            rate(ops(&prev), ops(&cur)),
            human(rate(prev.read_bytes, cur.read_bytes) as u64),
            human(rate(prev.write_bytes, cur.write_bytes) as u64),
            hit(0),
            hit(cur.tiers.iter().position(|t| t.tier == "disk").unwrap_or(usize::MAX)),
            rate(prev.store.gets, cur.store.gets),
            human(rate(prev.store.get_bytes, cur.store.get_bytes) as u64),
            rate(prev.store.puts, cur.store.puts),
            human(rate(prev.store.put_bytes, cur.store.put_bytes) as u64),
            cur.staged_blocks,
            rate(evicted(&prev), evicted(&cur)),
        );
        println!("{peers}");
        prev = cur;
        rows += 1;
        if a.count > 0 && rows >= a.count {
            return Ok(());
        }
    }
}
