//! The action layer: what the API's writes do, callable without HTTP.
//! Apply (validation first, dry runs, prune, imperative fields kept, user
//! finalizers), delete and finalizer patches live here; the HTTP handlers
//! in [`crate::api`] only decode requests, call one action and map its
//! [`ActionError`] to a status with one explicit `match`.
//!
//! ```text
//!  HTTP ──▶ api (decode, map errors) ──▶ actions (plan, refuse, write) ──▶ Store
//!  tests / other transports ───────────────────┘
//! ```
//!
//! Every refusal happens before anything is written: a request is valid
//! and current as a whole, or it changes nothing.

use std::collections::HashSet;

use vmctl_api::validate::Backend;
use vmctl_api::wire::{ApplyOutcome, ApplyRequest, ApplyResponse, ApplyResult};
use vmctl_api::{ApplySource, Kind, Object, ObjectRef, Resource};
use vmctl_store::{Outcome, Store, StoreError};

use crate::finalizers::{self, FinalizerError, PatchRequest};

/// Why an action refused a request or failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// `objects[index]` does not decode as a resource of its kind.
    #[error("objects[{index}] ({object}): {reason}")]
    Malformed {
        /// Position in the request.
        index: usize,
        /// The object.
        object: ObjectRef,
        /// The decoder's message (names the field).
        reason: String,
    },
    /// `objects[index]` breaks a validation rule (`vmctl validate`'s).
    #[error("objects[{index}] ({object}) is invalid: {}", errors.join("; "))]
    Invalid {
        /// Position in the request.
        index: usize,
        /// The object.
        object: ObjectRef,
        /// Each broken rule as `path: message`.
        errors: Vec<String>,
    },
    /// The request's resourceVersion of an object is not the stored one.
    #[error(
        "{object} was changed since it was read: the request has resourceVersion {given}, {}; nothing was written",
        if *actual == 0 { "it does not exist".to_owned() } else { format!("it is at {actual} now") }
    )]
    Stale {
        /// The object.
        object: ObjectRef,
        /// The resourceVersion the request gave.
        given: u64,
        /// The stored one (0: the object does not exist).
        actual: u64,
    },
    /// A create-only request names an object that exists.
    #[error("{object} exists already; nothing was written")]
    AlreadyExists {
        /// The object.
        object: ObjectRef,
    },
    /// A Snapshot cannot be applied as asked (its VM is missing or being
    /// deleted, a restore that cannot happen now, …).
    #[error("{object}: {reason}; nothing was written")]
    Snapshot {
        /// The Snapshot.
        object: ObjectRef,
        /// Why.
        reason: crate::snapshots::SnapshotRefusal,
    },
    /// A Node that is Ready was to be deleted: its agent runs and would
    /// register it again at once.
    #[error(
        "Node {node} is Ready (its agent posts its status{}); nothing was deleted",
        heartbeat.map(|t| format!(", last at {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))).unwrap_or_default()
    )]
    NodeReady {
        /// The Node's name.
        node: String,
        /// Its last heartbeat.
        heartbeat: Option<vmctl_api::Time>,
    },
    /// A finalizer change was refused (bad name, protected, absent).
    #[error(transparent)]
    Finalizer(#[from] FinalizerError),
    /// The store failed or refused (not found, unavailable, full, …).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The result of an action.
pub type ActionResult<T> = Result<T, ActionError>;

/// Spec fields that only imperative commands write (`vmctl provision`'s
/// `runToken`, `vmctl snapshot restore`'s `restoreToken`): a file never has them, so an apply that omits one keeps
/// the stored value instead of counting its removal as a change (which
/// would run the provisioners again).
pub const IMPERATIVE_FIELDS: &[(Kind, &str)] = &[
    (Kind::Provision, "runToken"),
    (Kind::Snapshot, vmctl_api::snapshot::RESTORE_TOKEN_FIELD),
];

/// Writers that apply one request's objects at once. Each write waits for
/// its commit (sled: its fsync, shared by concurrent writers; etcd: a
/// quorum round trip), so a 10,000-object apply takes a fraction of the
/// time of one-by-one writes.
const APPLY_WRITERS: usize = 8;

/// Applies a request: validates every object (for `backend` too, when
/// the agent's driver is one), checks every given
/// resourceVersion and finalizer name, then writes the objects in order
/// (or, with `dry_run`, only computes what a write would do) and, with
/// `prune`, requests deletion of the objects applied earlier from the same
/// source file that the request no longer has. With `create_only` every
/// object must be new: each write expects the object absent, so of two
/// concurrent creates of one name exactly one succeeds.
///
/// Results: one per object in request order, then one per pruned object.
///
/// # Errors
/// [`ActionError::Malformed`] / [`ActionError::Invalid`] /
/// [`ActionError::Stale`] / [`ActionError::AlreadyExists`] /
/// [`ActionError::Finalizer`] / [`ActionError::Snapshot`] before anything
/// is written (`AlreadyExists` also when a create-only write finds the
/// object made meanwhile); [`ActionError::Store`] when the store fails (a large request
/// may then be partly written, each object whole).
pub async fn apply(
    store: &dyn Store,
    backend: Option<Backend>,
    req: ApplyRequest,
) -> ActionResult<ApplyResponse> {
    validate_objects(&req.objects, backend)?;
    for obj in &req.objects {
        if req.create_only && store.get(&obj.object_ref()).await?.is_some() {
            return Err(ActionError::AlreadyExists {
                object: obj.object_ref(),
            });
        }
        let rv = obj.metadata.resource_version;
        if rv != 0 {
            let object = obj.object_ref();
            let actual = store
                .get(&object)
                .await?
                .map_or(0, |o| o.metadata.resource_version);
            if actual != rv {
                return Err(ActionError::Stale {
                    object,
                    given: rv,
                    actual,
                });
            }
        }
        if let Some(e) = obj
            .metadata
            .finalizers
            .iter()
            .find_map(|f| finalizers::check_name(f).err())
        {
            return Err(e.into());
        }
    }
    crate::snapshots::check(store, &req.objects).await?;
    let wanted: HashSet<ObjectRef> = req.objects.iter().map(Object::object_ref).collect();
    let distinct = wanted.len() == req.objects.len();
    let mode = Mode {
        dry_run: req.dry_run,
        create_only: req.create_only,
    };
    let mut results = apply_all(store, req.objects, &req.source, mode, distinct).await?;
    let source_file = req.source.as_ref().and_then(|s| s.file.as_deref());
    if let (true, Some(file)) = (req.prune, source_file) {
        results.extend(prune(store, file, &wanted, req.dry_run).await?);
    }
    Ok(ApplyResponse { results })
}

/// Validates every object before any is written, so a bad request changes
/// nothing: the rules of `vmctl validate`, and what `backend` (the agent's
/// driver) cannot run ([`vmctl_api::validate::for_backend`]).
fn validate_objects(objects: &[Object], backend: Option<Backend>) -> ActionResult<()> {
    for (index, obj) in objects.iter().enumerate() {
        // Refused whatever its fields, with validation's reason.
        if obj.kind == Kind::Node {
            let node = Resource::Node(vmctl_api::Node::new(obj.name(), Default::default()));
            return Err(ActionError::Invalid {
                index,
                object: obj.object_ref(),
                errors: vmctl_api::validate::validate(&node)
                    .into_iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
                    .collect(),
            });
        }
        let res = Resource::from_object(obj).map_err(|e| ActionError::Malformed {
            index,
            object: obj.object_ref(),
            reason: e.to_string(),
        })?;
        let for_backend = backend
            .map(|b| vmctl_api::validate::for_backend(&res, b))
            .unwrap_or_default();
        let errors: Vec<String> = vmctl_api::validate::validate(&res)
            .into_iter()
            .chain(for_backend)
            .filter(|e| e.severity == vmctl_api::validate::Severity::Error)
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        if !errors.is_empty() {
            return Err(ActionError::Invalid {
                index,
                object: obj.object_ref(),
                errors,
            });
        }
    }
    Ok(())
}

/// Requests deletion of the objects from `file` that are not `wanted`
/// and not being deleted already (only reports them in a dry run).
async fn prune(
    store: &dyn Store,
    file: &str,
    wanted: &HashSet<ObjectRef>,
    dry_run: bool,
) -> ActionResult<Vec<ApplyResult>> {
    let mut pruned = Vec::new();
    for obj in store.list(None).await?.objects {
        let same_source =
            obj.metadata.source.as_ref().and_then(|s| s.file.as_deref()) == Some(file);
        let r = obj.object_ref();
        if same_source && !wanted.contains(&r) && obj.metadata.deletion_timestamp.is_none() {
            if !dry_run {
                store.request_delete(&r, None).await?;
            }
            pruned.push(ApplyResult {
                object: r,
                outcome: ApplyOutcome::Pruned,
                generation: obj.metadata.generation,
                resource_version: obj.metadata.resource_version,
            });
        }
    }
    Ok(pruned)
}

/// How the objects of a request are written.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Only compute what a write would do.
    dry_run: bool,
    /// Write only objects that do not exist.
    create_only: bool,
}

/// Applies `objects` and returns their results in request order: in
/// [`APPLY_WRITERS`] ordered chunks at once when the request is large and
/// names every object once (a name given twice is applied in order).
async fn apply_all(
    store: &dyn Store,
    objects: Vec<Object>,
    source: &Option<ApplySource>,
    mode: Mode,
    distinct: bool,
) -> ActionResult<Vec<ApplyResult>> {
    let chunk = objects.len().div_ceil(APPLY_WRITERS).max(1);
    if !distinct || objects.len() < 4 * APPLY_WRITERS {
        return apply_chunk(store, objects, source, mode).await;
    }
    let mut chunks = Vec::new();
    let mut rest = objects;
    while rest.len() > chunk {
        let tail = rest.split_off(chunk);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    // The chunks run concurrently on this task: each awaits its own writes.
    let writers = chunks
        .into_iter()
        .map(|c| apply_chunk(store, c, source, mode));
    let mut all = Vec::new();
    for w in futures::future::join_all(writers).await {
        all.extend(w?);
    }
    Ok(all)
}

/// Applies `objects` one after the other; stops at the first error.
async fn apply_chunk(
    store: &dyn Store,
    objects: Vec<Object>,
    source: &Option<ApplySource>,
    mode: Mode,
) -> ActionResult<Vec<ApplyResult>> {
    let mut out = Vec::with_capacity(objects.len());
    for obj in objects {
        out.push(apply_one(store, obj, source, mode).await?);
    }
    Ok(out)
}

/// Copies the stored values of [`IMPERATIVE_FIELDS`] that `obj` omits.
async fn keep_imperative_fields(store: &dyn Store, obj: &mut Object) -> ActionResult<()> {
    let fields: Vec<&str> = IMPERATIVE_FIELDS
        .iter()
        .filter(|(k, _)| *k == obj.kind)
        .map(|(_, f)| *f)
        .collect();
    if fields.is_empty() || fields.iter().all(|f| obj.spec.get(*f).is_some()) {
        return Ok(());
    }
    let Some(cur) = store.get(&obj.object_ref()).await? else {
        return Ok(());
    };
    for f in fields {
        if obj.spec.get(f).is_none()
            && let (Some(v), Some(spec)) = (cur.spec.get(f), obj.spec.as_object_mut())
        {
            spec.insert(f.to_owned(), v.clone());
        }
    }
    Ok(())
}

/// Applies one object: its spec, labels and annotations, then its user
/// finalizers (see [`finalizers`]); a dry run only reads. A create-only
/// write expects the object absent (the store checks it in the write).
async fn apply_one(
    store: &dyn Store,
    mut obj: Object,
    source: &Option<ApplySource>,
    mode: Mode,
) -> ActionResult<ApplyResult> {
    obj.status = None;
    let r = obj.object_ref();
    let given_rv = if mode.create_only {
        Some(0)
    } else {
        Some(obj.metadata.resource_version).filter(|rv| *rv != 0)
    };
    let applied_finalizers = std::mem::take(&mut obj.metadata.finalizers);
    // On create the store keeps these (with the controller's own of the
    // kind); on update it ignores them and `edit_finalizers` below
    // reconciles them.
    obj.metadata.finalizers = finalizers::on_create(obj.kind, &applied_finalizers);
    keep_imperative_fields(store, &mut obj).await?;
    if mode.dry_run {
        let outcome = match store.get(&r).await? {
            None => ApplyOutcome::Created,
            Some(cur)
                if cur.spec == obj.spec
                    && cur.metadata.labels == obj.metadata.labels
                    && finalizers::after_apply(&cur.metadata.finalizers, &applied_finalizers)
                        == cur.metadata.finalizers =>
            {
                ApplyOutcome::Unchanged
            }
            Some(_) => ApplyOutcome::Configured,
        };
        return Ok(ApplyResult {
            object: r,
            outcome,
            generation: 0,
            resource_version: 0,
        });
    }
    let w = store
        .apply(obj, source.clone(), given_rv)
        .await
        .map_err(stale_or_store)?;
    let mut outcome = match w.outcome {
        Outcome::Created => ApplyOutcome::Created,
        Outcome::Unchanged => ApplyOutcome::Unchanged,
        _ => ApplyOutcome::Configured,
    };
    let mut written = w.object;
    if let Some(cur) = written.as_ref().filter(|_| w.outcome != Outcome::Created)
        && finalizers::after_apply(&cur.metadata.finalizers, &applied_finalizers)
            != cur.metadata.finalizers
    {
        let rv = Some(cur.metadata.resource_version).filter(|_| given_rv.is_some());
        written = edit_finalizers(store, &r, rv, |f| {
            Ok(finalizers::after_apply(f, &applied_finalizers))
        })
        .await?;
        if outcome == ApplyOutcome::Unchanged {
            outcome = ApplyOutcome::Configured;
        }
    }
    let (generation, resource_version) = written
        .as_ref()
        .map(|o| (o.metadata.generation, o.metadata.resource_version))
        .unwrap_or((0, 0));
    Ok(ApplyResult {
        object: r,
        outcome,
        generation,
        resource_version,
    })
}

/// A store conflict is a stale request (or, when the write expected no
/// object, one that exists); other store errors stay so.
fn stale_or_store(e: StoreError) -> ActionError {
    match e {
        StoreError::Conflict {
            object,
            expected: 0,
            ..
        } => ActionError::AlreadyExists { object },
        StoreError::Conflict {
            object,
            expected,
            actual,
        } => ActionError::Stale {
            object,
            given: expected,
            actual,
        },
        e => ActionError::Store(e),
    }
}

/// Requests deletion of `r`: it goes once its finalizers are cleared.
/// Returns the object while it waits for them, `None` once it is gone.
/// A Node only when it is not Ready (its agent stopped or is cut off).
///
/// # Errors
/// [`ActionError::NodeReady`] for a Ready Node; [`ActionError::Store`]
/// (`NotFound` when there is no such object).
pub async fn delete(store: &dyn Store, r: &ObjectRef) -> ActionResult<Option<Object>> {
    if r.kind != Kind::Node {
        return Ok(store.request_delete(r, None).await?.object);
    }
    // Checked and deleted at one resourceVersion: a heartbeat that makes
    // it Ready in between is a conflict, and the check is made again.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let cur = store
            .get(r)
            .await?
            .ok_or_else(|| StoreError::NotFound(r.clone()))?;
        let status: vmctl_api::NodeStatus = cur
            .status
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        if status.is_ready() {
            return Err(ActionError::NodeReady {
                node: r.name.clone(),
                heartbeat: status.last_heartbeat_time,
            });
        }
        match store
            .request_delete(r, Some(cur.metadata.resource_version))
            .await
        {
            Ok(w) => return Ok(w.object),
            Err(StoreError::Conflict { .. }) if attempts < 5 => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Adds and removes finalizers of `r` as `patch` says (those under
/// `vmctl.dev/` only with `force`); removing the last one of an object
/// being deleted deletes it. Returns the object after the change, `None`
/// once it is gone.
///
/// # Errors
/// [`ActionError::Finalizer`] for a bad, protected or absent name,
/// [`ActionError::Stale`] when `patch.resource_version` is not current,
/// [`ActionError::Store`] (`NotFound` when there is no such object).
pub async fn patch(
    store: &dyn Store,
    r: &ObjectRef,
    patch: &PatchRequest,
) -> ActionResult<Option<Object>> {
    edit_finalizers(store, r, patch.resource_version, |cur| {
        finalizers::after_patch(cur, patch)
    })
    .await
}

/// Replaces `r`'s finalizers with `plan(current)`. With `expected` a moved
/// object is a conflict; without, a conflicting concurrent write (a
/// controller's) is read again and the plan redone, a few times.
/// Returns the object after the write (`None` once it is deleted).
async fn edit_finalizers(
    store: &dyn Store,
    r: &ObjectRef,
    expected: Option<u64>,
    plan: impl Fn(&[String]) -> Result<Vec<String>, FinalizerError>,
) -> ActionResult<Option<Object>> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let cur = store
            .get(r)
            .await?
            .ok_or_else(|| StoreError::NotFound(r.clone()))?;
        let rv = cur.metadata.resource_version;
        if let Some(given) = expected.filter(|given| *given != rv) {
            return Err(ActionError::Stale {
                object: r.clone(),
                given,
                actual: rv,
            });
        }
        let want = plan(&cur.metadata.finalizers)?;
        if want == cur.metadata.finalizers {
            return Ok(Some(cur));
        }
        match store.set_finalizers(r, want, Some(rv)).await {
            Ok(w) => return Ok(w.object),
            Err(StoreError::Conflict { .. }) if expected.is_none() && attempts < 5 => {}
            Err(e) => return Err(stale_or_store(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use vmctl_store::SledStore;

    use super::*;

    /// A real sled store, seen as the trait (its inherent methods are sync).
    fn store() -> (tempfile::TempDir, Box<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path().join("db")).unwrap();
        (dir, Box::new(store))
    }

    fn image(name: &str, url: &str) -> Object {
        serde_json::from_value(json!({"apiVersion": "vmctl/v1alpha1", "kind": "Image",
            "metadata": {"name": name}, "spec": {"source": {"url": url}}}))
        .unwrap()
    }

    fn provision(name: &str, spec: Value) -> Object {
        serde_json::from_value(json!({"apiVersion": "vmctl/v1alpha1", "kind": "Provision",
            "metadata": {"name": name}, "spec": spec}))
        .unwrap()
    }

    fn request(objects: Vec<Object>, file: Option<&str>) -> ApplyRequest {
        ApplyRequest {
            objects,
            source: file.map(|f| ApplySource {
                file: Some(f.to_owned()),
                ..Default::default()
            }),
            dry_run: false,
            prune: false,
            create_only: false,
        }
    }

    fn outcomes(resp: &ApplyResponse) -> Vec<(String, ApplyOutcome)> {
        resp.results
            .iter()
            .map(|r| (r.object.to_string(), r.outcome))
            .collect()
    }

    #[tokio::test]
    async fn apply_refuses_an_invalid_object_before_writing_any() {
        let (_dir, store) = store();
        let req = request(
            vec![
                image("good", "https://e.com/a.img"),
                image("bad", "ftp://nope"),
            ],
            None,
        );
        let err = apply(&*store, None, req).await.unwrap_err();
        assert!(
            matches!(&err, ActionError::Invalid { index: 1, object, .. } if object.name == "bad"),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("objects[1] (image/bad) is invalid: "),
            "{err}"
        );
        assert!(store.list(None).await.unwrap().objects.is_empty());
    }

    fn vm(name: &str, network: Value) -> Object {
        serde_json::from_value(
            json!({"apiVersion": "vmctl/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name}, "spec": {"image": "img", "network": network}}),
        )
        .unwrap()
    }

    /// The fault: `network "user"` applied to an agent on the Propolis
    /// driver was accepted and failed only when the driver planned the
    /// start. The agent's apply refuses what its backend cannot run, for
    /// every API client, before anything is written.
    #[tokio::test]
    async fn apply_refuses_a_network_the_agents_backend_cannot_run() {
        let (_dir, store) = store();
        let user = |n: &str| vm(n, json!({"mode": "user"}));
        let vnic = |n: &str| vm(n, json!({"mode": "vnic", "name": "vnic0"}));
        for (backend, bad, good) in [
            (Backend::Propolis, &user("p-bad"), &vnic("p-good")),
            (Backend::Qemu, &vnic("q-bad"), &user("q-good")),
        ] {
            let req = request(vec![good.clone(), bad.clone()], None);
            let err = apply(&*store, Some(backend), req).await.unwrap_err();
            let ActionError::Invalid { index, errors, .. } = &err else {
                panic!("{err}");
            };
            assert_eq!(*index, 1, "{err}");
            assert!(errors[0].starts_with("spec.network: network `"), "{err}");
            assert!(errors[0].contains(backend.as_str()), "{err}");
            for o in [good, bad] {
                let absent = store.get(&o.object_ref()).await.unwrap().is_none();
                assert!(absent, "nothing of a refused request is written");
            }
            apply(&*store, Some(backend), request(vec![good.clone()], None))
                .await
                .unwrap();
        }
        // The fake driver runs anything.
        apply(&*store, None, request(vec![user("f-u"), vnic("f-v")], None))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dry_run_reports_each_outcome_and_writes_nothing() {
        let (_dir, store) = store();
        let req = request(
            vec![
                image("same", "https://e.com/a.img"),
                image("moved", "https://e.com/b.img"),
            ],
            None,
        );
        apply(&*store, None, req).await.unwrap();
        let before = store.last_seq().await.unwrap();
        let mut req = request(
            vec![
                image("same", "https://e.com/a.img"),
                image("moved", "https://e.com/c.img"),
                image("new", "https://e.com/d.img"),
            ],
            None,
        );
        req.dry_run = true;
        let resp = apply(&*store, None, req).await.unwrap();
        assert_eq!(
            outcomes(&resp),
            [
                ("image/same".to_owned(), ApplyOutcome::Unchanged),
                ("image/moved".to_owned(), ApplyOutcome::Configured),
                ("image/new".to_owned(), ApplyOutcome::Created),
            ]
        );
        assert_eq!(store.last_seq().await.unwrap(), before, "nothing written");
        assert!(
            store
                .get(&ObjectRef::new(Kind::Image, "new"))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn prune_deletes_what_the_same_file_no_longer_has_and_nothing_else() {
        let (_dir, store) = store();
        let two = vec![
            image("a", "https://e.com/a.img"),
            image("b", "https://e.com/b.img"),
        ];
        apply(&*store, None, request(two, Some("/f/VMFile")))
            .await
            .unwrap();
        let other = vec![image("c", "https://e.com/c.img")];
        apply(&*store, None, request(other, Some("/g/VMFile")))
            .await
            .unwrap();
        let mut req = request(vec![image("a", "https://e.com/a.img")], Some("/f/VMFile"));
        req.prune = true;
        req.dry_run = true;
        let resp = apply(&*store, None, req.clone()).await.unwrap();
        assert_eq!(
            outcomes(&resp)[1],
            ("image/b".to_owned(), ApplyOutcome::Pruned)
        );
        assert!(
            store
                .get(&ObjectRef::new(Kind::Image, "b"))
                .await
                .unwrap()
                .is_some()
        );
        req.dry_run = false;
        let resp = apply(&*store, None, req).await.unwrap();
        assert_eq!(
            outcomes(&resp),
            [
                ("image/a".to_owned(), ApplyOutcome::Unchanged),
                ("image/b".to_owned(), ApplyOutcome::Pruned),
            ]
        );
        let b = store.get(&ObjectRef::new(Kind::Image, "b")).await.unwrap();
        assert!(b.is_none_or(|b| b.metadata.deletion_timestamp.is_some()));
        assert!(
            store
                .get(&ObjectRef::new(Kind::Image, "c"))
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn an_apply_without_the_run_token_keeps_it_and_changes_nothing() {
        let (_dir, store) = store();
        let steps = json!([{"type": "shell", "inline": "true"}]);
        let with = provision("p", json!({"vm": "v", "steps": steps, "runToken": "7"}));
        apply(&*store, None, request(vec![with], None))
            .await
            .unwrap();
        let without = provision("p", json!({"vm": "v", "steps": steps}));
        let resp = apply(&*store, None, request(vec![without], None))
            .await
            .unwrap();
        assert_eq!(resp.results[0].outcome, ApplyOutcome::Unchanged);
        let p = store
            .get(&ObjectRef::new(Kind::Provision, "p"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.spec["runToken"], "7");
    }

    #[tokio::test]
    async fn a_stale_resource_version_is_refused_and_nothing_is_written() {
        let (_dir, store) = store();
        let resp = apply(
            &*store,
            None,
            request(vec![image("a", "https://e.com/a.img")], None),
        )
        .await
        .unwrap();
        let rv = resp.results[0].resource_version;
        apply(
            &*store,
            None,
            request(vec![image("a", "https://e.com/b.img")], None),
        )
        .await
        .unwrap();
        let mut old = image("a", "https://e.com/c.img");
        old.metadata.resource_version = rv;
        let before = store.last_seq().await.unwrap();
        let err = apply(
            &*store,
            None,
            request(vec![image("z", "https://e.com/z.img"), old], None),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, ActionError::Stale { given, actual, .. } if given == rv && actual > rv),
            "{err}"
        );
        assert_eq!(store.last_seq().await.unwrap(), before);
    }

    /// Issue 16 fault 3: two concurrent creates of one name both answered
    /// "created" (apply is create-or-update). A create-only request writes
    /// only an object that does not exist, checked in the write itself.
    #[tokio::test]
    async fn a_create_only_request_never_lands_on_an_existing_object() {
        let (_dir, store) = store();
        let create = |url: &str| ApplyRequest {
            create_only: true,
            ..request(vec![image("a", url)], None)
        };
        let (one, two) = tokio::join!(
            apply(&*store, None, create("https://e.com/1.img")),
            apply(&*store, None, create("https://e.com/2.img")),
        );
        let (won, lost) = match (one, two) {
            (Ok(w), Err(l)) => (w, l),
            (Err(l), Ok(w)) => (w, l),
            other => panic!("exactly one create must succeed: {other:?}"),
        };
        assert_eq!(won.results[0].outcome, ApplyOutcome::Created);
        assert!(
            matches!(&lost, ActionError::AlreadyExists { object } if object.name == "a"),
            "{lost}"
        );
        assert_eq!(
            lost.to_string(),
            "image/a exists already; nothing was written"
        );
        // Sequentially too, and nothing of the request is written.
        let before = store.last_seq().await.unwrap();
        let mut req = create("https://e.com/3.img");
        req.objects.insert(0, image("b", "https://e.com/b.img"));
        let err = apply(&*store, None, req).await.unwrap_err();
        assert!(matches!(err, ActionError::AlreadyExists { .. }), "{err}");
        assert_eq!(store.last_seq().await.unwrap(), before);
        assert_eq!(store.list(None).await.unwrap().objects.len(), 1);
    }

    #[tokio::test]
    async fn patch_edits_user_finalizers_and_delete_waits_for_them() {
        let (_dir, store) = store();
        apply(
            &*store,
            None,
            request(vec![image("a", "https://e.com/a.img")], None),
        )
        .await
        .unwrap();
        let r = ObjectRef::new(Kind::Image, "a");
        let add = PatchRequest {
            add_finalizers: vec!["example.com/hold".into()],
            ..Default::default()
        };
        let o = patch(&*store, &r, &add).await.unwrap().unwrap();
        assert!(
            o.metadata
                .finalizers
                .contains(&"example.com/hold".to_owned())
        );
        let protected = PatchRequest {
            remove_finalizers: vec!["vmctl.dev/image-cache".into()],
            ..Default::default()
        };
        let err = patch(&*store, &r, &protected).await.unwrap_err();
        assert!(
            matches!(err, ActionError::Finalizer(FinalizerError::Protected(_))),
            "{err}"
        );
        let waiting = delete(&*store, &r)
            .await
            .unwrap()
            .expect("held by its finalizer");
        assert!(waiting.metadata.deletion_timestamp.is_some());
        let remove = PatchRequest {
            remove_finalizers: vec!["example.com/hold".into()],
            ..Default::default()
        };
        let left = patch(&*store, &r, &remove).await.unwrap();
        if let Some(o) = left {
            assert!(
                !o.metadata
                    .finalizers
                    .contains(&"example.com/hold".to_owned())
            );
        }
        let gone = ObjectRef::new(Kind::Image, "nope");
        assert!(matches!(
            delete(&*store, &gone).await.unwrap_err(),
            ActionError::Store(StoreError::NotFound(_))
        ));
    }
}
