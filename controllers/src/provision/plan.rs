//! The Provision controller's decisions: [`plan`] maps what was observed
//! of a Provision and its VM ([`Observed`]) to the next [`Step`], without
//! I/O, and the methods of [`Observed`] say how a run changes the status.
//!
//! ```text
//!   deleted? ──▶ Forget
//!   finished for this generation and the VM's instance id ──▶ Keep
//!   VM not Running ── finished for this generation ──▶ Keep
//!                └── else ──▶ WaitForVm (report Pending)
//!   otherwise ──▶ Run (wait for SSH, then every step in order)
//! ```

use chrono::{DateTime, Utc};
use vmctl_api::{Condition, ProvisionPhase, ProvisionStatus, StepPhase, StepStatus, set_condition};

use crate::conditions::condition;
use crate::drivers::{DriverError, SshTarget, StepOutcome};

/// What the Provision controller knows of one Provision at one moment:
/// the input of [`plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// `metadata.generation`.
    pub generation: u64,
    /// Deletion was requested (`metadata.deletionTimestamp` is set).
    pub deleting: bool,
    /// How many steps the spec has.
    pub steps: usize,
    /// The status as stored, with what this reconcile changed.
    pub status: ProvisionStatus,
    /// The VM's SSH target if the VM is Running; `None` otherwise.
    pub vm: Option<SshTarget>,
    /// When the status changes being made happen (conditions' and steps'
    /// times); the reconciler moves it on as the run goes.
    pub now: DateTime<Utc>,
}

/// The next thing to do for a Provision: the output of [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Being deleted: a Provision owns nothing to tear down.
    Forget,
    /// A finished run stands: it ran for this generation on the VM's
    /// current instance, or the VM is not Ready (a result is kept while it
    /// is down).
    Keep,
    /// The VM is not Ready and nothing ran for this generation: report
    /// `Pending` until the VM's change wakes the Provision.
    WaitForVm,
    /// Run: wait for SSH, then every step in order, skipping those after a
    /// failure.
    Run,
}

/// Whether `status` says the Provision finished (Succeeded or Failed) for
/// `generation`.
pub fn is_finished(status: &ProvisionStatus, generation: u64) -> bool {
    matches!(
        status.phase,
        ProvisionPhase::Succeeded | ProvisionPhase::Failed
    ) && status.observed_generation == generation
}

/// The next step for the Provision observed as `o`. Pure.
///
/// A finished run is recorded with `observedGeneration` and `vmInstanceId`:
/// the steps run again only for a new generation or a new VM instance (a
/// recreated VM). A run interrupted by a crash is not finished, so it runs
/// again from the start.
pub fn plan(o: &Observed) -> Step {
    if o.deleting {
        return Step::Forget;
    }
    let finished = is_finished(&o.status, o.generation);
    match &o.vm {
        None if finished => Step::Keep,
        None => Step::WaitForVm,
        Some(vm) if finished && o.status.vm_instance_id == vm.runtime.instance_id => Step::Keep,
        Some(_) => Step::Run,
    }
}

/// How a run changes the status. The reconciler calls these as the run
/// goes; tests call them to model it.
impl Observed {
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let cond: Condition = condition(type_, ok, reason, message, self.generation);
        set_condition(&mut self.status.conditions, cond, self.now);
    }

    /// [`Step::WaitForVm`].
    pub fn waiting_for_vm(&mut self) {
        self.status.phase = ProvisionPhase::Pending;
        self.set("Ready", false, "WaitingForVm", "");
    }

    /// [`Step::Run`] begins: every step Pending.
    pub fn running(&mut self) {
        self.status.phase = ProvisionPhase::Running;
        self.status.steps = (0..self.steps as u32)
            .map(|index| StepStatus {
                index,
                ..Default::default()
            })
            .collect();
        self.set("Ready", false, "Running", "");
    }

    /// The VM `vm` did not answer SSH: Failed for this generation, with
    /// the reason, and no instance recorded as done, so that the runtime's
    /// backoff tries again in case the guest comes up later.
    pub fn ssh_failed(&mut self, vm: &str, err: &DriverError) {
        self.status.phase = ProvisionPhase::Failed;
        self.status.observed_generation = self.generation;
        self.status.vm_instance_id = None;
        self.set("SshReady", false, "SshTimeout", err.to_string());
        let msg = format!("VM {vm} does not answer SSH: {err}");
        self.set("Ready", false, "SshTimeout", msg);
    }

    /// The VM answered SSH.
    pub fn ssh_ready(&mut self) {
        self.set("SshReady", true, "Connected", "");
    }

    /// Step `i` starts.
    pub fn step_started(&mut self, i: usize) {
        let st = &mut self.status.steps[i];
        st.phase = StepPhase::Running;
        st.started_at = Some(self.now);
    }

    /// Step `i` is skipped after an earlier failure.
    pub fn step_skipped(&mut self, i: usize) {
        self.status.steps[i].phase = StepPhase::Skipped;
    }

    /// Step `i` ended with `result`; the run's failure, if it failed.
    pub fn step_ended(
        &mut self,
        i: usize,
        result: &Result<StepOutcome, DriverError>,
    ) -> Option<String> {
        let st = &mut self.status.steps[i];
        st.finished_at = Some(self.now);
        match result {
            Ok(out) if out.exit_code == 0 => {
                st.phase = StepPhase::Succeeded;
                st.exit_code = Some(0);
                None
            }
            Ok(out) => {
                st.phase = StepPhase::Failed;
                st.exit_code = Some(out.exit_code);
                st.message = Some(format!("exited with code {}", out.exit_code));
                Some(format!("step {i} exited with code {}", out.exit_code))
            }
            Err(e) => {
                st.phase = StepPhase::Failed;
                st.message = Some(e.to_string());
                Some(format!("step {i} could not run: {e}"))
            }
        }
    }

    /// The run on `vm` ended, `failed` or not: finished for this
    /// generation and the VM's instance. Returns the note's reason and
    /// message (`ProvisionSucceeded` or `ProvisionFailed`).
    pub fn finished(
        &mut self,
        vm: &SshTarget,
        failed: Option<&str>,
    ) -> (bool, &'static str, String) {
        self.status.observed_generation = self.generation;
        self.status.vm_instance_id = vm.runtime.instance_id.clone();
        match failed {
            None => {
                self.status.phase = ProvisionPhase::Succeeded;
                self.set("Ready", true, "Succeeded", "");
                let msg = format!(
                    "Provisioned VM {} ({})",
                    vm.vm,
                    vmctl_api::limits::count(self.steps as u64, "step", "steps")
                );
                (true, "ProvisionSucceeded", msg)
            }
            Some(why) => {
                self.status.phase = ProvisionPhase::Failed;
                self.set("Ready", false, "StepFailed", why);
                let msg = format!("Provisioning VM {} failed: {why}", vm.vm);
                (false, "ProvisionFailed", msg)
            }
        }
    }
}

#[cfg(test)]
mod tests;
