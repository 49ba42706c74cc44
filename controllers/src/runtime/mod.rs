//! The controller runtime, modelled on kube-runtime.
//!
//! * [`queue`]: which object runs next; coalescing, one run per object at a
//!   time, per-object backoff.
//! * [`controller`]: the watch loop (list, then watch; re-list when the
//!   watch is too old) feeding the queue, and the workers draining it.
//!
//! A controller is a [`Reconciler`]: `reconcile(object) -> Result<Action>`
//! with an `error_policy` beside it. Reconcilers are level-triggered: they
//! read the object fresh from the store, observe the world, then act.

pub mod controller;
pub mod queue;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use vmctl_api::{Kind, Object, ObjectRef};
use vmctl_store::Event;

pub use controller::{Controller, Relations};
pub use queue::{BackoffPolicy, Queue};

/// What to do after a reconcile.
#[must_use = "an Action says when to reconcile again; return it"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Reconcile again after `d` even if nothing changes.
    pub fn requeue(d: Duration) -> Self {
        Action {
            requeue_after: Some(d),
        }
    }

    /// Reconcile again only when the object (or something it depends on)
    /// changes, or at the periodic resync.
    pub fn await_change() -> Self {
        Action {
            requeue_after: None,
        }
    }

    /// The requested delay, if any.
    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// An error a reconciler can return.
pub trait ReconcileError: std::error::Error + Send + Sync + 'static {
    /// The write lost a race (the object moved on): retry at once with
    /// fresh data, without counting a failure.
    fn is_conflict(&self) -> bool;
}

/// One controller's logic.
pub trait Reconciler: Send + Sync + 'static {
    /// The error of [`reconcile`](Self::reconcile).
    type Error: ReconcileError;

    /// The kind this controller reconciles.
    const KIND: Kind;

    /// A short name for logs and note sources (`vm-controller`).
    const NAME: &'static str;

    /// Whether a status write triggers a run. Statuses are written by
    /// their controller (no run needed), except a Node's, which its agent
    /// writes (the heartbeat) for the node lifecycle controller to judge.
    const STATUS_TRIGGERS: bool = false;

    /// Whether a status write of `status` to object `name` of
    /// [`KIND`](Self::KIND) triggers a run; by default
    /// [`STATUS_TRIGGERS`](Self::STATUS_TRIGGERS). The VM controller of a
    /// cluster node uses it to hear of the scheduler's bindings to its node.
    fn status_triggers(&self, name: &str, status: &serde_json::Value) -> bool {
        let _ = (name, status);
        Self::STATUS_TRIGGERS
    }

    /// Whether a change of object `name`'s spec or metadata (created,
    /// applied) triggers a run; by default always. The VM controller of a
    /// cluster node skips the VMs it does not know to be bound to it (the
    /// scheduler's binding, a status write, brings them).
    fn applied_triggers(&self, name: &str) -> bool {
        let _ = name;
        true
    }

    /// Brings the world closer to what `obj` asks for.
    fn reconcile(
        &self,
        obj: Arc<Object>,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// Triggers from outside the store: channels of names of objects of
    /// [`KIND`](Self::KIND) to reconcile now (a hypervisor reporting that a
    /// VM changed by itself, a probe whose result changed). Empty: the
    /// store's events are the only triggers.
    fn external_triggers(&self) -> Vec<tokio::sync::broadcast::Receiver<String>> {
        Vec::new()
    }

    /// What to do after `reconcile` failed with `err`; `backoff` is the
    /// runtime's per-object exponential delay with jitter.
    fn error_policy(&self, obj: &Object, err: &Self::Error, backoff: Duration) -> Action {
        let _ = (obj, err);
        Action::requeue(backoff)
    }

    /// Objects of [`KIND`](Self::KIND) to wake because of an event about an
    /// object of another kind. Events about this kind are handled by the runtime.
    fn related(&self, rel: &Relations, ev: &Event) -> Vec<ObjectRef> {
        let _ = (rel, ev);
        Vec::new()
    }
}
