//! The event-sourced object store of a vmctl agent.
//!
//! Every change to an object is an [`Event`]; the current objects are the
//! [`fold`] of those events. The [`Store`] trait is the contract controllers
//! and the API see, whatever the backend; every backend passes the same
//! conformance suite (`store/tests/conformance/`). Backends:
//! * [`SledStore`]: embedded, the default (one database per agent, trees
//!   `events`, `objects`, `index` and `meta`); its maintenance
//!   ([`SledStore::compact`], [`SledStore::rebuild`]) is its own;
//! * [`EtcdStore`]: etcd v3, resourceVersion = etcd's revision (see the
//!   [`etcd`] module).
//!
//! Guarantees of the sled backend:
//! * a write is one transaction (sequence, event, object, index) and is
//!   acknowledged only once flushed to disk; concurrent writers share fsyncs
//!   ([`commit`](crate::commit) module);
//! * the sequence number is the object's `resourceVersion`; `generation`
//!   rises only when the spec changes; a write may carry the
//!   resourceVersion it expects and fails with [`StoreError::Conflict`];
//! * watchers see only durable events, in order, and never block writers
//!   (see [`Watch`]);
//! * on open, the log is checked and the objects tree compared with its
//!   fold; a damaged view is rebuilt from the log (with a warning), a
//!   damaged log is refused with [`StoreError::Corrupt`].

mod commit;
mod compact;
mod error;
pub mod etcd;
pub mod event;
pub mod fold;
mod plan;
mod sled_store;
mod sled_trait;
mod sled_write;
pub mod testing;
mod watch;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};

use vmctl_api::{ApplySource, Kind, Note, Object, ObjectRef, Time};

pub use compact::{CompactReport, Retention};
pub use error::{BoxError, Result, StoreError};
pub use etcd::{AgentLease, EtcdOptions, EtcdStore, Fence, LeaseHolder, LeaseOutcome};
pub use event::{Change, Event};
pub use plan::Outcome;
pub use sled_store::{Durability, OpenReport, Options, RebuildReport, SCHEMA_VERSION, SledStore};
pub use watch::Watch as SledWatch;

/// The result of a write.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// What the write did.
    pub outcome: Outcome,
    /// The object after the write; `None` once it is deleted.
    pub object: Option<Object>,
    /// The sequence of the appended event; `None` when nothing changed.
    pub seq: Option<u64>,
}

/// A snapshot of objects and the sequence to watch from after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    /// The objects, ordered by kind then name.
    pub objects: Vec<Object>,
    /// Every event up to this sequence is reflected in `objects` (some
    /// later ones may be too: replaying them with [`fold::step`] converges,
    /// since every event sets absolute values). Watch from here.
    pub resource_version: u64,
}

/// A note as recorded in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedNote {
    /// The note's sequence number.
    pub seq: u64,
    /// When it was recorded.
    pub time: Time,
    /// The note.
    pub note: Note,
}

/// The store as controllers and the API see it: the contract every backend
/// fulfils (proved by the conformance suite in `store/tests/conformance/`).
///
/// Writes return once durable (sled: fsynced; etcd: committed by a quorum).
/// `expected_rv`: `Some(rv)` fails with [`StoreError::Conflict`] unless the
/// object's resourceVersion is `rv` (`Some(0)`: the object must not exist).
/// resourceVersions rise strictly per object and across the store, but need
/// not be contiguous (etcd's revision counts other keys too).
///
/// Errors every method may return: [`StoreError::Unavailable`] (retry
/// later; nothing was written), [`StoreError::Backend`] (opaque, with its
/// chain), [`StoreError::Codec`].
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Creates the object, or replaces its spec, labels, annotations and
    /// apply source. The store assigns uid, generation, resourceVersion and
    /// timestamps; status and (after create) finalizers of `obj` are
    /// ignored. Nothing changed: [`Outcome::Unchanged`], no event.
    async fn apply(
        &self,
        obj: Object,
        source: Option<ApplySource>,
        expected_rv: Option<u64>,
    ) -> Result<Written>;
    /// Replaces the status; cannot touch the spec.
    async fn update_status(
        &self,
        r: &ObjectRef,
        status: serde_json::Value,
        expected_rv: Option<u64>,
    ) -> Result<Written>;
    /// Replaces the finalizers; clearing them on an object being deleted deletes it.
    async fn set_finalizers(
        &self,
        r: &ObjectRef,
        finalizers: Vec<String>,
        expected_rv: Option<u64>,
    ) -> Result<Written>;
    /// Deletes at once if there are no finalizers, else sets the deletion timestamp.
    async fn request_delete(&self, r: &ObjectRef, expected_rv: Option<u64>) -> Result<Written>;
    /// Records a note about an object (which need not exist); returns its
    /// resourceVersion. Notes expire (sled: compaction; etcd: a lease).
    async fn record_note(&self, note: Note) -> Result<u64>;
    /// The object, if it exists.
    async fn get(&self, r: &ObjectRef) -> Result<Option<Object>>;
    /// The objects of one kind, or of every kind, ordered by kind then name.
    async fn list(&self, kind: Option<Kind>) -> Result<Listing>;
    /// Every event above resourceVersion `after`, once each, in order, then
    /// live ones. [`StoreError::TooOld`] (now or from the stream) when
    /// `after` was compacted away: re-list and watch from the listing.
    async fn watch(&self, after: u64) -> Result<Watch>;
    /// Every event kept for one object, oldest first; every spec change
    /// (and deletion) survives compaction.
    async fn history(&self, r: &ObjectRef) -> Result<Vec<Event>>;
    /// Notes about one object, or about all, oldest first.
    async fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<RecordedNote>>;
    /// The store's current resourceVersion: every write acknowledged before
    /// the call is at or below it.
    async fn last_seq(&self) -> Result<u64>;
    /// Which store this is, for messages: `sled at /path`, `etcd at URL,URL`.
    fn describe(&self) -> String;
    /// Told by a caller that the store did not answer within the caller's
    /// own deadline (the agent's health probe): a remote store then treats
    /// itself as in an outage, so that the requests after fail within its
    /// outage budget instead of its full request timeout, until one
    /// reaches it again. An embedded store ignores it (the default).
    fn mark_unreachable(&self) {}
}

/// A watch: a stream of events in resourceVersion order, without gaps or
/// duplicates. An `Err` item ends it ([`StoreError::TooOld`]: re-list;
/// [`StoreError::Unavailable`]: the backend went away, re-list later).
/// Dropping it unsubscribes.
pub struct Watch {
    stream: Pin<Box<dyn Stream<Item = Result<WatchItem>> + Send>>,
}

/// What a [`Watch`] yields: an event, or word that nothing of the watched
/// objects changed up to a sequence (Kubernetes' watch `BOOKMARK`).
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// An event, in sequence order.
    Event(Arc<Event>),
    /// Every event up to and including this sequence has been delivered:
    /// the store wrote something at this sequence that is no event of an
    /// object (etcd: the agent lease, the history), so a reader waiting
    /// for [`Store::last_seq`] is not left waiting for an event that never
    /// comes. Never below an event already delivered.
    Bookmark(u64),
}

impl WatchItem {
    /// The event's sequence, or the bookmark's.
    pub fn seq(&self) -> u64 {
        match self {
            WatchItem::Event(ev) => ev.seq,
            WatchItem::Bookmark(seq) => *seq,
        }
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// Wraps a backend's event stream (a backend without bookmarks).
    pub fn new(stream: impl Stream<Item = Result<Arc<Event>>> + Send + 'static) -> Self {
        Watch {
            stream: Box::pin(stream.map(|r| r.map(WatchItem::Event))),
        }
    }

    /// Wraps a backend's stream of events and bookmarks.
    pub fn with_bookmarks(stream: impl Stream<Item = Result<WatchItem>> + Send + 'static) -> Self {
        Watch {
            stream: Box::pin(stream),
        }
    }

    /// Waits for the next event, skipping bookmarks. Cancel-safe: the
    /// stream keeps its position when the future is dropped. A stream that
    /// ended reports [`StoreError::Unavailable`].
    pub async fn next(&mut self) -> Result<Arc<Event>> {
        loop {
            if let WatchItem::Event(ev) = self.next_item().await? {
                return Ok(ev);
            }
        }
    }

    /// Waits for the next event or bookmark; as [`Watch::next`] otherwise.
    pub async fn next_item(&mut self) -> Result<WatchItem> {
        match self.stream.next().await {
            Some(r) => r,
            None => Err(StoreError::Unavailable {
                store: "the watch".into(),
                source: "the event stream ended".into(),
            }),
        }
    }
}

impl Stream for Watch {
    type Item = Result<Arc<Event>>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        // Events only, as `next`: bookmarks are skipped.
        loop {
            return match std::task::ready!(self.stream.as_mut().poll_next(cx)) {
                Some(Ok(WatchItem::Bookmark(_))) => continue,
                Some(Ok(WatchItem::Event(ev))) => std::task::Poll::Ready(Some(Ok(ev))),
                Some(Err(e)) => std::task::Poll::Ready(Some(Err(e))),
                None => std::task::Poll::Ready(None),
            };
        }
    }
}
