//! The agent as a black box: its socket, its lock, its API, shutdown, and
//! the commands that talk to it (fake driver).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An agent process on a temporary data directory, killed on drop.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    /// The driver and environment it was started with (kept for restarts).
    driver: String,
    env: Vec<(String, String)>,
}

/// The environment that puts an agent on the store the tests run on:
/// sled (nothing to set) unless `VMCTL_TEST_STORE=etcd`, which puts every
/// agent of this test binary on one shared 3-member etcd cluster, each
/// under its own key prefix. `scripts/test` runs this suite both ways.
pub fn test_store_env() -> Vec<(String, String)> {
    match std::env::var("VMCTL_TEST_STORE").as_deref() {
        Err(_) | Ok("" | "sled") => Vec::new(),
        Ok("etcd") => etcd_env(),
        Ok(other) => panic!("VMCTL_TEST_STORE={other}: expected sled or etcd"),
    }
}

/// `VMCTL_STORE=etcd` on the shared cluster under a fresh key prefix.
pub fn etcd_env() -> Vec<(String, String)> {
    let cluster = vmctl_store::testing::EtcdCluster::shared();
    vec![
        ("VMCTL_STORE".into(), "etcd".into()),
        ("VMCTL_ETCD_ENDPOINTS".into(), cluster.endpoints().join(",")),
        (
            "VMCTL_ETCD_PREFIX".into(),
            vmctl_store::testing::unique_prefix(),
        ),
    ]
}

/// The node name of the tests' agents, rather than the host's name, so
/// that tables with a NODE column (`get vm -o wide`, `list`) line up the
/// same on every machine.
pub const TEST_NODE: &str = "test-node";

impl Agent {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("vmctl")
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir().join("agent.sock")
    }

    pub fn start() -> Agent {
        Agent::start_with("fake", &[])
    }

    /// An agent on `driver` with extra environment (e.g. `VMCTL_FAKE_*`,
    /// read at start), on the tests' store ([`test_store_env`]), up and
    /// answering /v1/healthz. Its node is [`TEST_NODE`] unless `env` names
    /// one (`VMCTL_NODE_NAME`).
    pub fn start_with(driver: &str, env: &[(&str, &str)]) -> Agent {
        let mut all = test_store_env();
        if !env.iter().any(|(k, _)| *k == "VMCTL_NODE_NAME") {
            all.push(("VMCTL_NODE_NAME".into(), TEST_NODE.into()));
        }
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Agent::start_env(driver, all)
    }

    /// An agent on `driver` with exactly this extra environment.
    pub fn start_env(driver: &str, env: Vec<(String, String)>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Agent {
            dir,
            child: None,
            driver: driver.into(),
            env,
        };
        a.spawn();
        a
    }

    /// The agent's stderr, appended across restarts: `<tmp>/agent.log`.
    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap()
    }

    /// Sets (or replaces) one variable of the environment the next
    /// [`Agent::spawn`] starts the agent with.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// Starts the agent again (same driver, environment and store).
    pub fn spawn(&mut self) {
        let child = Command::new(crate::vmctl_bin())
            .args(["agent", "--driver", &self.driver, "--data-dir"])
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if raw(&self.socket(), "GET", "/v1/healthz", "").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent did not come up; its log:\n{}",
            std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
        );
    }

    /// Runs `vmctl` against this agent, never auto-starting another.
    pub fn vmctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(crate::vmctl_bin());
        cmd.args(args)
            .arg("--no-autostart")
            .arg("--data-dir")
            .arg(self.data_dir())
            .current_dir(crate::repo())
            .env("NO_COLOR", "1")
            .env("USER", "tester")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(s) = stdin {
            // A command that fails before reading its input (`apply -f - --prune`)
            // closes it: a broken pipe then is no failure of the test (it was, by
            // a race, whenever vmctl exited before the write).
            if let Err(e) = child.stdin.take().unwrap().write_all(s.as_bytes()) {
                assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
            }
        }
        child.wait_with_output().unwrap()
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw HTTP request over the socket; returns status and body.
pub fn raw(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return (0, String::new());
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn socket_is_0600_and_data_dir_is_0700() {
    let a = Agent::start();
    let sock = std::fs::metadata(a.socket()).unwrap().permissions().mode() & 0o777;
    let dir = std::fs::metadata(a.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(sock, 0o600);
    assert_eq!(dir, 0o700);
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let a = Agent::start();
    let out = Command::new(crate::vmctl_bin())
        .args(["agent", "--driver", "fake", "--data-dir"])
        .arg(a.data_dir())
        .output()
        .unwrap();
    // Exit code 3: `vmctl` auto-starting an agent waits for the winner then.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another vmctl agent is already running"),
        "{}",
        stderr(&out)
    );
    // The first one still answers.
    assert_eq!(raw(&a.socket(), "GET", "/v1/healthz", "").0, 200);
}

#[test]
fn malformed_requests_get_4xx_json_and_change_nothing() {
    let a = Agent::start();
    let before = raw(&a.socket(), "GET", "/v1/healthz", "").1;
    for (method, path, body, want) in [
        ("POST", "/v1/apply", "{not json", 400),
        ("POST", "/v1/apply", r#"{"objects":[{"bad":1}]}"#, 400),
        (
            "POST",
            "/v1/apply",
            r#"{"objects":[{"apiVersion":"vmctl/v1alpha1","kind":"VirtualMachine","metadata":{"name":"../x"},"spec":{"image":"i"}}]}"#,
            400,
        ),
        (
            "POST",
            "/v1/apply",
            r#"{"objects":[{"apiVersion":"vmctl/v1alpha1","kind":"Image","metadata":{"name":"ok"},"spec":{"source":{"url":"https://e.com/a.img"}}},{"apiVersion":"vmctl/v1alpha1","kind":"VirtualMachine","metadata":{"name":"v"},"spec":{"image":"ok","vcpus":70000}}]}"#,
            400,
        ),
        // Nodes are registered by agents, never applied.
        (
            "POST",
            "/v1/apply",
            r#"{"objects":[{"apiVersion":"vmctl/v1alpha1","kind":"Node","metadata":{"name":"n"},"spec":{}}]}"#,
            400,
        ),
        ("GET", "/v1/objects/gadget", "", 404),
        ("GET", "/v1/objects/vm/nope", "", 404),
        ("GET", "/v1/nowhere", "", 404),
        ("GET", "/v1/objects?labels=novalue", "", 400),
    ] {
        let (status, body) = raw(&a.socket(), method, path, body);
        assert_eq!(status, want, "{method} {path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON error body: {body}"));
        assert!(v["code"].as_str().unwrap().starts_with("vmctl::"), "{body}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let list = raw(&a.socket(), "GET", "/v1/objects", "").1;
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    // The agent's own Node, registered when it started, and nothing else.
    let items = v["items"].as_array().unwrap();
    assert!(
        items.iter().all(|o| o["kind"] == "Node"),
        "nothing was written: {list}"
    );
    assert_eq!(items.len(), 1, "{list}");
    // On etcd the revision is the shared cluster's, which the other tests
    // of this binary move at the same time: only sled's is this agent's.
    if test_store_env().is_empty() {
        let after = raw(&a.socket(), "GET", "/v1/healthz", "").1;
        let seq =
            |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["lastSeq"].clone();
        assert_eq!(seq(&before), seq(&after), "no event was appended");
    }
}

#[test]
fn apply_reports_created_configured_unchanged_and_history_shows_the_source() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    vcpus 1\n}\n",
    )
    .unwrap();
    let fs = f.to_str().unwrap();
    let out = a.vmctl(&["apply", "-f", fs], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "image/debian-qcow2-8beb404e created\nvm/web created\n"
    );
    let again = a.vmctl(&["apply", "-f", fs], None);
    assert_eq!(
        stdout(&again),
        "image/debian-qcow2-8beb404e unchanged\nvm/web unchanged\n"
    );
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    vcpus 2\n}\n",
    )
    .unwrap();
    let dry = a.vmctl(&["apply", "-f", fs, "--dry-run"], None);
    assert_eq!(
        stdout(&dry),
        "image/debian-qcow2-8beb404e unchanged (dry run)\nvm/web configured (dry run)\n"
    );
    let changed = a.vmctl(&["apply", "-f", fs], None);
    assert_eq!(
        stdout(&changed),
        "image/debian-qcow2-8beb404e unchanged\nvm/web configured\n"
    );
    let vm: serde_json::Value =
        serde_json::from_str(&stdout(&a.vmctl(&["get", "vm", "web", "-o", "json"], None))).unwrap();
    assert_eq!(vm["metadata"]["generation"], 2);
    assert_eq!(vm["spec"]["vcpus"], 2);
    let hist = stdout(&a.vmctl(&["history", "vm", "web"], None));
    assert!(hist.contains("created, generation 1"), "{hist}");
    assert!(hist.contains("spec changed, generation 2"), "{hist}");
    assert!(
        hist.contains(fs) && hist.contains("tester via vmctl apply"),
        "{hist}"
    );
}

#[test]
fn prune_deletes_only_what_the_file_dropped_and_only_when_asked() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    let fs = f.to_str().unwrap();
    std::fs::write(&f, "vm \"a\" { image-url \"https://e.com/x.img\" }\nvm \"b\" { image-url \"https://e.com/x.img\" }\n").unwrap();
    assert!(a.vmctl(&["apply", "-f", fs], None).status.success());
    std::fs::write(&f, "vm \"a\" { image-url \"https://e.com/x.img\" }\n").unwrap();
    assert!(a.vmctl(&["apply", "-f", fs], None).status.success());
    let names = stdout(&a.vmctl(&["get", "vm", "-o", "name"], None));
    assert_eq!(names, "vm/a\nvm/b\n", "without --prune nothing is deleted");
    let pruned = a.vmctl(&["apply", "-f", fs, "--prune"], None);
    assert!(
        stdout(&pruned).contains("vm/b pruned"),
        "{}",
        stdout(&pruned)
    );
    // The VM's finalizer runs first (the fake driver tears it down), then it goes.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let names = stdout(&a.vmctl(&["get", "vm", "-o", "name"], None));
        if names == "vm/a\n" {
            break;
        }
        assert!(Instant::now() < deadline, "vm/b never went: {names}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn get_and_describe_render_tables() {
    let a = Agent::start();
    assert!(
        a.vmctl(&["apply", "-f", "examples/multi-vm/VMFile.kdl"], None)
            .status
            .success()
    );
    let table = stdout(&a.vmctl(&["get", "vm"], None));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("VCPUS") && lines[0].contains("MEMORY"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("db ") && l.contains("4096Mi")),
        "{table}"
    );
    let labelled = stdout(&a.vmctl(&["get", "vm", "-l", "vmctl.dev/vm=web", "-o", "name"], None));
    assert_eq!(labelled, "vm/web\n");
    let d = stdout(&a.vmctl(&["describe", "vm", "web"], None));
    for want in [
        "Name:             web",
        "Kind:             VirtualMachine",
        "Generation:       1",
        "memoryMib: 2048",
    ] {
        assert!(d.contains(want), "missing {want:?} in\n{d}");
    }
    let bad = a.vmctl(&["describe", "vm", "../x"], None);
    assert!(
        !bad.status.success() && stderr(&bad).contains("could escape"),
        "{}",
        stderr(&bad)
    );
    let missing = a.vmctl(&["describe", "vm", "nope"], None);
    assert!(
        !missing.status.success()
            && stderr(&missing).contains("VM nope not found")
            && stderr(&missing).contains("vmctl::vm::not_found"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn sigterm_stops_cleanly_and_a_restarted_agent_keeps_everything() {
    let mut a = Agent::start();
    assert!(
        a.vmctl(&["apply", "-f", "examples/multi-vm/VMFile.kdl"], None)
            .status
            .success()
    );
    let status = a.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(!a.socket().exists(), "the socket is removed on shutdown");
    let no = a.vmctl(&["get"], None);
    assert!(
        !no.status.success() && stderr(&no).contains("no vmctl agent answers"),
        "{}",
        stderr(&no)
    );
    a.spawn();
    let names = stdout(&a.vmctl(&["get", "vm", "-o", "name"], None));
    assert_eq!(names, "vm/db\nvm/web\n");
}

#[test]
fn commands_start_an_agent_when_none_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(crate::vmctl_bin())
        .args(["get", "--data-dir"])
        .arg(dir.path())
        .env("VMCTL_DRIVER", "fake")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("starting the vmctl agent"),
        "{}",
        stderr(&out)
    );
    let sock = dir.path().join("agent.sock");
    assert!(sock.exists());
    let health: serde_json::Value =
        serde_json::from_str(&raw(&sock, "GET", "/v1/healthz", "").1).unwrap();
    let pid = health["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

fn snapshot_settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(&crate::repo().display().to_string(), "[REPO]");
    s.add_filter(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[UID]",
    );
    s.add_filter(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)",
        "[TIME]",
    );
    s.add_filter(r"\b\d+[smhd]\b( ago)?", "[AGE]");
    s.add_filter(r"ResourceVersion:  \d+", "ResourceVersion:  [RV]");
    s.add_filter(r"\b200\d\d\b", "[PORT]");
    // The agent's node name is the host's.
    s.add_filter(r#"("?nodeName"?:\s*"?)[^\s",]+"#, "$1[NODE]");
    s.set_snapshot_path("snapshots");
    s.set_prepend_module_to_snapshot(false);
    // On etcd every VM is bound by the scheduler (a `Scheduled`
    // condition): those snapshots are kept apart (`…@etcd.snap`).
    if !test_store_env().is_empty() {
        s.set_snapshot_suffix("etcd");
    }
    s
}

#[test]
fn get_and_describe_output_after_wait() {
    let a = Agent::start();
    let out = a.vmctl(
        &[
            "apply",
            "-f",
            "examples/declarative/VMFile.kdl",
            "--wait",
            "--timeout",
            "60",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("all 3 objects are Ready"),
        "{}",
        stderr(&out)
    );
    let get = stdout(&a.vmctl(&["get", "-o", "wide"], None));
    let describe = stdout(&a.vmctl(&["describe", "vm", "webserver"], None));
    let prov = stdout(&a.vmctl(&["describe", "provision", "webserver"], None));
    snapshot_settings().bind(|| {
        insta::assert_snapshot!("get_wide", get);
        insta::assert_snapshot!("describe_vm", describe);
        insta::assert_snapshot!("describe_provision", prov);
    });
}

#[test]
fn wait_fails_with_the_failing_conditions_reason() {
    let a = Agent::start_with("fake", &[("VMCTL_FAKE_FAIL_IMAGES", "bad-img-c9e6519b")]);
    let out = a.vmctl(
        &["apply", "-f", "-", "--wait", "--timeout", "5"],
        Some("vm \"v\" { image-url \"https://example.com/bad.img\" }\n"),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("image/bad-img-c9e6519b"), "{err}");
    assert!(err.contains("timed out") || err.contains("failed"), "{err}");
}

#[test]
fn a_memory_change_on_a_running_vm_is_reported_or_applied_per_policy() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    let fs = f.to_str().unwrap();
    let write = |memory: u32, policy: &str| {
        std::fs::write(
            &f,
            format!("vm \"m\" {{\n  image-url \"https://e.com/x.img\"\n  memory {memory}\n  {policy}\n}}\n"),
        )
        .unwrap()
    };
    let ready_cond = |a: &Agent| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&a.vmctl(&["get", "vm", "m", "-o", "json"], None)))
                .unwrap();
        v["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "RestartRequired").cloned())
            .unwrap_or_default()
    };
    write(512, "");
    assert!(
        a.vmctl(&["apply", "-f", fs, "--wait", "--timeout", "30"], None)
            .status
            .success()
    );
    write(1024, "");
    assert!(
        a.vmctl(&["apply", "-f", fs, "--wait", "--timeout", "30"], None)
            .status
            .success()
    );
    let c = ready_cond(&a);
    assert_eq!(c["status"], "True", "{c}");
    assert_eq!(c["reason"], "SpecChanged");
    assert!(stdout(&a.vmctl(&["events"], None)).contains("RestartRequired"));
    // With update-policy "restart" the VM is restarted and the condition clears.
    write(1024, "update-policy \"restart\"");
    assert!(a.vmctl(&["apply", "-f", fs], None).status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready_cond(&a)["status"] != "False" {
        assert!(
            Instant::now() < deadline,
            "RestartRequired never cleared: {}",
            ready_cond(&a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stdout(&a.vmctl(&["events"], None)).contains("Restarting"));
}

#[test]
fn reapplying_the_file_after_vmctl_provision_does_not_run_the_provisioners_again() {
    let a = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n    provision \"shell\" {\n        inline \"true\"\n    }\n}\n",
    )
    .unwrap();
    let fs = f.to_str().unwrap();
    let out = a.vmctl(&["apply", "-f", fs, "--wait", "--timeout", "60"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = a.vmctl(&["provision", "web", "--timeout", "60"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let prov = |a: &Agent| -> serde_json::Value {
        serde_json::from_str(&stdout(
            &a.vmctl(&["get", "provision", "web", "-o", "json"], None),
        ))
        .unwrap()
    };
    let before = prov(&a);
    assert_eq!(before["metadata"]["generation"], 2, "{before}");
    assert!(before["spec"]["runToken"].is_string(), "{before}");
    // The apply source moves back to the file (metadata only); the spec
    // keeps the run token, so there is no new generation to run.
    let again = a.vmctl(&["apply", "-f", fs], None);
    assert!(again.status.success(), "{}", stderr(&again));
    let after = prov(&a);
    assert_eq!(after["metadata"]["generation"], 2, "no new generation");
    assert_eq!(after["spec"]["runToken"], before["spec"]["runToken"]);
}

/// Regression (CI flake of `apply --watch` racing `vmctl get`): several
/// commands that each auto-start an agent on the same fresh data directory
/// at the same moment all reach the one agent that wins the lock. The
/// losers' agents exit at once; their commands used to give up with "no
/// vmctl agent answers" while the winner was still opening its store.
#[test]
fn concurrent_autostarts_all_reach_the_agent_that_wins_the_lock() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("vmctl");
        let children: Vec<Child> = (0..8)
            .map(|_| {
                Command::new(crate::vmctl_bin())
                    .args(["get", "vms", "--data-dir"])
                    .arg(&data)
                    .env("NO_COLOR", "1")
                    .env("VMCTL_DRIVER", "fake")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Stop the agent that won (healthz names its pid).
        let (status, body) = raw(&data.join("agent.sock"), "GET", "/v1/healthz", "");
        assert_eq!(status, 200, "{body}");
        let pid: serde_json::Value = serde_json::from_str(&body).unwrap();
        let pid = pid["pid"].as_i64().expect("healthz names the pid") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

/// Applies a VMFile with one VM, `web`, and waits until it is Ready;
/// returns the directory holding the file.
fn apply_web(a: &Agent) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("VMFile.kdl");
    std::fs::write(
        &f,
        "vm \"web\" {\n    image-url \"https://example.com/debian.qcow2\"\n}\n",
    )
    .unwrap();
    let out = a.vmctl(
        &[
            "apply",
            "-f",
            f.to_str().unwrap(),
            "--wait",
            "--timeout",
            "60",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    dir
}

/// `GET /metrics` (issue 17 item 8): the agent's metrics in the OpenMetrics
/// text format, with real values from this agent: the Running VM by phase
/// and node, the VM controller's reconciles, the store's apply requests
/// and the watch delay.
#[test]
fn the_agent_serves_metrics_for_prometheus_with_vms_reconciles_and_store_requests() {
    let a = Agent::start();
    let _dir = apply_web(&a);
    let vm: serde_json::Value =
        serde_json::from_str(&stdout(&a.vmctl(&["get", "vm", "web", "-o", "json"], None))).unwrap();
    let node = vm["status"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (status, text) = raw(&a.socket(), "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    // A sample's value, by its name and labels as written.
    let value = |sample: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value(&format!("vmctl_vms{{phase=\"Running\",node=\"{node}\"}}")),
        1.0
    );
    assert!(value("vmctl_reconciles_total{controller=\"vm-controller\",result=\"ok\"}") >= 1.0);
    assert!(value("vmctl_reconcile_duration_seconds_count{controller=\"vm-controller\"}") >= 1.0);
    assert!(value("vmctl_store_request_duration_seconds_count{operation=\"apply\"}") >= 1.0);
    assert!(
        value("vmctl_store_request_duration_seconds_count{operation=\"update_status\"}") >= 1.0
    );
    assert!(value("vmctl_watch_delay_seconds_count") >= 1.0);
    assert!(
        text.contains("# TYPE vmctl_workqueue_depth gauge"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

/// `vmctl snapshot create --wait` right after the agent was killed
/// (SIGKILL) and started again on the same data directory: the new agent
/// saves the snapshot and reports it Ready within seconds. (The fake
/// driver's instances live in the agent process, so the restarted agent
/// starts the VM again first; the control-plane test
/// `a_snapshot_taken_after_an_agent_restart_gets_its_status` covers an
/// instance that survives the agent.)
#[test]
fn a_snapshot_taken_after_an_agent_kill_gets_its_status() {
    let mut a = Agent::start();
    let _dir = apply_web(&a);
    let out = a.vmctl(&["snapshot", "create", "web", "before", "--wait"], None);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut child = a.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    a.spawn();

    let started = Instant::now();
    let out = a.vmctl(
        &[
            "snapshot",
            "create",
            "web",
            "after",
            "--wait",
            "--timeout",
            "20",
            "-o",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let made: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(made["status"]["phase"], "Ready", "{made}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

/// The hypervisor cannot list the VM's snapshots
/// (`VMCTL_FAKE_FAIL_SNAPSHOT_LISTS`): `vmctl snapshot create --wait`
/// times out naming why, and `describe` shows it, instead of a Snapshot
/// with no status.
#[test]
fn a_snapshot_whose_vm_cannot_be_looked_at_says_why_on_the_command_line() {
    let a = Agent::start_with("fake", &[("VMCTL_FAKE_FAIL_SNAPSHOT_LISTS", "web")]);
    let _dir = apply_web(&a);
    let out = a.vmctl(
        &[
            "snapshot",
            "create",
            "web",
            "s1",
            "--wait",
            "--timeout",
            "3",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("snapshot list of web"), "{err}");
    let describe = stdout(&a.vmctl(&["describe", "snapshot", "s1"], None));
    assert!(
        describe.contains("HypervisorError") && describe.contains("snapshot list of web"),
        "{describe}"
    );
}
