//! `aquifer fluid-mount`: the FUSE container of a Fluid ThinRuntime (k8s/examples/fluid.yaml).
//! Fluid writes what the Dataset and ThinRuntime say to a JSON file in the container; this
//! turns it into an `aquifer mount` in the foreground, at the path Fluid serves pods from.
//!
//! - `mounts[0].mountPoint`: the metadata URL, without its password;
//! - `mounts[0].options`: `aquifer mount` flags (`cache-size: 200G`; `"true"` or `""` for a
//!   flag without value);
//! - `mounts[0].encryptOptions` (Fluid gives the files its Secret is mounted at):
//!   `meta-password` and `secret-key` go to the daemon through its environment, never argv;
//! - `targetPath`: the mount point.

use anyhow::{bail, Context as _, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct FluidMountArgs {
    /// The runtime configuration Fluid writes into the FUSE container.
    #[arg(long, default_value = "/etc/fluid/config/config.json")]
    config: PathBuf,
}

/// What to run: `aquifer mount` arguments and environment, and the mount point.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub target: String,
}

/// The mount a Fluid runtime configuration asks for; `read` reads the files encrypt options
/// name.
pub fn plan(config: &serde_json::Value, read: impl Fn(&str) -> Result<String>) -> Result<Plan> {
    let mounts = config["mounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let [m] = mounts else {
        bail!(
            "the Dataset must have exactly one mount (the aquifer metadata URL), it has {}",
            mounts.len()
        );
    };
    let Some(url) = m["mountPoint"].as_str().filter(|u| !u.is_empty()) else {
        bail!("the Dataset's mount has no mountPoint (the aquifer metadata URL)");
    };
    let Some(target) = config["targetPath"].as_str().filter(|t| !t.is_empty()) else {
        bail!("the runtime configuration has no targetPath");
    };
    let mut args = vec!["mount".to_string(), url.to_string(), target.to_string()];
    if let Some(opts) = m["options"].as_object() {
        for (k, v) in opts {
            match v.as_str().unwrap_or_default() {
                "" | "true" => args.push(format!("--{k}")),
                v => args.push(format!("--{k}={v}")),
            }
        }
    }
    let mut env = Vec::new();
    if let Some(enc) = m["encryptOptions"].as_object() {
        for (k, v) in enc {
            let path = v.as_str().unwrap_or_default();
            let value = read(path).with_context(|| format!("encrypt option {k}"))?;
            let value = value.trim_end_matches(['\n', '\r']).to_string();
            match k.as_str() {
                "meta-password" => env.push(("META_PASSWORD".to_string(), value)),
                "secret-key" => env.push(("AQUIFER_SECRET_KEY".to_string(), value)),
                _ => bail!("unknown encrypt option {k:?}: meta-password or secret-key"),
            }
        }
    }
    Ok(Plan {
        args,
        env,
        target: target.to_string(),
    })
}

pub fn fluid_mount(a: FluidMountArgs) -> Result<()> {
    let text = std::fs::read(&a.config).with_context(|| format!("{}", a.config.display()))?;
    let config: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{}", a.config.display()))?;
    let p = plan(&config, |path| {
        std::fs::read_to_string(path).with_context(|| path.to_string())
    })?;
    std::fs::create_dir_all(&p.target).with_context(|| p.target.clone())?;
    let exe = std::env::current_exe().context("cannot find the aquifer binary")?;
    use std::os::unix::process::CommandExt;
    // The mount in the foreground, as this process: Fluid watches the container.
    let e = std::process::Command::new(exe)
        .args(&p.args)
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .exec();
    Err(e).context("cannot run aquifer mount")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_becomes_a_mount() {
        let config = serde_json::json!({
            "mounts": [{
                "mountPoint": "redis://redis.aquifer.svc:6379/1",
                "name": "imagenet",
                "options": {"cache-size": "200G", "read-only": "true"},
                "encryptOptions": {"meta-password": "/etc/fluid/secrets/s/meta-password"}
            }],
            "targetPath": "/runtime-mnt/thin/default/imagenet/thin-fuse"
        });
        let p = plan(&config, |path| {
            assert_eq!(path, "/etc/fluid/secrets/s/meta-password");
            Ok("hunter2\n".into())
        })
        .unwrap();
        assert_eq!(
            p.args,
            [
                "mount",
                "redis://redis.aquifer.svc:6379/1",
                "/runtime-mnt/thin/default/imagenet/thin-fuse",
                "--cache-size=200G",
                "--read-only"
            ]
        );
        assert_eq!(
            p.env,
            [("META_PASSWORD".to_string(), "hunter2".to_string())]
        );
        assert!(!p.args.iter().any(|a| a.contains("hunter2")));
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        let no_read = |_: &str| -> Result<String> { bail!("no file") };
        let e = plan(
            &serde_json::json!({"mounts": [], "targetPath": "/t"}),
            no_read,
        )
        .unwrap_err();
        assert!(e.to_string().contains("exactly one mount"));
        let e = plan(
            &serde_json::json!({"mounts": [{"mountPoint": "redis://h/1"}]}),
            no_read,
        )
        .unwrap_err();
        assert!(e.to_string().contains("targetPath"));
        let e = plan(
            &serde_json::json!({"mounts": [{"mountPoint": "redis://h/1",
                "encryptOptions": {"token": "/x"}}], "targetPath": "/t"}),
            |_| Ok("v".into()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown encrypt option"));
    }
}
