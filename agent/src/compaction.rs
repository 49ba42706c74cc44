//! When the agent compacts its store's event log.

use vmctl_store::{EtcdStore, SledStore};

/// How often the log's growth is looked at.
const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Compacts the log at start (an agent that restarts often must still
/// compact) and then whenever it has grown by a retention window since the
/// last compaction (looked at every [`EVERY`]), so status heartbeats never grow
/// it without bound.
pub async fn run(
    store: SledStore,
    retention: vmctl_store::Retention,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<u64> = None;
    loop {
        let seq = store.last_seq();
        if last.is_none_or(|l| seq.saturating_sub(l) >= retention.window) {
            let (s, r) = (store.clone(), retention.clone());
            match tokio::task::spawn_blocking(move || s.compact(&r)).await {
                Ok(Ok(report)) => {
                    tracing::info!(?report, "compacted the event log");
                    last = Some(seq);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "compaction failed"),
                Err(e) => tracing::warn!(error = %e, "compaction task failed"),
            }
        }
        tokio::select! {
            // Both arms only wait; nothing is lost when either is dropped.
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Compacts etcd's history every minute to `retention.window` revisions
/// behind the current one (spec history and current objects are kept:
/// they are current keys).
pub async fn run_etcd(
    store: EtcdStore,
    retention: vmctl_store::Retention,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = 0u64;
    loop {
        tokio::select! {
            // Both arms only wait; nothing is lost when either is dropped.
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
        let Ok(rev) = store.current_revision().await else {
            continue; // unavailable: the next round tries again
        };
        let target = rev.saturating_sub(retention.window);
        if target <= last {
            continue;
        }
        match store.compact(target).await {
            Ok(at) => {
                tracing::info!(revision = at, "compacted etcd");
                last = at;
            }
            Err(e) => tracing::warn!(error = %vmctl_api::error_chain(&e), "etcd compaction failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmctl_api::{Kind, Object, ObjectMeta, ObjectRef};
    use vmctl_store::{Durability, Options, Retention, SledStore};

    #[tokio::test]
    async fn compaction_runs_at_start_so_an_agent_that_restarts_often_still_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_with(
            dir.path().join("db"),
            Options {
                durability: Durability::None,
                ..Options::default()
            },
        )
        .unwrap();
        let r = ObjectRef::new(Kind::VirtualMachine, "a");
        s.apply(
            Object::new(
                Kind::VirtualMachine,
                ObjectMeta::named("a"),
                serde_json::json!({}),
            ),
            None,
            None,
        )
        .unwrap();
        for n in 0..500 {
            s.update_status(&r, serde_json::json!({ "n": n }), None)
                .unwrap();
        }
        let retention = Retention {
            window: 100,
            ..Retention::default()
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run(s.clone(), retention, stopped));
        // Well before the first look-at-growth interval.
        let deadline = tokio::time::Instant::now() + EVERY / 2;
        while s.compaction_floor() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = stop.send(true);
        task.await.unwrap();
        assert_eq!(s.compaction_floor(), 501 - 100, "no compaction at start");
        assert!(
            s.events().unwrap().len() < 110,
            "{}",
            s.events().unwrap().len()
        );
    }
}
