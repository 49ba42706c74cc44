//! The event-sourced object store of a vmctl agent.
//!
//! Every change to an object is an [`Event`] appended to a log; the current
//! objects are the [`fold`] of that log, kept materialised beside it. The
//! [`Store`] trait is what controllers and the API see; [`SledStore`] is the
//! sled implementation (one database per agent, trees `events`, `objects`,
//! `index` and `meta`).
//!
//! Guarantees:
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
pub mod event;
pub mod fold;
mod plan;
mod sled_store;
mod sled_write;
mod watch;

use vmctl_api::{ApplySource, Kind, Note, Object, ObjectRef, Time};

pub use compact::{CompactReport, Retention};
pub use error::{Result, StoreError};
pub use event::{Change, Event};
pub use plan::Outcome;
pub use sled_store::{Durability, OpenReport, Options, RebuildReport, SCHEMA_VERSION, SledStore};
pub use watch::Watch;

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

/// The store as controllers and the API see it.
///
/// Writes block until durable (an fsync shared with concurrent writers,
/// typically well under a millisecond); call them from `spawn_blocking`
/// when that matters. `expected_rv`: `Some(rv)` fails with
/// [`StoreError::Conflict`] unless the object's resourceVersion is `rv`
/// (`Some(0)`: the object must not exist).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Creates the object, or replaces its spec, labels, annotations and
    /// apply source. The store assigns uid, generation, resourceVersion and
    /// timestamps; status and (after create) finalizers of `obj` are
    /// ignored. Nothing changed: [`Outcome::Unchanged`], no event.
    fn apply(
        &self,
        obj: Object,
        source: Option<ApplySource>,
        expected_rv: Option<u64>,
    ) -> Result<Written>;
    /// Replaces the status; cannot touch the spec.
    fn update_status(
        &self,
        r: &ObjectRef,
        status: serde_json::Value,
        expected_rv: Option<u64>,
    ) -> Result<Written>;
    /// Replaces the finalizers; clearing them on an object being deleted deletes it.
    fn set_finalizers(
        &self,
        r: &ObjectRef,
        finalizers: Vec<String>,
        expected_rv: Option<u64>,
    ) -> Result<Written>;
    /// Deletes at once if there are no finalizers, else sets the deletion timestamp.
    fn request_delete(&self, r: &ObjectRef, expected_rv: Option<u64>) -> Result<Written>;
    /// Appends a note about an object (which need not exist); returns its sequence.
    fn record_note(&self, note: Note) -> Result<u64>;
    /// The object, if it exists.
    fn get(&self, r: &ObjectRef) -> Result<Option<Object>>;
    /// The objects of one kind, or of every kind.
    fn list(&self, kind: Option<Kind>) -> Result<Listing>;
    /// Durable events with a sequence above `after`, then live ones.
    fn watch(&self, after: u64) -> Result<Watch>;
    /// Every event kept for one object, oldest first (all spec changes survive compaction).
    fn history(&self, r: &ObjectRef) -> Result<Vec<Event>>;
    /// Notes about one object, or about all, oldest first.
    fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<RecordedNote>>;
    /// The last sequence number written.
    fn last_seq(&self) -> u64;
    /// Drops events the retention no longer needs.
    fn compact(&self, retention: &Retention) -> Result<CompactReport>;
    /// Recomputes the objects tree (and index) from the log.
    fn rebuild(&self) -> Result<RebuildReport>;
}
