//! The Snapshot controller's decisions: [`plan`] maps what was observed
//! of a Snapshot and its VM ([`Observed`]) to the next [`Step`], without
//! I/O; the methods of [`Observed`] say how each step changes the status.
//!
//! ```text
//!   deleted? ── finalizer ──▶ Teardown (delete the saved state, drop it)
//!   no finalizer ──▶ AddFinalizer
//!   saved on the VM's disks ── status does not say so ──▶ Adopt
//!                           ├── restoreToken not acted on ──▶ Restore
//!                           └── else ──▶ Keep
//!   not saved ── was Ready ──▶ Fail SnapshotLost
//!             ├── Failed already ──▶ Keep (a failed save is not retried)
//!             ├── VM missing / being deleted ──▶ Fail
//!             ├── VM has no instance ── none until its user acts
//!             │   (never run and not asked to; image missing or failed)
//!             │                          ──▶ Fail VmNotStarted
//!             │                      └── else ──▶ WaitForVm
//!             └── else ──▶ Create
//! ```

use chrono::{DateTime, Utc};
use vmctl_api::{SnapshotPhase, SnapshotStatus, set_condition};

use crate::conditions::condition;
use crate::drivers::{InstanceState, SnapshotInfo};

/// What is known of a Snapshot's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmView {
    /// No such VirtualMachine.
    Missing,
    /// The VM is being deleted.
    Deleting,
    /// The VM exists but the hypervisor has no instance (no disks) yet.
    NoInstance,
    /// The VM's instance, in this state.
    Instance(InstanceState),
}

/// What the Snapshot controller knows of one Snapshot at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The Snapshot's name (the saved state's tag).
    pub name: String,
    /// The VM's name (`spec.vm`).
    pub vm: String,
    /// `metadata.generation`.
    pub generation: u64,
    /// Deletion was requested.
    pub deleting: bool,
    /// The object carries [`super::FINALIZER`].
    pub finalizer: bool,
    /// `spec.restoreToken`.
    pub restore_token: Option<String>,
    /// The status as stored, with what this reconcile's steps changed.
    pub status: SnapshotStatus,
    /// The VM, as the store and the hypervisor have it (not looked at for
    /// a Snapshot being deleted).
    pub vm_view: VmView,
    /// The saved state as the hypervisor has it, `None` if it has none.
    pub saved: Option<SnapshotInfo>,
    /// Why the VM, which has no instance ([`VmView::NoInstance`]), will
    /// not get one until its user acts (it was never started and is not
    /// asked to run; its image is missing, invalid or failed to
    /// download), with what to do. `None`: it may still come (the image
    /// downloading, the VM starting).
    pub vm_blocked: Option<String>,
    /// When it was observed.
    pub now: DateTime<Utc>,
}

/// The next thing to do for a Snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Deleted and gone from the VM: nothing to do.
    Forget,
    /// Deleted: remove the saved state from the VM's disks (if the VM has
    /// an instance), then the finalizer.
    Teardown,
    /// Add the finalizer before anything is saved.
    AddFinalizer,
    /// Saved, and the status does not say so yet (a save whose end was
    /// not recorded): record it as Ready.
    Adopt,
    /// Save it now.
    Create,
    /// Bring the VM back to it (a new `restoreToken`).
    Restore,
    /// It cannot be saved (or is lost): report `Failed`.
    Fail {
        /// CamelCase reason.
        reason: &'static str,
        /// What happened.
        message: String,
    },
    /// The VM has no disks yet: report `Pending` until it changes.
    WaitForVm,
    /// Nothing to do; write the status if it changed.
    Keep,
}

/// The next step for the Snapshot observed as `o`. Pure.
pub fn plan(o: &Observed) -> Step {
    if o.deleting {
        return if o.finalizer {
            Step::Teardown
        } else {
            Step::Forget
        };
    }
    if !o.finalizer {
        return Step::AddFinalizer;
    }
    let recorded = matches!(
        o.status.phase,
        SnapshotPhase::Ready | SnapshotPhase::Restoring
    ) && o.status.creation_time.is_some();
    if o.saved.is_some() {
        if !recorded {
            return Step::Adopt;
        }
        if o.restore_token.is_some() && o.restore_token != o.status.restored_token {
            return Step::Restore;
        }
        return Step::Keep;
    }
    if recorded {
        return Step::Fail {
            reason: "SnapshotLost",
            message: format!(
                "VM {} no longer has snapshot {} on its disks (was it recreated?)",
                o.vm, o.name
            ),
        };
    }
    if o.status.phase == SnapshotPhase::Failed {
        return Step::Keep;
    }
    match o.vm_view {
        VmView::Missing => Step::Fail {
            reason: "VmNotFound",
            message: format!("VM {} does not exist", o.vm),
        },
        VmView::Deleting => Step::Fail {
            reason: "VmDeleting",
            message: format!("VM {} is being deleted", o.vm),
        },
        VmView::NoInstance => match &o.vm_blocked {
            // Found as: `snapshot create --wait` on a VM whose image
            // download failed (404) waited its whole 600 s.
            Some(why) => Step::Fail {
                reason: "VmNotStarted",
                message: format!(
                    "VM {} has no disks to snapshot: {why}; then create the snapshot again",
                    o.vm
                ),
            },
            None => Step::WaitForVm,
        },
        VmView::Instance(_) => Step::Create,
    }
}

impl Observed {
    fn ready(&mut self, ok: bool, reason: &str, message: String) {
        let cond = condition("Ready", ok, reason, message, self.generation);
        set_condition(&mut self.status.conditions, cond, self.now);
    }

    /// [`Step::Teardown`] begins.
    pub fn terminating(&mut self) {
        self.status.phase = SnapshotPhase::Terminating;
        self.ready(false, "Terminating", "being deleted".into());
    }

    /// [`Step::WaitForVm`].
    pub fn waiting_for_vm(&mut self) {
        self.status.phase = SnapshotPhase::Pending;
        let msg = format!("VM {} has no disks yet", self.vm);
        self.ready(false, "VmNotReady", msg);
        self.status.observed_generation = self.generation;
    }

    /// [`Step::Create`] begins.
    pub fn creating(&mut self) {
        self.status.phase = SnapshotPhase::Creating;
        let msg = format!("saving VM {}", self.vm);
        self.ready(false, "Creating", msg);
        self.status.observed_generation = self.generation;
    }

    /// The save ended (or was found done) with `info`.
    pub fn saved(&mut self, info: SnapshotInfo) {
        self.status.phase = SnapshotPhase::Ready;
        self.status.memory = info.memory;
        self.status.size_bytes = Some(info.vm_state_bytes);
        self.status.creation_time = Some(info.created.unwrap_or(self.now));
        self.status.disks = info.disks.clone();
        let msg = if info.memory {
            format!("disks and memory of VM {} saved", self.vm)
        } else {
            format!(
                "disks of VM {} saved (it was stopped: no memory state)",
                self.vm
            )
        };
        self.ready(true, "Saved", msg);
        self.status.observed_generation = self.generation;
        // A token given before the save was not a restore of it.
        if self.status.restored_token.is_none() {
            self.status.restored_token = self.restore_token.clone();
        }
        self.saved = Some(info);
    }

    /// [`Step::Fail`], or a save that failed with `message`.
    pub fn failed(&mut self, reason: &str, message: String) {
        self.status.phase = SnapshotPhase::Failed;
        self.ready(false, reason, message);
        self.status.observed_generation = self.generation;
    }

    /// [`Step::Restore`] begins.
    pub fn restoring(&mut self) {
        self.status.phase = SnapshotPhase::Restoring;
    }

    /// The restore ended: `Ok` or why not. Either way the token was acted
    /// on and is not tried again.
    pub fn restored(&mut self, result: Result<(), String>) {
        self.status.phase = SnapshotPhase::Ready;
        self.status.restored_token = self.restore_token.clone();
        self.status.observed_generation = self.generation;
        let cond = match result {
            Ok(()) => {
                self.status.last_restore_time = Some(self.now);
                let msg = format!("VM {} restored to this snapshot", self.vm);
                condition("Restored", true, "Restored", msg, self.generation)
            }
            Err(e) => condition("Restored", false, "RestoreFailed", e, self.generation),
        };
        set_condition(&mut self.status.conditions, cond, self.now);
    }

    /// [`Step::Keep`]: the status reflects this generation.
    pub fn keep(&mut self) {
        self.status.observed_generation = self.generation;
    }
}

#[cfg(test)]
mod tests;
