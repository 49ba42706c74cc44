//! Planning a write: from a request and the current object to the event to
//! append (or `None` when nothing would change).
//!
//! Pure functions, shared by every backend, so that what counts as a spec
//! change, a conflict or a deletion is decided in one place.

use vmctl_api::{ApplySource, Object, ObjectRef, Time};

use crate::error::{Result, StoreError};
use crate::event::Change;

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The object did not exist and was created.
    Created,
    /// The object's spec, labels, annotations or apply source changed.
    Configured,
    /// Nothing changed; no event was appended.
    Unchanged,
    /// The status or finalizers changed.
    Updated,
    /// Deletion was requested; the object waits for its finalizers.
    Terminating,
    /// The object is gone.
    Deleted,
}

/// A planned write: the change to append and how to report it.
pub(crate) type Plan = Option<(Change, Outcome)>;

/// Fails with [`StoreError::Conflict`] if `expected` is given and differs
/// from the current resourceVersion (0 when the object does not exist).
pub(crate) fn check_expected(
    r: &ObjectRef,
    prev: Option<&Object>,
    expected: Option<u64>,
) -> Result<()> {
    let actual = prev.map_or(0, |o| o.metadata.resource_version);
    match expected {
        Some(expected) if expected != actual => Err(StoreError::Conflict {
            object: r.clone(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

fn existing<'a>(r: &ObjectRef, prev: Option<&'a Object>) -> Result<&'a Object> {
    prev.ok_or_else(|| StoreError::NotFound(r.clone()))
}

/// Plans `apply`: create, or replace spec, labels, annotations and source.
pub(crate) fn apply(
    prev: Option<&Object>,
    desired: Object,
    source: Option<ApplySource>,
    expected: Option<u64>,
    now: Time,
) -> Result<Plan> {
    let r = desired.object_ref();
    if r.name.is_empty() {
        return Err(StoreError::Invalid("object has no name".into()));
    }
    check_expected(&r, prev, expected)?;
    let Some(prev) = prev else {
        let mut obj = desired;
        let m = &mut obj.metadata;
        m.uid = Some(uuid::Uuid::new_v4().to_string());
        m.generation = 1;
        m.resource_version = 0;
        m.creation_timestamp = Some(now);
        m.deletion_timestamp = None;
        m.source = source;
        obj.status = None;
        return Ok(Some((
            Change::Applied {
                created: true,
                object: Box::new(obj),
            },
            Outcome::Created,
        )));
    };
    let spec_changed = prev.spec != desired.spec;
    let meta_changed = prev.metadata.labels != desired.metadata.labels
        || prev.metadata.annotations != desired.metadata.annotations
        || prev.metadata.source != source
        || prev.api_version != desired.api_version;
    if !spec_changed && !meta_changed {
        return Ok(None);
    }
    let mut obj = prev.clone();
    obj.api_version = desired.api_version;
    obj.spec = desired.spec;
    obj.status = None;
    obj.metadata.labels = desired.metadata.labels;
    obj.metadata.annotations = desired.metadata.annotations;
    obj.metadata.source = source;
    if spec_changed {
        obj.metadata.generation += 1;
    }
    Ok(Some((
        Change::Applied {
            created: false,
            object: Box::new(obj),
        },
        Outcome::Configured,
    )))
}

/// Plans a status write; an identical status appends nothing.
pub(crate) fn update_status(
    r: &ObjectRef,
    prev: Option<&Object>,
    status: serde_json::Value,
    expected: Option<u64>,
) -> Result<Plan> {
    let prev = existing(r, prev)?;
    check_expected(r, Some(prev), expected)?;
    if prev.status.as_ref() == Some(&status) {
        return Ok(None);
    }
    Ok(Some((Change::StatusUpdated { status }, Outcome::Updated)))
}

/// Plans a finalizers write; clearing the last finalizer of an object being
/// deleted deletes it.
pub(crate) fn set_finalizers(
    r: &ObjectRef,
    prev: Option<&Object>,
    finalizers: Vec<String>,
    expected: Option<u64>,
) -> Result<Plan> {
    let prev = existing(r, prev)?;
    check_expected(r, Some(prev), expected)?;
    if prev.metadata.deletion_timestamp.is_some() && finalizers.is_empty() {
        return Ok(Some((Change::Deleted, Outcome::Deleted)));
    }
    if prev.metadata.finalizers == finalizers {
        return Ok(None);
    }
    Ok(Some((
        Change::FinalizersSet { finalizers },
        Outcome::Updated,
    )))
}

/// Plans a delete request: immediate without finalizers, else a deletion
/// timestamp. Asking again appends nothing.
pub(crate) fn request_delete(
    r: &ObjectRef,
    prev: Option<&Object>,
    expected: Option<u64>,
    now: Time,
) -> Result<Plan> {
    let prev = existing(r, prev)?;
    check_expected(r, Some(prev), expected)?;
    if prev.metadata.finalizers.is_empty() {
        return Ok(Some((Change::Deleted, Outcome::Deleted)));
    }
    if prev.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    Ok(Some((
        Change::DeletionRequested { at: now },
        Outcome::Terminating,
    )))
}
