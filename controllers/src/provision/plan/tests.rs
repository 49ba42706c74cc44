//! The Provision plan: a table of named cases, and properties over
//! arbitrary observations.

use proptest::prelude::*;
use vmctl_api::{ConditionStatus, VmRuntime};

use super::*;

fn now() -> DateTime<Utc> {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

fn vm(instance_id: &str) -> SshTarget {
    SshTarget {
        vm: "web".into(),
        runtime: VmRuntime {
            backend: "fake".into(),
            ssh_port: Some(2222),
            instance_id: Some(instance_id.into()),
            ..Default::default()
        },
        ssh: None,
    }
}

/// A Provision just applied, its VM Ready.
fn fresh() -> Observed {
    Observed {
        generation: 1,
        deleting: false,
        steps: 2,
        status: ProvisionStatus::default(),
        vm: Some(vm("i-1")),
        now: now(),
    }
}

/// [`fresh`] after a run whose steps all exited with `code`.
fn ran(code: i32) -> Observed {
    let mut o = fresh();
    run(&mut o, code);
    o
}

/// A run as the reconciler makes it, every step exiting with `code`
/// (the first failure skips the rest).
fn run(o: &mut Observed, code: i32) {
    let target = o.vm.clone().unwrap();
    o.running();
    o.ssh_ready();
    let mut failed = None;
    for i in 0..o.steps {
        if failed.is_some() {
            o.step_skipped(i);
            continue;
        }
        o.step_started(i);
        failed = o.step_ended(i, &Ok(StepOutcome { exit_code: code }));
    }
    o.finished(&target, failed.as_deref());
}

#[test]
fn plan_table() {
    let rows: Vec<(&str, Observed, Step)> = vec![
        ("a new Provision on a Ready VM runs", fresh(), Step::Run),
        (
            "a new Provision whose VM is not Ready waits for it",
            Observed {
                vm: None,
                ..fresh()
            },
            Step::WaitForVm,
        ),
        (
            "a Provision being deleted is forgotten",
            Observed {
                deleting: true,
                ..fresh()
            },
            Step::Forget,
        ),
        (
            "a run that succeeded on this instance is kept",
            ran(0),
            Step::Keep,
        ),
        (
            "a run that failed on this instance is kept",
            ran(1),
            Step::Keep,
        ),
        (
            "a finished run is kept while the VM is down",
            Observed { vm: None, ..ran(0) },
            Step::Keep,
        ),
        (
            "a new generation runs again",
            Observed {
                generation: 2,
                ..ran(0)
            },
            Step::Run,
        ),
        (
            "a new generation whose VM is down waits",
            Observed {
                generation: 2,
                vm: None,
                ..ran(0)
            },
            Step::WaitForVm,
        ),
        (
            "a recreated VM (new instance id) runs again",
            Observed {
                vm: Some(vm("i-2")),
                ..ran(0)
            },
            Step::Run,
        ),
        (
            "a run interrupted by a crash runs again",
            {
                let mut o = fresh();
                o.running();
                o
            },
            Step::Run,
        ),
        (
            "SSH that never answered is tried again",
            {
                let mut o = fresh();
                o.running();
                o.ssh_failed("web", &DriverError::Timeout("ssh".into()));
                o
            },
            Step::Run,
        ),
    ];
    let failed: Vec<String> = rows
        .iter()
        .filter(|(_, o, want)| plan(o) != *want)
        .map(|(name, o, want)| format!("{name}: want {want:?}, got {:?}", plan(o)))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn a_failed_step_skips_the_rest_and_says_which() {
    let mut o = Observed {
        steps: 3,
        ..fresh()
    };
    o.running();
    o.step_started(0);
    assert_eq!(o.step_ended(0, &Ok(StepOutcome { exit_code: 0 })), None);
    o.step_started(1);
    let why = o.step_ended(1, &Ok(StepOutcome { exit_code: 7 }));
    assert_eq!(why.as_deref(), Some("step 1 exited with code 7"));
    o.step_skipped(2);
    let (ok, reason, msg) = o.finished(&vm("i-1"), why.as_deref());
    assert!(!ok);
    assert_eq!(reason, "ProvisionFailed");
    assert_eq!(msg, "Provisioning VM web failed: step 1 exited with code 7");
    let phases: Vec<StepPhase> = o.status.steps.iter().map(|s| s.phase).collect();
    assert_eq!(
        phases,
        [StepPhase::Succeeded, StepPhase::Failed, StepPhase::Skipped]
    );
    let ready = o
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status, ready.reason.as_str()),
        (ConditionStatus::False, "StepFailed")
    );
}

#[test]
fn ssh_that_does_not_answer_fails_the_generation_without_an_instance() {
    let mut o = fresh();
    o.running();
    o.ssh_failed("web", &DriverError::Timeout("ssh to web".into()));
    assert!(is_finished(&o.status, 1));
    assert_eq!(o.status.vm_instance_id, None);
    let ready = o
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "SshTimeout");
    assert!(
        ready.message.contains("VM web does not answer SSH"),
        "{}",
        ready.message
    );
}

// ------------------------------------------------------------ properties ----

fn arb_phase() -> impl Strategy<Value = ProvisionPhase> {
    prop::sample::select(vec![
        ProvisionPhase::Pending,
        ProvisionPhase::Running,
        ProvisionPhase::Succeeded,
        ProvisionPhase::Failed,
    ])
}

prop_compose! {
    fn arb_observed()(
        generation in 1u64..3,
        deleting in any::<bool>(),
        steps in 0usize..4,
        phase in arb_phase(),
        observed_generation in 0u64..3,
        done_on in prop::option::of(prop::sample::select(vec!["i-1", "i-2"])),
        vm_on in prop::option::of(prop::sample::select(vec!["i-1", "i-2"])),
    ) -> Observed {
        Observed {
            generation,
            deleting,
            steps,
            status: ProvisionStatus {
                phase,
                observed_generation,
                vm_instance_id: done_on.map(str::to_owned),
                ..Default::default()
            },
            vm: vm_on.map(vm),
            now: now(),
        }
    }
}

proptest! {
    #[test]
    fn a_provision_being_deleted_never_runs(o in arb_observed()) {
        let o = Observed { deleting: true, ..o };
        prop_assert_eq!(plan(&o), Step::Forget);
    }

    #[test]
    fn steps_run_only_on_a_ready_vm(o in arb_observed()) {
        if plan(&o) == Step::Run {
            prop_assert!(o.vm.is_some() && !o.deleting);
        }
    }

    #[test]
    fn a_finished_result_is_never_reset_to_pending(o in arb_observed()) {
        if is_finished(&o.status, o.generation) {
            prop_assert_ne!(plan(&o), Step::WaitForVm);
        }
    }

    #[test]
    fn a_run_is_not_repeated_for_its_generation_and_instance(o in arb_observed(), code in 0i32..2) {
        let mut o = Observed { deleting: false, ..o };
        if plan(&o) == Step::Run {
            run(&mut o, code);
            prop_assert!(is_finished(&o.status, o.generation));
            prop_assert_eq!(plan(&o), Step::Keep);
            prop_assert_eq!(o.status.steps.len(), o.steps);
        }
    }

    #[test]
    fn plan_is_deterministic(o in arb_observed()) {
        prop_assert_eq!(plan(&o), plan(&o.clone()));
    }
}
