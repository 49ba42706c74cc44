//! The controllers of a vmctl agent.
//!
//! Four controllers bring the world to what the store's objects ask for:
//!
//! ```text
//!   Image ──Ready──▶ VirtualMachine ──Ready──▶ Provision
//!   (ImageFetcher)   (Hypervisor)   │          (Provisioner)
//!                                   └─disks──▶ Snapshot
//!                                              (Hypervisor)
//! ```
//!
//! A fifth, the node lifecycle controller ([`node`]), marks Nodes whose
//! agent stopped posting its heartbeat not Ready.
//!
//! Each is a [`runtime::Reconciler`] run by a kube-runtime style
//! [`runtime::Controller`]: list then watch the store, a queue that never
//! runs one object twice at once, bounded concurrency, exponential backoff
//! with jitter, periodic resync. Drivers are traits ([`drivers`]); the
//! in-memory fake ([`drivers::fake`]) runs the whole control plane without
//! a hypervisor.
//!
//! # Entry point
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn vmctl_store::Store>) {
//! use vmctl_controllers::{Drivers, RuntimeConfig, run};
//! use vmctl_controllers::drivers::fake::FakeConfig;
//!
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! let drivers = Drivers::fake(FakeConfig::from_env().unwrap());
//! let task = tokio::spawn(run(store, drivers, RuntimeConfig::default(), shutdown));
//! // … later:
//! stop.send(true).unwrap();
//! task.await.unwrap().unwrap();
//! # }
//! ```

pub mod address;
pub mod conditions;
pub mod context;
pub mod drivers;
pub mod error;
pub mod image;
pub mod images;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod provision;
pub mod runtime;
pub mod scheduler;
pub mod seed;
pub mod snapshot;
pub mod vm;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vmctl_store::Store;

pub use context::Context;
pub use drivers::fake::{FakeConfig, FakeWorld};
use drivers::{Hypervisor, ImageFetcher, Provisioner};
pub use error::Error;
use runtime::controller::ControllerConfig;
pub use runtime::{Action, BackoffPolicy, Controller, Reconciler};

/// The drivers the controllers act through.
#[derive(Debug, Clone)]
pub struct Drivers {
    /// Runs VM instances.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Makes images available locally.
    pub images: Arc<dyn ImageFetcher>,
    /// Runs provisioning steps.
    pub provisioner: Arc<dyn Provisioner>,
}

impl Drivers {
    /// The in-memory fake drivers, sharing a new [`FakeWorld`]. Use
    /// [`FakeWorld::drivers`] to keep a handle on the world.
    pub fn fake(config: FakeConfig) -> Self {
        FakeWorld::new(config).drivers()
    }
}

/// Which agent the controllers act for: its node (as Kubernetes names the
/// machine a kubelet runs on; issue 17's `Node`) and data directory. A VM's
/// instance lives under the agent that made it (`status.nodeName`,
/// `status.runtime.workDir`); the VM controller acts only on instances of
/// its own node and data directory, and reports the others `NodeLost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node's name: the agent's `--node-name`, by default the host
    /// name.
    pub name: String,
    /// The agent's data directory, for messages (`None`: not known, e.g.
    /// in tests without an agent). Which work dirs are this agent's is the
    /// hypervisor driver's to say ([`drivers::Hypervisor::work_dir`]).
    pub data_dir: Option<std::path::PathBuf>,
}

impl NodeIdentity {
    /// This host, by its host name (`localhost` if it has none), with
    /// data directory `data_dir`.
    pub fn this_host(data_dir: Option<std::path::PathBuf>) -> Self {
        NodeIdentity {
            name: host_name(),
            data_dir,
        }
    }
}

/// The host name (`gethostname(2)`), `localhost` when it cannot be read
/// or is empty: the default node name.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// How the controllers are tuned.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The agent the controllers act for (default: this host, data
    /// directory not known).
    pub node: NodeIdentity,
    /// Objects of one kind reconciled at once.
    pub concurrency: usize,
    /// Backoff after reconcile errors (per object, with jitter).
    pub backoff: BackoffPolicy,
    /// Backoff between failed VM starts (`status.startFailures.retryAfter`).
    pub start_backoff: BackoffPolicy,
    /// Every object is reconciled at least this often.
    pub resync: Option<Duration>,
    /// How long a VM is given to shut down before it is forced.
    pub stop_timeout: Duration,
    /// How often a running VM's hypervisor is checked, so that a VM whose
    /// process died is noticed and restarted.
    pub liveness: Duration,
    /// How long a Provision waits for SSH by default.
    pub ssh_timeout: Duration,
    /// dnsmasq lease files read, before the usual ones
    /// ([`address::DEFAULT_LEASE_FILES`]), to find the address of a guest
    /// on a `tap` network (the agent's `dnsmasq-leases`).
    pub dnsmasq_leases: Vec<std::path::PathBuf>,
    /// How long a VM's hypervisor may fail to answer before the VM is
    /// reported not Ready (`HypervisorError`) and a VM whose spec says
    /// Stopped is stopped without inspecting it. A monitor busy for a
    /// moment (another QMP client, a snapshot job) is not a fault.
    pub inspect_grace: Duration,
    /// Whether this agent is one node of a cluster (etcd): VMs are bound
    /// to nodes by the scheduler ([`scheduler`], `status.nodeName`), and
    /// the VM, Provision and Snapshot controllers act only on the VMs bound
    /// to [`node`](Self::node) (and their Provisions and Snapshots); an
    /// Image's status is kept per node (`status.nodes`). `false` (sled, one
    /// host): this agent runs every VM, as it always did.
    pub cluster: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            node: NodeIdentity::this_host(None),
            concurrency: 32,
            backoff: BackoffPolicy::default(),
            start_backoff: BackoffPolicy {
                base: Duration::from_secs(10),
                max: Duration::from_secs(300),
            },
            resync: Some(Duration::from_secs(300)),
            stop_timeout: Duration::from_secs(30),
            liveness: Duration::from_secs(5),
            ssh_timeout: Duration::from_secs(120),
            dnsmasq_leases: Vec::new(),
            inspect_grace: Duration::from_secs(30),
            cluster: false,
        }
    }
}

impl RuntimeConfig {
    fn controller(&self) -> ControllerConfig {
        ControllerConfig {
            concurrency: self.concurrency,
            backoff: self.backoff,
            resync: self.resync,
        }
    }
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A controller task panicked.
    #[error("a controller panicked")]
    Panicked,
}

/// Runs reconciler `r` under a [`Controller`] on `store` on a task of
/// `set` until `shutdown`; the task ends with the reconciler's name.
fn spawn_controller<R: Reconciler>(
    set: &mut tokio::task::JoinSet<&'static str>,
    r: R,
    store: &Arc<dyn Store>,
    cc: &ControllerConfig,
    shutdown: &watch::Receiver<bool>,
) {
    let (c, sd) = (
        Controller::new(r, store.clone(), cc.clone()),
        shutdown.clone(),
    );
    set.spawn(async move {
        c.run(sd).await;
        R::NAME
    });
}

/// Which controllers [`run_some`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (one host on sled: there is no scheduler there unless
    /// [`RuntimeConfig::cluster`]).
    All,
    /// The controllers of this agent's node: Image, VirtualMachine,
    /// Provision, Snapshot (in a cluster they act on what is bound to it).
    Node,
    /// The controllers of which one runs in a cluster: the node lifecycle
    /// controller and the scheduler.
    Cluster,
}

/// Runs the Image, VirtualMachine, Provision, Snapshot and node lifecycle
/// controllers (and, in a cluster, the scheduler) until `shutdown` becomes
/// true (or its sender is dropped); see [`run_some`].
pub async fn run(
    store: Arc<dyn Store>,
    drivers: Drivers,
    config: RuntimeConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    run_some(Scope::All, store, drivers, config, shutdown).await
}

/// Runs the controllers of `scope` until `shutdown` becomes true (or its
/// sender is dropped). In-flight reconciles finish before it returns.
/// Aborting the returned future instead stops everything at once, as a
/// killed agent would.
///
/// Errors: [`RunError::Panicked`] when a controller task panicked.
pub async fn run_some(
    scope: Scope,
    store: Arc<dyn Store>,
    drivers: Drivers,
    config: RuntimeConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let ctx = Arc::new(Context {
        store: store.clone(),
        drivers,
        config: config.clone(),
    });
    let cc = config.controller();
    let node = matches!(scope, Scope::All | Scope::Node);
    let cluster = matches!(scope, Scope::All | Scope::Cluster);
    let mut set = tokio::task::JoinSet::new();
    if node {
        let sd = &shutdown;
        spawn_controller(
            &mut set,
            image::ImageReconciler::new(ctx.clone()),
            &store,
            &cc,
            sd,
        );
        spawn_controller(
            &mut set,
            vm::VmReconciler::new(ctx.clone()),
            &store,
            &cc,
            sd,
        );
        let provisions = provision::ProvisionReconciler::new(ctx.clone());
        spawn_controller(&mut set, provisions, &store, &cc, sd);
        let snapshots = snapshot::SnapshotReconciler::new(ctx.clone());
        spawn_controller(&mut set, snapshots, &store, &cc, sd);
    }
    if cluster {
        let nodes = node::NodeReconciler::new(ctx);
        spawn_controller(&mut set, nodes, &store, &cc, &shutdown);
        if config.cluster {
            let sd = shutdown.clone();
            set.spawn(async move {
                scheduler::run(store, sd).await;
                "scheduler"
            });
        }
    }
    drop(shutdown);
    while let Some(res) = set.join_next().await {
        match res {
            Ok(name) => tracing::debug!(controller = name, "controller stopped"),
            Err(e) if e.is_panic() => return Err(RunError::Panicked),
            Err(_) => {}
        }
    }
    Ok(())
}
