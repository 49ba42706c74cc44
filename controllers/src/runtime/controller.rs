//! The watch loop and the workers of one controller.
//!
//! ```text
//!            list ok: trigger every object of the kind
//!   Listing ───────────────────────────────────────────▶ Watching(watch)
//!      ▲  list failed: wait, retry                          │ event: trigger
//!      └──────── TooOld / watch failed ─────────────────────┘ its objects
//! ```
//!
//! Workers start only after the first list: before it the queue is empty.
//! Each of `concurrency` workers takes an object from the [`Queue`], reads it
//! fresh from the store, reconciles it inside a `tracing` span carrying the
//! object reference, and schedules the next run from the [`Action`] (or the
//! backoff on error).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;
use vmctl_api::{Kind, Object, ObjectRef};
use vmctl_store::{Change, Event, Store, StoreError, Watch};

use super::queue::{BackoffPolicy, Queue};
use super::{ReconcileError, Reconciler};

/// Errors of the runtime itself.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The store failed.
    #[error("store failed")]
    Store(#[from] StoreError),
}

/// Which objects refer to which, for cross-kind triggers: VMs by image,
/// Provisions and Snapshots by VM. Built from the listing and `Applied`/`Deleted` events.
#[derive(Debug, Default)]
pub struct Relations {
    vms_by_image: HashMap<String, BTreeSet<String>>,
    image_of_vm: HashMap<String, String>,
    provisions_by_vm: HashMap<String, BTreeSet<String>>,
    vm_of_provision: HashMap<String, String>,
    snapshots_by_vm: HashMap<String, BTreeSet<String>>,
    vm_of_snapshot: HashMap<String, String>,
}

impl Relations {
    fn set(
        forward: &mut HashMap<String, String>,
        reverse: &mut HashMap<String, BTreeSet<String>>,
        from: &str,
        to: Option<&str>,
    ) {
        if let Some(old) = forward.remove(from)
            && let Some(set) = reverse.get_mut(&old)
        {
            set.remove(from);
            if set.is_empty() {
                reverse.remove(&old);
            }
        }
        if let Some(to) = to {
            forward.insert(from.to_owned(), to.to_owned());
            reverse
                .entry(to.to_owned())
                .or_default()
                .insert(from.to_owned());
        }
    }

    /// Records `obj`'s references.
    pub fn observe(&mut self, obj: &Object) {
        let field = |f: &str| obj.spec.get(f).and_then(|v| v.as_str()).map(str::to_owned);
        match obj.kind {
            Kind::VirtualMachine => Self::set(
                &mut self.image_of_vm,
                &mut self.vms_by_image,
                obj.name(),
                field("image").as_deref(),
            ),
            Kind::Provision => Self::set(
                &mut self.vm_of_provision,
                &mut self.provisions_by_vm,
                obj.name(),
                field("vm").as_deref(),
            ),
            Kind::Snapshot => Self::set(
                &mut self.vm_of_snapshot,
                &mut self.snapshots_by_vm,
                obj.name(),
                field("vm").as_deref(),
            ),
            Kind::Image | Kind::Node => {}
        }
    }

    /// Forgets `r`'s references.
    pub fn forget(&mut self, r: &ObjectRef) {
        match r.kind {
            Kind::VirtualMachine => {
                Self::set(&mut self.image_of_vm, &mut self.vms_by_image, &r.name, None)
            }
            Kind::Provision => Self::set(
                &mut self.vm_of_provision,
                &mut self.provisions_by_vm,
                &r.name,
                None,
            ),
            Kind::Snapshot => Self::set(
                &mut self.vm_of_snapshot,
                &mut self.snapshots_by_vm,
                &r.name,
                None,
            ),
            Kind::Image | Kind::Node => {}
        }
    }

    /// The VMs that boot from `image`.
    pub fn vms_using(&self, image: &str) -> impl Iterator<Item = ObjectRef> + '_ {
        let set = self.vms_by_image.get(image);
        set.into_iter()
            .flatten()
            .map(|n| ObjectRef::new(Kind::VirtualMachine, n.clone()))
    }

    /// The Image `vm` boots from, if known.
    pub fn image_of(&self, vm: &str) -> Option<ObjectRef> {
        self.image_of_vm
            .get(vm)
            .map(|i| ObjectRef::new(Kind::Image, i.clone()))
    }

    /// The Provisions of `vm`.
    pub fn provisions_of(&self, vm: &str) -> impl Iterator<Item = ObjectRef> + '_ {
        let set = self.provisions_by_vm.get(vm);
        set.into_iter()
            .flatten()
            .map(|n| ObjectRef::new(Kind::Provision, n.clone()))
    }

    /// The Snapshots of `vm`.
    pub fn snapshots_of(&self, vm: &str) -> impl Iterator<Item = ObjectRef> + '_ {
        let set = self.snapshots_by_vm.get(vm);
        set.into_iter()
            .flatten()
            .map(|n| ObjectRef::new(Kind::Snapshot, n.clone()))
    }

    fn clear(&mut self) {
        *self = Relations::default();
    }
}

/// The watch loop's state; see the module docs.
enum State {
    /// About to list (after `delay`).
    Listing { delay: Duration },
    /// Following the log.
    Watching { watch: Box<Watch> },
}

/// How the runtime of one controller is tuned.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Objects reconciled at once.
    pub concurrency: usize,
    /// Backoff after reconcile errors.
    pub backoff: BackoffPolicy,
    /// Every object is reconciled at least this often (`None`: only on change).
    pub resync: Option<Duration>,
}

/// One controller: a reconciler, its queue, watch loop and workers.
#[derive(Debug)]
pub struct Controller<R> {
    reconciler: Arc<R>,
    store: Arc<dyn Store>,
    queue: Arc<Queue>,
    config: ControllerConfig,
}

impl<R: Reconciler> Controller<R> {
    /// A controller for `reconciler` over `store`.
    pub fn new(reconciler: R, store: Arc<dyn Store>, config: ControllerConfig) -> Self {
        Controller {
            reconciler: Arc::new(reconciler),
            store,
            queue: Arc::new(Queue::new(config.backoff)),
            config,
        }
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped). In-flight
    /// reconciles finish first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.config.concurrency.max(1) {
            tasks.spawn(worker(
                self.reconciler.clone(),
                self.store.clone(),
                self.queue.clone(),
                self.config.resync,
                shutdown.clone(),
            ));
        }
        let mut triggers = Vec::new();
        for mut rx in self.reconciler.external_triggers() {
            let queue = self.queue.clone();
            triggers.push(AbortOnDrop(tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(name) => queue.trigger(ObjectRef::new(R::KIND, name)),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(
                                controller = R::NAME,
                                missed = n,
                                "external triggers lagged; the resync catches up"
                            );
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            })));
        }
        let mut watcher = Watcher {
            state: State::Listing {
                delay: Duration::ZERO,
            },
            store: self.store.clone(),
            queue: self.queue.clone(),
            reconciler: self.reconciler.clone(),
            relations: Relations::default(),
        };
        loop {
            tokio::select! {
                // step() is cancel-safe: Watch::next loses nothing when
                // dropped, and a dropped list is simply redone.
                () = watcher.step() => {}
                // changed() is cancel-safe.
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() || shutdown.has_changed().is_err() {
                break;
            }
        }
        while tasks.join_next().await.is_some() {}
        drop(triggers);
    }
}

struct Watcher<R> {
    state: State,
    store: Arc<dyn Store>,
    queue: Arc<Queue>,
    reconciler: Arc<R>,
    relations: Relations,
}

impl<R: Reconciler> Watcher<R> {
    /// Advances the state machine by one list or one event.
    async fn step(&mut self) {
        match &mut self.state {
            State::Listing { delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(*delay).await;
                }
                let listed = async {
                    let listing = self.store.list(None).await?;
                    let watch = self.store.watch(listing.resource_version).await?;
                    Ok::<_, StoreError>((listing, watch))
                }
                .await;
                match listed {
                    Ok((listing, watch)) => {
                        self.relations.clear();
                        for obj in &listing.objects {
                            self.relations.observe(obj);
                        }
                        for obj in listing.objects.iter().filter(|o| o.kind == R::KIND) {
                            self.queue.trigger(obj.object_ref());
                        }
                        tracing::debug!(
                            controller = R::NAME,
                            objects = listing.objects.len(),
                            rv = listing.resource_version,
                            "listed"
                        );
                        self.state = State::Watching {
                            watch: Box::new(watch),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(controller = R::NAME, error = %e, "list failed; retrying");
                        self.state = State::Listing {
                            delay: Duration::from_secs(1),
                        };
                    }
                }
            }
            State::Watching { watch } => match watch.next().await {
                Ok(ev) => self.on_event(&ev),
                Err(StoreError::TooOld { .. }) => {
                    tracing::info!(controller = R::NAME, "watch too old; re-listing");
                    self.state = State::Listing {
                        delay: Duration::ZERO,
                    };
                }
                Err(e) => {
                    tracing::warn!(controller = R::NAME, error = %e, "watch failed; re-listing");
                    self.state = State::Listing {
                        delay: Duration::from_secs(1),
                    };
                }
            },
        }
    }

    fn on_event(&mut self, ev: &Event) {
        match &ev.change {
            Change::Applied { object, .. } => self.relations.observe(object),
            Change::Deleted => self.relations.forget(&ev.object),
            _ => {}
        }
        if ev.object.kind == R::KIND {
            match &ev.change {
                // Status is written only by this controller (unless it says
                // otherwise), and notes change nothing: neither needs
                // another run.
                Change::StatusUpdated { status }
                    if self.reconciler.status_triggers(&ev.object.name, status) =>
                {
                    self.queue.trigger(ev.object.clone())
                }
                Change::Applied { .. } if !self.reconciler.applied_triggers(&ev.object.name) => {}
                Change::StatusUpdated { .. } | Change::Noted { .. } => {}
                Change::Deleted => self.queue.forget(&ev.object),
                _ => self.queue.trigger(ev.object.clone()),
            }
        } else if !matches!(ev.change, Change::Noted { .. }) {
            // Not at once while it backs off after a failure.
            for r in self.reconciler.related(&self.relations, ev) {
                self.queue.trigger_related(r);
            }
        }
    }
}

async fn worker<R: Reconciler>(
    reconciler: Arc<R>,
    store: Arc<dyn Store>,
    queue: Arc<Queue>,
    resync: Option<Duration>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let r = tokio::select! {
            // Queue::next is cancel-safe: an object is taken only when returned.
            r = queue.next() => r,
            // changed() is cancel-safe.
            _ = shutdown.changed() => break,
        };
        let obj = match store.get(&r).await {
            Ok(Some(obj)) => Arc::new(obj),
            Ok(None) => {
                queue.finish(&r);
                queue.forget(&r);
                continue;
            }
            Err(e) => {
                tracing::warn!(object = %r, error = %e, "cannot read object");
                queue.back_off(r.clone(), queue.backoff(&r));
                queue.finish(&r);
                continue;
            }
        };
        let span = tracing::info_span!(
            "reconcile",
            controller = R::NAME,
            object = %r,
            generation = obj.metadata.generation,
            rv = obj.metadata.resource_version,
        );
        // Its own task, so that a panicking reconcile costs one backoff for
        // one object instead of a worker and an object stuck as running.
        let (rec, o) = (reconciler.clone(), obj.clone());
        let mut task = AbortOnDrop(tokio::spawn(
            async move { rec.reconcile(o).await }.instrument(span.clone()),
        ));
        let started = std::time::Instant::now();
        let result = (&mut task.0).await;
        let _enter = span.enter();
        let metrics = crate::metrics::Metrics::global();
        let outcome = match &result {
            Err(_) => "panic",
            Ok(Ok(_)) => "ok",
            Ok(Err(e)) if e.is_conflict() => "conflict",
            Ok(Err(_)) => "error",
        };
        metrics.reconciled(R::NAME, outcome, started);
        metrics.queue_depth(R::NAME, queue.depth());
        match result {
            Err(join) => {
                let backoff = queue.backoff(&r);
                tracing::error!(error = %join, ?backoff, "reconcile panicked");
                queue.back_off(r.clone(), backoff);
            }
            Ok(Ok(action)) => {
                queue.reset_backoff(&r);
                if let Some(d) = action.requeue_after().or(resync) {
                    queue.schedule_after(r.clone(), d);
                }
            }
            Ok(Err(e)) if e.is_conflict() => {
                tracing::debug!(error = %e, "conflict; retrying with fresh data");
                queue.trigger(r.clone());
            }
            Ok(Err(e)) => {
                let backoff = queue.backoff(&r);
                tracing::warn!(error = %ErrorChain(&e), ?backoff, "reconcile failed");
                let action = reconciler.error_policy(&obj, &e, backoff);
                if let Some(d) = action.requeue_after().or(resync) {
                    queue.back_off(r.clone(), d);
                }
            }
        }
        queue.finish(&r);
    }
}

/// Aborts the task when dropped: a killed controller leaves no reconcile running.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Displays an error with its whole `source` chain, once, at the edge.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&vmctl_api::error_chain(self.0))
    }
}

impl ControllerError {
    /// Whether this is a store conflict (the object moved on).
    pub fn is_conflict(&self) -> bool {
        matches!(self, ControllerError::Store(StoreError::Conflict { .. }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use vmctl_api::VirtualMachine;
    use vmctl_store::{Retention, SledStore};

    use super::*;
    use crate::runtime::Action;

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    impl ReconcileError for Never {
        fn is_conflict(&self) -> bool {
            false
        }
    }

    struct Noop;

    impl Reconciler for Noop {
        type Error = Never;
        const KIND: Kind = Kind::VirtualMachine;
        const NAME: &'static str = "noop";

        async fn reconcile(&self, _obj: Arc<Object>) -> Result<Action, Never> {
            Ok(Action::await_change())
        }
    }

    fn vm(name: &str) -> Object {
        let spec = serde_json::from_value(json!({"image": "img"})).unwrap();
        VirtualMachine::new(name, spec).to_object()
    }

    async fn take_all(q: &Queue) -> Vec<ObjectRef> {
        let mut got = Vec::new();
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(20), q.next()).await {
            q.finish(&r);
            got.push(r);
        }
        got.sort();
        got
    }

    #[tokio::test]
    async fn a_watch_that_is_too_old_relists_and_triggers_every_object() {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(dir.path()).unwrap();
        let store: Arc<dyn Store> = Arc::new(sled.clone());
        store.apply(vm("a"), None, None).await.unwrap();
        let queue = Arc::new(Queue::default());
        let mut w = Watcher {
            state: State::Listing {
                delay: Duration::ZERO,
            },
            store: store.clone(),
            queue: queue.clone(),
            reconciler: Arc::new(Noop),
            relations: Relations::default(),
        };
        w.step().await;
        assert!(matches!(w.state, State::Watching { .. }));
        assert_eq!(
            take_all(&queue).await,
            [ObjectRef::new(Kind::VirtualMachine, "a")]
        );

        // The watcher falls behind a compaction.
        store.apply(vm("b"), None, None).await.unwrap();
        sled.compact(&Retention {
            window: 0,
            ..Retention::default()
        })
        .unwrap();
        w.step().await;
        assert!(
            matches!(w.state, State::Listing { .. }),
            "TooOld goes back to listing"
        );
        w.step().await;
        assert!(matches!(w.state, State::Watching { .. }));
        let all = [
            ObjectRef::new(Kind::VirtualMachine, "a"),
            ObjectRef::new(Kind::VirtualMachine, "b"),
        ];
        assert_eq!(take_all(&queue).await, all);
    }

    #[tokio::test]
    async fn status_writes_and_notes_do_not_trigger_their_own_controller() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let queue = Arc::new(Queue::default());
        let mut w = Watcher {
            state: State::Listing {
                delay: Duration::ZERO,
            },
            store: store.clone(),
            queue: queue.clone(),
            reconciler: Arc::new(Noop),
            relations: Relations::default(),
        };
        w.step().await;
        let a = store
            .apply(vm("a"), None, None)
            .await
            .unwrap()
            .object
            .unwrap();
        w.step().await;
        assert_eq!(take_all(&queue).await.len(), 1, "an apply triggers");
        store
            .update_status(&a.object_ref(), json!({"phase": "Running"}), None)
            .await
            .unwrap();
        w.step().await;
        assert!(
            take_all(&queue).await.is_empty(),
            "its own status write does not"
        );
    }

    struct PanicsOnce(std::sync::atomic::AtomicUsize);

    impl Reconciler for PanicsOnce {
        type Error = Never;
        const KIND: Kind = Kind::VirtualMachine;
        const NAME: &'static str = "panics-once";

        async fn reconcile(&self, _obj: Arc<Object>) -> Result<Action, Never> {
            if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                panic!("first run panics");
            }
            Ok(Action::await_change())
        }
    }

    #[tokio::test]
    async fn a_panicking_reconcile_is_retried_after_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        store.apply(vm("a"), None, None).await.unwrap();
        let config = ControllerConfig {
            concurrency: 1,
            backoff: BackoffPolicy {
                base: Duration::from_millis(10),
                max: Duration::from_millis(10),
            },
            resync: None,
        };
        let c = Controller::new(PanicsOnce(Default::default()), store, config);
        let rec = c.reconciler.clone();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(c.run(shutdown));
        // Generous: the backoff is 10 ms, but the suite runs this on a
        // loaded 2-core machine, where 5 s was once not enough.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rec.0.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "not retried");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
