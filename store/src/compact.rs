//! Compaction: bounded growth under status churn.
//!
//! The last [`Retention::window`] events are never touched, so watchers can
//! resume anywhere inside the window. Below it (at or under the *floor*),
//! an event is dropped only if a later kept event makes it redundant for
//! the fold, or the retention says it is not wanted:
//!
//! | event              | kept below the floor                                    |
//! |--------------------|---------------------------------------------------------|
//! | Applied (created)  | always: it is the spec history                          |
//! | Applied            | always                                                  |
//! | StatusUpdated      | the newest `status_per_object` (≥ 1) of the current incarnation |
//! | FinalizersSet      | unless a later Applied/FinalizersSet/Deleted supersedes it |
//! | DeletionRequested  | always                                                  |
//! | Deleted            | always                                                  |
//! | Noted              | the newest `notes_per_object`                           |
//!
//! With `forget_deleted`, every event of an object up to its last deletion
//! below the floor is dropped too (the fold of those events is "absent").
//! Watchers below the floor get [`StoreError::TooOld`](crate::StoreError::TooOld).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use vmctl_api::ObjectRef;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::error::{Result, StoreError};
use crate::event::{self, Change, Event};
use crate::sled_store::{Inner, META_FLOOR};

/// What compaction keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The newest events kept untouched; watchers may resume anywhere in them.
    pub window: u64,
    /// Status updates kept per object below the window (at least one).
    pub status_per_object: usize,
    /// Notes kept per object below the window.
    pub notes_per_object: usize,
    /// Drop the whole history of objects deleted below the window.
    pub forget_deleted: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            window: 10_000,
            status_per_object: 3,
            notes_per_object: 50,
            forget_deleted: false,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The compaction floor after this run.
    pub floor: u64,
    /// Events dropped by this run.
    pub dropped: u64,
    /// Events left in the log.
    pub kept: u64,
}

#[derive(Default)]
pub(crate) struct Seen {
    status: usize,
    notes: usize,
    /// A later Applied/FinalizersSet/Deleted exists.
    finalizers_superseded: bool,
    /// A later create or delete exists: older statuses are dead.
    incarnation_ended: bool,
    /// `forget_deleted` and a later Deleted exists.
    forgotten: bool,
}

/// Decides, walking the log backwards, whether `ev` can go.
pub(crate) fn droppable(seen: &mut Seen, ev: &Event, r: &Retention) -> bool {
    if seen.forgotten {
        return true;
    }
    match &ev.change {
        Change::Applied { created, .. } => {
            seen.finalizers_superseded = true;
            if *created {
                seen.incarnation_ended = true;
            }
            false
        }
        Change::StatusUpdated { .. } => {
            seen.status += 1;
            seen.incarnation_ended || seen.status > r.status_per_object.max(1)
        }
        Change::FinalizersSet { .. } => std::mem::replace(&mut seen.finalizers_superseded, true),
        Change::DeletionRequested { .. } => false,
        Change::Deleted => {
            seen.finalizers_superseded = true;
            seen.incarnation_ended = true;
            seen.forgotten = r.forget_deleted;
            r.forget_deleted
        }
        Change::Noted { .. } => {
            seen.notes += 1;
            seen.notes > r.notes_per_object
        }
    }
}

/// Runs one compaction. Writers keep going meanwhile: they only append
/// above the floor, and each dropped event is redundant at every moment.
pub(crate) fn compact(inner: &Inner, r: &Retention) -> Result<CompactReport> {
    match compact_open(inner, r).map_err(StoreError::into_sled) {
        Ok(report) => Ok(report),
        Err(Ok(e)) => {
            // sled refuses every operation after an I/O error: reopen now,
            // so the next write does not fail first.
            let _ = inner.reopen(&mut inner.write_lock());
            Err(inner.storage_error(e))
        }
        Err(Err(e)) => Err(e),
    }
}

fn compact_open(inner: &Inner, r: &Retention) -> Result<CompactReport> {
    let last_seq = inner.committer.durable();
    let old_floor = inner.floor.load(Ordering::SeqCst);
    let floor = old_floor.max(last_seq.saturating_sub(r.window));
    // Raise the floor (durably) before deleting anything, so a watcher that
    // checks the floor after reading knows whether its read was complete.
    {
        let db = inner.view()?;
        db.meta.insert(META_FLOOR, &event::seq_key(floor))?;
        db.db.flush()?;
    }
    inner.floor.store(floor, Ordering::SeqCst);

    let mut seen: HashMap<ObjectRef, Seen> = HashMap::new();
    let mut drop: Vec<(u64, ObjectRef)> = Vec::new();
    {
        let db = inner.view()?;
        for v in db.events.range(..=event::seq_key(floor)).values().rev() {
            let ev: Event = event::decode(&v?)?;
            if droppable(seen.entry(ev.object.clone()).or_default(), &ev, r) {
                drop.push((ev.seq, ev.object));
            }
        }
    }
    // Each chunk's events and index entries go in one transaction, so an
    // index entry never outlives its event. Readers are held off only for
    // one chunk at a time.
    for chunk in drop.chunks(1024) {
        let db = inner.view()?;
        (&db.events, &db.index)
            .transaction(|(events, index)| {
                for (seq, obj) in chunk {
                    events.remove(&event::seq_key(*seq))?;
                    index.remove(event::index_key(obj, *seq))?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::from(e),
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })?;
    }
    let kept = {
        let db = inner.view()?;
        db.db.flush()?;
        db.events.len() as u64
    };
    let report = CompactReport {
        floor,
        dropped: drop.len() as u64,
        kept,
    };
    tracing::info!(
        floor,
        dropped = report.dropped,
        kept = report.kept,
        "store compacted"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmctl_api::Kind;

    fn ev(seq: u64, change: Change) -> Event {
        Event {
            seq,
            time: chrono::Utc::now(),
            object: ObjectRef::new(Kind::Image, "a"),
            change,
        }
    }

    /// Walks `log` backwards like `compact` and returns the kept sequences.
    fn kept(log: &[Event], r: &Retention) -> Vec<u64> {
        let mut seen = Seen::default();
        let mut out: Vec<u64> = log
            .iter()
            .rev()
            .filter(|e| !droppable(&mut seen, e, r))
            .map(|e| e.seq)
            .collect();
        out.reverse();
        out
    }

    fn status(n: u64) -> Change {
        Change::StatusUpdated {
            status: serde_json::json!({ "n": n }),
        }
    }

    #[test]
    fn only_the_newest_statuses_survive_and_at_least_one_always_does() {
        let log: Vec<Event> = (1..=5).map(|n| ev(n, status(n))).collect();
        let r = Retention {
            status_per_object: 0,
            ..Retention::default()
        };
        assert_eq!(kept(&log, &r), vec![5]);
        let r = Retention {
            status_per_object: 2,
            ..Retention::default()
        };
        assert_eq!(kept(&log, &r), vec![4, 5]);
    }

    #[test]
    fn statuses_before_a_deletion_go_but_the_deletion_stays() {
        let log = vec![ev(1, status(1)), ev(2, Change::Deleted)];
        assert_eq!(kept(&log, &Retention::default()), vec![2]);
        let r = Retention {
            forget_deleted: true,
            ..Retention::default()
        };
        assert_eq!(kept(&log, &r), Vec::<u64>::new());
    }
}
