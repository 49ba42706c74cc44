//! The agent's API in process: the OpenAPI document and the router agree;
//! errors, limits, the socket, concurrency and finalizers.

mod concurrency;
mod errors;
mod etcd;
mod full_disk;
mod limits;
mod socket;

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
fn checked_in_openapi_matches_the_route_table() {
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

#[tokio::test]
async fn every_documented_route_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = vmctl_store::SledStore::open(dir.path().join("db")).unwrap();
    let app = router(AppState::new(
        Arc::new(store),
        AgentConfig::new(dir.path().to_path_buf()),
    ));
    for r in openapi::ROUTES {
        let mut path = r.path.replace("{kind}", "vm").replace("{name}", "x");
        if path.starts_with("/v1/logs") {
            path.push_str("?source=console");
        }
        let body = if r.method == "post" {
            Body::from("{\"objects\":[]}")
        } else if r.method == "patch" {
            Body::from("{}")
        } else {
            Body::empty()
        };
        let req = Request::builder()
            .method(r.method.to_uppercase().as_str())
            .uri(&path)
            .body(body)
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        if path == "/v1/watch" {
            assert_eq!(status, 200);
            continue;
        }
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("vmctl::api::no_route"),
            "{} {path} is documented but not served",
            r.method
        );
        assert!(
            status == r.response.0 || status == 404,
            "{} {path}: {status} {text}",
            r.method
        );
    }
}
