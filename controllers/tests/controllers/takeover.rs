//! Two agents on one store, one after the other (an etcd lease handed
//! over): each acts only on the instances that live under it.

use std::path::PathBuf;
use std::time::Duration;

use vmctl_api::{ConditionStatus, Kind, ObjectRef, VmPhase};
use vmctl_controllers::{FakeConfig, FakeWorld, NodeIdentity, RuntimeConfig};

use crate::common::*;

/// An agent's world (what its driver sees) and identity: node `node`,
/// data dir `data_dir`.
fn agent(node: &str, data_dir: &str) -> (FakeWorld, RuntimeConfig) {
    let world = FakeWorld::new(FakeConfig {
        data_dir: Some(PathBuf::from(data_dir)),
        ..FakeConfig::default()
    });
    let config = RuntimeConfig {
        node: NodeIdentity {
            name: node.into(),
            data_dir: Some(PathBuf::from(data_dir)),
        },
        ..config()
    };
    (world, config)
}

/// The `Ready` condition's status and reason.
async fn ready(
    s: &std::sync::Arc<dyn vmctl_store::Store>,
    name: &str,
) -> (ConditionStatus, String) {
    let (_, st) = vm_status(s, name).await.expect("the VM exists");
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    (c.status, c.reason.clone())
}

/// The fault: a second agent that took the lease of a prefix (same host,
/// its own data dir) saw no instance in its data dir, noted a false
/// `Crashed` and started a second copy of every VM on a new empty disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_taking_the_lease_never_starts_a_second_copy_of_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (wa, ca) = agent("host-1", "/agents/a");
    let (wb, cb) = agent("host-1", "/agents/b");

    // Agent A starts e1.
    let a = Agent::start_with(dir.path(), wa.clone(), ca.clone()).await;
    let s = a.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("e1", "img")).await;
    eventually("e1 Ready under A", WAIT, async || {
        vm_status(&s, "e1").await.is_some_and(|(o, _)| is_ready(&o))
    })
    .await;
    let (_, before) = vm_status(&s, "e1").await.unwrap();
    assert_eq!(before.node_name.as_deref(), Some("host-1"));
    let work_dir = before.runtime.as_ref().unwrap().work_dir.clone();
    assert_eq!(work_dir.as_deref(), Some("/agents/a/vms/e1"));
    drop(s);
    a.stop().await;

    // Agent B takes over: e1 is NodeLost, nothing started for it; a VM
    // never started anywhere is B's to start.
    let b = Agent::start_with(dir.path(), wb.clone(), cb.clone()).await;
    let s = b.store.clone();
    apply(&s, vm("fresh", "img")).await;
    eventually("fresh Ready under B", WAIT, async || {
        vm_status(&s, "fresh")
            .await
            .is_some_and(|(o, _)| is_ready(&o))
    })
    .await;
    eventually("e1 NodeLost under B", WAIT, async || {
        ready(&s, "e1").await == (ConditionStatus::False, "NodeLost".into())
    })
    .await;
    // Give a wrong start every chance to happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!wb.instances().contains_key("e1"), "no second copy of e1");
    assert_eq!(wb.instances_created(), 1, "B made only fresh");
    let (_, lost) = vm_status(&s, "e1").await.unwrap();
    assert_eq!(lost.runtime, before.runtime, "the last known runtime stays");
    assert_eq!(lost.node_name.as_deref(), Some("host-1"));
    assert_eq!(
        lost.phase,
        VmPhase::Running,
        "the last reported phase stays"
    );
    assert_eq!(lost.start_failures.count, 0, "no crash counted");
    let msg = lost
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message
        .clone();
    assert!(
        msg.contains("node host-1 (work dir /agents/a/vms/e1)")
            && msg.contains("this agent (node host-1, data dir /agents/b)"),
        "{msg}"
    );
    let reasons_b = reasons(&s, Kind::VirtualMachine, "e1").await;
    assert_eq!(reasons_b, ["Started", "NodeLost"], "no false Crashed note");
    drop(s);
    b.stop().await;

    // A comes back: it adopts e1 (no new start) and leaves B's VM alone.
    let a = Agent::start_with(dir.path(), wa.clone(), ca.clone()).await;
    let s = a.store.clone();
    eventually("e1 Ready again under A", WAIT, async || {
        vm_status(&s, "e1").await.is_some_and(|(o, _)| is_ready(&o))
    })
    .await;
    eventually("fresh NodeLost under A", WAIT, async || {
        ready(&s, "fresh").await == (ConditionStatus::False, "NodeLost".into())
    })
    .await;
    assert_eq!(wa.instances()["e1"].starts, 1, "adopted, not restarted");
    assert_eq!(wa.instances_created(), 1, "A made only e1");
    assert!(!wa.instances().contains_key("fresh"));

    // Deleting B's VM from A: nothing is claimed destroyed, the finalizer
    // stays, and the VM waits Terminating for its own agent.
    delete(&s, ObjectRef::new(Kind::VirtualMachine, "fresh")).await;
    eventually("the deletion reported", WAIT, async || {
        vm_status(&s, "fresh")
            .await
            .is_some_and(|(_, st)| st.phase == VmPhase::Terminating)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (obj, _) = vm_status(&s, "fresh")
        .await
        .expect("kept: its instance lives on");
    assert_eq!(obj.metadata.finalizers, ["vmctl.dev/vm-teardown"]);
    let notes_a = notes(&s, Kind::VirtualMachine, "fresh").await;
    assert!(
        !notes_a.iter().any(|n| n.reason == "Destroyed"),
        "{notes_a:?}"
    );
    assert!(
        notes_a
            .iter()
            .any(|n| n.reason == "NodeLost" && n.message.contains("was not destroyed")),
        "{notes_a:?}"
    );
    drop(s);
    a.stop().await;

    // B back: it tears its own instance down, and the VM goes.
    let b = Agent::start_with(dir.path(), wb.clone(), cb).await;
    let s = b.store.clone();
    eventually("fresh gone", WAIT, async || {
        vm_status(&s, "fresh").await.is_none()
    })
    .await;
    assert!(!wb.instances().contains_key("fresh"), "destroyed by B");
    assert!(wa.instances().contains_key("e1"), "A's VM untouched");
    drop(s);
    b.stop().await;
}
