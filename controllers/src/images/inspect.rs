//! Format detection with `qemu-img info --output=json`.
//!
//! `-U` (force share) lets an image that a running VM holds open be
//! inspected; info only reads headers, so the lock would protect nothing.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// How long `qemu-img info` may take; it reads headers only, so a hang
/// means a stuck filesystem rather than a large image.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of [`inspect`].
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// `qemu-img` could not be started (not installed, not executable).
    #[error("Cannot run qemu-img")]
    Spawn(#[source] std::io::Error),
    /// `qemu-img info` exited unsuccessfully.
    #[error("qemu-img info {status}: {stderr}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `qemu-img info` did not finish within a minute.
    #[error("qemu-img info did not finish in {0:?}")]
    Timeout(Duration),
    /// Its output is not the JSON document expected.
    #[error("Unexpected qemu-img info output")]
    Parse(#[source] serde_json::Error),
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format driver (`qcow2`, `raw`, `vmdk`, …).
    pub format: String,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Space the file takes on the host, when reported.
    pub actual_size: Option<u64>,
    /// The backing file the image refers to, if any.
    pub backing_file: Option<String>,
}

#[derive(serde::Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

/// Runs `qemu-img info` on `path`.
pub async fn inspect(path: impl AsRef<Path>) -> Result<ImageInfo, InspectError> {
    let path = qemu_safe_path(path.as_ref());
    let mut child = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(InspectError::Spawn)?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let run = async {
        use tokio::io::AsyncReadExt;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        // Read both pipes to the end before waiting, so that a chatty
        // qemu-img cannot block on a full pipe.
        let read_out = async {
            if let Some(mut s) = stdout {
                s.read_to_end(&mut out).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let read_err = async {
            if let Some(mut s) = stderr {
                s.read_to_end(&mut err).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::try_join!(read_out, read_err)?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(INSPECT_TIMEOUT, run)
        .await
        .map_err(|_| InspectError::Timeout(INSPECT_TIMEOUT))?
        .map_err(InspectError::Spawn)?;
    if !status.success() {
        return Err(InspectError::Failed {
            status,
            stderr: String::from_utf8_lossy(&err).trim().to_owned(),
        });
    }
    let info: QemuImgInfo = serde_json::from_slice(&out).map_err(InspectError::Parse)?;
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        backing_file: info.backing_filename,
    })
}

/// qemu-img reads `proto:rest` as a protocol (`nbd:`, `json:`) when the
/// colon comes before any slash; an absolute path never does.
fn qemu_safe_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| Path::new(".").join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img {args:?}");
    }

    #[tokio::test]
    async fn detects_qcow2_and_raw() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "64M"]);
        let info = inspect(&q).await.unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.backing_file, None);

        let r = dir.path().join("b:c.img");
        std::fs::write(&r, vec![0u8; 4096]).unwrap();
        let info = inspect(&r).await.unwrap();
        assert_eq!(info.format, "raw");
        assert_eq!(info.virtual_size, 4096);
    }

    #[tokio::test]
    async fn reports_a_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ]);
        let info = inspect(&top).await.unwrap();
        assert_eq!(info.backing_file.as_deref(), base.to_str());
    }

    #[tokio::test]
    async fn missing_file_fails_with_qemu_img_message() {
        let err = inspect("/nonexistent/x.img").await.unwrap_err();
        assert!(matches!(err, InspectError::Failed { .. }), "{err:?}");
    }
}
