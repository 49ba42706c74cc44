//! Reading the local files a VMFile or manifest names (scripts, uploads,
//! user-data, SSH keys) to take their content digest.
//!
//! Only regular files up to the size limit of their use
//! ([`FileUse::max_bytes`]) are accepted: a device such as `/dev/zero`
//! would be read forever, and opening a FIFO waits for a writer. The file
//! is checked before it is opened (so a device is never opened), opened
//! without blocking, checked again on the open handle, and read no
//! further than the limit, so even a file that grows meanwhile cannot
//! hang the reader.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::limits::{FileUse, human_bytes};

/// Why a local file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LocalFileError {
    /// Nothing is at the path.
    #[error("does not exist")]
    NotFound,
    /// The path is a directory, device, FIFO or socket.
    #[error("is {kind}, not a regular file")]
    NotRegular {
        /// What it is, e.g. `a FIFO (named pipe)`.
        kind: &'static str,
    },
    /// The file is larger than its use allows.
    #[error("is {} (or more); the limit for a {} file is {}", human_bytes(*.size), .use_.what(), human_bytes(.use_.max_bytes()))]
    TooLarge {
        /// Its size in bytes, as far as it was read.
        size: u64,
        /// What it is used for.
        use_: FileUse,
    },
    /// Reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A refused local file as an I/O error for callers whose errors carry
/// one: the I/O error itself, `NotFound`, or `InvalidInput` with the
/// message ("is a FIFO (named pipe), not a regular file", "is 20 MiB (or
/// more); the limit for a script file is 16 MiB").
impl From<LocalFileError> for std::io::Error {
    fn from(e: LocalFileError) -> Self {
        match e {
            LocalFileError::Io(e) => e,
            LocalFileError::NotFound => std::io::Error::from(std::io::ErrorKind::NotFound),
            other => std::io::Error::new(std::io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

/// What a file type is when it is not a regular file, e.g. `a FIFO
/// (named pipe)`; `None` for a regular file.
pub fn kind_of(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if ft.is_char_device() {
        Some("a character device")
    } else if ft.is_block_device() {
        Some("a block device")
    } else if ft.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// `sha256:<hex>` of the content of the regular file at `path` (symlinks
/// followed), used as `use_`.
///
/// Errors: [`LocalFileError::NotFound`], [`LocalFileError::NotRegular`],
/// [`LocalFileError::TooLarge`] past [`FileUse::max_bytes`], or the I/O
/// error of opening or reading it.
pub fn digest(path: &Path, use_: FileUse) -> Result<String, LocalFileError> {
    let mut h = Sha256::new();
    read_with(path, use_, |chunk| h.update(chunk))?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// The content of the regular file at `path`, used as `use_`, with the
/// same checks and errors as [`digest`]: for whoever sends or seeds the
/// file later (a path in a stored spec may have become a FIFO since).
pub fn read(path: &Path, use_: FileUse) -> Result<Vec<u8>, LocalFileError> {
    let mut out = Vec::new();
    read_with(path, use_, |chunk| out.extend_from_slice(chunk))?;
    Ok(out)
}

/// Feeds the file's content to `sink` in chunks, at most the limit of `use_`.
fn read_with(
    path: &Path,
    use_: FileUse,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), LocalFileError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LocalFileError::NotFound,
        _ => LocalFileError::Io(e),
    })?;
    check(&meta, use_)?;
    // O_NONBLOCK: should the path have become a FIFO since, `open` must
    // not wait for a writer; the check below then refuses it.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    check(&f.metadata()?, use_)?;
    let limit = use_.max_bytes();
    let mut r = f.take(limit + 1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(LocalFileError::TooLarge { size: total, use_ });
        }
        sink(&buf[..n]);
    }
    Ok(())
}

fn check(meta: &std::fs::Metadata, use_: FileUse) -> Result<(), LocalFileError> {
    if let Some(kind) = kind_of(meta.file_type()) {
        return Err(LocalFileError::NotRegular { kind });
    }
    if meta.len() > use_.max_bytes() {
        return Err(LocalFileError::TooLarge {
            size: meta.len(),
            use_,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_are_refused_without_reading() {
        let e = digest(Path::new("/dev/zero"), FileUse::Script).unwrap_err();
        assert!(
            matches!(
                e,
                LocalFileError::NotRegular {
                    kind: "a character device"
                }
            ),
            "{e}"
        );
        let e = digest(Path::new("/"), FileUse::Script).unwrap_err();
        assert!(
            matches!(
                e,
                LocalFileError::NotRegular {
                    kind: "a directory"
                }
            ),
            "{e}"
        );
        let e = digest(Path::new("/no/such/file"), FileUse::Script).unwrap_err();
        assert!(matches!(e, LocalFileError::NotFound));
    }

    #[test]
    fn read_returns_what_digest_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("user-data");
        std::fs::write(&p, b"#cloud-config\n").unwrap();
        assert_eq!(read(&p, FileUse::UserData).unwrap(), b"#cloud-config\n");
        assert_eq!(
            digest(&p, FileUse::UserData).unwrap(),
            format!("sha256:{}", hex::encode(Sha256::digest(b"#cloud-config\n")))
        );
        assert!(matches!(
            read(Path::new("/dev/zero"), FileUse::UserData),
            Err(LocalFileError::NotRegular { .. })
        ));
    }

    #[test]
    fn files_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pub");
        std::fs::write(&p, vec![b'a'; (FileUse::SshKey.max_bytes() + 1) as usize]).unwrap();
        let e = digest(&p, FileUse::SshKey).unwrap_err();
        assert!(
            e.to_string()
                .contains("the limit for a ssh-key file is 1 MiB"),
            "{e}"
        );
        assert!(digest(&p, FileUse::Script).unwrap().starts_with("sha256:"));
    }
}
