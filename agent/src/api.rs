//! The HTTP API: thin handlers that decode a request, call the store (reads)
//! or one [`actions`] function (writes), and map errors to statuses with
//! one explicit `match`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use vmctl_api::wire::{ApplyRequest, ApplyResponse, ErrorBody, Health, ObjectList};
use vmctl_api::{Kind, Object, ObjectRef};
use vmctl_store::{Store, StoreError};

use crate::actions::{self, ActionError};
use crate::config::AgentConfig;
use crate::finalizers::{FinalizerError, PatchRequest};
use crate::openapi::{Accepted, ApiRouter, HealthJson, NdJson, RawJson, Text};
use crate::rejection::{
    ApiJson, ApiPath as Path, ApiQuery as Query, MAX_APPLY_BODY_BYTES, MAX_BODY_BYTES,
};

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(crate) store: Arc<dyn Store>,
    cfg: Arc<AgentConfig>,
    cache: Option<Arc<crate::cache::ObjectCache>>,
    /// The store's newest resourceVersion seen by `/v1/healthz` (0: none
    /// yet), reported while the store is unavailable.
    last_seq: Arc<std::sync::atomic::AtomicU64>,
    /// Whether this agent runs the controllers (the etcd agent lease).
    controllers: Option<tokio::sync::watch::Receiver<crate::lease::ControllersState>>,
    /// Forwarding to other nodes' agents (with a TLS listener only).
    forwarder: Option<Arc<crate::forward::Forwarder>>,
}

impl AppState {
    /// State over a store; lists read the store directly.
    pub fn new(store: Arc<dyn Store>, cfg: AgentConfig) -> Self {
        let forwarder = cfg
            .door
            .as_ref()
            .and_then(|d| crate::forward::Forwarder::new(&cfg.node_name, &d.tls_dir));
        AppState {
            store,
            cfg: Arc::new(cfg),
            cache: None,
            last_seq: Default::default(),
            controllers: None,
            forwarder,
        }
    }

    /// Forwarding to other nodes' agents, when this agent has a TLS identity.
    pub(crate) fn forwarder(&self) -> Option<Arc<crate::forward::Forwarder>> {
        self.forwarder.clone()
    }

    /// Reports whether the controllers run (`/v1/healthz`: `controllers`,
    /// `leaseHolder`); without it they are reported running.
    pub fn with_controllers(
        mut self,
        state: tokio::sync::watch::Receiver<crate::lease::ControllersState>,
    ) -> Self {
        self.controllers = Some(state);
        self
    }

    /// Serves lists from an in-memory cache of the store.
    pub fn with_cache(mut self, cache: Arc<crate::cache::ObjectCache>) -> Self {
        self.cache = Some(cache);
        self
    }
}

/// An error response: status and JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    /// An error with a status, a registered code (`api/src/codes.rs`), a
    /// message and what to do about it.
    pub(crate) fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        help: Option<&str>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                code: code.into(),
                message: message.into(),
                help: help.map(Into::into),
            },
        }
    }

    /// A 400 with `vmctl::api::bad_request`.
    pub(crate) fn bad_request(message: impl Into<String>, help: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "vmctl::api::bad_request",
            message,
            Some(help),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Explicit per variant: a new store error must be mapped deliberately.
        let (status, code, help) = match &e {
            StoreError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "vmctl::api::not_found",
                Some("run `vmctl get` to list objects"),
            ),
            StoreError::Conflict { .. } => (
                StatusCode::CONFLICT,
                "vmctl::api::conflict",
                Some("the object changed meanwhile; read it again and retry"),
            ),
            StoreError::TooOld { .. } => (
                StatusCode::GONE,
                "vmctl::api::too_old",
                Some("list again and watch from the listing's resourceVersion"),
            ),
            StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "vmctl::api::bad_request", None),
            StoreError::SchemaTooNew { .. } | StoreError::Corrupt { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "vmctl::store::unusable",
                Some("see the agent log"),
            ),
            StoreError::NoSpace { .. } => (
                StatusCode::INSUFFICIENT_STORAGE,
                "vmctl::store::no_space",
                Some(
                    "free space on that filesystem (`df -h` shows it); the write was not \
                     stored, and writes work again by themselves once there is room",
                ),
            ),
            StoreError::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "vmctl::store::unavailable",
                Some(
                    "start or repair the store at those endpoints (or point the agent at \
                     another: --etcd-endpoints or agent.toml); the agent reconnects by itself, \
                     no restart needed",
                ),
            ),
            StoreError::Backend(_) | StoreError::Codec(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "vmctl::store::failed",
                Some("see the agent log"),
            ),
        };
        ApiError::new(status, code, vmctl_api::error_chain(&e), help)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse_kind(s: &str) -> ApiResult<Kind> {
    Kind::parse(s).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "vmctl::api::unknown_kind",
            format!("unknown kind `{s}`"),
            Some("kinds are vm, image, provision, snapshot and node"),
        )
    })
}

/// Every endpoint of the API, served and documented at once (see
/// [`crate::openapi`]): the summary here and the handler's signature are
/// what `agent/openapi.json` says.
pub fn routes() -> ApiRouter<AppState> {
    ApiRouter::new()
        .endpoint(
            Method::GET,
            "/v1/healthz",
            "Agent version, pid, driver and last log sequence",
            health,
        )
        .endpoint(
            Method::GET,
            "/metrics",
            "The agent's metrics for Prometheus (OpenMetrics text): VMs per phase and node, reconciles, work queues, store requests, watch delay",
            metrics,
        )
        .endpoint(
            Method::GET,
            "/v1/openapi.json",
            "This document (OpenAPI 3.1)",
            openapi_document,
        )
        .endpoint(
            Method::POST,
            "/v1/apply",
            "Create or update objects (validated all first; nothing is written if one is invalid)",
            apply,
        )
        .endpoint(
            Method::GET,
            "/v1/objects",
            "List objects of every kind",
            list_all,
        )
        .endpoint(
            Method::GET,
            "/v1/objects/{kind}",
            "List objects of one kind (vm, image, provision, snapshot, node)",
            list_kind,
        )
        .endpoint(
            Method::GET,
            "/v1/objects/{kind}/{name}",
            "Get one object",
            get_one,
        )
        .endpoint(
            Method::DELETE,
            "/v1/objects/{kind}/{name}",
            "Request deletion; the object goes once its finalizers are cleared (body: the object while it waits, null once gone)",
            delete_one,
        )
        .endpoint(
            Method::PATCH,
            "/v1/objects/{kind}/{name}",
            "Add or remove finalizers (those under vmctl.dev/ only with force); removing the last one of an object being deleted deletes it (body: the object, null once gone)",
            patch_one,
        )
        .endpoint(
            Method::GET,
            "/v1/history/{kind}/{name}",
            "Every event of one object, oldest first",
            history,
        )
        .endpoint(
            Method::GET,
            "/v1/notes",
            "Every note (Kubernetes-style event), oldest first",
            notes_all,
        )
        .endpoint(
            Method::GET,
            "/v1/notes/{kind}/{name}",
            "Notes about one object",
            notes_one,
        )
        .endpoint(
            Method::GET,
            "/v1/logs/{name}",
            "A VM's console or provision log as text; follow=true keeps streaming what is appended",
            logs,
        )
        .endpoint(
            Method::GET,
            "/v1/vms/{name}/console",
            "The VM's serial console as a byte stream both ways (HTTP upgrade: send Connection: Upgrade and Upgrade: tcp)",
            crate::streams::console,
        )
        .endpoint(
            Method::GET,
            "/v1/vms/{name}/tunnel",
            "A TCP stream to the guest's SSH port, for ssh -o ProxyCommand (HTTP upgrade: send Connection: Upgrade and Upgrade: tcp)",
            crate::streams::tunnel,
        )
        .endpoint(
            Method::GET,
            "/v1/vms/{name}/ssh",
            "What the system ssh needs for the tunnel: user, pinned host key, the generated private key",
            crate::streams::ssh_access,
        )
        .endpoint(
            Method::POST,
            "/v1/vms/{name}/exec",
            "Run a command on the guest over SSH (stdin at end-of-file): stdout and stderr pieces as read, then one exit or error line",
            crate::streams::exec,
        )
        .endpoint(
            Method::PUT,
            "/v1/vms/{name}/files",
            "Write a file on the guest over SFTP: the body is its content, its mode is set exactly",
            crate::streams::upload,
        )
        .endpoint(
            Method::GET,
            "/v1/vms/{name}/files",
            "Read a file on the guest over SFTP: the body is its content, the x-vmctl-file-mode header its mode in octal",
            crate::streams::download,
        )
        .endpoint(
            Method::POST,
            "/v1/images/inspect",
            "Inspect an image file on the agent's host as an Image with that path would be (format, sizes)",
            crate::streams::inspect,
        )
        .endpoint(
            Method::GET,
            "/v1/watch",
            "Newline-delimited JSON stream of events after a sequence, then live; a final {\"type\":\"resync\"} line means list again",
            watch,
        )
}

/// The API's routes over `state`, with the JSON refusals of
/// [`crate::rejection`] and the body read timeout.
pub fn router(state: AppState) -> Router {
    let (routes, _) = routes().into_parts();
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::forward::forward,
        ))
        .fallback(crate::rejection::no_route)
        .method_not_allowed_fallback(crate::rejection::method_not_allowed)
        .layer(axum::middleware::map_response(
            crate::rejection::json_errors,
        ))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            crate::rejection::BODY_IDLE_TIMEOUT,
        ))
        .with_state(state)
}

async fn metrics(State(st): State<AppState>) -> ApiResult<crate::openapi::OpenMetricsText> {
    let m = vmctl_controllers::metrics::Metrics::global();
    match &st.cache {
        Some(cache) => cache.visit(Kind::VirtualMachine, |vms| m.set_vms(vms)),
        None => m.set_vms(&st.store.list(Some(Kind::VirtualMachine)).await?.objects),
    }
    Ok(crate::openapi::OpenMetricsText(m.encode()))
}

async fn openapi_document() -> RawJson<serde_json::Value> {
    RawJson::from_bytes(crate::openapi::cached_document())
}

/// How long `/v1/healthz` waits for the store before it answers 503 (the
/// store itself answers within 2 s during a known outage: see
/// `vmctl_store::EtcdOptions::outage_timeout`).
const HEALTH_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// 200 when the store answers within [`HEALTH_PROBE`], else 503 with the
/// same body: `storeError` says why (naming the endpoints) and `lastSeq`
/// is the newest resourceVersion seen before (absent if none).
async fn health(State(st): State<AppState>) -> HealthJson<Health> {
    use std::sync::atomic::Ordering;
    let last_seq = match tokio::time::timeout(HEALTH_PROBE, st.store.last_seq()).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable {
            store: st.store.describe(),
            source: format!("no answer within {} s", HEALTH_PROBE.as_secs_f64()).into(),
        }),
    };
    match &last_seq {
        Ok(seq) => {
            st.last_seq.fetch_max(*seq, Ordering::Relaxed);
        }
        // The request that follows a 503 (every `vmctl` command asks
        // first) fails within the store's outage budget, not after its
        // full request timeout (found as: the first command of an etcd
        // outage took 6 s).
        Err(StoreError::Unavailable { .. }) => st.store.mark_unreachable(),
        Err(_) => {}
    }
    let known = st.last_seq.load(Ordering::Relaxed);
    let state = st.controllers.as_ref().map(|c| c.borrow().clone());
    let (controllers, lease_holder) = match state {
        None | Some(crate::lease::ControllersState::Running) => ("running", None),
        Some(crate::lease::ControllersState::Standby { holder }) => {
            ("standby", holder.map(|h| h.to_string()))
        }
    };
    HealthJson {
        ok: last_seq.is_ok(),
        body: Health {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            driver: st.cfg.driver.clone(),
            data_dir: st.cfg.data_dir.display().to_string(),
            last_seq: last_seq
                .as_ref()
                .ok()
                .copied()
                .or((known > 0).then_some(known)),
            store: st.store.describe(),
            store_error: last_seq.err().map(|e| vmctl_api::error_chain(&e)),
            controllers: controllers.into(),
            lease_holder,
        },
    }
}

async fn apply(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<ApplyRequest, MAX_APPLY_BODY_BYTES>,
) -> ApiResult<Json<ApplyResponse>> {
    let backend = vmctl_api::validate::Backend::from_driver(&st.cfg.driver);
    let resp = actions::apply(&*st.store, backend, req)
        .await
        .map_err(action_error)?;
    Ok(Json(resp))
}

/// The answer to an action's error: one explicit arm per kind.
fn action_error(e: ActionError) -> ApiError {
    match e {
        ActionError::Malformed { .. } => {
            ApiError::bad_request(e.to_string(), "compare with `vmctl schema`")
        }
        ActionError::Invalid { .. } => {
            ApiError::bad_request(e.to_string(), "run `vmctl validate` on the file")
        }
        ActionError::Stale { ref object, .. } => ApiError::new(
            StatusCode::CONFLICT,
            "vmctl::api::conflict",
            e.to_string(),
            Some(&format!(
                "read it again (`vmctl get {} {} -o yaml`) and redo the change, or drop metadata.resourceVersion to overwrite",
                object.kind.short(),
                object.name
            )),
        ),
        ActionError::AlreadyExists { .. } => ApiError::new(
            StatusCode::CONFLICT,
            "vmctl::api::already_exists",
            e.to_string(),
            vmctl_api::codes::help("vmctl::api::already_exists"),
        ),
        ActionError::Snapshot { ref reason, .. } => {
            use crate::snapshots::SnapshotRefusal;
            let status = match reason {
                SnapshotRefusal::VmNotFound { .. } => StatusCode::NOT_FOUND,
                SnapshotRefusal::VmChanged { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                SnapshotRefusal::VmDeleting { .. }
                | SnapshotRefusal::NotReady { .. }
                | SnapshotRefusal::NeedsStoppedVm { .. } => StatusCode::CONFLICT,
            };
            let code = reason.code();
            ApiError::new(status, code, e.to_string(), vmctl_api::codes::help(code))
        }
        ActionError::NodeReady { .. } => {
            let code = "vmctl::node::ready";
            ApiError::new(
                StatusCode::CONFLICT,
                code,
                e.to_string(),
                vmctl_api::codes::help(code),
            )
        }
        ActionError::Finalizer(e) => finalizer_error(e),
        ActionError::Store(e) => e.into(),
    }
}

fn finalizer_error(e: FinalizerError) -> ApiError {
    match &e {
        FinalizerError::Protected(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "vmctl::api::protected_finalizer",
            e.to_string(),
            Some(
                "let the controller clear it; pass --force only if that controller can never finish",
            ),
        ),
        FinalizerError::InvalidName(..) | FinalizerError::Absent { .. } => ApiError::bad_request(
            e.to_string(),
            "`vmctl get KIND NAME -o yaml` shows an object's finalizers",
        ),
    }
}

async fn patch_one(
    State(st): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
    ApiJson(patch): ApiJson<PatchRequest, MAX_BODY_BYTES>,
) -> ApiResult<Json<Option<Object>>> {
    let r = ObjectRef::new(parse_kind(&kind)?, name);
    let obj = actions::patch(&*st.store, &r, &patch)
        .await
        .map_err(action_error)?;
    Ok(Json(obj))
}

/// The query of the list endpoints.
#[derive(Debug, Deserialize, JsonSchema)]
struct ListQuery {
    /// `key=value[,key=value]` label selector.
    #[serde(default)]
    labels: Option<String>,
}

fn selector(q: &ListQuery) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in q
        .labels
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            ApiError::bad_request(
                format!("label selector `{part}` has no `=`"),
                "write labels=key=value[,key=value]",
            )
        })?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

async fn list(st: AppState, kind: Option<Kind>, q: ListQuery) -> ApiResult<RawJson<ObjectList>> {
    let sel = selector(&q)?;
    if let Some(cache) = &st.cache {
        // Read your writes: wait for what the store has acknowledged so far.
        if cache
            .caught_up(
                st.store.last_seq().await?,
                std::time::Duration::from_secs(1),
            )
            .await
        {
            let body = cache.list_json(kind, |o| {
                sel.iter().all(|(k, v)| o.metadata.labels.get(k) == Some(v))
            });
            return Ok(RawJson::from_bytes(body));
        }
    }
    let listing = st.store.list(kind).await?;
    let items = listing
        .objects
        .into_iter()
        .filter(|o| sel.iter().all(|(k, v)| o.metadata.labels.get(k) == Some(v)))
        .collect();
    Ok(RawJson::from_value(&ObjectList {
        items,
        resource_version: listing.resource_version,
    }))
}

async fn list_all(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<RawJson<ObjectList>> {
    list(st, None, q).await
}

async fn list_kind(
    State(st): State<AppState>,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<RawJson<ObjectList>> {
    let kind = parse_kind(&kind)?;
    list(st, Some(kind), q).await
}

async fn get_one(
    State(st): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Object>> {
    let r = ObjectRef::new(parse_kind(&kind)?, name);
    match st.store.get(&r).await? {
        Some(o) => Ok(Json(o)),
        None => Err(StoreError::NotFound(r).into()),
    }
}

async fn delete_one(
    State(st): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Accepted<Option<Object>>> {
    let r = ObjectRef::new(parse_kind(&kind)?, name);
    let obj = actions::delete(&*st.store, &r)
        .await
        .map_err(action_error)?;
    Ok(Accepted(obj))
}

async fn history(
    State(st): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<vmctl_store::Event>>> {
    let r = ObjectRef::new(parse_kind(&kind)?, name);
    Ok(Json(st.store.history(&r).await?))
}

/// A recorded note on the wire.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct NoteOut {
    /// The note's sequence number in the log.
    seq: u64,
    /// When it was recorded.
    time: vmctl_api::Time,
    /// The note.
    #[serde(flatten)]
    note: vmctl_api::Note,
}

async fn notes(st: AppState, r: Option<ObjectRef>) -> ApiResult<Json<Vec<NoteOut>>> {
    let notes = st.store.notes(r.as_ref()).await?;
    Ok(Json(
        notes
            .into_iter()
            .map(|n| NoteOut {
                seq: n.seq,
                time: n.time,
                note: n.note,
            })
            .collect(),
    ))
}

async fn notes_all(State(st): State<AppState>) -> ApiResult<Json<Vec<NoteOut>>> {
    notes(st, None).await
}

async fn notes_one(
    State(st): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<Vec<NoteOut>>> {
    let r = ObjectRef::new(parse_kind(&kind)?, name);
    notes(st, Some(r)).await
}

/// The query of `/v1/watch`.
#[derive(Debug, Deserialize, JsonSchema)]
struct WatchQuery {
    /// Stream events with a sequence above this.
    #[serde(default)]
    after: u64,
}

/// One line of `/v1/watch`: an event, or the last line telling the
/// client to list again.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
enum WatchLine<'a> {
    /// An event of the log.
    Event(&'a vmctl_store::Event),
    /// The watcher fell behind or the log was compacted: list again and
    /// watch from the listing's resourceVersion. Ends the stream.
    Resync(Resync),
}

/// The `{"type":"resync","message":…}` line.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Resync {
    /// List again.
    Resync {
        /// Why the stream ended.
        message: String,
    },
}

impl WatchLine<'_> {
    fn to_line(&self) -> Bytes {
        let mut line = serde_json::to_vec(self).expect("wire types serialise");
        line.push(b'\n');
        Bytes::from(line)
    }
}

async fn watch(
    State(st): State<AppState>,
    Query(q): Query<WatchQuery>,
) -> ApiResult<NdJson<WatchLine<'static>>> {
    let mut w = st.store.watch(q.after).await.map_err(ApiError::from)?;
    let stream = async_stream(move |tx| async move {
        loop {
            match w.next().await {
                Ok(ev) => {
                    if tx.send(WatchLine::Event(&ev).to_line()).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let line = WatchLine::Resync(Resync::Resync {
                        message: e.to_string(),
                    });
                    let _ = tx.send(line.to_line()).await;
                    return;
                }
            }
        }
    });
    Ok(NdJson::new(Body::from_stream(stream)))
}

/// A stream fed by a task through a small bounded channel: a slow client
/// only slows its own task, never a writer.
fn async_stream<F, Fut>(
    f: F,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

/// The query of `/v1/logs/{name}`.
#[derive(Debug, Deserialize, JsonSchema)]
struct LogQuery {
    /// `console` or `provision`.
    source: String,
    /// Only the last N lines (0: all).
    #[serde(default)]
    tail: usize,
    /// Keep streaming what is appended.
    #[serde(default)]
    follow: bool,
    /// Start at the current end of the log (only what is appended from now).
    #[serde(default)]
    skip_existing: bool,
    /// Start at this byte offset of the log (tail and skip_existing are
    /// then ignored): a client that has read N bytes asks for the rest.
    #[serde(default)]
    offset: Option<u64>,
}

/// The last `n` lines of `text` (all when `n` is 0).
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return text;
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// The bytes of `path` from `offset` on, and the offset after them; from
/// the start when the file is shorter than `offset` (truncated or
/// recreated). A missing or unreadable file reads as empty.
async fn read_from(path: &std::path::Path, offset: u64) -> (Vec<u8>, u64) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return (Vec::new(), 0);
    };
    let len = f.metadata().await.map_or(0, |m| m.len());
    let start = if len < offset { 0 } else { offset };
    let mut buf = Vec::new();
    if f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return (buf, start);
    }
    // What was read before an error is still good.
    let _ = f.read_to_end(&mut buf).await;
    let end = start + buf.len() as u64;
    (buf, end)
}

/// Changes to one log file, as inotify reports them (the `notify` crate):
/// its directory is watched, so a file created, appended to, truncated or
/// replaced wakes [`LogFollow::changed`]. Wakes coalesce; nothing polls.
struct LogFollow {
    /// Notified after each change (a permit is kept while nobody waits).
    changed: Arc<tokio::sync::Notify>,
    /// Keeps the inotify watch alive; dropping it ends the watch.
    _watcher: notify::RecommendedWatcher,
}

impl LogFollow {
    /// Watches `dir` for changes to `file` (a file in it).
    ///
    /// Errors: the `notify` error when inotify cannot watch `dir` (it is
    /// gone, or the inotify limits are reached).
    fn start(dir: &std::path::Path, file: &std::path::Path) -> notify::Result<Self> {
        use notify::Watcher as _;
        let changed = Arc::new(tokio::sync::Notify::new());
        let wake = changed.clone();
        let file = file.to_owned();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // An error or a lost event (queue overflow) may hide a change.
            let relevant = match &ev {
                Ok(ev) => ev.need_rescan() || ev.paths.contains(&file),
                Err(_) => true,
            };
            if relevant {
                wake.notify_one();
            }
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(LogFollow {
            changed,
            _watcher: watcher,
        })
    }
}

/// Resolves once the VM `r` is deleted, watching the store from
/// resourceVersion `after` (the VM's, when it was read). Should the watch
/// fail (compacted, store unavailable), it looks at the VM again and
/// watches on from there; a store that keeps failing is asked again
/// after a second.
async fn vm_deleted(store: Arc<dyn Store>, r: ObjectRef, mut after: u64) {
    loop {
        if let Ok(mut w) = store.watch(after).await {
            loop {
                match w.next().await {
                    Ok(ev)
                        if ev.object == r && matches!(ev.change, vmctl_store::Change::Deleted) =>
                    {
                        return;
                    }
                    Ok(ev) => after = ev.seq,
                    Err(_) => break,
                }
            }
        }
        // The store's position before the look: nothing after it is missed.
        let now = store.last_seq().await;
        match (now, store.get(&r).await) {
            (_, Ok(None)) => return,
            (Ok(now), Ok(Some(_))) => after = now,
            _ => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
        }
    }
}

async fn logs(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Text> {
    let file = match q.source.as_str() {
        "console" => "console.log",
        "provision" => "provision.log",
        other => {
            return Err(ApiError::bad_request(
                format!("unknown log source `{other}`"),
                "use source=console or source=provision",
            ));
        }
    };
    vmctl_api::names::check_name(&name)
        .map_err(|m| ApiError::bad_request(m, vmctl_api::names::NAME_HELP))?;
    let r = ObjectRef::new(Kind::VirtualMachine, name.clone());
    let obj = st
        .store
        .get(&r)
        .await?
        .ok_or(StoreError::NotFound(r.clone()))?;
    let work_dir = obj
        .status
        .as_ref()
        .and_then(|s| s.get("runtime"))
        .and_then(|rt| rt.get("workDir"))
        .and_then(|w| w.as_str())
        .map(std::path::PathBuf::from)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "vmctl::vm::invalid_state",
                format!("VM {name} has no work directory yet"),
                Some("wait until it has started once"),
            )
        })?;
    let path = work_dir.join(file);
    // Set up before the first read: nothing appended after it is missed.
    let follow = if q.follow {
        Some(LogFollow::start(&work_dir, &path).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "vmctl::io",
                format!("cannot follow {}: {e}", path.display()),
                Some("see the agent log; without --follow the log can still be read"),
            )
        })?)
    } else {
        None
    };
    let store = st.store.clone();
    let rv = obj.metadata.resource_version;
    let stream = async_stream(move |tx| async move {
        let offset = match q.offset {
            Some(o) => o,
            None if q.skip_existing => tokio::fs::metadata(&path)
                .await
                .map(|m| m.len())
                .unwrap_or(0),
            None => 0,
        };
        let (new, mut offset) = read_from(&path, offset).await;
        let first = q.offset.is_none() && !q.skip_existing;
        let chunk = if first {
            last_lines(&new, q.tail)
        } else {
            &new
        };
        if !chunk.is_empty() && tx.send(Bytes::copy_from_slice(chunk)).await.is_err() {
            return;
        }
        let Some(follow) = follow else { return };
        // A deleted VM ends the stream, after what was written before.
        let gone = vm_deleted(store, r, rv);
        tokio::pin!(gone);
        loop {
            let last = tokio::select! {
                () = follow.changed.notified() => false,
                () = &mut gone => true,
                () = tx.closed() => return,
            };
            let (new, next) = read_from(&path, offset).await;
            offset = next;
            if (!new.is_empty() && tx.send(Bytes::from(new)).await.is_err()) || last {
                return;
            }
        }
    });
    Ok(Text(Body::from_stream(stream)))
}
