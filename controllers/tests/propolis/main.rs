//! The real VM controller on the Propolis driver, against a mock
//! propolis-server on 127.0.0.1 and a simulated illumos host: apply →
//! Running → console → stop → start → delete, and injected failures that
//! end in a condition, a note and backoff.

#[allow(dead_code)]
#[path = "../controllers/common.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use vmctl_api::{Kind, ObjectRef, VmPhase};
use vmctl_controllers::drivers::propolis::{PropolisConfig, PropolisDriver, SimulatedHost};
use vmctl_controllers::seed::SeedTool;
use vmctl_controllers::{Drivers, FakeConfig, FakeWorld, run};
use vmctl_propolis_mock::{InstanceState as MockState, MockPropolis};
use vmctl_store::Store;

use common::*;

const WAIT: Duration = Duration::from_secs(20);

struct Rig {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    mock: MockPropolis,
    host: SimulatedHost,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), vmctl_controllers::RunError>>,
}

impl Rig {
    async fn start() -> Rig {
        let mock = MockPropolis::start().await.unwrap();
        let host = SimulatedHost::new().with_mock_control(mock.control_url());
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = PropolisConfig::new(dir.path().join("data"));
        cfg.server = mock.addr();
        cfg.vnic_link = Some("igb0".into());
        cfg.seed_tool = SeedTool::PureRust;
        cfg.start_timeout = Duration::from_secs(2);
        let world = FakeWorld::new(FakeConfig::default());
        let fake = world.drivers();
        let drivers = Drivers {
            hypervisor: Arc::new(PropolisDriver::new(cfg, Arc::new(host.clone()))),
            images: fake.images,
            provisioner: fake.provisioner,
        };
        let store = open(&dir.path().join("db")).await;
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(run(store.clone(), drivers, config(), shutdown));
        Rig {
            dir,
            store,
            mock,
            host,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }

    fn console_log(&self, vm: &str) -> String {
        let p = self
            .dir
            .path()
            .join("data/vms")
            .join(vm)
            .join("console.log");
        std::fs::read_to_string(p).unwrap_or_default()
    }

    async fn phase(&self, vm: &str) -> Option<VmPhase> {
        vm_status(&self.store, vm).await.map(|(_, st)| st.phase)
    }
}

fn web(power: &str) -> vmctl_api::Object {
    vm_with(
        "web",
        json!({
            "image": "debian",
            "network": {"mode": "vnic", "name": "vnic0"},
            "powerState": power,
        }),
    )
}

async fn wait_phase(r: &Rig, vm: &str, phase: VmPhase) {
    eventually(&format!("{vm} {phase:?}"), WAIT, async || {
        r.phase(vm).await == Some(phase)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_run_console_stop_start_delete_against_a_mock_propolis_server() {
    let r = Rig::start().await;
    let s = r.store.clone();
    apply(&s, image("debian")).await;
    apply(&s, web("Running")).await;
    wait_phase(&r, "web", VmPhase::Running).await;
    let (obj, st) = vm_status(&s, "web").await.unwrap();
    assert!(is_ready(&obj));
    let rt = st.runtime.unwrap();
    assert_eq!(rt.backend, "propolis");
    assert_eq!(rt.overlay.as_deref(), Some("/dev/zvol/rdsk/rpool/vms/web"));
    assert_eq!(r.mock.state(), Some(MockState::Running));
    assert_eq!(r.host.state().zones["web"].state, "running");

    // The console shows what the mock's guest prints.
    eventually("the banner in console.log", WAIT, async || {
        r.console_log("web").contains("web login: ")
    })
    .await;
    r.mock.guest_output(b"hello from the guest\r\n");
    eventually("guest output in console.log", WAIT, async || {
        r.console_log("web").contains("hello from the guest")
    })
    .await;

    apply(&s, web("Stopped")).await;
    wait_phase(&r, "web", VmPhase::Stopped).await;
    assert_eq!(r.host.state().zones["web"].state, "installed");
    assert!(!r.mock.is_listening());

    apply(&s, web("Running")).await;
    wait_phase(&r, "web", VmPhase::Running).await;
    assert_eq!(r.mock.ensure_requests().len(), 2, "a new instance");
    eventually("Started, Stopped, Started noted", WAIT, async || {
        reasons(&s, Kind::VirtualMachine, "web").await == ["Started", "Stopped", "Started"]
    })
    .await;

    delete(&s, ObjectRef::new(Kind::VirtualMachine, "web")).await;
    eventually("web gone", WAIT, async || {
        get(&s, Kind::VirtualMachine, "web").await.is_none()
    })
    .await;
    let host = r.host.state();
    assert!(host.zones.is_empty(), "{:?}", host.zones);
    assert!(host.vnics.is_empty());
    assert!(!host.datasets.contains_key("rpool/vms/web"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_fails_is_noticed_without_polling_and_restarted() {
    let r = Rig::start().await;
    let s = r.store.clone();
    apply(&s, image("debian")).await;
    apply(&s, web("Running")).await;
    wait_phase(&r, "web", VmPhase::Running).await;
    r.mock.fail_instance();
    eventually("a Crashed note", WAIT, async || {
        reasons(&s, Kind::VirtualMachine, "web")
            .await
            .contains(&"Crashed".to_owned())
    })
    .await;
    // The phase still says Running when the note is written: wait for the
    // new instance.
    eventually("a new instance running", WAIT, async || {
        r.mock.ensure_requests().len() == 2 && r.mock.state() == Some(MockState::Running)
    })
    .await;
    wait_phase(&r, "web", VmPhase::Running).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_server_failures_end_in_a_condition_a_note_and_backoff() {
    let r = Rig::start().await;
    let s = r.store.clone();
    apply(&s, image("debian")).await;
    // 500s: the first starts fail, then one succeeds.
    r.mock.fail_next(2, 500);
    apply(&s, web("Running")).await;
    eventually("StartFailed with the 500", WAIT, async || {
        vm_status(&s, "web").await.is_some_and(|(_, st)| {
            st.start_failures.count >= 1
                && st.conditions.iter().any(|c| {
                    c.type_ == "Ready"
                        && c.reason == "StartFailed"
                        && c.message.contains("answered 500")
                })
        })
    })
    .await;
    // The note follows the status write.
    eventually("a BackOff note", WAIT, async || {
        reasons(&s, Kind::VirtualMachine, "web")
            .await
            .contains(&"BackOff".to_owned())
    })
    .await;
    wait_phase(&r, "web", VmPhase::Running).await;

    // The server goes away and does not come back with the zone.
    apply(&s, web("Stopped")).await;
    wait_phase(&r, "web", VmPhase::Stopped).await;
    let before = vm_status(&s, "web").await.unwrap().1.start_failures.count;
    assert!(!r.mock.is_listening());
    r.mock.set_server_fails_to_start(true);
    apply(&s, web("Running")).await;
    eventually("StartFailed: unreachable", WAIT, async || {
        vm_status(&s, "web").await.is_some_and(|(_, st)| {
            st.start_failures.count > before
                && st.phase == VmPhase::CrashLoopBackOff
                && st.conditions.iter().any(|c| {
                    c.type_ == "Ready"
                        && c.reason == "StartFailed"
                        && c.message.contains("vmctl::propolis::unreachable")
                })
        })
    })
    .await;
    r.mock.set_server_fails_to_start(false);
    wait_phase(&r, "web", VmPhase::Running).await;
    r.stop().await;
}

/// The fault: a host command that failed during prepare (here `zoneadm
/// install`) reached neither the VM's status nor its events. It is the
/// `Ready` condition's reason `PrepareFailed` with the command and its
/// code, a Warning note, and a retry after backoff that finishes prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_command_failing_in_prepare_is_a_condition_a_note_and_is_retried() {
    let r = Rig::start().await;
    let s = r.store.clone();
    apply(&s, image("debian")).await;
    r.host.fail_next("zoneadm -z web install");
    apply(&s, web("Running")).await;
    eventually("PrepareFailed naming zoneadm", WAIT, async || {
        vm_status(&s, "web").await.is_some_and(|(_, st)| {
            st.conditions.iter().any(|c| {
                c.type_ == "Ready"
                    && c.reason == "PrepareFailed"
                    && c.message.contains("zoneadm")
                    && c.message.contains("vmctl::propolis::host_command_failed")
            })
        })
    })
    .await;
    eventually("a PrepareFailed note", WAIT, async || {
        reasons(&s, Kind::VirtualMachine, "web")
            .await
            .contains(&"PrepareFailed".to_owned())
    })
    .await;
    // The next try finishes the prepare and starts the VM.
    wait_phase(&r, "web", VmPhase::Running).await;
    r.stop().await;
}
