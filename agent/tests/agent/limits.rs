//! Connections without limits: a client that sends its header slowly is
//! cut off, and idle connections beyond the cap wait without starving the
//! requests behind them (a real socket, the real router, short limits).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmctl_agent::http::{Limits, serve};

fn healthz(socket: &Path, wait: Duration) -> Result<u16, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(out)
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_)) && {
        // A timeout is an error too: tell them apart.
        s.set_nonblocking(true).unwrap();
        !matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

struct Server {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(limits: Limits) -> Server {
        let (dir, app) = crate::app();
        let socket = dir.path().join("api.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&sock).unwrap();
                ready.send(()).unwrap();
                serve(listener, app, limits, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        is_ready.recv().unwrap();
        Server {
            _dir: dir,
            socket,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

fn limits(max_connections: usize) -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(1),
        max_connections,
        shutdown_grace: Duration::from_millis(200),
    }
}

#[test]
fn a_request_header_sent_one_byte_at_a_time_is_cut_off() {
    let server = Server::start(limits(8));
    let mut slow = UnixStream::connect(&server.socket).unwrap();
    let started = Instant::now();
    let head = b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut cut = false;
    for b in head.iter() {
        if slow.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        // Others are served meanwhile.
        assert_eq!(healthz(&server.socket, Duration::from_secs(5)), Ok(200));
        std::thread::sleep(Duration::from_millis(300));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert!(
        cut || closed_within(&mut slow, Duration::from_secs(2)),
        "a header trickling in for {:?} was not cut off (timeout 1 s)",
        started.elapsed()
    );
}

#[test]
fn idle_connections_beyond_the_cap_do_not_starve_a_request() {
    let server = Server::start(limits(4));
    // Three times the cap of idle connections, opened before the request.
    let mut idle: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&server.socket).unwrap())
        .collect();
    let started = Instant::now();
    assert_eq!(healthz(&server.socket, Duration::from_secs(10)), Ok(200));
    // Each idle connection holds a slot for at most the header timeout:
    // three rounds of 1 s, not forever.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "answered after {:?}",
        started.elapsed()
    );
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(2)),
        "the first idle connection is closed after the header timeout"
    );
}
