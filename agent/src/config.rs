//! Where the agent keeps its state and listens.

use std::path::{Path, PathBuf};

/// The agent's settings, resolved once from flags and environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The data directory (`$XDG_DATA_HOME/vmctl`).
    pub data_dir: PathBuf,
    /// The Unix socket path (default `<data_dir>/agent.sock`).
    pub socket: PathBuf,
    /// The hypervisor driver: `qemu` (default) or `fake` (tests only).
    pub driver: String,
    /// How much of the event log compaction keeps (sled), or how many
    /// revisions etcd keeps before compaction (`retention.window`).
    pub retention: vmctl_store::Retention,
    /// Where the objects live: sled (default) or etcd.
    pub store: StoreConfig,
}

/// Which store the agent keeps its objects in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// sled in `<data_dir>/db`: embedded, no setup (the default).
    Sled,
    /// etcd v3 (`--store etcd --etcd-endpoints URL,…`).
    Etcd {
        /// Client URLs, e.g. `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
        /// Key prefix of this installation (default `/vmctl/`).
        prefix: String,
    },
}

/// `$XDG_DATA_HOME/vmctl`, or `~/.local/share/vmctl`. A relative
/// `XDG_DATA_HOME` is ignored, as the XDG Base Directory spec says.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| Path::new(v).is_absolute()) {
        return PathBuf::from(x).join("vmctl");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".local/share/vmctl")
}

/// The socket path inside a data directory.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("agent.sock")
}

/// A path setting of the agent or the CLI that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A relative path, and the working directory is unknown (removed?).
    #[error("Cannot make {} absolute", path.display())]
    Unresolvable {
        /// The path as given.
        path: PathBuf,
        /// Why the working directory is unknown.
        #[source]
        source: std::io::Error,
    },
    /// The socket's path does not fit a Unix socket address.
    #[error(
        "The agent socket path {} is {len} bytes; a Unix socket path has at most {max}",
        path.display(),
        max = SOCKET_PATH_MAX
    )]
    SocketTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

impl PathError {
    /// What the user can do about it.
    pub fn help(&self) -> &'static str {
        match self {
            PathError::Unresolvable { .. } => {
                "run vmctl from an existing directory, or give absolute paths"
            }
            PathError::SocketTooLong { .. } => {
                "give a shorter socket path with --socket or VMCTL_SOCKET \
                 (e.g. $XDG_RUNTIME_DIR/vmctl.sock), or use a shorter --data-dir"
            }
        }
    }
}

/// The longest Unix socket path: `sun_path` is 108 bytes with the NUL.
pub use vmctl_controllers::drivers::qemu::SOCKET_PATH_MAX;

/// `path` made absolute against the working directory (`.` and `..` kept,
/// symlinks not resolved). Paths are resolved once at start-up: the agent,
/// QEMU and its supervisor run in other working directories, where a
/// relative path would name something else.
///
/// # Errors
/// [`PathError::Unresolvable`] when `path` is relative and the working
/// directory cannot be read.
pub fn absolute(path: &Path) -> Result<PathBuf, PathError> {
    std::path::absolute(path).map_err(|source| PathError::Unresolvable {
        path: path.to_owned(),
        source,
    })
}

/// Checks that `socket` can be bound and connected to.
///
/// # Errors
/// [`PathError::SocketTooLong`] when it is longer than [`SOCKET_PATH_MAX`]
/// bytes.
pub fn check_socket_path(socket: &Path) -> Result<(), PathError> {
    let len = socket.as_os_str().len();
    if len > SOCKET_PATH_MAX {
        return Err(PathError::SocketTooLong {
            path: socket.to_owned(),
            len,
        });
    }
    Ok(())
}

impl AgentConfig {
    /// Settings with every default for `data_dir`, made absolute (see
    /// [`absolute`]; kept as given if the working directory is unknown).
    pub fn new(data_dir: PathBuf) -> Self {
        let data_dir = absolute(&data_dir).unwrap_or(data_dir);
        let socket = default_socket(&data_dir);
        AgentConfig {
            data_dir,
            socket,
            driver: "qemu".into(),
            retention: vmctl_store::Retention::default(),
            store: StoreConfig::Sled,
        }
    }

    /// The store's directory.
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// The agent's lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join("agent.lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18 item 8: `--data-dir .vmctl` reached QEMU as a relative
    /// pidfile path, resolved in the VM's work dir ("cannot create PID
    /// file"), and the VM crash-looped.
    #[test]
    fn relative_data_dir_is_made_absolute_once() {
        let cfg = AgentConfig::new(PathBuf::from(".vmctl"));
        assert!(cfg.data_dir.is_absolute(), "{}", cfg.data_dir.display());
        assert_eq!(
            cfg.data_dir,
            std::env::current_dir().unwrap().join(".vmctl")
        );
        assert!(cfg.socket.is_absolute());
        assert!(cfg.db_dir().is_absolute());
        assert_eq!(absolute(Path::new("/a/b")).unwrap(), Path::new("/a/b"));
    }

    #[test]
    fn socket_path_longer_than_sun_path_is_refused_with_help() {
        let ok = PathBuf::from(format!("/{}", "s".repeat(SOCKET_PATH_MAX - 1)));
        check_socket_path(&ok).unwrap();
        let long = PathBuf::from(format!("/{}", "s".repeat(SOCKET_PATH_MAX)));
        let err = check_socket_path(&long).unwrap_err();
        assert!(err.to_string().contains("108 bytes"), "{err}");
        assert!(err.help().contains("--socket"));
    }
}
