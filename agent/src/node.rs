//! This agent's Node: registered when the agent starts, kept current while
//! it runs, marked stopped when it stops (issue 17 item 1).
//!
//! ```text
//!   start ─▶ (etcd) take the node lease ─▶ apply the Node (name, labels)
//!                 │ held by another live agent:          │
//!                 ▼ refuse to start                      ▼
//!                                       status: Ready=True, capacity, address,
//!                                       heartbeat ──┐
//!                     (etcd) every TTL/3: keep the  │
//!                     lease alive, post the status ◀┘ ── stop ─▶ Ready=False
//!                                                                AgentStopped,
//!                                                                lease revoked
//! ```
//!
//! * The Node is named by `--node-name` and labelled by `--node-labels`;
//!   its spec is empty ([`vmctl_api::NodeSpec`]). A restarted agent with
//!   other labels re-applies them.
//! * On etcd the node lease (`P@lease/node/{name}`, TTL `--node-lease-ttl`,
//!   default 10 s) holds the name while the agent lives: a second live
//!   agent with the same node name is refused at start (its predecessor,
//!   killed on this host and data directory, is not: its lease is revoked,
//!   as for the agent lease in [`crate::lease`]). Every third of the TTL
//!   the agent keeps the lease alive and writes the status with a new
//!   `lastHeartbeatTime` (so one write per node per TTL/3, no more);
//!   another agent's node lifecycle controller
//!   ([`vmctl_controllers::node`]) marks the Node `NodeStatusUnknown` when
//!   those stop for longer than the TTL + 2 s.
//! * On sled there is one agent and nobody else to read the store while
//!   it runs: it writes the status when it starts (Ready) and when it
//!   stops (`AgentStopped`), and no heartbeat between (which would add an
//!   event to the log every few seconds).
//! * Capacity is measured at each write ([`capacity`]); the accelerator
//!   is the driver's ([`vmctl_controllers::drivers::Hypervisor::accelerator`]),
//!   written once the driver knows it.
//! * A failed write is retried at the next beat (on sled, every
//!   [`SLED_RETRY`] until one succeeds); nothing here stops the agent
//!   once it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use vmctl_api::node::{REASON_AGENT_READY, REASON_AGENT_STOPPED, REASON_STATUS_UNKNOWN};
use vmctl_api::{
    ApplySource, Condition, ConditionStatus, Kind, Node, NodeAddress, NodeResources, NodeSpec,
    NodeStatus, Note, NoteType, Object, ObjectRef,
};
use vmctl_controllers::drivers::Hypervisor;
use vmctl_store::{AgentLease, EtcdStore, LeaseHolder, Store, StoreError};

use crate::config::AgentConfig;

/// How often an agent on sled tries again to register its Node after a
/// failed write (on etcd the heartbeat does).
pub const SLED_RETRY: Duration = Duration::from_secs(5);

/// How long the status write and the lease release may take when the
/// agent stops.
const STOP_BUDGET: Duration = Duration::from_secs(2);

/// How long registration at start waits for the driver's accelerator
/// (a cached answer comes at once; a first detection boots a probe, and
/// is written when it ends).
const ACCEL_AT_START: Duration = Duration::from_millis(50);

/// The note source of what this module records.
const SOURCE: &str = "vmctl-agent";

/// The apply source of the Node (the same every time, so that a restart
/// with the same labels changes nothing).
const APPLIED_BY: &str = "vmctl-agent (node registration)";

/// What the host has, measured now: CPUs the agent may use
/// (`std::thread::available_parallelism`: online CPUs within its affinity
/// and cgroup quota), total memory (`/proc/meminfo` `MemTotal`; 0 where
/// there is none) and free space of `data_dir`'s filesystem (what an
/// unprivileged user may use, `statvfs` `f_bavail`; 0 when it cannot be
/// read).
pub fn capacity(data_dir: &Path) -> NodeResources {
    let vcpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_total_kib(&t))
        .map_or(0, |kib| kib / 1024);
    // `allow`, not `expect`: the casts are needed where these are 32-bit.
    #[allow(
        clippy::unnecessary_cast,
        reason = "fsblkcnt_t and c_ulong are u64 on 64-bit Linux only"
    )]
    let disk_gib = nix::sys::statvfs::statvfs(data_dir).map_or(0, |s| {
        (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64) >> 30
    });
    NodeResources {
        vcpus,
        memory_mib,
        disk_gib,
    }
}

/// How many vCPUs and MiB of memory VMs may be given per CPU and MiB of
/// the host: the node's `allocatable` is its capacity times these, as
/// OpenStack Nova's `cpu_allocation_ratio` (default 16.0) and
/// `ram_allocation_ratio` (here 1.0: memory is not overcommitted unless
/// asked). Set by `VMCTL_CPU_ALLOCATION_RATIO` and
/// `VMCTL_MEMORY_ALLOCATION_RATIO` (positive numbers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllocationRatios {
    /// vCPUs per host CPU.
    pub cpu: f64,
    /// MiB of VM memory per MiB of host memory.
    pub memory: f64,
}

impl Default for AllocationRatios {
    fn default() -> Self {
        AllocationRatios {
            cpu: 16.0,
            memory: 1.0,
        }
    }
}

impl AllocationRatios {
    /// The ratios from the environment (see the type's docs).
    ///
    /// Errors: a message naming the variable when one is set but not a
    /// positive number.
    pub fn from_env() -> Result<Self, String> {
        let mut r = AllocationRatios::default();
        for (var, slot) in [
            ("VMCTL_CPU_ALLOCATION_RATIO", &mut r.cpu),
            ("VMCTL_MEMORY_ALLOCATION_RATIO", &mut r.memory),
        ] {
            if let Ok(v) = std::env::var(var) {
                match v.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 0.0 => *slot = x,
                    _ => {
                        return Err(format!(
                            "{var}={v:?} is not a positive number (e.g. 16 or 1.5)"
                        ));
                    }
                }
            }
        }
        Ok(r)
    }

    /// `capacity` times these ratios (rounded down).
    pub fn allocatable(&self, capacity: NodeResources) -> NodeResources {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "ratios are positive and the products far below u64::MAX"
        )]
        let times = |x: u64, r: f64| (x as f64 * r).floor() as u64;
        NodeResources {
            vcpus: u32::try_from(times(capacity.vcpus.into(), self.cpu)).unwrap_or(u32::MAX),
            memory_mib: times(capacity.memory_mib, self.memory),
            disk_gib: capacity.disk_gib,
        }
    }
}

/// `MemTotal` of `/proc/meminfo`'s text, in KiB.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// This agent's Node and what keeps it current; see the module docs.
#[derive(Debug)]
pub struct NodeAgent {
    store: Arc<dyn Store>,
    /// The etcd store, on etcd (its node lease).
    etcd: Option<EtcdStore>,
    hypervisor: Arc<dyn Hypervisor>,
    name: String,
    labels: BTreeMap<String, String>,
    data_dir: PathBuf,
    socket: String,
    /// `IP:PORT` of the TLS listener (`--listen`), if any.
    tcp: Option<String>,
    driver: String,
    /// The node lease's TTL (etcd).
    ttl: Duration,
    /// This agent, as the node lease's holder.
    me: LeaseHolder,
    /// The node lease, while held (etcd).
    lease: Option<AgentLease>,
    /// The node lease's fence while this agent surely holds it (its
    /// node's controllers write through it; `crate::lease::run_per_fence`),
    /// `None` once it may expire.
    fence: watch::Sender<Option<vmctl_store::Fence>>,
    /// Allocatable = capacity × these.
    ratios: AllocationRatios,
    /// The last holder of the node lease this agent warned about.
    warned: Option<LeaseHolder>,
    accelerator: Option<String>,
    /// The Node as this agent last wrote or read it.
    current: Option<Object>,
    /// Whether a status of this run was written.
    registered: bool,
    /// Whether the last write failed (its error was logged as a warning;
    /// the next ones only at debug level until one succeeds).
    failing: bool,
}

impl NodeAgent {
    /// The Node of the agent configured by `cfg`, kept in `store` (`etcd`:
    /// the same store as such, for the node lease), `me` holding the lease,
    /// its allocatable its capacity times `ratios`.
    pub fn new(
        cfg: &AgentConfig,
        store: Arc<dyn Store>,
        etcd: Option<EtcdStore>,
        hypervisor: Arc<dyn Hypervisor>,
        me: LeaseHolder,
        ratios: AllocationRatios,
    ) -> Self {
        NodeAgent {
            store,
            etcd,
            hypervisor,
            name: cfg.node_name.clone(),
            labels: cfg.node_labels.clone(),
            data_dir: cfg.data_dir.clone(),
            socket: cfg.socket.display().to_string(),
            tcp: cfg.door.as_ref().map(|d| d.listen.to_string()),
            driver: cfg.driver.clone(),
            ttl: cfg.node_lease_ttl,
            me,
            lease: None,
            fence: watch::channel(None).0,
            ratios,
            warned: None,
            accelerator: None,
            current: None,
            registered: false,
            failing: false,
        }
    }

    /// The node lease's fence while this agent surely holds it (`None`:
    /// not held, or it may expire within a fifth of its TTL); see
    /// `crate::lease::run_per_fence`.
    pub fn fences(&self) -> watch::Receiver<Option<vmctl_store::Fence>> {
        self.fence.subscribe()
    }

    /// Publishes the node lease's fence as it stands now.
    fn publish_fence(&self) {
        let now = std::time::Instant::now();
        let f = self
            .lease
            .as_ref()
            .filter(|l| l.expires() > now + l.ttl() / 5)
            .map(AgentLease::fence);
        self.fence.send_if_modified(|old| {
            let changed = *old != f;
            *old = f;
            changed
        });
    }

    /// When the published fence must be withdrawn unless the lease is kept
    /// alive before (far away when none is published).
    fn fence_deadline(&self) -> tokio::time::Instant {
        match (&self.lease, self.fence.borrow().is_some()) {
            (Some(l), true) => (l.expires() - l.ttl() / 5).into(),
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }

    fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(Kind::Node, self.name.clone())
    }

    /// Registers the Node before the agent serves: on etcd takes the node
    /// lease first. `Err(holder)` when another live agent holds that node
    /// name's lease (the agent must not start). etcd unreachable or a
    /// failed write is logged, and left to [`NodeAgent::run`].
    pub async fn start(&mut self) -> Result<(), LeaseHolder> {
        if let Some(etcd) = self.etcd.clone() {
            match crate::lease::take_node_lease(&etcd, &self.name, &self.me, self.ttl).await {
                Ok(Ok(l)) => {
                    self.lease = Some(l);
                    self.publish_fence();
                }
                Ok(Err(holder)) => return Err(holder),
                Err(e) => {
                    tracing::warn!(
                        node = %self.name,
                        error = %vmctl_api::error_chain(&e),
                        "etcd is not reachable yet: this agent registers its Node once it is"
                    );
                    return Ok(());
                }
            }
        }
        if let Ok(a) = tokio::time::timeout(ACCEL_AT_START, self.hypervisor.accelerator()).await {
            self.accelerator = a;
        }
        self.post_ready().await;
        Ok(())
    }

    /// Keeps the Node current until `stopped` turns true, then marks it
    /// stopped and gives the node lease up (see the module docs).
    pub async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let hv = self.hypervisor.clone();
        let accel = async move { hv.accelerator().await };
        tokio::pin!(accel);
        let mut accel_known = self.accelerator.is_some();
        loop {
            let beat = match (&self.etcd, self.registered) {
                (Some(_), _) => Some(self.ttl / 3),
                (None, false) => Some(SLED_RETRY),
                (None, true) => None,
            };
            let tick = async {
                match beat {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let deadline = self.fence_deadline();
            tokio::select! {
                // A sleep, made anew each turn: cancel-safe.
                () = tick => self.beat().await,
                // The lease may expire soon: the node's controllers stop.
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        node = %self.name,
                        "the node lease was not kept alive and may expire: this node's \
                         controllers stop until it is"
                    );
                    self.publish_fence();
                }
                // Polled to its end across turns (pinned), never dropped
                // half-way while the loop runs.
                a = &mut accel, if !accel_known => {
                    accel_known = true;
                    if a != self.accelerator {
                        self.accelerator = a;
                        // On etcd the next beat writes it.
                        if self.etcd.is_none() {
                            self.post_ready().await;
                        }
                    }
                }
                // changed() is cancel-safe.
                r = stopped.changed() => {
                    if r.is_err() || *stopped.borrow() {
                        break;
                    }
                }
            }
        }
        self.stop().await;
    }

    /// One heartbeat: on etcd keeps the node lease (or takes it again),
    /// then writes the status.
    async fn beat(&mut self) {
        if self.etcd.is_some() {
            let kept = self.keep_lease().await;
            self.publish_fence();
            if !kept {
                return;
            }
        }
        self.post_ready().await;
    }

    /// Keeps the node lease alive, or takes it (again); whether this agent
    /// may write its Node's status (it holds the lease, or etcd did not
    /// answer, in which case the write fails too and is retried).
    async fn keep_lease(&mut self) -> bool {
        let Some(etcd) = self.etcd.clone() else {
            return true;
        };
        if let Some(l) = &mut self.lease {
            match tokio::time::timeout(self.ttl / 3, l.keep_alive()).await {
                Ok(Ok(true)) => return true,
                Ok(Ok(false)) => {
                    tracing::warn!(
                        node = %self.name,
                        "the node lease expired or was revoked; taking it again"
                    );
                    self.lease = None;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %vmctl_api::error_chain(&e), "node lease keep-alive failed");
                    return true;
                }
                Err(_) => return true,
            }
        }
        match crate::lease::take_node_lease(&etcd, &self.name, &self.me, self.ttl).await {
            Ok(Ok(l)) => {
                self.lease = Some(l);
                self.warned = None;
                true
            }
            Ok(Err(holder)) => {
                if self.warned.as_ref() != Some(&holder) {
                    tracing::error!(
                        node = %self.name,
                        %holder,
                        "another agent runs as this node (it holds the node lease): this agent \
                         does not write the Node's status; give one of them another --node-name"
                    );
                }
                self.warned = Some(holder);
                false
            }
            Err(e) => {
                tracing::debug!(error = %vmctl_api::error_chain(&e), "cannot take the node lease yet");
                false
            }
        }
    }

    /// The `Ready=True` condition this agent posts while it runs.
    fn ready(&self) -> Condition {
        let message = match &self.etcd {
            Some(_) => format!(
                "the agent posts this node's status every {:.1} s (node lease TTL {} s)",
                self.ttl.as_secs_f64() / 3.0,
                self.ttl.as_secs()
            ),
            None => "the agent runs (store sled: it posts this node's status when it starts and \
                     stops)"
                .to_owned(),
        };
        vmctl_controllers::conditions::condition("Ready", true, REASON_AGENT_READY, message, 0)
    }

    /// Posts `Ready=True`, logging a failure (retried at the next beat;
    /// a warning for the first of a row, so that an outage does not fill
    /// the log).
    async fn post_ready(&mut self) {
        match self.post(self.ready()).await {
            Ok(()) => {
                if self.failing {
                    tracing::info!(node = %self.name, "this node's status is written again");
                }
                self.registered = true;
                self.failing = false;
            }
            Err(e) if self.failing => tracing::debug!(
                node = %self.name,
                error = %vmctl_api::error_chain(&e),
                "cannot write this node's status"
            ),
            Err(e) => {
                self.failing = true;
                tracing::warn!(
                    node = %self.name,
                    error = %vmctl_api::error_chain(&e),
                    "cannot write this node's status; trying again at each heartbeat"
                );
            }
        }
    }

    /// Marks the Node stopped and gives the lease up, each within
    /// [`STOP_BUDGET`]. On etcd only while holding the lease (else the
    /// name is another agent's).
    async fn stop(mut self) {
        if self.etcd.is_some() && self.lease.is_none() {
            return;
        }
        let cond = vmctl_controllers::conditions::condition(
            "Ready",
            false,
            REASON_AGENT_STOPPED,
            format!(
                "the agent stopped at {}",
                Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            0,
        );
        match tokio::time::timeout(STOP_BUDGET, self.post(cond)).await {
            Ok(Ok(())) => tracing::info!(node = %self.name, "node marked stopped"),
            Ok(Err(e)) => tracing::warn!(
                error = %vmctl_api::error_chain(&e),
                "cannot mark this node stopped"
            ),
            Err(_) => tracing::warn!("cannot mark this node stopped: the store did not answer"),
        }
        self.fence.send_replace(None);
        if let Some(l) = self.lease.take() {
            // Revoked, so that a next agent of this name need not wait.
            let _ = tokio::time::timeout(STOP_BUDGET, l.release()).await;
        }
    }

    /// Creates the Node, or re-applies its labels.
    async fn apply(&self) -> Result<Object, StoreError> {
        let mut node = Node::new(self.name.clone(), NodeSpec::default());
        node.metadata.labels = self.labels.clone();
        let source = ApplySource {
            file: None,
            applied_by: Some(APPLIED_BY.into()),
        };
        let w = self
            .store
            .apply(node.to_object(), Some(source), None)
            .await?;
        w.object
            .ok_or_else(|| StoreError::NotFound(self.object_ref()))
    }

    /// Writes the status with `ready` as its `Ready` condition, the
    /// capacity as measured now and a new heartbeat; creates the Node (or
    /// re-applies its labels) first when needed. A concurrent write (the
    /// lifecycle controller's) is read again and written over, a few
    /// times.
    async fn post(&mut self, mut ready: Condition) -> Result<(), StoreError> {
        let r = self.object_ref();
        for _ in 0..3 {
            let cur = match self.current.take() {
                Some(o) => o,
                None => match self.store.get(&r).await? {
                    Some(o)
                        if o.metadata.labels == self.labels
                            && o.metadata.deletion_timestamp.is_none() =>
                    {
                        o
                    }
                    _ => self.apply().await?,
                },
            };
            let old: NodeStatus = cur
                .status
                .clone()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            let was_unknown = old.ready().is_some_and(|c| {
                c.status == ConditionStatus::False && c.reason == REASON_STATUS_UNKNOWN
            });
            let now = Utc::now();
            let capacity = capacity(&self.data_dir);
            ready.observed_generation = cur.metadata.generation;
            let mut status = NodeStatus {
                conditions: old.conditions.clone(),
                observed_generation: cur.metadata.generation,
                capacity,
                allocatable: self.ratios.allocatable(capacity),
                accelerator: self.accelerator.clone(),
                driver: self.driver.clone(),
                address: NodeAddress {
                    socket: self.socket.clone(),
                    tcp: self.tcp.clone(),
                },
                agent_version: env!("CARGO_PKG_VERSION").into(),
                last_heartbeat_time: Some(now),
                lease_ttl_seconds: self.etcd.as_ref().map(|_| self.ttl.as_secs()),
            };
            vmctl_api::set_condition(&mut status.conditions, ready.clone(), now);
            let value = serde_json::to_value(&status).expect("statuses always serialise");
            match self
                .store
                .update_status(&r, value, Some(cur.metadata.resource_version))
                .await
            {
                Ok(w) => {
                    self.current = w.object;
                    if was_unknown && ready.status == ConditionStatus::True {
                        self.note_back(&old).await;
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            object: r,
            expected: 0,
            actual: 0,
        })
    }

    /// Records that the Node, marked `NodeStatusUnknown` by another agent,
    /// is Ready again.
    async fn note_back(&self, old: &NodeStatus) {
        let was = old.ready().map(|c| c.message.clone()).unwrap_or_default();
        let note = Note {
            type_: NoteType::Normal,
            reason: "NodeReady".into(),
            message: format!(
                "Node {} is Ready again: its agent posts its status (it was not Ready: {was})",
                self.name
            ),
            object: self.object_ref(),
            source: Some(SOURCE.into()),
        };
        if let Err(e) = self.store.record_note(note).await {
            tracing::debug!(error = %e, "cannot record the NodeReady note");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_kib() {
        let text = "MemTotal:        8048440 kB\nMemFree:          123 kB\n";
        assert_eq!(mem_total_kib(text), Some(8_048_440));
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn capacity_measures_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let c = capacity(dir.path());
        assert_eq!(
            c.vcpus as usize,
            std::thread::available_parallelism().unwrap().get()
        );
        if cfg!(target_os = "linux") {
            assert!(c.memory_mib > 0, "{c:?}");
        }
    }
}
