//! The node lifecycle controller: a Node whose agent stops posting its
//! heartbeat becomes `Ready=False`, reason `NodeStatusUnknown` (issue 17
//! item 1). The agents are played by the test, writing Node statuses as
//! an agent does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use vmctl_api::{ConditionStatus, Kind, Node, NodeSpec, NodeStatus, Object, ObjectRef};
use vmctl_store::Store;

use crate::common::*;

/// Registers Node `name` (an agent's first write).
async fn register(s: &Arc<dyn Store>, name: &str) {
    apply(s, Node::new(name, NodeSpec::default()).to_object()).await;
}

/// The Node's status as stored.
async fn node_status(s: &Arc<dyn Store>, name: &str) -> (Object, NodeStatus) {
    let o = get(s, Kind::Node, name).await.expect("the node exists");
    let st = Node::from_object(&o).unwrap().status.unwrap_or_default();
    (o, st)
}

/// Posts a heartbeat for `name` as its agent does: `Ready=True`, the
/// heartbeat time `at`, a node lease TTL of `ttl_s`.
async fn heartbeat(s: &Arc<dyn Store>, name: &str, at: chrono::DateTime<Utc>, ttl_s: u64) {
    let (o, mut st) = node_status(s, name).await;
    st.lease_ttl_seconds = Some(ttl_s);
    st.last_heartbeat_time = Some(at);
    let c = vmctl_controllers::conditions::condition("Ready", true, "AgentReady", "", 1);
    vmctl_api::set_condition(&mut st.conditions, c, Utc::now());
    let r = ObjectRef::new(Kind::Node, name);
    s.update_status(
        &r,
        serde_json::to_value(&st).unwrap(),
        Some(o.metadata.resource_version),
    )
    .await
    .unwrap();
}

fn ready(st: &NodeStatus) -> (ConditionStatus, String) {
    let c = st.ready().expect("a Ready condition");
    (c.status, c.reason.clone())
}

/// Issue 17 item 1, with a node lease TTL of 2 s: a node whose agent posts
/// its heartbeat every TTL/3 stays Ready for longer than TTL + 2 s; once
/// the heartbeats stop it is `Ready=False` `NodeStatusUnknown` ("last
/// heartbeat at …") within TTL + 2 s of the last one (and not before),
/// with a Warning note. A node already long silent when the controllers
/// start is marked at once; the controllers' own node never is (its
/// agent's heartbeat keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_heartbeat_stops_becomes_not_ready_within_its_ttl_plus_two_seconds() {
    const TTL: u64 = 2;
    let deadline = Duration::from_secs(TTL + 2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let own = cfg.node.name.clone();
    let a = Agent::start_with(dir.path(), world(), cfg).await;
    let s = a.store.clone();

    // Long silent (an hour): the other is marked at once, the own is not.
    let old = Utc::now() - chrono::Duration::hours(1);
    for n in [own.as_str(), "host-c"] {
        register(&s, n).await;
        heartbeat(&s, n, old, TTL).await;
    }
    eventually(
        "host-c NodeStatusUnknown",
        Duration::from_secs(2),
        async || ready(&node_status(&s, "host-c").await.1).0 == ConditionStatus::False,
    )
    .await;

    // host-b beats every TTL/3 for longer than TTL + 2 s: always Ready.
    register(&s, "host-b").await;
    let started = Instant::now();
    let mut last = Instant::now();
    while started.elapsed() < deadline + Duration::from_secs(1) {
        let (_, st) = node_status(&s, "host-b").await;
        if st.last_heartbeat_time.is_some() {
            assert_eq!(ready(&st).0, ConditionStatus::True, "marked while beating");
        }
        heartbeat(&s, "host-b", Utc::now(), TTL).await;
        last = Instant::now();
        tokio::time::sleep(Duration::from_secs(TTL) / 3).await;
    }
    // The heartbeats stop.
    let marked = loop {
        let (_, st) = node_status(&s, "host-b").await;
        if ready(&st).0 == ConditionStatus::False {
            break (last.elapsed(), st);
        }
        assert!(
            last.elapsed() < deadline + Duration::from_secs(1),
            "still Ready {:?} after the last heartbeat",
            last.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (after, st) = marked;
    assert!(
        after >= deadline - Duration::from_millis(300),
        "marked {after:?} after the last heartbeat: before TTL + 2 s"
    );
    assert_eq!(ready(&st).1, "NodeStatusUnknown");
    let c = st.ready().unwrap();
    assert!(c.message.starts_with("last heartbeat at "), "{}", c.message);
    assert!(c.message.contains("TTL (2 s) + 2 s"), "{}", c.message);
    let notes = s
        .notes(Some(&ObjectRef::new(Kind::Node, "host-b")))
        .await
        .unwrap();
    assert!(
        notes.iter().any(|n| n.note.reason == "NodeNotReady"),
        "{notes:?}"
    );

    // The controllers' own node, as silent, is still Ready.
    assert_eq!(
        ready(&node_status(&s, &own).await.1).0,
        ConditionStatus::True
    );
    // A heartbeat again: Ready (its agent's write), and marked again once
    // it stops again (the status write woke the controller).
    heartbeat(&s, "host-b", Utc::now(), TTL).await;
    let again = Instant::now();
    eventually(
        "host-b marked again",
        deadline + Duration::from_secs(2),
        async || ready(&node_status(&s, "host-b").await.1).0 == ConditionStatus::False,
    )
    .await;
    assert!(again.elapsed() >= deadline - Duration::from_millis(300));
    a.stop().await;
}
