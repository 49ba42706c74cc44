//! The port-forward part of the VM plan: the forwards the spec lists
//! against those the hypervisor has in place, as a step and as status.
//!
//! ```text
//!   instance up, backend reports its forwards:
//!     in place, not in the spec ──▶ ForwardPorts (remove)      live, no restart
//!     in the spec, not in place ──▶ ForwardPorts (add)         live, no restart
//!       (unless it failed and its retryAfter is still ahead)
//!   each spec forward in status.portForwards:
//!     Active  ── in place
//!     Failed  ── the last add failed (HostPortInUse, PortForwardFailed);
//!                tried again after RETRY, while the VM runs
//!     Pending ── the VM is not running (NotRunning), or not added yet
//!   PortForwardsReady: True when every forward is Active; absent when the
//!   spec has none. The VM's Ready does not depend on it: a busy host port
//!   leaves the VM and its other forwards working.
//! ```
//!
//! Forwards are not part of the restart digest: changing them never
//! needs a restart.

use std::time::Duration;

use vmctl_api::{PortForward, PortForwardState, PortForwardStatus};

use super::Observed;
use crate::conditions::condition;
use crate::drivers::InstanceState;

/// Condition type: every port forward of the spec is in place.
pub const READY: &str = "PortForwardsReady";
/// Reason of a forward whose host port another socket holds.
pub const IN_USE: &str = "HostPortInUse";
/// Reason of a forward that failed otherwise.
pub const FAILED: &str = "PortForwardFailed";
/// How long a failed forward waits before it is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

/// Whether the instance runs (or is paused) with forwards the backend
/// reports: the forwards in place, else `None`.
fn in_place(o: &Observed) -> Option<&[PortForward]> {
    let inst = o.instance.as_ref()?;
    let up = matches!(
        inst.state,
        InstanceState::Running | InstanceState::Suspended
    );
    up.then_some(())?;
    inst.port_forwards.as_deref()
}

/// The entry of `f` in the status, if any.
fn entry<'a>(o: &'a Observed, f: &PortForward) -> Option<&'a PortForwardStatus> {
    o.status.port_forwards.iter().find(|e| e.forward() == *f)
}

/// Whether `f` failed and is not to be tried again yet.
fn waiting(o: &Observed, f: &PortForward) -> bool {
    entry(o, f).is_some_and(|e| {
        e.state == PortForwardState::Failed && e.retry_after.is_some_and(|t| t > o.now)
    })
}

/// The forwards to take away and to put in place now: (remove, add);
/// `None` when nothing is to change.
pub fn changes(o: &Observed) -> Option<(Vec<PortForward>, Vec<PortForward>)> {
    let active = in_place(o)?;
    let remove: Vec<PortForward> = active
        .iter()
        .filter(|f| !o.spec.port_forwards.contains(f))
        .cloned()
        .collect();
    let add: Vec<PortForward> = o
        .spec
        .port_forwards
        .iter()
        .filter(|f| !active.contains(f) && !waiting(o, f))
        .cloned()
        .collect();
    (!remove.is_empty() || !add.is_empty()).then_some((remove, add))
}

/// The earliest time a failed forward is tried again, if one waits.
pub fn next_retry(o: &Observed) -> Option<Duration> {
    o.status
        .port_forwards
        .iter()
        .filter(|e| e.state == PortForwardState::Failed)
        .filter_map(|e| e.retry_after)
        .min()
        .map(|t| (t - o.now).to_std().unwrap_or_default())
}

impl Observed {
    /// A forward was put in place.
    pub fn forward_added(&mut self, f: &PortForward) {
        if let Some(list) = self
            .instance
            .as_mut()
            .and_then(|i| i.port_forwards.as_mut())
            && !list.contains(f)
        {
            list.push(f.clone());
        }
    }

    /// A forward was taken away (or is treated as gone: a failed removal
    /// is tried again at the next reconcile, not in this one).
    pub fn forward_removed(&mut self, f: &PortForward) {
        if let Some(list) = self
            .instance
            .as_mut()
            .and_then(|i| i.port_forwards.as_mut())
        {
            list.retain(|g| g != f);
        }
    }

    /// Putting `f` in place failed (`reason` [`IN_USE`] or [`FAILED`]):
    /// it is Failed until tried again after [`RETRY`]. Whether the entry
    /// changed from what it said (so a Warning note is due).
    pub fn forward_failed(&mut self, f: &PortForward, reason: &str, message: &str) -> bool {
        let retry = self.now + chrono::Duration::from_std(RETRY).unwrap_or_default();
        let now = self.now;
        let entries = &mut self.status.port_forwards;
        let i = match entries.iter().position(|e| e.forward() == *f) {
            Some(i) => i,
            None => {
                entries.push(status_of(f, PortForwardState::Pending, None, None, None));
                entries.len() - 1
            }
        };
        let e = &mut entries[i];
        let changed = e.state != PortForwardState::Failed
            || e.reason.as_deref() != Some(reason)
            || e.message.as_deref() != Some(message);
        if e.state != PortForwardState::Failed {
            e.last_transition_time = Some(now);
        }
        e.state = PortForwardState::Failed;
        e.reason = Some(reason.to_owned());
        e.message = Some(message.to_owned());
        e.retry_after = Some(retry);
        changed
    }

    /// Writes `status.portForwards` (one entry per spec forward, in the
    /// spec's order) and the `PortForwardsReady` condition from what was
    /// observed. Called when the VM is reported.
    pub fn report_forwards(&mut self) {
        let active = in_place(self).map(<[PortForward]>::to_vec);
        let up = self
            .instance
            .as_ref()
            .is_some_and(|i| matches!(i.state, InstanceState::Running | InstanceState::Suspended));
        let entries: Vec<PortForwardStatus> = self
            .spec
            .port_forwards
            .iter()
            .map(|f| {
                let old = entry(self, f);
                let since = |state| {
                    old.filter(|e| e.state == state)
                        .and_then(|e| e.last_transition_time)
                        .or(Some(self.now))
                };
                let is_active = active.as_ref().is_some_and(|a| a.contains(f));
                if is_active {
                    let t = since(PortForwardState::Active);
                    status_of(f, PortForwardState::Active, None, None, t)
                } else if let Some(e) = old.filter(|e| up && e.state == PortForwardState::Failed) {
                    e.clone()
                } else {
                    let (reason, message) = if up {
                        ("NotInPlace", "not set up yet")
                    } else {
                        ("NotRunning", "the VM is not running")
                    };
                    let t = since(PortForwardState::Pending);
                    let mut e = status_of(f, PortForwardState::Pending, Some(reason), None, t);
                    e.message = Some(message.to_owned());
                    e
                }
            })
            .collect();
        self.status.port_forwards = entries;
        if self.spec.port_forwards.is_empty() {
            self.status.conditions.retain(|c| c.type_ != READY);
            return;
        }
        let failed: Vec<&PortForwardStatus> = self
            .status
            .port_forwards
            .iter()
            .filter(|e| e.state == PortForwardState::Failed)
            .collect();
        let all_active = self
            .status
            .port_forwards
            .iter()
            .all(|e| e.state == PortForwardState::Active);
        let cond = if all_active {
            let list: Vec<String> = self
                .spec
                .port_forwards
                .iter()
                .map(|f| f.describe())
                .collect();
            condition(READY, true, "Active", list.join(", "), self.generation)
        } else if let Some(first) = failed.first() {
            let reason = if failed.iter().any(|e| e.reason.as_deref() == Some(IN_USE)) {
                IN_USE
            } else {
                first.reason.as_deref().unwrap_or(FAILED)
            };
            let active_n = self
                .status
                .port_forwards
                .iter()
                .filter(|e| e.state == PortForwardState::Active)
                .count();
            let msgs: Vec<String> = failed
                .iter()
                .map(|e| e.message.clone().unwrap_or_default())
                .collect();
            let message = format!(
                "{}; tried again every {} s; {active_n} other forward(s) active",
                msgs.join("; "),
                RETRY.as_secs()
            );
            condition(READY, false, reason, message, self.generation)
        } else if up {
            condition(READY, false, "NotInPlace", "", self.generation)
        } else {
            condition(
                READY,
                false,
                "NotRunning",
                "the VM is not running",
                self.generation,
            )
        };
        self.set_condition(cond);
    }
}

fn status_of(
    f: &PortForward,
    state: PortForwardState,
    reason: Option<&str>,
    message: Option<&str>,
    since: Option<vmctl_api::Time>,
) -> PortForwardStatus {
    PortForwardStatus {
        host_port: f.host_port,
        guest_port: f.guest_port,
        protocol: f.protocol,
        address: f.address.clone(),
        state,
        reason: reason.map(str::to_owned),
        message: message.map(str::to_owned),
        last_transition_time: since,
        retry_after: None,
    }
}
