//! What the agent's benches share: a request over the agent's socket and
//! a follower of `/v1/watch`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmctl_store::Event;

/// One HTTP/1.1 request over the agent's socket: status and JSON body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
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

/// Follows `/v1/watch?after=AFTER` (NDJSON, chunked), handing each event
/// to `on_event` until it returns true.
///
/// Panics when the watch ends first.
pub fn follow(socket: &Path, after: u64, mut on_event: impl FnMut(&Event) -> bool) {
    let mut s = UnixStream::connect(socket).expect("the agent listens");
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    write!(
        s,
        "GET /v1/watch?after={after} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the watch ended before its headers did");
        if line == "\r\n" {
            break;
        }
    }
    let mut pending = Vec::new();
    loop {
        // One chunk: its size in hex, the bytes, CRLF.
        line.clear();
        r.read_line(&mut line).unwrap();
        let size = usize::from_str_radix(line.trim(), 16).expect("a chunk size");
        assert!(size > 0, "the watch ended first");
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk).unwrap();
        pending.extend_from_slice(&chunk[..size]);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let rest = pending.split_off(end + 1);
            let ev: Event = serde_json::from_slice(&pending)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&pending)));
            pending = rest;
            if on_event(&ev) {
                return;
            }
        }
    }
}

/// The store's resourceVersion, as `/v1/healthz` reports it.
pub fn last_seq(socket: &Path) -> u64 {
    let (_, h) = request(socket, "GET", "/v1/healthz", "").expect("healthz answers");
    h["lastSeq"].as_u64().unwrap_or(0)
}

/// The median of `v` (not empty).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `name` from the environment as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Posts one Image (`img`, a local path) and `vms` to `/v1/apply` in
/// batches of 250, as `vmctl apply` would.
///
/// Panics when a request is not answered 200.
pub fn apply_in_batches(socket: &Path, vms: Vec<serde_json::Value>) {
    let image = serde_json::json!({"apiVersion": "vmctl/v1alpha1", "kind": "Image",
        "metadata": {"name": "img"}, "spec": {"source": {"path": "/images/img.qcow2"}}});
    let mut batches: Vec<Vec<serde_json::Value>> = vec![vec![image]];
    batches.extend(vms.chunks(250).map(<[_]>::to_vec));
    for objects in batches {
        let (code, body) = request(
            socket,
            "POST",
            "/v1/apply",
            &serde_json::json!({ "objects": objects }).to_string(),
        )
        .expect("the agent answers apply");
        assert_eq!(code, 200, "{body}");
    }
}
