//! Every clause of the [`Store`] contract, as one async function over a
//! [`Subject`]. resourceVersions are compared by order and identity, never
//! by value: etcd's revisions are not contiguous.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use vmctl_api::{ApplySource, Kind, Note, NoteType, Object, ObjectMeta, ObjectRef};
use vmctl_store::{Change, Event, Outcome, StoreError, Watch};

use crate::Subject;

fn vm(name: &str, spec: serde_json::Value) -> Object {
    Object::new(Kind::VirtualMachine, ObjectMeta::named(name), spec)
}

fn vm_ref(name: &str) -> ObjectRef {
    ObjectRef::new(Kind::VirtualMachine, name)
}

fn note(name: &str, reason: &str) -> Note {
    Note {
        type_: NoteType::Normal,
        reason: reason.into(),
        message: "m".into(),
        object: vm_ref(name),
        source: Some("test".into()),
    }
}

async fn next(w: &mut Watch) -> Arc<Event> {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch delivers")
}

/// Asserts that no further event arrives within a short while.
async fn quiet(w: &mut Watch) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("unexpected event: {r:?}");
    }
}

pub async fn create_assigns_uid_generation_and_resource_version(t: &Subject) {
    let s = &t.store;
    let before = s.last_seq().await.unwrap();
    let w = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    assert_eq!(w.outcome, Outcome::Created);
    let o = w.object.unwrap();
    let rv = o.metadata.resource_version;
    assert!(rv > before, "rv {rv} above the store's version {before}");
    assert_eq!(w.seq, Some(rv));
    assert!(o.metadata.uid.is_some() && o.metadata.creation_timestamp.is_some());
    assert_eq!(o.metadata.generation, 1);
    assert_eq!(o.spec, json!({"cpus": 1}));
    assert_eq!(s.get(&vm_ref("a")).await.unwrap(), Some(o));
    assert!(s.last_seq().await.unwrap() >= rv);
}

pub async fn reapplying_the_same_object_is_unchanged(t: &Subject) {
    let s = &t.store;
    let first = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    let mut w = s.watch(first.seq.unwrap()).await.unwrap();
    let again = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(again.seq, None);
    assert_eq!(again.object, first.object);
    quiet(&mut w).await;
}

pub async fn a_stale_expected_resource_version_conflicts_and_changes_nothing(t: &Subject) {
    let s = &t.store;
    let a = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    let rv1 = a.seq.unwrap();
    let b = s
        .apply(vm("a", json!({"cpus": 2})), None, Some(rv1))
        .await
        .unwrap();
    let rv2 = b.seq.unwrap();
    assert!(rv2 > rv1);
    for stale in [
        s.apply(vm("a", json!({"cpus": 3})), None, Some(rv1)).await,
        s.update_status(&vm_ref("a"), json!({"x": 1}), Some(rv1))
            .await,
        s.set_finalizers(&vm_ref("a"), vec!["f".into()], Some(rv1))
            .await,
        s.request_delete(&vm_ref("a"), Some(rv1)).await,
    ] {
        match stale {
            Err(StoreError::Conflict {
                expected, actual, ..
            }) => assert_eq!((expected, actual), (rv1, rv2)),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    let now = s.get(&vm_ref("a")).await.unwrap().unwrap();
    assert_eq!(now, b.object.unwrap(), "nothing changed");
}

pub async fn expected_zero_means_must_not_exist(t: &Subject) {
    let s = &t.store;
    let created = s.apply(vm("a", json!({})), None, Some(0)).await.unwrap();
    assert_eq!(created.outcome, Outcome::Created);
    let err = s.apply(vm("a", json!({"x": 1})), None, Some(0)).await;
    assert!(
        matches!(err, Err(StoreError::Conflict { expected: 0, .. })),
        "{err:?}"
    );
    let err = s.update_status(&vm_ref("b"), json!({}), None).await;
    assert!(matches!(err, Err(StoreError::NotFound(_))), "{err:?}");
}

pub async fn generation_rises_only_when_the_spec_changes(t: &Subject) {
    let s = &t.store;
    s.apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    let mut labelled = vm("a", json!({"cpus": 1}));
    labelled.metadata.labels.insert("tier".into(), "web".into());
    let w = s.apply(labelled.clone(), None, None).await.unwrap();
    assert_eq!(w.outcome, Outcome::Configured);
    assert_eq!(w.object.unwrap().metadata.generation, 1, "labels only");
    let w = s
        .update_status(&vm_ref("a"), json!({"phase": "Running"}), None)
        .await
        .unwrap();
    assert_eq!(w.object.unwrap().metadata.generation, 1, "status only");
    labelled.spec = json!({"cpus": 2});
    let w = s.apply(labelled, None, None).await.unwrap();
    assert_eq!(w.object.unwrap().metadata.generation, 2, "spec changed");
}

pub async fn status_writes_never_touch_the_spec(t: &Subject) {
    let s = &t.store;
    let a = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    let a = a.object.unwrap();
    let w = s
        .update_status(&vm_ref("a"), json!({"phase": "Running"}), None)
        .await
        .unwrap();
    assert_eq!(w.outcome, Outcome::Updated);
    let o = w.object.unwrap();
    assert_eq!(o.spec, a.spec);
    assert_eq!(o.metadata.generation, a.metadata.generation);
    assert_eq!(o.metadata.uid, a.metadata.uid);
    assert_eq!(o.status, Some(json!({"phase": "Running"})));
    // The same status again appends nothing.
    let same = s
        .update_status(&vm_ref("a"), json!({"phase": "Running"}), None)
        .await
        .unwrap();
    assert_eq!(same.outcome, Outcome::Unchanged);
    // A spec change keeps the status.
    let w = s
        .apply(vm("a", json!({"cpus": 2})), None, None)
        .await
        .unwrap();
    assert_eq!(w.object.unwrap().status, Some(json!({"phase": "Running"})));
    assert_eq!(
        s.get(&vm_ref("a")).await.unwrap().unwrap().status,
        Some(json!({"phase": "Running"}))
    );
}

pub async fn finalizers_hold_a_deletion_until_cleared(t: &Subject) {
    let s = &t.store;
    s.apply(vm("a", json!({})), None, None).await.unwrap();
    s.set_finalizers(&vm_ref("a"), vec!["vmctl.io/cleanup".into()], None)
        .await
        .unwrap();
    let w = s.request_delete(&vm_ref("a"), None).await.unwrap();
    assert_eq!(w.outcome, Outcome::Terminating);
    let o = s.get(&vm_ref("a")).await.unwrap().expect("still there");
    assert!(o.metadata.deletion_timestamp.is_some());
    let again = s.request_delete(&vm_ref("a"), None).await.unwrap();
    assert_eq!(again.outcome, Outcome::Unchanged);
    let w = s.set_finalizers(&vm_ref("a"), vec![], None).await.unwrap();
    assert_eq!(w.outcome, Outcome::Deleted);
    assert_eq!(w.object, None);
    assert_eq!(s.get(&vm_ref("a")).await.unwrap(), None);
    // Without finalizers, a delete is immediate.
    s.apply(vm("b", json!({})), None, None).await.unwrap();
    let w = s.request_delete(&vm_ref("b"), None).await.unwrap();
    assert_eq!(w.outcome, Outcome::Deleted);
    assert_eq!(s.get(&vm_ref("b")).await.unwrap(), None);
}

pub async fn delete_then_recreate_gets_a_new_uid(t: &Subject) {
    let s = &t.store;
    let a = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    s.update_status(&vm_ref("a"), json!({"phase": "Running"}), None)
        .await
        .unwrap();
    s.request_delete(&vm_ref("a"), None).await.unwrap();
    let b = s
        .apply(vm("a", json!({"cpus": 1})), None, None)
        .await
        .unwrap();
    assert_eq!(b.outcome, Outcome::Created);
    let (a, b) = (a.object.unwrap(), b.object.unwrap());
    assert_ne!(a.metadata.uid, b.metadata.uid);
    assert_eq!(b.metadata.generation, 1);
    assert_eq!(b.status, None, "a new incarnation starts without status");
    assert!(b.metadata.resource_version > a.metadata.resource_version);
}

pub async fn notes_are_recorded_per_object_and_globally(t: &Subject) {
    let s = &t.store;
    let n1 = s.record_note(note("a", "Started")).await.unwrap();
    let n2 = s.record_note(note("b", "Pulled")).await.unwrap();
    let n3 = s.record_note(note("a", "Stopped")).await.unwrap();
    assert!(n1 < n2 && n2 < n3);
    let a = s.notes(Some(&vm_ref("a"))).await.unwrap();
    let reasons: Vec<_> = a.iter().map(|n| n.note.reason.as_str()).collect();
    assert_eq!(reasons, ["Started", "Stopped"]);
    assert_eq!(a[0].seq, n1);
    assert_eq!(a[0].note, note("a", "Started"));
    let all = s.notes(None).await.unwrap();
    let seqs: Vec<_> = all.iter().map(|n| n.seq).collect();
    assert_eq!(seqs, [n1, n2, n3]);
    // The object need not exist, and notes never create it.
    assert_eq!(s.get(&vm_ref("a")).await.unwrap(), None);
}

pub async fn missing_objects_are_not_found(t: &Subject) {
    let s = &t.store;
    assert_eq!(s.get(&vm_ref("ghost")).await.unwrap(), None);
    for r in [
        s.request_delete(&vm_ref("ghost"), None).await,
        s.set_finalizers(&vm_ref("ghost"), vec![], None).await,
    ] {
        assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    }
    assert!(s.history(&vm_ref("ghost")).await.unwrap().is_empty());
    assert!(s.list(Some(Kind::Image)).await.unwrap().objects.is_empty());
}

/// What one acknowledged write should look like in a watch.
fn describe(ev: &Event) -> (u64, ObjectRef, &'static str) {
    (ev.seq, ev.object.clone(), ev.change.name())
}

pub async fn watch_delivers_every_later_event_once_in_order(t: &Subject) {
    let s = &t.store;
    let start = s.last_seq().await.unwrap();
    let mut w = s.watch(start).await.unwrap();
    let mut acked = Vec::new();
    let mut ack = |seq: Option<u64>, name: &str, change: &'static str| {
        acked.push((seq.unwrap(), vm_ref(name), change));
    };
    let r = s.apply(vm("a", json!({"n": 1})), None, None).await.unwrap();
    ack(r.seq, "a", "Created");
    let r = s.apply(vm("b", json!({"n": 1})), None, None).await.unwrap();
    ack(r.seq, "b", "Created");
    let r = s
        .update_status(&vm_ref("a"), json!({"s": 1}), None)
        .await
        .unwrap();
    ack(r.seq, "a", "StatusUpdated");
    let seq = s.record_note(note("a", "Started")).await.unwrap();
    ack(Some(seq), "a", "Noted");
    let r = s
        .set_finalizers(&vm_ref("b"), vec!["f".into()], None)
        .await
        .unwrap();
    ack(r.seq, "b", "FinalizersSet");
    let r = s.request_delete(&vm_ref("b"), None).await.unwrap();
    ack(r.seq, "b", "DeletionRequested");
    let r = s.apply(vm("a", json!({"n": 2})), None, None).await.unwrap();
    ack(r.seq, "a", "Applied");
    let r = s.set_finalizers(&vm_ref("b"), vec![], None).await.unwrap();
    ack(r.seq, "b", "Deleted");
    let mut got = Vec::new();
    let mut folded = BTreeMap::new();
    for _ in 0..acked.len() {
        let ev = next(&mut w).await;
        vmctl_store::fold::step(&mut folded, &ev);
        got.push(describe(&ev));
    }
    assert_eq!(got, acked, "every event once, in order, nothing else");
    quiet(&mut w).await;
    // The events carry enough to rebuild the objects.
    let listed: BTreeMap<_, _> = s
        .list(None)
        .await
        .unwrap()
        .objects
        .into_iter()
        .map(|o| (o.object_ref(), o))
        .collect();
    assert_eq!(
        folded.keys().collect::<Vec<_>>(),
        listed.keys().collect::<Vec<_>>()
    );
    let (fa, la) = (&folded[&vm_ref("a")], &listed[&vm_ref("a")]);
    assert_eq!(
        (&fa.spec, &fa.status, fa.metadata.resource_version),
        (&la.spec, &la.status, la.metadata.resource_version)
    );
    // A second watch from the middle sees exactly the rest.
    let mid = acked[3].0;
    let mut w2 = s.watch(mid).await.unwrap();
    for want in &acked[4..] {
        assert_eq!(&describe(&*next(&mut w2).await), want);
    }
    quiet(&mut w2).await;
}

pub async fn a_listing_resource_version_is_consistent_with_a_watch_from_it(t: &Subject) {
    let s = &t.store;
    for i in 0..5 {
        s.apply(vm(&format!("vm{i}"), json!({"i": i})), None, None)
            .await
            .unwrap();
    }
    // Writers keep going while we list, so the listing falls between writes.
    let s2 = s.clone();
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..40 {
            let r = s2
                .update_status(&vm_ref(&format!("vm{}", i % 5)), json!({"n": i}), None)
                .await
                .unwrap();
            acked.push(r.seq.unwrap());
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let listing = s.list(None).await.unwrap();
    let mut w = s.watch(listing.resource_version).await.unwrap();
    let acked = writer.await.unwrap();
    let mut objects: BTreeMap<_, _> = listing
        .objects
        .iter()
        .map(|o| (o.object_ref(), o.clone()))
        .collect();
    for o in objects.values() {
        assert!(o.metadata.resource_version <= listing.resource_version);
    }
    let later: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|&rv| rv > listing.resource_version)
        .collect();
    for want in &later {
        let ev = next(&mut w).await;
        assert_eq!(ev.seq, *want, "the watch resumes exactly after the listing");
        vmctl_store::fold::step(&mut objects, &ev);
    }
    quiet(&mut w).await;
    // listing + watch = the store now.
    let now: BTreeMap<_, _> = s
        .list(None)
        .await
        .unwrap()
        .objects
        .into_iter()
        .map(|o| (o.object_ref(), o))
        .collect();
    for (r, o) in &now {
        let f = &objects[r];
        assert_eq!(
            (&f.status, f.metadata.resource_version),
            (&o.status, o.metadata.resource_version),
            "{r}"
        );
    }
}

pub async fn sixteen_concurrent_writers_share_no_resource_version_and_lose_nothing(t: &Subject) {
    const WRITERS: usize = 16;
    const EACH: usize = 12;
    let s = &t.store;
    s.apply(vm("shared", json!({})), None, None).await.unwrap();
    s.update_status(&vm_ref("shared"), json!({"count": 0}), None)
        .await
        .unwrap();
    let start = s.last_seq().await.unwrap();
    let mut w = s.watch(start).await.unwrap();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let own = format!("own{writer}");
            for i in 0..EACH {
                // Its own object: a plain write.
                let r = s
                    .apply(vm(&own, json!({"i": i})), None, None)
                    .await
                    .unwrap();
                acked.push((r.seq.unwrap(), vm_ref(&own)));
                // The shared counter: read, then compare-and-swap, retried.
                loop {
                    let cur = s.get(&vm_ref("shared")).await.unwrap().unwrap();
                    let n = cur.status.as_ref().unwrap()["count"].as_u64().unwrap();
                    match s
                        .update_status(
                            &vm_ref("shared"),
                            json!({"count": n + 1}),
                            Some(cur.metadata.resource_version),
                        )
                        .await
                    {
                        Ok(r) => {
                            acked.push((r.seq.unwrap(), vm_ref("shared")));
                            break;
                        }
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let total = WRITERS * EACH;
    let shared = s.get(&vm_ref("shared")).await.unwrap().unwrap();
    assert_eq!(
        shared.status.unwrap()["count"],
        json!(total),
        "no increment lost"
    );
    let seqs: BTreeSet<u64> = acked.iter().map(|(rv, _)| *rv).collect();
    assert_eq!(
        seqs.len(),
        acked.len(),
        "no two writes share a resourceVersion"
    );
    // The watch shows exactly the acknowledged writes, in order, and the
    // shared counter rising by one at each of its versions.
    acked.sort();
    let mut count = 0;
    for (rv, r) in &acked {
        let ev = next(&mut w).await;
        assert_eq!((&ev.seq, &ev.object), (rv, r), "no gap, no duplicate");
        if ev.object.name == "shared" {
            count += 1;
            match &ev.change {
                Change::StatusUpdated { status } => assert_eq!(status["count"], json!(count)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    quiet(&mut w).await;
}

pub async fn history_lists_spec_changes_oldest_first(t: &Subject) {
    let s = &t.store;
    let src = |f: &str| ApplySource {
        file: Some(f.into()),
        applied_by: None,
    };
    let a = s
        .apply(vm("a", json!({"n": 1})), Some(src("one.kdl")), None)
        .await
        .unwrap();
    s.update_status(&vm_ref("a"), json!({"x": 1}), None)
        .await
        .unwrap();
    let b = s
        .apply(vm("a", json!({"n": 2})), Some(src("two.kdl")), None)
        .await
        .unwrap();
    s.apply(vm("other", json!({})), None, None).await.unwrap();
    let h = s.history(&vm_ref("a")).await.unwrap();
    let applied: Vec<_> = h
        .iter()
        .filter_map(|e| match &e.change {
            Change::Applied { created, object } => Some((
                e.seq,
                *created,
                object.spec.clone(),
                object.metadata.source.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        applied,
        [
            (a.seq.unwrap(), true, json!({"n": 1}), Some(src("one.kdl"))),
            (b.seq.unwrap(), false, json!({"n": 2}), Some(src("two.kdl"))),
        ]
    );
    assert!(h.windows(2).all(|p| p[0].seq < p[1].seq), "oldest first");
    assert!(h.iter().all(|e| e.object == vm_ref("a")), "only its own");
}

/// Regression (etcd kept only spec changes and deletions in its history,
/// sled every event): the history of an object is every change of it
/// (create, apply, status, finalizers, deletion request, deletion) and its
/// notes, each at the resourceVersion its write returned, oldest first.
pub async fn history_has_every_change_and_note_of_the_object(t: &Subject) {
    let s = &t.store;
    let a = vm_ref("a");
    let mut want = Vec::new();
    let w = s.apply(vm("a", json!({"n": 1})), None, None).await.unwrap();
    want.push((w.seq.unwrap(), "Created"));
    let w = s.update_status(&a, json!({"x": 1}), None).await.unwrap();
    want.push((w.seq.unwrap(), "StatusUpdated"));
    let w = s.apply(vm("a", json!({"n": 2})), None, None).await.unwrap();
    want.push((w.seq.unwrap(), "Applied"));
    s.apply(vm("other", json!({})), None, None).await.unwrap();
    s.update_status(&vm_ref("other"), json!({}), None)
        .await
        .unwrap();
    let w = s.update_status(&a, json!({"x": 2}), None).await.unwrap();
    want.push((w.seq.unwrap(), "StatusUpdated"));
    let seq = s.record_note(note("a", "Started")).await.unwrap();
    want.push((seq, "Noted"));
    let w = s.set_finalizers(&a, vec!["f".into()], None).await.unwrap();
    want.push((w.seq.unwrap(), "FinalizersSet"));
    let w = s.request_delete(&a, None).await.unwrap();
    want.push((w.seq.unwrap(), "DeletionRequested"));
    let w = s.set_finalizers(&a, vec![], None).await.unwrap();
    assert_eq!(w.object, None, "clearing the finalizers deleted it");
    let last = w.seq.unwrap();
    let h = s.history(&a).await.unwrap();
    let got: Vec<(u64, &str)> = h.iter().map(|e| (e.seq, e.change.name())).collect();
    assert_eq!(&got[..want.len()], &want[..], "every change, in order");
    assert_eq!(got.len(), want.len() + 1, "and the deletion: {got:?}");
    assert_eq!(got[want.len()].0, last);
    assert!(h.iter().all(|e| e.object == a), "only its own");
    match &h[1].change {
        Change::StatusUpdated { status } => assert_eq!(status, &json!({"x": 1})),
        other => panic!("unexpected {other:?}"),
    }
}

pub async fn history_of_spec_changes_survives_compaction(t: &Subject) {
    let s = &t.store;
    let mut spec_rvs = Vec::new();
    for i in 0..4 {
        let r = s.apply(vm("a", json!({"n": i})), None, None).await.unwrap();
        spec_rvs.push(r.seq.unwrap());
        for j in 0..5 {
            s.update_status(&vm_ref("a"), json!({"n": i, "j": j}), None)
                .await
                .unwrap();
        }
    }
    s.set_finalizers(&vm_ref("a"), vec!["f".into()], None)
        .await
        .unwrap();
    let del = s.request_delete(&vm_ref("a"), None).await.unwrap();
    let before = s.get(&vm_ref("a")).await.unwrap();
    t.compact_all().await;
    let h = s.history(&vm_ref("a")).await.unwrap();
    let applied: Vec<u64> = h
        .iter()
        .filter(|e| matches!(e.change, Change::Applied { .. }))
        .map(|e| e.seq)
        .collect();
    assert_eq!(applied, spec_rvs, "every spec change kept");
    // Statuses are pruned to the newest few (sled here: 1; etcd: 3), and
    // the newest always stays.
    let statuses: Vec<&serde_json::Value> = h
        .iter()
        .filter_map(|e| match &e.change {
            Change::StatusUpdated { status } => Some(status),
            _ => None,
        })
        .collect();
    assert!((1..=3).contains(&statuses.len()), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&&json!({"n": 3, "j": 4})));
    assert!(
        h.iter()
            .any(|e| e.seq == del.seq.unwrap()
                && matches!(e.change, Change::DeletionRequested { .. })),
        "the deletion request kept"
    );
    assert_eq!(
        s.get(&vm_ref("a")).await.unwrap(),
        before,
        "current state kept"
    );
}

pub async fn watch_from_a_compacted_version_is_too_old(t: &Subject) {
    let s = &t.store;
    let start = s.last_seq().await.unwrap();
    for i in 0..5 {
        s.apply(vm("a", json!({"n": i})), None, None).await.unwrap();
        s.update_status(&vm_ref("a"), json!({"n": i}), None)
            .await
            .unwrap();
    }
    t.compact_all().await;
    let err = match s.watch(start).await {
        Err(e) => e,
        Ok(mut w) => w.next().await.expect_err("a compacted start is too old"),
    };
    assert!(err.is_too_old(), "{err:?}");
    // Re-listing and watching from the listing works.
    let listing = s.list(None).await.unwrap();
    let mut w = s.watch(listing.resource_version).await.unwrap();
    let r = s
        .apply(vm("a", json!({"n": 99})), None, None)
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.seq, r.seq.unwrap());
}
