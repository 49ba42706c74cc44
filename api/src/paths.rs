//! Where the agent lives by default and where it listens: the data
//! directory, the socket path and its length limit. Used by the agent, by
//! `vmctl` (which finds and starts the agent) and by the QEMU driver (whose
//! sockets have the same limit).

use std::path::{Path, PathBuf};

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

/// The longest path a Unix socket can have on Linux: `sun_path` is 108
/// bytes, including the terminating NUL.
pub const SOCKET_PATH_MAX: usize = 107;

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

#[cfg(test)]
mod tests {
    use super::*;

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
