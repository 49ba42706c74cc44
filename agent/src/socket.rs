//! The agent's Unix socket: reachable by no other user at any moment, never
//! taken over from a live agent, and removed at exit only while it is ours.
//!
//! ```text
//!  probe S ── answers ──────────────────────────▶ refuse (SocketInUse)
//!     │ absent, or a dead socket (connection refused)
//!     ▼
//!  mkdir <dir of S>/.sXXXXXX (0700) ── bind .sXXXXXX/s ── chmod 0600
//!     │
//!     ▼
//!  link(.sXXXXXX/s, S) ── EEXIST: probe again; remove S only if it is
//!     │                   still the dead socket we probed, then retry
//!     ▼
//!  rmdir .sXXXXXX; remember (dev, ino) of S ── at exit: unlink S only if
//!                                              it is still that inode
//! ```
//!
//! Why not bind at S and chmod afterwards: between bind(2) and chmod(2) the
//! socket has the mode the umask leaves (0777 under umask 000), and a
//! client of another user that connects in that window stays connected.
//! Why not set the umask around bind(2): the umask is per process, and the
//! agent's other threads create files meanwhile. Inside a 0700 directory
//! nobody else can reach the socket whatever its mode, and link(2) puts it
//! at S with its final mode in one step, never replacing what is there
//! (unlike rename(2)).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something answers on the socket: another agent, most likely.
    #[error("something already answers on {0}")]
    InUse(PathBuf),
    /// The path exists and is not a socket; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("cannot bind {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// `--socket-group` names no group of this host.
    #[error("there is no group `{0}` (--socket-group)")]
    UnknownGroup(String),
}

impl SocketError {
    /// What the user should do about it.
    pub fn help(&self) -> &'static str {
        match self {
            SocketError::InUse(_) => {
                "another vmctl agent (or another program) listens there: use it, stop it, or pass another --socket"
            }
            SocketError::NotASocket(_) => "remove that file yourself, or pass another --socket",
            SocketError::Io(..) => "check that the socket's directory exists and is writable",
            SocketError::UnknownGroup(_) => {
                "create it (`groupadd NAME`, then `usermod -aG NAME USER`), or pass an existing group"
            }
        }
    }
}

/// The socket file we bound: removed on drop, but only while the path
/// still names the same inode (another agent may have replaced it).
#[derive(Debug)]
pub struct OwnedSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names the socket we bound.
    pub fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        // A check-then-unlink window remains (no unlinkat-if-inode exists);
        // it only matters if another agent replaces the socket during the
        // microseconds of our exit, and that agent refuses live sockets.
        if self.is_ours() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the socket");
            }
        } else {
            tracing::info!(socket = %self.path.display(), "the socket is no longer ours; left in place");
        }
    }
}

/// What is at the socket path now.
enum Probe {
    /// Nothing.
    Absent,
    /// A socket nobody listens on (a dead agent's), with its identity.
    Dead { dev: u64, ino: u64 },
}

/// Looks at `path`: fails if something answers there or it is not a socket.
fn probe(path: &Path) -> Result<Probe, SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::Absent),
        Err(e) => return Err(SocketError::Io(path.to_path_buf(), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Probe::Dead {
            dev: meta.dev(),
            ino: meta.ino(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Probe::Absent),
        // Permission denied and the like: we cannot tell, so we do not touch it.
        Err(e) => Err(SocketError::Io(path.to_path_buf(), e)),
    }
}

/// Fails if something answers on `path`; the check `bind` repeats, made
/// early so that a second agent stops before opening its store.
pub fn check_free(path: &Path) -> Result<(), SocketError> {
    probe(path).map(|_| ())
}

/// Binds the agent's socket at `path` with mode 0600 (see the module docs).
pub fn bind(path: &Path) -> Result<(UnixListener, OwnedSocket), SocketError> {
    bind_for(path, None)
}

/// Looks up the group `name` (`--socket-group`).
pub fn group_id(name: &str) -> Result<u32, SocketError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(SocketError::UnknownGroup(name.to_owned())),
        Err(e) => Err(SocketError::Io(PathBuf::from("/etc/group"), e.into())),
    }
}

/// Binds the agent's socket at `path`: mode 0600, or with `group` (a gid)
/// owned by that group with mode 0660, so that its members may use the
/// agent (as the `docker` group does). The mode and group are set before
/// the socket appears at `path`.
pub fn bind_for(
    path: &Path,
    group: Option<u32>,
) -> Result<(UnixListener, OwnedSocket), SocketError> {
    let io = |e| SocketError::Io(path.to_path_buf(), e);
    // Fail before creating anything when something answers already.
    probe(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // tempfile creates the directory with mode 0700 whatever the umask, and
    // removes it on drop. A short name keeps the temporary path no longer
    // than `<dir>/agent.sock`, within the 108 bytes of sun_path.
    let private = tempfile::Builder::new()
        .prefix(".s")
        .rand_bytes(6)
        .tempdir_in(parent)
        .map_err(io)?;
    let tmp = private.path().join("s");
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    if let Some(gid) = group {
        nix::unistd::chown(&tmp, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io(e.into()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 5 => {
                match probe(path)? {
                    Probe::Absent => {}
                    Probe::Dead { dev, ino } => {
                        // Remove it only if it is still the dead one.
                        let same = std::fs::symlink_metadata(path)
                            .is_ok_and(|m| m.dev() == dev && m.ino() == ino);
                        if same {
                            tracing::info!(socket = %path.display(), "removing a dead agent's socket");
                            match std::fs::remove_file(path) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                                Err(e) => return Err(io(e)),
                            }
                        }
                    }
                }
            }
            Err(e) => return Err(io(e)),
        }
    }
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let owned = OwnedSocket {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    // The listener keeps working through the remaining link at `path`.
    std::fs::remove_file(&tmp).map_err(io)?;
    drop(private);
    Ok((listener, owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_socket_is_replaced_and_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (live, owned) = bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        let (_conn, _) = tokio::join!(live.accept(), async {
            std::os::unix::net::UnixStream::connect(&path).unwrap()
        });
        // Nothing but the socket is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.sock")]);
        drop(owned);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_regular_file_at_the_socket_path_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
