//! The VM plan: a table of named cases, and properties over arbitrary
//! observations. [`reconcile`] models the act part with a hypervisor
//! whose every call succeeds, using the same status methods as the
//! reconciler.

use proptest::prelude::*;
use vmctl_api::{ConditionStatus, DiskRuntime, ROOT_DISK, VmRuntime};

use super::*;
use crate::vm::MAX_STEPS;

fn now() -> DateTime<Utc> {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

fn spec(image: &str) -> VirtualMachineSpec {
    serde_json::from_value(serde_json::json!({ "image": image })).unwrap()
}

fn local() -> LocalImage {
    LocalImage {
        path: "/images/a.qcow2".into(),
        format: "qcow2".into(),
        size_bytes: 1 << 20,
        virtual_size_bytes: None,
    }
}

fn not_ready() -> ImageNotReady {
    ImageNotReady {
        reason: "ImageNotReady",
        message: "the image is Downloading".into(),
    }
}

/// The size of the root disk a prepared instance has (the image's).
const IMAGE_SIZE: u64 = 8 << 30;

fn instance(state: InstanceState) -> InstanceStatus {
    InstanceStatus {
        state,
        runtime: VmRuntime {
            backend: "fake".into(),
            instance_id: Some("i-1".into()),
            disks: vec![DiskRuntime {
                name: ROOT_DISK.into(),
                size_bytes: IMAGE_SIZE,
                path: None,
            }],
            ..Default::default()
        },
    }
}

/// `o`'s instance (or a new one) in `state`, its disks prepared as a
/// driver does: grown to the spec, never shrunk.
fn prepared(o: &Observed, state: InstanceState) -> InstanceStatus {
    let mut inst = instance(state);
    if let Some(old) = &o.instance {
        inst.runtime.disks = old.runtime.disks.clone();
    }
    let want = o.spec.disk_gib.map_or(0, |g| g << 30);
    let spec = &o.spec.disks;
    inst.runtime
        .disks
        .retain(|d| d.name == ROOT_DISK || spec.iter().any(|s| s.name == d.name));
    for d in &mut inst.runtime.disks {
        if d.name == ROOT_DISK {
            d.size_bytes = d.size_bytes.max(want);
        }
    }
    for s in spec {
        match inst.runtime.disks.iter_mut().find(|d| d.name == s.name) {
            Some(d) => d.size_bytes = d.size_bytes.max(s.size_gib << 30),
            None => inst.runtime.disks.push(DiskRuntime {
                name: s.name.clone(),
                size_bytes: s.size_gib << 30,
                path: None,
            }),
        }
    }
    inst
}

/// A VM just applied: no status, no finalizer, no instance, image Ready.
fn fresh() -> Observed {
    Observed {
        name: "web".into(),
        generation: 1,
        deleting: false,
        finalizer: false,
        spec: spec("a"),
        status: VirtualMachineStatus::default(),
        image: Ok(local()),
        instance: None,
        now: now(),
        live_disk_resize: true,
        readiness: None,
    }
}

/// A VM running at its spec, as a reconcile of [`fresh`] leaves it.
fn settled() -> Observed {
    let mut o = fresh();
    let steps = reconcile(&mut o);
    assert_eq!(
        steps.last(),
        Some(&Step::Report {
            phase: VmPhase::Running
        })
    );
    o
}

/// Performs `step` on `o` as the reconciler does when every driver call
/// succeeds; whether the reconcile ends with it.
fn model(o: &mut Observed, step: &Step) -> bool {
    match step {
        Step::Forget => {}
        Step::Teardown => {
            o.terminating();
            o.instance = None;
            o.finalizer = false;
        }
        Step::SetCondition { condition, .. } => {
            o.set_condition(condition.clone());
        }
        Step::WaitForImage => o.waiting_for_image(),
        Step::AddFinalizer => o.finalizer = true,
        Step::Recreate { .. } => o.recreating(),
        Step::Crashed => o.start_failed(Duration::from_secs(10), "crashed".into()),
        Step::BackOff { .. } => o.backing_off(),
        Step::Start { prepare } => {
            if *prepare {
                o.prepared(prepared(o, InstanceState::Stopped));
            }
            let mut running = instance(InstanceState::Running);
            if let Some(i) = &o.instance {
                running.runtime.disks = i.runtime.disks.clone();
            }
            o.started(running);
        }
        Step::ResizeDisk { disk, to, .. } => o.disk_resized(disk, *to),
        Step::Suspend => o.now_in(InstanceState::Suspended),
        Step::Resume => o.now_in(InstanceState::Running),
        Step::Stop => o.now_in(InstanceState::Stopped),
        Step::Restart => o.restarting(),
        Step::Report { phase } => o.report(*phase),
    }
    step.ends_reconcile()
}

/// One reconcile of `o` as [`crate::vm::VmReconciler`] runs it: plan, act,
/// until a step ends it. The steps taken; panics past [`MAX_STEPS`].
fn reconcile(o: &mut Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    for _ in 0..MAX_STEPS {
        let step = plan(o);
        steps.push(step.clone());
        if model(o, &step) {
            return steps;
        }
    }
    panic!("no end after {MAX_STEPS} steps: {steps:#?}");
}

fn cond(o: &Observed, type_: &str) -> Option<Condition> {
    o.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

fn is_set_condition(step: &Step, type_: &str, status: ConditionStatus) -> bool {
    matches!(step, Step::SetCondition { condition, .. }
        if condition.type_ == type_ && condition.status == status)
}

/// A case of [`plan_table`]: its name, the observation, what the step must be.
type Row = (&'static str, Observed, Box<dyn Fn(&Step) -> bool>);

#[test]
fn plan_table() {
    let is = |want: Step| move |s: &Step| *s == want;
    let rows: Vec<Row> = vec![
        (
            "a running VM at its spec is only reported",
            settled(),
            Box::new(is(Step::Report {
                phase: VmPhase::Running,
            })),
        ),
        (
            "a deleted VM with the finalizer is torn down",
            Observed {
                deleting: true,
                ..settled()
            },
            Box::new(is(Step::Teardown)),
        ),
        (
            "a deleted VM without the finalizer is forgotten",
            Observed {
                deleting: true,
                finalizer: false,
                ..settled()
            },
            Box::new(is(Step::Forget)),
        ),
        (
            "a new VM first reports whether its image is Ready",
            Observed {
                image: Err(not_ready()),
                ..fresh()
            },
            Box::new(|s: &Step| is_set_condition(s, "ImageReady", ConditionStatus::False)),
        ),
        (
            "a new VM whose image is not Ready waits for it",
            {
                let mut o = Observed {
                    image: Err(not_ready()),
                    ..fresh()
                };
                let c = condition(
                    "ImageReady",
                    false,
                    "ImageNotReady",
                    "the image is Downloading",
                    1,
                );
                o.set_condition(c);
                o
            },
            Box::new(is(Step::WaitForImage)),
        ),
        (
            "a new VM asked to stay stopped does not wait for its image",
            {
                let mut o = Observed {
                    image: Err(not_ready()),
                    finalizer: true,
                    ..fresh()
                };
                o.spec.power_state = PowerState::Stopped;
                o.set_condition(condition(
                    "ImageReady",
                    false,
                    "ImageNotReady",
                    "the image is Downloading",
                    1,
                ));
                o
            },
            Box::new(is(Step::Report {
                phase: VmPhase::Stopped,
            })),
        ),
        (
            "the finalizer goes on before the first start",
            {
                let mut o = fresh();
                o.set_condition(condition("ImageReady", true, "ImageReady", "", 1));
                o
            },
            Box::new(is(Step::AddFinalizer)),
        ),
        (
            "a new VM with the finalizer is prepared and started",
            {
                let mut o = Observed {
                    finalizer: true,
                    ..fresh()
                };
                o.set_condition(condition("ImageReady", true, "ImageReady", "", 1));
                o
            },
            Box::new(is(Step::Start { prepare: true })),
        ),
        (
            "a stopped instance whose image went away starts without prepare",
            {
                let mut o = settled();
                o.spec.power_state = PowerState::Running;
                o.instance = Some(instance(InstanceState::Stopped));
                o.status.phase = VmPhase::Stopped;
                o.image = Err(not_ready());
                o.set_condition(condition(
                    "ImageReady",
                    false,
                    "ImageNotReady",
                    "the image is Downloading",
                    1,
                ));
                o
            },
            Box::new(is(Step::Start { prepare: false })),
        ),
        (
            "a VM last seen Running whose instance is gone crashed",
            Observed {
                instance: None,
                ..settled()
            },
            Box::new(is(Step::Crashed)),
        ),
        (
            "a VM whose instance stopped by itself crashed",
            Observed {
                instance: Some(instance(InstanceState::Stopped)),
                ..settled()
            },
            Box::new(is(Step::Crashed)),
        ),
        (
            "a crashed VM backs off until retryAfter",
            {
                let mut o = Observed {
                    instance: None,
                    ..settled()
                };
                o.start_failed(Duration::from_secs(10), "crashed".into());
                o
            },
            Box::new(is(Step::BackOff {
                until: now() + chrono::Duration::seconds(10),
            })),
        ),
        (
            "a crashed VM starts again once retryAfter passed",
            {
                let mut o = Observed {
                    instance: None,
                    ..settled()
                };
                o.start_failed(Duration::from_secs(10), "crashed".into());
                o.now += chrono::Duration::seconds(11);
                o
            },
            Box::new(|s: &Step| matches!(s, Step::Start { .. })),
        ),
        (
            "a running VM asked to suspend is suspended",
            {
                let mut o = settled();
                o.spec.power_state = PowerState::Suspended;
                o
            },
            Box::new(is(Step::Suspend)),
        ),
        (
            "a suspended VM asked to run is resumed",
            Observed {
                instance: Some(instance(InstanceState::Suspended)),
                ..settled()
            },
            Box::new(is(Step::Resume)),
        ),
        (
            "a running VM asked to stop is stopped",
            {
                let mut o = settled();
                o.spec.power_state = PowerState::Stopped;
                o
            },
            Box::new(is(Step::Stop)),
        ),
        (
            "a stopped VM asked to stop is not started",
            {
                let mut o = settled();
                o.spec.power_state = PowerState::Stopped;
                o.instance = Some(instance(InstanceState::Stopped));
                o
            },
            Box::new(is(Step::Report {
                phase: VmPhase::Stopped,
            })),
        ),
        (
            "a new image with policy Recreate recreates the disk",
            {
                let mut o = settled();
                o.spec.image = "b".into();
                o.spec.update_policy = UpdatePolicy::Recreate;
                o
            },
            Box::new(is(Step::Recreate {
                disk_image: "a".into(),
            })),
        ),
        (
            "a new image with policy Restart only warns that a recreate is required",
            {
                let mut o = settled();
                o.spec.image = "b".into();
                o.spec.update_policy = UpdatePolicy::Restart;
                o
            },
            Box::new(|s: &Step| {
                is_set_condition(s, "RecreateRequired", ConditionStatus::True)
                    && matches!(s, Step::SetCondition { warning: Some(w), .. } if w.contains("image a"))
            }),
        ),
        (
            "a restart-only change with policy Restart restarts",
            {
                let mut o = settled();
                o.spec.vcpus = 2;
                o.spec.update_policy = UpdatePolicy::Restart;
                o
            },
            Box::new(is(Step::Restart)),
        ),
        (
            "a restart-only change with policy RestartRequired warns",
            {
                let mut o = settled();
                o.spec.memory_mib = 2048;
                o
            },
            Box::new(|s: &Step| {
                is_set_condition(s, "RestartRequired", ConditionStatus::True)
                    && matches!(
                        s,
                        Step::SetCondition {
                            warning: Some(_),
                            ..
                        }
                    )
            }),
        ),
        (
            "an instance started before startedSpec existed is not restarted",
            {
                let mut o = settled();
                o.status.started_spec = None;
                o.spec.update_policy = UpdatePolicy::Restart;
                o
            },
            Box::new(is(Step::Report {
                phase: VmPhase::Running,
            })),
        ),
        (
            "a new generation moves the conditions to it first",
            Observed {
                generation: 2,
                ..settled()
            },
            Box::new(|s: &Step| {
                matches!(s, Step::SetCondition { condition, .. }
                    if condition.type_ == "ImageReady" && condition.observed_generation == 2)
            }),
        ),
    ];
    let mut failed = Vec::new();
    for (name, o, check) in &rows {
        let step = plan(o);
        if !check(&step) {
            failed.push(format!("{name}: got {step:?}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn a_new_vm_is_started_in_one_reconcile_and_the_next_only_reports() {
    let mut o = fresh();
    let steps = reconcile(&mut o);
    let kinds: Vec<String> = steps
        .iter()
        .map(|s| match s {
            Step::SetCondition { condition, .. } => format!("Set {}", condition.type_),
            s => format!("{s:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Set ImageReady",
            "AddFinalizer",
            "Start { prepare: true }",
            "Set RecreateRequired",
            "Set RestartRequired",
            "Report { phase: Running }",
        ]
    );
    assert_eq!(o.status.phase, VmPhase::Running);
    assert_eq!(cond(&o, "Ready").unwrap().status, ConditionStatus::True);
    assert_eq!(o.status.disk_image.as_deref(), Some("a"));
    assert_eq!(o.status.started_spec, Some(restart_digest(&o.spec)));
    let before = o.status.clone();
    assert_eq!(
        reconcile(&mut o),
        [Step::Report {
            phase: VmPhase::Running
        }]
    );
    assert_eq!(o.status, before);
}

#[test]
fn a_failed_start_backs_off_with_a_growing_count() {
    let mut o = Observed {
        instance: None,
        ..settled()
    };
    assert_eq!(reconcile(&mut o), [Step::Crashed]);
    assert_eq!(o.status.phase, VmPhase::CrashLoopBackOff);
    assert_eq!(o.status.start_failures.count, 1);
    let ready = cond(&o, "Ready").unwrap();
    assert_eq!(
        (ready.status, ready.reason.as_str()),
        (ConditionStatus::False, "StartFailed")
    );
    // Within the delay: only back off; after it: start again.
    assert!(matches!(reconcile(&mut o)[..], [Step::BackOff { .. }]));
    o.now += chrono::Duration::seconds(11);
    let steps = reconcile(&mut o);
    assert_eq!(steps[0], Step::Start { prepare: true });
    assert_eq!(o.status.start_failures.count, 0, "a start clears the count");
    assert_eq!(o.status.phase, VmPhase::Running);
}

// ----------------------------------------------------------------- disks ----

/// Issue 16: `disk 2` re-applied as `disk 1` made every prepare fail, so
/// the VM, once stopped, never started again, and the refusal was only a
/// log line. Now the refusal is a condition with a Warning note, the VM
/// keeps running, and it stops and starts again with its disk as it was.
#[test]
fn shrinking_the_disk_no_longer_stops_the_vm_from_starting_again() {
    let mut o = settled();
    o.spec.disk_gib = Some(4);
    o.generation += 1;
    let steps = reconcile(&mut o);
    assert!(
        steps.iter().any(
            |s| matches!(s, Step::SetCondition { condition, warning: Some(w) }
            if condition.type_ == disks::SHRINK_REFUSED
                && condition.status == ConditionStatus::True
                && w.contains("disks cannot shrink"))
        ),
        "{steps:?}"
    );
    assert_eq!(
        steps.last(),
        Some(&Step::Report {
            phase: VmPhase::Running
        })
    );
    assert!(
        !steps
            .iter()
            .any(|s| matches!(s, Step::Stop | Step::Restart | Step::ResizeDisk { .. }))
    );
    let refused = cond(&o, disks::SHRINK_REFUSED).unwrap();
    assert!(
        refused.message.contains("root: 8 GiB → 4 GiB"),
        "{}",
        refused.message
    );

    // Stopped and started again: it starts, the disk keeps its 8 GiB.
    o.spec.power_state = PowerState::Stopped;
    assert_eq!(
        reconcile(&mut o).last(),
        Some(&Step::Report {
            phase: VmPhase::Stopped
        })
    );
    o.spec.power_state = PowerState::Running;
    let steps = reconcile(&mut o);
    assert_eq!(steps[0], Step::Start { prepare: true });
    assert_eq!(o.status.phase, VmPhase::Running);
    assert_eq!(
        o.instance.as_ref().unwrap().runtime.disks[0].size_bytes,
        IMAGE_SIZE
    );

    // Asking the size it has again clears the condition.
    o.spec.disk_gib = Some(8);
    o.generation += 1;
    reconcile(&mut o);
    assert_eq!(
        cond(&o, disks::SHRINK_REFUSED).unwrap().status,
        ConditionStatus::False
    );
}

/// Issue 16: `disk 3` on a running VM was neither applied live nor
/// reported as needing a restart (the restart digest left it out).
#[test]
fn growing_a_running_vms_disk_is_applied_live_not_ignored() {
    let mut o = settled();
    o.spec.disk_gib = Some(10);
    o.generation += 1;
    let steps: Vec<Step> = reconcile(&mut o)
        .into_iter()
        .filter(|s| !matches!(s, Step::SetCondition { .. }))
        .collect();
    assert_eq!(
        steps,
        [
            Step::ResizeDisk {
                disk: ROOT_DISK.into(),
                from: IMAGE_SIZE,
                to: 10 << 30
            },
            Step::Report {
                phase: VmPhase::Running
            }
        ]
    );
    assert_eq!(
        o.status.runtime.as_ref().unwrap().disks[0].size_bytes,
        10 << 30
    );
    assert!(cond(&o, disks::RESIZE_PENDING).is_none());
}

#[test]
fn a_disk_growth_the_backend_cannot_apply_live_requires_a_restart() {
    let mut o = Observed {
        live_disk_resize: false,
        ..settled()
    };
    o.spec.disk_gib = Some(10);
    o.generation += 1;
    reconcile(&mut o);
    let pending = cond(&o, disks::RESIZE_PENDING).unwrap();
    assert_eq!(pending.status, ConditionStatus::True);
    assert!(
        pending.message.contains("root: 8 GiB → 10 GiB"),
        "{}",
        pending.message
    );
    let restart = cond(&o, "RestartRequired").unwrap();
    assert_eq!(restart.status, ConditionStatus::True);
    assert!(restart.message.contains("disk"), "{}", restart.message);

    // With updatePolicy Restart it restarts, and the start grows it.
    o.spec.update_policy = UpdatePolicy::Restart;
    o.generation += 1;
    assert_eq!(reconcile(&mut o).last(), Some(&Step::Restart));
    reconcile(&mut o);
    assert_eq!(o.status.phase, VmPhase::Running);
    assert_eq!(
        o.instance.as_ref().unwrap().runtime.disks[0].size_bytes,
        10 << 30
    );
    assert_eq!(
        cond(&o, disks::RESIZE_PENDING).unwrap().status,
        ConditionStatus::False
    );
    assert_eq!(
        cond(&o, "RestartRequired").unwrap().status,
        ConditionStatus::False
    );
}

#[test]
fn a_failed_live_resize_is_not_retried_and_waits_for_the_next_start() {
    let mut o = settled();
    o.spec.disk_gib = Some(10);
    o.generation += 1;
    let steps = reconcile(&mut o.clone());
    assert!(steps.iter().any(|s| matches!(s, Step::ResizeDisk { .. })));
    o.disk_resize_failed(ROOT_DISK, "QMP block_resize failed");
    let steps = reconcile(&mut o);
    assert!(
        !steps.iter().any(|s| matches!(s, Step::ResizeDisk { .. })),
        "{steps:?}"
    );
    let pending = cond(&o, disks::RESIZE_PENDING).unwrap();
    assert_eq!(pending.reason, disks::LIVE_RESIZE_FAILED);
    assert!(pending.message.contains("block_resize"));
    assert_eq!(
        cond(&o, "RestartRequired").unwrap().status,
        ConditionStatus::True
    );
}

#[test]
fn a_stopped_vms_disk_growth_is_reported_as_applying_at_the_next_start() {
    let mut o = settled();
    o.spec.power_state = PowerState::Stopped;
    reconcile(&mut o);
    o.spec.disk_gib = Some(10);
    o.generation += 1;
    reconcile(&mut o);
    let pending = cond(&o, disks::RESIZE_PENDING).unwrap();
    assert_eq!(
        (pending.status, pending.reason.as_str()),
        (ConditionStatus::True, "AppliesAtStart")
    );
    o.spec.power_state = PowerState::Running;
    reconcile(&mut o);
    assert_eq!(
        o.instance.as_ref().unwrap().runtime.disks[0].size_bytes,
        10 << 30
    );
    assert_eq!(
        cond(&o, disks::RESIZE_PENDING).unwrap().status,
        ConditionStatus::False
    );
}

#[test]
fn an_extra_disk_added_to_a_running_vm_requires_a_restart_and_is_attached_at_start() {
    let mut o = settled();
    o.spec.disks = vec![vmctl_api::Disk {
        name: "data".into(),
        size_gib: 2,
    }];
    o.generation += 1;
    reconcile(&mut o);
    let restart = cond(&o, "RestartRequired").unwrap();
    assert_eq!(restart.status, ConditionStatus::True);
    assert!(
        restart
            .message
            .contains("disk data is attached at the next start"),
        "{}",
        restart.message
    );
    o.spec.update_policy = UpdatePolicy::Restart;
    o.generation += 1;
    assert_eq!(reconcile(&mut o).last(), Some(&Step::Restart));
    reconcile(&mut o);
    let disks: Vec<_> = o
        .instance
        .as_ref()
        .unwrap()
        .runtime
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.size_bytes))
        .collect();
    assert_eq!(disks, [(ROOT_DISK, IMAGE_SIZE), ("data", 2 << 30)]);
    assert_eq!(
        cond(&o, "RestartRequired").unwrap().status,
        ConditionStatus::False
    );

    // Grown live like the root disk; removed: detached at the next start.
    o.spec.disks[0].size_gib = 3;
    o.generation += 1;
    let steps = reconcile(&mut o);
    assert!(
        steps.contains(&Step::ResizeDisk {
            disk: "data".into(),
            from: 2 << 30,
            to: 3 << 30
        }),
        "{steps:?}"
    );
    o.spec.disks.clear();
    o.spec.update_policy = UpdatePolicy::RestartRequired;
    o.generation += 1;
    reconcile(&mut o);
    assert!(
        cond(&o, "RestartRequired")
            .unwrap()
            .message
            .contains("disk data is detached")
    );
}

// ------------------------------------------------------------ properties ----

fn arb_condition() -> impl Strategy<Value = Condition> {
    (
        prop::sample::select(vec![
            "ImageReady",
            "RecreateRequired",
            "RestartRequired",
            "Ready",
            disks::SHRINK_REFUSED,
            disks::RESIZE_PENDING,
        ]),
        any::<bool>(),
        prop::sample::select(vec![
            "UpToDate",
            "ImageReady",
            "Running",
            "Other",
            disks::LIVE_RESIZE_FAILED,
        ]),
        1u64..3,
    )
        .prop_map(|(t, ok, reason, g)| condition(t, ok, reason, "", g))
}

fn arb_phase() -> impl Strategy<Value = VmPhase> {
    prop::sample::select(vec![
        VmPhase::Pending,
        VmPhase::Starting,
        VmPhase::Running,
        VmPhase::Suspended,
        VmPhase::Stopping,
        VmPhase::Stopped,
        VmPhase::CrashLoopBackOff,
        VmPhase::Failed,
        VmPhase::Terminating,
    ])
}

fn arb_state() -> impl Strategy<Value = Option<InstanceState>> {
    prop::option::of(prop::sample::select(vec![
        InstanceState::Stopped,
        InstanceState::Running,
        InstanceState::Suspended,
    ]))
}

prop_compose! {
    fn arb_spec()(
        image in prop::sample::select(vec!["a", "b"]),
        vcpus in 1u32..3,
        power in prop::sample::select(vec![PowerState::Running, PowerState::Stopped, PowerState::Suspended]),
        policy in prop::sample::select(vec![UpdatePolicy::RestartRequired, UpdatePolicy::Restart, UpdatePolicy::Recreate]),
        disk_gib in prop::option::of(6u64..10),
    ) -> VirtualMachineSpec {
        let mut s = spec(image);
        s.disk_gib = disk_gib;
        s.vcpus = vcpus;
        s.power_state = power;
        s.update_policy = policy;
        s
    }
}

prop_compose! {
    fn arb_status()(
        phase in arb_phase(),
        conditions in prop::collection::vec(arb_condition(), 0..5),
        started_vcpus in prop::option::of(1u32..3),
        disk_image in prop::option::of(prop::sample::select(vec!["a", "b"])),
        failures in 0u32..3,
        retry_in in prop::option::of(-30i64..30),
    ) -> VirtualMachineStatus {
        let mut status = VirtualMachineStatus { phase, ..Default::default() };
        for c in conditions {
            set_condition(&mut status.conditions, c, now());
        }
        status.started_spec = started_vcpus.map(|v| {
            let mut s = spec("a");
            s.vcpus = v;
            restart_digest(&s)
        });
        status.disk_image = disk_image.map(str::to_owned);
        status.start_failures.count = failures;
        status.start_failures.retry_after = retry_in.map(|s| now() + chrono::Duration::seconds(s));
        status
    }
}

prop_compose! {
    fn arb_observed()(
        deleting in any::<bool>(),
        finalizer in any::<bool>(),
        generation in 1u64..3,
        spec in arb_spec(),
        status in arb_status(),
        image_ready in any::<bool>(),
        state in arb_state(),
        root_gib in 6u64..10,
        live_disk_resize in any::<bool>(),
        ssh in prop::option::of(any::<bool>()),
    ) -> Observed {
        Observed {
            name: "web".into(),
            generation,
            deleting,
            finalizer,
            spec,
            status,
            image: if image_ready { Ok(local()) } else { Err(not_ready()) },
            instance: state.map(|st| {
                let mut i = instance(st);
                i.runtime.disks[0].size_bytes = root_gib << 30;
                i
            }),
            now: now(),
            live_disk_resize,
            readiness: ssh.map(|ok| crate::probe::Readiness {
                ssh: crate::probe::Check {
                    ok,
                    since: ok.then(now),
                    reason: if ok { "Connected" } else { "WaitingForSsh" },
                    message: String::new(),
                },
            }),
        }
    }
}

proptest! {
    /// `up` returned Ready while the guest still booted: whatever else
    /// was observed, a VM whose SSH probe has not passed is not Ready.
    #[test]
    fn a_vm_is_never_ready_while_its_ssh_probe_fails(mut o in arb_observed(), phase in prop::sample::select(vec![VmPhase::Running, VmPhase::Suspended, VmPhase::Stopped])) {
        let probed_down = o.readiness.as_ref().is_some_and(|r| !r.ssh.ok);
        o.report(phase);
        let ready = crate::conditions::is_true(&o.status.conditions, "Ready");
        if probed_down {
            prop_assert!(!ready);
            prop_assert!(!crate::conditions::is_true(&o.status.conditions, "SshReady"));
        }
        if phase != VmPhase::Running {
            prop_assert!(!crate::conditions::is_true(&o.status.conditions, "SshReady"));
        }
    }

    #[test]
    fn a_vm_being_deleted_is_only_torn_down(o in arb_observed()) {
        let o = Observed { deleting: true, ..o };
        let want = if o.finalizer { Step::Teardown } else { Step::Forget };
        prop_assert_eq!(plan(&o), want);
    }

    #[test]
    fn nothing_is_created_or_destroyed_before_the_finalizer_step(o in arb_observed()) {
        let o = Observed { deleting: false, finalizer: false, ..o };
        let step = plan(&o);
        prop_assert!(
            matches!(step, Step::SetCondition { .. } | Step::WaitForImage | Step::AddFinalizer),
            "{:?}", step
        );
    }

    #[test]
    fn plan_is_deterministic(o in arb_observed()) {
        let (mut a, mut b) = (o.clone(), o);
        prop_assert_eq!(plan(&a), plan(&b));
        prop_assert_eq!(reconcile(&mut a), reconcile(&mut b));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn a_start_is_only_planned_when_the_vm_should_run_and_may(o in arb_observed()) {
        if let Step::Start { prepare } = plan(&o) {
            prop_assert!(!o.deleting && o.finalizer);
            prop_assert_ne!(o.spec.power_state, PowerState::Stopped);
            prop_assert!(o.status.start_failures.retry_after.is_none_or(|t| t <= o.now));
            prop_assert!(prepare == o.image.is_ok());
            prop_assert!(prepare || o.instance.is_some(), "no instance and nothing to prepare it from");
        }
    }

    #[test]
    fn a_disk_is_only_destroyed_on_deletion_or_policy_recreate(o in arb_observed()) {
        match plan(&o) {
            Step::Teardown => prop_assert!(o.deleting && o.finalizer),
            Step::Recreate { .. } => {
                prop_assert_eq!(o.spec.update_policy, UpdatePolicy::Recreate);
                prop_assert_ne!(o.status.disk_image.as_deref(), Some(o.spec.image.as_str()));
            }
            _ => {}
        }
    }

    #[test]
    fn a_live_resize_only_grows_a_disk_of_an_instance_that_is_up(o in arb_observed()) {
        if let Step::ResizeDisk { disk, from, to } = plan(&o) {
            prop_assert!(to > from);
            prop_assert!(o.live_disk_resize);
            let inst = o.instance.as_ref().unwrap();
            prop_assert!(matches!(inst.state, InstanceState::Running | InstanceState::Suspended));
            prop_assert!(inst.runtime.disks.iter().any(|d| d.name == disk && d.size_bytes == from));
        }
    }

    #[test]
    fn a_shrink_never_stops_restarts_or_fails_a_vm(o in arb_observed()) {
        // Only the disk asked smaller: the same VM with the size it has
        // takes the same power steps.
        let mut same = o.clone();
        same.spec.disk_gib = None;
        let mut o = o;
        let shrinks = !disks::size_changes(&o).1.is_empty();
        if shrinks {
            let steps: Vec<Step> = reconcile(&mut o)
                .into_iter()
                .filter(|s| !matches!(s, Step::SetCondition { .. }))
                .collect();
            let want: Vec<Step> = reconcile(&mut same)
                .into_iter()
                .filter(|s| !matches!(s, Step::SetCondition { .. }))
                .collect();
            let power = |v: &[Step]| v.iter().filter(|s| matches!(s, Step::Stop | Step::Restart | Step::Recreate { .. } | Step::Crashed)).count();
            prop_assert!(power(&steps) <= power(&want), "{:?} vs {:?}", steps, want);
        }
    }

    #[test]
    fn every_reconcile_ends_within_max_steps(o in arb_observed()) {
        // `reconcile` panics past MAX_STEPS.
        let mut o = o;
        let steps = reconcile(&mut o);
        prop_assert!(steps.last().unwrap().ends_reconcile());
    }

    #[test]
    fn a_vm_reported_at_its_spec_gives_no_step_next_time(o in arb_observed()) {
        let mut o = o;
        let first = reconcile(&mut o);
        if let Some(Step::Report { phase }) = first.last().cloned() {
            let before = o.status.clone();
            prop_assert_eq!(reconcile(&mut o), vec![Step::Report { phase }]);
            prop_assert_eq!(&o.status, &before, "a second report changes nothing");
            // Running is Ready unless the SSH probe has not passed.
            let ssh_down = o.readiness.as_ref().is_some_and(|r| !r.ssh.ok);
            if phase == VmPhase::Running {
                let ready = cond(&o, "Ready").is_some_and(|c| c.status == ConditionStatus::True);
                prop_assert_eq!(ready, !ssh_down);
            }
        }
    }
}
