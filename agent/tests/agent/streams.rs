//! The byte-stream endpoints over the agent's real server (`http::serve`
//! on a Unix socket): a console and an SSH tunnel switch the connection
//! with `Upgrade: tcp` and carry bytes both ways; refusals are JSON.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use vmctl_agent::AgentConfig;
use vmctl_agent::api::{AppState, router};
use vmctl_api::{Kind, Object, ObjectRef};
use vmctl_store::Store;

/// An agent serving on a socket in `dir`, over a store holding VM `vm0`
/// with `status` (none: never started).
async fn serve(dir: &std::path::Path, status: Option<serde_json::Value>) -> std::path::PathBuf {
    serve_store(dir, status).await.0
}

/// [`serve`], and the store it serves.
async fn serve_store(
    dir: &std::path::Path,
    status: Option<serde_json::Value>,
) -> (std::path::PathBuf, Arc<vmctl_store::SledStore>) {
    let store = Arc::new(vmctl_store::SledStore::open(dir.join("db")).unwrap());
    let vm: Object = serde_json::from_value(json!({
        "apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm0"}, "spec": {"image": "img"}
    }))
    .unwrap();
    Store::apply(&*store, vm, None, None).await.unwrap();
    if let Some(st) = status {
        let r = ObjectRef::new(Kind::VirtualMachine, "vm0");
        Store::update_status(&*store, &r, st, None).await.unwrap();
    }
    let app = router(AppState::new(
        store.clone(),
        AgentConfig::new(dir.to_path_buf()),
    ));
    let sock = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(vmctl_agent::http::serve(
        listener,
        app,
        vmctl_agent::http::Limits::for_nofile(1024),
        std::future::pending(),
    ));
    (sock, store)
}

/// Sends a request on a new connection; returns the answer's head and
/// the connection (positioned after the head).
fn request(sock: &std::path::Path, head: &str) -> (String, std::os::unix::net::UnixStream) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the agent hung up: {got:?}");
        got.push(b[0]);
    }
    (String::from_utf8(got).unwrap(), s)
}

fn upgrade(sock: &std::path::Path, path: &str) -> (String, std::os::unix::net::UnixStream) {
    request(
        sock,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"),
    )
}

/// Echoes every byte back, on `accept` of a Unix or TCP listener.
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

fn round_trip(mut s: std::os::unix::net::UnixStream, what: &str) {
    for msg in [&b"ping\r"[..], b"\x1b[A\x03 raw bytes \x00\xff"] {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(back, msg, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_and_ssh_tunnel_carry_bytes_both_ways_through_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let serial = std::os::unix::net::UnixListener::bind(work.join("serial.sock")).unwrap();
    std::thread::spawn(move || {
        for s in serial.incoming().flatten() {
            echo(s);
        }
    });
    let sshd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sshd.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in sshd.incoming().flatten() {
            echo(s);
        }
    });
    let sock = serve(
        dir.path(),
        Some(json!({"phase": "Running", "runtime": {
            "backend": "qemu", "workDir": work.display().to_string(),
            "sshHost": "127.0.0.1", "sshPort": port}})),
    )
    .await;
    let sock2 = sock.clone();
    tokio::task::spawn_blocking(move || {
        for path in ["/v1/vms/vm0/console", "/v1/vms/vm0/tunnel"] {
            let (head, s) = upgrade(&sock2, path);
            assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
            assert!(head.to_lowercase().contains("upgrade: tcp"), "{head}");
            round_trip(s, path);
        }
    })
    .await
    .unwrap();
}

/// Found as: on a Debian cloud guest, cloud-init restarts sshd seconds
/// after the first boot's `SshReady`, and a `vmctl ssh` then failed with
/// "Connection closed by remote host" (QEMU's user networking accepts the
/// host side, then closes it when the guest refuses). The tunnel connects
/// again while connections close before sshd's banner, and hands over the
/// first one that carries it, unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_tunnel_connects_again_while_sshd_restarts() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let sshd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sshd.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for mut s in sshd.incoming().flatten() {
            // The first three are closed at once: sshd is restarting.
            if counted.fetch_add(1, Ordering::SeqCst) < 3 {
                drop(s);
                continue;
            }
            s.write_all(b"SSH-2.0-Restarted\r\n").unwrap();
            echo(s);
        }
    });
    let sock = serve(
        dir.path(),
        Some(json!({"phase": "Running", "runtime": {
            "backend": "qemu", "workDir": dir.path().display().to_string(),
            "sshHost": "127.0.0.1", "sshPort": port}})),
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let (head, mut s) = upgrade(&sock, "/v1/vms/vm0/tunnel");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut banner = vec![0u8; b"SSH-2.0-Restarted\r\n".len()];
        s.read_exact(&mut banner).unwrap();
        assert_eq!(
            banner, b"SSH-2.0-Restarted\r\n",
            "the banner, unread by the agent"
        );
        round_trip(s, "tunnel");
    })
    .await
    .unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_of_a_vm_that_is_not_running_is_a_json_error_not_a_dead_stream() {
    let dir = tempfile::tempdir().unwrap();
    let sock = serve(dir.path(), None).await;
    tokio::task::spawn_blocking(move || {
        for path in ["/v1/vms/vm0/console", "/v1/vms/vm0/tunnel"] {
            let (head, _) = upgrade(&sock, path);
            assert!(head.starts_with("HTTP/1.1 409"), "{path}: {head}");
            assert!(head.contains("application/json"), "{head}");
        }
        // Started once, but its console socket is gone (QEMU stopped).
        let (head, _) = upgrade(&sock, "/v1/vms/nope/console");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        // No upgrade asked for: told how to ask.
        let (head, _) = request(
            &sock,
            "GET /v1/vms/vm0/console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 409"), "{head}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_stream_asked_for_without_upgrade_headers_says_how_to_ask() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let _serial = std::os::unix::net::UnixListener::bind(work.join("serial.sock")).unwrap();
    let sock = serve(
        dir.path(),
        Some(json!({"phase": "Running", "runtime": {
            "backend": "qemu", "workDir": work.display().to_string()}})),
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let (head, mut s) = request(
            &sock,
            "GET /v1/vms/vm0/console HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 426"), "{head}");
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.contains("Upgrade: tcp"), "{body}");
    })
    .await
    .unwrap();
}

/// `vmctl apply --wait` ends its provision output stream by asking for
/// the rest of the log after the bytes it printed: `offset` starts there
/// (tail and skip_existing aside).
#[tokio::test]
async fn a_log_read_from_an_offset_gives_exactly_the_rest() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("provision.log"), "one\ntwo\nthree\n").unwrap();
    let store = Arc::new(vmctl_store::SledStore::open(dir.path().join("db")).unwrap());
    let vm: Object = serde_json::from_value(json!({
        "apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm0"}, "spec": {"image": "img"}
    }))
    .unwrap();
    Store::apply(&*store, vm, None, None).await.unwrap();
    let r = ObjectRef::new(Kind::VirtualMachine, "vm0");
    let st = json!({"phase": "Running", "runtime": {
        "backend": "qemu", "workDir": work.display().to_string()}});
    Store::update_status(&*store, &r, st, None).await.unwrap();
    let app = router(AppState::new(
        store,
        AgentConfig::new(dir.path().to_path_buf()),
    ));
    for (query, want) in [
        ("offset=4", "two\nthree\n"),
        ("offset=4&tail=1&skip_existing=true", "two\nthree\n"),
        ("offset=14", ""),
        ("tail=1", "three\n"),
        ("skip_existing=true", ""),
    ] {
        let req = axum::http::Request::builder()
            .uri(format!("/v1/logs/vm0?source=provision&{query}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&body), want, "{query}");
    }
}

/// What a streamed body has brought so far, read by a thread.
#[derive(Clone, Default)]
struct Received(Arc<std::sync::Mutex<(Vec<u8>, bool)>>);

impl Received {
    /// Reads `s` until it ends, keeping the bytes; `true` once it ended.
    fn read_from(mut s: std::os::unix::net::UnixStream) -> Self {
        let got = Received::default();
        let keep = got.clone();
        s.set_read_timeout(None).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).unwrap_or(0);
                let mut g = keep.0.lock().unwrap();
                if n == 0 {
                    g.1 = true;
                    return;
                }
                g.0.extend_from_slice(&buf[..n]);
            }
        });
        got
    }

    /// Waits (10 s at most) until `done` holds for (bytes, ended).
    fn wait(&self, what: &str, done: impl Fn(&str, bool) -> bool) -> std::time::Instant {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            {
                let g = self.0.lock().unwrap();
                if done(&String::from_utf8_lossy(&g.0), g.1) {
                    return std::time::Instant::now();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what} never came: {:?}",
                    String::from_utf8_lossy(&g.0)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `log --follow` used to read the whole file again every 200 ms: each
/// append reached the client up to 200 ms late (and an idle follow cost a
/// read of the whole log five times a second). Now inotify wakes it: an
/// append is streamed as written, a log created later is followed too, and
/// the stream ends when the VM is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_follow_streams_each_append_as_written_not_at_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("console.log"), "old\nboot\n").unwrap();
    let (sock, store) = serve_store(
        dir.path(),
        Some(json!({"phase": "Running", "runtime": {
            "backend": "qemu", "workDir": work.display().to_string()}})),
    )
    .await;
    let sock2 = sock.clone();
    let work2 = work.clone();
    let console = tokio::task::spawn_blocking(move || {
        let (head, s) = request(
            &sock2,
            "GET /v1/logs/vm0?source=console&follow=true&tail=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let got = Received::read_from(s);
        got.wait("the last line", |b, _| b.contains("boot"));
        assert!(
            !got.0.lock().unwrap().0.windows(3).any(|w| w == b"old"),
            "tail=1"
        );
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(work2.join("console.log"))
            .unwrap();
        let mut latencies = Vec::new();
        for i in 0..9 {
            let line = format!("line-{i}\n");
            let sent = std::time::Instant::now();
            log.write_all(line.as_bytes()).unwrap();
            let came = got.wait(&line, |b, _| b.contains(line.trim()));
            latencies.push(came - sent);
        }
        latencies.sort();
        // Polling every 200 ms, each of these appends (made right after
        // the previous one arrived, so right after a poll) came ~200 ms
        // late; inotify brings it in about a millisecond.
        let median = latencies[latencies.len() / 2];
        assert!(median < Duration::from_millis(100), "{latencies:?}");
        got
    });
    // A log that does not exist yet is followed from its creation.
    let sock3 = sock.clone();
    let provision = tokio::task::spawn_blocking(move || {
        let (head, s) = request(
            &sock3,
            "GET /v1/logs/vm0?source=provision&follow=true HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let got = Received::read_from(s);
        std::fs::write(work.join("provision.log"), "[vm0] made later\n").unwrap();
        got.wait("the new log", |b, _| b.contains("made later"));
        got
    });
    let console = console.await.unwrap();
    let provision = provision.await.unwrap();
    // Deleting the VM ends both streams (chunked encoding's last chunk,
    // then the connection stays open for the next request: "0\r\n\r\n").
    let r = ObjectRef::new(Kind::VirtualMachine, "vm0");
    Store::request_delete(&*store, &r, None).await.unwrap();
    tokio::task::spawn_blocking(move || {
        for got in [console, provision] {
            got.wait("the end of the stream", |b, ended| {
                ended || b.ends_with("0\r\n\r\n")
            });
        }
    })
    .await
    .unwrap();
}
