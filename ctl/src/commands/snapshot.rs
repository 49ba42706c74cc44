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

/// `VM-YYYYMMDD-HHMMSS` (UTC), the VM's part shortened so the whole is
/// a DNS label (63 characters at most).
pub(crate) fn generated_name(vm: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let stamp = now.format("%Y%m%d-%H%M%S").to_string();
    let keep = 63 - stamp.len() - 1;
    let head: String = vm.chars().take(keep).collect();
    format!("{}-{stamp}", head.trim_end_matches('-'))
}

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
    let name = match name {
        Some(n) => {
            if super::objects::exists(&client, Kind::Snapshot, &n)? {
                return Err(crate::diag::error_help(
                    "vmctl::snapshot::exists",
                    "pick another name, or leave it out for a generated one",
                    format!("snapshot {n} exists already"),
                ));
            }
            n
        }
        None => {
            // Two snapshots within one second: the next free suffix.
            let base = generated_name(vm, chrono::Utc::now());
            let mut n = base.clone();
            let mut i = 2;
            while super::objects::exists(&client, Kind::Snapshot, &n)? {
                n = format!("{base}-{i}");
                i += 1;
            }
            n
        }
    };
    let snap = Snapshot::new(
        name.clone(),
        SnapshotSpec {
            vm: vm.to_owned(),
            restore_token: None,
        },
    );
    let req = super::objects::apply_request(
        vec![snap.to_object()],
        None,
        "snapshot create",
        false,
        false,
    );
    super::objects::apply(&client, &req)?;
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
        assert_eq!(generated_name("web", t), "web-20261201-030405");
        let long = "a".repeat(40) + "-" + &"b".repeat(22);
        let n = generated_name(&long, t);
        assert!(n.len() <= 63, "{n}");
        assert!(vmctl_api::names::check_name(&n).is_ok(), "{n}");
    }
}
