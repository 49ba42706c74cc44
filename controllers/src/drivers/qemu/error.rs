//! Errors of the QEMU driver and their diagnostic codes.

use super::args::PlanError;
use super::disk::DiskError;
use super::hotplug::{HOTPLUG_FAILED, HotplugError};
use super::ports::ForwardError;
use super::qmp::QmpError;
use super::snapshot::{SNAPSHOT_FAILED, SnapshotError};
use crate::drivers::DriverError;
use crate::seed::{KeyError, SeedError};

/// Diagnostic code: QEMU could not be started or died while starting.
pub const SPAWN_FAILED: &str = "vmctl::qemu::spawn_failed";
/// Diagnostic code: a shared folder could not be served at start.
pub const SHARE_FAILED: &str = "vmctl::qemu::share_failed";
/// Diagnostic code: QMP did not answer.
pub const QMP_CONNECT_FAILED: &str = "vmctl::qemu::qmp_connect_failed";
/// Diagnostic code: a QMP command failed.
pub const QMP_COMMAND_FAILED: &str = "vmctl::qemu::qmp_command_failed";

/// Errors of the QEMU driver.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU did not come up.
    #[error("QEMU for {name} did not start: {reason}")]
    Spawn {
        /// The VM.
        name: String,
        /// What happened, with the end of QEMU's stderr.
        reason: String,
    },
    /// QMP did not answer.
    #[error("Cannot reach QMP of {name}")]
    QmpConnect {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// A QMP command failed.
    #[error("QMP command on {name} failed")]
    QmpCommand {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// The disk could not be made or grown.
    #[error("Disk of {name}")]
    Disk {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// The seed could not be built.
    #[error("Seed of {name}")]
    Seed {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: SeedError,
    },
    /// The VM's keys could not be made.
    #[error("Keys of {name}")]
    Keys {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The spec cannot run on QEMU.
    #[error("Spec of {name}")]
    Plan {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: PlanError,
    },
    /// A port forward could not be set up or taken away.
    #[error("Port forward of {name}")]
    Forward {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: ForwardError,
    },
    /// A snapshot could not be saved, restored, listed or deleted.
    #[error("Snapshot of {name}")]
    Snapshot {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: SnapshotError,
    },
    /// An extra disk could not be attached to or detached from the
    /// running QEMU.
    #[error("Cannot {op} disk {disk} of {name} live")]
    Hotplug {
        /// The VM.
        name: String,
        /// The disk.
        disk: String,
        /// `attach` or `detach`.
        op: &'static str,
        /// Why (boxed: it holds a disk or QMP error, and this enum is
        /// returned everywhere).
        #[source]
        source: Box<HotplugError>,
    },
    /// A shared folder cannot be served (its host folder is gone,
    /// virtiofsd did not start).
    #[error("Shared folder of {name}")]
    Share {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: super::shares::ShareError,
    },
    /// A host file operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl QemuError {
    /// The diagnostic code.
    pub fn code(&self) -> &'static str {
        match self {
            QemuError::Spawn { .. } | QemuError::Plan { .. } | QemuError::Io { .. } => SPAWN_FAILED,
            QemuError::Share { .. } => SHARE_FAILED,
            QemuError::QmpConnect { .. } => QMP_CONNECT_FAILED,
            QemuError::QmpCommand { .. } | QemuError::Forward { .. } => QMP_COMMAND_FAILED,
            QemuError::Disk { source, .. } => source.code(),
            QemuError::Seed { source, .. } => source.code(),
            QemuError::Keys { source, .. } => source.code(),
            QemuError::Snapshot { .. } => SNAPSHOT_FAILED,
            QemuError::Hotplug { .. } => HOTPLUG_FAILED,
        }
    }
}

impl From<QemuError> for DriverError {
    fn from(e: QemuError) -> Self {
        let code = e.code();
        match e {
            QemuError::Io { context, source } => DriverError::Io { context, source },
            QemuError::Forward {
                source: source @ ForwardError::InUse { .. },
                ..
            } => DriverError::AddressInUse(source.to_string()),
            e => {
                // DriverError has no code or source of its own yet: keep
                // the whole chain and the code in the message.
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                DriverError::Backend(format!("{msg} [{code}]"))
            }
        }
    }
}

pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let context = context.into();
    move |source| QemuError::Io { context, source }
}
