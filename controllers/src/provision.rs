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
//!
//! Each reconcile is observe → plan → act: read the Provision and its VM
//! ([`Observed`]), let the pure [`plan`] name the [`Step`] (drawn in
//! [`mod@plan`]), and perform it.

mod plan;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use vmctl_api::{Kind, NoteType, Object, ObjectRef, Provision, ProvisionStep, VirtualMachine};
use vmctl_store::{Change, Event};

pub use self::plan::{Observed, Step, is_finished, plan};
use crate::drivers::{DriverError, SshTarget, StepOutcome};
use crate::runtime::{Action, Reconciler, Relations};
use crate::{Context, Error};

/// Reconciles Provisions.
#[derive(Debug)]
pub struct ProvisionReconciler {
    ctx: Arc<Context>,
}

impl ProvisionReconciler {
    /// Runs step `i`. A step that could not connect (nothing of it ran:
    /// [`DriverError::Unreachable`], e.g. cloud-init restarting sshd just
    /// after it first answered) is not a failed step: the guest is waited
    /// for as at the start of the run, and the step run again once SSH
    /// answers, for up to `timeout` (the VM's SSH timeout) from the step's
    /// start. Each such wait is a `WaitingForSsh` note.
    async fn run_step(
        &self,
        r: &ObjectRef,
        target: &SshTarget,
        i: usize,
        step: &ProvisionStep,
        timeout: Duration,
    ) -> Result<StepOutcome, DriverError> {
        let ctx = &self.ctx;
        let deadline = tokio::time::Instant::now() + timeout;
        let (index, vm) = (i as u32, target.vm.clone());
        let output = move |line: &str| tracing::debug!(vm = %vm, step = index, "{line}");
        loop {
            let why = match ctx
                .drivers
                .provisioner
                .run_step(target, index, step, &output)
                .await
            {
                Err(DriverError::Unreachable(why)) => why,
                result => return result,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(DriverError::Unreachable(why));
            }
            let msg = format!(
                "step {i} could not connect ({why}); waiting up to {}s for SSH to answer again",
                left.as_secs()
            );
            ctx.note(r, NoteType::Normal, Self::NAME, "WaitingForSsh", msg)
                .await;
            ctx.drivers.provisioner.wait_ssh(target, left).await?;
        }
    }

    /// A Provision reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        ProvisionReconciler { ctx }
    }
}

/// The VM's SSH target if it runs and has an address. Not its `Ready`
/// condition: that waits for the VM's readiness probes, which may check
/// what the provisioning installs; SSH is waited for by the run itself.
/// A guest on a `tap` network has no address until the VM controller
/// found it: the Provision waits (its VM's status change wakes it) rather
/// than fail.
fn ready_vm(obj: Option<&Object>) -> Option<SshTarget> {
    let vm = VirtualMachine::from_object(obj?).ok()?;
    let status = vm.status?;
    let ready = status.phase == vmctl_api::VmPhase::Running;
    Some(SshTarget {
        vm: vm.metadata.name,
        runtime: status.runtime.filter(|r| ready && r.ssh_host.is_some())?,
        ssh: vm.spec.ssh,
    })
}

impl Reconciler for ProvisionReconciler {
    type Error = Error;
    const KIND: Kind = Kind::Provision;
    const NAME: &'static str = "provision-controller";

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, Error> {
        let ctx = &self.ctx;
        let p = Provision::from_object(&obj).map_err(Error::decode(Kind::Provision))?;
        let vm_ref = ObjectRef::new(Kind::VirtualMachine, p.spec.vm.clone());
        let deleting = p.metadata.deletion_timestamp.is_some();
        let mut o = Observed {
            generation: p.metadata.generation,
            deleting,
            steps: p.spec.steps.len(),
            status: p.status.clone().unwrap_or_default(),
            vm: None,
            now: Utc::now(),
        };
        let vm = ctx.get(&vm_ref).await?;
        // In a cluster, the agent of the VM's node runs its Provisions
        // (any agent reports one whose VM does not exist).
        if vm
            .as_ref()
            .is_some_and(|v| !ctx.acts_on(crate::context::vm_node(v)))
        {
            return Ok(Action::await_change());
        }
        if !deleting {
            o.vm = ready_vm(vm.as_ref());
        }
        match plan(&o) {
            Step::Forget | Step::Keep => {}
            Step::WaitForVm => {
                o.waiting_for_vm();
                ctx.write_status(&obj, &o.status).await?;
                // The VM's status change wakes this Provision.
            }
            Step::Run => self.run(&obj, &p, o).await?,
        }
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

impl ProvisionReconciler {
    /// [`Step::Run`]: waits for SSH, runs every step in order (skipping
    /// those after a failure), writes the status as it goes and a note at
    /// the end. SSH that does not answer is an error, so that the runtime
    /// retries with backoff.
    async fn run(&self, obj: &Object, p: &Provision, mut o: Observed) -> Result<(), Error> {
        let ctx = &self.ctx;
        let r = obj.object_ref();
        let target = o.vm.clone().expect("Run is planned only for a Ready VM");
        o.running();
        let mut obj = ctx.write_status(obj, &o.status).await?;

        let timeout = target
            .ssh
            .as_ref()
            .and_then(|s| s.timeout_seconds)
            .map(|s| Duration::from_secs(s.into()))
            .unwrap_or(ctx.config.ssh_timeout);
        let waited = ctx.drivers.provisioner.wait_ssh(&target, timeout).await;
        o.now = Utc::now();
        if let Err(source) = waited {
            o.ssh_failed(&target.vm, &source);
            ctx.write_status(&obj, &o.status).await?;
            let msg = format!("VM {} does not answer SSH: {source}", target.vm);
            ctx.note(&r, NoteType::Warning, Self::NAME, "SshTimeout", msg)
                .await;
            let vm_ref = ObjectRef::new(Kind::VirtualMachine, target.vm.clone());
            return Err(Error::driver("connect over SSH to", &vm_ref)(source));
        }
        o.ssh_ready();

        let mut failed = None;
        for (i, step) in p.spec.steps.iter().enumerate() {
            if failed.is_some() {
                o.step_skipped(i);
                continue;
            }
            o.now = Utc::now();
            o.step_started(i);
            obj = ctx.write_status(&obj, &o.status).await?;
            let result = self.run_step(&r, &target, i, step, timeout).await;
            o.now = Utc::now();
            failed = o.step_ended(i, &result);
        }

        let (ok, reason, msg) = o.finished(&target, failed.as_deref());
        ctx.write_status(&obj, &o.status).await?;
        let type_ = if ok {
            NoteType::Normal
        } else {
            NoteType::Warning
        };
        ctx.note(&r, type_, Self::NAME, reason, msg).await;
        Ok(())
    }
}
