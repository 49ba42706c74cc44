//! What an apply of a Snapshot must not do, checked before anything is
//! written: snapshot a VM that does not exist or is being deleted, move a
//! snapshot to another VM, or ask for a restore (a new
//! `spec.restoreToken`) that cannot happen now.

use vmctl_api::{Kind, Object, ObjectRef, Snapshot, SnapshotPhase, VirtualMachine, VmPhase};
use vmctl_store::Store;

use crate::actions::{ActionError, ActionResult};

/// Why a Snapshot cannot be applied as asked.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotRefusal {
    /// Its VM does not exist.
    #[error("VM {vm} does not exist")]
    VmNotFound {
        /// The VM's name.
        vm: String,
    },
    /// Its VM is being deleted.
    #[error("VM {vm} is being deleted")]
    VmDeleting {
        /// The VM's name.
        vm: String,
    },
    /// `spec.vm` of an existing snapshot was changed.
    #[error("it is a snapshot of VM {was}, not of {now}")]
    VmChanged {
        /// The stored VM name.
        was: String,
        /// The requested one.
        now: String,
    },
    /// A restore of a snapshot that is not Ready.
    #[error("it is {phase:?}, not Ready: only a saved snapshot can be restored")]
    NotReady {
        /// Its phase.
        phase: SnapshotPhase,
    },
    /// A restore of a disk-only snapshot to a running VM.
    #[error(
        "it has no memory state (VM {vm} was stopped when it was taken) and VM {vm} is {phase:?}: it can be restored to a stopped VM only"
    )]
    NeedsStoppedVm {
        /// The VM's name.
        vm: String,
        /// The VM's phase.
        phase: VmPhase,
    },
}

impl SnapshotRefusal {
    /// The diagnostic code (registered in `vmctl_api::codes`).
    pub fn code(&self) -> &'static str {
        match self {
            SnapshotRefusal::VmNotFound { .. } => "vmctl::snapshot::vm_not_found",
            SnapshotRefusal::VmDeleting { .. } => "vmctl::snapshot::vm_deleting",
            SnapshotRefusal::VmChanged { .. } => "vmctl::snapshot::vm_changed",
            SnapshotRefusal::NotReady { .. } => "vmctl::snapshot::not_ready",
            SnapshotRefusal::NeedsStoppedVm { .. } => "vmctl::snapshot::needs_stopped_vm",
        }
    }
}

/// Checks every Snapshot of a request against the store (and the VMs the
/// same request creates).
///
/// # Errors
/// [`ActionError::Snapshot`] for the first refusal, [`ActionError::Store`]
/// when the store fails.
pub async fn check(store: &dyn Store, objects: &[Object]) -> ActionResult<()> {
    for obj in objects.iter().filter(|o| o.kind == Kind::Snapshot) {
        let refuse = |reason| ActionError::Snapshot {
            object: obj.object_ref(),
            reason,
        };
        // Decoding was checked by validation.
        let Ok(new) = Snapshot::from_object(obj) else {
            continue;
        };
        let current = store.get(&obj.object_ref()).await?;
        let current = current.as_ref().and_then(|o| Snapshot::from_object(o).ok());
        let vm_name = new.spec.vm.clone();
        let in_request = objects
            .iter()
            .any(|o| o.kind == Kind::VirtualMachine && o.metadata.name == vm_name);
        let vm_ref = ObjectRef::new(Kind::VirtualMachine, vm_name.clone());
        let vm = store
            .get(&vm_ref)
            .await?
            .and_then(|o| VirtualMachine::from_object(&o).ok());
        let vm_deleting = vm
            .as_ref()
            .is_some_and(|v| v.metadata.deletion_timestamp.is_some());
        match &current {
            None => {
                if vm.is_none() && !in_request {
                    return Err(refuse(SnapshotRefusal::VmNotFound { vm: vm_name }));
                }
                if vm_deleting {
                    return Err(refuse(SnapshotRefusal::VmDeleting { vm: vm_name }));
                }
            }
            Some(cur) => {
                if cur.spec.vm != new.spec.vm {
                    return Err(refuse(SnapshotRefusal::VmChanged {
                        was: cur.spec.vm.clone(),
                        now: new.spec.vm.clone(),
                    }));
                }
                let restore = new.spec.restore_token.is_some()
                    && new.spec.restore_token != cur.spec.restore_token;
                if !restore {
                    continue;
                }
                let Some(vm) = vm else {
                    return Err(refuse(SnapshotRefusal::VmNotFound { vm: vm_name }));
                };
                if vm_deleting {
                    return Err(refuse(SnapshotRefusal::VmDeleting { vm: vm_name }));
                }
                let status = cur.status.clone().unwrap_or_default();
                if status.phase != SnapshotPhase::Ready {
                    return Err(refuse(SnapshotRefusal::NotReady {
                        phase: status.phase,
                    }));
                }
                let vm_phase = vm.status.map(|s| s.phase).unwrap_or_default();
                let live = matches!(vm_phase, VmPhase::Running | VmPhase::Suspended);
                if live && !status.memory {
                    return Err(refuse(SnapshotRefusal::NeedsStoppedVm {
                        vm: vm_name,
                        phase: vm_phase,
                    }));
                }
            }
        }
    }
    Ok(())
}
