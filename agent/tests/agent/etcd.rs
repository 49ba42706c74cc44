//! The agent on etcd (a real 3-member cluster on 127.0.0.1): with every
//! member down it still starts and answers; healthz and each request say
//! the store is unavailable and name the endpoints; when etcd is back it
//! carries on by itself, no restart.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use vmctl_agent::{AgentConfig, StoreConfig, run_until};
use vmctl_store::testing::{EtcdCluster, unique_prefix};

/// One HTTP request over the agent's socket: status and JSON body.
fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    Some((status, serde_json::from_str(body).unwrap_or_default()))
}

fn apply_body() -> String {
    json!({"objects": [
        {"apiVersion": "vmctl/v1alpha1", "kind": "Image", "metadata": {"name": "img"},
         "spec": {"source": {"path": "/images/img.qcow2"}}},
        {"apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "vm0"},
         "spec": {"image": "img"}},
    ]})
    .to_string()
}

async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_etcd_is_down_starts_names_the_endpoints_and_recovers_by_itself() {
    let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
        .expect("etcd starts (scripts/install-prereqs installs etcd-server)");
    let endpoints = cluster.endpoints();
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut cfg = AgentConfig::new(dir.path().join("data"));
    cfg.socket = socket.clone();
    cfg.driver = "fake".into();
    cfg.store = StoreConfig::Etcd {
        endpoints: endpoints.clone(),
        prefix: unique_prefix(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run_until(cfg, async {
        let _ = stopped.await;
    }));

    // Down: the agent answers, and says why it cannot serve.
    let s = socket.clone();
    eventually("the agent answers healthz", Duration::from_secs(30), || {
        request(&s, "GET", "/v1/healthz", "").is_some_and(|(c, _)| c == 200)
    })
    .await;
    let (_, health) = request(&socket, "GET", "/v1/healthz", "").unwrap();
    let err = health["storeError"]
        .as_str()
        .expect("healthz reports the store error");
    assert!(
        err.contains("unavailable") && err.contains(&endpoints[0]),
        "{err}"
    );
    assert!(health["store"].as_str().unwrap().contains(&endpoints[2]));
    let (code, body) = request(&socket, "POST", "/v1/apply", &apply_body()).unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["code"], "vmctl::store::unavailable");
    assert!(
        body["message"].as_str().unwrap().contains(&endpoints[1]),
        "{body}"
    );

    // Back: no restart of the agent, it carries on.
    cluster = tokio::task::spawn_blocking(move || {
        for i in 0..cluster.len() {
            cluster.restart(i).unwrap();
        }
        cluster.wait_healthy(Duration::from_secs(30)).unwrap();
        cluster
    })
    .await
    .unwrap();
    let s = socket.clone();
    eventually(
        "healthz clears the store error",
        Duration::from_secs(30),
        || {
            request(&s, "GET", "/v1/healthz", "")
                .is_some_and(|(c, h)| c == 200 && h.get("storeError").is_none())
        },
    )
    .await;
    let (code, body) = request(&socket, "POST", "/v1/apply", &apply_body()).unwrap();
    assert_eq!(code, 200, "{body}");
    let s = socket.clone();
    eventually(
        "the VM Ready through the controllers",
        Duration::from_secs(30),
        || {
            request(&s, "GET", "/v1/objects/vm/vm0", "").is_some_and(|(c, o)| {
                c == 200
                    && o["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            })
        },
    )
    .await;
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    drop(cluster);
}
