//! The agent's API with its store on a full filesystem (a real, small
//! tmpfs): apply answers 507 with the API's JSON error, nothing whose write
//! failed is shown by get or by the cached list, and applies work again once
//! space is freed, without restarting anything.
//!
//! Mounting needs root (as in CI); elsewhere the test says so and passes.

use std::io::Write;
use std::process::Command;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;
use vmctl_agent::AgentConfig;
use vmctl_agent::api::{AppState, router};
use vmctl_api::{Kind, Object, ObjectMeta};

/// A tmpfs mounted on a fresh directory; unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the store may still hold files there for a moment.
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

fn image(name: &str) -> Object {
    let path = format!("/images/{name}-{}.qcow2", "p".repeat(3000));
    Object::new(
        Kind::Image,
        ObjectMeta::named(name),
        serde_json::json!({ "source": { "path": path } }),
    )
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

async fn apply(app: &axum::Router, name: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "objects": [image(name)] });
    call(app, "POST", "/v1/apply", Some(body)).await
}

async fn listed(app: &axum::Router) -> Vec<String> {
    let (status, body) = call(app, "GET", "/v1/objects/image", None).await;
    assert_eq!(status, 200, "{body}");
    let mut names: Vec<String> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_apply_answers_507_shows_no_phantom_and_recovers_without_restart() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs this test as root)");
        return;
    }
    let fs = Tmpfs(tempfile::tempdir().unwrap());
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(fs.0.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount -t tmpfs failed");
    let db = fs.0.path().join("db");
    let store: Arc<dyn vmctl_store::Store> = Arc::new(vmctl_store::SledStore::open(&db).unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let cache = vmctl_agent::cache::ObjectCache::start(store.clone(), stopped);
    let app =
        router(AppState::new(store, AgentConfig::new(fs.0.path().to_path_buf())).with_cache(cache));

    let mut acked = vec!["before".to_owned()];
    assert_eq!(apply(&app, "before").await.0, 200);

    // Fill the filesystem.
    let filler = fs.0.path().join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write(&block).is_ok_and(|n| n > 0) {}
        while f.write(&[0]).is_ok_and(|n| n == 1) {}
    }

    let mut failed = Vec::new();
    for i in 0..30 {
        let name = format!("during-{i}");
        let (status, body) = apply(&app, &name).await;
        if status == 200 {
            acked.push(name);
            continue;
        }
        assert_eq!(status, 507, "{body}");
        assert_eq!(body["code"], "vmctl::store::no_space", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("no space left on {}", db.display())),
            "{message}"
        );
        assert!(
            body["help"].as_str().unwrap().contains("free space"),
            "{body}"
        );
        failed.push(name);
    }
    assert!(
        failed.len() >= 25,
        "only {} of 30 applies failed",
        failed.len()
    );

    // Not shown: get answers 404 (or 507 while sled cannot reopen), the
    // cached list never has them.
    for name in &failed {
        let (status, body) = call(&app, "GET", &format!("/v1/objects/image/{name}"), None).await;
        assert!(status == 404 || status == 507, "{name}: {status} {body}");
    }
    acked.sort();
    assert_eq!(listed(&app).await, acked);

    // Space back: applies work again, same agent.
    std::fs::remove_file(&filler).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (status, body) = apply(&app, "after").await;
    assert_eq!(status, 200, "{body}");
    acked.push("after".into());
    acked.sort();
    assert_eq!(listed(&app).await, acked);
    for name in &failed {
        let (status, body) = call(&app, "GET", &format!("/v1/objects/image/{name}"), None).await;
        assert_eq!(status, 404, "{name}: {body}");
    }
    let _ = stop.send(true);
}
