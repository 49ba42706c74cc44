//! The VM's disk: a qcow2 overlay on the cached base image, made and grown
//! with `qemu-img`. The base's detected format is passed as the backing
//! format (`-F`), so QEMU never probes it. Disks only grow: shrinking
//! would cut off the guest's filesystem, so a smaller size keeps the disk
//! as it is (prepare never fails for it: the VM controller reports the
//! refusal in the VM's status), and a live resize to a smaller size is
//! refused.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use vmctl_api::limits::human_bytes;

use crate::drivers::LocalImage;
#[cfg(test)]
use crate::images::inspect;
use crate::images::{InspectError, inspect_as};

/// Diagnostic code of a failed overlay creation.
pub const OVERLAY_CREATION_FAILED: &str = "vmctl::image::overlay_creation_failed";
/// Diagnostic code of a refused shrink.
pub const SHRINK_REFUSED: &str = "vmctl::disk::shrink_refused";

/// One GiB in bytes.
pub const GIB: u64 = 1 << 30;

/// Errors of the disk operations.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `qemu-img` could not be run.
    #[error("Cannot run qemu-img")]
    Spawn(#[source] std::io::Error),
    /// `qemu-img create` failed.
    #[error("Cannot create overlay {} on {base}: {stderr}", path.display())]
    Create {
        /// The overlay.
        path: PathBuf,
        /// The base image.
        base: String,
        /// qemu-img's standard error.
        stderr: String,
    },
    /// `qemu-img resize` failed.
    #[error("Cannot grow {} to {}: {stderr}", path.display(), human_bytes(*bytes))]
    Resize {
        /// The overlay.
        path: PathBuf,
        /// The requested size.
        bytes: u64,
        /// qemu-img's standard error.
        stderr: String,
    },
    /// The requested size is smaller than the disk.
    #[error(
        "Disk of {} is smaller than the existing {}; disks cannot shrink",
        human_bytes(*requested_bytes),
        human_bytes(*current_bytes)
    )]
    ShrinkRefused {
        /// The requested size in bytes.
        requested_bytes: u64,
        /// The disk's size in bytes.
        current_bytes: u64,
    },
    /// The base or the overlay could not be inspected.
    #[error("Cannot inspect {}", path.display())]
    Inspect {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: InspectError,
    },
}

impl DiskError {
    /// The diagnostic code.
    pub fn code(&self) -> &'static str {
        match self {
            DiskError::ShrinkRefused { .. } => SHRINK_REFUSED,
            _ => OVERLAY_CREATION_FAILED,
        }
    }

    /// What the user can do about it.
    pub fn help(&self) -> Option<&'static str> {
        match self {
            DiskError::ShrinkRefused { .. } => Some(
                "set `disk` to at least the current size, or delete and recreate the VM to get a smaller disk",
            ),
            _ => None,
        }
    }
}

/// What [`ensure_overlay`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskAction {
    /// The overlay was created.
    Created,
    /// The overlay was grown.
    Grown,
    /// Nothing needed doing (or the size asked is smaller, which keeps
    /// the disk as it is).
    Unchanged,
}

/// Makes sure `overlay` exists on `base`, at least `disk_gib` large (and
/// at least the base's size: an overlay never cuts its base off).
pub async fn ensure_overlay(
    base: &LocalImage,
    overlay: &Path,
    disk_gib: Option<u64>,
) -> Result<DiskAction, DiskError> {
    let mut want = disk_gib.map(|g| g.saturating_mul(GIB));
    if overlay.exists() {
        let current = virtual_size(overlay).await?;
        return match growth(current, want) {
            Some(w) => {
                resize(overlay, w).await?;
                Ok(DiskAction::Grown)
            }
            None => Ok(DiskAction::Unchanged),
        };
    }
    let base_path = std::path::absolute(&base.path).unwrap_or_else(|_| PathBuf::from(&base.path));
    let base_size = match base.virtual_size_bytes {
        Some(s) => s,
        // The recorded format, never a probe of the base.
        None => inspect_as(&base_path, &base.format)
            .await
            .map(|i| i.virtual_size)
            .map_err(|source| DiskError::Inspect {
                path: base_path.clone(),
                source,
            })?,
    };
    if want.is_some_and(|w| w < base_size) {
        // Smaller than the image: made at the image's size (the VM
        // controller reports that the size asked was not applied).
        want = None;
    }
    // Created beside the final name and renamed, so that a crash never
    // leaves a half-made overlay that a later prepare would take as done.
    let tmp = overlay.with_extension("qcow2.partial");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&base_path)
        .args(["-F", &base.format])
        .arg(&tmp);
    if let Some(w) = want {
        cmd.arg(w.to_string());
    }
    if let Err(stderr) = run(&mut cmd).await? {
        let _ = std::fs::remove_file(&tmp);
        return Err(DiskError::Create {
            path: overlay.to_owned(),
            base: base.path.clone(),
            stderr,
        });
    }
    std::fs::rename(&tmp, overlay).map_err(DiskError::Spawn)?;
    Ok(DiskAction::Created)
}

/// Creates an empty qcow2 disk of `bytes` at `path` (an extra disk),
/// beside the final name first so that a crash never leaves a half-made
/// one.
pub async fn create_blank(path: &Path, bytes: u64) -> Result<(), DiskError> {
    let tmp = path.with_extension("qcow2.partial");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(&tmp)
        .arg(bytes.to_string());
    if let Err(stderr) = run(&mut cmd).await? {
        let _ = std::fs::remove_file(&tmp);
        return Err(DiskError::Create {
            path: path.to_owned(),
            base: "(empty)".into(),
            stderr,
        });
    }
    std::fs::rename(&tmp, path).map_err(DiskError::Spawn)
}

/// The size in bytes a disk of `current` bytes must grow to for `want`
/// bytes, if it must: never a smaller one.
pub fn growth(current: u64, want: Option<u64>) -> Option<u64> {
    want.filter(|w| *w > current)
}

/// Grows the qcow2 file of a stopped VM's disk to `bytes` with
/// `qemu-img resize`; a smaller `bytes` is refused
/// ([`DiskError::ShrinkRefused`]) and changes nothing.
pub async fn grow_file(path: &Path, bytes: u64) -> Result<(), DiskError> {
    let current = virtual_size(path).await?;
    if bytes < current {
        return Err(DiskError::ShrinkRefused {
            requested_bytes: bytes,
            current_bytes: current,
        });
    }
    if bytes > current {
        resize(path, bytes).await?;
    }
    Ok(())
}

/// The virtual size in bytes of a VM's disk (a qcow2 overlay vmctl made;
/// the format is given, never probed).
pub async fn virtual_size(path: &Path) -> Result<u64, DiskError> {
    inspect_as(path, "qcow2")
        .await
        .map(|i| i.virtual_size)
        .map_err(|source| DiskError::Inspect {
            path: path.to_owned(),
            source,
        })
}

async fn resize(path: &Path, bytes: u64) -> Result<(), DiskError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["resize", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(bytes.to_string());
    run(&mut cmd).await?.map_err(|stderr| DiskError::Resize {
        path: path.to_owned(),
        bytes,
        stderr,
    })
}

/// Runs a command: `Ok(Err(stderr))` when it ran and failed.
async fn run(cmd: &mut Command) -> Result<Result<(), String>, DiskError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if out.status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn base(dir: &Path, fmt: &str, size: &str) -> LocalImage {
        let path = dir.join(format!("base.{fmt}"));
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(&path)
            .arg(size)
            .status()
            .unwrap();
        assert!(st.success());
        LocalImage {
            path: path.display().to_string(),
            format: fmt.to_owned(),
            size_bytes: 0,
            virtual_size_bytes: None,
        }
    }

    #[tokio::test]
    async fn overlay_records_backing_format_and_keeps_base_size() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), "raw", "64M").await;
        let ov = dir.path().join("disk.qcow2");
        assert_eq!(
            ensure_overlay(&b, &ov, None).await.unwrap(),
            DiskAction::Created
        );
        let info = inspect(&ov).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.backing_file.as_deref(), Some(b.path.as_str()));
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-U"])
            .arg(&ov)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("backing file format: raw"));
        assert_eq!(
            ensure_overlay(&b, &ov, None).await.unwrap(),
            DiskAction::Unchanged
        );
    }

    /// Issue 16: a prepare with a smaller `disk` failed, so the VM never
    /// started again. The disk keeps its size and prepare succeeds; only an
    /// explicit resize to a smaller size is refused.
    #[tokio::test]
    async fn shrunk_disk_keeps_its_size_and_prepare_does_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), "qcow2", "1G").await;
        let ov = dir.path().join("disk.qcow2");
        assert_eq!(
            ensure_overlay(&b, &ov, Some(2)).await.unwrap(),
            DiskAction::Created
        );
        assert_eq!(virtual_size(&ov).await.unwrap(), 2 * GIB);
        assert_eq!(
            ensure_overlay(&b, &ov, Some(3)).await.unwrap(),
            DiskAction::Grown
        );
        assert_eq!(virtual_size(&ov).await.unwrap(), 3 * GIB);
        assert_eq!(
            ensure_overlay(&b, &ov, Some(2)).await.unwrap(),
            DiskAction::Unchanged
        );
        assert_eq!(virtual_size(&ov).await.unwrap(), 3 * GIB);
        let err = grow_file(&ov, 2 * GIB).await.unwrap_err();
        assert_eq!(err.code(), SHRINK_REFUSED);
        assert_eq!(
            err.to_string(),
            "Disk of 2 GiB is smaller than the existing 3 GiB; disks cannot shrink"
        );
        assert_eq!(virtual_size(&ov).await.unwrap(), 3 * GIB);
        grow_file(&ov, 4 * GIB).await.unwrap();
        assert_eq!(virtual_size(&ov).await.unwrap(), 4 * GIB);
    }

    #[tokio::test]
    async fn new_disk_smaller_than_base_gets_the_base_size() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), "qcow2", "2G").await;
        let ov = dir.path().join("disk.qcow2");
        assert_eq!(
            ensure_overlay(&b, &ov, Some(1)).await.unwrap(),
            DiskAction::Created
        );
        assert_eq!(virtual_size(&ov).await.unwrap(), 2 * GIB);
    }

    #[tokio::test]
    async fn missing_base_fails_with_overlay_code() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalImage {
            path: dir.path().join("missing.qcow2").display().to_string(),
            format: "qcow2".into(),
            size_bytes: 0,
            virtual_size_bytes: Some(GIB),
        };
        let err = ensure_overlay(&b, &dir.path().join("d.qcow2"), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), OVERLAY_CREATION_FAILED);
    }
}
