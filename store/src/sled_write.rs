//! The sled write path: planning a batch of writes and committing it as
//! one transaction (see [`commit`](crate::commit) for the batching).

use std::collections::HashMap;
use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use vmctl_api::{Object, ObjectRef, Time};

use crate::commit::{Answer, BatchWriter, Planner, Request};
use crate::error::{Result, StoreError};
use crate::event::{self, Event};
use crate::plan::Outcome;
use crate::sled_store::{Durability, Inner, META_LAST_SEQ};
use crate::{Written, fold};

/// One planned write of a batch, encoded.
struct Staged {
    seq: u64,
    event: Vec<u8>,
    key: Vec<u8>,
    object: Option<Vec<u8>>,
    index_key: Vec<u8>,
}

/// A staged write and the event it appends.
type StagedEvent = (Staged, Arc<Event>);

impl Inner {
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
        let next = fold::apply_event(prev, &ev);
        let staged = Staged {
            seq,
            event: event::encode(&ev)?,
            object: next.as_ref().map(event::encode).transpose()?,
            index_key: event::index_key(req_object, seq),
            key: key.clone(),
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

impl BatchWriter for Inner {
    fn commit_batch(&self, batch: Vec<Request>) -> Result<Vec<Answer>> {
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
            match self.stage(&object, plan, seq + 1, now, &mut overlay) {
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
            return Ok(answers);
        }
        (&self.events, &self.objects, &self.index, &self.meta)
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
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(()) => unreachable!("the transaction never aborts"),
            })?;
        *last_seq = seq;
        Ok(answers)
    }

    fn flush(&self) -> Result<()> {
        if self.durability != Durability::None {
            self.db.flush()?;
        }
        if self.durability == Durability::Fsync {
            self.data_file
                .sync_data()
                .map_err(|e| StoreError::Sled(e.into()))?;
        }
        Ok(())
    }
}
