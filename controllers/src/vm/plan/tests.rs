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

/// The VM's work dir under the agent of [`here`].
const WORK_DIR: &str = "/data/vms/web";

/// The agent that plans: node `here`, data dir `/data`.
fn here() -> Here {
    Here {
        node: crate::NodeIdentity {
            name: "here".into(),
            data_dir: Some("/data".into()),
        },
        work_dir: Some(WORK_DIR.into()),
    }
}

/// The size of the root disk a prepared instance has (the image's).
const IMAGE_SIZE: u64 = 8 << 30;

fn instance(state: InstanceState) -> InstanceStatus {
    InstanceStatus {
        state,
        runtime: VmRuntime {
            backend: "fake".into(),
            work_dir: Some(WORK_DIR.into()),
            instance_id: Some("i-1".into()),
            disks: vec![DiskRuntime {
                name: ROOT_DISK.into(),
                size_bytes: IMAGE_SIZE,
                path: None,
            }],
            ..Default::default()
        },
        // As QEMU reports them: a running instance's forwards (none yet).
        port_forwards: (state != InstanceState::Stopped).then(Vec::new),
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
        live_disk_hotplug: true,
        readiness: None,
        address: None,
        snapshots: Vec::new(),
        here: here(),
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
        Step::NodeLost { condition, .. } => {
            o.node_lost(condition.clone());
        }
        Step::Forget => {}
        Step::Teardown => {
            o.terminating();
            o.instance = None;
            o.finalizer = false;
        }
        Step::DeleteSnapshots { .. } => {
            o.terminating();
            o.snapshots.clear();
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
        Step::AttachDisk { disk } => o.disk_attached(DiskRuntime {
            name: disk.name.clone(),
            size_bytes: disk.size_gib << 30,
            path: None,
        }),
        Step::DetachDisk { disk } => o.disk_detached(disk),
        Step::ForwardPorts { remove, add } => {
            remove.iter().for_each(|f| o.forward_removed(f));
            add.iter().for_each(|f| o.forward_added(f));
        }
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
            "a disk added to a running VM is hot-plugged",
            spec_of(settled(), |s| s.disks = vec![data_disk(2)]),
            Box::new(is(Step::AttachDisk { disk: data_disk(2) })),
        ),
        (
            "a disk removed from a running VM is hot-unplugged",
            {
                let mut o = edited(settled(), |s| s.disks = vec![data_disk(2)]);
                reconcile(&mut o);
                spec_of(o, |s| s.disks.clear())
            },
            Box::new(is(Step::DetachDisk {
                disk: "data".into(),
            })),
        ),
        (
            "a disk added to a running VM whose backend cannot hot-plug requires a restart",
            spec_of(
                Observed {
                    live_disk_hotplug: false,
                    ..settled()
                },
                |s| s.disks = vec![data_disk(2)],
            ),
            Box::new(|s: &Step| is_set_condition(s, "RestartRequired", ConditionStatus::True)),
        ),
        (
            "a disk added to a running VM after a failed hot-plug of this generation requires a restart",
            {
                let mut o = spec_of(settled(), |s| s.disks = vec![data_disk(2)]);
                o.disk_hotplug_failed("data", true, "no free PCIe root port");
                o
            },
            Box::new(is(Step::Report {
                phase: VmPhase::Running,
            })),
        ),
        (
            "a disk added to a paused VM waits for the resume, no restart",
            spec_of(
                Observed {
                    instance: Some(instance(InstanceState::Suspended)),
                    ..settled()
                },
                |s| {
                    s.disks = vec![data_disk(2)];
                    s.power_state = PowerState::Suspended;
                    s.update_policy = UpdatePolicy::Restart;
                },
            ),
            Box::new(is(Step::Report {
                phase: VmPhase::Suspended,
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
            "a deleted VM with Snapshots deletes them before its teardown",
            Observed {
                deleting: true,
                snapshots: vec!["before".into()],
                ..settled()
            },
            Box::new(is(Step::DeleteSnapshots {
                names: vec!["before".into()],
            })),
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

/// The fault: the agent that took the etcd lease over from another data
/// dir (or host) saw no instance in its own data dir, noted `Crashed` and
/// started a second copy on a new empty disk. Now it reports `NodeLost`,
/// changes nothing else, and the owning agent adopts the VM as before.
#[test]
fn a_second_agent_never_starts_a_second_copy_of_a_vm_running_under_another_data_dir() {
    let running = settled();
    assert_eq!(running.status.node_name.as_deref(), Some("here"));
    // Another agent on the same host, with data dir /data2: its driver
    // finds no instance of the VM.
    let mut other = Observed {
        instance: None,
        here: Here {
            node: crate::NodeIdentity {
                name: "here".into(),
                data_dir: Some("/data2".into()),
            },
            work_dir: Some("/data2/vms/web".into()),
        },
        ..running.clone()
    };
    let steps = reconcile(&mut other);
    assert!(
        matches!(
            steps[..],
            [Step::NodeLost {
                warning: Some(_),
                ..
            }]
        ),
        "{steps:?}"
    );
    let ready = cond(&other, "Ready").unwrap();
    assert_eq!(
        (ready.status, ready.reason.as_str()),
        (ConditionStatus::False, NODE_LOST)
    );
    assert!(
        ready
            .message
            .contains("node here (work dir /data/vms/web), last reported Running")
            && ready.message.contains("data dir /data2"),
        "{}",
        ready.message
    );
    assert_eq!(
        other.status.phase,
        VmPhase::Running,
        "the last known phase stays"
    );
    assert_eq!(other.status.start_failures.count, 0, "no crash is counted");
    assert_eq!(other.status.runtime, running.status.runtime);
    // Another host: the node name differs, whatever its work dir.
    let mut far = Observed {
        instance: None,
        here: Here {
            node: crate::NodeIdentity {
                name: "far".into(),
                data_dir: None,
            },
            work_dir: Some(WORK_DIR.into()),
        },
        ..running.clone()
    };
    assert!(matches!(reconcile(&mut far)[..], [Step::NodeLost { .. }]));
    // Deleted there: the finalizer stays (no claim of a teardown).
    let mut deleted = Observed {
        deleting: true,
        ..other.clone()
    };
    assert!(matches!(
        reconcile(&mut deleted)[..],
        [Step::NodeLost {
            warning: Some(_),
            ..
        }]
    ));
    assert!(deleted.finalizer);
    assert_eq!(deleted.status.phase, VmPhase::Terminating);
    // The owner, back, adopts its running instance from the NodeLost
    // status: Ready again, nothing started.
    let mut back = Observed {
        instance: running.instance.clone(),
        here: here(),
        ..other
    };
    let steps = reconcile(&mut back);
    assert!(
        !steps
            .iter()
            .any(|s| matches!(s, Step::Start { .. } | Step::Crashed)),
        "{steps:?}"
    );
    assert!(crate::conditions::is_true(&back.status.conditions, "Ready"));
}

/// A status written before `nodeName` existed, on the agent that runs the
/// instance: adopted, and the node recorded.
#[test]
fn an_instance_adopted_from_a_status_without_a_node_records_this_node() {
    let mut o = settled();
    o.status.node_name = None;
    assert_eq!(
        reconcile(&mut o),
        [Step::Report {
            phase: VmPhase::Running
        }]
    );
    assert_eq!(o.status.node_name.as_deref(), Some("here"));
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

/// Issue 16 fault 4: a refused shrink of the root disk and of a data disk
/// at once was noted (Warning) as the root disk's alone.
#[test]
fn a_refused_shrink_names_every_disk_refused_in_its_warning_and_condition() {
    let mut o = settled();
    o.spec.disk_gib = Some(10);
    o.spec.disks = vec![vmctl_api::Disk {
        name: "data".into(),
        size_gib: 2,
    }];
    o.generation += 1;
    reconcile(&mut o);
    o.spec.disk_gib = Some(9);
    o.spec.disks[0].size_gib = 1;
    o.generation += 1;
    let steps = reconcile(&mut o);
    let warning = steps
        .iter()
        .find_map(|s| match s {
            Step::SetCondition {
                condition,
                warning: Some(w),
            } if condition.type_ == disks::SHRINK_REFUSED => Some(w.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Warning: {steps:?}"));
    assert_eq!(
        warning,
        "VM web keeps disks root at 10 GiB (the spec asks 9 GiB), data at 2 GiB (the spec asks 1 GiB): disks cannot shrink"
    );
    let refused = cond(&o, disks::SHRINK_REFUSED).unwrap();
    assert_eq!(refused.status, ConditionStatus::True);
    assert_eq!(refused.observed_generation, o.generation);
    assert!(
        refused
            .message
            .contains("root: 10 GiB → 9 GiB, data: 2 GiB → 1 GiB"),
        "{}",
        refused.message
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
fn an_extra_disk_added_to_a_running_vm_whose_backend_cannot_hot_plug_requires_a_restart() {
    let mut o = Observed {
        live_disk_hotplug: false,
        ..settled()
    };
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

/// `o` with its spec changed by `f`, same generation (a plan table row).
fn spec_of(mut o: Observed, f: impl FnOnce(&mut VirtualMachineSpec)) -> Observed {
    f(&mut o.spec);
    o
}

/// The steps that act (conditions left out).
fn acts(steps: Vec<Step>) -> Vec<Step> {
    steps
        .into_iter()
        .filter(|s| !matches!(s, Step::SetCondition { .. }))
        .collect()
}

fn data_disk(size_gib: u64) -> vmctl_api::Disk {
    vmctl_api::Disk {
        name: "data".into(),
        size_gib,
    }
}

/// [`settled`]-like `o` running with a 2 GiB disk `data` attached, then
/// its spec changed by `f` (a new generation).
fn with_data_disk(o: Observed, f: impl FnOnce(&mut VirtualMachineSpec)) -> Observed {
    let mut o = edited(o, |s| s.disks = vec![data_disk(2)]);
    reconcile(&mut o);
    assert!(disk_names(&o).contains(&"data".to_owned()));
    edited(o, f)
}

fn disk_names(o: &Observed) -> Vec<String> {
    o.instance
        .as_ref()
        .map(|i| i.runtime.disks.iter().map(|d| d.name.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn a_data_disk_added_to_a_running_vm_is_hot_plugged_and_removed_live() {
    let mut o = edited(settled(), |s| s.disks = vec![data_disk(2)]);
    let steps = acts(reconcile(&mut o));
    assert_eq!(
        steps,
        [
            Step::AttachDisk { disk: data_disk(2) },
            Step::Report {
                phase: VmPhase::Running
            }
        ]
    );
    assert!(!steps.contains(&Step::Restart));
    let runtime: Vec<_> = o
        .status
        .runtime
        .as_ref()
        .unwrap()
        .disks
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(runtime, [ROOT_DISK, "data"], "the status shows it attached");
    assert!(cond(&o, "RestartRequired").is_none_or(|c| c.status == ConditionStatus::False));

    // Removed: detached live, even with policy Restart (no restart).
    let mut o = edited(o, |s| {
        s.disks.clear();
        s.update_policy = UpdatePolicy::Restart;
    });
    let steps = acts(reconcile(&mut o));
    assert_eq!(
        steps,
        [
            Step::DetachDisk {
                disk: "data".into()
            },
            Step::Report {
                phase: VmPhase::Running
            }
        ]
    );
    assert_eq!(disk_names(&o), [ROOT_DISK]);
    assert!(cond(&o, "RestartRequired").is_none_or(|c| c.status == ConditionStatus::False));
}

#[test]
fn a_failed_hot_plug_is_not_retried_for_the_generation_and_requires_a_restart() {
    let o = edited(settled(), |s| s.disks = vec![data_disk(2)]);
    assert!(reconcile(&mut o.clone()).contains(&Step::AttachDisk { disk: data_disk(2) }));
    let mut failed = o.clone();
    failed.disk_hotplug_failed("data", true, "no free PCIe root port");
    let steps = reconcile(&mut failed);
    assert!(
        !steps
            .iter()
            .any(|s| matches!(s, Step::AttachDisk { .. } | Step::Restart)),
        "{steps:?}"
    );
    let restart = cond(&failed, "RestartRequired").unwrap();
    assert_eq!(
        (restart.status, restart.reason.as_str()),
        (ConditionStatus::True, disks::HOTPLUG_FAILED)
    );
    assert!(
        restart.message.contains("disk data could not be attached live (no free PCIe root port); it is attached at the next start"),
        "{}",
        restart.message
    );
    // A reconcile later still does not retry it.
    assert_eq!(
        acts(reconcile(&mut failed)),
        [Step::Report {
            phase: VmPhase::Running
        }]
    );
    // With policy Restart the failure restarts the VM, which attaches it.
    let mut restart_policy = edited(failed.clone(), |s| s.update_policy = UpdatePolicy::Restart);
    restart_policy.disk_hotplug_failed("data", true, "no free PCIe root port");
    assert_eq!(reconcile(&mut restart_policy).last(), Some(&Step::Restart));
    reconcile(&mut restart_policy);
    assert!(disk_names(&restart_policy).contains(&"data".to_owned()));
    // The next generation tries live again.
    let mut next = edited(failed, |s| s.vcpus = 1);
    assert!(reconcile(&mut next).contains(&Step::AttachDisk { disk: data_disk(2) }));

    // A failed detach: the same, worded for a detach.
    let mut o = with_data_disk(settled(), |s| s.disks.clear());
    o.disk_hotplug_failed(
        "data",
        false,
        "the guest did not release disk data within 30 s",
    );
    let steps = reconcile(&mut o);
    assert!(!steps.iter().any(|s| matches!(s, Step::DetachDisk { .. })));
    let restart = cond(&o, "RestartRequired").unwrap();
    assert!(
        restart
            .message
            .contains("disk data could not be detached live"),
        "{}",
        restart.message
    );
    assert!(restart.message.contains("its file is kept"));
}

#[test]
fn a_paused_vms_disk_change_waits_for_the_resume_and_is_then_hot_plugged() {
    let mut o = edited(settled(), |s| s.power_state = PowerState::Suspended);
    reconcile(&mut o);
    let mut o = edited(o, |s| s.disks = vec![data_disk(2)]);
    let steps = acts(reconcile(&mut o));
    assert_eq!(
        steps,
        [Step::Report {
            phase: VmPhase::Suspended
        }]
    );
    assert!(cond(&o, "RestartRequired").is_none_or(|c| c.status == ConditionStatus::False));
    let mut o = edited(o, |s| s.power_state = PowerState::Running);
    let steps = acts(reconcile(&mut o));
    assert_eq!(
        &steps[..2],
        [Step::Resume, Step::AttachDisk { disk: data_disk(2) }]
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
            disks::HOTPLUG_FAILED,
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
        disks in prop::sample::subsequence(vec!["data", "logs"], 0..=2),
    ) -> VirtualMachineSpec {
        let mut s = spec(image);
        s.disk_gib = disk_gib;
        s.disks = disks
            .into_iter()
            .map(|n| vmctl_api::Disk { name: n.into(), size_gib: 2 })
            .collect();
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
        node in prop::option::of(prop::sample::select(vec!["here", "there"])),
        work_dir in prop::option::of(prop::sample::select(vec![WORK_DIR, "/other/vms/web"])),
    ) -> VirtualMachineStatus {
        let mut status = VirtualMachineStatus { phase, ..Default::default() };
        status.node_name = node.map(str::to_owned);
        status.runtime = work_dir.map(|w| VmRuntime {
            work_dir: Some(w.into()),
            ..Default::default()
        });
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
        attached in prop::sample::subsequence(vec!["data", "logs"], 0..=2),
        live_disk_resize in any::<bool>(),
        live_disk_hotplug in any::<bool>(),
        ssh in prop::option::of(any::<bool>()),
        address in prop::option::of(0u8..3),
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
                i.runtime.disks.extend(attached.iter().map(|n| DiskRuntime {
                    name: (*n).into(),
                    size_bytes: 2 << 30,
                    path: None,
                }));
                i
            }),
            now: now(),
            live_disk_resize,
            live_disk_hotplug,
            readiness: ssh.map(|ok| crate::probe::Readiness {
                ssh: crate::probe::Check {
                    ok,
                    since: ok.then(now),
                    reason: if ok { "Connected" } else { "WaitingForSsh" },
                    message: String::new(),
                },
                probes: Vec::new(),
            }),
            address: address.map(discovery),
            snapshots: Vec::new(),
            here: here(),
        }
    }
}

/// An address search: 0 searching, 1 timed out, 2 found.
fn discovery(i: u8) -> Discovery {
    match i {
        0 => Discovery::Searching {
            message: "looking for the IPv4 address of MAC 52:54:00:aa:bb:cc".into(),
        },
        1 => Discovery::TimedOut {
            message: format!("IP discovery timeout: … Hints: {}", crate::address::HINTS),
        },
        _ => Discovery::Found {
            address: std::net::Ipv4Addr::new(10, 77, 0, 141),
            source: crate::address::Source::Neighbours("br0".into()),
            since: Some(now()),
        },
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

    /// A tap VM whose address is not found is not Ready, and neither is
    /// its SSH (`vmctl ssh` waits for it), whatever the prober says.
    #[test]
    fn a_vm_is_never_ready_while_its_address_is_not_found(mut o in arb_observed(), phase in prop::sample::select(vec![VmPhase::Running, VmPhase::Suspended, VmPhase::Stopped])) {
        let unaddressed = o.address.as_ref().is_some_and(|d| d.address().is_none());
        o.report(phase);
        if unaddressed {
            prop_assert!(!crate::conditions::is_true(&o.status.conditions, "Ready"));
            prop_assert!(!crate::conditions::is_true(&o.status.conditions, "SshReady"));
            prop_assert!(!crate::conditions::is_true(&o.status.conditions, "AddressReady"));
        }
        if o.address.is_none() {
            prop_assert!(!o.status.conditions.iter().any(|c| c.type_ == "AddressReady"));
        }
    }

    #[test]
    fn a_vm_being_deleted_is_only_torn_down(o in arb_observed()) {
        let o = Observed { deleting: true, instance: None, ..o };
        let step = plan(&o);
        match (o.finalizer, o.elsewhere()) {
            (false, _) => prop_assert_eq!(step, Step::Forget),
            (true, None) => prop_assert_eq!(step, Step::Teardown),
            (true, Some(_)) => prop_assert!(matches!(step, Step::NodeLost { .. }), "{:?}", step),
        }
    }

    /// The fault: an agent that took over an etcd prefix from another
    /// (another host, or another data dir of this one) found no instance
    /// in its own data dir, noted a false `Crashed` and started a second
    /// copy of the VM on a new empty disk. Whatever else was observed, an
    /// instance the status places under another agent is never started,
    /// stopped, recreated or destroyed from here, nor noted as crashed.
    #[test]
    fn a_vm_whose_instance_lives_under_another_agent_is_only_reported_node_lost(o in arb_observed()) {
        let mut o = Observed { instance: None, ..o };
        let Some(away) = o.elsewhere() else { return Ok(()) };
        prop_assert!(
            away.node.as_deref() == Some("there")
                || away.work_dir.as_deref() == Some("/other/vms/web"),
            "{:?}", away
        );
        let (runtime, node) = (o.status.runtime.clone(), o.status.node_name.clone());
        let steps = reconcile(&mut o);
        if o.deleting && !o.finalizer {
            prop_assert_eq!(steps, vec![Step::Forget]);
            return Ok(());
        }
        prop_assert!(matches!(steps[..], [Step::NodeLost { .. }]), "{:?}", steps);
        let ready = cond(&o, "Ready").unwrap();
        prop_assert_eq!(ready.status, ConditionStatus::False);
        prop_assert_eq!(ready.reason.as_str(), NODE_LOST);
        prop_assert!(ready.message.contains("node here"), "{}", ready.message);
        // The last known place of the instance stays in the status.
        prop_assert_eq!(&o.status.runtime, &runtime);
        prop_assert_eq!(&o.status.node_name, &node);
        // Reported once: the next reconcile changes nothing.
        let again = plan(&o);
        prop_assert!(matches!(&again, Step::NodeLost { warning: None, .. }), "{:?}", again);
    }

    #[test]
    fn nothing_is_created_or_destroyed_before_the_finalizer_step(o in arb_observed()) {
        let o = Observed { deleting: false, finalizer: false, ..o };
        let step = plan(&o);
        prop_assert!(
            matches!(step, Step::SetCondition { .. } | Step::WaitForImage | Step::AddFinalizer | Step::NodeLost { .. }),
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
    fn a_disk_is_only_hot_plugged_into_a_running_instance_whose_backend_can(o in arb_observed()) {
        match plan(&o) {
            Step::AttachDisk { disk } => {
                prop_assert!(o.live_disk_hotplug && !disks::hotplug_failed(&o));
                prop_assert_eq!(o.instance.as_ref().map(|i| i.state), Some(InstanceState::Running));
                prop_assert!(o.spec.disks.contains(&disk));
                prop_assert!(!disk_names(&o).contains(&disk.name));
            }
            Step::DetachDisk { disk } => {
                prop_assert!(o.live_disk_hotplug && !disks::hotplug_failed(&o));
                prop_assert_eq!(o.instance.as_ref().map(|i| i.state), Some(InstanceState::Running));
                prop_assert!(!o.spec.disks.iter().any(|d| d.name == disk));
                prop_assert!(disk != ROOT_DISK);
                prop_assert!(disk_names(&o).contains(&disk));
            }
            _ => {}
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
            // Running is Ready unless the SSH probe has not passed or the
            // address is not found.
            let ssh_down = o.readiness.as_ref().is_some_and(|r| !r.ssh.ok);
            let unaddressed = o.address.as_ref().is_some_and(|d| d.address().is_none());
            if phase == VmPhase::Running {
                let ready = cond(&o, "Ready").is_some_and(|c| c.status == ConditionStatus::True);
                prop_assert_eq!(ready, !ssh_down && !unaddressed);
            }
        }
    }
}

// ------------------------------------------------------ port forwards ----

fn fwd(host: u16, guest: u16) -> vmctl_api::PortForward {
    vmctl_api::PortForward::tcp(host, guest)
}

fn forward_entry(o: &Observed, host: u16) -> vmctl_api::PortForwardStatus {
    o.status
        .port_forwards
        .iter()
        .find(|e| e.host_port == host)
        .cloned()
        .unwrap()
}

fn forward_steps(steps: &[Step]) -> Vec<&Step> {
    steps
        .iter()
        .filter(|s| matches!(s, Step::ForwardPorts { .. }))
        .collect()
}

/// `o` with its spec edited by `f` (a new generation), as an apply does.
fn edited(mut o: Observed, f: impl FnOnce(&mut VirtualMachineSpec)) -> Observed {
    f(&mut o.spec);
    o.generation += 1;
    o
}

#[test]
fn a_port_forward_added_or_removed_on_a_running_vm_applies_live_without_a_restart() {
    let digest = restart_digest(&settled().spec);
    for policy in [UpdatePolicy::RestartRequired, UpdatePolicy::Restart] {
        let mut o = edited(settled(), |s| {
            s.update_policy = policy;
            s.port_forwards = vec![fwd(8080, 80), fwd(8081, 81)];
        });
        assert_eq!(restart_digest(&o.spec), digest, "not a restart field");
        let steps = reconcile(&mut o);
        assert_eq!(
            forward_steps(&steps),
            vec![&Step::ForwardPorts {
                remove: vec![],
                add: vec![fwd(8080, 80), fwd(8081, 81)]
            }]
        );
        assert!(!steps.contains(&Step::Restart), "{steps:?}");
        assert!(
            cond(&o, "RestartRequired").is_none_or(|c| c.status == ConditionStatus::False),
            "{steps:?}"
        );
        assert_eq!(
            forward_entry(&o, 8080).state,
            vmctl_api::PortForwardState::Active
        );
        let ready = cond(&o, ports::READY).unwrap();
        assert_eq!(ready.status, ConditionStatus::True);
        assert!(
            ready.message.contains("127.0.0.1:8081->81/tcp"),
            "{ready:?}"
        );

        // One removed: taken away live, the other stays.
        let mut o = edited(o, |s| s.port_forwards = vec![fwd(8081, 81)]);
        let steps = reconcile(&mut o);
        assert_eq!(
            forward_steps(&steps),
            vec![&Step::ForwardPorts {
                remove: vec![fwd(8080, 80)],
                add: vec![]
            }]
        );
        assert!(!steps.contains(&Step::Restart), "{steps:?}");
        assert_eq!(o.status.port_forwards.len(), 1);
        // All removed: no entries, no condition.
        let mut o = edited(o, |s| s.port_forwards.clear());
        reconcile(&mut o);
        assert!(o.status.port_forwards.is_empty());
        assert!(cond(&o, ports::READY).is_none());
        assert!(o.instance.as_ref().unwrap().port_forwards == Some(vec![]));
    }
}

#[test]
fn a_busy_host_port_fails_that_forward_only_the_vm_stays_ready_and_it_is_retried() {
    let mut o = edited(settled(), |s| {
        s.port_forwards = vec![fwd(8080, 80), fwd(8081, 81)]
    });
    // The act part, with 8080 in use.
    let add = loop {
        match plan(&o) {
            Step::ForwardPorts { add, .. } => break add,
            step => assert!(!model(&mut o, &step), "ended before ForwardPorts"),
        }
    };
    for f in &add {
        if f.host_port == 8080 {
            assert!(o.forward_failed(f, ports::IN_USE, "host port 8080/tcp is in use"));
        } else {
            o.forward_added(f);
        }
    }
    // Not tried again in this reconcile, nor before the retry time.
    let steps = reconcile(&mut o);
    assert!(
        !steps.iter().any(|s| matches!(s, Step::ForwardPorts { .. })),
        "{steps:?}"
    );
    assert_eq!(cond(&o, "Ready").unwrap().status, ConditionStatus::True);
    let c = cond(&o, ports::READY).unwrap();
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, ports::IN_USE)
    );
    assert!(c.message.contains("8080/tcp is in use"), "{c:?}");
    assert!(c.message.contains("1 other forward(s) active"), "{c:?}");
    let failed = forward_entry(&o, 8080);
    assert_eq!(failed.state, vmctl_api::PortForwardState::Failed);
    assert_eq!(
        forward_entry(&o, 8081).state,
        vmctl_api::PortForwardState::Active
    );
    assert_eq!(ports::next_retry(&o), Some(ports::RETRY));
    // The same failure again changes nothing (no second Warning note).
    assert!(!o.forward_failed(
        &fwd(8080, 80),
        ports::IN_USE,
        "host port 8080/tcp is in use"
    ));
    // Once the wait is over, it is tried again.
    o.now += chrono::Duration::seconds(31);
    assert_eq!(
        plan(&o),
        Step::ForwardPorts {
            remove: vec![],
            add: vec![fwd(8080, 80)]
        }
    );
    reconcile(&mut o);
    assert!(cond(&o, ports::READY).unwrap().status == ConditionStatus::True);
    assert_eq!(
        forward_entry(&o, 8080).state,
        vmctl_api::PortForwardState::Active
    );
}

#[test]
fn forwards_of_a_stopped_vm_are_pending_and_come_back_at_start() {
    let mut o = edited(settled(), |s| s.port_forwards = vec![fwd(8080, 80)]);
    reconcile(&mut o);
    let mut o = edited(o, |s| s.power_state = PowerState::Stopped);
    reconcile(&mut o);
    let e = forward_entry(&o, 8080);
    assert_eq!(e.state, vmctl_api::PortForwardState::Pending);
    assert_eq!(e.reason.as_deref(), Some("NotRunning"));
    let mut o = edited(o, |s| s.power_state = PowerState::Running);
    let steps = acts(reconcile(&mut o));
    let start = steps
        .iter()
        .position(|s| matches!(s, Step::Start { .. }))
        .unwrap();
    assert!(
        matches!(&steps[start + 1], Step::ForwardPorts { add, .. } if add == &vec![fwd(8080, 80)]),
        "forwards go in right after the start: {steps:?}"
    );
    assert_eq!(
        forward_entry(&o, 8080).state,
        vmctl_api::PortForwardState::Active
    );
}

#[test]
fn a_display_change_needs_a_restart_and_vms_without_one_keep_their_digest() {
    // The digest as it was before `display` existed: running VMs started
    // then must not suddenly need a restart.
    let s = settled().spec;
    let before = {
        use sha2::Digest;
        let v = serde_json::json!({
            "vcpus": s.vcpus,
            "memoryMib": s.memory_mib,
            "network": s.network,
            "cloudInit": s.cloud_init,
        });
        hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..8])
    };
    assert_eq!(restart_digest(&s), before);
    let mut o = edited(settled(), |s| s.display = vmctl_api::Display::Vnc);
    assert_ne!(restart_digest(&o.spec), before);
    reconcile(&mut o);
    let c = cond(&o, "RestartRequired").unwrap();
    assert_eq!(c.status, ConditionStatus::True);
    assert!(c.message.contains("display"), "{c:?}");
}

/// The address search of a running tap VM, as it goes: searching, timed
/// out (the manual's hints in `AddressReady` and `Ready`), found (the
/// condition True since it was found; Ready follows SSH again).
#[test]
fn address_ready_follows_the_search_and_holds_ready_back_until_found() {
    let mut o = settled();
    let cond = |o: &Observed, t: &str| {
        o.status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t}: {:?}", o.status.conditions))
    };
    o.address = Some(discovery(0));
    o.report(VmPhase::Running);
    assert_eq!(cond(&o, "AddressReady").reason, "WaitingForAddress");
    assert_eq!(cond(&o, "Ready").reason, "WaitingForAddress");
    assert_eq!(cond(&o, "SshReady").status, ConditionStatus::False);

    o.address = Some(discovery(1));
    o.report(VmPhase::Running);
    let c = cond(&o, "AddressReady");
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "IPDiscoveryTimeout")
    );
    assert!(c.message.contains("ip neigh show dev"), "{}", c.message);
    assert_eq!(cond(&o, "Ready").reason, "IPDiscoveryTimeout");
    assert!(cond(&o, "Ready").message.contains("DHCP lease"));

    o.address = Some(discovery(2));
    o.readiness = Some(crate::probe::Readiness {
        ssh: crate::probe::Check {
            ok: true,
            since: Some(now()),
            reason: "Connected",
            message: String::new(),
        },
        probes: Vec::new(),
    });
    o.now = now() + chrono::Duration::seconds(30);
    o.report(VmPhase::Running);
    let c = cond(&o, "AddressReady");
    assert_eq!(c.status, ConditionStatus::True);
    assert_eq!(c.message, "10.77.0.141 from the neighbour table of br0");
    assert_eq!(c.last_transition_time, Some(now()), "when it was found");
    assert_eq!(cond(&o, "Ready").status, ConditionStatus::True);

    // Another network, or stopped: no search, no condition.
    o.address = None;
    o.report(VmPhase::Stopped);
    assert!(
        !o.status
            .conditions
            .iter()
            .any(|c| c.type_ == "AddressReady")
    );
}

#[test]
fn a_share_change_needs_a_restart_and_vms_without_shares_keep_their_digest() {
    let s = settled().spec;
    let before = {
        use sha2::Digest;
        let v = serde_json::json!({
            "vcpus": s.vcpus,
            "memoryMib": s.memory_mib,
            "network": s.network,
            "cloudInit": s.cloud_init,
        });
        hex::encode(&sha2::Sha256::digest(v.to_string().as_bytes())[..8])
    };
    assert_eq!(restart_digest(&s), before);
    let mut o = edited(settled(), |s| {
        s.shares = vec![vmctl_api::Share {
            host_path: "/home/me/src".into(),
            mount_path: "/src".into(),
            read_only: false,
        }]
    });
    assert_ne!(restart_digest(&o.spec), before);
    reconcile(&mut o);
    let c = cond(&o, "RestartRequired").unwrap();
    assert_eq!(c.status, ConditionStatus::True);
    assert!(c.message.contains("shared folders"), "{c:?}");
}
