//! Which agent runs what on an etcd prefix: the agent lease elects the one
//! that runs the cluster's controllers (the scheduler, the node lifecycle
//! controller); each agent runs its own node's controllers while it holds
//! its node lease ([`run_per_fence`]).
//!
//! Before the agent lease, two agents on one prefix both ran every
//! controller: every action twice, with QEMU two copies of one VM. Now
//! (issue 17) VMs are bound to nodes, each agent acts on its node's only,
//! and one agent at a time runs what must run once:
//!
//! * At start, when etcd answers, the agent takes the prefix's agent lease
//!   ([`vmctl_store::EtcdStore::acquire_lease`], TTL [`DEFAULT_TTL`]) or,
//!   held by another, stands by for it ([`ControllersState::Standby`],
//!   naming the holder: host, pid, socket, data directory).
//! * A holder that is this agent's own dead predecessor (same host, boot
//!   and data directory, whose lock this agent holds: it was killed before
//!   it could revoke its lease) is no reason to wait: its lease is revoked
//!   and taken at once.
//! * With etcd unreachable the agent still starts and serves the API; it
//!   takes the lease once etcd answers, unless another agent took it.
//! * The cluster's controllers run only while the lease is held. The
//!   holder keeps it alive every third of the TTL; when it cannot (etcd
//!   unreachable or the lease gone) for so long that the lease may expire
//!   within a fifth of the TTL, it stops them and tries to take the lease
//!   again, as at start. Another agent can take it only once etcd expired
//!   it: a cut-off holder's controllers are stopping by then (stopping
//!   waits for the action in progress). That action may outlast the cut
//!   (its requests held up until it heals), so the controllers write
//!   through a store fenced by the lease ([`vmctl_store::EtcdStore::fenced`]):
//!   once the lease is gone, none of their writes lands. A node's
//!   controllers are fenced by its node lease the same way.
//! * A holder that stops (SIGTERM) revokes its lease: another agent takes
//!   it at once; one killed with SIGKILL holds it until the TTL runs out,
//!   unless restarted on the same host and data directory (above).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmctl_store::{AgentLease, EtcdStore, LeaseHolder, LeaseOutcome, StoreError};

use crate::config::AgentConfig;

/// The agent lease's TTL: a killed holder's controllers are taken over by
/// another agent on the prefix within this time.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How often an agent that does not hold the lease tries to take it.
const RETRY: Duration = Duration::from_secs(1);

/// Whether this agent runs the cluster's controllers (for `/v1/healthz`;
/// its own node's run whenever it holds its node lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllersState {
    /// They run (sled, or the etcd agent lease is held).
    Running,
    /// They do not: the lease is held by `holder` (`None`: not known yet,
    /// e.g. etcd unreachable).
    Standby {
        /// Who holds the agent lease.
        holder: Option<LeaseHolder>,
    },
}

/// This agent, as a lease holder.
pub fn me(cfg: &AgentConfig) -> LeaseHolder {
    LeaseHolder {
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into()),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty()),
        pid: std::process::id(),
        socket: cfg.socket.display().to_string(),
        data_dir: cfg.data_dir.display().to_string(),
        since: chrono::Utc::now(),
    }
}

/// What one attempt to take the lease found.
enum Take {
    Taken(AgentLease),
    HeldBy(LeaseHolder),
}

/// One attempt: takes the agent lease, revoking it first when its
/// holder is this agent's dead predecessor.
async fn take(store: &EtcdStore, me: &LeaseHolder, ttl: Duration) -> Result<Take, StoreError> {
    take_one(store, None, me, ttl).await
}

/// One attempt to take node `node`'s lease (its Node's name, for this
/// agent): `Ok(Ok(lease))`, or `Ok(Err(holder))` when another live agent
/// holds it; a dead predecessor's is revoked and taken, as the agent
/// lease is.
///
/// Errors: [`StoreError::Unavailable`] when etcd cannot be reached.
pub async fn take_node_lease(
    store: &EtcdStore,
    node: &str,
    me: &LeaseHolder,
    ttl: Duration,
) -> Result<Result<AgentLease, LeaseHolder>, StoreError> {
    Ok(match take_one(store, Some(node), me, ttl).await? {
        Take::Taken(l) => Ok(l),
        Take::HeldBy(h) => Err(h),
    })
}

/// One attempt at the agent lease (`node` `None`) or a node's lease.
async fn take_one(
    store: &EtcdStore,
    node: Option<&str>,
    me: &LeaseHolder,
    ttl: Duration,
) -> Result<Take, StoreError> {
    let mut me = me.clone();
    me.since = chrono::Utc::now();
    let acquire = async |me: &LeaseHolder| match node {
        None => store.acquire_lease(me, ttl).await,
        Some(n) => store.acquire_node_lease(n, me, ttl).await,
    };
    let what = node.map_or_else(
        || "the agent lease".to_owned(),
        |n| format!("node {n}'s lease"),
    );
    match acquire(&me).await? {
        LeaseOutcome::Acquired(l) => Ok(Take::Taken(l)),
        LeaseOutcome::Held { holder, lease } if holder.is_predecessor_of(&me) => {
            tracing::info!(
                %holder,
                "{what} is held by this agent's predecessor (same host, boot and \
                 data directory: killed before it could give it up); revoking it"
            );
            store.revoke_lease(lease).await?;
            Ok(match acquire(&me).await? {
                LeaseOutcome::Acquired(l) => Take::Taken(l),
                LeaseOutcome::Held { holder, .. } => Take::HeldBy(holder),
            })
        }
        LeaseOutcome::Held { holder, .. } => Ok(Take::HeldBy(holder)),
    }
}

/// At start: the lease, or `None` when another agent holds it (this one
/// stands by for it: [`run_while_held`] takes it once it is free) or etcd
/// cannot be reached now (the agent starts anyway and takes it later).
pub async fn at_start(store: &EtcdStore, me: &LeaseHolder, ttl: Duration) -> Option<AgentLease> {
    match take(store, me, ttl).await {
        Ok(Take::Taken(l)) => Some(l),
        Ok(Take::HeldBy(h)) => {
            tracing::info!(
                holder = %h,
                "another agent runs this cluster's scheduler and node lifecycle controller (it \
                 holds the agent lease): this agent runs its own node's controllers and stands \
                 by for those"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                error = %vmctl_api::error_chain(&e),
                "etcd is not reachable yet; the API serves, the controllers start once etcd \
                 answers"
            );
            None
        }
    }
}

/// How a term of holding the lease ended.
enum End {
    /// The controllers returned.
    Returned(Result<(), vmctl_controllers::RunError>),
    /// The agent stops.
    Stop,
    /// The lease is lost (or may expire any moment): why.
    Lost(String),
}

/// Runs the controllers (`start` spawns them with a stop signal) while
/// this agent holds the agent lease, taking it first if `first` is `None`,
/// and again after losing it; see the module docs. Returns when `stopped`
/// turns true (after stopping the controllers and revoking the lease) or
/// when the controllers fail.
pub async fn run_while_held(
    store: EtcdStore,
    first: Option<AgentLease>,
    me: LeaseHolder,
    ttl: Duration,
    start: impl Fn(
        watch::Receiver<bool>,
        Option<vmctl_store::Fence>,
    ) -> JoinHandle<Result<(), vmctl_controllers::RunError>>,
    mut stopped: watch::Receiver<bool>,
    state: watch::Sender<ControllersState>,
) -> Result<(), vmctl_controllers::RunError> {
    let mut next = first;
    loop {
        let mut lease = match next.take() {
            Some(l) => l,
            None => {
                let mut last_holder: Option<LeaseHolder> = None;
                loop {
                    if *stopped.borrow() {
                        return Ok(());
                    }
                    match take(&store, &me, ttl).await {
                        Ok(Take::Taken(l)) => break l,
                        Ok(Take::HeldBy(h)) => {
                            if last_holder.as_ref() != Some(&h) {
                                tracing::info!(
                                    holder = %h,
                                    "another agent holds this etcd prefix's agent lease: this \
                                     agent runs no scheduler or node lifecycle controller until \
                                     it takes the lease"
                                );
                            }
                            last_holder = Some(h.clone());
                            state.send_replace(ControllersState::Standby { holder: Some(h) });
                        }
                        Err(e) => {
                            tracing::debug!(error = %vmctl_api::error_chain(&e), "cannot take the agent lease yet");
                        }
                    }
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => {}
                        _ = stopped.changed() => {}
                    }
                }
            }
        };
        tracing::info!(
            lease = lease.id(),
            ttl_s = lease.ttl().as_secs(),
            "holding the agent lease: the controllers run"
        );
        state.send_replace(ControllersState::Running);
        let (term_stop, term_stopped) = watch::channel(false);
        let mut controllers = start(term_stopped, Some(lease.fence()));
        let margin = lease.ttl() / 5;
        let end = loop {
            let keep_at = (Instant::now() + lease.ttl() / 3).min(lease.expires() - margin);
            tokio::select! {
                r = &mut controllers => {
                    break End::Returned(r.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "controller task failed");
                        Ok(())
                    }));
                }
                _ = stopped.changed() => break End::Stop,
                () = tokio::time::sleep_until(keep_at.into()) => {}
            }
            let left = lease.expires().saturating_duration_since(Instant::now());
            if left <= margin {
                break End::Lost(format!(
                    "no keep-alive acknowledged for {:?}: the lease may expire",
                    lease.ttl() - left
                ));
            }
            match tokio::time::timeout(left - margin, lease.keep_alive()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => break End::Lost("the lease expired or was revoked".into()),
                Ok(Err(e)) => {
                    tracing::debug!(error = %vmctl_api::error_chain(&e), "keep-alive failed; retrying");
                }
                Err(_) => {}
            }
        };
        let _ = term_stop.send(true);
        match end {
            End::Returned(r) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), lease.release()).await;
                return r;
            }
            End::Stop => {
                let r = (&mut controllers).await;
                // Revoked, so that the next agent need not wait for the TTL.
                let _ = tokio::time::timeout(Duration::from_secs(2), lease.release()).await;
                return r.unwrap_or(Ok(()));
            }
            End::Lost(why) => {
                tracing::warn!(
                    why,
                    "lost the agent lease: stopping the controllers until this agent holds it again"
                );
                state.send_replace(ControllersState::Standby { holder: None });
                if let Ok(Err(e)) = (&mut controllers).await {
                    return Err(e);
                }
            }
        }
    }
}

/// Runs this node's controllers (`start` spawns them with a stop signal
/// and the fence their store writes through) while `fences` holds the
/// node lease's fence ([`crate::node::NodeAgent::fences`]): they stop when
/// it is withdrawn (the lease may expire) and start again, fenced by the
/// new lease, when it is taken again. Returns when `stopped` turns true
/// (after stopping them) or when they fail.
///
/// With `fencing` (the agent's `--fence`), losing the lease also stops
/// every instance that hypervisor has ([`fence_vms`]), so that a partitioned
/// host cannot fight a replacement.
pub async fn run_per_fence(
    fencing: Option<std::sync::Arc<dyn vmctl_controllers::drivers::Hypervisor>>,
    mut fences: watch::Receiver<Option<vmctl_store::Fence>>,
    start: impl Fn(
        watch::Receiver<bool>,
        Option<vmctl_store::Fence>,
    ) -> JoinHandle<Result<(), vmctl_controllers::RunError>>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), vmctl_controllers::RunError> {
    loop {
        let fence = loop {
            if *stopped.borrow() {
                return Ok(());
            }
            if let Some(f) = fences.borrow_and_update().clone() {
                break f;
            }
            tokio::select! {
                r = fences.changed() => if r.is_err() { return Ok(()) },
                _ = stopped.changed() => {}
            }
        };
        tracing::info!("holding the node lease: this node's controllers run");
        let (term_stop, term_stopped) = watch::channel(false);
        let mut controllers = start(term_stopped, Some(fence.clone()));
        let stop_all = loop {
            tokio::select! {
                r = &mut controllers => {
                    return r.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "controller task failed");
                        Ok(())
                    });
                }
                _ = stopped.changed() => break true,
                r = fences.changed() => {
                    if r.is_err() {
                        break true;
                    }
                    if fences.borrow().as_ref() != Some(&fence) {
                        tracing::warn!(
                            "the node lease may have expired: this node's controllers stop \
                             until this agent holds it again"
                        );
                        break false;
                    }
                }
            }
        };
        let _ = term_stop.send(true);
        let r = (&mut controllers).await;
        if stop_all {
            return r.unwrap_or(Ok(()));
        }
        if let Ok(Err(e)) = r {
            return Err(e);
        }
        if let Some(hv) = &fencing {
            fence_vms(hv.as_ref()).await;
        }
    }
}

/// How long [`fence_vms`] gives each guest to shut down before its
/// hypervisor process is ended.
pub const FENCE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops every instance `hv` has (each given [`FENCE_STOP_TIMEOUT`]),
/// logging what it does: this node lost its lease, and a replacement
/// may start its VMs elsewhere.
pub async fn fence_vms(hv: &dyn vmctl_controllers::drivers::Hypervisor) {
    let names = match hv.instances().await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %vmctl_api::error_chain(&e), "fencing: cannot list this node's VMs");
            return;
        }
    };
    tracing::warn!(
        vms = names.len(),
        "fencing (--fence): this node's lease may have expired; stopping its VMs so that a \
         replacement elsewhere cannot run beside them"
    );
    for name in names {
        if let Err(e) = hv.stop(&name, FENCE_STOP_TIMEOUT).await {
            tracing::error!(vm = %name, error = %vmctl_api::error_chain(&e), "fencing: cannot stop the VM");
        }
    }
}

#[cfg(test)]
mod tests {
    use vmctl_controllers::drivers::{InstanceSpec, InstanceState, LocalImage};

    use super::*;

    #[tokio::test]
    async fn fencing_stops_every_vm_the_driver_has() {
        let drivers = vmctl_controllers::Drivers::fake(vmctl_controllers::FakeConfig::default());
        let hv = drivers.hypervisor;
        for name in ["a", "b"] {
            let spec = InstanceSpec {
                name: name.into(),
                uid: format!("uid-{name}"),
                spec: serde_json::from_value(serde_json::json!({"image": "i"})).unwrap(),
                image: LocalImage {
                    path: "/i".into(),
                    format: "raw".into(),
                    size_bytes: 1,
                    virtual_size_bytes: None,
                },
            };
            hv.prepare(&spec).await.unwrap();
            hv.start(name).await.unwrap();
        }
        assert_eq!(hv.instances().await.unwrap(), ["a", "b"]);
        fence_vms(hv.as_ref()).await;
        for name in ["a", "b"] {
            let st = hv.status(name).await.unwrap().expect("kept, stopped");
            assert_eq!(st.state, InstanceState::Stopped, "{name}");
        }
    }
}
