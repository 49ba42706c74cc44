//! Readiness: a running VM is Ready only once its guest answers SSH.

use vmctl_api::{ConditionStatus, VmPhase};

use crate::common::*;

fn cond(st: &vmctl_api::VirtualMachineStatus, type_: &str) -> Option<vmctl_api::Condition> {
    st.conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// The fault: `vmctl up` returned Ready while the guest still booted, and
/// a `vmctl ssh` right after hung in a stalled connect. Ready now waits
/// for the SSH probe, and `SshReady` says why not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_is_not_ready_until_its_guest_answers_ssh() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.ssh_unreachable.insert("slow".into());
    });
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("slow", "img")).await;
    eventually("Running with SshReady False", WAIT, async || {
        let (_, st) = vm_status(&s, "slow").await.unwrap();
        st.phase == VmPhase::Running && cond(&st, "SshReady").is_some()
    })
    .await;
    // Probed every 100 ms, it stays not Ready while SSH does not answer.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let (obj, st) = vm_status(&s, "slow").await.unwrap();
    assert!(!is_ready(&obj), "Ready before SSH answers: {st:?}");
    let ssh = cond(&st, "SshReady").unwrap();
    assert_eq!(ssh.status, ConditionStatus::False);
    assert_eq!(ssh.reason, "WaitingForSsh");
    let ready = cond(&st, "Ready").unwrap();
    assert_eq!(ready.reason, "SshNotReady");
    assert!(
        ready.message.contains("waiting for SSH on 127.0.0.1:"),
        "{}",
        ready.message
    );

    let before = chrono::Utc::now();
    w.configure(|c| c.ssh_unreachable.clear());
    eventually("Ready once SSH answers", WAIT, async || {
        is_ready(&vm_status(&s, "slow").await.unwrap().0)
    })
    .await;
    let (_, st) = vm_status(&s, "slow").await.unwrap();
    let ssh = cond(&st, "SshReady").unwrap();
    assert_eq!(ssh.status, ConditionStatus::True);
    assert_eq!(ssh.reason, "Connected");
    let since = ssh.last_transition_time.unwrap();
    assert!(
        since >= before,
        "lastTransitionTime {since} is when SSH first answered"
    );
    // Within a boot period or two, not a backoff.
    assert!(
        since - before < chrono::Duration::seconds(2),
        "{since} vs {before}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_loses_ssh_ready_and_a_restart_probes_again() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), world()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("web", "img")).await;
    eventually("Ready", WAIT, async || {
        is_ready(&vm_status(&s, "web").await.unwrap().0)
    })
    .await;
    let (_, st) = vm_status(&s, "web").await.unwrap();
    assert_eq!(cond(&st, "SshReady").unwrap().status, ConditionStatus::True);

    apply(
        &s,
        vm_with(
            "web",
            serde_json::json!({"image": "img", "powerState": "Stopped"}),
        ),
    )
    .await;
    eventually("Stopped, SshReady False", WAIT, async || {
        let (_, st) = vm_status(&s, "web").await.unwrap();
        st.phase == VmPhase::Stopped
            && cond(&st, "SshReady").is_some_and(|c| c.status == ConditionStatus::False)
    })
    .await;
    apply(&s, vm("web", "img")).await;
    eventually("Ready again", WAIT, async || {
        let (obj, st) = vm_status(&s, "web").await.unwrap();
        is_ready(&obj) && cond(&st, "SshReady").is_some_and(|c| c.status == ConditionStatus::True)
    })
    .await;
    agent.stop().await;
}

/// Issue 15 item 2: probes of the user's own. A failing one keeps the VM
/// not Ready, named in `Ready` and `ProbesReady`; once it passes the VM is
/// Ready; a passing one that fails `failureThreshold` times makes it not
/// Ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_readiness_probe_keeps_the_vm_not_ready_and_names_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    let failing = ("web".to_owned(), "tcp 80".to_owned());
    w.configure(|c| {
        c.failing_probes.insert(failing.clone());
    });
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    let probes = serde_json::json!([
        {"exec": {"command": "true"}, "periodSeconds": 1},
        {"tcpSocket": {"port": 80}, "periodSeconds": 1, "failureThreshold": 2},
    ]);
    apply(
        &s,
        vm_with(
            "web",
            serde_json::json!({"image": "img", "readinessProbes": probes}),
        ),
    )
    .await;
    eventually("SSH answers, the tcp probe fails", WAIT, async || {
        let (_, st) = vm_status(&s, "web").await.unwrap();
        cond(&st, "SshReady").is_some_and(|c| c.status == ConditionStatus::True)
            && cond(&st, "ProbesReady").is_some_and(|c| c.reason == "ProbeFailed")
    })
    .await;
    let (obj, st) = vm_status(&s, "web").await.unwrap();
    assert!(!is_ready(&obj));
    let ready = cond(&st, "Ready").unwrap();
    assert_eq!(ready.reason, "ProbeFailed");
    assert!(
        ready.message.contains("probe 1 (tcp 80) fails"),
        "{}",
        ready.message
    );
    assert_eq!(st.phase, VmPhase::Running);

    w.configure(|c| c.failing_probes.clear());
    eventually("Ready once every probe passes", WAIT, async || {
        is_ready(&vm_status(&s, "web").await.unwrap().0)
    })
    .await;
    let (_, st) = vm_status(&s, "web").await.unwrap();
    let probes = cond(&st, "ProbesReady").unwrap();
    assert_eq!(probes.status, ConditionStatus::True);
    assert_eq!(probes.reason, "ProbesSucceeded");

    // Fails again: not Ready after its threshold (2 runs, 1 s apart).
    w.configure(|c| {
        c.failing_probes.insert(failing.clone());
    });
    eventually("not Ready again", WAIT, async || {
        !is_ready(&vm_status(&s, "web").await.unwrap().0)
    })
    .await;
    let (_, st) = vm_status(&s, "web").await.unwrap();
    assert_eq!(cond(&st, "Ready").unwrap().reason, "ProbeFailed");
    agent.stop().await;
}
