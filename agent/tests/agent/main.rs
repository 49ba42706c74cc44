//! The agent's API in process: the OpenAPI document and the router agree;
//! errors, limits, the socket, concurrency and finalizers.

mod cluster;
mod concurrency;
mod errors;
mod etcd;
mod forward;
mod full_disk;
mod limits;
mod socket;
mod streams;
mod writes;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;
use vmctl_agent::api::{AppState, router};
use vmctl_agent::{AgentConfig, openapi};

/// The router over a fresh store, and the store.
pub fn app_with_store() -> (tempfile::TempDir, Arc<vmctl_store::SledStore>, axum::Router) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(vmctl_store::SledStore::open(dir.path().join("db")).unwrap());
    let app = router(AppState::new(
        store.clone(),
        AgentConfig::new(dir.path().to_path_buf()),
    ));
    (dir, store, app)
}

/// The router over a fresh store.
pub fn app() -> (tempfile::TempDir, axum::Router) {
    let (dir, _, app) = app_with_store();
    (dir, app)
}

#[test]
fn checked_in_openapi_json_is_the_generated_document() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let want = openapi::document();
    if std::env::var_os("VMCTL_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "agent/openapi.json drifted; regenerate with `VMCTL_BLESS=1 cargo test -p vmctl-agent --test agent`"
    );
}

/// The paths of `app`'s route table. axum has no API to list routes, but
/// its `Debug` output prints the table (`paths: {RouteId(0): "/v1/…"}`);
/// the caller checks that known paths are found, so a change of that
/// format fails loudly instead of finding nothing.
fn router_paths(app: &axum::Router) -> Vec<String> {
    let debug = format!("{app:?}");
    let table = debug
        .split_once("path_router")
        .map(|(_, rest)| rest.split_once("fallback_router").map_or(rest, |(t, _)| t))
        .unwrap_or_default();
    let mut paths: Vec<String> = table
        .split("RouteId(")
        .skip(1)
        .filter_map(|s| s.split_once("): \"").map(|(_, rest)| rest))
        .filter_map(|s| s.split_once('"').map(|(p, _)| p.to_owned()))
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// A concrete request path for a route path: every `{param}` is `x`.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// What `app` serves, as `METHOD path`: every path of its route table
/// asked with every method; a method is served unless it answers 405.
async fn served_routes(app: &axum::Router) -> Vec<String> {
    let mut served = Vec::new();
    for path in router_paths(app) {
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let req = Request::builder()
                .method(method)
                .uri(concrete(&path))
                .body(Body::from("{}"))
                .unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            if resp.status() != axum::http::StatusCode::METHOD_NOT_ALLOWED {
                served.push(format!("{method} {path}"));
            }
        }
    }
    served.sort();
    served
}

/// Every operation of the OpenAPI document, as `METHOD path`.
fn documented_routes(doc: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    out.sort();
    out
}

fn undocumented(served: &[String], documented: &[String]) -> Vec<String> {
    served
        .iter()
        .filter(|r| !documented.contains(r))
        .cloned()
        .collect()
}

#[tokio::test]
async fn every_served_route_is_documented() {
    let (_dir, app) = app();
    let doc: serde_json::Value = serde_json::from_str(&openapi::document()).unwrap();
    let documented = documented_routes(&doc);
    let paths = router_paths(&app);
    assert!(
        paths.iter().any(|p| p == "/v1/healthz") && paths.iter().any(|p| p == "/v1/watch"),
        "the router's route table was not found in its Debug output: {paths:?}"
    );
    let served = served_routes(&app).await;
    assert!(served.len() >= documented.len(), "{served:?}");
    let missing = undocumented(&served, &documented);
    assert!(
        missing.is_empty(),
        "served but not in the OpenAPI document: {missing:?}; register them with ApiRouter::endpoint in agent/src/api.rs"
    );
}

#[tokio::test]
async fn a_route_served_around_the_api_router_fails_the_drift_check() {
    let (_dir, app) = app();
    let app = app.route(
        "/v1/undocumented/{name}",
        axum::routing::get(|| async { "x" }).put(|| async { "y" }),
    );
    let doc: serde_json::Value = serde_json::from_str(&openapi::document()).unwrap();
    let missing = undocumented(&served_routes(&app).await, &documented_routes(&doc));
    assert_eq!(
        missing,
        ["GET /v1/undocumented/{name}", "PUT /v1/undocumented/{name}"]
    );
}

#[tokio::test]
async fn every_documented_route_is_served_with_its_documented_status() {
    let (_dir, app) = app();
    for e in openapi::endpoints() {
        let mut path = e.path.replace("{kind}", "vm").replace("{name}", "x");
        if path.starts_with("/v1/logs") {
            path.push_str("?source=console");
        }
        let body = if e.path == "/v1/images/inspect" {
            Body::from("{\"path\":\"/nonexistent/x.qcow2\"}")
        } else if e.path.ends_with("/exec") {
            Body::from("{\"command\":[\"true\"]}")
        } else if e.path == "/v1/apply" {
            Body::from("{\"objects\":[]}")
        } else if e.operation.request.is_some() {
            Body::from("{}")
        } else {
            Body::empty()
        };
        let req = Request::builder()
            .method(e.method.clone())
            .uri(&path)
            .body(body)
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let documented = e.operation.response.expect("a documented answer");
        if path == "/v1/watch" {
            assert_eq!(status, 200);
            continue;
        }
        let content_type = resp
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("vmctl::api::no_route") && status != 405,
            "{} {path} is documented but not served",
            e.method
        );
        assert!(
            status == documented.status || status == 404,
            "{} {path}: {status} {text}",
            e.method
        );
        if status == documented.status {
            assert!(
                content_type.starts_with(documented.media_type),
                "{} {path}: answered {content_type}, documented {}",
                e.method,
                documented.media_type
            );
        }
    }
}

/// Every `$ref` in `v`.
fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v.as_str()) {
                    ("$ref", Some(r)) => out.push(r.to_owned()),
                    _ => refs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_documented_operation_has_its_request_and_response_schema() {
    let doc: serde_json::Value = serde_json::from_str(&openapi::document()).unwrap();
    let mut ops = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops += 1;
            let responses = op["responses"].as_object().unwrap();
            let ok: Vec<_> = responses
                .keys()
                .filter(|k| k.starts_with('2') || k.as_str() == "101")
                .collect();
            assert_eq!(ok.len(), 1, "{method} {path}: one success answer");
            if ok[0] == "101" {
                // Switching Protocols: raw bytes follow, not a body.
                assert!(responses["101"].get("content").is_none(), "{method} {path}");
            } else {
                let content = responses[ok[0]]["content"].as_object().unwrap();
                assert!(
                    !content.is_empty() && content.values().all(|c| c.get("schema").is_some()),
                    "{method} {path}: the answer has a schema: {content:?}"
                );
            }
            let takes_body = matches!(method.as_str(), "post" | "put" | "patch");
            let request = op["requestBody"]["content"]
                .as_object()
                .and_then(|c| c.values().next())
                .map(|c| &c["schema"]);
            assert_eq!(
                request.is_some_and(|r| r.is_object()),
                takes_body,
                "{method} {path}: a request schema exactly when the method takes a body"
            );
            assert!(
                responses["default"]["content"]["application/json"]["schema"].is_object(),
                "{method} {path}: errors documented"
            );
        }
    }
    assert!(ops >= 13, "{ops}");
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} is not defined"
        );
    }
}

#[tokio::test]
async fn the_agent_serves_its_openapi_document() {
    let (_dir, app) = app();
    let req = Request::builder()
        .uri("/v1/openapi.json")
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes), openapi::document());
}
