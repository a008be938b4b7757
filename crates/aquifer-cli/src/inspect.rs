//! `aquifer status`, `dump` and `load`: a volume's settings, sessions and usage, and its
//! whole namespace out and in.

use crate::volume::{meta_err, open_meta};
use anyhow::{anyhow, Context as _, Result};
use clap::Args;

#[derive(Args)]
pub(crate) struct StatusArgs {
    meta_url: String,
}

#[derive(Args)]
pub(crate) struct DumpArgs {
    meta_url: String,
    /// Where to write: a file, or `-` for stdout.
    file: String,
    /// Keep the object store's secret key in the dump (removed by default).
    #[arg(long)]
    keep_secret_key: bool,
}

#[derive(Args)]
pub(crate) struct LoadArgs {
    meta_url: String,
    /// The dump to read: a file, or `-` for stdin.
    file: String,
}

pub(crate) fn status(a: StatusArgs) -> Result<()> {
    let meta = open_meta(&a.meta_url, false, true)?;
    let f = meta.load_format().map_err(meta_err)?;
    // Heartbeats are stamped with the metadata server's clock; so is their age.
    let now = meta.clock().map_err(meta_err)?.sec;
    let sessions: Vec<serde_json::Value> = meta
        .list_sessions()
        .map_err(meta_err)?
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["heartbeat_age_secs"] = (now - s.heartbeat).into();
            v
        })
        .collect();
    let (used, inodes) = meta.usage().map_err(meta_err)?;
    let out = serde_json::json!({
        "setting": f.redacted(),
        "sessions": sessions,
        "usage": { "used_bytes": used, "inodes": inodes },
    });
    print_out(&format!("{}\n", serde_json::to_string_pretty(&out)?))
}

/// Write to stdout; a reader that went away (`| head`, `| grep -q`) is not an error.
pub(crate) fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

pub(crate) fn dump(a: DumpArgs) -> Result<()> {
    let meta = open_meta(&a.meta_url, false, true)?;
    let sum = if a.file == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        aquifer_meta::dump::dump(&*meta, &mut out, a.keep_secret_key).map_err(meta_err)?
    } else {
        // Written beside, renamed when complete: a failed dump leaves no half file.
        let tmp = format!("{}.tmp", a.file);
        let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {tmp}"))?;
        let mut out = std::io::BufWriter::new(f);
        let sum = aquifer_meta::dump::dump(&*meta, &mut out, a.keep_secret_key);
        let sum = match sum {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(meta_err(e));
            }
        };
        out.into_inner()
            .map_err(|e| anyhow!("writing {}: {e}", a.file))?
            .sync_all()
            .with_context(|| format!("writing {}", a.file))?;
        std::fs::rename(&tmp, &a.file).with_context(|| format!("cannot write {}", a.file))?;
        sum
    };
    eprintln!(
        "dumped {} inodes ({} bytes of files)",
        sum.inodes, sum.used_space
    );
    Ok(())
}

pub(crate) fn load(a: LoadArgs) -> Result<()> {
    let mut input: Box<dyn std::io::BufRead> = if a.file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin().lock()))
    } else {
        let f = std::fs::File::open(&a.file).with_context(|| format!("cannot open {}", a.file))?;
        Box::new(std::io::BufReader::new(f))
    };
    let meta = open_meta(&a.meta_url, true, false)?;
    let sum = aquifer_meta::dump::load(&*meta, &mut input).map_err(meta_err)?;
    meta.close_session().map_err(meta_err)?;
    eprintln!(
        "loaded {} inodes ({} bytes of files)",
        sum.inodes, sum.used_space
    );
    Ok(())
}
