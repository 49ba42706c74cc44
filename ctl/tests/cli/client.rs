//! The client against fake agents on a Unix socket: one that never
//! answers, one that counts the requests of a wait.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::vmctl;

/// A socket that accepts every connection and never answers (a hung agent).
fn silent_agent(socket: &std::path::Path) {
    let l = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming() {
            held.push(s);
        }
    });
}

#[test]
fn a_hung_agent_fails_the_command_with_a_timeout_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    silent_agent(&socket);
    let started = Instant::now();
    let out = vmctl(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--request-timeout",
            "2s",
            "get",
            "vm",
        ],
        None,
    );
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Before: vmctl waited for an answer forever.
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    assert!(took >= Duration::from_secs(2), "took {took:?}: {err}");
    assert!(
        err.contains(&format!(
            "the vmctl agent on {} did not answer within 2 s",
            socket.display()
        )),
        "{err}"
    );
    assert!(err.contains("vmctl::agent::timeout"), "{err}");
    assert!(err.contains("agent.log"), "help names the log: {err}");
    // Something listens: no second agent is started next to it.
    assert!(!err.contains("starting the vmctl agent"), "{err}");
}

#[test]
fn a_bad_request_timeout_is_refused_with_the_forms_it_takes() {
    let out = vmctl(&["--request-timeout", "soon", "get", "vm"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--request-timeout"), "{err}");
    assert!(err.contains("10s, 2m, or 0 for no limit"), "{err}");
}

/// The request line of one HTTP request read from `s` (headers skipped;
/// the fake agent's requests carry no body).
fn request_line(r: &mut BufReader<UnixStream>) -> Option<String> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
    }
    Some(first.trim_end().to_owned())
}

fn json_response(s: &mut UnixStream, status: &str, body: &serde_json::Value) {
    let body = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// An agent that knows one VM `web` which never goes away: it answers
/// health, GET and list with it, accepts its deletion, and holds a watch
/// open without events. Records every request line.
fn stuck_vm_agent(socket: &std::path::Path) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = UnixListener::bind(socket).unwrap();
    let log = seen.clone();
    std::thread::spawn(move || {
        let vm = serde_json::json!({
            "apiVersion": "vmctl.dev/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "web", "resourceVersion": 7, "generation": 1,
                         "finalizers": ["vmctl.dev/vm-cleanup"],
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"image": "base", "vcpus": 1, "memoryMib": 256},
        });
        let mut held = Vec::new();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let Some(line) = request_line(&mut r) else {
                continue;
            };
            log.lock().unwrap().push(line.clone());
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let method = line.split_whitespace().next().unwrap_or("").to_owned();
            match (method.as_str(), path.split('?').next().unwrap_or("")) {
                ("GET", "/v1/healthz") => json_response(
                    &mut s,
                    "200 OK",
                    &serde_json::json!({"version": "0", "pid": 1, "driver": "fake",
                        "dataDir": "/nonexistent", "lastSeq": 7, "store": "fake"}),
                ),
                ("GET", "/v1/objects/vm/web") => json_response(&mut s, "200 OK", &vm),
                ("DELETE", "/v1/objects/vm/web") => json_response(&mut s, "202 Accepted", &vm),
                ("GET", "/v1/objects/vm") => json_response(
                    &mut s,
                    "200 OK",
                    &serde_json::json!({"items": [vm], "resourceVersion": 7}),
                ),
                ("GET", "/v1/watch") => {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
                    );
                    held.push(s);
                }
                _ => json_response(
                    &mut s,
                    "404 Not Found",
                    &serde_json::json!({"code": "vmctl::api::not_found", "message": "not found"}),
                ),
            }
        }
    });
    seen
}

#[test]
fn waiting_for_a_deletion_watches_instead_of_polling() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let seen = stuck_vm_agent(&socket);
    let out = vmctl(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--no-autostart",
            "destroy",
            "web",
            "--timeout",
            "3",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("vmctl::vm::timeout"), "{err}");
    let seen = seen.lock().unwrap().clone();
    // Before: a GET of the VM every 200 ms, ~15 in 3 s. Now: one listing,
    // then one watch that waits.
    let reads = seen
        .iter()
        .filter(|l| l.starts_with("GET /v1/objects/vm"))
        .count();
    let watches = seen
        .iter()
        .filter(|l| l.starts_with("GET /v1/watch?after=7"))
        .count();
    assert_eq!(watches, 1, "{seen:#?}");
    assert!(reads <= 2, "{seen:#?}");
}

/// `apply` checked the file against the agent's backend by asking
/// `/v1/healthz` again right after connecting had asked it: the driver is
/// now taken from the first answer.
#[test]
fn apply_asks_the_agents_health_once_not_again_for_its_backend() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let seen = stuck_vm_agent(&socket);
    let out = vmctl(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--no-autostart",
            "apply",
            "-f",
            "examples/quick-start/VMFile.kdl",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let seen = seen.lock().unwrap().clone();
    // The fake agent refuses the apply itself: the request got that far.
    assert!(
        seen.iter().any(|l| l.starts_with("POST /v1/apply")),
        "{err}\n{seen:#?}"
    );
    let healthz = seen
        .iter()
        .filter(|l| *l == "GET /v1/healthz HTTP/1.1")
        .count();
    assert_eq!(healthz, 1, "{seen:#?}");
}
