//! Agents that die: restarted controllers on the same store finish the work.

use std::time::Duration;

use vmctl_api::{Kind, ProvisionPhase};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_killed_mid_reconcile_finish_the_work_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| c.latency = Duration::from_millis(30));
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    for i in 0..12 {
        apply(&s, vm(&format!("vm{i}"), "img")).await;
    }
    apply(&s, provision("prov", "vm0", 3)).await;
    // Kill while VMs are being started: some are Running, some not yet.
    eventually("some instance exists", WAIT, async || {
        !w.instances().is_empty()
    })
    .await;
    drop(s);
    agent.kill().await;
    assert!(
        !all_ready(&open_and_close(dir.path()).await, Kind::VirtualMachine).await,
        "the kill came mid-way"
    );

    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    eventually("all VMs Ready after restart", WAIT, async || {
        all_ready(&s, Kind::VirtualMachine).await
    })
    .await;
    eventually("provision Succeeded after restart", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Succeeded)
    })
    .await;
    assert_eq!(w.instances_created(), 12, "no duplicate instances");
    assert!(
        w.instances().values().all(|i| i.starts == 1),
        "no instance started twice"
    );
    drop(s);
    agent.stop().await;
}

/// Opens the store, copies nothing, and hands back a handle that closes on drop.
async fn open_and_close(dir: &std::path::Path) -> std::sync::Arc<dyn vmctl_store::Store> {
    open(dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_repeat_finished_work() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;
    apply(&s, provision("prov", "box", 2)).await;
    eventually("provisioned", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Succeeded)
    })
    .await;
    // The note follows the status write.
    eventually("ProvisionSucceeded noted", WAIT, async || {
        !reasons(&s, Kind::Provision, "prov").await.is_empty()
    })
    .await;
    let seq_before = s.last_seq().await.unwrap();
    drop(s);
    agent.stop().await;

    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.steps_run().len(), 2, "steps not run again");
    assert_eq!(reasons(&s, Kind::VirtualMachine, "box").await, ["Started"]);
    assert_eq!(reasons(&s, Kind::Image, "img").await, ["Pulled"]);
    assert_eq!(
        s.last_seq().await.unwrap(),
        seq_before,
        "a restart writes nothing when nothing changed"
    );
    drop(s);
    agent.stop().await;
}
