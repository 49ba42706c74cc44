//! Forwarding (issue 17 item 4): a stream operation sent to agent A on a
//! VM that node B's agent runs goes to B over mutual TLS with A's own
//! certificate; B answers from its own state. Both agents in process,
//! each over its own store holding the same VM (as one shared store
//! would), B behind a real TLS listener.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use vmctl_agent::AgentConfig;
use vmctl_agent::api::{AppState, router};
use vmctl_agent::config::DoorConfig;
use vmctl_api::{Kind, Object, ObjectRef};
use vmctl_store::Store;
use vmctl_tls::issue::{Ca, write_private, write_public};

/// Writes agent `name`'s TLS directory (for `ip`) under `dir`.
fn agent_tls(ca: &Ca, dir: &Path, name: &str, ip: &str) -> std::path::PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let issued = ca.issue_agent(name, &[ip.to_owned()]).unwrap();
    write_public(&d.join(vmctl_tls::CA_CERT), ca.cert_pem(), false).unwrap();
    write_public(&d.join(vmctl_tls::AGENT_CERT), &issued.cert_pem, false).unwrap();
    write_private(&d.join(vmctl_tls::AGENT_KEY), &issued.key_pem, false).unwrap();
    d
}

/// A store holding VM `vm0` run by node `node-b` with `runtime`, and
/// node-b's Node at `tcp`.
async fn store(
    dir: &Path,
    runtime: serde_json::Value,
    tcp: Option<&str>,
) -> Arc<vmctl_store::SledStore> {
    let store = Arc::new(vmctl_store::SledStore::open(dir.join("db")).unwrap());
    let vm: Object = serde_json::from_value(json!({
        "apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm0"}, "spec": {"image": "img"}
    }))
    .unwrap();
    Store::apply(&*store, vm, None, None).await.unwrap();
    let r = ObjectRef::new(Kind::VirtualMachine, "vm0");
    let status = json!({"phase": "Running", "nodeName": "node-b", "runtime": runtime});
    Store::update_status(&*store, &r, status, None)
        .await
        .unwrap();
    let node: Object = serde_json::from_value(json!({
        "apiVersion": "vmctl/v1alpha1", "kind": "Node",
        "metadata": {"name": "node-b"}, "spec": {}
    }))
    .unwrap();
    Store::apply(&*store, node, None, None).await.unwrap();
    let mut address = json!({"socket": "/elsewhere/agent.sock"});
    if let Some(t) = tcp {
        address["tcp"] = json!(t);
    }
    let r = ObjectRef::new(Kind::Node, "node-b");
    Store::update_status(&*store, &r, json!({"address": address}), None)
        .await
        .unwrap();
    store
}

/// Serves an agent named `node` over `store` on a socket in `dir` and,
/// with `door`, on TLS too; returns the socket.
async fn serve(
    dir: &Path,
    node: &str,
    store: Arc<vmctl_store::SledStore>,
    door: DoorConfig,
    listen: bool,
) -> std::path::PathBuf {
    let mut cfg = AgentConfig::new(dir.to_path_buf());
    cfg.node_name = node.into();
    cfg.door = Some(door.clone());
    let app = router(AppState::new(store, cfg));
    let sock = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let tls = if listen {
        Some(vmctl_agent::door::bind(&door).await.unwrap())
    } else {
        None
    };
    tokio::spawn(vmctl_agent::door::serve(
        listener,
        tls,
        app,
        vmctl_agent::http::Limits::for_nofile(1024),
        std::future::pending(),
    ));
    sock
}

/// Echoes every byte back.
fn echo(mut s: impl Read + Write + Send + 'static) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// `GET path` with `Upgrade: tcp` (and `extra` headers) on the socket:
/// the answer's head and the connection after it.
fn upgrade(sock: &Path, path: &str, extra: &str) -> (String, std::os::unix::net::UnixStream) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n{extra}\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        got.push(b[0]);
    }
    (String::from_utf8_lossy(&got).into_owned(), s)
}

fn free_addr(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_tunnel_of_another_nodes_vm_are_forwarded_to_its_agent_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate().unwrap();
    let (ip_a, ip_b) = ("127.0.0.31", "127.0.0.32");
    let tls_a = agent_tls(&ca, dir.path(), "node-a", ip_a);
    let tls_b = agent_tls(&ca, dir.path(), "node-b", ip_b);
    let addr_b = free_addr(ip_b);

    // Node B's guest: a serial console and an SSH port that echo.
    let work = dir.path().join("b-work");
    std::fs::create_dir_all(&work).unwrap();
    let serial = std::os::unix::net::UnixListener::bind(work.join("serial.sock")).unwrap();
    std::thread::spawn(move || serial.incoming().flatten().for_each(echo));
    let sshd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sshd.local_addr().unwrap().port();
    std::thread::spawn(move || sshd.incoming().flatten().for_each(echo));
    let runtime_b = json!({"backend": "qemu", "workDir": work.display().to_string(),
        "sshHost": "127.0.0.1", "sshPort": port});
    // What A's copy says of it leads nowhere: only B reaches the guest.
    let runtime_a = json!({"backend": "qemu", "workDir": "/nonexistent",
        "sshHost": "127.0.0.1", "sshPort": 1});

    let b_dir = dir.path().join("b");
    let a_dir = dir.path().join("a");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::create_dir_all(&a_dir).unwrap();
    let store_b = store(&b_dir, runtime_b, Some(&addr_b.to_string())).await;
    serve(
        &b_dir,
        "node-b",
        store_b,
        DoorConfig {
            listen: addr_b,
            tls_dir: tls_b,
        },
        true,
    )
    .await;
    let store_a = store(&a_dir, runtime_a.clone(), Some(&addr_b.to_string())).await;
    let sock_a = serve(
        &a_dir,
        "node-a",
        store_a,
        DoorConfig {
            listen: free_addr(ip_a),
            tls_dir: tls_a.clone(),
        },
        false,
    )
    .await;

    let sock = sock_a.clone();
    tokio::task::spawn_blocking(move || {
        for path in ["/v1/vms/vm0/console", "/v1/vms/vm0/tunnel"] {
            let (head, mut s) = upgrade(&sock, path, "");
            assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
            for msg in [&b"ping\r"[..], b"\x1b[A\x03 raw \x00\xff"] {
                s.write_all(msg).unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).unwrap();
                assert_eq!(back, msg, "{path}");
            }
        }
        // Already forwarded once: served here, where it leads nowhere.
        let (head, _) = upgrade(
            &sock,
            "/v1/vms/vm0/tunnel",
            "x-vmctl-forwarded-by: node-c\r\n",
        );
        assert!(!head.starts_with("HTTP/1.1 101"), "{head}");
    })
    .await
    .unwrap();

    // A Node without a TLS address: refused, saying so.
    let c_dir = dir.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    let store_c = store(&c_dir, runtime_a, None).await;
    let sock_c = serve(
        &c_dir,
        "node-c",
        store_c,
        DoorConfig {
            listen: free_addr(ip_a),
            tls_dir: tls_a,
        },
        false,
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let (head, mut s) = upgrade(&sock_c, "/v1/vms/vm0/console", "Connection: close\r\n");
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        assert!(body.contains("vmctl::agent::forward_failed"), "{body}");
        assert!(body.contains("has no TLS address"), "{body}");
    })
    .await
    .unwrap();
}
