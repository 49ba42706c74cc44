//! The scheduler: binds each unbound VM of a cluster to a node (issue 17
//! item 2), as Kubernetes' kube-scheduler binds Pods.
//!
//! ```text
//!   VM without status.nodeName ──▶ filter the nodes ──▶ none left ──▶ Scheduled=False
//!   (not being deleted)              Ready, nodeName        │             Unschedulable, "0/3 nodes
//!                                    pin, nodeSelector,     │             available: 2 insufficient
//!                                    vCPUs, memory          │             memory, 1 did not match …"
//!                                                           ▼             (tried again when nodes change)
//!                                    score: least allocated (spread) ──▶ binding written with a
//!                                    ties: fewest VMs, then name         compare-and-swap:
//!                                                                        status.nodeName, Scheduled=True
//! ```
//!
//! * One scheduler is active in a cluster: the one of the agent that holds
//!   the etcd prefix's agent lease (the election, `vmctl-agent`'s `lease`
//!   module); its writes are fenced by that lease.
//! * It keeps its own view of Nodes and VMs, from one list and then the
//!   watch (as an informer does), so a binding costs one store write and
//!   no read. Decisions are made one VM at a time against that view (what
//!   it bound is counted at once); up to [`WRITES_IN_FLIGHT`] binding
//!   writes are sent together.
//! * A binding is a status write expecting the VM's resourceVersion: a VM
//!   changed meanwhile (its spec applied again, deleted) is not bound on a
//!   stale view; it is read again and decided again.
//! * A VM's request is its `vcpus` and `memoryMib`; a node's room is its
//!   `status.allocatable` less the requests of the VMs bound to it (being
//!   deleted or not, until they are gone).
//! * The binding sets no `observedGeneration`: the bound node's VM
//!   controller hears of it by that (see the VM controller's
//!   `status_triggers`).
//! * A VM deleted before any node took it has no instance anywhere: the
//!   scheduler releases its teardown finalizer (`vmctl.dev/vm-teardown`,
//!   set when it was created), so that it goes at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tokio::sync::watch;
use vmctl_api::{
    Condition, Kind, Node, NodeStatus, NoteType, Object, ObjectRef, VirtualMachine,
    VirtualMachineStatus, set_condition,
};
use vmctl_store::{Change, Event, Store, StoreError};

use crate::conditions::{condition, would_change};

/// The VM condition the scheduler sets (Kubernetes' `PodScheduled`).
pub const SCHEDULED: &str = "Scheduled";

/// Reason of `Scheduled=True`.
pub const REASON_SCHEDULED: &str = "Scheduled";

/// Reason of `Scheduled=False`: no node can take the VM now.
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";

/// The note reason when a VM cannot be placed (Kubernetes' event reason).
pub const REASON_FAILED_SCHEDULING: &str = "FailedScheduling";

/// Binding writes sent at once.
pub const WRITES_IN_FLIGHT: usize = 32;

/// The VM controller's teardown finalizer, which the scheduler releases
/// for a VM deleted before it was placed.
const VM_FINALIZER: &str = crate::vm::FINALIZER;

/// The note source of the scheduler.
const SOURCE: &str = "scheduler";

/// How often unschedulable VMs are tried again even when nothing seen
/// changed (a safety net: node changes already trigger a pass).
const RETRY_UNSCHEDULABLE: Duration = Duration::from_secs(30);

/// What the scheduler needs of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `Ready=True`.
    pub ready: bool,
    /// `status.allocatable.vcpus`.
    pub vcpus: u64,
    /// `status.allocatable.memoryMib`, MiB.
    pub memory_mib: u64,
    /// On etcd: when its heartbeat is overdue (its last heartbeat plus its
    /// lease TTL + 2 s). A node past it is not chosen though still marked
    /// Ready: its agent is gone, and the node lifecycle controller is
    /// about to say so.
    pub fresh_until: Option<chrono::DateTime<Utc>>,
}

impl NodeInfo {
    /// What the scheduler needs of Node `obj`.
    pub fn of(obj: &Object) -> Option<NodeInfo> {
        let node = Node::from_object(obj).ok()?;
        Some(NodeInfo::from_status(
            node.metadata.labels.clone(),
            &node.status.unwrap_or_default(),
        ))
    }

    /// What the scheduler needs of a Node labelled `labels` whose status
    /// is `status`.
    pub fn from_status(labels: BTreeMap<String, String>, status: &NodeStatus) -> NodeInfo {
        NodeInfo {
            labels,
            ready: status.is_ready(),
            vcpus: status.allocatable.vcpus.into(),
            memory_mib: status.allocatable.memory_mib,
            fresh_until: match (status.lease_ttl_seconds, status.last_heartbeat_time) {
                (Some(_), Some(t)) => chrono::Duration::from_std(status.heartbeat_deadline())
                    .ok()
                    .map(|d| t + d),
                _ => None,
            },
        }
    }
}

/// What a VM asks of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Labels the node must carry.
    pub selector: BTreeMap<String, String>,
    /// The node it must run on (`spec.nodeName`).
    pub pin: Option<String>,
}

/// What the VMs bound to a node ask in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// VMs.
    pub vms: u64,
}

impl Usage {
    fn add(&mut self, r: &Request) {
        self.vcpus += r.vcpus;
        self.memory_mib += r.memory_mib;
        self.vms += 1;
    }

    fn remove(&mut self, r: &Request) {
        self.vcpus = self.vcpus.saturating_sub(r.vcpus);
        self.memory_mib = self.memory_mib.saturating_sub(r.memory_mib);
        self.vms = self.vms.saturating_sub(1);
    }
}

/// Where a VM goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Bind it to this node.
    Bind(String),
    /// No node can take it: why, per node, in the manner of
    /// kube-scheduler ("0/3 nodes available: 2 insufficient memory, 1 did
    /// not match the node selector").
    Unschedulable(String),
}

/// Why a node cannot take a VM (the first filter that fails, in this
/// order).
fn refusal(
    req: &Request,
    name: &str,
    node: &NodeInfo,
    used: Usage,
    now: chrono::DateTime<Utc>,
) -> Option<&'static str> {
    if !node.ready || node.fresh_until.is_some_and(|t| now > t) {
        return Some("not Ready");
    }
    if req.pin.as_deref().is_some_and(|p| p != name) {
        return Some("not the VM's node (spec.nodeName)");
    }
    if req
        .selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Some("did not match the node selector");
    }
    if used.vcpus + req.vcpus > node.vcpus {
        return Some("insufficient vCPUs");
    }
    if used.memory_mib + req.memory_mib > node.memory_mib {
        return Some("insufficient memory");
    }
    None
}

/// How allocated `node` would be with `req` on it: the larger of its vCPU
/// and memory fractions, in parts per million (lower is better).
fn allocated_ppm(req: &Request, node: &NodeInfo, used: Usage) -> u64 {
    let frac = |u: u64, r: u64, cap: u64| (u + r).saturating_mul(1_000_000) / cap.max(1);
    frac(used.vcpus, req.vcpus, node.vcpus).max(frac(
        used.memory_mib,
        req.memory_mib,
        node.memory_mib,
    ))
}

/// Chooses a node for `req` among `nodes`, given what is bound to each
/// (`used`): of the nodes that can take it (at `now`: a node whose
/// heartbeat is overdue cannot), the least allocated once it is there
/// (spread), then the one with fewest VMs, then by name. Pure.
pub fn choose(
    req: &Request,
    nodes: &BTreeMap<String, NodeInfo>,
    used: &HashMap<String, Usage>,
    now: chrono::DateTime<Utc>,
) -> Decision {
    let mut refused: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut best: Option<((u64, u64), &str)> = None;
    for (name, node) in nodes {
        let u = used.get(name).copied().unwrap_or_default();
        match refusal(req, name, node, u, now) {
            Some(why) => *refused.entry(why).or_default() += 1,
            None => {
                let score = (allocated_ppm(req, node, u), u.vms);
                if best.is_none_or(|(b, _)| score < b) {
                    best = Some((score, name));
                }
            }
        }
    }
    if let Some((_, name)) = best {
        return Decision::Bind(name.to_owned());
    }
    if let Some(pin) = req.pin.as_deref()
        && !nodes.contains_key(pin)
    {
        return Decision::Unschedulable(format!(
            "0/{} nodes available: no node is named {pin} (spec.nodeName); `vmctl get nodes` \
             lists them",
            nodes.len()
        ));
    }
    if nodes.is_empty() {
        return Decision::Unschedulable(
            "0/0 nodes available: no node is registered (start an agent on etcd)".into(),
        );
    }
    let mut reasons: Vec<(&str, usize)> = refused.into_iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let list: Vec<String> = reasons.iter().map(|(w, n)| format!("{n} {w}")).collect();
    Decision::Unschedulable(format!(
        "0/{} nodes available: {}",
        nodes.len(),
        list.join(", ")
    ))
}

/// The scheduler's view of one VM.
#[derive(Debug, Clone)]
struct VmEntry {
    rv: u64,
    request: Request,
    deleting: bool,
    status: Value,
    /// `status.nodeName`.
    node: Option<String>,
    /// The spec could not be read: never bound.
    invalid: bool,
    /// `metadata.finalizers`.
    finalizers: Vec<String>,
}

impl VmEntry {
    fn of(obj: &Object) -> VmEntry {
        let mut e = VmEntry {
            rv: obj.metadata.resource_version,
            request: Request::default(),
            deleting: obj.metadata.deletion_timestamp.is_some(),
            status: obj.status.clone().unwrap_or(Value::Null),
            node: None,
            invalid: false,
            finalizers: obj.metadata.finalizers.clone(),
        };
        e.set_spec(obj);
        e.set_status(e.status.clone());
        e
    }

    fn set_spec(&mut self, obj: &Object) {
        self.deleting = obj.metadata.deletion_timestamp.is_some();
        self.finalizers = obj.metadata.finalizers.clone();
        match VirtualMachine::from_object(&Object {
            status: None,
            ..obj.clone()
        }) {
            Ok(vm) => {
                self.invalid = false;
                self.request = Request {
                    vcpus: vm.spec.vcpus.into(),
                    memory_mib: vm.spec.memory_mib,
                    selector: vm.spec.node_selector,
                    pin: vm.spec.node_name,
                };
            }
            Err(_) => self.invalid = true,
        }
    }

    fn set_status(&mut self, status: Value) {
        self.node = status
            .get("nodeName")
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.status = status;
    }

    fn pending(&self) -> bool {
        self.node.is_none() && !self.deleting && !self.invalid
    }

    /// Deleted before any node took it: nobody else will release its
    /// teardown finalizer (it has no instance anywhere to tear down).
    fn unplaced_deleted(&self) -> bool {
        self.node.is_none() && self.deleting && self.finalizers.iter().any(|f| f == VM_FINALIZER)
    }
}

/// The scheduler's view of the cluster.
#[derive(Debug, Default)]
struct View {
    nodes: BTreeMap<String, NodeInfo>,
    vms: BTreeMap<String, VmEntry>,
    used: HashMap<String, Usage>,
    /// Something changed that may let a pending VM be placed.
    dirty: bool,
}

impl View {
    fn from_listing(objects: &[Object]) -> View {
        let mut v = View {
            dirty: true,
            ..View::default()
        };
        for obj in objects {
            match obj.kind {
                Kind::Node => {
                    if let Some(n) = NodeInfo::of(obj) {
                        v.nodes.insert(obj.metadata.name.clone(), n);
                    }
                }
                Kind::VirtualMachine => {
                    let e = VmEntry::of(obj);
                    v.count(&e, true);
                    v.vms.insert(obj.metadata.name.clone(), e);
                }
                _ => {}
            }
        }
        v
    }

    /// Counts (or uncounts) `e`'s request on its node.
    fn count(&mut self, e: &VmEntry, add: bool) {
        if let Some(n) = &e.node {
            let u = self.used.entry(n.clone()).or_default();
            if add {
                u.add(&e.request);
            } else {
                u.remove(&e.request);
            }
        }
    }

    /// Replaces (or removes) VM `name`'s entry, keeping the counts.
    fn replace_vm(&mut self, name: &str, new: Option<VmEntry>) {
        if let Some(old) = self.vms.remove(name) {
            self.count(&old, false);
        }
        if let Some(e) = new {
            if e.pending() || e.unplaced_deleted() {
                self.dirty = true;
            }
            self.count(&e, true);
            self.vms.insert(name.to_owned(), e);
        } else {
            self.dirty = true;
        }
    }

    /// Folds one event into the view.
    fn observe(&mut self, ev: &Event) {
        let name = ev.object.name.as_str();
        match ev.object.kind {
            Kind::Node => {
                let before = self.nodes.get(name).cloned();
                match &ev.change {
                    Change::Applied { object, .. } => {
                        // Labels live in the metadata; the status is kept.
                        if let Some(n) = self.nodes.get_mut(name) {
                            n.labels = object.metadata.labels.clone();
                        } else if let Some(n) = NodeInfo::of(object) {
                            self.nodes.insert(name.to_owned(), n);
                        }
                    }
                    Change::StatusUpdated { status } => {
                        // Labels live in the metadata: kept from before.
                        if let Ok(st) = serde_json::from_value::<NodeStatus>(status.clone()) {
                            let labels = before.as_ref().map(|n| n.labels.clone());
                            let n = NodeInfo::from_status(labels.unwrap_or_default(), &st);
                            self.nodes.insert(name.to_owned(), n);
                        }
                    }
                    Change::Deleted => {
                        self.nodes.remove(name);
                    }
                    _ => {}
                }
                if self.nodes.get(name) != before.as_ref() {
                    self.dirty = true;
                }
            }
            Kind::VirtualMachine => {
                let old = self.vms.get(name).cloned();
                let new = match (&ev.change, old) {
                    (Change::Deleted, _) => None,
                    (Change::Applied { object, .. }, old) => {
                        let mut e = match old {
                            Some(e) => e,
                            None => VmEntry::of(object),
                        };
                        e.set_spec(object);
                        e.rv = e.rv.max(ev.seq);
                        Some(e)
                    }
                    (Change::StatusUpdated { status }, Some(mut e)) => {
                        e.set_status(status.clone());
                        e.rv = e.rv.max(ev.seq);
                        Some(e)
                    }
                    (Change::DeletionRequested { .. }, Some(mut e)) => {
                        e.deleting = true;
                        e.rv = e.rv.max(ev.seq);
                        Some(e)
                    }
                    (Change::FinalizersSet { finalizers }, Some(mut e)) => {
                        e.finalizers = finalizers.clone();
                        e.rv = e.rv.max(ev.seq);
                        Some(e)
                    }
                    (_, old) => old,
                };
                self.replace_vm(name, new);
            }
            _ => {}
        }
    }
}

/// The status that binds a VM to `node`, from its current `status`.
fn bound_status(status: &Value, node: &str, generation: u64) -> Value {
    let mut s: VirtualMachineStatus = serde_json::from_value(status.clone()).unwrap_or_default();
    s.node_name = Some(node.to_owned());
    let c = condition(
        SCHEDULED,
        true,
        REASON_SCHEDULED,
        format!("bound to node {node} by the scheduler"),
        generation,
    );
    set_condition(&mut s.conditions, c, Utc::now());
    serde_json::to_value(s).expect("statuses always serialise")
}

/// `status` with `Scheduled=False` (`Unschedulable`, `message`), or
/// `None` when it says so already.
fn unschedulable_status(status: &Value, message: &str) -> Option<Value> {
    let mut s: VirtualMachineStatus = serde_json::from_value(status.clone()).unwrap_or_default();
    let c: Condition = condition(SCHEDULED, false, REASON_UNSCHEDULABLE, message, 0);
    if !would_change(&s.conditions, &c) {
        return None;
    }
    set_condition(&mut s.conditions, c, Utc::now());
    Some(serde_json::to_value(s).expect("statuses always serialise"))
}

/// Whether `status` says `Scheduled=False`.
fn marked_unschedulable(status: &Value) -> bool {
    status
        .get("conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some(SCHEDULED)
                    && c.get("status").and_then(Value::as_str) == Some("False")
            })
        })
}

/// Runs the scheduler on `store` until `shutdown` turns true.
pub async fn run(store: Arc<dyn Store>, mut shutdown: watch::Receiver<bool>) {
    let metrics = crate::metrics::Metrics::global();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let listed = async {
            let listing = store.list(None).await?;
            let watch = store.watch(listing.resource_version).await?;
            Ok::<_, StoreError>((listing, watch))
        }
        .await;
        let (listing, mut watch) = match listed {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: list failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        let mut view = View::from_listing(&listing.objects);
        let mut retry = tokio::time::interval(RETRY_UNSCHEDULABLE);
        retry.tick().await;
        loop {
            if view.dirty {
                view.dirty = false;
                if pass(&store, &mut view).await {
                    // etcd unreachable, most likely: not at full speed.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                metrics.unschedulable.set(
                    i64::try_from(view.vms.values().filter(|e| e.pending()).count())
                        .unwrap_or(i64::MAX),
                );
            }
            tokio::select! {
                ev = watch.next() => match ev {
                    Ok(ev) => {
                        view.observe(&ev);
                        // Take what else is there before deciding.
                        while let Some(Ok(ev)) = futures::FutureExt::now_or_never(watch.next()) {
                            view.observe(&ev);
                        }
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "scheduler: watch ended; listing again");
                        break;
                    }
                },
                _ = retry.tick() => view.dirty = true,
                _ = shutdown.changed() => {
                    if *shutdown.borrow() || shutdown.has_changed().is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// One pass: decides every pending VM (by name) and writes the bindings
/// and the `Unschedulable` statuses. Whether a write failed.
async fn pass(store: &Arc<dyn Store>, view: &mut View) -> bool {
    let mut failed = false;
    let pending: Vec<String> = view
        .vms
        .iter()
        .filter(|(_, e)| e.pending())
        .map(|(n, _)| n.clone())
        .collect();
    // Deleted before placement: nothing to tear down anywhere.
    for (name, e) in view
        .vms
        .iter()
        .filter(|(_, e)| e.unplaced_deleted())
        .map(|(n, e)| (n.clone(), e.clone()))
        .collect::<Vec<_>>()
    {
        let r = ObjectRef::new(Kind::VirtualMachine, name.clone());
        let rest: Vec<String> = e
            .finalizers
            .iter()
            .filter(|f| *f != VM_FINALIZER)
            .cloned()
            .collect();
        match store.set_finalizers(&r, rest, Some(e.rv)).await {
            Ok(w) => {
                tracing::debug!(vm = %name, "deleted before placement: teardown finalizer released");
                view.replace_vm(&name, w.object.as_ref().map(VmEntry::of));
            }
            Err(err) => {
                failed = true;
                tracing::debug!(vm = %name, error = %err, "cannot release the finalizer yet");
                if let Ok(fresh) = store.get(&r).await {
                    view.replace_vm(&name, fresh.as_ref().map(VmEntry::of));
                }
            }
        }
    }
    let mut writes = Vec::new();
    let now = Utc::now();
    for name in pending {
        let e = view.vms[&name].clone();
        match choose(&e.request, &view.nodes, &view.used, now) {
            Decision::Bind(node) => {
                let status = bound_status(&e.status, &node, 0);
                // Counted at once, so that the next decision sees it.
                let mut bound = e.clone();
                bound.set_status(status.clone());
                view.replace_vm(&name, Some(bound));
                writes.push(Write::Bind {
                    name,
                    rv: e.rv,
                    status,
                    node,
                    before: Box::new(e),
                });
            }
            Decision::Unschedulable(message) => {
                if let Some(status) = unschedulable_status(&e.status, &message) {
                    writes.push(Write::Unschedulable {
                        name,
                        rv: e.rv,
                        status,
                        message,
                    });
                }
            }
        }
    }
    view.dirty = false;
    let results = futures::StreamExt::collect::<Vec<_>>(futures::StreamExt::buffer_unordered(
        futures::stream::iter(writes.into_iter().map(|w| {
            let store = store.clone();
            async move {
                let (name, rv, status) = match &w {
                    Write::Bind {
                        name, rv, status, ..
                    }
                    | Write::Unschedulable {
                        name, rv, status, ..
                    } => (name.clone(), *rv, status.clone()),
                };
                let r = ObjectRef::new(Kind::VirtualMachine, name);
                let res = store.update_status(&r, status, Some(rv)).await;
                (w, r, res)
            }
        })),
        WRITES_IN_FLIGHT,
    ))
    .await;
    let metrics = crate::metrics::Metrics::global();
    for (w, r, res) in results {
        match (w, res) {
            (Write::Bind { name, node, .. }, Ok(written)) => {
                metrics.bindings.inc();
                tracing::debug!(vm = %name, %node, "bound");
                if let Some(obj) = written.object {
                    view.replace_vm(&name, Some(VmEntry::of(&obj)));
                }
            }
            (Write::Unschedulable { name, message, .. }, Ok(written)) => {
                let msg = format!("VM {name} cannot be placed: {message}");
                note(store, &r, &msg).await;
                if let Some(obj) = written.object {
                    view.replace_vm(&name, Some(VmEntry::of(&obj)));
                    // Not dirty for its own write.
                    view.dirty = false;
                }
            }
            (w, Err(e)) => {
                failed = true;
                let (name, before) = match w {
                    Write::Bind { name, before, .. } => (name, Some(*before)),
                    Write::Unschedulable { name, .. } => (name, None),
                };
                tracing::debug!(vm = %name, error = %e, "scheduler write lost; reading the VM again");
                // Read again: a changed VM is decided again on what it is
                // now; one that cannot be read is as it was.
                match store.get(&r).await {
                    Ok(fresh) => view.replace_vm(&name, fresh.as_ref().map(VmEntry::of)),
                    Err(_) => {
                        if let Some(b) = before {
                            view.replace_vm(&name, Some(b));
                        }
                    }
                }
                view.dirty = true;
            }
        }
    }
    // A pass that only found VMs that cannot be placed is not redone until
    // something changes.
    if view
        .vms
        .values()
        .filter(|e| e.pending())
        .all(|e| marked_unschedulable(&e.status))
    {
        view.dirty = false;
    }
    failed
}

/// Records a Warning note `FailedScheduling` about `r`.
async fn note(store: &Arc<dyn Store>, r: &ObjectRef, message: &str) {
    let note = vmctl_api::Note {
        type_: NoteType::Warning,
        reason: REASON_FAILED_SCHEDULING.into(),
        message: message.to_owned(),
        object: r.clone(),
        source: Some(SOURCE.into()),
    };
    if let Err(e) = store.record_note(note).await {
        tracing::warn!(error = %e, "cannot record note");
    }
}

/// One write of a pass.
#[derive(Debug)]
enum Write {
    Bind {
        name: String,
        rv: u64,
        status: Value,
        node: String,
        /// The VM's entry before this binding was counted.
        before: Box<VmEntry>,
    },
    Unschedulable {
        name: String,
        rv: u64,
        status: Value,
        message: String,
    },
}

#[cfg(test)]
mod tests;
