//! The node lifecycle controller: a Node whose agent stopped posting its
//! heartbeat is marked `Ready=False`, reason `NodeStatusUnknown`
//! (Kubernetes' node lifecycle controller, for vmctl's agents).
//!
//! Each agent keeps its own Node's status current (the agent's `node`
//! module); this controller, run by whichever agent runs the controllers,
//! watches the others':
//!
//! ```text
//!   Ready=True ── heartbeat silent for more than TTL + 2 s ──▶ Ready=False
//!      ▲  │ a new heartbeat: look again at its deadline        NodeStatusUnknown
//!      │  └──────────────────────────┘                              │
//!      └────────── its agent writes Ready=True again ◀──────────────┘
//! ```
//!
//! Silence is measured on this agent's clock, from when it first saw the
//! current `status.lastHeartbeatTime` (as Kubernetes measures it, so that
//! hosts' clocks need not agree); a Node met for the first time (this
//! agent just started its controllers) is judged by the heartbeat's age on
//! the wall clock, so that a long-dead node is marked at once. The TTL is
//! the node's own (`status.leaseTtlSeconds`), since each agent may have
//! its own `--node-lease-ttl`. This agent's own Node is left to its
//! heartbeat. Every observe → [`plan`] → act.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use vmctl_api::node::{HEARTBEAT_GRACE_SECONDS, REASON_STATUS_UNKNOWN};
use vmctl_api::{
    Condition, Kind, Node, NodeStatus, NoteType, Object, Time, VirtualMachine, VirtualMachineStatus,
};

use crate::runtime::{Action, Reconciler};
use crate::{Context, Error};

/// What one reconcile found.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Whether the Node is this agent's own.
    pub own: bool,
    /// The Node's status (`None`: registered, nothing reported yet).
    pub status: Option<NodeStatus>,
    /// The Node's generation.
    pub generation: u64,
    /// How long its current heartbeat has gone unreplaced, as this agent
    /// measures it (see the module docs).
    pub silent_for: Duration,
}

/// What to do about a Node.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing, until it changes: this agent's own, not Ready already,
    /// or without a status.
    Keep,
    /// Look again after this long, when its heartbeat is overdue unless
    /// replaced.
    Recheck(Duration),
    /// Set this `Ready=False` condition (reason `NodeStatusUnknown`).
    MarkUnknown(Condition),
}

/// The pure decision over what [`NodeReconciler`] observed.
pub fn plan(o: &Observed) -> Step {
    let Some(status) = o.status.as_ref().filter(|_| !o.own) else {
        return Step::Keep;
    };
    if !status.is_ready() {
        return Step::Keep;
    }
    let deadline = status.heartbeat_deadline();
    if o.silent_for < deadline {
        return Step::Recheck(deadline - o.silent_for);
    }
    let last = status.last_heartbeat_time.map_or_else(
        || "never".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    let message = format!(
        "last heartbeat at {last}: none for {} s, more than the node lease TTL ({} s) + {} s; \
         its agent stopped or cannot reach the store",
        o.silent_for.as_secs(),
        deadline.as_secs() - HEARTBEAT_GRACE_SECONDS,
        HEARTBEAT_GRACE_SECONDS
    );
    Step::MarkUnknown(crate::conditions::condition(
        "Ready",
        false,
        REASON_STATUS_UNKNOWN,
        message,
        o.generation,
    ))
}

/// When this agent first saw a Node's current heartbeat.
#[derive(Debug, Clone, Copy)]
struct Seen {
    heartbeat: Option<Time>,
    at: Instant,
}

/// Reconciles Nodes: marks those whose heartbeat stopped not Ready.
#[derive(Debug)]
pub struct NodeReconciler {
    ctx: Arc<Context>,
    /// Per Node name, its heartbeat as last seen and since when.
    seen: Mutex<HashMap<String, Seen>>,
}

impl NodeReconciler {
    /// A Node reconciler using `ctx` (its node is this agent's own).
    pub fn new(ctx: Arc<Context>) -> Self {
        NodeReconciler {
            ctx,
            seen: Mutex::default(),
        }
    }

    /// How long `heartbeat` has been Node `name`'s current one (see the
    /// module docs).
    fn silent_for(&self, name: &str, heartbeat: Option<Time>) -> Duration {
        let mut seen = self
            .seen
            .lock()
            .expect("never poisoned: no panics under it");
        match seen.get(name) {
            Some(s) if s.heartbeat == heartbeat => s.at.elapsed(),
            known => {
                // First sight of the node: the heartbeat's age on the wall
                // clock (a clock ahead of ours counts as fresh). A new
                // heartbeat of a known node: fresh now.
                let age = match (known, heartbeat) {
                    (None, Some(t)) => (Utc::now() - t).to_std().unwrap_or_default(),
                    _ => Duration::ZERO,
                };
                let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                seen.insert(name.to_owned(), Seen { heartbeat, at });
                age
            }
        }
    }
}

impl Reconciler for NodeReconciler {
    type Error = Error;
    const KIND: Kind = Kind::Node;
    const NAME: &'static str = "node-lifecycle-controller";
    /// Nodes' statuses are written by their agents (the heartbeat), and a
    /// new heartbeat moves the deadline.
    const STATUS_TRIGGERS: bool = true;

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, Error> {
        let node = Node::from_object(&obj).map_err(Error::decode(Kind::Node))?;
        let name = node.metadata.name.clone();
        let status = node.status;
        let o = Observed {
            own: name == self.ctx.config.node.name,
            silent_for: status.as_ref().map_or(Duration::ZERO, |s| {
                self.silent_for(&name, s.last_heartbeat_time)
            }),
            status,
            generation: node.metadata.generation,
        };
        let status = match plan(&o) {
            Step::Keep => o.status,
            // A little late rather than early: the heartbeat is overdue then.
            Step::Recheck(d) => return Ok(Action::requeue(d + Duration::from_millis(20))),
            Step::MarkUnknown(cond) => {
                let mut status = o.status.unwrap_or_default();
                let message = cond.message.clone();
                vmctl_api::set_condition(&mut status.conditions, cond, Utc::now());
                self.ctx.write_status(&obj, &status).await?;
                tracing::warn!(node = %name, %message, "node not ready");
                self.ctx
                    .note(
                        &obj.object_ref(),
                        NoteType::Warning,
                        Self::NAME,
                        "NodeNotReady",
                        format!("Node {name} is not Ready: {message}"),
                    )
                    .await;
                Some(status)
            }
        };
        // In a cluster, the VMs of a node that is not Ready are lost with
        // it (and re-placed after their evict-after).
        match status {
            Some(st) if self.ctx.config.cluster && !o.own && !st.is_ready() => {
                let next = self.vms_lost(&name, &st).await?;
                Ok(next.map_or_else(Action::await_change, Action::requeue))
            }
            _ => Ok(Action::await_change()),
        }
    }
}

impl NodeReconciler {
    /// Marks the VMs bound to node `name` (not Ready, as `status` says)
    /// `Ready=False`, reason `NodeLost`, and unbinds those whose
    /// `evictAfterSeconds` has passed since, for the scheduler to place
    /// them again. When the next of them is due (`None`: none).
    async fn vms_lost(&self, name: &str, status: &NodeStatus) -> Result<Option<Duration>, Error> {
        let ctx = &self.ctx;
        let ready = status.ready();
        let reason = ready.map_or("Unknown", |c| c.reason.as_str());
        let seen = status.last_heartbeat_time.map_or_else(
            || "never".to_owned(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        let mut next: Option<Duration> = None;
        for obj in ctx.list(Kind::VirtualMachine).await? {
            if crate::context::vm_node(&obj) != Some(name) {
                continue;
            }
            let Ok(vm) = VirtualMachine::from_object(&obj) else {
                continue;
            };
            let vm_name = &vm.metadata.name;
            let mut st: VirtualMachineStatus = vm.status.clone().unwrap_or_default();
            let lost_since = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.reason == crate::vm::NODE_LOST)
                .and_then(|c| c.last_transition_time);
            if let (Some(after), Some(since), None) = (
                vm.spec.evict_after_seconds,
                lost_since,
                vm.metadata.deletion_timestamp,
            ) {
                let lost_for = (Utc::now() - since).to_std().unwrap_or_default();
                let after = Duration::from_secs(after);
                if lost_for >= after {
                    self.evict(&obj, name, after).await?;
                } else {
                    let left = after - lost_for;
                    next = Some(next.map_or(left, |n| n.min(left)));
                }
                continue;
            }
            let message = format!(
                "node {name} is not Ready ({reason}); the VM was last seen {:?} on node {name}, \
                 whose last heartbeat was at {seen}. Its agent must run again to manage it{}",
                st.phase,
                match vm.spec.evict_after_seconds {
                    Some(s) => format!(
                        "; it is re-placed on another node after {s} s (evictAfterSeconds), \
                         with a fresh disk"
                    ),
                    None => String::new(),
                },
            );
            let cond = crate::conditions::condition(
                "Ready",
                false,
                crate::vm::NODE_LOST,
                message,
                vm.metadata.generation,
            );
            if !crate::conditions::would_change(&st.conditions, &cond) {
                continue;
            }
            vmctl_api::set_condition(&mut st.conditions, cond, Utc::now());
            match ctx.write_status(&obj, &st).await {
                Ok(_) => {
                    ctx.note(
                        &obj.object_ref(),
                        NoteType::Warning,
                        Self::NAME,
                        crate::vm::NODE_LOST,
                        format!("VM {vm_name} is lost with node {name}, which is not Ready"),
                    )
                    .await;
                    if let Some(s) = vm.spec.evict_after_seconds {
                        let d = Duration::from_secs(s);
                        next = Some(next.map_or(d, |n| n.min(d)));
                    }
                }
                // Changed meanwhile: looked at again at the next pass.
                Err(e) => {
                    tracing::debug!(vm = %vm_name, error = %e, "cannot mark the VM NodeLost yet");
                    next = Some(Duration::from_secs(1));
                }
            }
        }
        Ok(next)
    }

    /// Unbinds VM `obj`, lost with node `node` for `after` or longer, so
    /// that the scheduler places it again (a fresh disk from its image,
    /// provisioned again).
    async fn evict(&self, obj: &Object, node: &str, after: Duration) -> Result<(), Error> {
        let name = &obj.metadata.name;
        let message = format!(
            "evicted from node {node}, lost for {} s or more (evictAfterSeconds): to be placed \
             on another node with a fresh disk from its image; what was on its disk on node \
             {node} is not carried over",
            after.as_secs()
        );
        let mut st = VirtualMachineStatus::default();
        let cond = crate::conditions::condition(
            crate::scheduler::SCHEDULED,
            false,
            "Evicted",
            message.clone(),
            0,
        );
        vmctl_api::set_condition(&mut st.conditions, cond, Utc::now());
        self.ctx.write_status(obj, &st).await?;
        tracing::warn!(vm = %name, %node, "evicted");
        self.ctx
            .note(
                &obj.object_ref(),
                NoteType::Warning,
                Self::NAME,
                "Evicted",
                format!("VM {name} {message}"),
            )
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmctl_api::ConditionStatus;

    use super::*;

    fn ready(ttl: Option<u64>) -> NodeStatus {
        let mut s = NodeStatus {
            lease_ttl_seconds: ttl,
            last_heartbeat_time: Some(Utc::now()),
            ..Default::default()
        };
        let c = crate::conditions::condition("Ready", true, "AgentReady", "", 1);
        vmctl_api::set_condition(&mut s.conditions, c, Utc::now());
        s
    }

    fn observed(status: Option<NodeStatus>, silent: u64) -> Observed {
        Observed {
            own: false,
            status,
            generation: 1,
            silent_for: Duration::from_secs(silent),
        }
    }

    #[test]
    fn a_ready_node_is_marked_once_silent_for_its_ttl_plus_two_seconds() {
        assert_eq!(
            plan(&observed(Some(ready(Some(4))), 1)),
            Step::Recheck(Duration::from_secs(5))
        );
        let Step::MarkUnknown(c) = plan(&observed(Some(ready(Some(4))), 6)) else {
            panic!("not marked");
        };
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, "NodeStatusUnknown")
        );
        assert!(c.message.starts_with("last heartbeat at "), "{}", c.message);
        assert!(c.message.contains("TTL (4 s) + 2 s"), "{}", c.message);
        // Without a TTL (registered on sled): the default, 10 s.
        assert!(matches!(
            plan(&observed(Some(ready(None)), 11)),
            Step::Recheck(_)
        ));
        assert!(matches!(
            plan(&observed(Some(ready(None)), 12)),
            Step::MarkUnknown(_)
        ));
    }

    #[test]
    fn own_not_ready_and_unreported_nodes_are_left_alone() {
        let mut own = observed(Some(ready(Some(2))), 100);
        own.own = true;
        assert_eq!(plan(&own), Step::Keep);
        assert_eq!(plan(&observed(None, 100)), Step::Keep);
        let mut stopped = ready(Some(2));
        let c = crate::conditions::condition("Ready", false, "AgentStopped", "", 1);
        vmctl_api::set_condition(&mut stopped.conditions, c, Utc::now());
        assert_eq!(plan(&observed(Some(stopped), 100)), Step::Keep);
    }
}
