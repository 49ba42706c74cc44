//! Starting and stopping the agent: lock, store, socket, signals.
//!
//! Order: driver settings → data directory lock → socket probe (a second
//! agent stops here) → store → on etcd, the agent lease (held by another
//! agent on the prefix: this one stands by for it; [`crate::lease`]) → this agent's Node
//! registered (on etcd its node lease: another live agent of the same
//! node name stops this one here; [`crate::node`]) → socket bound
//! ([`crate::socket`]) → the TLS listener bound, if configured
//! ([`crate::door`]) → API served with limits ([`crate::http`]) until
//! SIGTERM/SIGINT → controllers stopped (and the agent lease released),
//! the Node marked stopped (and its lease released) → socket removed if
//! still ours.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use vmctl_store::{EtcdOptions, EtcdStore, SledStore, Store, StoreError};

use crate::api::{self, AppState};
use crate::config::{AgentConfig, StoreConfig};

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another agent holds the data directory.
    #[error("another vmctl agent is already running on {0}")]
    Locked(PathBuf),
    /// The data directory could not be prepared.
    #[error("cannot prepare the data directory {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    /// The store could not be opened.
    #[error("cannot open the store")]
    Store(#[source] StoreError),
    /// Another live agent holds the node lease of this agent's node name
    /// (two agents must not post one Node's status; see [`crate::node`]).
    #[error("another vmctl agent runs as node `{node}` ({store}): {holder}")]
    NodeNameTaken {
        /// The node name.
        node: String,
        /// `etcd at URL,…`.
        store: String,
        /// Who holds it.
        holder: Box<vmctl_store::LeaseHolder>,
        /// The node lease's TTL: a killed holder's lease is gone after it.
        ttl: std::time::Duration,
    },
    /// The socket could not be bound (something answers there already, or
    /// the path is not a socket, or a system call failed).
    #[error("cannot listen on the agent socket")]
    Socket(#[source] crate::socket::SocketError),
    /// The requested driver does not exist.
    #[error("unknown or unavailable driver `{0}`")]
    Driver(String),
    /// `VMCTL_SEED_TOOL` names no known ISO writer.
    #[error("unknown seed tool `{0}`")]
    SeedTool(String),
    /// `VMCTL_ACCEL` is not kvm, tcg or auto.
    #[error("invalid accelerator setting: {0}")]
    Accel(String),
    /// The Propolis driver cannot run here or its settings are invalid.
    #[error("the Propolis driver cannot start: {0}")]
    Propolis(String),
    /// The fake driver's environment settings are invalid.
    #[error("invalid fake driver settings")]
    FakeConfig(#[source] vmctl_controllers::drivers::fake::FakeConfigError),
    /// `VMCTL_CPU_ALLOCATION_RATIO` or `VMCTL_MEMORY_ALLOCATION_RATIO` is
    /// not a positive number.
    #[error("invalid allocation ratio: {0}")]
    Allocation(String),
    /// The controllers stopped with an error.
    #[error("the controllers failed")]
    Controllers(#[source] vmctl_controllers::RunError),
    /// The TLS listener (`--listen`, `--tls-dir`) cannot start.
    #[error("cannot start the TLS listener")]
    Door(#[source] crate::door::DoorError),
}

impl AgentError {
    /// What the user should do about it.
    pub fn help(&self) -> String {
        match self {
            AgentError::Locked(_) => {
                "use the running agent (vmctl talks to it), or stop it first".into()
            }
            AgentError::NodeNameTaken { holder, ttl, .. } => format!(
                "give this agent another node name (--node-name, VMCTL_NODE_NAME), or stop that \
                 agent (pid {} on {}) first; if it was killed, its node lease expires within {} s \
                 (the TTL): start this one again then",
                holder.pid,
                holder.host,
                ttl.as_secs()
            ),
            AgentError::DataDir(..) => {
                "check the permissions of the data directory (XDG_DATA_HOME)".into()
            }
            AgentError::Store(StoreError::Corrupt { hint, .. }) => hint.clone(),
            AgentError::Store(StoreError::Invalid(_)) => {
                "fix --etcd-endpoints / VMCTL_ETCD_ENDPOINTS (URLs such as http://127.0.0.1:2379)"
                    .into()
            }
            AgentError::Store(_) => "see the error above; the store was not modified".into(),
            AgentError::Socket(e) => e.help().into(),
            AgentError::Driver(_) => {
                "drivers are `qemu` (default), `propolis` (illumos) and `fake` (in memory, for tests)"
                    .into()
            }
            AgentError::Propolis(_) => {
                "use --driver qemu on Linux; the Propolis driver needs an illumos host with zfs, \
                 zones and propolis-server. To try it against a mock propolis-server, set \
                 VMCTL_PROPOLIS_HOST=simulated and VMCTL_PROPOLIS_ADDR (or --propolis-host, \
                 --propolis-addr, or host and addr under [propolis] in <data-dir>/agent.toml; \
                 see the README)"
                    .into()
            }
            AgentError::Controllers(_) => "see the agent log".into(),
            AgentError::Door(e) => e.help(),
            AgentError::FakeConfig(_) => "fix the VMCTL_FAKE_* environment variables".into(),
            AgentError::Accel(_) => "set VMCTL_ACCEL to kvm, tcg or auto".into(),
            AgentError::Allocation(_) => "unset it (defaults: 16 vCPUs per CPU, memory 1.0), or \
                 give a positive number"
                .into(),
            AgentError::SeedTool(_) => {
                "set VMCTL_SEED_TOOL to auto, genisoimage, mkisofs, xorriso or builtin".into()
            }
        }
    }
}

/// Takes the data directory's lock so that one agent at a time owns it.
fn lock(cfg: &AgentConfig) -> Result<File, AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .map_err(|e| AgentError::DataDir(cfg.data_dir.clone(), e))?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| AgentError::DataDir(cfg.data_dir.clone(), e))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cfg.lock_file())
        .map_err(|e| AgentError::DataDir(cfg.data_dir.clone(), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::Locked(cfg.data_dir.clone())),
        Err(std::fs::TryLockError::Error(e)) => Err(AgentError::DataDir(cfg.data_dir.clone(), e)),
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail");
    tokio::select! {
        // Both arms only wait for a signal; dropping either loses nothing.
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// The drivers for the configured driver name.
fn drivers(cfg: &AgentConfig) -> Result<vmctl_controllers::Drivers, AgentError> {
    match cfg.driver.as_str() {
        "fake" => {
            let fake = vmctl_controllers::FakeConfig::from_env().map_err(AgentError::FakeConfig)?;
            Ok(vmctl_controllers::Drivers::fake(fake))
        }
        "qemu" => {
            use vmctl_controllers::drivers::qemu::{QemuConfig, QemuDriver};
            let mut qcfg = QemuConfig::new(cfg.data_dir.clone())
                .with_env_overrides()
                .map_err(|e| AgentError::Accel(e.to_string()))?;
            // Which ISO writer builds cloud-init seeds: auto (default),
            // genisoimage, mkisofs, xorriso or builtin (the pure-Rust one).
            if let Ok(tool) = std::env::var("VMCTL_SEED_TOOL") {
                qcfg.seed_tool = tool
                    .parse()
                    .map_err(|_| AgentError::SeedTool(tool.clone()))?;
            }
            Ok(vmctl_controllers::Drivers {
                hypervisor: Arc::new(QemuDriver::new(qcfg)),
                images: Arc::new(vmctl_controllers::drivers::cached::CachedImages::new(
                    &cfg.data_dir,
                )),
                provisioner: Arc::new(vmctl_controllers::drivers::ssh::SshProvisioner::new()),
            })
        }
        // Settings from --propolis-* / VMCTL_PROPOLIS_* (merged by clap)
        // or [propolis] in agent.toml; the mock's control URL and the seed
        // tool from the environment only.
        "propolis" => propolis_drivers(cfg, |k| match k {
            "VMCTL_PROPOLIS_MOCK_CONTROL" | "VMCTL_SEED_TOOL" => std::env::var(k).ok(),
            _ => cfg.propolis.lookup(k),
        }),
        other => Err(AgentError::Driver(other.to_owned())),
    }
}

/// The Propolis drivers, configured by the settings `VMCTL_PROPOLIS_*`
/// names (read through `env`). Host commands run on the host (`VMCTL_PROPOLIS_HOST=system`,
/// the default, illumos only) or on a simulated host kept in
/// `<data_dir>/propolis-simulated-host.json` (`simulated`: tests against a
/// mock propolis-server, whose control URL `VMCTL_PROPOLIS_MOCK_CONTROL`
/// hears of zone boots and halts).
fn propolis_drivers(
    cfg: &AgentConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<vmctl_controllers::Drivers, AgentError> {
    use vmctl_controllers::drivers::propolis::{
        CommandRunner, PropolisConfig, PropolisDriver, SimulatedHost, SystemRunner,
    };
    let mut pcfg = PropolisConfig::new(cfg.data_dir.clone())
        .with_lookup(&env)
        .map_err(|e| AgentError::Propolis(e.to_string()))?;
    if let Some(tool) = env("VMCTL_SEED_TOOL") {
        pcfg.seed_tool = tool
            .parse()
            .map_err(|_| AgentError::SeedTool(tool.clone()))?;
    }
    let host = env("VMCTL_PROPOLIS_HOST").unwrap_or_else(|| "system".into());
    let runner: Arc<dyn CommandRunner> = match host.as_str() {
        "system" if cfg!(target_os = "illumos") => Arc::new(SystemRunner),
        "system" => {
            return Err(AgentError::Propolis(format!(
                "this host runs {}, not illumos: there is no zfs, zoneadm, zonecfg or dladm to run VMs with",
                std::env::consts::OS
            )));
        }
        "simulated" => {
            if env("VMCTL_PROPOLIS_ADDR").is_none() {
                return Err(AgentError::Propolis(
                    "VMCTL_PROPOLIS_HOST=simulated needs the mock propolis-server's address in VMCTL_PROPOLIS_ADDR"
                        .into(),
                ));
            }
            let mut h = SimulatedHost::new()
                .with_state_file(cfg.data_dir.join("propolis-simulated-host.json"));
            if let Some(url) = env("VMCTL_PROPOLIS_MOCK_CONTROL") {
                h = h.with_mock_control(url);
            }
            Arc::new(h)
        }
        other => {
            return Err(AgentError::Propolis(format!(
                "invalid VMCTL_PROPOLIS_HOST={other:?}: expected system or simulated"
            )));
        }
    };
    Ok(vmctl_controllers::Drivers {
        hypervisor: Arc::new(PropolisDriver::new(pcfg, runner)),
        images: Arc::new(vmctl_controllers::drivers::cached::CachedImages::new(
            &cfg.data_dir,
        )),
        provisioner: Arc::new(vmctl_controllers::drivers::ssh::SshProvisioner::new()),
    })
}

/// Opens the configured store and starts its maintenance task; the etcd
/// store is also returned as such (for its agent lease).
async fn open_store(
    cfg: &AgentConfig,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Arc<dyn Store>, Option<EtcdStore>), AgentError> {
    match &cfg.store {
        StoreConfig::Sled => {
            let db = cfg.db_dir();
            let store = tokio::task::spawn_blocking(move || SledStore::open(db))
                .await
                .expect("the store open task does not panic")
                .map_err(AgentError::Store)?;
            tokio::spawn(crate::compaction::run(
                store.clone(),
                cfg.retention.clone(),
                stop,
            ));
            Ok((Arc::new(store), None))
        }
        StoreConfig::Etcd { endpoints, prefix } => {
            let mut opts = EtcdOptions::new(endpoints.clone());
            opts.prefix = prefix.clone();
            // Unreachable is no reason not to start: every request says so,
            // and the controllers start once etcd is back (crate::lease).
            let store = EtcdStore::connect(opts).await.map_err(AgentError::Store)?;
            tokio::spawn(crate::compaction::run_etcd(
                store.clone(),
                cfg.retention.clone(),
                stop,
            ));
            Ok((Arc::new(store.clone()), Some(store)))
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    run_until(cfg, shutdown_signal()).await
}

/// Runs the agent until `shutdown` resolves.
pub async fn run_until(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let drivers = drivers(&cfg)?;
    let ratios = crate::node::AllocationRatios::from_env().map_err(AgentError::Allocation)?;
    let _lock = lock(&cfg)?;
    crate::socket::check_free(&cfg.socket).map_err(AgentError::Socket)?;
    let nofile = crate::http::raise_nofile_limit();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (store, etcd) = open_store(&cfg, stop.subscribe()).await?;
    // Every request of the API, the cache and the controllers is timed.
    let store: Arc<dyn Store> = Arc::new(vmctl_controllers::metrics::MeteredStore(store));
    // On etcd, the agent that holds the prefix's agent lease runs the
    // cluster's controllers (the scheduler, the node lifecycle controller);
    // the others stand by for it (crate::lease).
    let me = crate::lease::me(&cfg);
    let first_lease = match &etcd {
        Some(e) => crate::lease::at_start(e, &me, cfg.lease_ttl).await,
        None => None,
    };
    // This agent's Node, before the API answers (a client sees it at once).
    let mut node = crate::node::NodeAgent::new(
        &cfg,
        store.clone(),
        etcd.clone(),
        drivers.hypervisor.clone(),
        me.clone(),
        ratios,
    );
    if let Err(holder) = node.start().await {
        if let Some(l) = first_lease {
            // Not kept for the TTL by an agent that does not start.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), l.release()).await;
        }
        return Err(AgentError::NodeNameTaken {
            node: cfg.node_name.clone(),
            store: store.describe(),
            holder: Box::new(holder),
            ttl: cfg.node_lease_ttl,
        });
    }
    let group = match &cfg.socket_group {
        Some(name) => Some(crate::socket::group_id(name).map_err(AgentError::Socket)?),
        None => None,
    };
    let (listener, socket) =
        crate::socket::bind_for(&cfg.socket, group).map_err(AgentError::Socket)?;
    // The TLS listener for other hosts, if configured (crate::door).
    let door = match &cfg.door {
        Some(d) => Some(crate::door::bind(d).await.map_err(AgentError::Door)?),
        None => None,
    };
    let limits = crate::http::Limits::for_nofile(nofile);
    tracing::info!(
        socket = %cfg.socket.display(),
        driver = %cfg.driver,
        max_connections = limits.max_connections,
        store = %store.describe(),
        tls = %cfg.door.as_ref().map_or("-".into(), |d| d.listen.to_string()),
        "agent listening"
    );
    let (controllers_state, _) =
        tokio::sync::watch::channel(crate::lease::ControllersState::Running);
    // The VMs this agent runs are recorded as its node's; it leaves the
    // instances of other nodes and data dirs alone. On etcd it is a node of
    // a cluster: it runs the VMs the scheduler binds to it.
    let runtime = vmctl_controllers::RuntimeConfig {
        node: vmctl_controllers::NodeIdentity {
            name: cfg.node_name.clone(),
            data_dir: Some(cfg.data_dir.clone()),
        },
        dnsmasq_leases: cfg.dnsmasq_leases.clone(),
        cluster: etcd.is_some(),
        ..Default::default()
    };
    // On etcd the controllers write through a store fenced by the lease of
    // the term they run in (the agent lease for the cluster's controllers,
    // the node lease for this node's): none of their writes lands once
    // another agent could hold it (EtcdStore::fenced).
    let start = |scope: vmctl_controllers::Scope| {
        let (store, drivers, etcd, runtime) = (
            store.clone(),
            drivers.clone(),
            etcd.clone(),
            runtime.clone(),
        );
        move |stopped, fence: Option<vmctl_store::Fence>| {
            let store = match (&etcd, fence) {
                (Some(e), Some(f)) => Arc::new(vmctl_controllers::metrics::MeteredStore(Arc::new(
                    e.fenced(f),
                ))) as Arc<dyn Store>,
                _ => store.clone(),
            };
            tokio::spawn(vmctl_controllers::run_some(
                scope,
                store,
                drivers.clone(),
                runtime.clone(),
                stopped,
            ))
        }
    };
    let (controllers, node_controllers) = match etcd.clone() {
        None => (start(vmctl_controllers::Scope::All)(stopped, None), None),
        Some(e) => {
            if first_lease.is_none() {
                controllers_state
                    .send_replace(crate::lease::ControllersState::Standby { holder: None });
            }
            let per_node = tokio::spawn(crate::lease::run_per_fence(
                cfg.fence.then(|| drivers.hypervisor.clone()),
                node.fences(),
                start(vmctl_controllers::Scope::Node),
                stopped.clone(),
            ));
            let cluster = tokio::spawn(crate::lease::run_while_held(
                e,
                first_lease,
                me,
                cfg.lease_ttl,
                start(vmctl_controllers::Scope::Cluster),
                stopped,
                controllers_state.clone(),
            ));
            (cluster, Some(per_node))
        }
    };
    let node = tokio::spawn(node.run(stop.subscribe()));
    let cache = crate::cache::ObjectCache::start(store.clone(), stop.subscribe());
    let state = AppState::new(store, cfg.clone())
        .with_cache(cache)
        .with_controllers(controllers_state.subscribe());
    let app = api::router(state);
    crate::door::serve(listener, door, app, limits, shutdown).await;
    let _ = stop.send(true);
    let ctl = controllers.await;
    let node_ctl = match node_controllers {
        Some(h) => h.await.ok(),
        None => None,
    };
    // Marked stopped within its own budget (crate::node).
    if let Err(e) = node.await {
        tracing::error!(error = %e, "node task failed");
    }
    // Removed only if it is still ours (another agent may have taken the
    // path), and only now: once the socket is gone, the controllers have
    // stopped and the etcd agent lease is released (crate::lease), so a
    // next agent on the prefix is not refused.
    drop(socket);
    if let Some(Err(e)) = node_ctl {
        return Err(AgentError::Controllers(e));
    }
    match ctl {
        Ok(r) => r.map_err(AgentError::Controllers),
        Err(e) => {
            tracing::error!(error = %e, "controller task failed");
            Ok(())
        }
    }
}
