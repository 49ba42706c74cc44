//! A second agent takes over a live socket: it must refuse to start, and
//! an agent stopping must not delete a socket that is no longer its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmctl_agent::{AgentConfig, AgentError, run_until};

fn config(data_dir: &Path, socket: &Path) -> AgentConfig {
    let mut cfg = AgentConfig::new(data_dir.to_path_buf());
    cfg.socket = socket.to_path_buf();
    cfg.driver = "fake".into();
    cfg
}

/// The data dir the agent answering on `socket` reports (healthz).
fn answering_data_dir(socket: &Path) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["dataDir"].as_str().map(str::to_owned)
}

/// An agent running in this process until dropped or stopped.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl Running {
    async fn start(data_dir: &Path, socket: &Path) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(run_until(config(data_dir, socket), async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(20);
        while answering_data_dir(socket).as_deref() != Some(&*data_dir.display().to_string()) {
            assert!(Instant::now() < deadline, "the agent did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Running {
            stop: Some(stop),
            done,
        }
    }

    async fn stop(mut self) -> Result<(), AgentError> {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.done).await.unwrap()
    }
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let socket = t.path().join("shared.sock");
    (t, a, b, socket)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_a_live_socket_refuses_to_start() {
    let (_t, a, b, socket) = dirs();
    let first = Running::start(&a, &socket).await;
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        run_until(config(&b, &socket), std::future::pending()),
    )
    .await
    .expect("the second agent returns instead of serving");
    let err = second.expect_err("the second agent must not start");
    assert!(
        matches!(
            &err,
            AgentError::Socket(vmctl_agent::socket::SocketError::InUse(_))
        ),
        "{err:?}"
    );
    assert!(err.help().contains("--socket"), "{}", err.help());
    assert_eq!(
        answering_data_dir(&socket).as_deref(),
        Some(&*a.display().to_string()),
        "the first agent still answers on the socket"
    );
    first.stop().await.unwrap();
    assert!(!socket.exists(), "the first agent removes its own socket");
    // With the first gone, the second starts on the (now free) path.
    let second = Running::start(&b, &socket).await;
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_an_agent_leaves_a_socket_it_no_longer_owns() {
    let (_t, a, _b, socket) = dirs();
    let first = Running::start(&a, &socket).await;
    // Someone replaces the socket file (as the old second agent did).
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    first.stop().await.unwrap();
    assert!(socket.exists(), "the replacement socket was deleted");
    std::os::unix::net::UnixStream::connect(&socket).expect("the replacement still answers");
    drop(other);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_agents_socket_is_replaced_and_a_regular_file_is_not() {
    let (_t, a, _b, socket) = dirs();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let agent = Running::start(&a, &socket).await;
    agent.stop().await.unwrap();
    std::fs::write(&socket, "not a socket").unwrap();
    let err = run_until(config(&a, &socket), std::future::pending())
        .await
        .expect_err("a regular file is not replaced");
    assert!(err.to_string().contains("socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}
