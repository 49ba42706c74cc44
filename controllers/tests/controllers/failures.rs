//! Injected failures: backoff visible in status and notes, then recovery.

use vmctl_api::{ImagePhase, Kind, NoteType, ProvisionPhase, StepPhase, VmPhase};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_back_off_visibly_then_recover() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.fail_starts.insert("flaky".into(), 3);
    });
    let agent = Agent::start(dir.path(), w).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("flaky", "img")).await;

    let mut seen_backoff = false;
    eventually("Ready after the failures are used up", WAIT, async || {
        let (obj, st) = vm_status(&s, "flaky").await.unwrap();
        if st.phase == VmPhase::CrashLoopBackOff {
            assert!(st.start_failures.count >= 1);
            assert!(st.start_failures.retry_after.is_some());
            seen_backoff = true;
        }
        is_ready(&obj)
    })
    .await;
    assert!(seen_backoff, "CrashLoopBackOff was visible in status");
    let (_, st) = vm_status(&s, "flaky").await.unwrap();
    assert_eq!(st.start_failures.count, 0, "reset on success");
    let notes = notes(&s, Kind::VirtualMachine, "flaky").await;
    let backoffs: Vec<_> = notes.iter().filter(|n| n.reason == "BackOff").collect();
    assert_eq!(backoffs.len(), 3);
    assert!(backoffs.iter().all(|n| n.type_ == NoteType::Warning));
    assert_eq!(notes.last().unwrap().reason, "Started");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_image_fetch_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.fail_images.insert("broken".into());
    });
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("broken")).await;
    apply(&s, vm("waiting", "broken")).await;
    // A failure that may pass is retried with backoff, visibly: the Image
    // keeps Downloading with a BackOff reason (never Failed, which is final).
    eventually("image backing off", WAIT, async || {
        get(&s, Kind::Image, "broken").await.is_some_and(|o| {
            o.status.is_some_and(|st| {
                st["phase"] == "Downloading" && st["conditions"][0]["reason"] == "BackOff"
            })
        })
    })
    .await;
    eventually("retried at least twice", WAIT, async || {
        reasons(&s, Kind::Image, "broken")
            .await
            .iter()
            .filter(|r| *r == "BackOff")
            .count()
            >= 2
    })
    .await;
    assert_eq!(
        vm_status(&s, "waiting").await.unwrap().1.phase,
        VmPhase::Pending
    );

    w.configure(|c| c.fail_images.clear());
    eventually("VM Ready after the image recovers", WAIT, async || {
        all_ready(&s, Kind::VirtualMachine).await
    })
    .await;
    let img = get(&s, Kind::Image, "broken").await.unwrap();
    let st: vmctl_api::ImageStatus = serde_json::from_value(img.status.unwrap()).unwrap();
    assert_eq!(st.phase, ImagePhase::Ready);
    eventually("Pulled noted last", WAIT, async || {
        reasons(&s, Kind::Image, "broken")
            .await
            .last()
            .is_some_and(|r| r == "Pulled")
    })
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_fails_the_provision_and_skips_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.fail_steps.insert(("box".into(), 1));
    });
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;
    apply(&s, provision("prov", "box", 3)).await;
    eventually("provision Failed", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Failed)
    })
    .await;
    // The note follows the status write.
    eventually("ProvisionFailed noted", WAIT, async || {
        !reasons(&s, Kind::Provision, "prov").await.is_empty()
    })
    .await;
    let (_, st) = provision_status(&s, "prov").await.unwrap();
    let phases: Vec<_> = st.steps.iter().map(|s| s.phase).collect();
    assert_eq!(
        phases,
        [StepPhase::Succeeded, StepPhase::Failed, StepPhase::Skipped]
    );
    assert_eq!(st.steps[1].exit_code, Some(1));
    assert_eq!(
        reasons(&s, Kind::Provision, "prov").await,
        ["ProvisionFailed"]
    );
    // A failed run is final for this generation: no retry loop.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(w.steps_run().len(), 2);
    agent.stop().await;
}

/// Found as: the cloud e2e test failing in CI with "step 0 could not run:
/// SSH handshake ... failed": cloud-init restarted sshd right after it first
/// answered, the step's connection was retried for 30 s only, and the whole
/// provision was Failed for good although nothing of the step had run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_cannot_connect_while_sshd_restarts_waits_for_ssh_instead_of_failing_the_provision()
 {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.unreachable_steps.insert(("box".into(), 1), 2);
    });
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;
    apply(&s, provision("prov", "box", 3)).await;
    eventually("provision Succeeded", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Succeeded)
    })
    .await;
    // Every step ran exactly once: none again, none skipped.
    let box_ = |i| ("box".to_owned(), i);
    assert_eq!(w.steps_run(), [box_(0), box_(1), box_(2)]);
    let (_, st) = provision_status(&s, "prov").await.unwrap();
    assert!(st.steps.iter().all(|s| s.phase == StepPhase::Succeeded));
    eventually("both waits noted, then success", WAIT, async || {
        reasons(&s, Kind::Provision, "prov").await
            == ["WaitingForSsh", "WaitingForSsh", "ProvisionSucceeded"]
    })
    .await;
    agent.stop().await;
}

/// The other side of the above: a step that never connects fails once the
/// VM's SSH timeout has passed, with the reason, and the rest is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_never_connects_fails_after_the_ssh_timeout_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.latency = std::time::Duration::from_millis(20);
        c.unreachable_steps.insert(("box".into(), 0), u32::MAX);
    });
    let config = vmctl_controllers::RuntimeConfig {
        ssh_timeout: std::time::Duration::from_millis(400),
        ..config()
    };
    let agent = Agent::start_with(dir.path(), w.clone(), config).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("box", "img")).await;
    apply(&s, provision("prov", "box", 2)).await;
    eventually("provision Failed", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Failed)
    })
    .await;
    let (_, st) = provision_status(&s, "prov").await.unwrap();
    let phases: Vec<_> = st.steps.iter().map(|s| s.phase).collect();
    assert_eq!(phases, [StepPhase::Failed, StepPhase::Skipped]);
    let msg = st.steps[0].message.clone().unwrap_or_default();
    assert!(msg.contains("no SSH connection"), "{msg}");
    assert!(w.steps_run().is_empty(), "nothing ran");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_never_answers_ssh_fails_its_provision_with_the_reason_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.ssh_unreachable.insert("mute".into());
    });
    let agent = Agent::start(dir.path(), w.clone()).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("mute", "img")).await;
    apply(&s, provision("prov", "mute", 1)).await;
    eventually("two SshTimeout notes", WAIT, async || {
        reasons(&s, Kind::Provision, "prov")
            .await
            .iter()
            .filter(|r| *r == "SshTimeout")
            .count()
            >= 2
    })
    .await;
    let (obj, st) = provision_status(&s, "prov").await.unwrap();
    assert_eq!(st.phase, ProvisionPhase::Failed);
    assert_eq!(st.observed_generation, obj.metadata.generation);
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "SshTimeout");
    assert!(
        ready.message.contains("does not answer SSH"),
        "{}",
        ready.message
    );
    w.configure(|c| c.ssh_unreachable.clear());
    eventually("provision Succeeded", WAIT, async || {
        provision_status(&s, "prov")
            .await
            .is_some_and(|(_, st)| st.phase == ProvisionPhase::Succeeded)
    })
    .await;
    agent.stop().await;
}

/// A Provision whose VM does not answer SSH was Failed for milliseconds:
/// any change of its VM (a booting VM's status changes often) woke it,
/// during the failing run or its backoff, and it ran again at once. Every
/// retry must now come after the backoff (here 400 ms doubling, jittered
/// down to 75 %) when only related objects changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_after_an_ssh_timeout_is_retried_after_its_backoff_not_at_once() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let w = world();
    w.configure(|c| {
        c.ssh_unreachable.insert("mute".into());
    });
    let base = Duration::from_millis(400);
    let config = vmctl_controllers::RuntimeConfig {
        backoff: vmctl_controllers::BackoffPolicy {
            base,
            max: Duration::from_secs(5),
        },
        ..config()
    };
    let agent = Agent::start_with(dir.path(), w.clone(), config).await;
    let s = agent.store.clone();
    apply(&s, image("img")).await;
    apply(&s, vm("mute", "img")).await;
    apply(&s, provision("prov", "mute", 1)).await;
    eventually("two SshTimeout notes", WAIT, async || {
        reasons(&s, Kind::Provision, "prov")
            .await
            .iter()
            .filter(|r| *r == "SshTimeout")
            .count()
            >= 2
    })
    .await;
    // The VM keeps changing meanwhile (as a booting VM's status does):
    // each change wakes its Provision, which must still wait its backoff.
    for i in 0..15 {
        let mut changed = vm("mute", "img");
        changed
            .metadata
            .labels
            .insert("touch".into(), i.to_string());
        apply(&s, changed).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
    let r = vmctl_api::ObjectRef::new(Kind::Provision, "prov");
    let phases: Vec<(chrono::DateTime<chrono::Utc>, String)> = s
        .history(&r)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|ev| match ev.change {
            vmctl_store::Change::StatusUpdated { status } => {
                Some((ev.time, status["phase"].as_str()?.to_owned()))
            }
            _ => None,
        })
        .collect();
    let mut failures = 0;
    for pair in phases.windows(2) {
        let ((failed_at, was), (retried_at, now)) = (&pair[0], &pair[1]);
        if was == "Failed" && now == "Running" {
            failures += 1;
            let waited = (*retried_at - *failed_at).to_std().unwrap_or_default();
            let least = base.mul_f64(0.75 * f64::from(1u32 << (failures - 1).min(3)));
            assert!(
                waited >= least.min(Duration::from_secs(5).mul_f64(0.75)),
                "retry {failures} came {waited:?} after Failed (backoff at least {least:?}): {phases:#?}"
            );
        }
    }
    assert!(failures >= 1, "{phases:#?}");
}
