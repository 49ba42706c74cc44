//! `vmctl delete KIND NAME | -f FILE`.
//!
//! An object that something outside the deletion still uses is kept and
//! reported with its users: an Image that a VM of another file boots
//! from, a VM that a Provision of another file runs on. (The Image's
//! finalizer would keep it anyway, Terminating until its users go; keeping
//! it untouched says so at once and lets `--wait` finish.) `--wait` waits
//! only for what was deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;

use vmctl_api::{Kind, Object, ObjectRef};

use super::{Globals, kind_arg, name_arg_of};
use crate::client::{Awaited, Client};
use crate::output::print;

/// The objects `o` depends on: its Image for a VM, its VM for a Provision.
fn dependencies(o: &Object) -> Vec<ObjectRef> {
    let field = |f: &str| o.spec.get(f).and_then(|v| v.as_str()).map(str::to_owned);
    match o.kind {
        Kind::VirtualMachine => field("image")
            .map(|i| ObjectRef::new(Kind::Image, i))
            .into_iter()
            .collect(),
        Kind::Provision => field("vm")
            .map(|v| ObjectRef::new(Kind::VirtualMachine, v))
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// Live users of each of `targets` that are not themselves being deleted
/// (now, or by this command).
fn outside_users(
    client: &Client,
    targets: &[ObjectRef],
) -> miette::Result<BTreeMap<ObjectRef, Vec<ObjectRef>>> {
    let deleting: BTreeSet<&ObjectRef> = targets.iter().collect();
    let mut users: BTreeMap<ObjectRef, Vec<ObjectRef>> = BTreeMap::new();
    // Only kinds that can use another object need listing.
    for kind in [Kind::VirtualMachine, Kind::Provision] {
        if !targets.iter().any(|t| {
            matches!(
                (kind, t.kind),
                (Kind::VirtualMachine, Kind::Image) | (Kind::Provision, Kind::VirtualMachine)
            )
        }) {
            continue;
        }
        let list = client.list(Some(kind), &[])?;
        for o in list.items {
            let me = o.object_ref();
            if deleting.contains(&me) || o.metadata.deletion_timestamp.is_some() {
                continue;
            }
            for dep in dependencies(&o) {
                if deleting.contains(&dep) {
                    users.entry(dep).or_default().push(me.clone());
                }
            }
        }
    }
    Ok(users)
}

/// Requests deletion; objects with finalizers go once controllers clean up.
pub fn run(
    g: &Globals,
    kind: Option<&str>,
    name: Option<&str>,
    file: Option<&Path>,
    wait: Option<std::time::Duration>,
) -> miette::Result<ExitCode> {
    let from_file = file.is_some();
    let refs: Vec<ObjectRef> = match (kind, name, file) {
        (_, _, Some(f)) => match super::load_or_report(f)? {
            Ok(l) => l
                .resources
                .iter()
                .rev()
                .map(|r| ObjectRef::new(r.kind(), r.name()))
                .collect(),
            Err(code) => return Ok(code),
        },
        (Some(k), Some(n), None) => {
            let kind = kind_arg(k)?;
            name_arg_of(kind, n)?;
            vec![ObjectRef::new(kind, n)]
        }
        _ => {
            return Err(miette::miette!(
                code = "vmctl::cli::usage",
                help = "write `vmctl delete vm NAME` or `vmctl delete -f VMFile.kdl`",
                "delete needs a kind and a name, or -f FILE"
            ));
        }
    };
    let client = g.client()?;
    let users = outside_users(&client, &refs)?;
    let mut out = String::new();
    let mut deleted = Vec::new();
    for r in &refs {
        if let Some(u) = users.get(r) {
            let names: Vec<String> = u.iter().map(ToString::to_string).collect();
            out.push_str(&format!("{r} kept: used by {}\n", names.join(", ")));
            continue;
        }
        let gone = match client.delete(r.kind, &r.name) {
            // Deleting what a file defines: what is not there is done.
            Err(e) if e.is_not_found() && from_file => {
                out.push_str(&format!("{r} not found\n"));
                continue;
            }
            Err(e) if e.is_not_found() => {
                return Err(crate::diag::not_found(r.kind, &r.name));
            }
            res => res?,
        };
        let what = if gone.is_some() {
            "deletion requested"
        } else {
            "deleted"
        };
        out.push_str(&format!("{r} {what}\n"));
        deleted.push(r.clone());
    }
    print(&out)?;
    if !users.is_empty() {
        eprintln!("objects still in use were kept; delete their users first to delete them");
    }
    if let Some(timeout) = wait {
        wait_deleted(&client, &deleted, timeout)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits (watching) until every one of `deleted` is gone, saying so for
/// each as it goes; on timeout names what is left and its finalizers.
fn wait_deleted(
    client: &Client,
    deleted: &[ObjectRef],
    timeout: std::time::Duration,
) -> miette::Result<()> {
    let mut reported = BTreeSet::new();
    let all_gone = |states: &crate::client::States| {
        for (r, o) in states {
            if o.is_none() && reported.insert(r.clone()) {
                eprintln!("{r} gone");
            }
        }
        states.values().all(Option::is_none).then_some(())
    };
    match client.await_condition(deleted, all_gone, Some(timeout))? {
        Awaited::Done(()) => Ok(()),
        Awaited::TimedOut(states) => {
            let left: Vec<String> = states
                .iter()
                .filter_map(|(r, o)| {
                    o.as_ref()
                        .map(|o| format!("{r} (finalizers: {})", o.metadata.finalizers.join(", ")))
                })
                .collect();
            let first = states.iter().find(|(_, o)| o.is_some()).map(|(r, _)| r);
            Err(miette::miette!(
                code = "vmctl::delete::timeout",
                help = first.map_or_else(String::new, |r| format!(
                    "run `vmctl describe {} {}`: its finalizers have not run",
                    r.kind.short(),
                    r.name
                )),
                "still there after {}s: {}",
                timeout.as_secs(),
                left.join("; ")
            ))
        }
    }
}
