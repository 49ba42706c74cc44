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
    /// How much of the event log compaction keeps.
    pub retention: vmctl_store::Retention,
}

/// `$XDG_DATA_HOME/vmctl`, or `~/.local/share/vmctl`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
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

impl AgentConfig {
    /// Settings with every default for `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        let socket = default_socket(&data_dir);
        AgentConfig {
            data_dir,
            socket,
            driver: "qemu".into(),
            retention: vmctl_store::Retention::default(),
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
