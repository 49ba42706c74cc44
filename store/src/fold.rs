//! The fold: how each event changes the objects tree.
//!
//! The `objects` tree is, by construction, `fold(events)`: the write path
//! computes the new object with [`apply_event`] from the very event it
//! appends, and [`fold`] replays the same function over the log. Compaction
//! drops only events whose effect a later kept event overwrites, so the fold
//! of a compacted log is unchanged.

use std::collections::BTreeMap;

use vmctl_api::{Object, ObjectRef};

use crate::event::{Change, Event};

/// The object after `ev`, given the object before it (`None`: absent).
pub fn apply_event(prev: Option<Object>, ev: &Event) -> Option<Object> {
    let with_rv = |mut o: Object| {
        o.metadata.resource_version = ev.seq;
        o
    };
    match &ev.change {
        Change::Applied { created, object } => {
            let mut next = (**object).clone();
            next.status = if *created {
                None
            } else {
                prev.and_then(|p| p.status)
            };
            Some(with_rv(next))
        }
        Change::StatusUpdated { status } => prev.map(|mut o| {
            o.status = Some(status.clone());
            with_rv(o)
        }),
        Change::FinalizersSet { finalizers } => prev.map(|mut o| {
            o.metadata.finalizers = finalizers.clone();
            with_rv(o)
        }),
        Change::DeletionRequested { at } => prev.map(|mut o| {
            o.metadata.deletion_timestamp = Some(*at);
            with_rv(o)
        }),
        Change::Deleted => None,
        Change::Noted { .. } => prev,
    }
}

/// Replays `events` (in sequence order) from an empty tree.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> BTreeMap<ObjectRef, Object> {
    let mut objects = BTreeMap::new();
    for ev in events {
        step(&mut objects, ev);
    }
    objects
}

/// Applies one event to a materialised map.
pub fn step(objects: &mut BTreeMap<ObjectRef, Object>, ev: &Event) {
    let prev = objects.remove(&ev.object);
    if let Some(next) = apply_event(prev, ev) {
        objects.insert(ev.object.clone(), next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmctl_api::{Kind, ObjectMeta};

    fn ev(seq: u64, change: Change) -> Event {
        Event {
            seq,
            time: chrono::Utc::now(),
            object: ObjectRef::new(Kind::Image, "a"),
            change,
        }
    }

    fn applied(created: bool, spec: serde_json::Value) -> Change {
        let obj = Object::new(Kind::Image, ObjectMeta::named("a"), spec);
        Change::Applied {
            created,
            object: Box::new(obj),
        }
    }

    #[test]
    fn a_spec_change_keeps_the_status_and_a_recreate_drops_it() {
        let log = [
            ev(1, applied(true, serde_json::json!({"n": 1}))),
            ev(
                2,
                Change::StatusUpdated {
                    status: serde_json::json!({"ok": true}),
                },
            ),
            ev(3, applied(false, serde_json::json!({"n": 2}))),
        ];
        let objs = fold(&log);
        let a = &objs[&ObjectRef::new(Kind::Image, "a")];
        assert_eq!(a.status, Some(serde_json::json!({"ok": true})));
        assert_eq!(a.metadata.resource_version, 3);

        let log = [
            log[0].clone(),
            log[1].clone(),
            ev(4, Change::Deleted),
            ev(5, applied(true, serde_json::json!({}))),
        ];
        let objs = fold(&log);
        assert_eq!(objs[&ObjectRef::new(Kind::Image, "a")].status, None);
    }

    #[test]
    fn notes_do_not_touch_the_object() {
        let note = vmctl_api::Note {
            type_: vmctl_api::NoteType::Warning,
            reason: "BackOff".into(),
            message: "m".into(),
            object: ObjectRef::new(Kind::Image, "a"),
            source: None,
        };
        let log = [
            ev(1, applied(true, serde_json::json!({}))),
            ev(2, Change::Noted { note }),
        ];
        assert_eq!(
            fold(&log)[&ObjectRef::new(Kind::Image, "a")]
                .metadata
                .resource_version,
            1
        );
    }
}
