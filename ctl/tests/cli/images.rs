//! Images from the command line: `delete -f` and shared Images (fake
//! driver), `image pull` against a real HTTP server on 127.0.0.1 and the
//! real image cache (qemu driver; no VM is started).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{Agent, raw};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn image_names(a: &Agent) -> Vec<String> {
    let (_, body) = raw(&a.socket(), "GET", "/v1/objects/image", "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["metadata"]["deletionTimestamp"].is_null())
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn delete_file_keeps_an_image_that_another_files_vm_uses() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let (fa, fb) = (dir.path().join("a.kdl"), dir.path().join("b.kdl"));
    std::fs::write(
        &fa,
        "vm \"a\" { image-url \"https://e.com/shared.qcow2\" }\n",
    )
    .unwrap();
    std::fs::write(
        &fb,
        "vm \"b\" { image-url \"https://e.com/shared.qcow2\" }\n",
    )
    .unwrap();
    for f in [&fa, &fb] {
        let out = a.vmctl(
            &[
                "apply",
                "-f",
                f.to_str().unwrap(),
                "--wait",
                "--timeout",
                "30",
            ],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let images = image_names(&a);
    assert_eq!(images.len(), 1, "one shared Image: {images:?}");
    let image = &images[0];

    let started = Instant::now();
    let out = a.vmctl(
        &[
            "delete",
            "-f",
            fa.to_str().unwrap(),
            "--wait",
            "--timeout",
            "20",
        ],
        None,
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "--wait waits only for what it deleted"
    );
    let text = stdout(&out);
    assert!(
        text.contains("vm/a deletion requested") || text.contains("vm/a deleted"),
        "{text}"
    );
    assert!(
        text.contains(&format!("image/{image} kept: used by vm/b")),
        "{text}"
    );
    assert!(stderr(&out).contains("vm/a gone"), "{}", stderr(&out));
    // Untouched: not Terminating, still Ready for vm/b.
    assert_eq!(image_names(&a), images);

    // Once its last user goes with it, it goes.
    let out = a.vmctl(
        &[
            "delete",
            "-f",
            fb.to_str().unwrap(),
            "--wait",
            "--timeout",
            "20",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("image/{image} deletion requested")));
    assert!(image_names(&a).is_empty());
}

/// A tiny HTTP server: per path, the statuses of the first requests, then
/// the body. Counts requests per path.
struct Server {
    base: String,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    fn start(routes: HashMap<&'static str, (Vec<u16>, Arc<Vec<u8>>)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let counts = hits.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let n = {
                    let mut c = counts.lock().unwrap();
                    let e = c.entry(path.clone()).or_default();
                    *e += 1;
                    *e
                };
                let (status, body): (u16, &[u8]) = match routes.get(path.as_str()) {
                    None => (404, b"no"),
                    Some((fails, _)) if n <= fails.len() => (fails[n - 1], b"error"),
                    Some((_, body)) => (200, body),
                };
                let _ = conn
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| conn.write_all(body));
            }
        });
        Server { base, hits }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// An agent with the real image cache (the qemu driver; no VM is started).
fn qemu_agent() -> Agent {
    Agent::start_with("qemu", &[("VMCTL_ACCEL", "tcg")])
}

#[test]
fn image_pull_waits_through_transient_500s_and_fails_at_once_on_403() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let body = Arc::new(std::fs::read(&disk).unwrap());
    // Three 500s: the Image backs off three times, then it is Ready.
    let server = Server::start(HashMap::from([
        ("/flaky.qcow2", (vec![500; 3], body.clone())),
        ("/forbidden.qcow2", (vec![403; 100], body)),
    ]));
    let a = qemu_agent();

    let url = format!("{}/flaky.qcow2", server.base);
    let out = a.vmctl(&["image", "pull", &url, "--timeout", "120"], None);
    assert!(
        out.status.success(),
        "pull gave up on a transient failure:\n{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("BackOff"),
        "retries are shown: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("500"), "{}", stderr(&out));
    assert!(stdout(&out).contains("qcow2"), "{}", stdout(&out));
    assert_eq!(server.hits("/flaky.qcow2"), 4);

    let url = format!("{}/forbidden.qcow2", server.base);
    let started = Instant::now();
    let out = a.vmctl(&["image", "pull", &url, "--timeout", "120"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20), "fails at once");
    let err = stderr(&out);
    assert!(err.contains("403") && err.contains("FetchFailed"), "{err}");
    assert_eq!(server.hits("/forbidden.qcow2"), 1, "a 403 is not retried");

    // Pulling again asks for another try (one more request), and fails
    // the same way.
    let out = a.vmctl(&["image", "pull", &url, "--timeout", "120"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("trying again"), "{}", stderr(&out));
    assert_eq!(server.hits("/forbidden.qcow2"), 2);
}

#[test]
fn image_inspect_refuses_an_image_that_reads_host_files() {
    // The agent inspects (qemu-img runs there): its own, not whatever
    // answers on the default socket.
    let a = Agent::start();
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret.raw");
    std::fs::write(&secret, vec![b's'; 1 << 20]).unwrap();
    let evil = tmp.path().join("evil.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", secret.display()))
        .arg(&evil)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let out = a.vmctl(&["image", "inspect", evil.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("vmctl::image::external_reference"), "{err}");
    assert!(
        err.contains("secret.raw") && err.contains("qemu-img convert"),
        "{err}"
    );

    let good = tmp.path().join("good.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&good)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let out = a.vmctl(&["image", "inspect", good.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("format:        qcow2"),
        "{}",
        stdout(&out)
    );
}
