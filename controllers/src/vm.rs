//! The VirtualMachine controller: drives each VM to its `powerState`.
//!
//! ```text
//!   Pending ──image Ready──▶ (Starting) ──ok──▶ Running ◀──resume── Suspended
//!      │                         │                │  └────suspend────▲
//!      │                         │ error          └──stop──▶ Stopped
//!      │                         ▼
//!      │                   CrashLoopBackOff ── retryAfter passed ──▶ (Starting)
//!      ▼
//!   deletion requested ──▶ Terminating ── destroy, drop finalizer ──▶ gone
//! ```
//!
//! Observe first, then act: the hypervisor's view of the instance decides
//! what to do, so a run after a crash picks up wherever the last one stopped.
//! The finalizer `vmctl.dev/vm-teardown` is added before the first start, so
//! a deleted VM's instance is destroyed before the object goes. Start
//! failures are counted in `status.startFailures`, with a `retryAfter`
//! deadline growing exponentially, and reported by a Warning note `BackOff`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use vmctl_api::{
    Condition, ConditionStatus, Image, ImagePhase, Kind, NoteType, Object, ObjectRef, PowerState,
    UpdatePolicy, VirtualMachine, VirtualMachineStatus, VmPhase, set_condition,
};
use vmctl_store::{Change, Event};

use crate::Context;
use crate::drivers::{DriverError, InstanceSpec, InstanceState, LocalImage};
use crate::runtime::controller::ControllerError;
use crate::runtime::{Action, ReconcileError, Reconciler, Relations};

/// The finalizer that makes a deleted VM wait for its teardown.
pub const FINALIZER: &str = "vmctl.dev/vm-teardown";

/// Errors of the VirtualMachine controller.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The object's spec or status does not match the VirtualMachine schema.
    #[error("invalid VirtualMachine object")]
    Decode(#[source] serde_json::Error),
    /// Reading or writing the store failed.
    #[error("store access failed")]
    Store(#[source] ControllerError),
    /// A hypervisor operation failed.
    #[error("cannot {op} VM {name}")]
    Driver {
        /// The operation.
        op: &'static str,
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: DriverError,
    },
}

impl ReconcileError for VmError {
    fn is_conflict(&self) -> bool {
        matches!(self, VmError::Store(e) if e.is_conflict())
    }
}

impl From<ControllerError> for VmError {
    fn from(e: ControllerError) -> Self {
        VmError::Store(e)
    }
}

fn driver(op: &'static str, name: &str) -> impl FnOnce(DriverError) -> VmError {
    let name = name.to_owned();
    move |source| VmError::Driver { op, name, source }
}

/// Reconciles VirtualMachines.
#[derive(Debug)]
pub struct VmReconciler {
    ctx: Arc<Context>,
    /// The hypervisor reports state changes itself: a running VM needs no
    /// liveness polling, only a slow safety-net look.
    event_driven: bool,
}

impl VmReconciler {
    /// A VirtualMachine reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        let event_driven = ctx.drivers.hypervisor.changes().is_some();
        VmReconciler { ctx, event_driven }
    }
}

/// How often a running VM is looked at when the hypervisor reports its
/// changes itself (QMP events): only to catch a lost event.
const EVENT_DRIVEN_LIVENESS: Duration = Duration::from_secs(60);

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: u64) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: generation,
    }
}

/// The image a VM boots from, if it is Ready.
fn ready_image(obj: Option<&Object>) -> Result<LocalImage, (&'static str, String)> {
    let Some(obj) = obj else {
        return Err(("ImageNotFound", "the image does not exist".into()));
    };
    let image = Image::from_object(obj).map_err(|e| ("ImageInvalid", e.to_string()))?;
    let status = image.status.unwrap_or_default();
    match (status.phase, status.path) {
        (ImagePhase::Ready, Some(path)) => Ok(LocalImage {
            path,
            format: status.format.unwrap_or_else(|| "raw".into()),
            size_bytes: status.size_bytes.unwrap_or_default(),
            virtual_size_bytes: status.virtual_size_bytes,
        }),
        (phase, _) => Err(("ImageNotReady", format!("the image is {phase:?}"))),
    }
}

impl VmReconciler {
    async fn finalize(&self, obj: &Object, vm: &VirtualMachine) -> Result<Action, VmError> {
        let ctx = &self.ctx;
        if !obj.metadata.finalizers.iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let name = vm.metadata.name.as_str();
        let mut status = vm.status.clone().unwrap_or_default();
        status.phase = VmPhase::Terminating;
        let generation = vm.metadata.generation;
        let cond = condition(
            "Ready",
            false,
            "Terminating",
            "being deleted".into(),
            generation,
        );
        set_condition(&mut status.conditions, cond, Utc::now());
        let obj = ctx.write_status(obj, &status).await?;
        ctx.drivers
            .hypervisor
            .destroy(name)
            .await
            .map_err(driver("destroy", name))?;
        let r = obj.object_ref();
        let msg = format!("Destroyed VM {name} and its resources");
        ctx.note(&r, NoteType::Normal, Self::NAME_, "Destroyed", msg)
            .await;
        ctx.remove_finalizer(&obj, FINALIZER).await?;
        Ok(Action::await_change())
    }

    const NAME_: &'static str = "vm-controller";
}

impl Reconciler for VmReconciler {
    type Error = VmError;
    const KIND: Kind = Kind::VirtualMachine;
    const NAME: &'static str = VmReconciler::NAME_;

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, VmError> {
        let ctx = &self.ctx;
        let hv = &ctx.drivers.hypervisor;
        let vm = VirtualMachine::from_object(&obj).map_err(VmError::Decode)?;
        if vm.metadata.deletion_timestamp.is_some() {
            return self.finalize(&obj, &vm).await;
        }
        let name = vm.metadata.name.as_str();
        let generation = vm.metadata.generation;
        let r = obj.object_ref();
        let mut status: VirtualMachineStatus = vm.status.clone().unwrap_or_default();
        let now = Utc::now();

        // Observe.
        let image_ref = ObjectRef::new(Kind::Image, vm.spec.image.clone());
        let image = ready_image(ctx.get(&image_ref).await?.as_ref());
        let cond = match &image {
            Ok(_) => condition("ImageReady", true, "ImageReady", String::new(), generation),
            Err((reason, msg)) => condition("ImageReady", false, reason, msg.clone(), generation),
        };
        set_condition(&mut status.conditions, cond, now);
        let mut instance = hv.status(name).await.map_err(driver("inspect", name))?;

        if instance.is_none() && vm.spec.power_state != PowerState::Stopped && image.is_err() {
            status.phase = VmPhase::Pending;
            status.observed_generation = generation;
            let cond = condition("Ready", false, "WaitingForImage", String::new(), generation);
            set_condition(&mut status.conditions, cond, now);
            ctx.write_status(&obj, &status).await?;
            // The image's status change wakes this VM.
            return Ok(Action::await_change());
        }

        // The finalizer goes on before anything exists that would need it.
        let obj = ctx
            .add_finalizer(&obj, FINALIZER)
            .await?
            .unwrap_or_else(|| (*obj).clone());

        // The disk was made from one image; a spec naming another one needs
        // a new disk. Only updatePolicy Recreate (or `vmctl reload`, or
        // delete) destroys a disk.
        if instance.is_some() {
            let disk_image = status
                .disk_image
                .get_or_insert_with(|| vm.spec.image.clone())
                .clone();
            let differs = disk_image != vm.spec.image;
            if differs && vm.spec.update_policy == UpdatePolicy::Recreate {
                hv.destroy(name).await.map_err(driver("destroy", name))?;
                let msg = format!(
                    "Recreating VM {name}: its disk was made from image {disk_image}, the spec names {} (updatePolicy Recreate)",
                    vm.spec.image
                );
                ctx.note(&r, NoteType::Normal, Self::NAME, "Recreating", msg)
                    .await;
                status.disk_image = None;
                status.started_spec = None;
                status.runtime = None;
                status.phase = VmPhase::Pending;
                status.observed_generation = generation;
                let cond = condition("Ready", false, "Recreating", String::new(), generation);
                set_condition(&mut status.conditions, cond, Utc::now());
                let cond = condition(
                    "RecreateRequired",
                    false,
                    "Recreating",
                    String::new(),
                    generation,
                );
                set_condition(&mut status.conditions, cond, Utc::now());
                ctx.write_status(&obj, &status).await?;
                return Ok(Action::requeue(Duration::ZERO));
            }
            let cond = if differs {
                condition(
                    "RecreateRequired",
                    true,
                    "ImageChanged",
                    format!(
                        "the disk was made from image {disk_image}; booting {} needs a new disk: run `vmctl reload {name}` or set update-policy \"recreate\" (both destroy the disk)",
                        vm.spec.image
                    ),
                    generation,
                )
            } else {
                condition(
                    "RecreateRequired",
                    false,
                    "UpToDate",
                    String::new(),
                    generation,
                )
            };
            if set_condition(&mut status.conditions, cond, now) && differs {
                let msg = format!(
                    "VM {name} keeps its disk made from image {disk_image}; the new image applies only when the VM is recreated"
                );
                ctx.note(&r, NoteType::Warning, Self::NAME, "RecreateRequired", msg)
                    .await;
            }
        }

        // Act.
        let want = vm.spec.power_state;
        let state = instance.as_ref().map(|i| i.state);
        // Last seen running, now gone, and nobody asked for it: the
        // hypervisor process died. Count it as a failed start so restarts
        // back off, and say so in a note.
        if want != PowerState::Stopped
            && status.phase == VmPhase::Running
            && matches!(state, None | Some(InstanceState::Stopped))
        {
            let how = instance
                .as_ref()
                .and_then(|i| i.runtime.last_exit.clone())
                .unwrap_or_else(|| "exited".into());
            let msg = format!(
                "VM {name} stopped unexpectedly (its hypervisor process {how}); restarting"
            );
            ctx.note(&r, NoteType::Warning, Self::NAME, "Crashed", msg.clone())
                .await;
            let err = DriverError::Backend(msg);
            return self.start_failed(&obj, status, instance, err).await;
        }
        if want != PowerState::Stopped && matches!(state, None | Some(InstanceState::Stopped)) {
            if let Some(retry_after) = status.start_failures.retry_after
                && retry_after > now
            {
                status.phase = VmPhase::CrashLoopBackOff;
                status.observed_generation = generation;
                ctx.write_status(&obj, &status).await?;
                return Ok(Action::requeue(
                    (retry_after - now).to_std().unwrap_or_default(),
                ));
            }
            // Prepare before every start: it is idempotent and brings the
            // instance's configuration (vcpus, memory, disk size) to the spec.
            match image.clone() {
                Ok(image) => {
                    if instance.is_none() {
                        status.disk_image = Some(vm.spec.image.clone());
                    }
                    let spec = InstanceSpec {
                        name: name.to_owned(),
                        uid: obj.metadata.uid.clone().unwrap_or_else(|| name.to_owned()),
                        spec: vm.spec.clone(),
                        image,
                    };
                    instance = Some(hv.prepare(&spec).await.map_err(driver("prepare", name))?);
                }
                Err(_) if instance.is_some() => {}
                Err(_) => unreachable!("a missing instance with no image returned above"),
            }
            match hv.start(name).await {
                Ok(st) => {
                    status.start_failures = Default::default();
                    status.started_spec = Some(restart_digest(&vm.spec));
                    let port = st
                        .runtime
                        .ssh_port
                        .map(|p| format!(", SSH on port {p}"))
                        .unwrap_or_default();
                    instance = Some(st);
                    let msg = format!("Started VM {name}{port}");
                    ctx.note(&r, NoteType::Normal, Self::NAME, "Started", msg)
                        .await;
                }
                Err(e) => return self.start_failed(&obj, status, instance, e).await,
            }
        }
        let state = instance.as_ref().map(|i| i.state);
        let next = match (want, state) {
            (PowerState::Suspended, Some(InstanceState::Running)) => {
                hv.suspend(name).await.map_err(driver("suspend", name))?;
                ctx.note(
                    &r,
                    NoteType::Normal,
                    Self::NAME,
                    "Suspended",
                    format!("Suspended VM {name}"),
                )
                .await;
                Some(InstanceState::Suspended)
            }
            (PowerState::Running, Some(InstanceState::Suspended)) => {
                hv.resume(name).await.map_err(driver("resume", name))?;
                ctx.note(
                    &r,
                    NoteType::Normal,
                    Self::NAME,
                    "Resumed",
                    format!("Resumed VM {name}"),
                )
                .await;
                Some(InstanceState::Running)
            }
            (PowerState::Stopped, Some(InstanceState::Running | InstanceState::Suspended)) => {
                hv.stop(name, stop_timeout(&vm.spec, ctx.config.stop_timeout))
                    .await
                    .map_err(driver("stop", name))?;
                ctx.note(
                    &r,
                    NoteType::Normal,
                    Self::NAME,
                    "Stopped",
                    format!("Stopped VM {name}"),
                )
                .await;
                Some(InstanceState::Stopped)
            }
            (_, s) => s,
        };

        // A running instance whose restart-only fields differ from the spec.
        if matches!(
            next,
            Some(InstanceState::Running | InstanceState::Suspended)
        ) {
            let want_digest = restart_digest(&vm.spec);
            let started = status
                .started_spec
                .get_or_insert_with(|| want_digest.clone())
                .clone();
            let differs = started != want_digest;
            if differs && vm.spec.update_policy != UpdatePolicy::RestartRequired {
                hv.stop(name, stop_timeout(&vm.spec, ctx.config.stop_timeout))
                    .await
                    .map_err(driver("stop", name))?;
                let msg =
                    format!("Restarting VM {name} to apply a spec change (updatePolicy Restart)");
                ctx.note(&r, NoteType::Normal, Self::NAME, "Restarting", msg)
                    .await;
                status.phase = VmPhase::Stopped;
                status.observed_generation = generation;
                let cond = condition("Ready", false, "Restarting", String::new(), generation);
                set_condition(&mut status.conditions, cond, Utc::now());
                ctx.write_status(&obj, &status).await?;
                return Ok(Action::requeue(Duration::ZERO));
            }
            let cond = if differs {
                condition(
                    "RestartRequired",
                    true,
                    "SpecChanged",
                    "vcpus, memory, network or cloud-init changed; stop and start the VM (or set update-policy \"restart\") to apply".into(),
                    generation,
                )
            } else {
                condition(
                    "RestartRequired",
                    false,
                    "UpToDate",
                    String::new(),
                    generation,
                )
            };
            if set_condition(&mut status.conditions, cond, Utc::now()) && differs {
                let msg = format!(
                    "VM {name} runs with an older spec; the change applies at the next start"
                );
                ctx.note(&r, NoteType::Warning, Self::NAME, "RestartRequired", msg)
                    .await;
            }
        }

        // Report.
        let (phase, ready, reason) = match next {
            Some(InstanceState::Running) => (VmPhase::Running, true, "Running"),
            Some(InstanceState::Suspended) => (VmPhase::Suspended, false, "Suspended"),
            Some(InstanceState::Stopped) | None => (VmPhase::Stopped, false, "Stopped"),
        };
        status.phase = phase;
        status.observed_generation = generation;
        if let Some(inst) = instance {
            status.runtime = Some(inst.runtime);
        }
        let cond = condition("Ready", ready, reason, String::new(), generation);
        set_condition(&mut status.conditions, cond, Utc::now());
        ctx.write_status(&obj, &status).await?;
        // A running VM is looked at again soon: its process may die
        // without any event in the store.
        Ok(match next {
            Some(InstanceState::Running | InstanceState::Suspended) if self.event_driven => {
                Action::requeue(EVENT_DRIVEN_LIVENESS.max(ctx.config.liveness))
            }
            Some(InstanceState::Running | InstanceState::Suspended) => {
                Action::requeue(ctx.config.liveness)
            }
            _ => Action::await_change(),
        })
    }

    fn external_triggers(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.ctx.drivers.hypervisor.changes()
    }

    fn related(&self, rel: &Relations, ev: &Event) -> Vec<ObjectRef> {
        match (&ev.change, ev.object.kind) {
            (Change::Noted { .. }, _) => Vec::new(),
            (_, Kind::Image) => rel.vms_using(&ev.object.name).collect(),
            _ => Vec::new(),
        }
    }
}

impl VmReconciler {
    async fn start_failed(
        &self,
        obj: &Object,
        mut status: VirtualMachineStatus,
        instance: Option<crate::drivers::InstanceStatus>,
        err: DriverError,
    ) -> Result<Action, VmError> {
        let ctx = &self.ctx;
        let name = obj.name();
        let now = Utc::now();
        let generation = obj.metadata.generation;
        let count = status.start_failures.count.saturating_add(1);
        let delay = ctx.config.start_backoff.jittered(count);
        let retry_after = now + chrono::Duration::from_std(delay).unwrap_or_default();
        status.start_failures.count = count;
        status.start_failures.last_failure_time = Some(now);
        status.start_failures.retry_after = Some(retry_after);
        status.phase = VmPhase::CrashLoopBackOff;
        status.observed_generation = generation;
        if let Some(inst) = instance {
            status.runtime = Some(inst.runtime);
        }
        let cond = condition("Ready", false, "StartFailed", err.to_string(), generation);
        set_condition(&mut status.conditions, cond, now);
        ctx.write_status(obj, &status).await?;
        let msg = format!(
            "Back-off restarting failed VM {name} (failure {count}: {err}); retry in {:.1}s",
            delay.as_secs_f64()
        );
        ctx.note(
            &obj.object_ref(),
            NoteType::Warning,
            Self::NAME,
            "BackOff",
            msg,
        )
        .await;
        Ok(Action::requeue(delay))
    }
}

/// The spec's ACPI grace period, else the configured one.
fn stop_timeout(spec: &vmctl_api::VirtualMachineSpec, default: Duration) -> Duration {
    spec.stop_timeout_seconds
        .map_or(default, |s| Duration::from_secs(s.into()))
}

/// Digest of the spec fields that only a restart can apply.
pub fn restart_digest(spec: &vmctl_api::VirtualMachineSpec) -> String {
    use sha2::Digest;
    let v = serde_json::json!({
        "vcpus": spec.vcpus,
        "memoryMib": spec.memory_mib,
        "network": spec.network,
        "cloudInit": spec.cloud_init,
    });
    hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..8])
}
