//! Where a VM's files are: its work dir, and the directory of its sockets.
//!
//! A Unix socket's path must fit `sun_path` (108 bytes with the NUL), and
//! a valid VM name (63 characters) under an ordinary data dir passes that.
//! So QEMU's sockets stay in the work dir only while their paths fit;
//! otherwise they go to a private (0700) per-VM directory where the path
//! is short, and the work dir holds symlinks of the same names to them:
//!
//! ```text
//!   <work dir>/qmp.sock ──▶ $XDG_RUNTIME_DIR/vmctl/<key>/qmp.sock
//!                       or  /tmp/vmctl-<euid>/<key>/qmp.sock
//!   key = the first 16 hex digits of SHA-256(<work dir>)
//! ```
//!
//! The key depends only on the (absolute) work dir, and the symlinks record
//! where the running QEMU's sockets are, so an agent restarted with another
//! environment still finds them and adopts the VM.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The longest path a Unix socket can have on Linux (`sun_path` is 108
/// bytes, including the terminating NUL); the agent's socket has it too.
pub use vmctl_api::paths::SOCKET_PATH_MAX;

/// File names of QEMU's sockets (QMP, QMP events, serial console).
const SOCKETS: [&str; 3] = [QMP_SOCK, EVENTS_SOCK, SERIAL_SOCK];
const QMP_SOCK: &str = "qmp.sock";
const EVENTS_SOCK: &str = "qmp-events.sock";
const SERIAL_SOCK: &str = "serial.sock";

/// Where a VM's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The work dir.
    pub root: PathBuf,
    /// The directory of QEMU's sockets: `root` when their paths fit, else a
    /// short private directory (see the module docs).
    pub sock_dir: PathBuf,
}

impl Layout {
    /// The layout of the work dir `root` as it is on disk: sockets in
    /// `root` when their paths fit; else where the symlinks in `root` point
    /// (the last start put them there); else where a start would put them.
    pub fn new(root: &Path) -> Self {
        if sockets_fit(root) {
            return Self::with_sock_dir(root, root);
        }
        let recorded = std::fs::read_link(root.join(QMP_SOCK))
            .ok()
            .filter(|t| t.is_absolute())
            .and_then(|t| t.parent().map(Path::to_path_buf))
            .filter(|d| sockets_fit(d));
        match recorded {
            Some(dir) => Self::with_sock_dir(root, &dir),
            None => Self::planned(root),
        }
    }

    /// Where the next start puts the sockets of the work dir `root`
    /// (nothing is created).
    pub fn planned(root: &Path) -> Self {
        if sockets_fit(root) {
            return Self::with_sock_dir(root, root);
        }
        Self::with_sock_dir(root, &runtime_sock_dir(root))
    }

    /// The layout of `root` with its sockets in `sock_dir`.
    pub fn with_sock_dir(root: &Path, sock_dir: &Path) -> Self {
        Layout {
            root: root.to_owned(),
            sock_dir: sock_dir.to_owned(),
        }
    }

    /// Whether the sockets are in the work dir itself.
    pub fn sockets_in_root(&self) -> bool {
        self.sock_dir == self.root
    }

    /// Makes the socket directory (private, 0700, owned by this user) and
    /// the work dir's symlinks to the sockets, when the sockets are not in
    /// the work dir. Stale sockets are removed either way.
    ///
    /// # Errors
    /// The directory cannot be made, or exists and is not a private
    /// directory of this user (e.g. another user made `/tmp/vmctl-<uid>`).
    pub fn make_sock_dir(&self) -> std::io::Result<()> {
        for name in SOCKETS {
            remove_if_present(&self.root.join(name))?;
        }
        if self.sockets_in_root() {
            return Ok(());
        }
        if let Some(base) = self.sock_dir.parent() {
            private_dir(base)?;
        }
        private_dir(&self.sock_dir)?;
        for name in SOCKETS {
            let target = self.sock_dir.join(name);
            remove_if_present(&target)?;
            std::os::unix::fs::symlink(&target, self.root.join(name))?;
        }
        Ok(())
    }

    /// Removes the socket directory when it is not the work dir.
    pub fn remove_sock_dir(&self) -> std::io::Result<()> {
        if self.sockets_in_root() {
            return Ok(());
        }
        match std::fs::remove_dir_all(&self.sock_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The qcow2 overlay.
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk.qcow2")
    }
    /// The cloud-init seed.
    pub fn seed(&self) -> PathBuf {
        self.root.join("seed.iso")
    }
    /// Digest of what the seed was built from.
    pub fn seed_digest_file(&self) -> PathBuf {
        self.root.join("seed.digest")
    }
    /// The QMP socket.
    pub fn qmp_sock(&self) -> PathBuf {
        self.sock_dir.join(QMP_SOCK)
    }
    /// A second QMP monitor, held open by the agent for QMP events.
    pub fn events_sock(&self) -> PathBuf {
        self.sock_dir.join(EVENTS_SOCK)
    }
    /// The serial console socket.
    pub fn serial_sock(&self) -> PathBuf {
        self.sock_dir.join(SERIAL_SOCK)
    }
    /// The serial console transcript.
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// QEMU's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.root.join("qemu.pid")
    }
    /// QEMU's standard error.
    pub fn stderr_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    /// How the last QEMU ended.
    pub fn exit_file(&self) -> PathBuf {
        self.root.join("exit.status")
    }
    /// Marker: vmctl asked the running QEMU to end.
    pub fn stop_marker(&self) -> PathBuf {
        self.root.join("stop.requested")
    }
    /// The extra disks whose hot-unplug the guest has not completed, one
    /// name per line, written when a detach times out (the `device_del`
    /// stays pending inside QEMU) and removed when QEMU starts again.
    pub fn unplug_pending(&self) -> PathBuf {
        self.root.join("unplug.pending")
    }
    /// The saved [`VmConfig`](super::VmConfig).
    pub fn config_file(&self) -> PathBuf {
        self.root.join("vm.json")
    }
    /// The forwarded SSH port.
    pub fn port_file(&self) -> PathBuf {
        self.root.join("ssh-port")
    }
    /// cloud-init's instance id.
    pub fn instance_id_file(&self) -> PathBuf {
        self.root.join("instance-id")
    }
}

/// Whether every socket's path in `dir` fits [`SOCKET_PATH_MAX`].
pub fn sockets_fit(dir: &Path) -> bool {
    let longest = SOCKETS.iter().map(|s| s.len()).max().unwrap_or(0);
    dir.as_os_str().len() + 1 + longest <= SOCKET_PATH_MAX
}

/// The short per-VM socket directory of the work dir `root`:
/// `$XDG_RUNTIME_DIR/vmctl/<key>` when that is set, absolute and short
/// enough, else `/tmp/vmctl-<euid>/<key>` (at most 54 bytes with a socket).
fn runtime_sock_dir(root: &Path) -> PathBuf {
    let key = hex::encode(&Sha256::digest(root.as_os_str().as_encoded_bytes())[..8]);
    let xdg = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .map(|d| d.join("vmctl").join(&key))
        .filter(|d| sockets_fit(d));
    xdg.unwrap_or_else(|| {
        PathBuf::from(format!("/tmp/vmctl-{}", nix::unistd::geteuid())).join(&key)
    })
}

/// Makes `dir` (mode 0700) unless it exists, then checks that it is a
/// directory (not a symlink) of this user that no one else can enter: in a
/// shared directory like `/tmp`, another user could have made it first.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of user {me} (mode 0700); \
                 remove it, or set XDG_RUNTIME_DIR to a private directory",
                dir.display()
            ),
        ));
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_stay_in_a_work_dir_whose_paths_fit() {
        let l = Layout::planned(Path::new("/var/lib/vmctl/vms/web-1"));
        assert!(l.sockets_in_root());
        assert_eq!(l.qmp_sock(), Path::new("/var/lib/vmctl/vms/web-1/qmp.sock"));
    }

    /// Issue 18 item 5: a 63-character name under a 25-character data dir
    /// made `qmp-events.sock` 109 bytes, and QEMU refused to start.
    #[test]
    fn long_vm_name_sockets_fit_sun_path() {
        let data_dir = "/root/a-data-dir-25-chars";
        assert_eq!(data_dir.len(), 25);
        let name = "a".repeat(63);
        let root = PathBuf::from(format!("{data_dir}/vms/{name}"));
        let old = root.join("qmp-events.sock");
        assert!(old.as_os_str().len() > SOCKET_PATH_MAX, "the reported case");
        for root in [root, PathBuf::from("/d".repeat(600)).join(&name)] {
            let l = Layout::planned(&root);
            assert!(!l.sockets_in_root());
            for s in [l.qmp_sock(), l.events_sock(), l.serial_sock()] {
                assert!(s.as_os_str().len() <= SOCKET_PATH_MAX, "{}", s.display());
            }
            assert_eq!(Layout::planned(&root), l, "stable for the same work dir");
        }
        let other = Layout::planned(&PathBuf::from(format!(
            "{data_dir}/vms/{}b",
            "a".repeat(62)
        )));
        assert_ne!(
            other.sock_dir,
            Layout::planned(&PathBuf::from(format!("{data_dir}/vms/{name}"))).sock_dir,
            "one directory per VM"
        );
    }

    #[test]
    fn the_socket_dir_is_private_and_recorded_by_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("x".repeat(110));
        std::fs::create_dir(&root).unwrap();
        let l = Layout::planned(&root);
        l.make_sock_dir().unwrap();
        let mode = std::fs::metadata(&l.sock_dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(
            std::fs::read_link(root.join("serial.sock")).unwrap(),
            l.serial_sock()
        );
        // Read back from the symlinks, as a restarted agent does.
        assert_eq!(Layout::new(&root), l);
        l.remove_sock_dir().unwrap();
        assert!(!l.sock_dir.exists());
    }

    #[test]
    fn a_socket_dir_another_user_could_enter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let err = private_dir(&open).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("not a private directory"), "{err}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(private_dir(&link).is_err(), "a symlink is not followed");
    }
}
