//! Format detection with `qemu-img info --output=json`.
//!
//! `-U` (force share) lets an image that a running VM holds open be
//! inspected; info only reads headers, so the lock would protect nothing.
//!
//! Images vmctl did not make ([`inspect_untrusted`]: every Image source)
//! are never handed to qemu-img to probe: opening an image makes QEMU open
//! whatever files it names (a qcow2's backing or external data file, a
//! vmdk's extents, `json:`/`nbd:` pseudo-files), so a hostile image could
//! make a guest read host files or reach the network. Instead:
//!
//! ```text
//!   header ──magic──▶ qcow2 ──header: backing? data file? encrypted? unknown features?──▶ refuse
//!     │                 └──────────▶ qemu-img info -f qcow2 ──reports a reference?──▶ refuse
//!     ├──▶ raw (no known magic) ──▶ qemu-img info -f raw
//!     └──▶ vmdk, vdi, vhdx, vpc, qed, luks, …: refuse (convert it to qcow2)
//! ```
//!
//! The format found is recorded, and everything that opens the image later
//! names it (`-F` for overlays, `format=` on `-drive`), so QEMU never
//! probes it either.

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
    /// The header could not be read.
    #[error("Cannot read the image header")]
    Read(#[source] std::io::Error),
    /// The image is not one vmctl opens: see [`Refusal`].
    #[error("The image is refused: {0}")]
    Refused(#[source] Refusal),
}

/// Why an image of unknown origin is not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It names a backing file.
    #[error("it refers to backing file {0:?}")]
    BackingFile(String),
    /// It names an external data file (qcow2 `data_file`) or other file
    /// outside itself.
    #[error("it refers to {what} {name:?} outside itself")]
    External {
        /// What kind of reference (`external data file`).
        what: &'static str,
        /// The name it gives.
        name: String,
    },
    /// A format other than raw and qcow2 (vmdk extents, vhdx and vpc
    /// parents, LUKS keys, … are not checked, so none is opened).
    #[error("it is a {0} image; vmctl uses raw and qcow2 images only")]
    Format(&'static str),
    /// A qcow2 image that is encrypted, or sets feature bits vmctl does
    /// not know.
    #[error("it is a qcow2 image with {0}")]
    Features(String),
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
    /// The external data file a qcow2 image refers to, if any.
    pub data_file: Option<String>,
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
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(serde::Deserialize)]
struct FormatSpecific {
    data: Option<serde_json::Value>,
}

/// Runs `qemu-img info` on `path`, letting it probe the format. Only for
/// images vmctl made or a user inspects by hand; see [`inspect_untrusted`].
pub async fn inspect(path: impl AsRef<Path>) -> Result<ImageInfo, InspectError> {
    qemu_img_info(path.as_ref(), None).await
}

/// Runs `qemu-img info -f format` on `path`: the format is given, never
/// probed.
pub async fn inspect_as(path: impl AsRef<Path>, format: &str) -> Result<ImageInfo, InspectError> {
    qemu_img_info(path.as_ref(), Some(format)).await
}

/// Inspects an image of unknown origin without letting QEMU open anything
/// it names (see the module docs): the format comes from the header, only
/// raw and self-contained, unencrypted qcow2 are accepted, and qemu-img's
/// report is checked again for references outside the file.
///
/// Errors: [`InspectError::Refused`] for an image that must not be opened,
/// [`InspectError::Read`] if its header cannot be read, and the errors of
/// `qemu-img info`.
pub async fn inspect_untrusted(path: impl AsRef<Path>) -> Result<ImageInfo, InspectError> {
    let path = path.as_ref();
    let head = read_head(path).await.map_err(InspectError::Read)?;
    let format = probe(&head).map_err(InspectError::Refused)?;
    let info = qemu_img_info(path, Some(format)).await?;
    if let Some(b) = info.backing_file.clone() {
        return Err(InspectError::Refused(Refusal::BackingFile(b)));
    }
    if let Some(d) = info.data_file.clone() {
        return Err(InspectError::Refused(Refusal::External {
            what: "external data file",
            name: d,
        }));
    }
    Ok(info)
}

/// Bytes of the header looked at: a qcow2's header extensions lie within
/// its first cluster, which is at most 2 MiB.
const HEAD_LEN: u64 = 2 << 20;

async fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let f = tokio::fs::File::open(path).await?;
    let mut head = Vec::new();
    f.take(HEAD_LEN).read_to_end(&mut head).await?;
    Ok(head)
}

/// The format of an image from its first bytes: `raw` or `qcow2`, or the
/// reason it is refused.
pub(crate) fn probe(head: &[u8]) -> Result<&'static str, Refusal> {
    const OTHERS: &[(usize, &[u8], &str)] = &[
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"QED\0", "qed"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
        (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
        (64, b"\x7f\x10\xda\xbe", "vdi"),
    ];
    if head.starts_with(b"QFI\xfb") {
        return qcow2::check(head).map(|()| "qcow2");
    }
    for (at, magic, name) in OTHERS {
        if head.get(*at..).is_some_and(|h| h.starts_with(magic)) {
            return Err(Refusal::Format(name));
        }
    }
    Ok("raw")
}

/// The qcow2 header (docs/interop/qcow2.txt in QEMU's source), read only
/// as far as it can name other files or need a key.
mod qcow2 {
    use super::Refusal;

    /// Incompatible feature bit 2: the data lives in an external file.
    const EXTERNAL_DATA: u64 = 1 << 2;
    /// Bits 0–4 are the ones defined (dirty, corrupt, external data,
    /// compression type, extended L2).
    const KNOWN_INCOMPATIBLE: u64 = 0b1_1111;
    /// Header extension naming the external data file.
    const EXT_DATA_FILE: u32 = 0x4441_5441;
    /// Header extension of a LUKS-encrypted image.
    const EXT_CRYPTO: u32 = 0x0537_be77;

    fn be32(h: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(h.get(at..at + 4)?.try_into().ok()?))
    }

    fn be64(h: &[u8], at: usize) -> Option<u64> {
        Some(u64::from_be_bytes(h.get(at..at + 8)?.try_into().ok()?))
    }

    fn name(h: &[u8], at: u64, len: u64) -> String {
        let (at, len) = (at as usize, len.min(4096) as usize);
        h.get(at..at.saturating_add(len))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| format!("<{len} bytes at offset {at}>"))
    }

    /// `Ok` if the header names nothing outside the file and needs no key.
    pub(super) fn check(h: &[u8]) -> Result<(), Refusal> {
        let short = || Refusal::Features("a truncated header".into());
        let version = be32(h, 4).ok_or_else(short)?;
        if !(2..=3).contains(&version) {
            return Err(Refusal::Format(if version == 1 {
                "qcow (version 1)"
            } else {
                "qcow2 of an unknown version"
            }));
        }
        let backing_offset = be64(h, 8).ok_or_else(short)?;
        let backing_len = be32(h, 16).ok_or_else(short)?;
        if backing_offset != 0 || backing_len != 0 {
            return Err(Refusal::BackingFile(name(
                h,
                backing_offset,
                backing_len.into(),
            )));
        }
        if be32(h, 32).ok_or_else(short)? != 0 {
            return Err(Refusal::Features("encryption".into()));
        }
        let (incompatible, header_len) = if version == 3 {
            (
                be64(h, 72).ok_or_else(short)?,
                be32(h, 100).ok_or_else(short)?,
            )
        } else {
            (0, 72)
        };
        if incompatible & EXTERNAL_DATA != 0 {
            return Err(Refusal::External {
                what: "external data file",
                name: data_file_name(h, header_len as usize)
                    .unwrap_or_else(|| "(named when opened)".into()),
            });
        }
        if incompatible & !KNOWN_INCOMPATIBLE != 0 {
            return Err(Refusal::Features(format!(
                "unknown incompatible features {:#x}",
                incompatible & !KNOWN_INCOMPATIBLE
            )));
        }
        // Extensions: type, length, data padded to 8 bytes, until type 0.
        let mut at = header_len as usize;
        while let (Some(kind), Some(len)) = (be32(h, at), be32(h, at + 4)) {
            match kind {
                0 => return Ok(()),
                EXT_DATA_FILE => {
                    return Err(Refusal::External {
                        what: "external data file",
                        name: name(h, at as u64 + 8, len.into()),
                    });
                }
                EXT_CRYPTO => return Err(Refusal::Features("encryption".into())),
                _ => {}
            }
            at = at
                .saturating_add(8)
                .saturating_add((len as usize).next_multiple_of(8));
        }
        // Extensions past what was read: QEMU would read them; refuse
        // rather than guess.
        Err(Refusal::Features(
            "header extensions beyond its first 2 MiB".into(),
        ))
    }

    fn data_file_name(h: &[u8], mut at: usize) -> Option<String> {
        while let (Some(kind), Some(len)) = (be32(h, at), be32(h, at + 4)) {
            if kind == 0 {
                return None;
            }
            if kind == EXT_DATA_FILE {
                return Some(name(h, at as u64 + 8, len.into()));
            }
            at = at
                .saturating_add(8)
                .saturating_add((len as usize).next_multiple_of(8));
        }
        None
    }
}

async fn qemu_img_info(path: &Path, format: Option<&str>) -> Result<ImageInfo, InspectError> {
    let path = qemu_safe_path(path);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "-U", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let mut child = cmd
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
    let data = info.format_specific.and_then(|f| f.data);
    Ok(ImageInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        backing_file: info.backing_filename.or(info.full_backing_filename),
        data_file: data
            .as_ref()
            .and_then(|d| d.get("data-file"))
            .and_then(|d| d.as_str())
            .map(str::to_owned),
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
