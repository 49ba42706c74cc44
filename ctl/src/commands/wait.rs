//! Waiting until applied objects are Ready, with live per-object progress.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::{Object, ObjectRef};

use crate::client::{Awaited, Client, LogSource, States};

/// Where one object stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Not there yet; the text says what it is doing.
    Progressing(String),
    /// Ready at its current generation.
    Ready,
    /// Failed for a reason retrying will not fix (or not soon).
    Failed(String),
}

fn ready_condition(o: &Object) -> Option<vmctl_api::Condition> {
    let conds = o.status.as_ref()?.get("conditions")?.clone();
    let conds: Vec<vmctl_api::Condition> = serde_json::from_value(conds).ok()?;
    conds.into_iter().find(|c| c.type_ == "Ready")
}

/// Classifies an object by its status.
pub(crate) fn state(o: &Object) -> State {
    let st = o.status.as_ref();
    let phase = st
        .and_then(|s| s.get("phase"))
        .and_then(|p| p.as_str())
        .unwrap_or("Pending");
    let observed = st
        .and_then(|s| s.get("observedGeneration"))
        .and_then(|g| g.as_u64())
        .unwrap_or(0);
    let ready = ready_condition(o);
    if phase == "Downloading"
        && let Some(bytes) = st.and_then(|s| s["progress"]["bytes"].as_u64())
    {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let done = match st.and_then(|s| s["progress"]["total"].as_u64()) {
            Some(t) if t > 0 => format!(
                "{:.0}% ({:.1} of {:.1} MiB)",
                bytes as f64 * 100.0 / t as f64,
                mib(bytes),
                mib(t)
            ),
            _ => format!("{:.1} MiB", mib(bytes)),
        };
        return State::Progressing(format!("Downloading {done}"));
    }
    if observed < o.metadata.generation {
        return State::Progressing(format!(
            "{phase} (waiting for generation {} to be observed)",
            o.metadata.generation
        ));
    }
    let reason = ready
        .as_ref()
        .map(|c| {
            if c.message.is_empty() {
                c.reason.clone()
            } else {
                format!("{}: {}", c.reason, c.message)
            }
        })
        .unwrap_or_default();
    if phase == "Failed" {
        return State::Failed(if reason.is_empty() {
            "Failed".into()
        } else {
            reason
        });
    }
    match ready {
        Some(c) if c.status == vmctl_api::ConditionStatus::True => State::Ready,
        _ if reason.is_empty() => State::Progressing(phase.to_owned()),
        _ => State::Progressing(format!("{phase} ({reason})")),
    }
}

/// Streams what a Provision's steps print, prefixed with the VM's name, to
/// stderr until the process ends. Waits (watching) for the Provision to
/// name its VM and for that VM to have a work directory, where the log is.
fn stream_provision_output(client: &Client, r: &ObjectRef) {
    let client = client.clone();
    let r = r.clone();
    std::thread::spawn(move || {
        let names_vm = |s: &States| {
            s.get(&r)?
                .as_ref()?
                .spec
                .get("vm")?
                .as_str()
                .map(str::to_owned)
        };
        let Ok(Awaited::Done(vm)) =
            client.await_condition(std::slice::from_ref(&r), names_vm, None)
        else {
            return;
        };
        let vm_ref = ObjectRef::new(vmctl_api::Kind::VirtualMachine, vm.clone());
        let has_work_dir = |s: &States| {
            s.get(&vm_ref)?
                .as_ref()?
                .status
                .as_ref()?
                .get("runtime")?
                .get("workDir")?
                .as_str()
                .map(|_| ())
        };
        if !matches!(
            client.await_condition(std::slice::from_ref(&vm_ref), has_work_dir, None),
            Ok(Awaited::Done(()))
        ) {
            return;
        }
        if let Ok(resp) = client.logs(&vm, LogSource::Provision, 0, true, true) {
            let _ = resp.lines(|line| {
                eprintln!("  [{vm}] {}", String::from_utf8_lossy(line));
                true
            });
        }
    });
}

/// Waits (watching) until the objects are all Ready, one fails, or
/// `timeout` passes. Prints each object's progress to stderr when it
/// changes, and what provisioning steps print, line by line.
pub(crate) fn wait_ready(
    client: &Client,
    refs: &[ObjectRef],
    timeout: Duration,
) -> miette::Result<ExitCode> {
    for r in refs.iter().filter(|r| r.kind == vmctl_api::Kind::Provision) {
        stream_provision_output(client, r);
    }
    let mut last: BTreeMap<ObjectRef, State> = BTreeMap::new();
    let check = |states: &States| -> Option<Result<(), (ObjectRef, String)>> {
        let mut all_ready = true;
        for r in refs {
            let st = match states.get(r).and_then(Option::as_ref) {
                Some(o) => state(o),
                None => State::Failed("deleted while waiting".into()),
            };
            if last.get(r) != Some(&st) {
                match &st {
                    State::Progressing(s) => eprintln!("  {r}: {s}"),
                    State::Ready => eprintln!("  {r}: Ready"),
                    State::Failed(s) => eprintln!("  {r}: Failed: {s}"),
                }
                last.insert(r.clone(), st.clone());
            }
            match st {
                State::Ready => {}
                State::Failed(reason) => return Some(Err((r.clone(), reason))),
                State::Progressing(_) => all_ready = false,
            }
        }
        all_ready.then_some(Ok(()))
    };
    match client.await_condition(refs, check, Some(timeout))? {
        Awaited::Done(Ok(())) => {
            if refs.iter().any(|r| r.kind == vmctl_api::Kind::Provision) {
                // Let the log streams print the last lines (the agent
                // reads the log every 200 ms).
                std::thread::sleep(Duration::from_millis(400));
            }
            eprintln!("all {} objects are Ready", refs.len());
            Ok(ExitCode::SUCCESS)
        }
        Awaited::Done(Err((r, reason))) => Err(miette::miette!(
            code = "vmctl::apply::failed",
            help = format!(
                "run `vmctl describe {} {}` for details",
                r.kind.short(),
                r.name
            ),
            "{r} failed: {reason}"
        )),
        Awaited::TimedOut(_) => {
            let pending: Vec<String> = last
                .iter()
                .filter_map(|(r, s)| match s {
                    State::Progressing(p) => Some(format!("{r}: {p}")),
                    _ => None,
                })
                .collect();
            Err(miette::miette!(
                code = "vmctl::apply::timeout",
                help = "raise --timeout, or run `vmctl describe` on the objects still waiting",
                "timed out after {}s; not Ready: {}",
                timeout.as_secs(),
                pending.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(generation: u64, status: serde_json::Value) -> Object {
        let mut o = Object::new(
            vmctl_api::Kind::VirtualMachine,
            vmctl_api::ObjectMeta::named("a"),
            serde_json::json!({}),
        );
        o.metadata.generation = generation;
        o.status = Some(status);
        o
    }

    #[test]
    fn ready_needs_the_current_generation_observed() {
        let ready = serde_json::json!({"phase": "Running", "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": ""}]});
        assert_eq!(state(&obj(1, ready.clone())), State::Ready);
        assert!(matches!(state(&obj(2, ready)), State::Progressing(_)));
    }

    #[test]
    fn failed_phase_carries_the_ready_reason() {
        let failed = serde_json::json!({"phase": "Failed", "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "False", "reason": "ImageNotFound", "message": "no such file"}]});
        assert_eq!(
            state(&obj(1, failed)),
            State::Failed("ImageNotFound: no such file".into())
        );
    }
}
