//! Disk sizes (issue 16), against the fake hypervisor: a failed prepare
//! is the VM's news, a shrink is refused visibly without stopping the VM,
//! a growth is applied live.

use serde_json::json;
use vmctl_api::{ConditionStatus, Kind, NoteType, ROOT_DISK, VirtualMachineStatus, VmPhase};

use crate::common::*;

fn cond<'a>(st: &'a VirtualMachineStatus, type_: &str) -> Option<&'a vmctl_api::Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

fn root_size(st: &VirtualMachineStatus) -> Option<u64> {
    st.runtime
        .as_ref()?
        .disks
        .iter()
        .find(|d| d.name == ROOT_DISK)
        .map(|d| d.size_bytes)
}

/// Issue 16: a prepare error (any driver's) only reached the agent's log;
/// the VM sat there with no word of why. Now it is in the VM's `Ready`
/// condition and a Warning note, and retried with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prepare_reaches_the_vms_status_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.fail_prepares.insert("box".into(), 2);
    });
    let agent = Agent::start(dir.path(), w).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;

    let mut seen = false;
    eventually("Ready after the prepare failures", WAIT, async || {
        let (obj, st) = vm_status(&s, "box").await.unwrap();
        if let Some(c) = cond(&st, "Ready")
            && c.reason == "PrepareFailed"
        {
            assert_eq!(st.phase, VmPhase::CrashLoopBackOff);
            assert!(
                c.message.contains("injected failure: prepare of box"),
                "{}",
                c.message
            );
            seen = true;
        }
        is_ready(&obj)
    })
    .await;
    assert!(
        seen,
        "the prepare failure was visible in the Ready condition"
    );
    eventually("the notes", WAIT, async || {
        let notes = notes(&s, Kind::VirtualMachine, "box").await;
        notes.iter().any(|n| n.reason == "Started")
    })
    .await;
    let notes = notes(&s, Kind::VirtualMachine, "box").await;
    let failed: Vec<_> = notes
        .iter()
        .filter(|n| n.reason == "PrepareFailed")
        .collect();
    assert_eq!(failed.len(), 2, "{notes:?}");
    assert!(
        failed.iter().all(|n| n.type_ == NoteType::Warning
            && n.message.contains("injected failure: prepare of box"))
    );
    agent.stop().await;
}

/// Issue 16: a running VM with `disk 2` re-applied with `disk 1` kept
/// running, the refusal was only in the agent log, and the VM never
/// started again. Now: a condition and a Warning note, the VM runs on,
/// and it stops and starts with its disk as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_shrink_is_visible_and_the_vm_still_stops_and_starts() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    // The fake image is 8 GiB.
    apply(&s, vm_with("box", json!({"image": "img", "diskGib": 10}))).await;
    eventually("Ready", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(o, _)| is_ready(&o))
    })
    .await;

    apply(&s, vm_with("box", json!({"image": "img", "diskGib": 9}))).await;
    eventually("DiskShrinkRefused", WAIT, async || {
        let (_, st) = vm_status(&s, "box").await.unwrap();
        cond(&st, "DiskShrinkRefused").is_some_and(|c| c.status == ConditionStatus::True)
    })
    .await;
    let (obj, st) = vm_status(&s, "box").await.unwrap();
    assert!(is_ready(&obj), "the VM runs on");
    assert_eq!(root_size(&st), Some(10 << 30));
    eventually("the Warning note", WAIT, async || {
        notes(&s, Kind::VirtualMachine, "box")
            .await
            .iter()
            .any(|n| {
                n.reason == "DiskShrinkRefused"
                    && n.type_ == NoteType::Warning
                    && n.message.contains("disks cannot shrink")
            })
    })
    .await;

    for power in ["Stopped", "Running"] {
        apply(
            &s,
            vm_with(
                "box",
                json!({"image": "img", "diskGib": 9, "powerState": power}),
            ),
        )
        .await;
        eventually(power, WAIT, async || {
            let (_, st) = vm_status(&s, "box").await.unwrap();
            format!("{:?}", st.phase) == power
        })
        .await;
    }
    let (_, st) = vm_status(&s, "box").await.unwrap();
    assert_eq!(root_size(&st), Some(10 << 30), "the disk kept its size");
    agent.stop().await;
}

/// Issue 16: `disk 3` on a running VM was neither applied nor reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vms_disk_grows_live_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;
    eventually("Ready", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(o, _)| is_ready(&o))
    })
    .await;
    apply(&s, vm_with("box", json!({"image": "img", "diskGib": 12}))).await;
    eventually("grown", WAIT, async || {
        let (_, st) = vm_status(&s, "box").await.unwrap();
        root_size(&st) == Some(12 << 30)
    })
    .await;
    let (_, st) = vm_status(&s, "box").await.unwrap();
    assert!(cond(&st, "RestartRequired").is_none_or(|c| c.status == ConditionStatus::False));
    assert_eq!(w.instances()["box"].starts, 1, "not restarted");
    eventually("the note", WAIT, async || {
        notes(&s, Kind::VirtualMachine, "box")
            .await
            .iter()
            .any(|n| n.reason == "DiskResized" && n.message.contains("from 8 GiB to 12 GiB"))
    })
    .await;
    agent.stop().await;
}
