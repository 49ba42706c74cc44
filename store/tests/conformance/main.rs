//! The store contract, written once ([`suite`]) and run against every
//! backend: sled (a fresh database per test) and etcd (a real 3-member
//! cluster shared by this test binary, each test under its own key prefix).

mod suite;

use std::sync::Arc;

use futures::future::BoxFuture;
use vmctl_store::Store;

/// A store under test and how to compact it away below its current version.
pub struct Subject {
    pub store: Arc<dyn Store>,
    compact: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("store", &self.store)
            .finish()
    }
}

impl Subject {
    /// Compacts everything below the current resourceVersion (sled: no
    /// retention window; etcd: compaction at the current revision).
    pub async fn compact_all(&self) {
        (self.compact)().await
    }
}

/// Generates one `#[tokio::test]` per contract clause for a backend whose
/// `open(exclusive)` gives a fresh [`Subject`]. `exclusive` tests compact.
macro_rules! conformance {
    ($open:path) => {
        conformance!(@t $open, false,
            create_assigns_uid_generation_and_resource_version,
            reapplying_the_same_object_is_unchanged,
            a_stale_expected_resource_version_conflicts_and_changes_nothing,
            expected_zero_means_must_not_exist,
            generation_rises_only_when_the_spec_changes,
            status_writes_never_touch_the_spec,
            finalizers_hold_a_deletion_until_cleared,
            delete_then_recreate_gets_a_new_uid,
            notes_are_recorded_per_object_and_globally,
            missing_objects_are_not_found,
            watch_delivers_every_later_event_once_in_order,
            a_listing_resource_version_is_consistent_with_a_watch_from_it,
            sixteen_concurrent_writers_share_no_resource_version_and_lose_nothing,
            history_lists_spec_changes_oldest_first,
            history_has_every_change_and_note_of_the_object
        );
        conformance!(@t $open, true,
            history_of_spec_changes_survives_compaction,
            watch_from_a_compacted_version_is_too_old
        );
    };
    (@t $open:path, $exclusive:expr, $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let subject = $open($exclusive).await;
                crate::suite::$name(&subject).await;
            }
        )*
    };
}

mod sled {
    use super::*;

    async fn open(_exclusive: bool) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        let opts = vmctl_store::Options {
            durability: vmctl_store::Durability::None,
            ..Default::default()
        };
        let sled = vmctl_store::SledStore::open_with(dir.path().join("db"), opts).unwrap();
        let s2 = sled.clone();
        Subject {
            store: Arc::new(sled),
            compact: Box::new(move || {
                let s = s2.clone();
                Box::pin(async move {
                    tokio::task::spawn_blocking(move || {
                        s.compact(&vmctl_store::Retention {
                            window: 0,
                            status_per_object: 1,
                            notes_per_object: 0,
                            forget_deleted: false,
                        })
                    })
                    .await
                    .unwrap()
                    .unwrap();
                })
            }),
            _keep: Box::new(dir),
        }
    }

    conformance!(open);
}

mod etcd {
    use super::*;
    use vmctl_store::testing::{EtcdCluster, unique_prefix};
    use vmctl_store::{EtcdOptions, EtcdStore};

    /// Compaction is cluster-wide: a test that compacts runs alone (write
    /// lock), the others share (read lock).
    static COMPACTION: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

    async fn open(exclusive: bool) -> Subject {
        let cluster = tokio::task::spawn_blocking(EtcdCluster::shared)
            .await
            .unwrap();
        let guard: Box<dyn std::any::Any + Send + Sync> = if exclusive {
            Box::new(COMPACTION.write().await)
        } else {
            Box::new(COMPACTION.read().await)
        };
        let mut opts = EtcdOptions::new(cluster.endpoints());
        opts.prefix = unique_prefix();
        let etcd = EtcdStore::connect(opts).await.unwrap();
        let e2 = etcd.clone();
        Subject {
            store: Arc::new(etcd),
            compact: Box::new(move || {
                let e = e2.clone();
                Box::pin(async move {
                    let rev = e.current_revision().await.unwrap();
                    e.compact(rev).await.unwrap();
                })
            }),
            _keep: guard,
        }
    }

    conformance!(open);
}
