//! Table tests of the Snapshot plan: each row an observation and the step
//! it must lead to.

use chrono::TimeZone;

use super::*;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
}

fn info(memory: bool) -> SnapshotInfo {
    SnapshotInfo {
        name: "before".into(),
        memory,
        vm_state_bytes: if memory { 5 << 20 } else { 0 },
        created: Some(now()),
        disks: vec!["root".into()],
    }
}

/// A Snapshot just created for a running VM, finalizer added.
fn fresh() -> Observed {
    Observed {
        name: "before".into(),
        vm: "web".into(),
        generation: 1,
        deleting: false,
        finalizer: true,
        restore_token: None,
        status: SnapshotStatus::default(),
        vm_view: VmView::Instance(InstanceState::Running),
        saved: None,
        vm_blocked: None,
        now: now(),
    }
}

/// A Snapshot saved with memory and recorded as Ready.
fn ready() -> Observed {
    let mut o = fresh();
    o.saved(info(true));
    o
}

/// What a row expects of the planned step.
type Check = Box<dyn Fn(&Step) -> bool>;

#[test]
fn each_observation_leads_to_its_step() {
    let fail = |reason: &str| {
        let reason = reason.to_owned();
        move |s: &Step| matches!(s, Step::Fail { reason: r, .. } if *r == reason)
    };
    let rows: Vec<(&str, Observed, Check)> = vec![
        (
            "a deleted snapshot with its finalizer is torn down",
            Observed {
                deleting: true,
                ..ready()
            },
            Box::new(|s| *s == Step::Teardown),
        ),
        (
            "a deleted snapshot without its finalizer is forgotten",
            Observed {
                deleting: true,
                finalizer: false,
                ..ready()
            },
            Box::new(|s| *s == Step::Forget),
        ),
        (
            "the finalizer comes before any save",
            Observed {
                finalizer: false,
                ..fresh()
            },
            Box::new(|s| *s == Step::AddFinalizer),
        ),
        (
            "a running VM's snapshot is saved",
            fresh(),
            Box::new(|s| *s == Step::Create),
        ),
        (
            "a stopped VM's snapshot is saved (disks only, the driver decides)",
            Observed {
                vm_view: VmView::Instance(InstanceState::Stopped),
                ..fresh()
            },
            Box::new(|s| *s == Step::Create),
        ),
        (
            "a VM without disks yet is waited for",
            Observed {
                vm_view: VmView::NoInstance,
                ..fresh()
            },
            Box::new(|s| *s == Step::WaitForVm),
        ),
        (
            "a VM without disks that will not get any until its user acts fails the snapshot",
            Observed {
                vm_view: VmView::NoInstance,
                vm_blocked: Some("its image img failed: HTTP 404".into()),
                ..fresh()
            },
            Box::new(|s| {
                matches!(s, Step::Fail { reason: "VmNotStarted", message }
                    if message.contains("VM web has no disks to snapshot: its image img failed: HTTP 404"))
            }),
        ),
        (
            "a snapshot of a VM that does not exist fails",
            Observed {
                vm_view: VmView::Missing,
                ..fresh()
            },
            Box::new(fail("VmNotFound")),
        ),
        (
            "a snapshot of a VM being deleted fails",
            Observed {
                vm_view: VmView::Deleting,
                ..fresh()
            },
            Box::new(fail("VmDeleting")),
        ),
        (
            "a save found done whose end was not recorded is adopted, not saved again",
            Observed {
                saved: Some(info(true)),
                status: SnapshotStatus {
                    phase: SnapshotPhase::Creating,
                    ..Default::default()
                },
                ..fresh()
            },
            Box::new(|s| *s == Step::Adopt),
        ),
        (
            "a Ready snapshot without a new restore token is kept",
            ready(),
            Box::new(|s| *s == Step::Keep),
        ),
        (
            "a new restore token restores",
            Observed {
                restore_token: Some("1".into()),
                ..ready()
            },
            Box::new(|s| *s == Step::Restore),
        ),
        (
            "a restore token acted on is not acted on again",
            {
                let mut o = Observed {
                    restore_token: Some("1".into()),
                    ..ready()
                };
                o.restored(Ok(()));
                o
            },
            Box::new(|s| *s == Step::Keep),
        ),
        (
            "a Ready snapshot gone from the VM's disks is lost",
            Observed {
                saved: None,
                ..ready()
            },
            Box::new(fail("SnapshotLost")),
        ),
        (
            "a failed save is not retried",
            {
                let mut o = fresh();
                o.failed("CreateFailed", "disk full".into());
                o
            },
            Box::new(|s| *s == Step::Keep),
        ),
    ];
    for (what, o, ok) in rows {
        let step = plan(&o);
        assert!(ok(&step), "{what}: planned {step:?}");
    }
}

#[test]
fn a_restore_token_given_before_the_save_does_not_restore_it() {
    let mut o = Observed {
        restore_token: Some("early".into()),
        ..fresh()
    };
    o.saved(info(false));
    assert_eq!(plan(&o), Step::Keep);
    assert_eq!(o.status.restored_token.as_deref(), Some("early"));
}

#[test]
fn a_save_records_memory_size_time_and_disks() {
    let o = ready();
    assert_eq!(o.status.phase, SnapshotPhase::Ready);
    assert!(o.status.memory);
    assert_eq!(o.status.size_bytes, Some(5 << 20));
    assert_eq!(o.status.creation_time, Some(now()));
    assert_eq!(o.status.disks, vec!["root".to_owned()]);
    assert!(crate::conditions::is_true(&o.status.conditions, "Ready"));
}

#[test]
fn a_failed_restore_keeps_the_snapshot_ready_and_says_why() {
    let mut o = Observed {
        restore_token: Some("1".into()),
        ..ready()
    };
    o.restored(Err("QMP snapshot-load failed".into()));
    assert_eq!(o.status.phase, SnapshotPhase::Ready);
    assert_eq!(o.status.restored_token.as_deref(), Some("1"));
    assert_eq!(o.status.last_restore_time, None);
    let c = o
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Restored")
        .unwrap();
    assert_eq!(c.reason, "RestoreFailed");
    assert!(c.message.contains("snapshot-load"));
}
