//! The Provision controller: runs a VM's provisioning steps once per spec
//! generation and VM instance.
//!
//! ```text
//!   Pending ──VM Ready──▶ Running ──wait SSH, steps in order──▶ Succeeded
//!      ▲                     │                                     │
//!      │ SSH did not answer  └── a step failed ──▶ Failed          │
//!      └── (retried with backoff)                                  │
//!   new generation or new VM instance id ◀──────────────────────────┘
//! ```
//!
//! A finished run is recorded with `observedGeneration` and `vmInstanceId`;
//! a restarted agent compares both and does not run the steps again. A run
//! interrupted by a crash is not finished, so it runs again from the start.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use vmctl_api::{
    Condition, ConditionStatus, Kind, NoteType, Object, ObjectRef, Provision, ProvisionPhase,
    ProvisionStatus, StepPhase, StepStatus, VirtualMachine, set_condition,
};
use vmctl_store::{Change, Event};

use crate::Context;
use crate::drivers::{DriverError, SshTarget};
use crate::runtime::controller::ControllerError;
use crate::runtime::{Action, ReconcileError, Reconciler, Relations};

/// Errors of the Provision controller.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The object's spec or status does not match the Provision schema.
    #[error("invalid Provision object")]
    Decode(#[source] serde_json::Error),
    /// Reading or writing the store failed.
    #[error("store access failed")]
    Store(#[source] ControllerError),
    /// The VM did not answer SSH in time.
    #[error("VM {vm} does not answer SSH")]
    Ssh {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: DriverError,
    },
}

impl ReconcileError for ProvisionError {
    fn is_conflict(&self) -> bool {
        matches!(self, ProvisionError::Store(e) if e.is_conflict())
    }
}

impl From<ControllerError> for ProvisionError {
    fn from(e: ControllerError) -> Self {
        ProvisionError::Store(e)
    }
}

/// Reconciles Provisions.
#[derive(Debug)]
pub struct ProvisionReconciler {
    ctx: Arc<Context>,
}

impl ProvisionReconciler {
    /// A Provision reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        ProvisionReconciler { ctx }
    }
}

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

/// The VM's SSH target if it is Ready.
fn ready_vm(obj: Option<&Object>) -> Option<SshTarget> {
    let vm = VirtualMachine::from_object(obj?).ok()?;
    let status = vm.status?;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == ConditionStatus::True);
    Some(SshTarget {
        vm: vm.metadata.name,
        runtime: status.runtime.filter(|_| ready)?,
        ssh: vm.spec.ssh,
    })
}

impl Reconciler for ProvisionReconciler {
    type Error = ProvisionError;
    const KIND: Kind = Kind::Provision;
    const NAME: &'static str = "provision-controller";

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, ProvisionError> {
        let ctx = &self.ctx;
        let p = Provision::from_object(&obj).map_err(ProvisionError::Decode)?;
        if p.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        let generation = p.metadata.generation;
        let r = obj.object_ref();
        let old = p.status.clone().unwrap_or_default();
        let finished = matches!(
            old.phase,
            ProvisionPhase::Succeeded | ProvisionPhase::Failed
        ) && old.observed_generation == generation;

        // Observe.
        let vm_ref = ObjectRef::new(Kind::VirtualMachine, p.spec.vm.clone());
        let Some(target) = ready_vm(ctx.get(&vm_ref).await?.as_ref()) else {
            if !finished {
                let mut status = old.clone();
                status.phase = ProvisionPhase::Pending;
                let cond = condition("Ready", false, "WaitingForVm", String::new(), generation);
                set_condition(&mut status.conditions, cond, Utc::now());
                ctx.write_status(&obj, &status).await?;
            }
            // The VM's status change wakes this Provision.
            return Ok(Action::await_change());
        };
        if finished && old.vm_instance_id == target.runtime.instance_id {
            return Ok(Action::await_change());
        }

        // Act: run every step.
        let mut status = old.clone();
        status.phase = ProvisionPhase::Running;
        status.steps = (0..p.spec.steps.len() as u32)
            .map(|index| StepStatus {
                index,
                ..Default::default()
            })
            .collect();
        let cond = condition("Ready", false, "Running", String::new(), generation);
        set_condition(&mut status.conditions, cond, Utc::now());
        let mut obj = ctx.write_status(&obj, &status).await?;

        let timeout = target
            .ssh
            .as_ref()
            .and_then(|s| s.timeout_seconds)
            .map(|s| Duration::from_secs(s.into()))
            .unwrap_or(ctx.config.ssh_timeout);
        if let Err(source) = ctx.drivers.provisioner.wait_ssh(&target, timeout).await {
            // Failed for this generation, with the reason, so that `apply
            // --wait` and `get` say why; no instance is recorded as done,
            // so the runtime's backoff keeps retrying in case the guest
            // comes up later.
            status.phase = ProvisionPhase::Failed;
            status.observed_generation = generation;
            status.vm_instance_id = None;
            let cond = condition(
                "SshReady",
                false,
                "SshTimeout",
                source.to_string(),
                generation,
            );
            set_condition(&mut status.conditions, cond, Utc::now());
            let cond = condition(
                "Ready",
                false,
                "SshTimeout",
                format!("VM {} does not answer SSH: {source}", target.vm),
                generation,
            );
            set_condition(&mut status.conditions, cond, Utc::now());
            ctx.write_status(&obj, &status).await?;
            let msg = format!("VM {} does not answer SSH: {source}", target.vm);
            ctx.note(&r, NoteType::Warning, Self::NAME, "SshTimeout", msg)
                .await;
            return Err(ProvisionError::Ssh {
                vm: target.vm.clone(),
                source,
            });
        }
        let cond = condition("SshReady", true, "Connected", String::new(), generation);
        set_condition(&mut status.conditions, cond, Utc::now());

        let mut failed = None;
        for (i, step) in p.spec.steps.iter().enumerate() {
            let index = i as u32;
            if failed.is_some() {
                status.steps[i].phase = StepPhase::Skipped;
                continue;
            }
            status.steps[i].phase = StepPhase::Running;
            status.steps[i].started_at = Some(Utc::now());
            obj = ctx.write_status(&obj, &status).await?;
            let vm = target.vm.clone();
            let output = move |line: &str| tracing::debug!(vm = %vm, step = index, "{line}");
            let result = ctx
                .drivers
                .provisioner
                .run_step(&target, index, step, &output)
                .await;
            let st = &mut status.steps[i];
            st.finished_at = Some(Utc::now());
            match result {
                Ok(out) if out.exit_code == 0 => {
                    st.phase = StepPhase::Succeeded;
                    st.exit_code = Some(0);
                }
                Ok(out) => {
                    st.phase = StepPhase::Failed;
                    st.exit_code = Some(out.exit_code);
                    st.message = Some(format!("exited with code {}", out.exit_code));
                    failed = Some(format!("step {index} exited with code {}", out.exit_code));
                }
                Err(e) => {
                    st.phase = StepPhase::Failed;
                    st.message = Some(e.to_string());
                    failed = Some(format!("step {index} could not run: {e}"));
                }
            }
        }

        // Report.
        status.observed_generation = generation;
        status.vm_instance_id = target.runtime.instance_id.clone();
        let (note_type, reason, msg) = match &failed {
            None => {
                status.phase = ProvisionPhase::Succeeded;
                let cond = condition("Ready", true, "Succeeded", String::new(), generation);
                set_condition(&mut status.conditions, cond, Utc::now());
                let n = p.spec.steps.len();
                (
                    NoteType::Normal,
                    "ProvisionSucceeded",
                    format!("Provisioned VM {} ({n} steps)", target.vm),
                )
            }
            Some(why) => {
                status.phase = ProvisionPhase::Failed;
                let cond = condition("Ready", false, "StepFailed", why.clone(), generation);
                set_condition(&mut status.conditions, cond, Utc::now());
                (
                    NoteType::Warning,
                    "ProvisionFailed",
                    format!("Provisioning VM {} failed: {why}", target.vm),
                )
            }
        };
        ctx.write_status(&obj, &status).await?;
        ctx.note(&r, note_type, Self::NAME, reason, msg).await;
        Ok(Action::await_change())
    }

    fn related(&self, rel: &Relations, ev: &Event) -> Vec<ObjectRef> {
        match (&ev.change, ev.object.kind) {
            (Change::Noted { .. }, _) => Vec::new(),
            (_, Kind::VirtualMachine) => rel.provisions_of(&ev.object.name).collect(),
            _ => Vec::new(),
        }
    }
}

/// Whether a status says the Provision finished for `generation` (for tests and the CLI).
pub fn is_finished(status: &ProvisionStatus, generation: u64) -> bool {
    matches!(
        status.phase,
        ProvisionPhase::Succeeded | ProvisionPhase::Failed
    ) && status.observed_generation == generation
}
