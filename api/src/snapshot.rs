//! The Snapshot kind's spec and status: a point-in-time copy of one VM's
//! disks (qcow2 internal snapshots), with its memory state when the VM
//! was running.
//!
//! ```text
//!   Pending ──VM prepared──▶ Creating ──saved──▶ Ready ◀──────────┐
//!      │                        │                  │ restoreToken  │
//!      │                        └── error ──▶ Failed              │
//!      │                                           ▼              │
//!      └── VM gone ──▶ Failed                  Restoring ── done ─┘
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, Time};

/// The annotation-free way to ask for a restore: `vmctl snapshot restore`
/// sets `spec.restoreToken` to a new value; the snapshot controller restores
/// once per value and records it in `status.restoredToken`.
pub const RESTORE_TOKEN_FIELD: &str = "restoreToken";

/// Desired state of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The VirtualMachine whose disks (and memory, when it runs) are saved.
    /// It must exist and not be being deleted when the snapshot is created.
    pub vm: String,
    /// Changed by `vmctl snapshot restore` to ask for one restore of the VM
    /// to this snapshot (any new value; the time in nanoseconds by the CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_token: Option<String>,
}

/// Display phase of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotPhase {
    /// Waiting for its VM to have disks (a VM not prepared yet).
    #[default]
    Pending,
    /// Being saved.
    Creating,
    /// Saved; can be restored.
    Ready,
    /// The VM is being brought back to this snapshot.
    Restoring,
    /// Could not be saved (or restored: see the conditions); a failed save
    /// is not retried: delete the snapshot and create another.
    Failed,
    /// Being deleted (its saved state is removed from the VM's disks).
    Terminating,
}

/// Observed state of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Display phase.
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// Conditions: `Ready` (the snapshot is saved and can be restored),
    /// `Restored` (how the last restore went).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Generation of the spec this status reflects.
    #[serde(default)]
    pub observed_generation: u64,
    /// When the state was saved (the hypervisor's time of the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Whether the VM's memory (CPU and device state) was saved too: a
    /// snapshot of a running VM has it, one of a stopped VM is of its
    /// disks only.
    #[serde(default)]
    pub memory: bool,
    /// Bytes of memory state saved with it (QEMU's `vm-state-size`; 0 for
    /// a disk-only snapshot). Disk data is shared copy-on-write with the
    /// VM's disks and takes room only as the disks change afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The disks saved, by name (`root` and the names of `spec.disks`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// The `spec.restoreToken` last acted on (restored or refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_token: Option<String>,
    /// When the VM was last restored to this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_time: Option<Time>,
}
