//! The VirtualMachine controller's decisions: [`plan`] maps what was
//! observed of a VM ([`Observed`]) to the next [`Step`], without I/O, and
//! the methods of [`Observed`] say how each step changes the status. The
//! reconciler ([`super::VmReconciler`]) only observes, performs the step
//! the plan names, and plans again.
//!
//! ```text
//!   deleted? ── finalizer ──▶ Teardown            (else Forget)
//!   ImageReady condition stale ──▶ SetCondition
//!   no instance, wants to run, image not Ready ──▶ WaitForImage
//!   no finalizer ──▶ AddFinalizer
//!   instance from another image ── Recreate policy ──▶ Recreate
//!                               └── else ──▶ SetCondition RecreateRequired
//!   wants to run, instance down ── was Running ──▶ Crashed
//!                               ├── retryAfter ahead ──▶ BackOff
//!                               └── else ──▶ Start
//!   power state differs ──▶ Suspend / Resume / Stop
//!   a disk asked smaller ──▶ SetCondition DiskShrinkRefused (the VM runs on)
//!   a disk asked larger ── up, backend resizes live ──▶ ResizeDisk
//!                       └── else ──▶ SetCondition DiskResizePending
//!   running an older spec (or a disk growth waits for a restart)
//!                         ── Restart/Recreate policy ──▶ Restart
//!                         └── else ──▶ SetCondition RestartRequired
//!   otherwise ──▶ Report (writes the status only if it changed)
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};
use vmctl_api::{
    Condition, PowerState, UpdatePolicy, VirtualMachineSpec, VirtualMachineStatus, VmPhase,
    set_condition,
};

use crate::conditions::{condition, would_change};
use crate::drivers::{InstanceState, InstanceStatus, LocalImage};
use crate::probe::{Check, Readiness};

pub mod disks;

/// Why a VM's image cannot be booted: the reason and message of the VM's
/// `ImageReady` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNotReady {
    /// CamelCase: `ImageNotFound`, `ImageInvalid`, `ImageNotReady`.
    pub reason: &'static str,
    /// What is wrong.
    pub message: String,
}

/// What the VM controller knows of one VM at one moment: the input of
/// [`plan`]. The reconciler folds the effect of every step it performs
/// into it before planning again.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The VM's name (`metadata.name`), for messages.
    pub name: String,
    /// `metadata.generation`.
    pub generation: u64,
    /// Deletion was requested (`metadata.deletionTimestamp` is set).
    pub deleting: bool,
    /// The object carries [`super::FINALIZER`].
    pub finalizer: bool,
    /// The desired state.
    pub spec: VirtualMachineSpec,
    /// The status as stored, with what this reconcile's steps changed.
    pub status: VirtualMachineStatus,
    /// The Image the VM boots from, if it is Ready. Not looked at for a
    /// VM being deleted.
    pub image: Result<LocalImage, ImageNotReady>,
    /// The hypervisor's instance, `None` if there is none. Not looked at
    /// for a VM being deleted.
    pub instance: Option<InstanceStatus>,
    /// When it was observed (compared with `status.startFailures.retryAfter`).
    pub now: DateTime<Utc>,
    /// The hypervisor grows a running instance's disks live
    /// ([`crate::drivers::Hypervisor::resize_disk`]).
    pub live_disk_resize: bool,
    /// What the prober found of the running guest (SSH); `None` when
    /// nothing probes it (not running, or no SSH address). Read when the
    /// VM is reported ([`Step::Report`]).
    pub readiness: Option<Readiness>,
}

/// The next thing to do for a VM: the output of [`plan`]. Steps that end
/// a reconcile ([`Step::ends_reconcile`]) write the status and say when to
/// look again; the others change the world or the status in memory and
/// are followed by another plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Deleted and torn down (no finalizer left): nothing to do.
    Forget,
    /// Deleted: report `Terminating`, destroy the instance and everything
    /// it owns, remove the finalizer.
    Teardown,
    /// A condition no longer says what was observed: set it; a `warning`
    /// also goes out as a Warning note whose reason is the condition's type.
    SetCondition {
        /// The condition as it should be.
        condition: Condition,
        /// The note's message, for a condition that asks the user to act.
        warning: Option<String>,
    },
    /// No instance, the VM should run, and its image is not Ready: report
    /// `Pending` until the Image's change wakes the VM.
    WaitForImage,
    /// Add the finalizer before anything exists that would need it.
    AddFinalizer,
    /// The disk was made from `disk_image`, the spec names another image,
    /// and the policy is `Recreate`: destroy the instance; the next
    /// reconcile makes a new one.
    Recreate {
        /// The image the current disk was made from.
        disk_image: String,
    },
    /// Last seen running, now gone, and nobody asked for it: the
    /// hypervisor process died. Counted as a failed start.
    Crashed,
    /// Earlier starts failed and `status.startFailures.retryAfter` is
    /// still ahead: report `CrashLoopBackOff` until `until`.
    BackOff {
        /// When the next start may be tried.
        until: DateTime<Utc>,
    },
    /// Boot the instance; with `prepare`, first create it or bring its
    /// configuration (vcpus, memory, disk size) to the spec, which needs
    /// the image Ready.
    Start {
        /// Prepare before starting.
        prepare: bool,
    },
    /// Pause the running instance.
    Suspend,
    /// Continue the paused instance.
    Resume,
    /// Shut the instance down.
    Stop,
    /// Grow a disk of the running (or paused) instance live; the guest
    /// sees the new size at once.
    ResizeDisk {
        /// The disk's name.
        disk: String,
        /// Its size now, in bytes.
        from: u64,
        /// The size the spec asks for, in bytes.
        to: u64,
    },
    /// Stop the instance to apply fields only a restart applies (policy
    /// `Restart` or `Recreate`); the next reconcile starts it again.
    Restart,
    /// Nothing left to change: report `phase` (the status is written only
    /// if it changed). A running or suspended VM is looked at again after
    /// the liveness period, since its process may die without any event.
    Report {
        /// `Running`, `Suspended` or `Stopped`.
        phase: VmPhase,
    },
}

impl Step {
    /// Whether the reconcile returns after this step (rather than planning
    /// again). [`Step::Start`] ends it only when the start fails.
    pub fn ends_reconcile(&self) -> bool {
        !matches!(
            self,
            Step::SetCondition { .. }
                | Step::AddFinalizer
                | Step::Start { .. }
                | Step::Suspend
                | Step::Resume
                | Step::Stop
                | Step::ResizeDisk { .. }
        )
    }
}

/// The next step for the VM observed as `o`. Pure: the same observation
/// gives the same step.
pub fn plan(o: &Observed) -> Step {
    if o.deleting {
        return if o.finalizer {
            Step::Teardown
        } else {
            Step::Forget
        };
    }
    let (spec, status, generation) = (&o.spec, &o.status, o.generation);
    let state = o.instance.as_ref().map(|i| i.state);
    let want = spec.power_state;
    let set = |condition: Condition, warning: Option<String>| {
        would_change(&status.conditions, &condition)
            .then_some(Step::SetCondition { condition, warning })
    };

    let image = match &o.image {
        Ok(_) => condition("ImageReady", true, "ImageReady", "", generation),
        Err(e) => condition("ImageReady", false, e.reason, e.message.clone(), generation),
    };
    if let Some(step) = set(image, None) {
        return step;
    }
    if state.is_none() && want != PowerState::Stopped && o.image.is_err() {
        return Step::WaitForImage;
    }
    if !o.finalizer {
        return Step::AddFinalizer;
    }

    // The disk was made from one image; a spec naming another one needs a
    // new disk. Only updatePolicy Recreate (or `vmctl reload`, or delete)
    // destroys a disk.
    if o.instance.is_some() {
        let disk_image = status.disk_image.as_deref().unwrap_or(&spec.image);
        let differs = disk_image != spec.image;
        if differs && spec.update_policy == UpdatePolicy::Recreate {
            return Step::Recreate {
                disk_image: disk_image.to_owned(),
            };
        }
        let step = if differs {
            let name = &o.name;
            let message = format!(
                "the disk was made from image {disk_image}; booting {} needs a new disk: run `vmctl reload {name}` or set update-policy \"recreate\" (both destroy the disk)",
                spec.image
            );
            let warning = format!(
                "VM {name} keeps its disk made from image {disk_image}; the new image applies only when the VM is recreated"
            );
            let cond = condition(
                "RecreateRequired",
                true,
                "ImageChanged",
                message,
                generation,
            );
            set(cond, Some(warning))
        } else {
            let cond = condition("RecreateRequired", false, "UpToDate", "", generation);
            set(cond, None)
        };
        if let Some(step) = step {
            return step;
        }
    }

    let down = matches!(state, None | Some(InstanceState::Stopped));
    if want != PowerState::Stopped && down {
        if status.phase == VmPhase::Running {
            return Step::Crashed;
        }
        if let Some(until) = status.start_failures.retry_after
            && until > o.now
        {
            return Step::BackOff { until };
        }
        return Step::Start {
            prepare: o.image.is_ok(),
        };
    }
    match (want, state) {
        (PowerState::Suspended, Some(InstanceState::Running)) => return Step::Suspend,
        (PowerState::Running, Some(InstanceState::Suspended)) => return Step::Resume,
        (PowerState::Stopped, Some(InstanceState::Running | InstanceState::Suspended)) => {
            return Step::Stop;
        }
        _ => {}
    }

    let up = matches!(
        state,
        Some(InstanceState::Running | InstanceState::Suspended)
    );

    // Disk sizes: a shrink is refused (the disk keeps its size and the VM
    // runs on), a growth is applied live when the backend can, else at
    // the next start.
    let (grow, shrink) = disks::size_changes(o);
    let had = |type_: &str| status.conditions.iter().any(|c| c.type_ == type_);
    let step = if let Some(first) = shrink.first() {
        let list: Vec<String> = shrink.iter().map(disks::SizeChange::describe).collect();
        let message = format!(
            "disks cannot shrink ({}); the disk keeps its size: set the size to at least {} again, or delete and recreate the VM for a smaller disk (that destroys it)",
            list.join(", "),
            disks::human_gib(first.from)
        );
        let warning = format!(
            "VM {} keeps disk {} at {}: the spec asks {} and disks cannot shrink",
            o.name,
            first.disk,
            disks::human_gib(first.from),
            disks::human_gib(first.to)
        );
        let cond = condition(
            disks::SHRINK_REFUSED,
            true,
            "SizeBelowCurrent",
            message,
            generation,
        );
        set(cond, Some(warning))
    } else if had(disks::SHRINK_REFUSED) {
        let cond = condition(disks::SHRINK_REFUSED, false, "UpToDate", "", generation);
        set(cond, None)
    } else {
        None
    };
    if let Some(step) = step {
        return step;
    }
    let live_failed = disks::live_resize_failed(o);
    if up
        && o.live_disk_resize
        && !live_failed
        && let Some(g) = grow.first()
    {
        return Step::ResizeDisk {
            disk: g.disk.clone(),
            from: g.from,
            to: g.to,
        };
    }
    let step = if live_failed && !grow.is_empty() {
        // Keeps the failure's message; the growth applies at the next start.
        None
    } else if !grow.is_empty() {
        let list: Vec<String> = grow.iter().map(disks::SizeChange::describe).collect();
        let message = format!("grows at the next start: {}", list.join(", "));
        let cond = condition(
            disks::RESIZE_PENDING,
            true,
            "AppliesAtStart",
            message,
            generation,
        );
        set(cond, None)
    } else if had(disks::RESIZE_PENDING) {
        let cond = condition(disks::RESIZE_PENDING, false, "UpToDate", "", generation);
        set(cond, None)
    } else {
        None
    };
    if let Some(step) = step {
        return step;
    }

    if up {
        // An instance started before `startedSpec` existed counts as
        // started with the spec it has now.
        let spec_differs = status
            .started_spec
            .as_ref()
            .is_some_and(|s| *s != restart_digest(spec));
        let (attach, detach) = disks::attachment_changes(o);
        let differs = spec_differs || !grow.is_empty() || !attach.is_empty() || !detach.is_empty();
        if differs && spec.update_policy != UpdatePolicy::RestartRequired {
            return Step::Restart;
        }
        let step = if differs {
            let mut what = Vec::new();
            if spec_differs {
                what.push("vcpus, memory, network or cloud-init changed".to_owned());
            }
            if !grow.is_empty() {
                what.push("a disk grows only at the next start".to_owned());
            }
            if !attach.is_empty() {
                what.push(format!(
                    "disk {} is attached at the next start",
                    attach.join(", ")
                ));
            }
            if !detach.is_empty() {
                what.push(format!(
                    "disk {} is detached at the next start (its file is kept until the VM is deleted)",
                    detach.join(", ")
                ));
            }
            let message = format!(
                "{}; stop and start the VM (or set update-policy \"restart\") to apply",
                what.join("; ")
            );
            let warning = format!(
                "VM {} runs with an older spec; the change applies at the next start",
                o.name
            );
            let cond = condition("RestartRequired", true, "SpecChanged", message, generation);
            set(cond, Some(warning))
        } else {
            let cond = condition("RestartRequired", false, "UpToDate", "", generation);
            set(cond, None)
        };
        if let Some(step) = step {
            return step;
        }
    }
    Step::Report {
        phase: match state {
            Some(InstanceState::Running) => VmPhase::Running,
            Some(InstanceState::Suspended) => VmPhase::Suspended,
            Some(InstanceState::Stopped) | None => VmPhase::Stopped,
        },
    }
}

/// How each step changes the status (and the observation). The reconciler
/// calls these after the step's driver call succeeded; tests call them to
/// model the driver.
impl Observed {
    /// Sets `cond`; whether anything changed.
    pub fn set_condition(&mut self, cond: Condition) -> bool {
        set_condition(&mut self.status.conditions, cond, self.now)
    }

    fn phase(&mut self, phase: VmPhase, ready: bool, reason: &str, message: &str) {
        self.status.phase = phase;
        let cond = condition("Ready", ready, reason, message, self.generation);
        self.set_condition(cond);
        // A guest that is not running answers no SSH: an `SshReady` left
        // True from its last boot would let `vmctl ssh` hang in a connect.
        if phase != VmPhase::Running
            && let Some(c) = self
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "SshReady")
            && c.status == vmctl_api::ConditionStatus::True
        {
            let cond = condition(
                "SshReady",
                false,
                reason,
                "the VM is not running",
                self.generation,
            );
            self.set_condition(cond);
        }
    }

    /// Sets condition `type_` from a probe's `check`; its
    /// lastTransitionTime is when the probe first passed, not when the
    /// status was written.
    fn set_check(&mut self, type_: &str, check: &Check) {
        let cond = condition(
            type_,
            check.ok,
            check.reason,
            check.message.clone(),
            self.generation,
        );
        let was_true = crate::conditions::is_true(&self.status.conditions, type_);
        self.set_condition(cond);
        if check.ok
            && !was_true
            && let Some(c) = self.status.conditions.iter_mut().find(|c| c.type_ == type_)
        {
            c.last_transition_time = check.since.or(c.last_transition_time);
        }
    }

    /// [`Step::Teardown`], before the instance is destroyed.
    pub fn terminating(&mut self) {
        let cond = condition(
            "Ready",
            false,
            "Terminating",
            "being deleted",
            self.generation,
        );
        self.status.phase = VmPhase::Terminating;
        self.set_condition(cond);
    }

    /// [`Step::WaitForImage`].
    pub fn waiting_for_image(&mut self) {
        self.status.observed_generation = self.generation;
        self.phase(VmPhase::Pending, false, "WaitingForImage", "");
    }

    /// [`Step::Recreate`], after the instance was destroyed.
    pub fn recreating(&mut self) {
        self.instance = None;
        self.status.disk_image = None;
        self.status.started_spec = None;
        self.status.runtime = None;
        self.status.observed_generation = self.generation;
        self.phase(VmPhase::Pending, false, "Recreating", "");
        let cond = condition("RecreateRequired", false, "Recreating", "", self.generation);
        self.set_condition(cond);
    }

    /// [`Step::BackOff`].
    pub fn backing_off(&mut self) {
        self.status.phase = VmPhase::CrashLoopBackOff;
        self.status.observed_generation = self.generation;
    }

    /// [`Step::Start`] with `prepare`, after the instance was prepared.
    pub fn prepared(&mut self, instance: InstanceStatus) {
        if self.instance.is_none() {
            self.status.disk_image = Some(self.spec.image.clone());
        }
        self.instance = Some(instance);
    }

    /// [`Step::Start`], after the instance started.
    pub fn started(&mut self, instance: InstanceStatus) {
        // A new boot: SSH has to answer again before the VM is Ready.
        if self.status.conditions.iter().any(|c| c.type_ == "SshReady") {
            let cond = condition(
                "SshReady",
                false,
                "Starting",
                "the VM is booting",
                self.generation,
            );
            self.set_condition(cond);
        }
        self.status.start_failures = Default::default();
        self.status.started_spec = Some(restart_digest(&self.spec));
        self.instance = Some(instance);
    }

    /// A failed start, or [`Step::Crashed`]: one more failure, the next
    /// start not before `now + delay`.
    pub fn start_failed(&mut self, delay: Duration, message: String) {
        self.failed_to_start(delay, "StartFailed", &message);
    }

    /// [`Step::Start`] whose prepare failed (the disk, seed or
    /// configuration could not be made): counted and backed off like a
    /// failed start, with reason `PrepareFailed`.
    pub fn prepare_failed(&mut self, delay: Duration, message: String) {
        self.failed_to_start(delay, "PrepareFailed", &message);
    }

    fn failed_to_start(&mut self, delay: Duration, reason: &str, message: &str) {
        let failures = &mut self.status.start_failures;
        failures.count = failures.count.saturating_add(1);
        failures.last_failure_time = Some(self.now);
        failures.retry_after =
            Some(self.now + chrono::Duration::from_std(delay).unwrap_or_default());
        self.status.observed_generation = self.generation;
        if let Some(inst) = &self.instance {
            self.status.runtime = Some(inst.runtime.clone());
        }
        self.phase(VmPhase::CrashLoopBackOff, false, reason, message);
    }

    /// [`Step::Suspend`], [`Step::Resume`] or [`Step::Stop`] done: the
    /// instance is now in `state`.
    pub fn now_in(&mut self, state: InstanceState) {
        if let Some(inst) = &mut self.instance {
            inst.state = state;
        }
    }

    /// [`Step::ResizeDisk`], after the disk of the instance grew to `to` bytes.
    pub fn disk_resized(&mut self, disk: &str, to: u64) {
        if let Some(inst) = &mut self.instance
            && let Some(d) = inst.runtime.disks.iter_mut().find(|d| d.name == disk)
        {
            d.size_bytes = to;
        }
    }

    /// [`Step::ResizeDisk`] failed with `message`: the growth waits for
    /// the next start (no live retry for this generation).
    pub fn disk_resize_failed(&mut self, disk: &str, message: &str) {
        let cond = condition(
            disks::RESIZE_PENDING,
            true,
            disks::LIVE_RESIZE_FAILED,
            format!("disk {disk} could not grow live ({message}); it grows at the next start"),
            self.generation,
        );
        self.set_condition(cond);
    }

    /// [`Step::Restart`], after the instance was stopped.
    pub fn restarting(&mut self) {
        self.now_in(InstanceState::Stopped);
        self.status.observed_generation = self.generation;
        self.phase(VmPhase::Stopped, false, "Restarting", "");
    }

    /// [`Step::Report`].
    pub fn report(&mut self, phase: VmPhase) {
        if matches!(phase, VmPhase::Running | VmPhase::Suspended) {
            let digest = restart_digest(&self.spec);
            self.status.started_spec.get_or_insert(digest);
        }
        if let Some(inst) = &self.instance {
            self.status.runtime = Some(inst.runtime.clone());
        }
        self.status.observed_generation = self.generation;
        let readiness = self.readiness.clone().filter(|_| phase == VmPhase::Running);
        let (ready, reason, message) = match (phase, &readiness) {
            (VmPhase::Running, None) => (true, "Running", String::new()),
            // Running, and Ready once the guest answers: `apply --wait`
            // and `up` return when `vmctl ssh` works.
            (VmPhase::Running, Some(r)) if r.ssh.ok => (true, "Running", String::new()),
            (VmPhase::Running, Some(r)) => (false, "SshNotReady", r.ssh.message.clone()),
            (VmPhase::Suspended, _) => (false, "Suspended", String::new()),
            _ => (false, "Stopped", String::new()),
        };
        if let Some(r) = &readiness {
            self.set_check("SshReady", &r.ssh);
        }
        self.phase(phase, ready, reason, &message);
    }
}

/// Digest of the spec fields that only a restart can apply (vcpus,
/// memory, network, cloud-init): 16 hex digits of their SHA-256.
pub fn restart_digest(spec: &VirtualMachineSpec) -> String {
    use sha2::Digest;
    let v = serde_json::json!({
        "vcpus": spec.vcpus,
        "memoryMib": spec.memory_mib,
        "network": spec.network,
        "cloudInit": spec.cloud_init,
    });
    hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..8])
}

#[cfg(test)]
mod tests;
