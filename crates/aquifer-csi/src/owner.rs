//! Which PersistentVolume owns a volume's directory.
//!
//! A StorageClass's `pathPattern` maps claims to directories, and two claims may map to one
//! (a pattern an operator wrote carelessly, a claim deleted with `Retain` and made again).
//! A directory made by CreateVolume therefore records the PV it was made for: an extended
//! attribute ([`OWNER_XATTR`]) set on a hidden sibling before the sibling is renamed into
//! place with `RENAME_NOREPLACE`, so the directory never exists without its record and two
//! CreateVolumes racing for one path cannot both win. CreateVolume for another PV refuses
//! it ([`Claim::Taken`], told to the caller without a word about the directory: not its
//! capacity, not its owner); the same PV again (the provisioner retries after a timeout) is
//! the same volume. A directory without a record (a static PV's path, a volume made before
//! records, a directory a user made) belongs to no PV: CreateVolume takes it for nobody,
//! DeleteVolume removes it for nobody. A volume is never made inside another volume, so
//! everything under a volume's directory is its PV's.
//!
//! The PV travels to DeleteVolume in the volume id ([`volume_id`]), the only thing it gets.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The extended attribute that names the PV owning a volume's directory. A `trusted.` one:
/// only a process with CAP_SYS_ADMIN (the driver) reads or sets it, so a pod cannot
/// rewrite its volume's record (the directory is mode 0777, and `user.` attributes follow
/// the mode).
pub const OWNER_XATTR: &str = "trusted.aquifer.csi.owner";
/// The extended attribute that records a volume's capacity on its directory.
pub const CAPACITY_XATTR: &str = "user.aquifer.csi.capacity";

/// One lock per filesystem (its mount point), held by [`claim`]: a filesystem whose
/// engine hangs holds up only its own claims.
static CLAIMS: std::sync::Mutex<
    Option<std::collections::HashMap<std::path::PathBuf, std::sync::Arc<std::sync::Mutex<()>>>>,
> = std::sync::Mutex::new(None);

fn claims_of(root: &Path) -> std::sync::Arc<std::sync::Mutex<()>> {
    let mut m = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    m.get_or_insert_with(Default::default)
        .entry(root.to_path_buf())
        .or_default()
        .clone()
}

/// The id of the volume that PV `pv` owns at directory `dir`: `PV:DIR`, or just `PV` when
/// the directory is named after the PV (no `pathPattern`), as ids were before owners.
/// CreateVolume refuses PV names with a `:`, so the first `:` splits an id.
pub fn volume_id(pv: &str, dir: &str) -> String {
    if pv == dir {
        pv.to_string()
    } else {
        format!("{pv}:{dir}")
    }
}

/// The PV a volume id names as the owner, and the directory: see [`volume_id`].
pub fn parse_volume_id(id: &str) -> (&str, &str) {
    match id.split_once(':') {
        Some((pv, dir)) if !pv.is_empty() && !pv.contains('/') => (pv, dir),
        _ => (id, id),
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// The value of attribute `name` on `p` (not following a symlink); None when it has none.
pub fn get_xattr(p: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let c = cpath(p)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 512];
    // SAFETY: valid C strings; the buffer is as long as said.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(p)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings and value buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The PV that owns directory `p`; None when it has no record. An error when `p` is not there.
fn owner(p: &Path) -> io::Result<Option<Vec<u8>>> {
    std::fs::symlink_metadata(p)?;
    get_xattr(p, OWNER_XATTR)
}

fn capacity(p: &Path) -> i64 {
    get_xattr(p, CAPACITY_XATTR)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// What [`claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The directory was made for the PV.
    Created,
    /// The PV made it before, with this capacity.
    Again,
    /// The PV made it before with another capacity.
    OtherCapacity,
    /// The path is not the PV's: another PV's directory, a directory of no PV, or inside
    /// another PV's directory. Nothing more may be told.
    Taken,
}

/// A hidden sibling of the volume's directory, private to `pv`, where its directory is made.
fn staging_name(pv: &str) -> String {
    format!(".aquifer-csi-new-{:016x}", crate::fnv1a(pv.bytes()))
}

fn is_exists(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY))
}

/// Make directory `rel` under `root` (the filesystem's mount) for PV `pv`, or find it
/// made for `pv` before. Blocking.
pub fn claim(root: &Path, rel: &Path, pv: &str, bytes: i64) -> io::Result<Claim> {
    // The checks below and the rename are not one step: two claims at once (the
    // provisioner calls CreateVolume concurrently) could each pass the other's check and
    // nest one volume in the other. One claim at a time per filesystem in this controller.
    let lock = claims_of(root);
    let _one = lock.lock().unwrap_or_else(|e| e.into_inner());
    // Not inside another volume (at any depth): that volume's PV would see and delete this
    // one.
    for a in rel
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
    {
        match owner(&root.join(a)) {
            Ok(Some(_)) => return Ok(Claim::Taken),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let dir = root.join(rel);
    let examine = |dir: &Path| -> io::Result<Option<Claim>> {
        match owner(dir) {
            Ok(Some(o)) if o == pv.as_bytes() => Ok(Some(if capacity(dir) == bytes {
                Claim::Again
            } else {
                Claim::OtherCapacity
            })),
            Ok(_) => Ok(Some(Claim::Taken)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let Some(c) = examine(&dir)? {
        return Ok(c);
    }
    let parent = dir.parent().unwrap_or(root);
    // A pathPattern may nest (datasets/NAME): its parents are plain directories.
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(staging_name(pv));
    clear_staging(&tmp, pv)?;
    std::fs::create_dir(&tmp)?;
    let made = (|| {
        // Pods of any user share a ReadWriteMany volume (a pod narrows it with its own
        // securityContext); the driver's umask must not decide.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o777))?;
        set_xattr(&tmp, OWNER_XATTR, pv.as_bytes())?;
        set_xattr(&tmp, CAPACITY_XATTR, bytes.to_string().as_bytes())?;
        rename_noreplace(&tmp, &dir)
    })();
    match made {
        Ok(()) => Ok(Claim::Created),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            if is_exists(&e) {
                // Made meanwhile by a CreateVolume racing this one.
                if let Some(c) = examine(&dir)? {
                    return Ok(c);
                }
            }
            Err(e)
        }
    }
}

/// Remove what an earlier attempt for `pv` left at its staging path `tmp`: only a directory
/// that is `pv`'s, or empty.
fn clear_staging(tmp: &Path, pv: &str) -> io::Result<()> {
    match owner(tmp) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(Some(o)) if o == pv.as_bytes() => std::fs::remove_dir_all(tmp),
        Ok(_) => std::fs::remove_dir(tmp),
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: valid C strings; AT_FDCWD with paths as given.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`release`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    Removed,
    /// Not there (deleted before).
    Gone,
    /// There, and not `pv`'s: left alone.
    NotOwned,
}

/// Remove directory `dir` if PV `pv` owns it. Blocking.
pub fn release(dir: &Path, pv: &str) -> io::Result<Release> {
    match owner(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Release::Gone),
        Err(e) => Err(e),
        Ok(Some(o)) if o == pv.as_bytes() => {
            // Renamed away in one step first: a claim made meanwhile at this path (or
            // under it) gets a new directory that the removal below never touches.
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            let gone = dir.with_file_name(format!(
                ".aquifer-deleting-{}-{}",
                name.unwrap_or_default(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            match std::fs::rename(dir, &gone) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Release::Gone),
                Err(e) => return Err(e),
            }
            std::fs::remove_dir_all(&gone)?;
            Ok(Release::Removed)
        }
        Ok(_) => Ok(Release::NotOwned),
    }
}

/// Whether `dir` carries an owner record naming `pv`.
pub fn owned_by(dir: &Path, pv: &str) -> bool {
    matches!(owner(dir), Ok(Some(o)) if o == pv.as_bytes())
}

/// The directory a publish serves for a volume: the `path` of its context, which every
/// volume this driver creates carries; without one the volume is a static PV whose handle
/// is the path, whole, `:` and all.
pub fn published_dir(id: &str, context: &std::collections::HashMap<String, String>) -> String {
    context
        .get("path")
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_owner_and_directory() {
        assert_eq!(volume_id("pvc-1", "pvc-1"), "pvc-1");
        assert_eq!(parse_volume_id("pvc-1"), ("pvc-1", "pvc-1"));
        let id = volume_id("pvc-1", "checkpoints/team_a-ckpt");
        assert_eq!(id, "pvc-1:checkpoints/team_a-ckpt");
        assert_eq!(parse_volume_id(&id), ("pvc-1", "checkpoints/team_a-ckpt"));
        assert_eq!(parse_volume_id("a/b:c"), ("a/b:c", "a/b:c"));
        // A static handle with a `:` is a path, whole, to publish and validate alike.
        let mut ctx = std::collections::HashMap::new();
        assert_eq!(published_dir("datasets:v2", &ctx), "datasets:v2");
        ctx.insert("path".to_string(), "ckpt/team_a".to_string());
        assert_eq!(published_dir("pvc-1:ckpt/team_a", &ctx), "ckpt/team_a");
    }

    #[test]
    fn a_directory_is_its_pvs_only() {
        let t = std::env::temp_dir().join(format!("aquifer-owner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        let rel = Path::new("ckpt/team_a");
        assert_eq!(claim(&t, rel, "pv-1", 5).unwrap(), Claim::Created);
        std::fs::write(t.join(rel).join("f"), b"x").unwrap();
        assert_eq!(claim(&t, rel, "pv-1", 5).unwrap(), Claim::Again);
        assert_eq!(claim(&t, rel, "pv-1", 6).unwrap(), Claim::OtherCapacity);
        assert_eq!(claim(&t, rel, "pv-2", 5).unwrap(), Claim::Taken);
        assert_eq!(
            claim(&t, &rel.join("inner"), "pv-3", 5).unwrap(),
            Claim::Taken,
            "inside another volume"
        );
        assert_eq!(
            claim(&t, &rel.join("x/y"), "pv-3", 5).unwrap(),
            Claim::Taken,
            "deeper inside another volume"
        );
        assert!(!t.join(rel).join("x").exists());
        // A directory of no PV (a static PV's path) is nobody's to take or delete.
        std::fs::create_dir_all(t.join("static")).unwrap();
        assert_eq!(
            claim(&t, Path::new("static"), "pv-4", 0).unwrap(),
            Claim::Taken
        );
        assert_eq!(
            release(&t.join("static"), "static").unwrap(),
            Release::NotOwned
        );
        assert_eq!(release(&t.join(rel), "pv-2").unwrap(), Release::NotOwned);
        assert!(t.join(rel).join("f").exists());
        // Nothing staged is left beside the volume.
        let left: Vec<_> = std::fs::read_dir(t.join("ckpt"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(release(&t.join(rel), "pv-1").unwrap(), Release::Removed);
        assert_eq!(release(&t.join(rel), "pv-1").unwrap(), Release::Gone);
        // A staging directory an interrupted attempt left is cleared by the retry.
        let tmp = t.join("ckpt").join(staging_name("pv-5"));
        std::fs::create_dir(&tmp).unwrap();
        assert_eq!(
            claim(&t, Path::new("ckpt/b"), "pv-5", 0).unwrap(),
            Claim::Created
        );
        assert!(!tmp.exists());
        std::fs::remove_dir_all(&t).unwrap();
    }
}
