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
    apply_until_ready(&s, vm_with("box", json!({"image": "img", "diskGib": 10}))).await;

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
    apply_until_ready(&s, vm("box", "img")).await;
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

fn extra_disks(st: &VirtualMachineStatus) -> Vec<String> {
    let mut names: Vec<String> = st
        .runtime
        .iter()
        .flat_map(|r| &r.disks)
        .filter(|d| d.name != ROOT_DISK)
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    names
}

/// Issue 16 item 2: an extra disk added to or removed from a running VM
/// was only attached or detached at the next start. Now it is hot-plugged
/// (a Normal note each time, the status shows it), without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_disk_added_to_a_running_vm_is_hot_plugged_and_removed_live() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    let with = |disks: serde_json::Value| {
        vm_with(
            "box",
            json!({"image": "img", "disks": disks, "updatePolicy": "Restart"}),
        )
    };
    apply_until_ready(&s, with(json!([]))).await;

    apply(&s, with(json!([{"name": "data", "sizeGib": 2}]))).await;
    eventually("data attached", WAIT, async || {
        let (_, st) = vm_status(&s, "box").await.unwrap();
        extra_disks(&st) == ["data"]
    })
    .await;
    let inst = &w.instances()["box"];
    assert!(
        inst.runtime
            .disks
            .iter()
            .any(|d| d.name == "data" && d.size_bytes == 2 << 30)
    );
    eventually("the attach note", WAIT, async || {
        notes(&s, Kind::VirtualMachine, "box")
            .await
            .iter()
            .any(|n| {
                n.reason == "DiskAttached"
                    && n.type_ == NoteType::Normal
                    && n.message.contains("virtio-data")
            })
    })
    .await;

    apply(&s, with(json!([]))).await;
    eventually("data detached", WAIT, async || {
        let (_, st) = vm_status(&s, "box").await.unwrap();
        extra_disks(&st).is_empty()
    })
    .await;
    eventually("the detach note", WAIT, async || {
        notes(&s, Kind::VirtualMachine, "box")
            .await
            .iter()
            .any(|n| n.reason == "DiskDetached" && n.type_ == NoteType::Normal)
    })
    .await;
    let (obj, st) = vm_status(&s, "box").await.unwrap();
    assert!(is_ready(&obj));
    assert!(cond(&st, "RestartRequired").is_none_or(|c| c.status == ConditionStatus::False));
    assert_eq!(
        w.instances()["box"].starts,
        1,
        "never restarted (policy Restart)"
    );
    agent.stop().await;
}

/// A hot-plug that fails (no free root port, a guest that keeps the disk)
/// is a Warning note and RestartRequired with the reason, tried once per
/// generation; the VM runs on, and a restart attaches the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hot_plug_is_a_warning_and_restart_required_and_a_restart_attaches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply_until_ready(&s, vm("box", "img")).await;
    w.configure(|c| {
        c.fail_hotplugs.insert("box".into());
    });
    apply(
        &s,
        vm_with(
            "box",
            json!({"image": "img", "disks": [{"name": "data", "sizeGib": 2}]}),
        ),
    )
    .await;
    eventually("RestartRequired HotPlugFailed", WAIT, async || {
        let (_, st) = vm_status(&s, "box").await.unwrap();
        cond(&st, "RestartRequired").is_some_and(|c| {
            c.status == ConditionStatus::True
                && c.reason == "HotPlugFailed"
                && c.message
                    .contains("injected failure: hot-plug of disk data of box")
        })
    })
    .await;
    let (obj, st) = vm_status(&s, "box").await.unwrap();
    assert!(is_ready(&obj), "the VM runs on");
    assert!(extra_disks(&st).is_empty());
    eventually("the Warning note", WAIT, async || {
        notes(&s, Kind::VirtualMachine, "box")
            .await
            .iter()
            .any(|n| {
                n.reason == "HotPlugFailed"
                    && n.type_ == NoteType::Warning
                    && n.message.contains("attached at the next start")
            })
    })
    .await;
    // Not tried again for this generation.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let failed = notes(&s, Kind::VirtualMachine, "box")
        .await
        .iter()
        .filter(|n| n.reason == "HotPlugFailed")
        .count();
    assert_eq!(failed, 1);

    for power in ["Stopped", "Running"] {
        apply(
            &s,
            vm_with(
                "box",
                json!({"image": "img", "disks": [{"name": "data", "sizeGib": 2}], "powerState": power}),
            ),
        )
        .await;
        eventually(power, WAIT, async || {
            let (_, st) = vm_status(&s, "box").await.unwrap();
            format!("{:?}", st.phase) == power
        })
        .await;
    }
    eventually("attached at the start", WAIT, async || {
        let (_, st) = vm_status(&s, "box").await.unwrap();
        extra_disks(&st) == ["data"]
            && cond(&st, "RestartRequired").is_some_and(|c| c.status == ConditionStatus::False)
    })
    .await;
    agent.stop().await;
}
