//! Snapshots across agent restarts: the instance outlives the agent (as
//! QEMU outlives a killed agent), and a Snapshot created afterwards is
//! saved by the new controllers.

use std::time::Duration;

use vmctl_api::{Kind, Snapshot, SnapshotPhase, SnapshotSpec, SnapshotStatus};

use crate::common::*;

fn snapshot(name: &str, vm: &str) -> vmctl_api::Object {
    let spec = SnapshotSpec {
        vm: vm.to_owned(),
        restore_token: None,
    };
    Snapshot::new(name, spec).to_object()
}

async fn snapshot_status(
    store: &std::sync::Arc<dyn vmctl_store::Store>,
    name: &str,
) -> Option<SnapshotStatus> {
    let obj = get(store, Kind::Snapshot, name).await?;
    Some(
        Snapshot::from_object(&obj)
            .unwrap()
            .status
            .unwrap_or_default(),
    )
}

/// Kills (or stops) the controllers of a Ready VM, starts new ones on the
/// same store and fake world, then creates a Snapshot: it must be Ready.
async fn snapshot_after_restart(kill: bool) {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply_until_ready(&s, vm("box", "img")).await;
    // One snapshot before the restart, so the restarted controllers also
    // see an existing Snapshot on start.
    apply(&s, snapshot("before", "box")).await;
    eventually("first snapshot Ready", WAIT, async || {
        snapshot_status(&s, "before")
            .await
            .is_some_and(|st| st.phase == SnapshotPhase::Ready)
    })
    .await;
    drop(s);
    if kill {
        agent.kill().await;
    } else {
        agent.stop().await;
    }
    assert_eq!(w.instances().len(), 1, "the instance survived the agent");

    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, snapshot("after", "box")).await;
    eventually(
        "snapshot after the restart Ready",
        Duration::from_secs(5),
        async || {
            snapshot_status(&s, "after")
                .await
                .is_some_and(|st| st.phase == SnapshotPhase::Ready)
        },
    )
    .await;
    let saved: Vec<_> = w.instances()["box"]
        .snapshots
        .iter()
        .map(|i| i.name.clone())
        .collect();
    assert_eq!(saved, ["before", "after"]);
    assert_eq!(
        w.instances()["box"].starts,
        1,
        "the running VM was not restarted"
    );
    drop(s);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_after_an_agent_restart_gets_its_status() {
    snapshot_after_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_after_a_graceful_agent_restart_gets_its_status() {
    snapshot_after_restart(false).await;
}

/// The hypervisor cannot list a VM's snapshots (as on the shared-folders
/// branch, where listing a running VM with shares failed): a new Snapshot
/// of it says so in its status and a Warning note instead of staying
/// without any status, and is saved once the list can be read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_vm_cannot_be_looked_at_says_so_in_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply_until_ready(&s, vm("box", "img")).await;
    w.configure(|c| {
        c.fail_snapshot_lists.insert("box".into());
    });
    apply(&s, snapshot("snap", "box")).await;
    eventually(
        "the status names the failure",
        Duration::from_secs(5),
        async || {
            snapshot_status(&s, "snap").await.is_some_and(|st| {
                st.phase == SnapshotPhase::Pending
                    && st.conditions.iter().any(|c| {
                        c.type_ == "Ready"
                            && c.reason == "HypervisorError"
                            && c.message.contains("snapshot list of box")
                    })
            })
        },
    )
    .await;
    eventually("a Warning note", Duration::from_secs(5), async || {
        reasons(&s, Kind::Snapshot, "snap")
            .await
            .contains(&"HypervisorError".to_owned())
    })
    .await;
    assert!(
        w.instances()["box"].snapshots.is_empty(),
        "nothing saved while the list cannot be read"
    );

    w.configure(|c| {
        c.fail_snapshot_lists.clear();
    });
    eventually("Ready once the list can be read", WAIT, async || {
        snapshot_status(&s, "snap")
            .await
            .is_some_and(|st| st.phase == SnapshotPhase::Ready)
    })
    .await;
    let notes = reasons(&s, Kind::Snapshot, "snap").await;
    assert_eq!(
        notes.iter().filter(|r| *r == "HypervisorError").count(),
        1,
        "one note for the same failure, not one per retry: {notes:?}"
    );
    drop(s);
    agent.stop().await;
}

/// The fault (issue 16, found by a new-user tryout): a VM whose QEMU no
/// longer answered QMP (a snapshot load that hung) still showed Running,
/// Ready and SshReady, and deleting it left the VM and its Snapshots
/// Terminating for good, since deleting a Snapshot asked that QEMU to
/// remove the snapshot from the disks. Now the VM is not Ready (reason
/// HypervisorError, one Warning note), and deleting it deletes its
/// Snapshots without asking the hypervisor (the disks go with the VM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_hypervisor_stops_answering_is_not_ready_and_is_deleted_with_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let grace = Duration::from_millis(800);
    let cfg = vmctl_controllers::RuntimeConfig {
        inspect_grace: grace,
        ..config()
    };
    let agent = Agent::start_with(dir.path(), w.clone(), cfg).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply_until_ready(&s, vm("box", "img")).await;
    apply(&s, snapshot("snap", "box")).await;
    eventually("the snapshot is Ready", WAIT, async || {
        snapshot_status(&s, "snap")
            .await
            .is_some_and(|st| st.phase == SnapshotPhase::Ready)
    })
    .await;

    w.configure(|c| {
        c.unresponsive.insert("box".into());
    });
    // Anything that wakes the VM's reconcile: a label.
    let mut labelled = get(&s, Kind::VirtualMachine, "box").await.unwrap();
    labelled.metadata.labels.insert("poke".into(), "1".into());
    apply(&s, labelled).await;
    let silent = std::time::Instant::now();
    eventually("Ready=False, HypervisorError", WAIT, async || {
        get(&s, Kind::VirtualMachine, "box").await.is_some_and(|o| {
            let vm = vmctl_api::VirtualMachine::from_object(&o).unwrap();
            vm.status.unwrap_or_default().conditions.iter().any(|c| {
                c.type_ == "Ready"
                    && c.status == vmctl_api::ConditionStatus::False
                    && c.reason == "HypervisorError"
                    && c.message.contains("does not answer")
                    && c.message.contains("vmctl delete vm box")
            })
        })
    })
    .await;
    // A monitor busy for a moment is no fault: nothing said before the grace.
    assert!(silent.elapsed() >= grace, "{:?}", silent.elapsed());
    let notes = reasons(&s, Kind::VirtualMachine, "box").await;
    assert_eq!(
        notes.iter().filter(|r| *r == "HypervisorError").count(),
        1,
        "{notes:?}"
    );

    // `vmctl stop` ends it although nothing can be asked of it.
    let mut stopped = get(&s, Kind::VirtualMachine, "box").await.unwrap();
    stopped.spec["powerState"] = serde_json::json!("Stopped");
    apply(&s, stopped).await;
    eventually("stopped", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(_, st)| st.phase == vmctl_api::VmPhase::Stopped)
    })
    .await;

    w.configure(|c| {
        c.unresponsive.insert("box".into());
    });
    delete(&s, vmctl_api::ObjectRef::new(Kind::VirtualMachine, "box")).await;
    eventually("the VM and its snapshot are gone", WAIT, async || {
        get(&s, Kind::VirtualMachine, "box").await.is_none()
            && get(&s, Kind::Snapshot, "snap").await.is_none()
    })
    .await;
    assert!(w.instances().is_empty(), "the instance was destroyed");
    drop(s);
    agent.stop().await;
}

/// Found as: `snapshot create --wait` on a VM whose image download failed
/// waited its whole 600 s, the Snapshot `Pending` ("VM has no disks yet").
/// A Snapshot of a VM that has no disks and will get none until its user
/// acts (never started and asked to stay stopped; its image missing or
/// failed) fails at once, saying why and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_vm_that_cannot_start_fails_at_once_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    // An image whose download failed for good (as on a 404), before the
    // controllers start: they leave a Failed image alone.
    {
        let s = open(dir.path()).await;
        let img = apply(&s, image("gone")).await;
        let failed = serde_json::json!({
            "phase": "Failed",
            "observedGeneration": img.metadata.generation,
            "conditions": [{
                "type": "Ready", "status": "False", "reason": "Failed",
                "message": "HTTP 404 Not Found", "observedGeneration": img.metadata.generation,
                "lastTransitionTime": "2026-12-01T00:00:00Z"
            }]
        });
        s.update_status(&img.object_ref(), failed, None)
            .await
            .unwrap();
    }
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, vm("broken", "gone")).await;
    apply(&s, snapshot("of-broken", "broken")).await;
    apply(
        &s,
        vm_with(
            "parked",
            serde_json::json!({"image": "img", "powerState": "Stopped"}),
        ),
    )
    .await;
    apply(&s, vm("orphan", "nosuch")).await;
    apply(&s, snapshot("of-parked", "parked")).await;
    apply(&s, snapshot("of-orphan", "orphan")).await;
    for (snap, why) in [
        (
            "of-parked",
            "VM parked has no disks to snapshot: it has never run (its powerState is Stopped): start it (`vmctl start parked`)",
        ),
        (
            "of-orphan",
            "VM orphan has no disks to snapshot: its image nosuch does not exist: apply it",
        ),
        (
            "of-broken",
            "VM broken has no disks to snapshot: its image gone failed: HTTP 404 Not Found: fix the image's source",
        ),
    ] {
        eventually(&format!("{snap} Failed"), WAIT, async || {
            snapshot_status(&s, snap)
                .await
                .is_some_and(|st| st.phase == SnapshotPhase::Failed)
        })
        .await;
        let st = snapshot_status(&s, snap).await.unwrap();
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, "VmNotStarted");
        assert!(ready.message.contains(why), "{}", ready.message);
        assert!(
            ready.message.ends_with("then create the snapshot again"),
            "{}",
            ready.message
        );
    }
    drop(s);
    agent.stop().await;
}
