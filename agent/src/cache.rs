//! An in-memory copy of every object, kept current from the store's watch
//! (like the Kubernetes API server's watch cache), so that lists do not
//! decode every object from disk on each request.
//!
//! Reads wait until the cache has caught up with the store's last sequence
//! at the time of the request, so a list right after an apply sees it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vmctl_api::{Kind, Object, ObjectRef};
use vmctl_store::{Store, WatchItem, fold};

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<ObjectRef, Object>,
    rv: u64,
}

/// The cache; cheap to share.
#[derive(Debug)]
pub struct ObjectCache {
    state: RwLock<State>,
    seen: tokio::sync::watch::Sender<u64>,
}

impl ObjectCache {
    /// Starts filling the cache from `store` until `stop` fires.
    pub fn start(store: Arc<dyn Store>, stop: tokio::sync::watch::Receiver<bool>) -> Arc<Self> {
        let cache = Arc::new(ObjectCache {
            state: RwLock::new(State::default()),
            seen: tokio::sync::watch::channel(0).0,
        });
        tokio::spawn(cache.clone().run(store, stop));
        cache
    }

    async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let listing = match store.list(None).await {
                Ok(l) => l,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let rv = listing.resource_version;
            {
                let mut st = self.state.write().expect("cache lock");
                st.objects = listing
                    .objects
                    .into_iter()
                    .map(|o| (o.object_ref(), o))
                    .collect();
                st.rv = rv;
            }
            self.seen.send_replace(rv);
            let Ok(mut watch) = store.watch(rv).await else {
                continue;
            };
            loop {
                let item = tokio::select! {
                    // Both arms are cancel-safe: `next_item` loses nothing when
                    // dropped (the watch keeps its position), `changed` only waits.
                    item = watch.next_item() => item,
                    _ = stop.changed() => return,
                };
                let ev = match item {
                    Ok(WatchItem::Event(ev)) => ev,
                    // Nothing of ours changed up to `seq` (the store wrote
                    // something else, e.g. the agent lease): reads waiting
                    // for it go on.
                    Ok(WatchItem::Bookmark(seq)) => {
                        let mut st = self.state.write().expect("cache lock");
                        st.rv = st.rv.max(seq);
                        self.seen.send_if_modified(|s| {
                            let newer = seq > *s;
                            *s = (*s).max(seq);
                            newer
                        });
                        continue;
                    }
                    Err(_) => break, // too old or lagged: list again
                };
                {
                    let mut st = self.state.write().expect("cache lock");
                    // A listing may already hold changes newer than its
                    // resourceVersion; never step an object backwards.
                    let newer = st
                        .objects
                        .get(&ev.object)
                        .is_some_and(|o| o.metadata.resource_version >= ev.seq);
                    if !newer {
                        fold::step(&mut st.objects, &ev);
                    }
                    st.rv = st.rv.max(ev.seq);
                }
                self.seen.send_replace(ev.seq);
            }
        }
    }

    /// Waits until the cache reflects sequence `rv` (at most `timeout`).
    pub async fn caught_up(&self, rv: u64, timeout: Duration) -> bool {
        let mut rx = self.seen.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|seen| *seen >= rv))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Calls `f` with the objects of `kind`, under the read lock.
    pub fn visit<T>(
        &self,
        kind: Kind,
        f: impl FnOnce(&mut dyn Iterator<Item = &Object>) -> T,
    ) -> T {
        let st = self.state.read().expect("cache lock");
        let mut it = st.objects.values().filter(|o| o.kind == kind);
        f(&mut it)
    }

    /// Serialises the objects of `kind` (or all) matching `keep` as an
    /// `ObjectList` body, under the read lock, without copying them.
    pub fn list_json(&self, kind: Option<Kind>, keep: impl Fn(&Object) -> bool) -> Vec<u8> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ListRef<'a> {
            items: Vec<&'a Object>,
            resource_version: u64,
        }
        let st = self.state.read().expect("cache lock");
        let items = st
            .objects
            .values()
            .filter(|o| kind.is_none_or(|k| o.kind == k) && keep(o))
            .collect();
        serde_json::to_vec(&ListRef {
            items,
            resource_version: st.rv,
        })
        .expect("objects serialise")
    }
}
