//! The API described once: the route table below is what the router serves
//! (a test checks every entry answers) and what `openapi.json` is generated
//! from (a test fails when the checked-in file drifts).

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Value, json};
use vmctl_api::Object;
use vmctl_api::wire::{ApplyRequest, ApplyResponse, ErrorBody, Health, ObjectList};

use crate::finalizers::PatchRequest;
use crate::rejection::{MAX_APPLY_BODY_BYTES, MAX_BODY_BYTES, human_bytes};

/// Builds a JSON Schema for a body, registering definitions in the generator.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// One endpoint.
#[derive(Debug)]
pub struct Route {
    /// HTTP method, lowercase.
    pub method: &'static str,
    /// Path with `{param}`s.
    pub path: &'static str,
    /// One-line summary.
    pub summary: &'static str,
    /// Request body schema.
    pub request: Option<SchemaFn>,
    /// Success status and body schema; `None` body for NDJSON streams.
    pub response: (u16, Option<SchemaFn>),
    /// Query parameters: name, description.
    pub query: &'static [(&'static str, &'static str)],
    /// Largest accepted request body in bytes (0: the endpoint takes none).
    pub max_body: usize,
}

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// Every endpoint of the agent.
pub const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/v1/healthz",
        summary: "Agent version, pid, driver and last log sequence",
        request: None,
        response: (200, Some(s::<Health>)),
        query: &[],
        max_body: 0,
    },
    Route {
        method: "post",
        path: "/v1/apply",
        summary: "Create or update objects (validated all first; nothing is written if one is invalid)",
        request: Some(s::<ApplyRequest>),
        response: (200, Some(s::<ApplyResponse>)),
        query: &[],
        max_body: MAX_APPLY_BODY_BYTES,
    },
    Route {
        method: "get",
        path: "/v1/objects",
        summary: "List objects of every kind",
        request: None,
        response: (200, Some(s::<ObjectList>)),
        query: &[("labels", "key=value[,key=value] label selector")],
        max_body: 0,
    },
    Route {
        method: "get",
        path: "/v1/objects/{kind}",
        summary: "List objects of one kind (vm, image, provision)",
        request: None,
        response: (200, Some(s::<ObjectList>)),
        query: &[("labels", "key=value[,key=value] label selector")],
        max_body: 0,
    },
    Route {
        method: "get",
        path: "/v1/objects/{kind}/{name}",
        summary: "Get one object",
        request: None,
        response: (200, Some(s::<Object>)),
        query: &[],
        max_body: 0,
    },
    Route {
        method: "delete",
        path: "/v1/objects/{kind}/{name}",
        summary: "Request deletion; the object goes once its finalizers are cleared (body: the object while it waits, null once gone)",
        request: None,
        response: (202, Some(s::<Option<Object>>)),
        query: &[],
        max_body: 0,
    },
    Route {
        method: "patch",
        path: "/v1/objects/{kind}/{name}",
        summary: "Add or remove finalizers (those under vmctl.dev/ only with force); removing the last one of an object being deleted deletes it (body: the object, null once gone)",
        request: Some(s::<PatchRequest>),
        response: (200, Some(s::<Option<Object>>)),
        query: &[],
        max_body: MAX_BODY_BYTES,
    },
    Route {
        method: "get",
        path: "/v1/history/{kind}/{name}",
        summary: "Every event of one object, oldest first",
        request: None,
        response: (200, None),
        query: &[],
        max_body: 0,
    },
    Route {
        method: "get",
        path: "/v1/notes",
        summary: "Every note (Kubernetes-style event), oldest first",
        request: None,
        response: (200, None),
        query: &[],
        max_body: 0,
    },
    Route {
        method: "get",
        path: "/v1/notes/{kind}/{name}",
        summary: "Notes about one object",
        request: None,
        response: (200, None),
        query: &[],
        max_body: 0,
    },
    Route {
        method: "get",
        path: "/v1/logs/{name}",
        summary: "A VM's console or provision log as text; follow=true keeps streaming what is appended",
        request: None,
        response: (200, None),
        query: &[
            ("source", "console or provision"),
            ("tail", "only the last N lines (0: all)"),
            ("follow", "true to keep streaming until the VM is deleted"),
            (
                "skip_existing",
                "true to start at the current end of the log",
            ),
        ],
        max_body: 0,
    },
    Route {
        method: "get",
        path: "/v1/watch",
        summary: "Newline-delimited JSON stream of events after a sequence, then live; a final {\"type\":\"resync\"} line means list again",
        request: None,
        response: (200, None),
        query: &[("after", "stream events with a sequence above this")],
        max_body: 0,
    },
];

/// The document's description: transport and limits.
const DESCRIPTION: &str = "JSON over HTTP/1.1 on the agent's Unix socket (curl --unix-socket works). \
Every error answers with the ErrorBody JSON (code, message, help), 404 and 405 included. \
Limits: request bodies as documented per endpoint (413 beyond); a request header must arrive \
within 10 s of the connection being ready for it (idle keep-alive included), a body within \
30 s and with no pause over 10 s (408); at most 4,096 connections are served at once \
(fewer when the agent may open few files), further ones wait.";

/// The methods `path` (a concrete request path) is served with, lowercase,
/// from the route table; empty when no route matches.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTES
        .iter()
        .filter(|r| {
            let pat: Vec<&str> = r.path.split('/').collect();
            pat.len() == segs.len()
                && pat
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
        })
        .map(|r| r.method)
        .collect()
}

/// The OpenAPI 3.1 document, pretty-printed with a trailing newline.
pub fn document() -> String {
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let mut op = serde_json::Map::new();
        op.insert("summary".into(), json!(r.summary));
        let mut params: Vec<Value> = Vec::new();
        for seg in r.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                params.push(json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}));
            }
        }
        for (name, desc) in r.query {
            params.push(json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "string"}}));
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = r.request {
            let schema = req(&mut generator);
            op.insert(
                "requestBody".into(),
                json!({"required": true,
                       "description": format!("JSON, at most {} ({} bytes); larger bodies get 413", human_bytes(r.max_body), r.max_body),
                       "content": {"application/json": {"schema": schema}}}),
            );
        }
        let ok = match r.response.1 {
            Some(f) => {
                json!({"description": "OK", "content": {"application/json": {"schema": f(&mut generator)}}})
            }
            None if r.path == "/v1/watch" => {
                json!({"description": "NDJSON stream of events", "content": {"application/x-ndjson": {}}})
            }
            None if r.path.starts_with("/v1/logs") => {
                json!({"description": "Log text", "content": {"text/plain": {}}})
            }
            None => json!({"description": "OK (JSON array)", "content": {"application/json": {}}}),
        };
        let err = json!({"description": "Error", "content": {"application/json": {"schema": s::<ErrorBody>(&mut generator)}}});
        op.insert(
            "responses".into(),
            json!({r.response.0.to_string(): ok, "default": err}),
        );
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry
            .as_object_mut()
            .expect("path items are objects")
            .insert(r.method.into(), Value::Object(op));
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
