//! Atomic file writes: a temporary file in the target's directory, created
//! with its final mode, written, fsynced, renamed over the target, and the
//! directory fsynced so the rename survives a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;

/// Writes `data` to `path` atomically. The file is created with `mode`
/// (less the umask) from the start, so a private key is never readable by
/// others, not even for a moment.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates a fresh private (0700) directory beside `path`, for files that
/// must exist on disk only while an external tool reads them.
pub(crate) fn private_temp_dir(path: &Path) -> io::Result<TempDir> {
    let dir = temp_sibling(path);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(TempDir(dir))
}

/// A directory removed, with its contents, when dropped.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.tmp.PID.RANDOM` in the same directory, so the rename cannot
/// cross filesystems.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: u64 = rand::thread_rng().r#gen();
    parent(path).join(format!(".{name}.tmp.{}.{suffix:016x}", std::process::id()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn write_atomic_creates_file_with_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn private_temp_dir_is_0700_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = private_temp_dir(&dir.path().join("seed.iso")).unwrap();
        let path = tmp.path().to_owned();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        fs::write(path.join("f"), b"x").unwrap();
        drop(tmp);
        assert!(!path.exists());
    }
}
