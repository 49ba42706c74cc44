//! Issue 18, item 2, on the agent's side: request bodies nested deeply
//! (40,000 levels) or just under the JSON parser's recursion limit are
//! answered with a 400 and the API's JSON error, on the runtime's worker
//! threads (2 MiB stacks, as `vmctl agent` runs them), and the agent
//! keeps serving. The agent must never be the one to crash.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;
use vmctl_agent::AgentConfig;
use vmctl_agent::api::{AppState, router};

async fn call(app: &axum::Router, method: &str, uri: &str, body: String) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn object_with_spec(spec: &str) -> String {
    format!(
        "{{\"objects\":[{{\"apiVersion\":\"vmctl/v1alpha1\",\"kind\":\"VirtualMachine\",\
         \"metadata\":{{\"name\":\"deep\"}},\"spec\":{spec}}}]}}"
    )
}

#[test]
fn agent_deeply_nested_request_bodies_are_refused_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = vmctl_store::SledStore::open(dir.path().join("db")).unwrap();
    let app = router(AppState::new(
        Arc::new(store),
        AgentConfig::new(dir.path().to_path_buf()),
    ));
    // The runtime `vmctl agent` uses: worker threads with default stacks.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bodies = [
        format!("{}{}", "[".repeat(40_000), "]".repeat(40_000)),
        format!("{}{}", "{\"a\":".repeat(40_000), "}".repeat(40_000)),
        object_with_spec(&format!("{}1{}", "[".repeat(40_000), "]".repeat(40_000))),
        // Just under serde_json's limit of 128: parses, then is refused as
        // an invalid spec.
        object_with_spec(&format!("{}1{}", "[".repeat(120), "]".repeat(120))),
        object_with_spec(&format!(
            "{}1{}",
            "{\"vcpus\":".repeat(120),
            "}".repeat(120)
        )),
    ];
    for body in bodies {
        let app = app.clone();
        let head: String = body.chars().take(40).collect();
        let (status, text) = rt
            .block_on(rt.spawn(async move { call(&app, "POST", "/v1/apply", body).await }))
            .unwrap();
        assert_eq!(status, 400, "{head}…: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["code"], "vmctl::api::bad_request", "{text}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let (status, _) = rt.block_on(call(&app, "GET", "/v1/healthz", String::new()));
    assert_eq!(status, 200, "the agent still serves");
    let (status, text) = rt.block_on(call(&app, "GET", "/v1/objects", String::new()));
    assert_eq!(status, 200);
    assert!(!text.contains("deep"), "nothing was stored: {text}");
}
