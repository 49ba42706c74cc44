//! The Propolis driver against a simulated illumos host (exact host
//! commands) and a real mock propolis-server on 127.0.0.1.

use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmctl_propolis_mock::{InstanceState as MockState, MockPropolis};

use std::collections::HashMap;

use super::*;
use crate::drivers::LocalImage;

struct Rig {
    _dir: tempfile::TempDir,
    mock: MockPropolis,
    host: SimulatedHost,
    driver: PropolisDriver,
}

async fn rig() -> Rig {
    let mock = MockPropolis::start().await.unwrap();
    let host = SimulatedHost::new().with_mock_control(mock.control_url());
    rig_with(mock, host)
}

fn rig_with(mock: MockPropolis, host: SimulatedHost) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = PropolisConfig::new(dir.path());
    cfg.pool = "tank".into();
    cfg.server = mock.addr();
    cfg.vnic_link = Some("igb0".into());
    cfg.seed_tool = SeedTool::PureRust;
    cfg.start_timeout = Duration::from_secs(10);
    let driver = PropolisDriver::new(cfg, Arc::new(host.clone()));
    Rig {
        _dir: dir,
        mock,
        host,
        driver,
    }
}

fn spec_with(name: &str, network: serde_json::Value) -> VmInstanceSpec {
    VmInstanceSpec {
        name: name.into(),
        uid: format!("uid-{name}"),
        spec: serde_json::from_value(json!({
            "image": "debian", "vcpus": 2, "memoryMib": 2048, "network": network
        }))
        .unwrap(),
        image: LocalImage {
            path: "/images/debian.qcow2".into(),
            format: "qcow2".into(),
            size_bytes: 1 << 20,
            virtual_size_bytes: Some(2 << 30),
        },
    }
}

fn spec(name: &str) -> VmInstanceSpec {
    spec_with(name, json!({"mode": "vnic", "name": "vnic0"}))
}

#[tokio::test]
async fn prepare_clones_the_image_sets_up_the_vnic_and_installs_the_zone() {
    let r = rig().await;
    let st = r.driver.prepare(&spec("web")).await.unwrap();
    assert_eq!(st.state, InstanceState::Stopped);
    assert_eq!(st.runtime.backend, "propolis");
    let rec = r.driver.read_record("web").unwrap();
    let mac = super::super::qemu::args::mac_for("uid-web");
    let zonecfg = HostCommand::new(
        "zonecfg",
        [
            "-z".to_owned(),
            "web".to_owned(),
            r.driver.zone_config("web", &rec),
        ],
    )
    .to_string();
    assert_eq!(
        r.host.commands(),
        vec![
            "zfs list -H -o name tank/images/debian@latest".to_owned(),
            "zfs list -H -o name tank/images/debian".into(),
            "zfs create -p -V 2048M tank/images/debian".into(),
            "qemu-img convert -n -O raw /images/debian.qcow2 /dev/zvol/rdsk/tank/images/debian"
                .into(),
            "zfs snapshot tank/images/debian@latest".into(),
            "zfs list -H -o name tank/vms/web".into(),
            "zfs clone -p tank/images/debian@latest tank/vms/web".into(),
            "dladm show-vnic -p -o LINK,MACADDRESS vnic0".into(),
            format!("dladm create-vnic -t -l igb0 -m {mac} vnic0"),
            "zoneadm -z web list -p".into(),
            zonecfg,
            "zoneadm -z web install".into(),
            // observe
            "zoneadm -z web list -p".into(),
        ]
    );
    let cfg = &r.host.state().zones["web"].config;
    assert!(cfg.contains("set brand=nebula-vm"), "{cfg}");
    assert!(cfg.contains("set ip-type=exclusive"), "{cfg}");
    assert!(cfg.contains("add net; set physical=vnic0; end"), "{cfg}");
    assert!(
        cfg.contains("set match=/dev/zvol/rdsk/tank/vms/web"),
        "{cfg}"
    );
    assert!(
        cfg.contains(&format!("set value={}", r.mock.addr())),
        "{cfg}"
    );
    assert_eq!(r.host.state().zones["web"].state, "installed");
}

#[tokio::test]
async fn prepare_twice_only_observes_the_second_time() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    r.host.clear_log();
    let before = r.host.state();
    r.driver.prepare(&spec("web")).await.unwrap();
    assert_eq!(
        r.host.commands(),
        vec![
            "zfs list -H -o name tank/images/debian@latest",
            "zfs list -H -o name tank/vms/web",
            "dladm show-vnic -p -o LINK,MACADDRESS vnic0",
            "zoneadm -z web list -p",
            "zoneadm -z web list -p",
        ]
    );
    let after = r.host.state();
    assert_eq!(
        (before.datasets, before.zones, before.vnics),
        (after.datasets, after.zones, after.vnics)
    );
}

#[tokio::test]
async fn a_crash_halfway_through_prepare_is_finished_by_the_next_prepare() {
    let r = rig().await;
    // The image import dies after the volume was made: no @latest snapshot.
    r.host.fail_next("qemu-img convert");
    let err = r.driver.prepare(&spec("web")).await.unwrap_err();
    assert!(err.to_string().contains(HOST_COMMAND_FAILED), "{err}");
    assert!(r.host.state().datasets.contains_key("tank/images/debian"));
    assert!(
        !r.host
            .state()
            .snapshots
            .contains("tank/images/debian@latest")
    );
    // The zone install dies halfway: the zone is left incomplete.
    r.host.fail_next("zoneadm -z web install");
    r.driver.prepare(&spec("web")).await.unwrap_err();
    assert_eq!(r.host.state().zones["web"].state, "incomplete");
    let cmds = r.host.commands();
    assert!(
        cmds.contains(&"zfs destroy -r tank/images/debian".to_owned()),
        "a half-imported image is imported again: {cmds:?}"
    );
    r.host.clear_log();
    r.driver.prepare(&spec("web")).await.unwrap();
    let cmds = r.host.commands();
    assert_eq!(
        &cmds[3..6],
        &[
            "zoneadm -z web list -p",
            "zoneadm -z web uninstall -F",
            "zoneadm -z web install"
        ],
        "{cmds:?}"
    );
    assert_eq!(r.host.state().zones["web"].state, "installed");
    // Nothing made twice.
    assert_eq!(r.host.state().vnics.len(), 1);
}

#[tokio::test]
async fn destroy_of_a_missing_vm_changes_nothing() {
    let r = rig().await;
    r.driver.destroy("ghost").await.unwrap();
    assert_eq!(
        r.host.commands(),
        vec![
            "zoneadm -z ghost list -p",
            "zfs list -H -o name tank/vms/ghost"
        ]
    );
    assert!(r.driver.status("ghost").await.unwrap().is_none());
}

#[tokio::test]
async fn destroy_removes_the_zone_the_disk_and_the_vnic_vmctl_made() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    r.driver.start("web").await.unwrap();
    r.host.clear_log();
    r.driver.destroy("web").await.unwrap();
    let cmds = r.host.commands();
    let destructive: Vec<&str> = cmds
        .iter()
        .map(String::as_str)
        .filter(|c| !c.contains(" list ") && !c.contains("show-vnic"))
        .collect();
    assert_eq!(
        destructive,
        vec![
            "zoneadm -z web halt",
            "zoneadm -z web uninstall -F",
            "zonecfg -z web delete -F",
            "zfs destroy -r tank/vms/web",
            "dladm delete-vnic vnic0",
        ]
    );
    assert_eq!(r.mock.state(), None, "the zone's server went away");
    let st = r.host.state();
    assert!(st.zones.is_empty() && st.vnics.is_empty());
    assert!(
        st.datasets.contains_key("tank/images/debian"),
        "the image stays"
    );
    assert!(!st.datasets.contains_key("tank/vms/web"));
    assert!(!r.driver.work_dir("web").exists());
    assert!(r.driver.status("web").await.unwrap().is_none());
    // And again: nothing left to do.
    r.driver.destroy("web").await.unwrap();
}

#[tokio::test]
async fn a_vnic_that_exists_is_used_and_kept() {
    let r = rig().await;
    let vnic = HostCommand::new(
        "dladm",
        [
            "create-vnic",
            "-t",
            "-l",
            "e1000g0",
            "-m",
            "02:08:20:00:00:01",
            "vnic0",
        ],
    );
    r.host.run(&vnic).await.unwrap();
    r.driver.prepare(&spec("web")).await.unwrap();
    r.driver.destroy("web").await.unwrap();
    assert!(
        r.host.state().vnics.contains_key("vnic0"),
        "a VNIC vmctl did not make is not deleted"
    );
    assert!(!r.host.commands().iter().any(|c| c.contains("delete-vnic")));
}

#[tokio::test]
async fn start_creates_the_instance_with_a_full_spec_and_runs_it() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    let st = r.driver.start("web").await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(r.mock.state(), Some(MockState::Running));
    assert!(
        r.host
            .commands()
            .contains(&"zoneadm -z web boot".to_owned())
    );
    let reqs = r.mock.ensure_requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req["properties"]["name"], "web");
    assert_eq!(req["init"]["method"], "Spec");
    let spec = &req["init"]["value"]["spec"];
    assert_eq!(spec["board"]["cpus"], 2);
    assert_eq!(spec["board"]["memory_mb"], 2048);
    assert_eq!(spec["board"]["chipset"]["type"], "i440_fx");
    let c = &spec["components"];
    assert_eq!(c["boot-disk"]["type"], "virtio_disk");
    assert_eq!(
        c["boot-disk-backend"]["component"]["path"],
        "/dev/zvol/rdsk/tank/vms/web"
    );
    assert_eq!(
        c["seed-disk-backend"]["component"]["path"],
        "/vmctl/seed.iso"
    );
    assert_eq!(c["seed-disk-backend"]["component"]["readonly"], true);
    assert_eq!(c["net0-backend"]["component"]["vnic_name"], "vnic0");
    assert_eq!(c["net0"]["type"], "virtio_nic");
    assert_eq!(c["com1"]["component"]["num"], "com1");
    assert_eq!(
        c["boot-settings"]["component"]["order"],
        json!([{"id": "boot-disk"}])
    );
    // Started again: adopted, not created twice.
    r.driver.start("web").await.unwrap();
    assert_eq!(r.mock.ensure_requests().len(), 1);
}

#[tokio::test]
async fn stop_stops_the_instance_then_halts_the_zone_and_start_runs_a_new_one() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    r.driver.start("web").await.unwrap();
    r.host.clear_log();
    r.driver.stop("web", Duration::from_secs(5)).await.unwrap();
    assert!(
        r.host
            .commands()
            .contains(&"zoneadm -z web halt".to_owned())
    );
    assert!(!r.mock.is_listening(), "the zone's server ended with it");
    let st = r.driver.status("web").await.unwrap().unwrap();
    assert_eq!(st.state, InstanceState::Stopped);
    // Stop of a stopped VM: nothing to do.
    r.driver.stop("web", Duration::from_secs(5)).await.unwrap();
    let st = r.driver.start("web").await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(r.mock.ensure_requests().len(), 2);
}

#[tokio::test]
async fn state_changes_come_from_the_state_monitor() {
    let r = rig().await;
    let mut changes = r.driver.changes().unwrap();
    r.driver.prepare(&spec("web")).await.unwrap();
    r.driver.start("web").await.unwrap();
    while changes.try_recv().is_ok() {}
    r.mock.fail_instance();
    let name = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .expect("a change is reported without polling")
        .unwrap();
    assert_eq!(name, "web");
    let st = r.driver.status("web").await.unwrap().unwrap();
    assert_eq!(st.state, InstanceState::Stopped);
    assert_eq!(
        st.runtime.last_exit.as_deref(),
        Some("propolis instance Failed")
    );
    // A failed instance is replaced by a new server on the next start.
    let st = r.driver.start("web").await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
    assert_eq!(r.mock.state(), Some(MockState::Running));
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_serial_console_reaches_the_console_log_and_socket() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    r.driver.start("web").await.unwrap();
    let dir = r.driver.work_dir("web");
    let log = dir.join(serial::CONSOLE_LOG);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the boot banner in console.log", || {
        read().contains("web login: ")
    })
    .await;
    let mut sock = tokio::net::UnixStream::connect(dir.join(serial::SERIAL_SOCK))
        .await
        .unwrap();
    sock.write_all(b"root\r").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("root\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("the guest echoes what is typed")
            .unwrap();
        assert!(n > 0, "console closed");
        got.extend_from_slice(&buf[..n]);
    }
    wait_for("the echo in console.log", || {
        read().contains("login: root\r\n")
    })
    .await;
    // The bridge reconnects where it left off: nothing lost or doubled.
    r.driver.stop_tasks("web");
    r.mock.guest_output(b"while detached\r\n");
    r.driver.status("web").await.unwrap();
    wait_for("output printed while detached", || {
        read().contains("while detached")
    })
    .await;
    assert_eq!(read().matches("web login: ").count(), 1, "{}", read());
}

#[tokio::test]
async fn suspend_and_resume_are_refused_with_a_coded_error() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    for err in [
        r.driver.suspend("web").await.unwrap_err(),
        r.driver.resume("web").await.unwrap_err(),
    ] {
        assert!(err.is_permanent());
        let msg = err.to_string();
        assert!(msg.contains("Propolis cannot pause"), "{msg}");
        assert!(msg.contains(UNSUPPORTED), "{msg}");
    }
}

#[tokio::test]
async fn user_and_tap_networks_are_refused_with_a_located_error() {
    let r = rig().await;
    for net in [
        json!({"mode": "user"}),
        json!({"mode": "tap", "bridge": "br0"}),
    ] {
        // Prepare makes nothing on the host; start says why.
        let st = r
            .driver
            .prepare(&spec_with("web", net.clone()))
            .await
            .unwrap();
        assert_eq!(st.state, InstanceState::Stopped);
        let err = r.driver.start("web").await.unwrap_err();
        assert!(err.is_permanent(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("VM web: spec.network"), "{msg}");
        assert!(msg.contains(net["mode"].as_str().unwrap()), "{msg}");
        assert!(msg.contains("network \"vnic\""), "{msg}");
        assert!(msg.contains(UNSUPPORTED), "{msg}");
    }
    assert_eq!(
        r.host.commands(),
        vec!["zoneadm -z web list -p", "zoneadm -z web list -p"],
        "nothing was made"
    );
    assert!(r.mock.ensure_requests().is_empty());
    // No NIC at all is fine.
    r.driver
        .prepare(&spec_with("web", json!({"mode": "none"})))
        .await
        .unwrap();
    r.driver.start("web").await.unwrap();
    r.driver.destroy("web").await.unwrap();
}

#[tokio::test]
async fn a_server_that_never_listens_fails_the_start_with_the_unreachable_code() {
    let mock = MockPropolis::start().await.unwrap();
    // The zone boots but nothing starts the server.
    let mut r = rig_with(mock, SimulatedHost::new());
    r.driver.config.start_timeout = Duration::from_millis(800);
    r.mock.halt();
    r.driver.prepare(&spec("web")).await.unwrap();
    let err = r.driver.start("web").await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(UNREACHABLE), "{msg}");
    assert!(msg.contains(&r.mock.addr().to_string()), "{msg}");
    let st = r.driver.status("web").await.unwrap().unwrap();
    assert_eq!(st.state, InstanceState::Stopped);
    assert!(st.runtime.last_exit.unwrap().contains("does not answer"));
}

#[tokio::test]
async fn a_500_from_propolis_server_fails_the_start_clearly_and_the_next_start_works() {
    let r = rig().await;
    r.driver.prepare(&spec("web")).await.unwrap();
    // GET /instance, then PUT /instance fail.
    r.mock.fail_next(1, 500);
    let msg = r.driver.start("web").await.unwrap_err().to_string();
    assert!(msg.contains("GET /instance answered 500"), "{msg}");
    assert!(msg.contains(API_FAILED), "{msg}");
    r.mock.fail_next(1, 503);
    let msg = r.driver.start("web").await.unwrap_err().to_string();
    assert!(msg.contains("answered 503"), "{msg}");
    let st = r.driver.start("web").await.unwrap();
    assert_eq!(st.state, InstanceState::Running);
}

#[test]
fn settings_are_read_from_the_environment_and_bad_ones_refused() {
    let env: HashMap<&str, &str> = [
        ("VMCTL_PROPOLIS_ADDR", "127.0.0.1:13000"),
        ("VMCTL_PROPOLIS_POOL", "tank/vmctl"),
        ("VMCTL_PROPOLIS_BRAND", "propolis"),
        ("VMCTL_PROPOLIS_VNIC_LINK", "igb0"),
    ]
    .into();
    let cfg = PropolisConfig::new("/d")
        .with_lookup(|k| env.get(k).map(|v| v.to_string()))
        .unwrap();
    assert_eq!(cfg.server.port(), 13000);
    assert_eq!(cfg.pool, "tank/vmctl");
    assert_eq!(cfg.brand, "propolis");
    assert_eq!(cfg.vnic_link.as_deref(), Some("igb0"));
    let defaults = PropolisConfig::new("/d");
    assert_eq!(defaults.server.to_string(), DEFAULT_SERVER);
    assert_eq!(
        (defaults.pool.as_str(), defaults.brand.as_str()),
        ("rpool", "nebula-vm")
    );
    for (var, value) in [
        ("VMCTL_PROPOLIS_ADDR", "localhost"),
        ("VMCTL_PROPOLIS_POOL", "rpool; rm -rf /"),
        ("VMCTL_PROPOLIS_ZONE_ROOT", "zones"),
    ] {
        let err = PropolisConfig::new("/d")
            .with_lookup(|k| (k == var).then(|| value.to_owned()))
            .unwrap_err();
        assert_eq!(err.var, var);
    }
}

#[tokio::test]
async fn each_vm_gets_its_own_server_address() {
    let r = rig().await;
    r.driver.prepare(&spec("a")).await.unwrap();
    let mut b = spec("b");
    b.spec.network = Network::None;
    r.driver.prepare(&b).await.unwrap();
    let (a, b) = (
        r.driver.read_record("a").unwrap().server,
        r.driver.read_record("b").unwrap().server,
    );
    assert_eq!(a, r.mock.addr());
    assert_eq!(b.port(), a.port() + 1);
}
