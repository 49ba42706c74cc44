//! Apply, edit, delete.

use serde_json::json;
use vmctl_api::{Kind, ObjectRef, ProvisionPhase, VmPhase};
use vmctl_controllers::vm::FINALIZER;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_images_vms_and_provisions_makes_them_all_ready() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("debian")).await;
    for i in 0..5 {
        apply(&s, vm(&format!("vm{i}"), "debian")).await;
    }
    apply(&s, provision("setup", "vm0", 3)).await;

    eventually("every VM Ready", WAIT, async || {
        all_ready(&s, Kind::VirtualMachine).await
    })
    .await;
    eventually("provision Succeeded", WAIT, async || {
        provision_status(&s, "setup")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Succeeded)
    })
    .await;
    // The note follows the status write.
    eventually("ProvisionSucceeded noted", WAIT, async || {
        !reasons(&s, Kind::Provision, "setup").await.is_empty()
    })
    .await;

    assert!(all_ready(&s, Kind::Image).await);
    let (obj, st) = vm_status(&s, "vm0").await.unwrap();
    assert_eq!(st.phase, VmPhase::Running);
    assert_eq!(st.observed_generation, 1);
    assert!(obj.metadata.finalizers.contains(&FINALIZER.to_owned()));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "ImageReady" && c.reason == "ImageReady")
    );
    let runtime = st.runtime.unwrap();
    assert_eq!(runtime.backend, "fake");
    assert!(runtime.instance_id.is_some());
    assert_eq!(reasons(&s, Kind::Image, "debian").await, ["Pulled"]);
    assert_eq!(reasons(&s, Kind::VirtualMachine, "vm0").await, ["Started"]);
    assert_eq!(
        reasons(&s, Kind::Provision, "setup").await,
        ["ProvisionSucceeded"]
    );
    let (_, pst) = provision_status(&s, "setup").await.unwrap();
    assert_eq!(pst.steps.len(), 3);
    assert_eq!(pst.vm_instance_id, runtime.instance_id);
    assert_eq!(agent.world.instances().len(), 5);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_applied_before_its_image_waits_then_starts() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, vm("early", "later")).await;
    eventually("VM Pending on its image", WAIT, async || {
        vm_status(&s, "early").await.is_some_and(|(_, st)| {
            st.phase == VmPhase::Pending
                && st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "ImageReady" && c.reason == "ImageNotFound")
        })
    })
    .await;
    assert!(agent.world.instances().is_empty());
    apply(&s, image("later")).await;
    eventually("VM Ready once the image is", WAIT, async || {
        all_ready(&s, Kind::VirtualMachine).await
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_vm_reconciles_the_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;
    apply(&s, provision("prov", "box", 1)).await;
    eventually("provisioned", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Succeeded)
    })
    .await;

    let stopped = apply(
        &s,
        vm_with("box", json!({"image": "img", "powerState": "Stopped"})),
    )
    .await;
    assert_eq!(stopped.metadata.generation, 2);
    eventually("observedGeneration 2, Stopped", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(_, st)| st.observed_generation == 2 && st.phase == VmPhase::Stopped)
    })
    .await;
    assert!(
        reasons(&s, Kind::VirtualMachine, "box")
            .await
            .contains(&"Stopped".to_owned())
    );

    apply(
        &s,
        vm_with("box", json!({"image": "img", "powerState": "Suspended"})),
    )
    .await;
    eventually("observedGeneration 3, Suspended", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(_, st)| st.observed_generation == 3 && st.phase == VmPhase::Suspended)
    })
    .await;
    apply(&s, vm("box", "img")).await;
    eventually("observedGeneration 4, Running", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(o, st)| st.observed_generation == 4 && is_ready(&o))
    })
    .await;
    assert_eq!(
        agent.world.instances_created(),
        1,
        "the instance was kept across power changes"
    );
    // Same instance: provisioning is not repeated.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(agent.world.steps_run().len(), 1);

    // A new Provision generation runs again.
    let p = apply(&s, provision("prov", "box", 2)).await;
    assert_eq!(p.metadata.generation, 2);
    eventually("provision generation 2 finished", WAIT, async || {
        provision_status(&s, "prov").await.is_some_and(|(_, st)| {
            st.observed_generation == 2 && st.phase == ProvisionPhase::Succeeded
        })
    })
    .await;
    assert_eq!(agent.world.steps_run().len(), 3);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_vm_runs_its_finalizer_then_the_object_goes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("doomed", "img")).await;
    apply(&s, vm("kept", "img")).await;
    eventually("Ready", WAIT, async || {
        all_ready(&s, Kind::VirtualMachine).await
    })
    .await;
    assert_eq!(agent.world.instances().len(), 2);

    delete(&s, ObjectRef::new(Kind::VirtualMachine, "doomed")).await;
    eventually("object gone", WAIT, async || {
        get(&s, Kind::VirtualMachine, "doomed").await.is_none()
    })
    .await;
    assert!(
        !agent.world.instances().contains_key("doomed"),
        "instance destroyed"
    );
    assert!(agent.world.instances().contains_key("kept"));
    assert!(
        reasons(&s, Kind::VirtualMachine, "doomed")
            .await
            .contains(&"Destroyed".to_owned())
    );
    agent.stop().await;
}

fn condition(obj: &vmctl_api::Object, type_: &str) -> Option<(String, String)> {
    let st: vmctl_api::VirtualMachineStatus = serde_json::from_value(obj.status.clone()?).ok()?;
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (format!("{:?}", c.status), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_edits_are_classified_live_restart_or_recreate() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, image("img2")).await;
    apply(&s, vm("box", "img")).await;
    eventually("running", WAIT, async || {
        vm_status(&s, "box")
            .await
            .is_some_and(|(o, _)| is_ready(&o))
    })
    .await;

    // Restart-required: memory. Reported, the VM keeps running.
    apply(
        &s,
        vm_with("box", json!({"image": "img", "memoryMib": 2048})),
    )
    .await;
    eventually("RestartRequired", WAIT, async || {
        vm_status(&s, "box").await.is_some_and(|(o, st)| {
            st.observed_generation == 2
                && condition(&o, "RestartRequired") == Some(("True".into(), "SpecChanged".into()))
        })
    })
    .await;
    assert_eq!(
        vm_status(&s, "box").await.unwrap().1.phase,
        VmPhase::Running
    );

    // Recreate-required: the image. Reported, the disk is kept.
    apply(
        &s,
        vm_with("box", json!({"image": "img2", "memoryMib": 2048})),
    )
    .await;
    eventually("RecreateRequired", WAIT, async || {
        vm_status(&s, "box").await.is_some_and(|(o, st)| {
            st.observed_generation == 3
                && condition(&o, "RecreateRequired") == Some(("True".into(), "ImageChanged".into()))
        })
    })
    .await;
    assert_eq!(agent.world.instances_created(), 1, "no disk destroyed");
    assert!(
        reasons(&s, Kind::VirtualMachine, "box")
            .await
            .contains(&"RecreateRequired".to_owned())
    );
    let st = vm_status(&s, "box").await.unwrap().1;
    assert_eq!(st.disk_image.as_deref(), Some("img"));

    // With updatePolicy Recreate the VM is rebuilt from the new image.
    apply(
        &s,
        vm_with(
            "box",
            json!({"image": "img2", "memoryMib": 2048, "updatePolicy": "Recreate"}),
        ),
    )
    .await;
    eventually("recreated from img2", WAIT, async || {
        vm_status(&s, "box").await.is_some_and(|(o, st)| {
            st.observed_generation == 4
                && is_ready(&o)
                && st.disk_image.as_deref() == Some("img2")
                && condition(&o, "RecreateRequired").is_some_and(|c| c.0 == "False")
                && condition(&o, "RestartRequired").is_some_and(|c| c.0 == "False")
        })
    })
    .await;
    assert_eq!(agent.world.instances_created(), 2, "one new instance");
    assert!(
        reasons(&s, Kind::VirtualMachine, "box")
            .await
            .contains(&"Recreating".to_owned())
    );
    agent.stop().await;
}
