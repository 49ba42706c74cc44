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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmctl"));
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
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
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
