//! Filesystems named by CSI secrets, the directories that are volumes in them, and the one
//! mount of each filesystem per node that every volume of it is published from.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use tonic::Status;

/// An aquifer filesystem as its CSI secret describes it. `Debug` prints no secret.
#[derive(Clone)]
pub struct Filesystem {
    pub name: String,
    pub metaurl: String,
    pub(crate) storage: Option<String>,
    pub(crate) bucket: Option<String>,
    pub(crate) access_key: Option<String>,
    pub(crate) secret_key: Option<String>,
    pub(crate) format_options: Vec<String>,
    /// As given, for the node daemon that mounts the filesystem (see `keeper`).
    pub(crate) secrets: HashMap<String, String>,
}

impl std::fmt::Debug for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filesystem")
            .field("name", &self.name)
            .field("metaurl", &split_password(&self.metaurl).0)
            .finish_non_exhaustive()
    }
}

/// `key=value,key2` or `--key=value --key2` as command-line flags.
pub(crate) fn flags(s: &str) -> Vec<String> {
    s.split([',', ' ', '\n', '\t'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            if x.starts_with("--") {
                x.to_string()
            } else {
                format!("--{x}")
            }
        })
        .collect()
}

impl Filesystem {
    /// The filesystem a request's secrets name (the keys of JuiceFS CSI secrets).
    pub fn from_secrets(s: &HashMap<String, String>) -> Result<Filesystem, Status> {
        let get = |k: &str| {
            s.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the volume's secret has no `{k}` (needed: name, metaurl; for a volume to \
                     format also storage and bucket)"
                ))
            })
        };
        Ok(Filesystem {
            name: need("name")?,
            metaurl: need("metaurl")?,
            storage: get("storage"),
            bucket: get("bucket"),
            access_key: get("access-key"),
            secret_key: get("secret-key"),
            format_options: get("format-options").map(|o| flags(&o)).unwrap_or_default(),
            secrets: s.clone(),
        })
    }

    /// A stable name for this filesystem's mount on a node with mount `options` (FNV-1a of
    /// URL, name and the sorted options): StorageClasses with other options on one
    /// filesystem (a checkpoint class with an upload limit beside a dataset class with a
    /// large cache) get daemons of their own.
    pub fn key(&self, options: &[String]) -> String {
        let mut opts: Vec<String> = options.iter().flat_map(|o| flags(o)).collect();
        opts.sort();
        let parts = [self.metaurl.as_str(), self.name.as_str()]
            .into_iter()
            .chain(opts.iter().map(String::as_str));
        let h = crate::fnv1a(parts.flat_map(|p| p.bytes().chain([0])));
        format!("{}-{h:016x}", self.name)
    }
}

/// `scheme://user:password@rest` as the URL without the password, and the password: the
/// password goes to `aquifer` through `META_PASSWORD`, never on a command line (`ps`).
pub fn split_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    match userinfo.split_once(':') {
        Some((user, pw)) => {
            let at = if user.is_empty() {
                String::new()
            } else {
                format!("{user}@")
            };
            (format!("{scheme}://{at}{host}"), Some(pw.to_string()))
        }
        None => (url.to_string(), None),
    }
}

/// The directory of volume `id` within its filesystem: relative, without `..`.
pub fn volume_dir(id: &str) -> Result<PathBuf, Status> {
    let p = Path::new(id.trim_start_matches('/'));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "volume path {id:?} must stay inside the filesystem"
                )))
            }
        }
    }
    Ok(out)
}

/// The directory name a CreateVolume makes: the StorageClass's `pathPattern` with
/// `${pvc.metadata.name}`, `${pvc.metadata.namespace}` and `${pv.metadata.name}` filled in
/// (the provisioner passes them with `--extra-create-metadata`), else the PV's name.
///
/// A pattern should map distinct claims to distinct directories: join namespace and name
/// with `_` or `/`, which Kubernetes names never contain (`${ns}-${name}` maps `team/a-ckpt`
/// and `team-a/ckpt` to one directory). Where a pattern does collide, the second claim is
/// refused, not given the first one's directory (see `owner`).
pub fn dir_name(pv_name: &str, params: &HashMap<String, String>) -> Result<String, Status> {
    let Some(pattern) = params.get("pathPattern").filter(|p| !p.is_empty()) else {
        return Ok(pv_name.to_string());
    };
    let mut out = pattern.clone();
    for (var, key) in [
        ("${pvc.metadata.name}", "csi.storage.k8s.io/pvc/name"),
        (
            "${pvc.metadata.namespace}",
            "csi.storage.k8s.io/pvc/namespace",
        ),
    ] {
        if out.contains(var) {
            let v = params.get(key).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "pathPattern uses {var}, which needs the provisioner's --extra-create-metadata"
                ))
            })?;
            // A value is one name: with a `/` or as `..` it would reach another claim's
            // directory. Kubernetes names never are (DNS-1123).
            if v.is_empty() || v.contains('/') || v == "." || v == ".." {
                return Err(Status::invalid_argument(format!(
                    "{key} {v:?} is not a Kubernetes object name"
                )));
            }
            out = out.replace(var, v);
        }
    }
    out = out.replace("${pv.metadata.name}", pv_name);
    if out.contains("${") {
        return Err(Status::invalid_argument(format!(
            "pathPattern {pattern:?}: only ${{pvc.metadata.name}}, ${{pvc.metadata.namespace}} \
             and ${{pv.metadata.name}} are known"
        )));
    }
    volume_dir(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secrets_name_a_filesystem_and_are_never_printed() {
        let fs = Filesystem::from_secrets(&secrets(&[
            ("name", "data"),
            ("metaurl", "redis://:hunter2@10.0.0.1:6379/1"),
            ("secret-key", "s3cr3t"),
            ("format-options", "block-size=1024,compression=lz4"),
        ]))
        .unwrap();
        let shown = format!("{fs:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        assert_eq!(
            fs.format_options,
            vec!["--block-size=1024", "--compression=lz4"]
        );
        // Keys name mount points and cache dirs on nodes: they must not change.
        assert_eq!(fs.key(&[]), "data-72150cfec5d707a7");
        let opts = |o: &[&str]| o.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            fs.key(&opts(&["a=1", "b"])),
            fs.key(&opts(&["b", "a=1"])),
            "the order of options does not matter"
        );
        assert_eq!(
            fs.key(&opts(&["upload-limit=100"])),
            "data-0fdebe487215085c"
        );
        let e = Filesystem::from_secrets(&secrets(&[("name", "x")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("metaurl"));
    }

    #[test]
    fn passwords_leave_the_url() {
        assert_eq!(
            split_password("redis://:pw@h:1/2"),
            ("redis://h:1/2".into(), Some("pw".into()))
        );
        assert_eq!(
            split_password("redis://u:p@w@h:1/2"),
            ("redis://u@h:1/2".into(), Some("p@w".into()))
        );
        assert_eq!(
            split_password("redis://h:1/2"),
            ("redis://h:1/2".into(), None)
        );
        assert_eq!(
            split_password("rocksdb:///x"),
            ("rocksdb:///x".into(), None)
        );
    }

    #[test]
    fn volume_paths_stay_inside() {
        assert_eq!(volume_dir("pvc-1").unwrap(), PathBuf::from("pvc-1"));
        assert_eq!(volume_dir("/data/set").unwrap(), PathBuf::from("data/set"));
        assert_eq!(volume_dir("/").unwrap(), PathBuf::from(""));
        assert!(volume_dir("../etc").is_err());
        assert!(volume_dir("a/../../b").is_err());
    }

    #[test]
    fn path_patterns() {
        let p = secrets(&[
            (
                "pathPattern",
                "${pvc.metadata.namespace}-${pvc.metadata.name}",
            ),
            ("csi.storage.k8s.io/pvc/name", "ckpt"),
            ("csi.storage.k8s.io/pvc/namespace", "team-a"),
        ]);
        assert_eq!(dir_name("pv-9", &p).unwrap(), "team-a-ckpt");
        let p = secrets(&[
            (
                "pathPattern",
                "c/${pvc.metadata.namespace}_${pvc.metadata.name}",
            ),
            ("csi.storage.k8s.io/pvc/name", "../x"),
            ("csi.storage.k8s.io/pvc/namespace", "team"),
        ]);
        assert_eq!(
            dir_name("pv", &p).unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "a name with a / reaches another directory"
        );
        assert_eq!(dir_name("pv-9", &HashMap::new()).unwrap(), "pv-9");
        let bad = secrets(&[("pathPattern", "${pvc.metadata.labels}")]);
        assert_eq!(
            dir_name("pv", &bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let up = secrets(&[("pathPattern", "../${pv.metadata.name}")]);
        assert!(dir_name("pv", &up).is_err());
    }
}
