//! Reading and applying objects: the one way every command builds an
//! apply request, and the one way a command changes a live object's spec.

use std::path::Path;
use std::time::Duration;

use vmctl_api::wire::{ApplyRequest, ApplyResponse, ApplyResult};
use vmctl_api::{ApplySource, Kind, Object, ObjectRef};

use crate::client::{Awaited, Client, ClientError};

/// GETs one object; a missing one is the kind's `…::not_found` error.
pub(crate) fn get_object(client: &Client, kind: Kind, name: &str) -> miette::Result<Object> {
    match client.get(kind, name) {
        Err(e) if e.is_not_found() => Err(crate::diag::not_found(kind, name)),
        r => Ok(r?),
    }
}

/// Waits (watching) until `kind/name` no longer exists (its finalizers
/// have run); false if it still exists after `timeout`.
pub(crate) fn wait_gone(
    client: &Client,
    kind: Kind,
    name: &str,
    timeout: Duration,
) -> miette::Result<bool> {
    let refs = [ObjectRef::new(kind, name)];
    let gone = client.await_condition(
        &refs,
        |states| states.values().all(Option::is_none).then_some(()),
        Some(timeout),
    )?;
    Ok(matches!(gone, Awaited::Done(())))
}

/// Whether the object exists.
pub(crate) fn exists(client: &Client, kind: Kind, name: &str) -> miette::Result<bool> {
    Ok(client.get_opt(kind, name)?.is_some())
}

/// An apply request recording `file` (made absolute; `-` is none) and
/// "USER via vmctl VERB" as its source.
pub(crate) fn apply_request(
    objects: Vec<Object>,
    file: Option<&Path>,
    verb: &str,
    dry_run: bool,
    prune: bool,
) -> ApplyRequest {
    let file = file
        .filter(|f| *f != Path::new("-"))
        .and_then(|f| std::path::absolute(f).ok())
        .map(|p| p.display().to_string());
    request_with_source(objects, file, verb, dry_run, prune)
}

fn request_with_source(
    objects: Vec<Object>,
    file: Option<String>,
    verb: &str,
    dry_run: bool,
    prune: bool,
) -> ApplyRequest {
    let user = actor(|k| std::env::var(k).ok(), nix::unistd::getuid());
    ApplyRequest {
        objects,
        source: Some(ApplySource {
            file,
            applied_by: Some(format!("{user} via vmctl {verb}")),
        }),
        dry_run,
        prune,
        create_only: false,
    }
}

/// Who runs this command, for the history ("USER via vmctl VERB"):
/// `$USER`, else `$LOGNAME`, else the name of `uid` in the user database,
/// else `uid N`. Found as: `vmctl history` said "by unknown via vmctl
/// stop" from a shell without USER (a container's `exec`, a service).
fn actor(var: impl Fn(&str) -> Option<String>, uid: nix::unistd::Uid) -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(var)
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// Sends an apply request; fails unless every object is acknowledged.
pub(crate) fn apply(client: &Client, req: &ApplyRequest) -> miette::Result<ApplyResponse> {
    let resp = client.apply(req)?;
    super::apply::check_acknowledged(req, &resp)?;
    Ok(resp)
}

/// GETs an object, changes its spec with `edit` and re-applies it, keeping
/// the file it was applied from (so `apply --prune` still owns it) and
/// recording "USER via vmctl VERB". Returns the result (with the new
/// generation).
///
/// The write carries the resourceVersion read, so a concurrent change is a
/// conflict, never overwritten: when only the status moved on (controllers
/// write it all the time) the edit is applied again to the fresh object;
/// when the spec changed, the conflict is the answer.
pub(crate) fn edit_spec(
    client: &Client,
    kind: Kind,
    name: &str,
    verb: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> miette::Result<ApplyResult> {
    let mut obj = get_object(client, kind, name)?;
    let read_spec = obj.spec.clone();
    edit(&mut obj.spec);
    let edited = obj.spec.clone();
    let mut attempts = 0;
    let resp = loop {
        attempts += 1;
        let file = obj.metadata.source.as_ref().and_then(|s| s.file.clone());
        let req = request_with_source(vec![obj], file, verb, false, false);
        match client.apply(&req) {
            Err(e @ ClientError::Api { status: 409, .. }) if attempts < 5 => {
                obj = get_object(client, kind, name)?;
                if obj.spec != read_spec {
                    // Someone else changed the spec: never write over it
                    // unseen.
                    return Err(e.into());
                }
                obj.spec = edited.clone();
            }
            r => {
                let resp = r?;
                super::apply::check_acknowledged(&req, &resp)?;
                break resp;
            }
        }
    };
    resp.results.into_iter().next().ok_or_else(|| {
        crate::diag::error(
            "vmctl::agent::protocol",
            format!("the agent applied nothing for {}/{name}", kind.short()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16 fault (e): "by unknown via vmctl stop" without `$USER`.
    #[test]
    fn the_actor_of_a_change_is_known_without_user_in_the_environment() {
        let root = nix::unistd::Uid::from_raw(0);
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            actor(env(&[("USER", "alice"), ("LOGNAME", "bob")]), root),
            "alice"
        );
        assert_eq!(actor(env(&[("USER", ""), ("LOGNAME", "bob")]), root), "bob");
        // Neither: the user database (root is in every one).
        assert_eq!(actor(env(&[]), root), "root");
        let nobody = nix::unistd::Uid::from_raw(4_000_000_000);
        assert_eq!(actor(env(&[]), nobody), "uid 4000000000");
    }
}
