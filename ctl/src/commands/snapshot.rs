//! `vmctl snapshot create|list|restore|delete`, on top of Snapshot objects.
//!
//! Create applies a Snapshot; restore sets its `spec.restoreToken` (a
//! spec change, so it is in the Snapshot's history); the agent refuses
//! either when it cannot happen (`vmctl::snapshot::*`), changing nothing.
//! Waits watch, as `apply --wait` does.

use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::{Kind, ObjectRef, Snapshot, SnapshotSpec};

use super::{Globals, name_arg};
use crate::cli::{GetOutput, Output, SnapshotCommand};
use crate::client::{Awaited, Client};
use crate::output::print;

/// Runs a snapshot subcommand.
pub fn run(g: &Globals, cmd: SnapshotCommand) -> miette::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            name,
            wait,
            timeout,
            output,
        } => create(
            g,
            &vm,
            name,
            wait.then(|| Duration::from_secs(timeout)),
            output,
        ),
        SnapshotCommand::List { vm, output } => list(g, vm.as_deref(), output),
        SnapshotCommand::Restore {
            name,
            wait,
            timeout,
        } => restore(g, &name, wait.then(|| Duration::from_secs(timeout))),
        SnapshotCommand::Delete {
            name,
            wait,
            timeout,
        } => delete(g, &name, wait.then(|| Duration::from_secs(timeout))),
    }
}

/// `VM-YYYYMMDD-HHMMSS` (UTC), then `…-2`, `…-3` for later `attempt`s
/// (another snapshot took the name within the same second); the VM's part
/// shortened so the whole is a DNS label (63 characters at most).
pub(crate) fn generated_name(vm: &str, now: chrono::DateTime<chrono::Utc>, attempt: u32) -> String {
    let stamp = now.format("%Y%m%d-%H%M%S").to_string();
    let suffix = if attempt > 1 {
        format!("-{attempt}")
    } else {
        String::new()
    };
    let keep = 63 - stamp.len() - suffix.len() - 1;
    let head: String = vm.chars().take(keep).collect();
    format!("{}-{stamp}{suffix}", head.trim_end_matches('-'))
}

/// How many generated names a create tries before it gives up (each
/// taken by a snapshot created in the same second).
const NAME_ATTEMPTS: u32 = 100;

fn create(
    g: &Globals,
    vm: &str,
    name: Option<String>,
    wait: Option<Duration>,
    output: Output,
) -> miette::Result<ExitCode> {
    name_arg(vm)?;
    if let Some(n) = &name {
        name_arg(n)?;
    }
    let client = g.client()?;
    let now = chrono::Utc::now();
    // A create-only request: the agent writes the Snapshot only if no
    // object has its name, checked in the write itself, so two concurrent
    // creates never land on one object (found as: two `snapshot create
    // web` in one second both said "created", one Snapshot existed).
    let mut attempt = 1;
    let name = loop {
        let candidate = name
            .clone()
            .unwrap_or_else(|| generated_name(vm, now, attempt));
        let snap = Snapshot::new(
            candidate.clone(),
            SnapshotSpec {
                vm: vm.to_owned(),
                restore_token: None,
            },
        );
        let mut req = super::objects::apply_request(
            vec![snap.to_object()],
            None,
            "snapshot create",
            false,
            false,
        );
        req.create_only = true;
        match client.apply(&req) {
            Err(e) if e.code() == "vmctl::api::already_exists" => {
                if name.is_some() {
                    return Err(crate::diag::error_help(
                        "vmctl::snapshot::exists",
                        "pick another name, or leave it out for a generated one",
                        format!("snapshot {candidate} exists already"),
                    ));
                }
                if attempt >= NAME_ATTEMPTS {
                    return Err(crate::diag::error_help(
                        "vmctl::snapshot::exists",
                        "name the snapshot: `vmctl snapshot create VM NAME`",
                        format!(
                            "snapshot {candidate} exists already, as do the {} names generated before it",
                            NAME_ATTEMPTS - 1
                        ),
                    ));
                }
                attempt += 1;
            }
            r => {
                super::apply::check_acknowledged(&req, &r?)?;
                break candidate;
            }
        }
    };
    let r = ObjectRef::new(Kind::Snapshot, name.clone());
    let code = match wait {
        Some(t) => super::wait::wait_ready(&client, std::slice::from_ref(&r), t)?,
        None => ExitCode::SUCCESS,
    };
    match output {
        Output::Text => println!("{r} created (of vm/{vm})"),
        Output::Json | Output::Yaml => {
            let o = super::objects::get_object(&client, Kind::Snapshot, &name)?;
            print(&render_one(&o, output))?;
        }
    }
    Ok(code)
}

fn render_one(o: &vmctl_api::Object, output: Output) -> String {
    match output {
        Output::Yaml => serde_yaml::to_string(o).expect("serialises"),
        _ => format!("{}\n", serde_json::to_string_pretty(o).expect("serialises")),
    }
}

fn list(g: &Globals, vm: Option<&str>, output: GetOutput) -> miette::Result<ExitCode> {
    if let Some(v) = vm {
        name_arg(v)?;
    }
    let client = g.client()?;
    let listed = client.list(Some(Kind::Snapshot), &[])?;
    let items: Vec<vmctl_api::Object> = listed
        .items
        .into_iter()
        .filter(|o| vm.is_none_or(|v| o.spec.get("vm").and_then(|x| x.as_str()) == Some(v)))
        .collect();
    if items.is_empty()
        && let Some(v) = vm
    {
        // No snapshots of a VM that does not exist is that VM's
        // `not_found` (found as: `snapshot list nosuch` exited 0). A VM
        // gone while its snapshots were being deleted still lists them.
        super::objects::get_object(&client, Kind::VirtualMachine, v)?;
    }
    if items.is_empty() && matches!(output, GetOutput::Table | GetOutput::Wide) {
        match vm {
            Some(v) => eprintln!("No snapshots of VM {v}."),
            None => eprintln!("No snapshots."),
        }
        return Ok(ExitCode::SUCCESS);
    }
    print(&super::get::render(&items, listed.resource_version, output))?;
    Ok(ExitCode::SUCCESS)
}

fn restore(g: &Globals, name: &str, wait: Option<Duration>) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    let token = chrono::Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or_default()
        .to_string();
    let applied =
        super::objects::edit_spec(&client, Kind::Snapshot, name, "snapshot restore", |spec| {
            spec[vmctl_api::snapshot::RESTORE_TOKEN_FIELD] =
                serde_json::Value::String(token.clone());
        })?;
    let vm = super::objects::get_object(&client, Kind::Snapshot, name)?
        .spec
        .get("vm")
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_owned();
    eprintln!("restore of vm/{vm} to snapshot/{name} requested");
    let Some(timeout) = wait else {
        return Ok(ExitCode::SUCCESS);
    };
    wait_restored(&client, name, &vm, &token, applied.generation, timeout)
}

/// Waits until the Snapshot's controller acted on `token`: the
/// `Restored` condition then says how it went.
fn wait_restored(
    client: &Client,
    name: &str,
    vm: &str,
    token: &str,
    generation: u64,
    timeout: Duration,
) -> miette::Result<ExitCode> {
    let r = ObjectRef::new(Kind::Snapshot, name);
    let acted = |states: &crate::client::States| {
        let o = match states.get(&r) {
            Some(Some(o)) => o,
            Some(None) => return Some(Err("the snapshot was deleted".to_owned())),
            None => return None,
        };
        let s = Snapshot::from_object(o).ok()?;
        let st = s.status?;
        if st.observed_generation < generation || st.restored_token.as_deref() != Some(token) {
            return None;
        }
        let c = st.conditions.into_iter().find(|c| c.type_ == "Restored")?;
        Some(match c.status {
            vmctl_api::ConditionStatus::True => Ok(()),
            _ => Err(c.message),
        })
    };
    match client.await_condition(std::slice::from_ref(&r), acted, Some(timeout))? {
        Awaited::Done(Ok(())) => {
            eprintln!("vm/{vm} restored to snapshot/{name}");
            Ok(ExitCode::SUCCESS)
        }
        Awaited::Done(Err(why)) => Err(crate::diag::error_help(
            "vmctl::snapshot::restore_failed",
            format!("run `vmctl describe snapshot {name}` and `vmctl describe vm {vm}`"),
            format!("restore of vm/{vm} to snapshot/{name} failed: {why}"),
        )),
        Awaited::TimedOut(_) => Err(crate::diag::error_help(
            "vmctl::apply::timeout",
            "raise --timeout, or run `vmctl describe snapshot NAME`",
            format!(
                "timed out after {}s waiting for the restore of vm/{vm} to snapshot/{name}",
                timeout.as_secs()
            ),
        )),
    }
}

fn delete(g: &Globals, name: &str, wait: Option<Duration>) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    match client.delete(Kind::Snapshot, name) {
        Err(e) if e.is_not_found() => return Err(crate::diag::not_found(Kind::Snapshot, name)),
        r => {
            r?;
        }
    }
    eprintln!("snapshot/{name} deletion requested");
    if let Some(timeout) = wait {
        if !super::objects::wait_gone(&client, Kind::Snapshot, name, timeout)? {
            return Err(crate::diag::error_help(
                "vmctl::apply::timeout",
                format!("raise --timeout, or run `vmctl describe snapshot {name}`"),
                format!("snapshot/{name} still exists after {}s", timeout.as_secs()),
            ));
        }
        eprintln!("snapshot/{name} deleted");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn a_generated_name_is_a_dns_label_even_for_the_longest_vm_name() {
        let t = chrono::Utc.with_ymd_and_hms(2026, 12, 1, 3, 4, 5).unwrap();
        assert_eq!(generated_name("web", t, 1), "web-20261201-030405");
        assert_eq!(generated_name("web", t, 2), "web-20261201-030405-2");
        let long = "a".repeat(40) + "-" + &"b".repeat(22);
        for attempt in [1, 2, NAME_ATTEMPTS] {
            let n = generated_name(&long, t, attempt);
            assert!(n.len() <= 63, "{n}");
            assert!(vmctl_api::names::check_name(&n).is_ok(), "{n}");
        }
        // The VM's part is cut where a '-' would end it.
        let dashed = "a".repeat(43) + "-b";
        let n = generated_name(&dashed, t, 10);
        assert_eq!(n, "a".repeat(43) + "-20261201-030405-10");
    }
}
