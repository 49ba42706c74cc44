//! Errors of the SSH driver, with their diagnostic codes.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::drivers::DriverError;

/// Diagnostic code of SSH connection and transport failures.
pub const SSH_FAILED: &str = "vmctl::ssh::failed";
/// Diagnostic code of a guest presenting a host key other than the pinned one.
pub const HOST_KEY_MISMATCH: &str = "vmctl::ssh::host_key_mismatch";
/// Diagnostic code of a step that could not be run as specified.
pub const PROVISION_FAILED: &str = "vmctl::provision::failed";

/// Everything the SSH driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The VM's runtime has no SSH address yet (not started?).
    #[error("VM {vm} has no SSH address yet")]
    NoAddress {
        /// The VM.
        vm: String,
    },
    /// The VM's runtime has no work directory, so neither its keys nor its
    /// pinned host key can be found.
    #[error("VM {vm} has no work directory")]
    NoWorkDir {
        /// The VM.
        vm: String,
    },
    /// The host key vmctl generated for the VM is not in its work directory.
    #[error("No pinned host key for VM {vm}: {} does not exist", path.display())]
    HostKeyMissing {
        /// The VM.
        vm: String,
        /// Where the key was looked for.
        path: PathBuf,
    },
    /// The pinned host key file exists but cannot be read or parsed.
    #[error("Cannot read the pinned host key {}", path.display())]
    HostKeyRead {
        /// The key file.
        path: PathBuf,
        /// Why, as text (an I/O or key parse error).
        reason: String,
    },
    /// The guest presented a host key other than the pinned one.
    #[error(
        "Host key of {addr} does not match the key pinned for VM {vm}: expected {expected}, got {actual}"
    )]
    HostKeyMismatch {
        /// The VM.
        vm: String,
        /// `host:port`.
        addr: String,
        /// Fingerprint of the pinned key.
        expected: String,
        /// Fingerprint (or type) of the presented key.
        actual: String,
    },
    /// None of the private keys to try exists.
    #[error("No SSH private key found (looked for {})", list(tried))]
    NoKey {
        /// The paths looked at.
        tried: Vec<PathBuf>,
    },
    /// The TCP connection failed.
    #[error("Cannot connect to {addr}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The SSH handshake failed.
    #[error("SSH handshake with {addr} failed")]
    Handshake {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: ssh2::Error,
    },
    /// No key was accepted for the user.
    #[error("Authentication as {user} at {addr} failed (tried {})", list(tried))]
    Auth {
        /// The user.
        user: String,
        /// `host:port`.
        addr: String,
        /// The keys offered.
        tried: Vec<PathBuf>,
    },
    /// An SSH channel or SFTP operation failed.
    #[error("Cannot {what}")]
    Session {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: ssh2::Error,
    },
    /// SSH did not answer in time.
    #[error(
        "waiting {} for SSH as {user}@{addr} ({attempts} attempts of TCP connect, handshake, host key check and key authentication; last error: {last})",
        secs(*timeout)
    )]
    Timeout {
        /// The user.
        user: String,
        /// `host:port`.
        addr: String,
        /// Connection attempts made.
        attempts: u32,
        /// How long it was given.
        timeout: Duration,
        /// The last attempt's error chain.
        last: String,
    },
    /// No connection could be made for an operation within `within`, so it
    /// did not start ([`DriverError::Unreachable`]).
    #[error("no SSH connection could be made in {}, so nothing ran", secs(*within))]
    NotStarted {
        /// How long connecting was retried.
        within: Duration,
        /// The last attempt's error.
        #[source]
        source: Box<SshError>,
    },
    /// A readiness probe ran and did not pass: why, for people.
    #[error("{0}")]
    ProbeFailed(String),
    /// A local file of a step cannot be read.
    #[error("Cannot read {}", path.display())]
    LocalFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A local file changed since the manifest was applied.
    #[error("{} changed since it was applied (applied {expected}, now {actual})", path.display())]
    DigestChanged {
        /// The file.
        path: PathBuf,
        /// Digest recorded at apply time.
        expected: String,
        /// Digest now.
        actual: String,
    },
    /// A `file` step's destination is not absolute.
    #[error("Destination {0} is not an absolute path")]
    RelativeDestination(String),
    /// A `file` step's destination directory does not exist on the guest.
    #[error("Remote directory {dir} does not exist")]
    RemoteDirMissing {
        /// The directory.
        dir: String,
    },
    /// Writing a file on the guest failed midway.
    #[error("Cannot upload {} to {remote}", local.display())]
    Upload {
        /// The local file.
        local: PathBuf,
        /// The remote path.
        remote: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A `shell` step has neither `inline` nor `script`.
    #[error("Shell step has neither inline nor script")]
    EmptyShell,
    /// The remote command's output could not be read.
    #[error("Cannot read the output of {what}")]
    Output {
        /// The command.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `provision.log` could not be written.
    #[error("Cannot write {}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `known_hosts` file could not be written.
    #[error("Cannot write {}", path.display())]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The caller stopped listening (its future was dropped).
    #[error("Cancelled")]
    Cancelled,
    /// The blocking SSH task panicked.
    #[error("SSH worker task failed: {0}")]
    Worker(String),
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no keys".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SshError {
    /// The diagnostic code, for miette.
    pub fn code(&self) -> &'static str {
        match self {
            Self::HostKeyMismatch { .. } => HOST_KEY_MISMATCH,
            Self::LocalFile { .. }
            | Self::DigestChanged { .. }
            | Self::RelativeDestination(_)
            | Self::RemoteDirMissing { .. }
            | Self::Upload { .. }
            | Self::EmptyShell
            | Self::Log { .. } => PROVISION_FAILED,
            _ => SSH_FAILED,
        }
    }

    /// What the user can do about it, when there is something to say.
    pub fn help(&self) -> Option<&'static str> {
        Some(match self {
            Self::HostKeyMissing { .. } => {
                "vmctl pins the host key it generated for the VM; recreate the VM (vmctl delete, then apply) so the key is generated and handed to cloud-init"
            }
            Self::HostKeyMismatch { .. } => {
                "something else answers on this address, or the guest replaced its host key; check the VM's console, or recreate the VM"
            }
            Self::DigestChanged { .. } => "re-apply the manifest to provision the new content",
            Self::RemoteDirMissing { .. } => {
                "create the directory in an earlier shell step (mkdir -p)"
            }
            Self::Auth { .. } | Self::NoKey { .. } => {
                "check the ssh block's user and private-key, and that the key is authorized on the guest"
            }
            Self::Timeout { .. } => {
                "check that the guest booted (vmctl logs) and runs sshd; raise ssh timeout if it is slow"
            }
            _ => return None,
        })
    }

    /// Whether a connection attempt failing with this error is worth
    /// retrying while waiting for the guest: transport and authentication
    /// failures are (the guest may still be booting); a wrong host key or a
    /// missing local file is not.
    pub(super) fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Handshake { .. }
                | Self::Auth { .. }
                | Self::Session { .. }
        )
    }
}

/// The error and its sources, joined with `: ` as printed at the edge.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    vmctl_api::error_chain(e)
}

/// A readiness probe's error as the prober reads it
/// ([`crate::probe`]): [`DriverError::Timeout`] when nothing answered in
/// time (with QEMU's user networking: the guest's network may not be up
/// yet), [`DriverError::Unreachable`] when the guest's side answered but
/// no sshd took the connection (refused, closed before the banner) or
/// another probe is shaking hands with it, else as [`From`] maps it.
pub(super) fn probe_error(e: SshError) -> DriverError {
    match &e {
        SshError::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
            DriverError::Timeout(chain(&e))
        }
        SshError::Connect { .. } => DriverError::Unreachable(chain(&e)),
        _ => e.into(),
    }
}

impl From<SshError> for DriverError {
    fn from(e: SshError) -> Self {
        match e {
            SshError::Timeout { .. } => DriverError::Timeout(chain(&e)),
            SshError::NotStarted { .. } => DriverError::Unreachable(chain(&e)),
            e => DriverError::Backend(chain(&e)),
        }
    }
}
