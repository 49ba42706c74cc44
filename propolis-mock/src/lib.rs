//! A mock propolis-server, for testing vmctl's Propolis driver on Linux.
//!
//! Written from the facts of propolis-server's published OpenAPI document
//! (`openapi/propolis-server` in oxidecomputer/propolis); no code of the
//! propolis repository is used. Like the real server, one mock hosts at most
//! one instance:
//!
//! ```text
//!   PUT  /instance                 ensure: {properties, init: {method: "Spec", value: {spec}}} → 201
//!   GET  /instance                 {instance: {properties, state}}; 404 without an instance
//!   PUT  /instance/state           "Run" | "Stop" | "Reboot" → 204
//!   GET  /instance/state-monitor   body {gen}: answers {gen, state, migration} once the
//!                                  state generation is at least gen (long poll)
//!   GET  /instance/serial          WebSocket; binary frames are console bytes both ways;
//!                                  ?from_start=N / ?most_recent=N replay the history
//! ```
//!
//! The instance's states follow the real server's: ensure → `Creating`;
//! Run → `Starting` → `Running` (the guest prints a banner and a login
//! prompt on the serial port, and echoes what is typed); Stop → `Stopping`
//! → `Stopped`, after which the instance cannot run again (a new
//! propolis-server, i.e. a new zone boot, is needed); Reboot → `Rebooting`
//! → `Running`. Every change increments the state generation.
//!
//! Failure injection: [`MockPropolis::fail_next`] (HTTP errors),
//! [`MockPropolis::halt`] (the server process ends: nothing listens, the
//! instance is gone), [`MockPropolis::fail_instance`] (the instance goes to
//! `Failed`). The same controls are served on a second listener
//! ([`MockPropolis::control_url`]) for a driver in another process (the
//! simulated host of `vmctl agent --driver propolis`):
//!
//! ```text
//!   POST /zone/boot   POST /zone/halt   POST /fail?count=N&status=S
//!   POST /instance-failed   POST /output (body: console bytes)   GET /ensure-requests
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// An instance's state, as propolis-server names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Being initialised.
    Creating,
    /// Run was requested; the vCPUs are about to run.
    Starting,
    /// The guest runs.
    Running,
    /// Stop was requested.
    Stopping,
    /// Stopped for good: this server cannot run it again.
    Stopped,
    /// Reboot was requested.
    Rebooting,
    /// Migrating (never entered by the mock).
    Migrating,
    /// Repairing (never entered by the mock).
    Repairing,
    /// Failed (entered through [`MockPropolis::fail_instance`]).
    Failed,
    /// Torn down.
    Destroyed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum Requested {
    Run,
    Stop,
    Reboot,
}

// --- The request body, checked strictly: a driver sending a field the API
// does not know, or missing one it requires, gets a 400 as from the real
// server.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnsureRequest {
    properties: Properties,
    init: Init,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Properties {
    id: uuid::Uuid,
    name: String,
    description: String,
    metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    project_id: uuid::Uuid,
    silo_id: uuid::Uuid,
    sled_id: uuid::Uuid,
    sled_model: String,
    sled_revision: u32,
    sled_serial: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "method", content = "value", deny_unknown_fields)]
enum Init {
    Spec { spec: Spec },
    MigrationTarget(#[allow(dead_code)] Value),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    board: Board,
    components: BTreeMap<String, Component>,
    #[serde(default)]
    #[allow(dead_code)]
    smbios: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Board {
    cpus: u8,
    memory_mb: u64,
    #[allow(dead_code)]
    chipset: Chipset,
    #[serde(default)]
    #[allow(dead_code)]
    cpuid: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    guest_hv_interface: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    content = "value",
    rename_all = "snake_case",
    deny_unknown_fields
)]
enum Chipset {
    I440Fx {
        #[allow(dead_code)]
        enable_pcie: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PciPath {
    bus: u8,
    device: u8,
    function: u8,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootOrderEntry {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    content = "component",
    rename_all = "snake_case",
    deny_unknown_fields
)]
enum Component {
    VirtioDisk {
        backend_id: String,
        pci_path: PciPath,
    },
    NvmeDisk {
        backend_id: String,
        pci_path: PciPath,
        #[allow(dead_code)]
        serial_number: Vec<u8>,
    },
    VirtioNic {
        backend_id: String,
        #[allow(dead_code)]
        interface_id: uuid::Uuid,
        pci_path: PciPath,
    },
    SerialPort {
        num: SerialPortNumber,
    },
    BootSettings {
        order: Vec<BootOrderEntry>,
    },
    FileStorageBackend {
        path: String,
        #[allow(dead_code)]
        readonly: bool,
        block_size: u32,
        #[serde(default)]
        #[allow(dead_code)]
        workers: Option<u64>,
    },
    BlobStorageBackend(#[allow(dead_code)] Value),
    CrucibleStorageBackend(#[allow(dead_code)] Value),
    VirtioNetworkBackend {
        vnic_name: String,
    },
    DlpiNetworkBackend {
        vnic_name: String,
    },
    PciPciBridge(#[allow(dead_code)] Value),
    QemuPvpanic(#[allow(dead_code)] Value),
    VirtioSocket(#[allow(dead_code)] Value),
    SoftNpuPciPort(#[allow(dead_code)] Value),
    SoftNpuPort(#[allow(dead_code)] Value),
    SoftNpuP9(#[allow(dead_code)] Value),
    P9fs(#[allow(dead_code)] Value),
    MigrationFailureInjector(#[allow(dead_code)] Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SerialPortNumber {
    Com1,
    Com2,
    Com3,
    Com4,
}

impl Component {
    fn is_storage_backend(&self) -> bool {
        matches!(
            self,
            Component::FileStorageBackend { .. }
                | Component::BlobStorageBackend(_)
                | Component::CrucibleStorageBackend(_)
        )
    }

    fn is_network_backend(&self) -> bool {
        matches!(
            self,
            Component::VirtioNetworkBackend { .. } | Component::DlpiNetworkBackend { .. }
        )
    }

    fn is_disk(&self) -> bool {
        matches!(
            self,
            Component::VirtioDisk { .. } | Component::NvmeDisk { .. }
        )
    }
}

/// Checks what the real server checks before it creates anything: the
/// board is usable, devices name backends of the right kind, PCI slots
/// and serial ports are not used twice, boot entries name disks.
fn check_spec(spec: &Spec) -> Result<(), String> {
    if spec.board.cpus == 0 {
        return Err("board.cpus must be at least 1".into());
    }
    if spec.board.memory_mb == 0 {
        return Err("board.memory_mb must be at least 1".into());
    }
    let mut slots = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for (id, c) in &spec.components {
        let (backend, pci, storage) = match c {
            Component::VirtioDisk {
                backend_id,
                pci_path,
            }
            | Component::NvmeDisk {
                backend_id,
                pci_path,
                ..
            } => (Some(backend_id), Some(pci_path), true),
            Component::VirtioNic {
                backend_id,
                pci_path,
                ..
            } => (Some(backend_id), Some(pci_path), false),
            Component::SerialPort { num } => {
                if !ports.insert(*num as u8) {
                    return Err(format!("component {id}: serial port {num:?} used twice"));
                }
                (None, None, false)
            }
            Component::BootSettings { order } => {
                for e in order {
                    if !spec.components.get(&e.id).is_some_and(Component::is_disk) {
                        return Err(format!("boot order entry {} is not a disk device", e.id));
                    }
                }
                (None, None, false)
            }
            Component::FileStorageBackend {
                path, block_size, ..
            } => {
                if path.is_empty() || !block_size.is_power_of_two() || *block_size < 512 {
                    return Err(format!(
                        "component {id}: file backend needs a path and a block size of 512 or a larger power of two"
                    ));
                }
                (None, None, false)
            }
            Component::VirtioNetworkBackend { vnic_name }
            | Component::DlpiNetworkBackend { vnic_name } => {
                if vnic_name.is_empty() {
                    return Err(format!("component {id}: vnic_name is empty"));
                }
                (None, None, false)
            }
            _ => (None, None, false),
        };
        if let Some(b) = backend {
            let ok = spec.components.get(b).is_some_and(|bc| {
                if storage {
                    bc.is_storage_backend()
                } else {
                    bc.is_network_backend()
                }
            });
            if !ok {
                return Err(format!(
                    "component {id}: backend {b} is missing or of the wrong kind"
                ));
            }
        }
        if let Some(p) = pci
            && !slots.insert((p.bus, p.device, p.function))
        {
            return Err(format!(
                "component {id}: PCI path {}.{}.{} used twice",
                p.bus, p.device, p.function
            ));
        }
    }
    Ok(())
}

struct Instance {
    properties: Properties,
    state: InstanceState,
    generation: u64,
    serial: Vec<u8>,
}

struct Inner {
    instance: Option<Instance>,
    /// Incremented whenever the instance is created or goes away, so that
    /// waiters of an old instance stop.
    epoch: u64,
    fail_next: VecDeque<u16>,
    ensure_requests: Vec<Value>,
    boot_delay: Duration,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Zone boots start no server (it dies at once).
    refuse_boot: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every instance change.
    changed: watch::Sender<()>,
    /// Console bytes as the guest prints them, with the epoch they belong to.
    serial: broadcast::Sender<(u64, Bytes)>,
    api_addr: SocketAddr,
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, inner: &mut Inner, state: InstanceState) {
        if let Some(i) = inner.instance.as_mut() {
            i.state = state;
            i.generation += 1;
        }
        self.changed.send_replace(());
    }

    fn print(&self, inner: &mut Inner, bytes: &[u8]) {
        if let Some(i) = inner.instance.as_mut() {
            i.serial.extend_from_slice(bytes);
            let _ = self
                .serial
                .send((inner.epoch, Bytes::copy_from_slice(bytes)));
        }
    }

    /// After `delay`, moves the instance of `epoch` from `from` to `to`,
    /// printing `banner`.
    fn later(self: &Arc<Self>, from: InstanceState, to: InstanceState, banner: bool) {
        let me = self.clone();
        let (delay, epoch) = {
            let i = me.lock();
            (i.boot_delay, i.epoch)
        };
        self.runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut inner = me.lock();
            if inner.epoch != epoch || inner.instance.as_ref().map(|i| i.state) != Some(from) {
                return;
            }
            me.set_state(&mut inner, to);
            if banner {
                let name = inner
                    .instance
                    .as_ref()
                    .map(|i| i.properties.name.clone())
                    .unwrap_or_default();
                let text = format!("mock propolis-server: booting {name}\r\n{name} login: ");
                me.print(&mut inner, text.as_bytes());
            }
        });
    }

    fn halt(&self) {
        let mut inner = self.lock();
        if let Some(s) = inner.server.take() {
            s.abort();
        }
        inner.instance = None;
        inner.epoch += 1;
        self.changed.send_replace(());
    }

    fn boot(self: &Arc<Self>) -> std::io::Result<()> {
        let mut inner = self.lock();
        if inner.server.is_some() || inner.refuse_boot {
            return Ok(());
        }
        let std_listener = std::net::TcpListener::bind(self.api_addr)?;
        self.serve(&mut inner, std_listener)
    }

    fn boot_on(self: &Arc<Self>, listener: std::net::TcpListener) -> std::io::Result<()> {
        let mut inner = self.lock();
        self.serve(&mut inner, listener)
    }

    fn serve(
        self: &Arc<Self>,
        inner: &mut Inner,
        std_listener: std::net::TcpListener,
    ) -> std::io::Result<()> {
        std_listener.set_nonblocking(true)?;
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let app = api_router(self.clone());
        inner.server = Some(self.runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        Ok(())
    }
}

/// A running mock propolis-server; stopped when dropped.
pub struct MockPropolis {
    shared: Arc<Shared>,
    control_addr: SocketAddr,
    control: tokio::task::JoinHandle<()>,
    /// The runtime of [`MockPropolis::start_in_thread`], kept alive.
    _thread_runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for MockPropolis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockPropolis")
            .field("addr", &self.shared.api_addr)
            .field("control", &self.control_addr)
            .finish()
    }
}

impl Drop for MockPropolis {
    fn drop(&mut self) {
        self.shared.halt();
        self.control.abort();
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error_code": code,
        "message": message.into(),
        "request_id": uuid::Uuid::new_v4().to_string(),
    });
    (status, Json(body)).into_response()
}

fn no_instance() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NoInstance",
        "Server not initialized (no instance)",
    )
}

/// An injected failure for this request, if one is queued.
fn injected(s: &Shared) -> Option<Response> {
    let status = s.lock().fail_next.pop_front()?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(error(status, "Injected", "injected failure (mock)"))
}

fn api_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/instance", put(ensure).get(instance_get))
        .route("/instance/state", put(state_put))
        .route("/instance/state-monitor", get(state_monitor))
        .route("/instance/serial", get(serial))
        // One request per connection, as a fresh process after a halt
        // must not be reached through a connection to the old one.
        .layer(axum::middleware::map_response(
            |mut r: Response| async move {
                if r.status() != StatusCode::SWITCHING_PROTOCOLS {
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            },
        ))
        .with_state(shared)
}

async fn ensure(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    if let Some(r) = injected(&s) {
        return r;
    }
    let raw: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let req: EnsureRequest = match serde_json::from_value(raw.clone()) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("unable to parse JSON body: {e}"),
            );
        }
    };
    let spec = match req.init {
        Init::Spec { spec } => spec,
        Init::MigrationTarget(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the mock does not migrate",
            );
        }
    };
    if let Err(m) = check_spec(&spec) {
        return error(StatusCode::BAD_REQUEST, "BadRequest", m);
    }
    let mut inner = s.lock();
    inner.ensure_requests.push(raw);
    if let Some(i) = &inner.instance {
        if i.properties == req.properties {
            return (StatusCode::CREATED, Json(json!({"migrate": null}))).into_response();
        }
        return error(
            StatusCode::CONFLICT,
            "AlreadyInitialized",
            "this server already hosts another instance",
        );
    }
    inner.epoch += 1;
    inner.instance = Some(Instance {
        properties: req.properties,
        state: InstanceState::Creating,
        generation: 1,
        serial: Vec::new(),
    });
    s.changed.send_replace(());
    (StatusCode::CREATED, Json(json!({"migrate": null}))).into_response()
}

async fn instance_get(State(s): State<Arc<Shared>>) -> Response {
    if let Some(r) = injected(&s) {
        return r;
    }
    let inner = s.lock();
    match &inner.instance {
        Some(i) => Json(json!({
            "instance": {"properties": i.properties, "state": i.state}
        }))
        .into_response(),
        None => no_instance(),
    }
}

async fn state_put(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    use InstanceState as S;
    if let Some(r) = injected(&s) {
        return r;
    }
    let req: Requested = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("unable to parse JSON body: {e}"),
            );
        }
    };
    let mut inner = s.lock();
    let Some(state) = inner.instance.as_ref().map(|i| i.state) else {
        return no_instance();
    };
    let refuse = |why: &str| error(StatusCode::FORBIDDEN, "InvalidState", why.to_owned());
    match (req, state) {
        (Requested::Run, S::Creating) => {
            s.set_state(&mut inner, S::Starting);
            drop(inner);
            s.later(S::Starting, S::Running, true);
        }
        (Requested::Run, S::Starting | S::Running | S::Rebooting | S::Migrating | S::Repairing) => {
        }
        (Requested::Run | Requested::Reboot, S::Stopping | S::Stopped | S::Destroyed) => {
            return refuse("the instance has stopped; this server cannot run it again");
        }
        (_, S::Failed) => return refuse("the instance has failed"),
        (Requested::Stop, S::Stopping | S::Stopped | S::Destroyed) => {}
        (Requested::Stop, _) => {
            s.set_state(&mut inner, S::Stopping);
            drop(inner);
            s.later(S::Stopping, S::Stopped, false);
        }
        (Requested::Reboot, S::Running) => {
            s.set_state(&mut inner, S::Rebooting);
            drop(inner);
            s.later(S::Rebooting, S::Running, true);
        }
        (Requested::Reboot, _) => return refuse("the instance is not running"),
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MonitorRequest {
    #[serde(rename = "gen")]
    generation: u64,
}

async fn state_monitor(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    if let Some(r) = injected(&s) {
        return r;
    }
    let req: MonitorRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("unable to parse JSON body: {e}"),
            );
        }
    };
    let mut rx = s.changed.subscribe();
    let epoch = {
        let inner = s.lock();
        if inner.instance.is_none() {
            return no_instance();
        }
        inner.epoch
    };
    loop {
        {
            let inner = s.lock();
            match &inner.instance {
                Some(i) if inner.epoch == epoch => {
                    if i.generation >= req.generation {
                        return Json(json!({
                            "gen": i.generation,
                            "state": i.state,
                            "migration": {"migration_in": null, "migration_out": null},
                        }))
                        .into_response();
                    }
                }
                _ => {
                    return error(
                        StatusCode::GONE,
                        "NoInstance",
                        format!(
                            "No instance present; will never reach generation {}",
                            req.generation
                        ),
                    );
                }
            }
        }
        if rx.changed().await.is_err() {
            return no_instance();
        }
    }
}

#[derive(Debug, Deserialize)]
struct SerialQuery {
    from_start: Option<u64>,
    most_recent: Option<u64>,
}

async fn serial(
    State(s): State<Arc<Shared>>,
    Query(q): Query<SerialQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(r) = injected(&s) {
        return r;
    }
    if q.from_start.is_some() && q.most_recent.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "from_start and most_recent are mutually exclusive",
        );
    }
    let (history, epoch, rx) = {
        let inner = s.lock();
        let Some(i) = &inner.instance else {
            return no_instance();
        };
        let len = i.serial.len();
        let start = match (q.from_start, q.most_recent) {
            (Some(n), _) => (n as usize).min(len),
            (None, Some(n)) => len.saturating_sub(n as usize),
            (None, None) => len,
        };
        // Subscribed under the lock: nothing printed is lost or doubled.
        (
            Bytes::copy_from_slice(&i.serial[start..]),
            inner.epoch,
            s.serial.subscribe(),
        )
    };
    ws.on_upgrade(move |socket| serial_session(s, socket, history, epoch, rx))
}

async fn serial_session(
    s: Arc<Shared>,
    mut socket: WebSocket,
    history: Bytes,
    epoch: u64,
    mut rx: broadcast::Receiver<(u64, Bytes)>,
) {
    if !history.is_empty() && socket.send(Message::Binary(history)).await.is_err() {
        return;
    }
    let mut changed = s.changed.subscribe();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Ok((e, bytes)) if e == epoch => {
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            input = socket.recv() => match input {
                Some(Ok(Message::Binary(bytes))) => {
                    // The guest echoes what is typed, a newline for a return.
                    let mut inner = s.lock();
                    if inner.epoch != epoch {
                        return;
                    }
                    let echo: Vec<u8> = bytes
                        .iter()
                        .flat_map(|b| if *b == b'\r' { b"\r\n".to_vec() } else { vec![*b] })
                        .collect();
                    s.print(&mut inner, &echo);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            r = changed.changed() => {
                if r.is_err() || s.lock().epoch != epoch {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct FailQuery {
    #[serde(default = "one")]
    count: usize,
    #[serde(default = "five_hundred")]
    status: u16,
}

fn one() -> usize {
    1
}
fn five_hundred() -> u16 {
    500
}

fn control_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/zone/boot",
            post(|State(s): State<Arc<Shared>>| async move {
                match s.boot() {
                    Ok(()) => StatusCode::NO_CONTENT.into_response(),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "Bind", e.to_string()),
                }
            }),
        )
        .route(
            "/zone/halt",
            post(|State(s): State<Arc<Shared>>| async move {
                s.halt();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/fail",
            post(
                |State(s): State<Arc<Shared>>, Query(q): Query<FailQuery>| async move {
                    let mut inner = s.lock();
                    inner
                        .fail_next
                        .extend(std::iter::repeat_n(q.status, q.count));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .route(
            "/instance-failed",
            post(|State(s): State<Arc<Shared>>| async move {
                fail_instance(&s);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/output",
            post(|State(s): State<Arc<Shared>>, body: Bytes| async move {
                let mut inner = s.lock();
                s.print(&mut inner, &body);
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/ensure-requests",
            get(|State(s): State<Arc<Shared>>| async move {
                Json(Value::Array(s.lock().ensure_requests.clone()))
            }),
        )
        .with_state(shared)
}

fn fail_instance(s: &Shared) {
    let mut inner = s.lock();
    if inner.instance.is_some() {
        s.set_state(&mut inner, InstanceState::Failed);
        s.print(&mut inner, b"\r\nmock propolis-server: instance failed\r\n");
    }
}

impl MockPropolis {
    /// Starts a mock on 127.0.0.1 (ports chosen by the system), listening
    /// and without an instance, as a propolis-server just started in a
    /// booted zone. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When a listener cannot be bound.
    pub async fn start() -> std::io::Result<MockPropolis> {
        Self::start_on(tokio::runtime::Handle::current()).await
    }

    /// Like [`start`](Self::start), on its own runtime thread, for
    /// synchronous tests (e.g. ones driving the `vmctl` binary).
    ///
    /// # Errors
    /// When the runtime cannot be built or a listener cannot be bound.
    pub fn start_in_thread() -> std::io::Result<MockPropolis> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let mut mock = rt.block_on(Self::start_on(handle))?;
        mock._thread_runtime = Some(rt);
        Ok(mock)
    }

    async fn start_on(runtime: tokio::runtime::Handle) -> std::io::Result<MockPropolis> {
        // Bound once and kept for the first boot: a port released and
        // bound again could be taken in between.
        let api = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        let api_addr = api.local_addr()?;
        let control = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let control_addr = control.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                instance: None,
                epoch: 0,
                fail_next: VecDeque::new(),
                ensure_requests: Vec::new(),
                boot_delay: Duration::from_millis(50),
                server: None,
                refuse_boot: false,
            }),
            changed: watch::channel(()).0,
            serial: broadcast::channel(1024).0,
            api_addr,
            runtime: runtime.clone(),
        });
        shared.boot_on(api)?;
        let app = control_router(shared.clone());
        let control = runtime.spawn(async move {
            let _ = axum::serve(control, app).await;
        });
        Ok(MockPropolis {
            shared,
            control_addr,
            control,
            _thread_runtime: None,
        })
    }

    /// Where the propolis-server API listens (while booted).
    pub fn addr(&self) -> SocketAddr {
        self.shared.api_addr
    }

    /// Base URL of the control listener (`http://127.0.0.1:PORT`).
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control_addr)
    }

    /// The server process ends, as when its zone halts: nothing listens on
    /// [`addr`](Self::addr), the instance and its console history are gone,
    /// long polls answer 410 and serial WebSockets close.
    pub fn halt(&self) {
        self.shared.halt();
    }

    /// A fresh server process listens again (no instance), as after a zone
    /// boot. Booting a booted mock changes nothing.
    ///
    /// # Errors
    /// When the port cannot be bound again.
    pub fn boot(&self) -> std::io::Result<()> {
        self.shared.boot()
    }

    /// While set, boots start no server: nothing listens, as when
    /// propolis-server dies at once in its zone.
    pub fn set_server_fails_to_start(&self, fails: bool) {
        self.shared.lock().refuse_boot = fails;
    }

    /// Whether the API listens.
    pub fn is_listening(&self) -> bool {
        self.shared.lock().server.is_some()
    }

    /// The next `count` API requests answer `status` (e.g. 500).
    pub fn fail_next(&self, count: usize, status: u16) {
        self.shared
            .lock()
            .fail_next
            .extend(std::iter::repeat_n(status, count));
    }

    /// The instance goes to `Failed` (as after a bhyve error).
    pub fn fail_instance(&self) {
        fail_instance(&self.shared);
    }

    /// The guest prints `bytes` on its serial port.
    pub fn guest_output(&self, bytes: &[u8]) {
        let mut inner = self.shared.lock();
        self.shared.print(&mut inner, bytes);
    }

    /// How long Starting, Stopping and Rebooting last (default 50 ms).
    pub fn set_transition_delay(&self, d: Duration) {
        self.shared.lock().boot_delay = d;
    }

    /// The instance's state, `None` without an instance.
    pub fn state(&self) -> Option<InstanceState> {
        self.shared.lock().instance.as_ref().map(|i| i.state)
    }

    /// Everything the guest printed on its serial port since the instance
    /// was created.
    pub fn serial_history(&self) -> Vec<u8> {
        self.shared
            .lock()
            .instance
            .as_ref()
            .map(|i| i.serial.clone())
            .unwrap_or_default()
    }

    /// The bodies of every well-formed `PUT /instance` accepted so far.
    pub fn ensure_requests(&self) -> Vec<Value> {
        self.shared.lock().ensure_requests.clone()
    }
}
