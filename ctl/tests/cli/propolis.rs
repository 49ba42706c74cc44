//! `vmctl agent --driver propolis`: refused on Linux without a mock, and
//! end to end through the binary against a mock propolis-server and a
//! simulated illumos host.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmctl_propolis_mock::{InstanceState, MockPropolis};

use crate::agent::Agent;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn propolis_driver_refuses_to_start_on_linux_without_a_mock_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(crate::vmctl_bin());
    cmd.args(["agent", "--driver", "propolis", "--data-dir"])
        .arg(dir.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("VMCTL_PROPOLIS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("vmctl::backend::not_available"), "{err}");
    assert!(err.contains("not illumos"), "{err}");
    assert!(err.contains("VMCTL_PROPOLIS_HOST=simulated"), "{err}");
    // Nothing was made: no socket, no store.
    assert!(!dir.path().join("agent.sock").exists());
    assert!(!dir.path().join("db").exists());

    // Simulated without saying where the mock listens: refused too.
    let out = Command::new(crate::vmctl_bin())
        .args(["agent", "--driver", "propolis", "--data-dir"])
        .arg(dir.path())
        .env("VMCTL_PROPOLIS_HOST", "simulated")
        .env_remove("VMCTL_PROPOLIS_ADDR")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("VMCTL_PROPOLIS_ADDR"),
        "{}",
        text(&out.stderr)
    );
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn apply_console_stop_start_delete_through_the_agent_on_the_propolis_driver() {
    let mock = MockPropolis::start_in_thread().unwrap();
    let addr = mock.addr().to_string();
    let control = mock.control_url();
    let a = Agent::start_with(
        "propolis",
        &[
            ("VMCTL_PROPOLIS_HOST", "simulated"),
            ("VMCTL_PROPOLIS_ADDR", &addr),
            ("VMCTL_PROPOLIS_MOCK_CONTROL", &control),
            ("VMCTL_PROPOLIS_VNIC_LINK", "igb0"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let vmfile = tmp.path().join("VMFile.kdl");
    std::fs::write(
        &vmfile,
        format!(
            "vm \"web\" {{\n    image \"{}\"\n    vcpus 2\n    network \"vnic\" name=\"vnic0\"\n}}\n",
            disk.display()
        ),
    )
    .unwrap();
    let vmfile = vmfile.to_str().unwrap();
    let out = a.vmctl(&["apply", "-f", vmfile, "--wait", "--timeout", "60"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mock.state(), Some(InstanceState::Running));

    let out = a.vmctl(&["get", "vm", "web", "-o", "json"], None);
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vm["status"]["phase"], "Running", "{vm}");
    assert_eq!(vm["status"]["runtime"]["backend"], "propolis");

    // The console log shows what the guest printed; typing on the console
    // reaches the guest (it echoes).
    // `vmctl log` prints whole lines: the banner's, not the open prompt.
    wait_until("the boot banner in the console log", || {
        text(&a.vmctl(&["log", "web", "--console"], None).stdout)
            .contains("mock propolis-server: booting web")
    });
    let out = a.vmctl(&["console", "web"], Some("root\r"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the typed name echoed in the console log", || {
        text(&a.vmctl(&["log", "web", "--console"], None).stdout).contains("login: root")
    });

    let out = a.vmctl(&["stop", "web"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("web Stopped", || {
        let out = a.vmctl(&["get", "vm", "web", "-o", "json"], None);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v["status"]["phase"] == "Stopped")
    });
    assert!(!mock.is_listening(), "the zone halted with its server");

    let out = a.vmctl(&["start", "web"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("web Running again", || {
        mock.state() == Some(InstanceState::Running)
    });
    assert_eq!(mock.ensure_requests().len(), 2);

    let out = a.vmctl(&["delete", "-f", vmfile, "--wait"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mock.state(), None);
    let host: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.data_dir().join("propolis-simulated-host.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(host["zones"], serde_json::json!({}), "{host}");
    assert_eq!(host["vnics"], serde_json::json!({}), "{host}");
    assert!(host["datasets"].get("rpool/vms/web").is_none(), "{host}");
    let log: Vec<String> = host["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            format!("{} {}", c["program"].as_str().unwrap(), args.join(" "))
        })
        .collect();
    assert!(
        log.iter()
            .any(|c| c.starts_with("zfs clone -p rpool/images/")
                && c.ends_with("@latest rpool/vms/web")),
        "{log:#?}"
    );
    for expected in [
        "zoneadm -z web install",
        "zoneadm -z web boot",
        "zoneadm -z web halt",
        "zoneadm -z web uninstall -F",
        "zonecfg -z web delete -F",
        "zfs destroy -r rpool/vms/web",
        "dladm delete-vnic vnic0",
    ] {
        assert!(
            log.iter().any(|c| c == expected),
            "{expected} not in {log:#?}"
        );
    }
}

/// The fault: `network "user"` (or `"tap"`) applied to an agent on the
/// Propolis driver was accepted, and `network "vnic"` on QEMU too; each
/// failed only when the driver planned the start. `vmctl apply` (and `up`)
/// now refuse it at its place in the file, VMFile or manifest, and change
/// nothing; the agent refuses it for any other API client.
#[test]
fn a_network_the_agents_backend_cannot_run_is_a_located_error_at_apply() {
    let mock = MockPropolis::start_in_thread().unwrap();
    let addr = mock.addr().to_string();
    let propolis = Agent::start_with(
        "propolis",
        &[
            ("VMCTL_PROPOLIS_HOST", "simulated"),
            ("VMCTL_PROPOLIS_ADDR", &addr),
        ],
    );
    let qemu = Agent::start_with("qemu", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let user = write(
        "VMFile.kdl",
        "vm \"web\" {\n    image-url \"https://e.com/a.qcow2\"\n    network \"user\"\n}\n",
    );
    let tap = write(
        "vm.yaml",
        "apiVersion: vmctl/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: web\nspec:\n  image: img\n  network:\n    mode: tap\n    bridge: br0\n",
    );
    let vnic = write(
        "vnic.kdl",
        "vm \"web\" {\n    image-url \"https://e.com/a.qcow2\"\n    network \"vnic\" name=\"vnic0\"\n}\n",
    );
    for (agent, args, place, mode, driver, hint) in [
        (
            &propolis,
            vec!["apply", "-f", &user],
            "VMFile.kdl:3:",
            "user",
            "propolis",
            "network \"vnic\"",
        ),
        (
            &propolis,
            vec!["up", "-f", &user],
            "VMFile.kdl:3:",
            "user",
            "propolis",
            "network \"vnic\"",
        ),
        (
            &propolis,
            vec!["apply", "-f", &tap],
            "vm.yaml:7:",
            "tap",
            "propolis",
            "network \"vnic\"",
        ),
        (
            &qemu,
            vec!["apply", "-f", &vnic],
            "vnic.kdl:3:",
            "vnic",
            "qemu",
            "network \"user\"",
        ),
    ] {
        let out = agent.vmctl(&args, None);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused:\n{err}");
        assert!(err.contains(place), "{args:?}: located at {place}:\n{err}");
        assert!(
            err.contains(&format!("network `{mode}` is not supported")),
            "{args:?}:\n{err}"
        );
        assert!(
            err.contains(&format!("--driver {driver}")),
            "{args:?}:\n{err}"
        );
        assert!(err.contains(hint), "{args:?}: says what to write:\n{err}");
        assert!(
            err.contains("vmctl::validate::unsupported_by_backend"),
            "{args:?}:\n{err}"
        );
        let out = agent.vmctl(&["get", "-o", "json"], None);
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(all["items"], serde_json::json!([]), "nothing was applied");
    }
    // What the backend can run is applied as before.
    let out = propolis.vmctl(&["apply", "-f", &vnic, "--dry-run"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = qemu.vmctl(&["apply", "-f", &user, "--dry-run"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Issue 14 item 4: the Propolis settings were environment variables only.
/// The same settings as flags (`--propolis-host`, `--propolis-addr`) and as
/// `[propolis]` in `<data-dir>/agent.toml` start an agent on the driver; a
/// bad value in the file is located and nothing starts.
#[test]
fn propolis_settings_as_flags_or_in_the_config_file_start_the_agent() {
    let mock = MockPropolis::start_in_thread().unwrap();
    let addr = mock.addr().to_string();
    let clean = |cmd: &mut Command| {
        for (k, _) in std::env::vars() {
            if k.starts_with("VMCTL_PROPOLIS_") || k == "VMCTL_DRIVER" {
                cmd.env_remove(k);
            }
        }
        cmd.env("NO_COLOR", "1").stdin(Stdio::null());
    };
    let wait_health = |socket: &std::path::Path| {
        let mut body = String::new();
        wait_until("the agent's healthz", || {
            let (code, b) = crate::agent::raw(socket, "GET", "/v1/healthz", "");
            body = b;
            code == 200
        });
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };

    // Flags.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(crate::vmctl_bin());
    cmd.args([
        "agent",
        "--driver",
        "propolis",
        "--propolis-host",
        "simulated",
    ])
    .args(["--propolis-addr", &addr, "--data-dir"])
    .arg(dir.path())
    .stderr(Stdio::null());
    clean(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let health = wait_health(&dir.path().join("agent.sock"));
    assert_eq!(health["driver"], "propolis", "{health}");
    child.kill().unwrap();
    child.wait().unwrap();

    // The config file.
    let dir = tempfile::tempdir().unwrap();
    let toml =
        format!("driver = \"propolis\"\n\n[propolis]\nhost = \"simulated\"\naddr = \"{addr}\"\n");
    std::fs::write(dir.path().join("agent.toml"), &toml).unwrap();
    let mut cmd = Command::new(crate::vmctl_bin());
    cmd.args(["agent", "--data-dir"])
        .arg(dir.path())
        .stderr(Stdio::null());
    clean(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let health = wait_health(&dir.path().join("agent.sock"));
    assert_eq!(health["driver"], "propolis", "{health}");
    child.kill().unwrap();
    child.wait().unwrap();

    // A bad value: located, nothing started.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        "driver = \"propolis\"\n[propolis]\nhost = \"simulated\"\naddr = \"nowhere\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(crate::vmctl_bin());
    cmd.args(["agent", "--data-dir"]).arg(dir.path());
    clean(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("agent.toml:4:8"), "{err}");
    assert!(err.contains("IP:PORT"), "{err}");
    assert!(!dir.path().join("agent.sock").exists());
}
