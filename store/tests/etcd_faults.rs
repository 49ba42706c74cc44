//! Faults on a real 3-member etcd cluster under 16 writers: kill -9 a
//! follower, then the leader. Every acknowledged write must be there
//! afterwards, and writes must go on (after the election for the leader).
//! Also the EtcdStore's own shortcuts under stress: a stale write cache
//! (another store wrote meanwhile) and a watcher that falls behind the
//! shared watch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;
use vmctl_api::{Kind, Object, ObjectMeta, ObjectRef};
use vmctl_store::testing::{EtcdCluster, unique_prefix};
use vmctl_store::{Change, EtcdOptions, EtcdStore, Store, StoreError};

const WRITERS: usize = 16;

/// One acknowledged write: object, the counter it wrote, its resourceVersion.
type Ack = (String, u64, u64);

fn vm(name: &str, n: u64) -> Object {
    Object::new(
        Kind::VirtualMachine,
        ObjectMeta::named(name),
        json!({ "n": n }),
    )
}

async fn writer(s: Arc<dyn Store>, i: usize, stop: Arc<AtomicBool>, acks: Arc<Mutex<Vec<Ack>>>) {
    let name = format!("w{i}");
    let mut n = 1;
    // A write that failed may have committed (its answer lost, e.g. a
    // proposal that timed out across a leader election): like any client,
    // the writer repeats it until it is acknowledged before it stops, so
    // its newest write is known.
    let mut unsure = false;
    while unsure || !stop.load(Ordering::SeqCst) {
        match s.apply(vm(&name, n), None, None).await {
            Ok(w) => {
                // Unchanged: a retry of a write that committed unacknowledged.
                let rv = w.object.as_ref().map_or(0, |o| o.metadata.resource_version);
                acks.lock().await.push((name.clone(), n, rv));
                n += 1;
                unsure = false;
            }
            Err(e) => {
                unsure = true;
                assert!(e.is_unavailable(), "only unavailability is expected: {e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A read, retried while a member that was just restarted still refuses
/// connections (the client balances over every endpoint).
async fn retry<T, F: std::future::Future<Output = vmctl_store::Result<T>>>(
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

async fn acked(acks: &Mutex<Vec<Ack>>) -> usize {
    acks.lock().await.len()
}

/// Waits until more writes than `since` are acknowledged; returns how long it took.
async fn progress(acks: &Mutex<Vec<Ack>>, since: usize, what: &str) -> Duration {
    let start = Instant::now();
    while acked(acks).await < since + WRITERS {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "writes did not resume after {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_follower_or_the_leader_loses_no_acknowledged_write() {
    let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
        .expect("etcd starts (scripts/install-prereqs installs etcd-server)");
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.prefix = unique_prefix();
    opts.request_timeout = Duration::from_secs(2);
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(opts).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| tokio::spawn(writer(store.clone(), i, stop.clone(), acks.clone())))
        .collect();
    progress(&acks, 0, "start").await;

    // A follower.
    let leader = cluster.leader().expect("a leader");
    let follower = (leader + 1) % cluster.len();
    cluster.kill(follower);
    let before = acked(&acks).await;
    let took = progress(&acks, before, "a follower was killed").await;
    eprintln!("follower {follower} killed: writes went on within {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await; // writing on two members
    cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(follower).unwrap();
        cluster.wait_healthy(Duration::from_secs(30)).unwrap();
        cluster
    })
    .await
    .unwrap();

    // The leader.
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    let before = acked(&acks).await;
    let took = progress(&acks, before, "the leader was killed").await;
    eprintln!("leader {leader} killed: writes resumed within {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await; // writing under the new leader
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(leader).unwrap();
        cluster.wait_healthy(Duration::from_secs(30)).unwrap();
        cluster
    })
    .await
    .unwrap();

    // Every acknowledged write is in each object's history (spec changes
    // are kept there), at its resourceVersion, with its content.
    let acks = acks.lock().await.clone();
    assert!(acks.len() > 3 * WRITERS);
    for i in 0..WRITERS {
        let name = format!("w{i}");
        let r = ObjectRef::new(Kind::VirtualMachine, &name);
        let history: std::collections::BTreeMap<u64, u64> = retry(|| store.history(&r))
            .await
            .into_iter()
            .filter_map(|e| match e.change {
                Change::Applied { object, .. } => Some((e.seq, object.spec["n"].as_u64()?)),
                _ => None,
            })
            .collect();
        let mine: Vec<&Ack> = acks.iter().filter(|a| a.0 == name).collect();
        for (_, n, rv) in &mine {
            let kept = history.values().any(|v| v == n);
            assert!(kept, "{name}: acknowledged write n={n} (rv {rv}) lost");
            if let Some(at) = history.get(rv) {
                assert_eq!(at, n, "{name}: rv {rv} holds another write");
            }
        }
        let last = mine.iter().map(|a| a.1).max().unwrap();
        let now = retry(|| store.get(&r)).await.unwrap();
        assert_eq!(
            now.spec["n"].as_u64(),
            Some(last),
            "{name}: newest write kept"
        );
    }
    eprintln!("{} acknowledged writes checked, none lost", acks.len());
}

/// A dead member used to fail about a third of the requests with
/// Unavailable (the client balances over every endpoint): reads and
/// never-sent writes are now retried on another member within the request
/// timeout, so a quorum that is up serves every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_member_fails_no_request() {
    let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .unwrap()
        .expect("etcd starts (scripts/install-prereqs installs etcd-server)");
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.prefix = unique_prefix();
    let store = EtcdStore::connect(opts).await.unwrap();
    store.apply(vm("a", 0), None, None).await.unwrap();
    let leader = cluster.leader().expect("a leader");
    cluster.kill((leader + 1) % cluster.len());
    let r = ObjectRef::new(Kind::VirtualMachine, "a");
    for n in 1..=60 {
        store.apply(vm("a", n), None, None).await.unwrap();
        assert_eq!(store.get(&r).await.unwrap().unwrap().spec["n"], json!(n));
        store.list(None).await.unwrap();
    }
    drop(cluster);
}

/// A lease holder for the lease tests: agent `pid` on host `test`.
fn holder(pid: u32) -> vmctl_store::LeaseHolder {
    vmctl_store::LeaseHolder {
        host: "test".into(),
        boot_id: None,
        pid,
        socket: format!("/agent-{pid}.sock"),
        data_dir: format!("/data-{pid}"),
        since: chrono::Utc::now(),
    }
}

/// The lease `o` acquired; panics if another holder has it.
fn taken(o: vmctl_store::LeaseOutcome) -> vmctl_store::AgentLease {
    match o {
        vmctl_store::LeaseOutcome::Acquired(l) => l,
        held => panic!("not taken: {held:?}"),
    }
}

async fn connect(prefix: &str) -> EtcdStore {
    let cluster = tokio::task::spawn_blocking(EtcdCluster::shared)
        .await
        .unwrap();
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.prefix = prefix.to_owned();
    EtcdStore::connect(opts).await.unwrap()
}

/// Writes are planned from what the store last wrote or read (one round
/// trip instead of a read then a transaction). Another store writing the
/// same objects meanwhile must never make a write wrong: not "unchanged"
/// when it changes something, no false conflict, no write on a deleted
/// object, no lost update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_cache_never_gives_a_wrong_answer() {
    let prefix = unique_prefix();
    let (a, b) = (connect(&prefix).await, connect(&prefix).await);
    let r = ObjectRef::new(Kind::VirtualMachine, "x");
    // b has never seen x: it is not "created" twice.
    a.apply(vm("x", 1), None, None).await.unwrap();
    let w = b.apply(vm("x", 1), None, None).await.unwrap();
    assert_eq!(w.outcome, vmctl_store::Outcome::Unchanged);
    // b remembers n=1; a changes it: b's n=1 again is a change, not "unchanged".
    a.apply(vm("x", 2), None, None).await.unwrap();
    let w = b.apply(vm("x", 1), None, None).await.unwrap();
    assert_eq!(w.outcome, vmctl_store::Outcome::Configured);
    assert_eq!(a.get(&r).await.unwrap().unwrap().spec["n"], json!(1));
    // a's cache is stale now: its expected_rv from a fresh get is no conflict.
    let rv = a.get(&r).await.unwrap().unwrap().metadata.resource_version;
    let w = b.update_status(&r, json!({"by": "b"}), None).await.unwrap();
    let err = a
        .update_status(&r, json!({"by": "a"}), Some(rv))
        .await
        .expect_err("b wrote after rv: a real conflict");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    let now = w.seq.unwrap();
    a.update_status(&r, json!({"by": "a"}), Some(now))
        .await
        .expect("the current rv is no conflict, whatever a remembered");
    // b deletes it; a (remembering it) must not write to it.
    b.request_delete(&r, None).await.unwrap();
    let err = a
        .update_status(&r, json!({"late": true}), None)
        .await
        .expect_err("it is gone");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(a.get(&r).await.unwrap(), None);
    // 8 writers on each store, each adding one status write: none lost.
    a.apply(vm("x", 3), None, None).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let r = r.clone();
            tokio::spawn(async move {
                s.update_status(&r, json!({"writer": i}), None)
                    .await
                    .unwrap()
                    .seq
                    .unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 16, "every write its own resourceVersion");
    let statuses = a
        .history(&r)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| seqs.contains(&e.seq) && matches!(e.change, Change::StatusUpdated { .. }))
        .count();
    assert_eq!(statuses, 16, "every write in the history");
}

/// Watchers share one etcd watch per store. One that reads nothing while
/// more events than the shared watch keeps go by, and one that starts
/// below them, must still get every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_the_shared_watch_still_gets_every_event_once() {
    let s = connect(&unique_prefix()).await;
    let from = s.last_seq().await.unwrap();
    let mut live = s.watch(from).await.unwrap();
    let mut slow = s.watch(from).await.unwrap();
    let writes = vmctl_store::etcd::HUB_RECENT + 500;
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in (w..writes).step_by(16) {
                    let r = s.apply(vm(&format!("o{i}"), 0), None, None).await.unwrap();
                    seqs.push(r.seq.unwrap());
                }
                seqs
            })
        })
        .collect();
    let mut want = Vec::new();
    for t in tasks {
        want.extend(t.await.unwrap());
    }
    want.sort();
    let mut got_live = Vec::new();
    while got_live.len() < writes {
        got_live.push(live.next().await.unwrap().seq);
    }
    assert_eq!(got_live, want, "the live watcher");
    // Starts below what the shared watch keeps: its own etcd watch.
    let mut late = s.watch(from).await.unwrap();
    for (name, w) in [("slow", &mut slow), ("late", &mut late)] {
        let mut got = Vec::new();
        while got.len() < writes {
            got.push(w.next().await.unwrap().seq);
        }
        assert_eq!(got, want, "the {name} watcher");
    }
    // And nothing more.
    let r = s.apply(vm("after", 0), None, None).await.unwrap();
    for w in [&mut live, &mut slow, &mut late] {
        assert_eq!(w.next().await.unwrap().seq, r.seq.unwrap(), "no duplicate");
    }
}

/// The fault (new-user tryout): two installations on nested prefixes,
/// `/nest/` and `/nest/o/`, shared keys: a listing under `/nest/` (its
/// objects were `/nest/o/…`) returned `/nest/o/`'s objects as its own, its
/// notes those under `/nest/n/…`, and its compaction pruned the history of
/// the installation under `/nest/h/`. Every installation, nested either
/// way, must list, watch, read the history and notes of, and prune only
/// its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_prefixes_never_see_or_prune_each_others_keys() {
    // Its own cluster: compaction is cluster-wide.
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(1))
        .await
        .unwrap()
        .expect("etcd starts (scripts/install-prereqs installs etcd-server)");
    let outer = unique_prefix();
    let prefixes = [
        outer.clone(),
        format!("{outer}o/"),
        format!("{outer}n/"),
        format!("{outer}h/"),
        format!("{outer}h/VirtualMachine/"),
    ];
    let mut stores = Vec::new();
    for p in &prefixes {
        let mut opts = EtcdOptions::new(cluster.endpoints());
        opts.prefix = p.clone();
        stores.push(EtcdStore::connect(opts).await.unwrap());
    }
    let r = ObjectRef::new(Kind::VirtualMachine, "a");
    let from = stores[0].last_seq().await.unwrap();
    const STATUSES: u64 = 5;
    // One installation after the other, so that each one's own events
    // come first in a watch from `from`.
    for (i, s) in stores.iter().enumerate() {
        s.apply(vm("a", i as u64), None, None).await.unwrap();
        for k in 0..STATUSES {
            s.update_status(&r, json!({"of": i, "k": k}), None)
                .await
                .unwrap();
        }
        s.record_note(vmctl_api::Note {
            type_: vmctl_api::NoteType::Normal,
            reason: "Mine".into(),
            message: format!("of {i}"),
            object: r.clone(),
            source: None,
        })
        .await
        .unwrap();
    }
    let own_events = 1 + STATUSES as usize + 1;
    for (i, s) in stores.iter().enumerate() {
        let p = &prefixes[i];
        for kind in [None, Some(Kind::VirtualMachine)] {
            let listed = s.list(kind).await.unwrap().objects;
            assert_eq!(listed.len(), 1, "{p} lists only its own object: {listed:?}");
            assert_eq!(listed[0].spec["n"], json!(i), "{p}");
        }
        let notes = s.notes(None).await.unwrap();
        assert_eq!(notes.len(), 1, "{p}: {notes:?}");
        assert_eq!(notes[0].note.message, format!("of {i}"), "{p}");
        let history = s.history(&r).await.unwrap();
        assert_eq!(history.len(), own_events, "{p}: {history:?}");
        let mut w = s.watch(from).await.unwrap();
        for _ in 0..own_events {
            let ev = w.next().await.unwrap();
            assert!(history.iter().any(|h| h.seq == ev.seq), "{p}: {ev:?}");
        }
        // Nothing of another installation's comes before its next write.
        let next = s.apply(vm("a", 100 + i as u64), None, None).await.unwrap();
        assert_eq!(w.next().await.unwrap().seq, next.seq.unwrap(), "{p}");
    }
    // The outer installation compacts (statuses beyond the newest 3 go):
    // every nested one keeps its whole history.
    let top = stores[0].last_seq().await.unwrap();
    stores[0].compact(top).await.unwrap();
    let statuses = |h: &[vmctl_store::Event]| {
        h.iter()
            .filter(|e| matches!(e.change, Change::StatusUpdated { .. }))
            .count()
    };
    assert!(statuses(&stores[0].history(&r).await.unwrap()) < STATUSES as usize);
    for (s, p) in stores.iter().zip(&prefixes).skip(1) {
        let h = s.history(&r).await.unwrap();
        assert_eq!(statuses(&h), STATUSES as usize, "{p}: {h:?}");
    }
    drop(cluster);
}

/// A prefix with the section mark `@` could still nest into another
/// installation's ranges: it is refused, with what to do.
#[tokio::test]
async fn a_prefix_with_the_section_mark_is_refused() {
    let mut opts = EtcdOptions::new(vec!["http://127.0.0.1:1".into()]);
    opts.prefix = "/a@o/".into();
    let err = EtcdStore::connect(opts).await.expect_err("refused");
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("must not contain `@`"), "{err}");
}

/// The fault (new-user tryout): after an etcd outage every read through
/// the agent took 1 s longer until the next object write. Reads wait for
/// the agent's cache to reach `last_seq` (etcd's revision), and the
/// agent's new lease had moved the revision past the last object event,
/// so the cache waited for an event that never came. Now a write under
/// the prefix that is no object event reaches the watch as a bookmark at
/// its revision, so a reader waiting for `last_seq` goes on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_write_after_the_last_object_event_is_a_bookmark_so_reads_do_not_wait() {
    // A cluster of its own: on the shared one, other tests' writes (other
    // prefixes) move the revision past this prefix's lease write.
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(1))
        .await
        .unwrap()
        .expect("etcd starts");
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.prefix = unique_prefix();
    let store = EtcdStore::connect(opts).await.unwrap();
    let w = store.apply(vm("x", 1), None, None).await.unwrap();
    let rv = w.object.unwrap().metadata.resource_version;
    let mut watch = store.watch(rv).await.unwrap();
    let me = vmctl_store::LeaseHolder {
        host: "test".into(),
        boot_id: None,
        pid: std::process::id(),
        socket: "/nowhere.sock".into(),
        data_dir: "/nowhere".into(),
        since: chrono::Utc::now(),
    };
    let outcome = store
        .acquire_lease(&me, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(outcome, vmctl_store::LeaseOutcome::Acquired(_)),
        "{outcome:?}"
    );
    let last = store.last_seq().await.unwrap();
    assert!(last > rv, "the lease moved the revision");
    let item = tokio::time::timeout(Duration::from_secs(5), watch.next_item())
        .await
        .expect("the watch says something about the lease write")
        .unwrap();
    match item {
        vmctl_store::WatchItem::Bookmark(seq) => assert!(seq >= last, "{seq} < {last}"),
        vmctl_store::WatchItem::Event(ev) => panic!("no object changed, yet: {ev:?}"),
    }
    // A plain `next` still yields events only.
    store.apply(vm("x", 2), None, None).await.unwrap();
    let mut events = store.watch(rv).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.object.name, "x");
    assert!(ev.seq > last);
    drop(cluster);
}

/// Issue 17 item 1: a node's lease (`P@lease/node/{name}`) is held by one
/// agent at a time, apart from the agent lease and from other nodes'; a
/// second holder is told who holds it; once released, it can be taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lease_has_one_holder_apart_from_the_agent_lease_and_other_nodes() {
    let cluster = EtcdCluster::shared();
    let mut opts = EtcdOptions::new(cluster.endpoints());
    opts.prefix = unique_prefix();
    let store = EtcdStore::connect(opts).await.unwrap();
    let ttl = Duration::from_secs(10);
    let first = taken(
        store
            .acquire_node_lease("n1", &holder(1), ttl)
            .await
            .unwrap(),
    );
    match store
        .acquire_node_lease("n1", &holder(2), ttl)
        .await
        .unwrap()
    {
        vmctl_store::LeaseOutcome::Held { holder: h, .. } => assert_eq!(h.pid, 1),
        other => panic!("taken twice: {other:?}"),
    }
    // Other names, and the agent lease, are not held by it.
    let other = taken(
        store
            .acquire_node_lease("n2", &holder(2), ttl)
            .await
            .unwrap(),
    );
    let agent = taken(store.acquire_lease(&holder(2), ttl).await.unwrap());
    assert_eq!(
        store.node_lease_holder("n1").await.unwrap().map(|h| h.pid),
        Some(1)
    );
    let mut first = first;
    assert!(first.keep_alive().await.unwrap(), "still n1's holder");
    first.release().await.unwrap();
    assert_eq!(store.node_lease_holder("n1").await.unwrap(), None);
    let again = taken(
        store
            .acquire_node_lease("n1", &holder(2), ttl)
            .await
            .unwrap(),
    );
    for l in [again, other, agent] {
        l.release().await.unwrap();
    }
}

/// The fault behind a flaky takeover test: agent A, cut off from etcd,
/// stopped its controllers, but a reconcile under way went on once the
/// cut healed, read the VM again (after agent B had taken over and
/// reported it `NodeLost`) and wrote its own view back over B's. Writes
/// through a store fenced by an agent lease are refused once that lease
/// is gone, and change nothing; the unfenced store (the API's) and the
/// new holder's fenced store write on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_fenced_by_a_lost_agent_lease_is_refused_and_changes_nothing() {
    let store = connect(&unique_prefix()).await;
    let ttl = Duration::from_secs(10);
    let a = taken(store.acquire_lease(&holder(1), ttl).await.unwrap());
    let fenced_a = store.fenced(a.fence());
    let r = ObjectRef::new(Kind::VirtualMachine, "vm0");
    let written = fenced_a.apply(vm("vm0", 1), None, None).await.unwrap();
    let rv = written.object.unwrap().metadata.resource_version;
    fenced_a
        .update_status(&r, json!({ "by": "a" }), Some(rv))
        .await
        .expect("written while A holds the lease");
    // A's lease goes (revoked here; expired in the takeover), B takes it.
    a.release().await.unwrap();
    let b = taken(store.acquire_lease(&holder(2), ttl).await.unwrap());
    let fenced_b = store.fenced(b.fence());
    let now = store.get(&r).await.unwrap().unwrap();
    fenced_b
        .update_status(
            &r,
            json!({ "by": "b" }),
            Some(now.metadata.resource_version),
        )
        .await
        .expect("B writes under its own lease");
    // A's late writes, from what it read before or reads now: refused.
    let now = store.get(&r).await.unwrap().unwrap();
    for expected in [Some(now.metadata.resource_version), None] {
        let err = fenced_a
            .update_status(&r, json!({ "by": "a, late" }), expected)
            .await
            .expect_err("A no longer holds the lease");
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(
            vmctl_api::error_chain(&err).contains("no longer holds the agent lease"),
            "{}",
            vmctl_api::error_chain(&err)
        );
    }
    let err = fenced_a
        .apply(vm("vm0", 2), None, None)
        .await
        .expect_err("fenced");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let err = fenced_a
        .set_finalizers(&r, vec!["x".into()], None)
        .await
        .expect_err("fenced");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let after = store.get(&r).await.unwrap().unwrap();
    assert_eq!(after, now, "nothing changed");
    assert_eq!(after.status, Some(json!({ "by": "b" })));
    // The API's store is not fenced.
    store.apply(vm("vm0", 3), None, None).await.unwrap();
    b.release().await.unwrap();
}
