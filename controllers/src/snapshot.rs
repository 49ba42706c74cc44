//! The Snapshot controller: saves a VM's disks (and memory, when it runs)
//! as qcow2 internal snapshots through the hypervisor, restores the VM to
//! one when `spec.restoreToken` changes, and removes the saved state when
//! the Snapshot is deleted.
//!
//! Each reconcile is observe → plan → act: read the Snapshot, its VM and
//! the hypervisor's snapshots of that VM ([`Observed`]), let the pure
//! [`plan`] name the [`Step`] (drawn in [`mod@plan`]), perform it. The
//! hypervisor's list decides, so a save interrupted by a crash is adopted
//! (or redone) by the next run.
//!
//! The finalizer `vmctl.dev/snapshot-teardown` makes a deleted Snapshot
//! wait until its state is gone from the VM's disks. Deleting a VM first
//! deletes its Snapshots (the VM controller's teardown waits for them).
//! Every save, restore and deletion is a note on the Snapshot and on its
//! VM, so `vmctl history vm NAME` shows them.

mod plan;

use std::sync::Arc;

use chrono::Utc;
use vmctl_api::{Kind, NoteType, Object, ObjectRef, Snapshot};
use vmctl_store::{Change, Event};

pub use self::plan::{Observed, Step, VmView, plan};
use crate::drivers::DriverError;
use crate::runtime::{Action, Reconciler, Relations};
use crate::{Context, Error};

/// The finalizer that makes a deleted Snapshot wait for its state to be
/// removed from the VM's disks.
pub const FINALIZER: &str = "vmctl.dev/snapshot-teardown";

/// Steps one reconcile performs at the most (AddFinalizer, Adopt or
/// Create, Restore, Keep); more is a bug, looked at again later.
const MAX_STEPS: usize = 8;

/// Reconciles Snapshots.
#[derive(Debug)]
pub struct SnapshotReconciler {
    ctx: Arc<Context>,
}

impl SnapshotReconciler {
    /// A Snapshot reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        SnapshotReconciler { ctx }
    }

    /// Reads what [`plan`] needs.
    async fn observe(&self, obj: &Object) -> Result<Observed, Error> {
        let s = Snapshot::from_object(obj).map_err(Error::decode(Kind::Snapshot))?;
        let mut o = Observed {
            name: s.metadata.name.clone(),
            vm: s.spec.vm.clone(),
            generation: s.metadata.generation,
            deleting: s.metadata.deletion_timestamp.is_some(),
            finalizer: s.metadata.finalizers.iter().any(|f| f == FINALIZER),
            restore_token: s.spec.restore_token.clone(),
            status: s.status.unwrap_or_default(),
            vm_view: VmView::Missing,
            saved: None,
            vm_blocked: None,
            now: Utc::now(),
        };
        if o.deleting {
            return Ok(o);
        }
        let vm_ref = ObjectRef::new(Kind::VirtualMachine, o.vm.clone());
        let hv = &self.ctx.drivers.hypervisor;
        let vm = self.ctx.get(&vm_ref).await?;
        o.vm_view = match &vm {
            None => VmView::Missing,
            Some(vm) if vm.metadata.deletion_timestamp.is_some() => VmView::Deleting,
            Some(_) => match hv
                .status(&o.vm)
                .await
                .map_err(Error::driver("inspect", &vm_ref))?
            {
                None => VmView::NoInstance,
                Some(i) => VmView::Instance(i.state),
            },
        };
        if o.vm_view == VmView::NoInstance
            && let Some(vm) = &vm
        {
            o.vm_blocked = self.vm_blocked(vm).await?;
        }
        if matches!(o.vm_view, VmView::Instance(_)) {
            o.saved = hv
                .snapshots(&o.vm)
                .await
                .map_err(Error::driver("list the snapshots of", &vm_ref))?
                .into_iter()
                .find(|i| i.name == o.name);
        }
        Ok(o)
    }

    /// Why the VM `vm`, which has no instance, will not get one until its
    /// user acts ([`Observed::vm_blocked`]).
    async fn vm_blocked(&self, vm: &Object) -> Result<Option<String>, Error> {
        let Ok(v) = vmctl_api::VirtualMachine::from_object(vm) else {
            return Ok(None);
        };
        let name = &v.metadata.name;
        if v.spec.power_state != vmctl_api::PowerState::Running {
            return Ok(Some(format!(
                "it has never run (its powerState is {:?}): start it (`vmctl start {name}`)",
                v.spec.power_state
            )));
        }
        let image_ref = ObjectRef::new(Kind::Image, v.spec.image.clone());
        let Some(image) = self.ctx.get(&image_ref).await? else {
            return Ok(Some(format!(
                "its image {} does not exist: apply it, or give the VM another image",
                v.spec.image
            )));
        };
        let failed = vmctl_api::Image::from_object(&image)
            .ok()
            .and_then(|i| i.status)
            .filter(|s| s.phase == vmctl_api::ImagePhase::Failed);
        Ok(failed.map(|s| {
            let why = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| format!(": {}", c.message))
                .unwrap_or_default();
            format!(
                "its image {} failed{why}: fix the image's source and apply it again (or \
                 `vmctl image pull URL --name {}`)",
                v.spec.image, v.spec.image
            )
        }))
    }

    /// Records a note about the Snapshot and the same one about its VM
    /// (the VM's history shows every snapshot and restore).
    async fn note_both(&self, o: &Observed, type_: NoteType, reason: &str, msg: String) {
        let own = ObjectRef::new(Kind::Snapshot, o.name.clone());
        let vm = ObjectRef::new(Kind::VirtualMachine, o.vm.clone());
        self.ctx
            .note(&own, type_, Self::NAME, reason, msg.clone())
            .await;
        self.ctx.note(&vm, type_, Self::NAME, reason, msg).await;
    }

    /// The hypervisor could not be asked about the Snapshot's VM (its
    /// state or its snapshots), error `e`: a Snapshot not saved yet
    /// (`Pending`, or no status at all) says so in its `Ready` condition
    /// (reason `HypervisorError`, the error as the message) and in one
    /// Warning note per distinct error, instead of showing nothing while
    /// the runtime retries with backoff. A Snapshot further along keeps
    /// its status: its phase and conditions say what is known of it.
    async fn report_unobservable(&self, obj: &Object, e: &Error) -> Result<(), Error> {
        const REASON: &str = "HypervisorError";
        let s = Snapshot::from_object(obj).map_err(Error::decode(Kind::Snapshot))?;
        let mut status = s.status.unwrap_or_default();
        if status.phase != vmctl_api::SnapshotPhase::Pending
            || s.metadata.deletion_timestamp.is_some()
        {
            return Ok(());
        }
        let message = vmctl_api::error_chain(e);
        let said = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == REASON && c.message == message);
        if said {
            return Ok(());
        }
        let generation = s.metadata.generation;
        let cond =
            crate::conditions::condition("Ready", false, REASON, message.clone(), generation);
        vmctl_api::set_condition(&mut status.conditions, cond, Utc::now());
        status.observed_generation = generation;
        let msg = format!(
            "Snapshot {} cannot be saved yet: {message}; retrying",
            s.metadata.name
        );
        self.ctx
            .note(
                &obj.object_ref(),
                NoteType::Warning,
                Self::NAME,
                REASON,
                msg,
            )
            .await;
        self.ctx.write_status(obj, &status).await?;
        Ok(())
    }

    /// Performs `step`; `Some(action)` ends the reconcile.
    async fn act(
        &self,
        obj: &mut Object,
        o: &mut Observed,
        step: Step,
    ) -> Result<Option<Action>, Error> {
        let ctx = &self.ctx;
        let hv = &ctx.drivers.hypervisor;
        let vm_ref = ObjectRef::new(Kind::VirtualMachine, o.vm.clone());
        let done = Ok(Some(Action::await_change()));
        match step {
            Step::Forget => return done,
            Step::Teardown => {
                o.terminating();
                let written = ctx.write_status(obj, &o.status).await?;
                // A VM being deleted (or gone) takes its disks, and so this
                // snapshot's state, with it: nothing to ask of its QEMU,
                // which may be the reason it is deleted (wedged, not
                // answering QMP).
                let vm_goes = match ctx.get(&vm_ref).await? {
                    None => true,
                    Some(vm) => vm.metadata.deletion_timestamp.is_some(),
                };
                if !vm_goes {
                    hv.delete_snapshot(&o.vm, &o.name)
                        .await
                        .map_err(Error::driver("delete a snapshot of", &vm_ref))?;
                }
                if o.status.creation_time.is_some() {
                    let msg = format!("Deleted snapshot {} of VM {}", o.name, o.vm);
                    self.note_both(o, NoteType::Normal, "SnapshotDeleted", msg)
                        .await;
                }
                ctx.remove_finalizer(&written, FINALIZER).await?;
                return done;
            }
            Step::AddFinalizer => {
                if let Some(written) = ctx.add_finalizer(obj, FINALIZER).await? {
                    *obj = written;
                }
                o.finalizer = true;
            }
            Step::Adopt => {
                let info = o
                    .saved
                    .clone()
                    .expect("Adopt is planned for a saved snapshot");
                o.saved(info);
            }
            Step::Create => {
                o.creating();
                *obj = ctx.write_status(obj, &o.status).await?;
                let result = hv.create_snapshot(&o.vm, &o.name).await;
                o.now = Utc::now();
                match result {
                    Ok(info) => {
                        let what = if info.memory {
                            format!(
                                "disks ({}) and memory ({} MiB)",
                                info.disks.join(", "),
                                info.vm_state_bytes.div_ceil(1 << 20)
                            )
                        } else {
                            format!("disks ({}) only: the VM is stopped", info.disks.join(", "))
                        };
                        let msg = format!("Saved snapshot {} of VM {}: {what}", o.name, o.vm);
                        o.saved(info);
                        self.note_both(o, NoteType::Normal, "SnapshotCreated", msg)
                            .await;
                    }
                    Err(e) => {
                        let err = vmctl_api::error_chain(&e);
                        let msg = format!(
                            "Cannot save snapshot {} of VM {}: {err}; delete it and create another",
                            o.name, o.vm
                        );
                        o.failed("CreateFailed", err);
                        self.note_both(o, NoteType::Warning, "SnapshotFailed", msg)
                            .await;
                    }
                }
            }
            Step::Restore => {
                o.restoring();
                *obj = ctx.write_status(obj, &o.status).await?;
                let result = hv.restore_snapshot(&o.vm, &o.name).await;
                o.now = Utc::now();
                match result {
                    Ok(()) => {
                        let how = match o.vm_view {
                            VmView::Instance(crate::drivers::InstanceState::Stopped) => {
                                "its disks (the VM is stopped)"
                            }
                            _ => "its disks and memory",
                        };
                        let msg = format!("Restored VM {} to snapshot {} ({how})", o.vm, o.name);
                        o.restored(Ok(()));
                        self.note_both(o, NoteType::Normal, "SnapshotRestored", msg)
                            .await;
                    }
                    Err(e) => {
                        let err = restore_error(&e);
                        let msg =
                            format!("Cannot restore VM {} to snapshot {}: {err}", o.vm, o.name);
                        o.restored(Err(err));
                        self.note_both(o, NoteType::Warning, "RestoreFailed", msg)
                            .await;
                    }
                }
            }
            Step::Fail { reason, message } => {
                if o.status.phase != vmctl_api::SnapshotPhase::Failed {
                    let msg = format!("Snapshot {} failed: {message}", o.name);
                    ctx.note(
                        &obj.object_ref(),
                        NoteType::Warning,
                        Self::NAME,
                        reason,
                        msg,
                    )
                    .await;
                }
                o.failed(reason, message);
                ctx.write_status(obj, &o.status).await?;
                return done;
            }
            Step::WaitForVm => {
                o.waiting_for_vm();
                ctx.write_status(obj, &o.status).await?;
                // The VM's change wakes this Snapshot.
                return done;
            }
            Step::Keep => {
                o.keep();
                ctx.write_status(obj, &o.status).await?;
                return done;
            }
        }
        Ok(None)
    }
}

/// A restore's error as the status and notes say it, with what to do.
fn restore_error(e: &DriverError) -> String {
    match e {
        DriverError::InvalidState { .. } => format!(
            "{e}: the snapshot has no memory state, so it can be restored to a stopped VM only (`vmctl stop`, restore, `vmctl start`)"
        ),
        e => vmctl_api::error_chain(e),
    }
}

impl Reconciler for SnapshotReconciler {
    type Error = Error;
    const KIND: Kind = Kind::Snapshot;
    const NAME: &'static str = "snapshot-controller";

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, Error> {
        // In a cluster, the agent of the VM's node (its disks are there)
        // runs its Snapshots; any agent reports one whose VM does not exist.
        if self.ctx.config.cluster
            && let Some(vm) = obj.spec.get("vm").and_then(|v| v.as_str())
            && let Some(vm) = self
                .ctx
                .get(&ObjectRef::new(Kind::VirtualMachine, vm.to_owned()))
                .await?
            && !self.ctx.acts_on(crate::context::vm_node(&vm))
        {
            return Ok(Action::await_change());
        }
        let mut o = match self.observe(&obj).await {
            Ok(o) => o,
            Err(e @ Error::Driver { .. }) => {
                self.report_unobservable(&obj, &e).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let mut obj = (*obj).clone();
        for _ in 0..MAX_STEPS {
            let step = plan(&o);
            tracing::trace!(?step, "planned");
            if let Some(action) = self.act(&mut obj, &mut o, step).await? {
                return Ok(action);
            }
        }
        tracing::error!(steps = MAX_STEPS, "the snapshot plan did not end");
        Ok(Action::requeue(self.ctx.config.liveness))
    }

    fn related(&self, rel: &Relations, ev: &Event) -> Vec<ObjectRef> {
        match (&ev.change, ev.object.kind) {
            (Change::Noted { .. }, _) => Vec::new(),
            (_, Kind::VirtualMachine) => rel.snapshots_of(&ev.object.name).collect(),
            _ => Vec::new(),
        }
    }
}

/// The Snapshots of VM `vm` among `objects` (of any kind).
pub fn of_vm<'a>(objects: &'a [Object], vm: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
    objects.iter().filter(move |o| {
        o.kind == Kind::Snapshot && o.spec.get("vm").and_then(|v| v.as_str()) == Some(vm)
    })
}
