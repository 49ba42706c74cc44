//! The sled write path: planning a batch of writes and committing it as
//! one transaction (see [`commit`](crate::commit) for the batching).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use vmctl_api::{Object, ObjectRef, Time};

use crate::commit::{Answer, BatchWriter, Committer, Planner, Request};
use crate::error::Result;
use crate::event::{self, Event};
use crate::plan::Outcome;
use crate::sled_store::{Db, Durability, Inner, META_LAST_SEQ, META_OBJECTS, META_VIEW};
use crate::{Written, fold};

/// One planned write of a batch, encoded.
struct Staged {
    seq: u64,
    event: Vec<u8>,
    key: Vec<u8>,
    object: Option<Vec<u8>>,
    index_key: Vec<u8>,
    /// How the write changes the number of objects (-1, 0 or 1).
    delta: i64,
}

/// A staged write and the event it appends.
type StagedEvent = (Staged, Arc<Event>);

/// One planned request: where to answer, its result, its event if any.
type Planned = (
    std::sync::mpsc::SyncSender<crate::commit::Reply>,
    Result<Written>,
    Option<Arc<Event>>,
);

impl Db {
    pub(crate) fn get_key(&self, key: &[u8]) -> Result<Option<Object>> {
        self.objects
            .get(key)?
            .map(|v| event::decode(&v))
            .transpose()
    }

    /// Plans one request against `overlay` (the objects as this batch left
    /// them) or the tree, and stages its event.
    fn stage(
        &self,
        req_object: &ObjectRef,
        plan: Planner,
        seq: u64,
        now: Time,
        overlay: &mut HashMap<Vec<u8>, Option<Object>>,
    ) -> Result<(Written, Option<StagedEvent>)> {
        let key = event::object_key(req_object);
        let prev = match overlay.get(&key) {
            Some(o) => o.clone(),
            None => self.get_key(&key)?,
        };
        let Some((change, outcome)) = plan(prev.as_ref(), now)? else {
            return Ok((
                Written {
                    outcome: Outcome::Unchanged,
                    object: prev,
                    seq: None,
                },
                None,
            ));
        };
        let ev = Event {
            seq,
            time: now,
            object: req_object.clone(),
            change,
        };
        let had = prev.is_some();
        let next = fold::apply_event(prev, &ev);
        let staged = Staged {
            seq,
            event: event::encode(&ev)?,
            object: next.as_ref().map(event::encode).transpose()?,
            index_key: event::index_key(req_object, seq),
            key: key.clone(),
            delta: i64::from(next.is_some()) - i64::from(had),
        };
        overlay.insert(key, next.clone());
        Ok((
            Written {
                outcome,
                object: next,
                seq: Some(seq),
            },
            Some((staged, Arc::new(ev))),
        ))
    }
}

impl Inner {
    /// Plans `batch` in order against `db` and commits it in one
    /// transaction (not yet flushed). On a storage error, the planned
    /// answers are returned with the error, to be replaced by it.
    fn commit_batch(
        &self,
        db: &Db,
        batch: Vec<Request>,
    ) -> (Vec<Planned>, std::result::Result<(), sled::Error>) {
        let mut last_seq = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let now = chrono::Utc::now();
        let mut seq = *last_seq;
        let mut overlay = HashMap::new();
        let mut staged = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        for Request {
            object,
            plan,
            reply,
        } in batch
        {
            match db.stage(&object, plan, seq + 1, now, &mut overlay) {
                Ok((written, Some((st, ev)))) => {
                    seq = st.seq;
                    staged.push(st);
                    answers.push((reply, Ok(written), Some(ev)));
                }
                Ok((written, None)) => answers.push((reply, Ok(written), None)),
                Err(e) => answers.push((reply, Err(e), None)),
            }
        }
        if staged.is_empty() {
            return (answers, Ok(()));
        }
        let count = staged
            .iter()
            .fold(self.object_count.load(Ordering::SeqCst), |n, st| {
                n.saturating_add_signed(st.delta)
            });
        let committed = (&db.events, &db.objects, &db.index, &db.meta)
            .transaction(|(events, objects, index, meta)| {
                for st in &staged {
                    events.insert(&event::seq_key(st.seq), st.event.as_slice())?;
                    match &st.object {
                        Some(b) => objects.insert(st.key.as_slice(), b.as_slice())?,
                        None => objects.remove(st.key.as_slice())?,
                    };
                    index.insert(st.index_key.as_slice(), &[])?;
                }
                meta.insert(META_LAST_SEQ, &event::seq_key(seq))?;
                // The checkpoint: the objects tree and index reflect the log
                // up to `seq` and hold `count` objects (what open checks).
                meta.insert(META_VIEW, &event::seq_key(seq))?;
                meta.insert(META_OBJECTS, &event::seq_key(count))?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => e,
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            });
        if committed.is_ok() {
            *last_seq = seq;
            self.object_count.store(count, Ordering::SeqCst);
        }
        (answers, committed)
    }

    /// Makes everything committed so far durable.
    fn flush(&self, db: &Db) -> std::result::Result<(), sled::Error> {
        if self.durability != Durability::None {
            db.db.flush()?;
        }
        if self.durability == Durability::Fsync {
            db.data_file.sync_data()?;
        }
        Ok(())
    }
}

impl BatchWriter for Inner {
    fn write_batch(&self, committer: &Committer, batch: Vec<Request>) -> Vec<Answer> {
        // Readers wait from the transaction until the flush (or the reopen
        // that undoes a failed one): they never see a write that is not durable.
        let mut g = self.write_lock();
        if self.reopen_if_due(&mut g).is_err() {
            return batch
                .into_iter()
                .map(|r| (r.reply, Err(self.broken_error())))
                .collect();
        }
        let db = g.as_ref().expect("reopen_if_due succeeded");
        let (planned, committed) = self.commit_batch(db, batch);
        let durable = committed.and_then(|()| {
            let t = std::time::Instant::now();
            let flushed = self.flush(db);
            committer.count_flush(t.elapsed());
            flushed
        });
        match durable {
            Ok(()) => {
                committer.publish(planned.iter().filter_map(|(_, _, ev)| ev.clone()));
                planned
                    .into_iter()
                    .map(|(reply, r, _)| (reply, r))
                    .collect()
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "store write failed; reopening the database to drop what was not written");
                // Reopening reads back what is on disk: if this batch's
                // transaction got there after all, it is durable now and
                // its answers stand (the batch is one transaction: all or none).
                let reopened = self.reopen(&mut g).is_ok();
                let kept = reopened
                    && planned
                        .iter()
                        .rev()
                        .find_map(|(_, _, ev)| ev.as_ref())
                        .is_some_and(|last| last.seq <= committer.durable());
                planned
                    .into_iter()
                    .map(|(reply, r, _)| {
                        if kept {
                            (reply, r)
                        } else {
                            (reply, Err(self.storage_error(e.clone())))
                        }
                    })
                    .collect()
            }
        }
    }
}
