//! The API defined once: every endpoint is registered through
//! [`ApiRouter::endpoint`], which serves the handler and describes it from
//! the handler's own signature. Its arguments say what it takes (a
//! [`ApiJson`](crate::rejection::ApiJson) body with its size limit, an
//! [`ApiQuery`](crate::rejection::ApiQuery) struct whose fields are the
//! query parameters) and its return type says what it answers ([`Json`],
//! [`Accepted`], [`RawJson`], [`NdJson`], [`Text`]). A handler whose
//! argument or answer has no description does not compile, so no endpoint
//! is served undocumented; `GET /v1/openapi.json` serves the document and
//! `agent/openapi.json` is its checked-in copy (tests fail when either
//! drifts, or when a route is served around [`ApiRouter`]).
//!
//! ```text
//!  handler fn(State, ApiPath, ApiQuery<Q>, ApiJson<B, LIMIT>) -> ApiResult<Json<R>>
//!      │ ApiRouter::endpoint(GET, "/v1/…", summary, handler)
//!      ├──▶ axum Router (served)
//!      └──▶ Endpoint { Q's fields, B + LIMIT, R } ──▶ document() (OpenAPI 3.1)
//! ```
//!
//! Own code rather than a crate: the wire types derive schemars'
//! `JsonSchema` (which also writes `schemas/` and `vmctl schema`); utoipa
//! would need a second, differently behaving derive on every wire type,
//! and aide (the schemars-based axum crate) supports schemars 1 only in
//! alpha releases.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::LazyLock;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, Router, on};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Value, json};
use vmctl_api::wire::ErrorBody;

use crate::api::ApiError;
use vmctl_api::limits::human_bytes;

use crate::rejection::{ApiBytes, ApiJson, ApiPath, ApiQuery};

/// Builds a JSON Schema for a type, registering definitions in the generator.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// A request body: its media type, schema and the largest accepted size
/// in bytes.
#[derive(Debug, Clone, Copy)]
pub struct RequestDoc {
    /// Media type of the body (`application/json`,
    /// `application/octet-stream`).
    pub media_type: &'static str,
    /// Schema of the body.
    pub schema: SchemaFn,
    /// Largest accepted body in bytes (413 beyond).
    pub max_bytes: usize,
}

/// The success answer of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ResponseDoc {
    /// HTTP status of success (200, 202; 101 for a byte stream).
    pub status: u16,
    /// Media type of the body (`application/json`, `application/x-ndjson`,
    /// `text/plain`, `application/octet-stream`); empty for a 101, whose
    /// connection carries raw bytes instead of a body.
    pub media_type: &'static str,
    /// Schema of the body (of each line for NDJSON); `None` for a 101.
    pub schema: Option<SchemaFn>,
    /// What the body is.
    pub description: &'static str,
}

/// What a handler's signature says about its operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Operation {
    /// The JSON request body, for handlers taking [`ApiJson`].
    pub request: Option<RequestDoc>,
    /// Schema of the query struct, for handlers taking [`ApiQuery`]: its
    /// properties are the query parameters.
    pub query: Option<SchemaFn>,
    /// The success answer (every handler's return type gives one).
    pub response: Option<ResponseDoc>,
}

/// One served and documented endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// HTTP method.
    pub method: Method,
    /// Path with `{param}`s, as axum routes it.
    pub path: &'static str,
    /// One-line summary.
    pub summary: &'static str,
    /// What the handler takes and answers.
    pub operation: Operation,
}

/// A handler argument (an axum extractor) that describes its part of the
/// request. Implemented for the extractors the API uses; a handler taking
/// another one does not compile until it says what it documents.
pub trait DocArg {
    /// Adds this argument's part (request body, query parameters) to `op`.
    fn document(_op: &mut Operation) {}
}

impl<S> DocArg for State<S> {}
impl DocArg for HeaderMap {}
/// Path parameters are read from the route's path (`{kind}`, `{name}`).
impl<T> DocArg for ApiPath<T> {}

impl<T: JsonSchema> DocArg for ApiQuery<T> {
    fn document(op: &mut Operation) {
        op.query = Some(s::<T>);
    }
}

impl<T: JsonSchema, const LIMIT: usize> DocArg for ApiJson<T, LIMIT> {
    fn document(op: &mut Operation) {
        op.request = Some(RequestDoc {
            media_type: "application/json",
            schema: s::<T>,
            max_bytes: LIMIT,
        });
    }
}

/// A handler's answer that describes itself. A handler answering a bare
/// [`Response`] does not compile: use one of the typed answers.
pub trait DocResponse {
    /// The success answer.
    fn response() -> ResponseDoc;
}

impl<T: DocResponse> DocResponse for Result<T, ApiError> {
    fn response() -> ResponseDoc {
        T::response()
    }
}

impl<T: JsonSchema> DocResponse for Json<T> {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 200,
            media_type: "application/json",
            schema: Some(s::<T>),
            description: "OK",
        }
    }
}

/// A JSON answer whose status says whether the agent can serve: 200, or
/// 503 Service Unavailable with the same body (`/v1/healthz` while the
/// store is unavailable).
#[derive(Debug)]
pub struct HealthJson<T> {
    /// Whether it can serve (200) or not (503).
    pub ok: bool,
    /// The body.
    pub body: T,
}

impl<T: serde::Serialize> IntoResponse for HealthJson<T> {
    fn into_response(self) -> Response {
        let status = if self.ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, Json(self.body)).into_response()
    }
}

impl<T: JsonSchema> DocResponse for HealthJson<T> {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 200,
            media_type: "application/json",
            schema: Some(s::<T>),
            description: "OK; 503 with the same body while the store is unavailable",
        }
    }
}

/// A `202 Accepted` JSON answer.
#[derive(Debug)]
pub struct Accepted<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Accepted<T> {
    fn into_response(self) -> Response {
        (StatusCode::ACCEPTED, Json(self.0)).into_response()
    }
}

impl<T: JsonSchema> DocResponse for Accepted<T> {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 202,
            media_type: "application/json",
            schema: Some(s::<T>),
            description: "Accepted",
        }
    }
}

/// A JSON answer already serialised (e.g. from a cache) as a `T`.
#[derive(Debug)]
pub struct RawJson<T>(Bytes, PhantomData<T>);

impl<T: serde::Serialize> RawJson<T> {
    /// Serialises `value`.
    pub fn from_value(value: &T) -> Self {
        RawJson(
            serde_json::to_vec(value)
                .expect("wire types serialise")
                .into(),
            PhantomData,
        )
    }
}

impl<T> RawJson<T> {
    /// Bytes that are the JSON of a `T` (the caller vouches for it).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        RawJson(bytes.into(), PhantomData)
    }
}

impl<T> IntoResponse for RawJson<T> {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

impl<T: JsonSchema> DocResponse for RawJson<T> {
    fn response() -> ResponseDoc {
        <Json<T> as DocResponse>::response()
    }
}

/// A stream of newline-delimited JSON values, each a `T`.
#[derive(Debug)]
pub struct NdJson<T>(Body, PhantomData<T>);

impl<T> NdJson<T> {
    /// A stream whose chunks are whole lines, each the JSON of a `T`.
    pub fn new(body: Body) -> Self {
        NdJson(body, PhantomData)
    }
}

impl<T> IntoResponse for NdJson<T> {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/x-ndjson")], self.0).into_response()
    }
}

impl<T: JsonSchema> DocResponse for NdJson<T> {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 200,
            media_type: "application/x-ndjson",
            schema: Some(s::<T>),
            description: "A stream of newline-delimited JSON; the schema is that of one line",
        }
    }
}

/// A (possibly streamed) UTF-8 text answer.
#[derive(Debug)]
pub struct Text(pub Body);

impl IntoResponse for Text {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.0,
        )
            .into_response()
    }
}

impl DocResponse for Text {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 200,
            media_type: "text/plain",
            schema: Some(s::<String>),
            description: "Text",
        }
    }
}

/// Metrics in the OpenMetrics 1.0 text format, which Prometheus scrapes
/// (<https://github.com/OpenObservability/OpenMetrics/blob/main/specification/OpenMetrics.md>).
#[derive(Debug)]
pub struct OpenMetricsText(pub String);

impl IntoResponse for OpenMetricsText {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                vmctl_controllers::metrics::CONTENT_TYPE,
            )],
            self.0,
        )
            .into_response()
    }
}

impl DocResponse for OpenMetricsText {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 200,
            media_type: "application/openmetrics-text",
            schema: Some(s::<String>),
            description: "Metrics in the OpenMetrics 1.0 text format",
        }
    }
}

/// Bytes of any content (a file), documented as a binary string.
#[derive(Debug)]
pub struct Binary;

impl JsonSchema for Binary {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Binary".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "binary",
            "description": "Raw bytes"
        })
    }
}

impl<const LIMIT: usize> DocArg for ApiBytes<LIMIT> {
    fn document(op: &mut Operation) {
        op.request = Some(RequestDoc {
            media_type: "application/octet-stream",
            schema: s::<Binary>,
            max_bytes: LIMIT,
        });
    }
}

/// A file's bytes (`application/octet-stream`), with extra headers (e.g.
/// its mode).
#[derive(Debug)]
pub struct Bytes200 {
    /// Extra headers of the answer.
    pub headers: HeaderMap,
    /// The bytes.
    pub body: Bytes,
}

impl IntoResponse for Bytes200 {
    fn into_response(self) -> Response {
        let mut resp = (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            self.body,
        )
            .into_response();
        resp.headers_mut().extend(self.headers);
        resp
    }
}

impl DocResponse for Bytes200 {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 200,
            media_type: "application/octet-stream",
            schema: Some(s::<Binary>),
            description: "The bytes",
        }
    }
}

/// A request to switch the connection to a raw byte stream
/// (`Connection: Upgrade`, `Upgrade: tcp`; see
/// [`vmctl_api::streams::UPGRADE_PROTOCOL`]). Never refuses by itself, so
/// that the handler can answer a missing VM first; [`UpgradeRequest::accept`]
/// refuses a request that did not ask to switch (426).
#[derive(Debug)]
pub struct UpgradeRequest {
    asked: bool,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for UpgradeRequest {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(UpgradeRequest {
            asked: wants_upgrade(&parts.headers),
            on_upgrade: parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        })
    }
}

impl DocArg for UpgradeRequest {}

/// Whether `headers` ask for an upgrade to
/// [`vmctl_api::streams::UPGRADE_PROTOCOL`].
fn wants_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, vmctl_api::streams::UPGRADE_PROTOCOL)
}

impl UpgradeRequest {
    /// The pending switch, to answer with [`SwitchingProtocols`].
    ///
    /// Errors: 426 when the request did not ask to switch; 400 when it did
    /// but its connection cannot (not served by [`crate::http::serve`]).
    pub fn accept(self) -> Result<hyper::upgrade::OnUpgrade, ApiError> {
        if !self.asked {
            return Err(ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "vmctl::api::bad_request",
                "this endpoint is a byte stream: the request must ask to switch protocols",
                Some(
                    "send `Connection: Upgrade` and `Upgrade: tcp` (vmctl console / vmctl ssh do)",
                ),
            ));
        }
        self.on_upgrade.ok_or_else(|| {
            ApiError::bad_request(
                "this connection cannot switch protocols",
                "use HTTP/1.1 on the agent's socket",
            )
        })
    }
}

/// `101 Switching Protocols` to a raw byte stream: after it the connection
/// carries bytes both ways (the handler has spawned what copies them).
#[derive(Debug)]
pub struct SwitchingProtocols;

impl IntoResponse for SwitchingProtocols {
    fn into_response(self) -> Response {
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, "upgrade"),
                (header::UPGRADE, vmctl_api::streams::UPGRADE_PROTOCOL),
            ],
        )
            .into_response()
    }
}

impl DocResponse for SwitchingProtocols {
    fn response() -> ResponseDoc {
        ResponseDoc {
            status: 101,
            media_type: "",
            schema: None,
            description: "Switching Protocols: from now on the connection carries raw bytes both ways (send Connection: Upgrade and Upgrade: tcp)",
        }
    }
}

/// A handler whose arguments and answer describe its operation.
/// `Args` is the tuple of argument types (inferred).
pub trait DocHandler<Args> {
    /// The operation the handler serves.
    fn operation() -> Operation;
}

macro_rules! doc_handler {
    ($($arg:ident),*) => {
        impl<F, Fut, R, $($arg,)*> DocHandler<($($arg,)*)> for F
        where
            F: Fn($($arg),*) -> Fut,
            Fut: Future<Output = R>,
            R: DocResponse,
            $($arg: DocArg,)*
        {
            fn operation() -> Operation {
                let mut op = Operation::default();
                $($arg::document(&mut op);)*
                op.response = Some(R::response());
                op
            }
        }
    };
}

doc_handler!();
doc_handler!(A1);
doc_handler!(A1, A2);
doc_handler!(A1, A2, A3);
doc_handler!(A1, A2, A3, A4);
doc_handler!(A1, A2, A3, A4, A5);

/// An axum router that documents every endpoint it serves.
#[derive(Debug)]
pub struct ApiRouter<S> {
    router: Router<S>,
    endpoints: Vec<Endpoint>,
}

impl<S: Clone + Send + Sync + 'static> Default for ApiRouter<S> {
    fn default() -> Self {
        ApiRouter {
            router: Router::new(),
            endpoints: Vec::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> ApiRouter<S> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `handler` at `method path` and documents it with `summary`
    /// and what its signature says.
    ///
    /// # Panics
    /// When `method` is not one axum routes by (GET, POST, PUT, PATCH,
    /// DELETE, …) or the route overlaps one already added (axum's check).
    pub fn endpoint<H, T, D>(
        mut self,
        method: Method,
        path: &'static str,
        summary: &'static str,
        handler: H,
    ) -> Self
    where
        H: Handler<T, S> + DocHandler<D>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a routable method");
        self.router = self.router.route(path, on(filter, handler));
        self.endpoints.push(Endpoint {
            method,
            path,
            summary,
            operation: H::operation(),
        });
        self
    }

    /// The documented endpoints, in the order added.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The axum router and the endpoints it serves.
    pub fn into_parts(self) -> (Router<S>, Vec<Endpoint>) {
        (self.router, self.endpoints)
    }
}

/// Every endpoint of the agent (what [`crate::api::router`] serves).
pub fn endpoints() -> &'static [Endpoint] {
    static ENDPOINTS: LazyLock<Vec<Endpoint>> =
        LazyLock::new(|| crate::api::routes().into_parts().1);
    &ENDPOINTS
}

/// The methods `path` (a concrete request path) is served with, lowercase,
/// in the order of [`endpoints`]; empty when no endpoint matches.
pub fn allowed_methods(path: &str) -> Vec<String> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    endpoints()
        .iter()
        .filter(|e| {
            let pat: Vec<&str> = e.path.split('/').collect();
            pat.len() == segs.len()
                && pat
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
        })
        .map(|e| e.method.as_str().to_lowercase())
        .collect()
}

/// The document's description: transport and limits.
const DESCRIPTION: &str = "JSON over HTTP/1.1 on the agent's Unix socket (curl --unix-socket works). \
Every error answers with the ErrorBody JSON (code, message, help), 404 and 405 included. \
Limits: request bodies as documented per endpoint (413 beyond); a request header must arrive \
within 10 s of the connection being ready for it (idle keep-alive included), a body within \
30 s and with no pause over 10 s (408); at most 4,096 connections are served at once \
(fewer when the agent may open few files), further ones wait.";

/// The query parameters of a query struct: its properties, inlined.
fn query_params(schema: SchemaFn) -> Vec<Value> {
    let mut g = schemars::generate::SchemaSettings::openapi3()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let root = schema(&mut g);
    let required: Vec<&str> = root
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = root.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, prop)| {
            let mut prop = prop.clone();
            let description = prop
                .as_object_mut()
                .and_then(|p| p.remove("description"))
                .unwrap_or(Value::Null);
            json!({"name": name, "in": "query", "required": required.contains(&name.as_str()),
                   "description": description, "schema": prop})
        })
        .collect()
}

/// The OpenAPI 3.1 document of [`endpoints`], pretty-printed with a
/// trailing newline.
pub fn document() -> String {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut paths = serde_json::Map::new();
    for e in endpoints() {
        let mut op = serde_json::Map::new();
        op.insert("summary".into(), json!(e.summary));
        let mut params: Vec<Value> = Vec::new();
        for seg in e.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                params.push(json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}));
            }
        }
        if let Some(q) = e.operation.query {
            params.extend(query_params(q));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = e.operation.request {
            let schema = (req.schema)(&mut generator);
            let what = if req.media_type == "application/json" {
                "JSON"
            } else {
                "Bytes"
            };
            op.insert(
                "requestBody".into(),
                json!({"required": true,
                       "description": format!("{what}, at most {} ({} bytes); larger bodies get 413", human_bytes(req.max_bytes as u64), req.max_bytes),
                       "content": {req.media_type: {"schema": schema}}}),
            );
        }
        let mut responses = serde_json::Map::new();
        if let Some(r) = e.operation.response {
            let answer = match r.schema {
                Some(schema) => json!({"description": r.description,
                       "content": {r.media_type: {"schema": schema(&mut generator)}}}),
                None => json!({"description": r.description}),
            };
            responses.insert(r.status.to_string(), answer);
        }
        responses.insert(
            "default".into(),
            json!({"description": "Error", "content": {"application/json": {"schema": s::<ErrorBody>(&mut generator)}}}),
        );
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths.entry(e.path.to_owned()).or_insert_with(|| json!({}));
        entry
            .as_object_mut()
            .expect("path items are objects")
            .insert(e.method.as_str().to_lowercase(), Value::Object(op));
    }
    let defs = generator.take_definitions(true);
    let doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "vmctl agent API", "version": env!("CARGO_PKG_VERSION"),
                 "description": DESCRIPTION},
        "paths": paths,
        "components": {"schemas": defs},
    });
    let mut out = serde_json::to_string_pretty(&doc).expect("JSON serialises");
    out.push('\n');
    out
}

/// The document, built once.
pub fn cached_document() -> &'static str {
    static DOC: LazyLock<String> = LazyLock::new(document);
    &DOC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        assert!(!wants_upgrade(&h));
        h.insert(header::UPGRADE, axum::http::HeaderValue::from_static("TCP"));
        assert!(!wants_upgrade(&h));
        h.insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h));
        h.insert(
            header::UPGRADE,
            axum::http::HeaderValue::from_static("websocket"),
        );
        assert!(!wants_upgrade(&h));
    }
}
