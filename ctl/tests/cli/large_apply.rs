//! Large applies vanish: `apply` exits 0 only when the agent acknowledged
//! every object; a file of 10,000 VMs applies; too large is a clear error.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};

use crate::agent::Agent;

fn vms_kdl(n: usize) -> String {
    let mut kdl = String::new();
    for i in 0..n {
        kdl.push_str(&format!(
            "vm \"vm-{i}\" {{\n  image-url \"https://example.com/base.qcow2\"\n  vcpus 1\n  memory 512\n}}\n"
        ));
    }
    kdl
}

#[test]
fn an_apply_of_10000_vms_redirected_to_a_file_is_acknowledged_and_created() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.kdl");
    std::fs::write(&file, vms_kdl(10_000)).unwrap();
    // As the issue ran it: `vmctl apply -f big.kdl > out.log 2>&1`.
    let log = dir.path().join("out.log");
    let out = std::fs::File::create(&log).unwrap();
    let status = Command::new(crate::vmctl_bin())
        .args(["apply", "--no-autostart", "--data-dir"])
        .arg(a.data_dir())
        .arg("-f")
        .arg(&file)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "{status}: {}",
        &text[..text.len().min(2000)]
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with(" created")).count(),
        10_001,
        "10,000 VMs and their one Image acknowledged"
    );
    let names = a.vmctl(&["get", "vm", "-o", "name"], None);
    assert_eq!(
        String::from_utf8_lossy(&names.stdout).lines().count(),
        10_000
    );
}

#[test]
fn an_apply_over_the_size_limit_fails_naming_the_limit_and_changes_nothing() {
    let a = Agent::start();
    // Two files of 17 MiB: each is within what vmctl reads, together the
    // request is over what the agent accepts.
    let dir = tempfile::tempdir().unwrap();
    let note = "x".repeat(17 << 20);
    for name in ["huge-a", "huge-b"] {
        let manifest = serde_json::json!([{"apiVersion": "vmctl/v1alpha1", "kind": "Image",
            "metadata": {"name": name, "annotations": {"note": note}},
            "spec": {"source": {"url": "https://example.com/a.img"}}}]);
        std::fs::write(
            dir.path().join(format!("{name}.json")),
            manifest.to_string(),
        )
        .unwrap();
    }
    let file = dir.path();
    let out = a.vmctl(&["apply", "-f", file.to_str().unwrap()], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vmctl::api::payload_too_large") && err.contains("32 MiB"),
        "{err}"
    );
    let list = a.vmctl(&["get", "image", "-o", "name"], None);
    assert!(list.stdout.is_empty(), "nothing was created");
}

/// A fake agent: answers healthz, and answers each apply with `apply`.
fn fake_agent(apply: fn(&mut BufReader<UnixStream>, usize)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("fake.sock")).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { return };
            let mut reader = BufReader::new(s);
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            let mut len = 0;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if h.trim().is_empty() {
                    break;
                }
            }
            if first.starts_with("GET /v1/healthz") {
                let body = r#"{"version":"0","pid":1,"driver":"fake","dataDir":"/x","lastSeq":0}"#;
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            } else {
                apply(&mut reader, len);
            }
        }
    });
    dir
}

fn apply_to_fake(dir: &tempfile::TempDir, n: usize) -> std::process::Output {
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(&f, vms_kdl(n)).unwrap();
    Command::new(crate::vmctl_bin())
        .args(["apply", "--no-autostart", "--data-dir"])
        .arg(dir.path())
        .arg("--socket")
        .arg(dir.path().join("fake.sock"))
        .arg("-f")
        .arg(&f)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn apply_never_exits_0_when_the_agent_hangs_up_mid_request() {
    // The agent reads a little of a large body and closes the connection:
    // the client's write fails with a broken pipe or a reset.
    let dir = fake_agent(|s, _| {
        let mut buf = vec![0u8; 64 << 10];
        let _ = s.read(&mut buf);
    });
    let out = apply_to_fake(&dir, 3000);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("closed the connection"), "{err}");
}

#[test]
fn apply_never_exits_0_when_the_answer_is_cut_short_or_incomplete() {
    // The answer promises more bytes than it sends.
    let dir = fake_agent(|s, len| {
        let mut body = vec![0u8; len];
        let _ = s.read_exact(&mut body);
        let _ = write!(
            s.get_mut(),
            "HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{{\"results\":[]"
        );
    });
    let out = apply_to_fake(&dir, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("closed the connection"), "{err}");
    // A complete answer that acknowledges only some of the objects.
    let dir = fake_agent(|s, len| {
        let mut body = vec![0u8; len];
        let _ = s.read_exact(&mut body);
        let resp = r#"{"results":[{"object":{"kind":"VirtualMachine","name":"vm-0"},"outcome":"created","generation":1,"resourceVersion":2}]}"#;
        let _ = write!(
            s.get_mut(),
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{resp}",
            resp.len()
        );
    });
    let out = apply_to_fake(&dir, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vmctl::apply::incomplete") && err.contains("acknowledged 1 of the 3"),
        "{err}"
    );
}
