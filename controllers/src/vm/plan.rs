//! The VirtualMachine controller's decisions: [`plan`] maps what was
//! observed of a VM ([`Observed`]) to the next [`Step`], without I/O, and
//! the methods of [`Observed`] say how each step changes the status. The
//! reconciler ([`super::VmReconciler`]) only observes, performs the step
//! the plan names, and plans again.
//!
//! ```text
//!   instance not here, status says it lives under another agent
//!     (other node or work dir) ──▶ NodeLost        (even when deleted)
//!   deleted? ── finalizer ── Snapshots of it left ──▶ DeleteSnapshots
//!                         └── else ──▶ Teardown  (else Forget)
//!   ImageReady condition stale ──▶ SetCondition
//!   no instance, wants to run, image not Ready ──▶ WaitForImage
//!   no finalizer ──▶ AddFinalizer
//!   instance from another image ── Recreate policy ──▶ Recreate
//!                               └── else ──▶ SetCondition RecreateRequired
//!   wants to run, instance down ── was Running ──▶ Crashed
//!                               ├── retryAfter ahead ──▶ BackOff
//!                               └── else ──▶ Start
//!   power state differs ──▶ Suspend / Resume / Stop
//!   up, port forwards differ from the spec ──▶ ForwardPorts (live; ports.rs)
//!   running, an extra disk removed / added, backend hot-plugs (and no
//!   hot-plug failed for this generation) ──▶ DetachDisk / AttachDisk
//!                                            (paused: waits for the resume)
//!   a disk asked smaller ──▶ SetCondition DiskShrinkRefused (the VM runs on)
//!   a disk asked larger ── up, backend resizes live ──▶ ResizeDisk
//!                       └── else ──▶ SetCondition DiskResizePending
//!   running an older spec (or a disk growth, attach or detach waits
//!   for a restart)
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

use crate::address::Discovery;
use crate::conditions::{condition, would_change};
use crate::drivers::{InstanceState, InstanceStatus, LocalImage};
use crate::probe::{Check, Readiness};

pub mod disks;
pub mod ports;

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
    /// The hypervisor attaches and detaches extra disks of a running
    /// instance live ([`crate::drivers::Hypervisor::attach_disk`]).
    pub live_disk_hotplug: bool,
    /// Names of the Snapshot objects of this VM; looked at only for a VM
    /// being deleted (they go first).
    pub snapshots: Vec<String>,
    /// What the prober found of the running guest (SSH); `None` when
    /// nothing probes it (not running, or no SSH address). Read when the
    /// VM is reported ([`Step::Report`]).
    pub readiness: Option<Readiness>,
    /// Where this agent keeps the VM's instance.
    pub here: Here,
    /// How the search for the guest's address on a `tap` network stands;
    /// `None` when no address is searched for (other networks, not
    /// running, or the hypervisor gave the address). Read when the VM is
    /// reported: it becomes the `AddressReady` condition.
    pub address: Option<Discovery>,
}

/// Where this agent keeps a VM's instance: its node and the work dir its
/// hypervisor driver uses for the VM. An instance the status places
/// anywhere else belongs to another agent ([`Observed::elsewhere`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Here {
    /// This agent's node and data directory.
    pub node: crate::NodeIdentity,
    /// The VM's work dir under this agent
    /// ([`crate::drivers::Hypervisor::work_dir`]); `None` when the driver
    /// cannot say (only node names are compared then).
    pub work_dir: Option<String>,
}

/// Where a VM's instance lives when that is under another agent, as its
/// status records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elsewhere {
    /// `status.nodeName` (`None` in a status written before it existed).
    pub node: Option<String>,
    /// `status.runtime.workDir`.
    pub work_dir: Option<String>,
}

/// The reason of the `Ready` condition of a VM whose instance lives under
/// another agent (issue 17's term for a VM whose node is gone).
pub const NODE_LOST: &str = "NodeLost";

/// The next thing to do for a VM: the output of [`plan`]. Steps that end
/// a reconcile ([`Step::ends_reconcile`]) write the status and say when to
/// look again; the others change the world or the status in memory and
/// are followed by another plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The instance lives under another agent (another node, or another
    /// data directory: [`Observed::elsewhere`]), which this agent cannot
    /// reach: set `condition` (`Ready` False, reason [`NODE_LOST`]) and
    /// change nothing else. Nothing is started, restarted, recreated or
    /// destroyed, no crash is noted, and a deleted VM keeps its finalizer
    /// (it stays Terminating until the owning agent destroys the
    /// instance). A `warning` goes out as a Warning note `NodeLost`.
    NodeLost {
        /// The `Ready` condition as it should be.
        condition: Condition,
        /// The note's message when the condition changes.
        warning: Option<String>,
    },
    /// Deleted and torn down (no finalizer left): nothing to do.
    Forget,
    /// Deleted: report `Terminating`, destroy the instance and everything
    /// it owns, remove the finalizer.
    Teardown,
    /// Deleted while Snapshots of it exist: report `Terminating`, request
    /// their deletion (their controller removes their state from the
    /// disks), and look again until they are gone.
    DeleteSnapshots {
        /// The Snapshot objects' names.
        names: Vec<String>,
    },
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
    /// Attach an extra disk the spec lists to the running instance, live
    /// (hot-plug); the guest sees it with its name as serial.
    AttachDisk {
        /// The disk as the spec lists it.
        disk: vmctl_api::Disk,
    },
    /// Detach an extra disk the spec no longer lists from the running
    /// instance, live (hot-unplug); its file is kept until the VM is
    /// deleted.
    DetachDisk {
        /// The disk's name.
        disk: String,
    },
    /// Take away and put in place port forwards of the running (or
    /// paused) instance, live; each result goes into the status.
    ForwardPorts {
        /// Forwards in place that the spec no longer lists.
        remove: Vec<vmctl_api::PortForward>,
        /// Forwards the spec lists that are not in place.
        add: Vec<vmctl_api::PortForward>,
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
                | Step::AttachDisk { .. }
                | Step::DetachDisk { .. }
                | Step::ForwardPorts { .. }
        )
    }
}

/// The next step for the VM observed as `o`. Pure: the same observation
/// gives the same step.
pub fn plan(o: &Observed) -> Step {
    if let Some(away) = o.elsewhere()
        && (o.finalizer || !o.deleting)
    {
        return node_lost(o, &away);
    }
    if o.deleting {
        return match (o.finalizer, o.snapshots.is_empty()) {
            (false, _) => Step::Forget,
            (true, false) => Step::DeleteSnapshots {
                names: o.snapshots.clone(),
            },
            (true, true) => Step::Teardown,
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
    // Port forwards apply live, whatever else waits for a restart.
    if let Some((remove, add)) = ports::changes(o) {
        return Step::ForwardPorts { remove, add };
    }

    // Extra disks added to or removed from the spec: hot-plugged while
    // the guest runs, when the backend can and no hot-plug failed for
    // this generation; else at the next start. A paused guest cannot
    // release a disk: that waits for the resume.
    let (attach, detach) = disks::attachment_changes(o);
    let hotplug = o.live_disk_hotplug && !disks::hotplug_failed(o);
    if hotplug && state == Some(InstanceState::Running) {
        if let Some(disk) = detach.first() {
            return Step::DetachDisk { disk: disk.clone() };
        }
        if let Some(disk) = attach
            .first()
            .and_then(|a| spec.disks.iter().find(|d| d.name == *a))
        {
            return Step::AttachDisk { disk: disk.clone() };
        }
    }
    let waits_for_resume = hotplug && state == Some(InstanceState::Suspended);
    let (attach, detach) = if waits_for_resume {
        (Vec::new(), Vec::new())
    } else {
        (attach, detach)
    };

    // Disk sizes: a shrink is refused (the disk keeps its size and the VM
    // runs on), a growth is applied live when the backend can, else at
    // the next start.
    let (grow, shrink) = disks::size_changes(o);
    let had = |type_: &str| status.conditions.iter().any(|c| c.type_ == type_);
    let step = if !shrink.is_empty() {
        let (message, warning) = disks::shrink_refused(&o.name, &shrink);
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
        let plugs = !attach.is_empty() || !detach.is_empty();
        let differs = spec_differs || !grow.is_empty() || plugs;
        if differs && spec.update_policy != UpdatePolicy::RestartRequired {
            return Step::Restart;
        }
        let step = if plugs && disks::hotplug_failed(o) {
            // Keeps the failure's message; the disk is attached or
            // detached at the next start.
            None
        } else if differs {
            let mut what = Vec::new();
            if spec_differs {
                what.push(
                    "vcpus, memory, network, cloud-init, display or shared folders changed"
                        .to_owned(),
                );
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

/// [`Step::NodeLost`] for the VM `o` whose instance is `away`.
fn node_lost(o: &Observed, away: &Elsewhere) -> Step {
    let name = &o.name;
    let node = away.node.as_deref().unwrap_or("unknown");
    let at = match &away.work_dir {
        Some(w) => format!("node {node} (work dir {w})"),
        None => format!("node {node}"),
    };
    let owner = match &away.work_dir {
        Some(w) => format!("the agent of node {node} whose data dir holds {w}"),
        None => format!("the agent of node {node}"),
    };
    let me = &o.here.node;
    let this = match &me.data_dir {
        Some(d) => format!("this agent (node {}, data dir {})", me.name, d.display()),
        None => format!("this agent (node {})", me.name),
    };
    let (message, warning) = if o.deleting {
        let message = format!(
            "its instance on {at} was not destroyed: {this} cannot reach it; the VM stays \
             Terminating until {owner} runs again and destroys it. If that node is gone for \
             good, stop the VM's hypervisor process there and remove its work dir yourself, then \
             run `vmctl patch vm {name} --remove-finalizer {} --force`",
            super::FINALIZER
        );
        let warning = format!(
            "VM {name} is deleted, but its instance on {at} was not destroyed: {this} cannot reach it"
        );
        (message, warning)
    } else {
        let message = format!(
            "its instance is on {at}, last reported {:?}; {this} does not manage it and starts no \
             second copy: run {owner} again, or, if that node is gone for good, delete the VM \
             (its disk there is not removed) and apply it again to start it here from a new disk",
            o.status.phase
        );
        let warning = format!(
            "VM {name} runs under another agent, on {at}; {this} leaves it alone (no second copy is started)"
        );
        (message, warning)
    };
    let condition = condition("Ready", false, NODE_LOST, message, o.generation);
    Step::NodeLost {
        warning: would_change(&o.status.conditions, &condition).then_some(warning),
        condition,
    }
}

/// How each step changes the status (and the observation). The reconciler
/// calls these after the step's driver call succeeded; tests call them to
/// model the driver.
impl Observed {
    /// Where the VM's instance lives when that is under another agent:
    /// this agent's driver has no instance of the VM, and the status
    /// records one on another node (`status.nodeName`) or in another work
    /// dir (`status.runtime.workDir`, so another data directory of this
    /// host). `None` when the instance is here, or when none was ever
    /// made (those are started by whichever agent runs the controllers).
    pub fn elsewhere(&self) -> Option<Elsewhere> {
        if self.instance.is_some() {
            return None;
        }
        let node = self.status.node_name.clone();
        let work_dir = self
            .status
            .runtime
            .as_ref()
            .and_then(|r| r.work_dir.clone());
        let other_node = node.as_deref().is_some_and(|n| n != self.here.node.name);
        let other_dir = match (&work_dir, &self.here.work_dir) {
            (Some(w), Some(h)) => std::path::Path::new(w) != std::path::Path::new(h),
            _ => false,
        };
        (other_node || other_dir).then_some(Elsewhere { node, work_dir })
    }

    /// [`Step::NodeLost`]: sets `condition`; a deleted VM shows
    /// `Terminating`. Whether anything changed.
    pub fn node_lost(&mut self, condition: Condition) -> bool {
        if self.deleting {
            self.status.phase = VmPhase::Terminating;
        }
        self.set_condition(condition)
    }

    /// Records that the instance lives under this agent (its node).
    fn here_now(&mut self) {
        self.status.node_name = Some(self.here.node.name.clone());
    }

    /// Sets `cond`; whether anything changed.
    pub fn set_condition(&mut self, cond: Condition) -> bool {
        set_condition(&mut self.status.conditions, cond, self.now)
    }

    fn phase(&mut self, phase: VmPhase, ready: bool, reason: &str, message: &str) {
        self.status.phase = phase;
        let cond = condition("Ready", ready, reason, message, self.generation);
        self.set_condition(cond);
        // A guest that is not running answers no SSH and passes no probe:
        // an `SshReady` left True from its last boot would let `vmctl ssh`
        // hang in a connect.
        for type_ in ["SshReady", "ProbesReady"] {
            if phase != VmPhase::Running
                && let Some(c) = self.status.conditions.iter().find(|c| c.type_ == type_)
                && c.status == vmctl_api::ConditionStatus::True
            {
                let cond = condition(
                    type_,
                    false,
                    reason,
                    "the VM is not running",
                    self.generation,
                );
                self.set_condition(cond);
            }
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

    /// The `ProbesReady` condition from the user's probes: True when every
    /// one passes, else the first failing one's reason and message; removed
    /// when the spec has none.
    fn report_probes(&mut self, r: &Readiness) {
        if r.probes.is_empty() {
            self.status.conditions.retain(|c| c.type_ != "ProbesReady");
            return;
        }
        let check = match r.failing_probe() {
            Some(c) => c.clone(),
            None => Check {
                ok: true,
                since: r.probes.iter().filter_map(|c| c.since).max(),
                reason: "ProbesSucceeded",
                message: format!("all {} probes pass", r.probes.len()),
            },
        };
        self.set_check("ProbesReady", &check);
    }

    /// The `AddressReady` condition from the address search (removed when
    /// there is none); for a running VM whose address is not known, the
    /// reason and message that keep it (and `SshReady`) not ready.
    fn report_address(&mut self, phase: VmPhase) -> Option<(&'static str, String)> {
        let Some(d) = self.address.clone() else {
            self.status.conditions.retain(|c| c.type_ != "AddressReady");
            return None;
        };
        let (reason, message) = match d {
            Discovery::Found {
                address,
                source,
                since,
            } => {
                let check = Check {
                    ok: true,
                    since,
                    reason: "AddressFound",
                    message: format!("{address} from {source}"),
                };
                self.set_check("AddressReady", &check);
                return None;
            }
            Discovery::Searching { message } => ("WaitingForAddress", message),
            Discovery::TimedOut { message } => ("IPDiscoveryTimeout", message),
        };
        let check = Check {
            ok: false,
            since: None,
            reason,
            message: message.clone(),
        };
        self.set_check("AddressReady", &check);
        if phase == VmPhase::Running {
            // `vmctl ssh`, `exec` and `cp` wait for SshReady: say why it
            // cannot be yet.
            self.set_check("SshReady", &check);
        }
        Some((reason, message))
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
        self.status.node_name = None;
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
        self.here_now();
    }

    /// [`Step::Start`], after the instance started.
    pub fn started(&mut self, instance: InstanceStatus) {
        // A new boot: the address has to be found, SSH has to answer, and
        // the probes pass, again before the VM is Ready.
        for type_ in ["AddressReady", "SshReady", "ProbesReady"] {
            if self.status.conditions.iter().any(|c| c.type_ == type_) {
                let cond = condition(
                    type_,
                    false,
                    "Starting",
                    "the VM is booting",
                    self.generation,
                );
                self.set_condition(cond);
            }
        }
        self.status.start_failures = Default::default();
        self.status.started_spec = Some(restart_digest(&self.spec));
        self.instance = Some(instance);
        self.here_now();
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
            self.here_now();
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

    /// [`Step::AttachDisk`], after the disk was attached as `disk`.
    pub fn disk_attached(&mut self, disk: vmctl_api::DiskRuntime) {
        if let Some(inst) = &mut self.instance {
            inst.runtime.disks.retain(|d| d.name != disk.name);
            inst.runtime.disks.push(disk);
        }
    }

    /// [`Step::DetachDisk`], after disk `disk` was detached.
    pub fn disk_detached(&mut self, disk: &str) {
        if let Some(inst) = &mut self.instance {
            inst.runtime.disks.retain(|d| d.name != disk);
        }
    }

    /// [`Step::AttachDisk`] (`attach`) or [`Step::DetachDisk`] failed with
    /// `message`: RestartRequired, reason [`disks::HOTPLUG_FAILED`]; no
    /// disk is hot-plugged again for this generation.
    pub fn disk_hotplug_failed(&mut self, disk: &str, attach: bool, message: &str) {
        let what = if attach {
            format!(
                "disk {disk} could not be attached live ({message}); it is attached at the next start"
            )
        } else {
            format!(
                "disk {disk} could not be detached live ({message}); it is detached at the next start (its file is kept until the VM is deleted)"
            )
        };
        let cond = condition(
            "RestartRequired",
            true,
            disks::HOTPLUG_FAILED,
            format!("{what}; stop and start the VM (or set update-policy \"restart\") to apply"),
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
            // An adopted instance (status written before nodeName existed).
            self.here_now();
        }
        self.status.observed_generation = self.generation;
        let unaddressed = self.report_address(phase);
        // Nothing probes a guest without an address.
        let readiness = self
            .readiness
            .clone()
            .filter(|_| phase == VmPhase::Running && unaddressed.is_none());
        let (ready, reason, message) = match (phase, &readiness, unaddressed) {
            // A tap VM whose address is not known: nothing can reach it.
            (VmPhase::Running, _, Some((reason, message))) => (false, reason, message),
            (VmPhase::Running, None, None) => (true, "Running", String::new()),
            // Running, and Ready once the guest answers: `apply --wait`
            // and `up` return when `vmctl ssh` works.
            (VmPhase::Running, Some(r), None) if r.ssh.ok => match r.failing_probe() {
                None => (true, "Running", String::new()),
                // `vmctl get` and `apply --wait` say which probe fails.
                Some(c) => (false, c.reason, c.message.clone()),
            },
            (VmPhase::Running, Some(r), None) => (false, "SshNotReady", r.ssh.message.clone()),
            (VmPhase::Suspended, _, _) => (false, "Suspended", String::new()),
            _ => (false, "Stopped", String::new()),
        };
        if let Some(r) = &readiness {
            self.set_check("SshReady", &r.ssh);
            self.report_probes(r);
        }
        self.report_forwards();
        self.phase(phase, ready, reason, &message);
    }
}

/// Digest of the spec fields that only a restart can apply (vcpus,
/// memory, network, cloud-init, display, shares): 16 hex digits of their SHA-256.
pub fn restart_digest(spec: &VirtualMachineSpec) -> String {
    use sha2::Digest;
    let mut v = serde_json::json!({
        "vcpus": spec.vcpus,
        "memoryMib": spec.memory_mib,
        "network": spec.network,
        "cloudInit": spec.cloud_init,
    });
    // Only when set: VMs started before `display` existed keep their digest.
    if !spec.display.is_none() {
        v["display"] = serde_json::json!(spec.display);
    }
    // Likewise `shares`: VMs without shares keep their digest.
    if !spec.shares.is_empty() {
        v["shares"] = serde_json::json!(spec.shares);
    }
    hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..8])
}

#[cfg(test)]
mod tests;
