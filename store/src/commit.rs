//! Group commit: concurrent writers share one sled transaction and one fsync.
//!
//! sled 0.34 makes every multi-tree transaction roll and write its IO
//! buffer and serialises transactions behind a global lock, so a
//! transaction per write plus a flush per write caps near 2,000 writes/s
//! on this machine however many writers there are. Instead a writer queues
//! its request; the first writer to find no leader becomes the leader,
//! takes every queued request, plans each in
//! order against the objects as the batch leaves them, commits the whole
//! batch in ONE transaction (each write's event, object, index entry and
//! the last sequence), flushes once, publishes the events to watchers and
//! answers every writer; then it hands leadership to the oldest queued
//! writer (if any) and returns, so its own caller is never held hostage by
//! other writers' traffic. A write is never split across transactions, so a
//! crash keeps or loses each write whole.
//!
//! ```text
//!  writer A ─ enqueue ─┐ leader A: take [A,B,C] ─ plan ─ 1 transaction ─ flush ─ publish ─ answer A,B,C
//!  writer B ─ enqueue ─┤
//!  writer C ─ enqueue ─┘ (B, C wait for their answer)
//! ```
//!
//! Watchers are fed only after the flush: a watcher never sees an event
//! that a crash could still take back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use vmctl_api::{Object, ObjectRef, Time};

use crate::Written;
use crate::error::{Result, StoreError};
use crate::event::Event;
use crate::plan::Plan;

/// Plans one write from the object as it is (`None`: absent) and the commit time.
pub(crate) type Planner = Box<dyn FnOnce(Option<&Object>, Time) -> Result<Plan> + Send>;

/// One queued write.
pub(crate) struct Request {
    pub(crate) object: ObjectRef,
    pub(crate) plan: Planner,
    pub(crate) reply: SyncSender<Reply>,
}

/// What a waiting writer is told.
#[expect(
    clippy::large_enum_variant,
    reason = "one message per write, moved once; boxing would add an allocation per write"
)]
pub(crate) enum Reply {
    /// Its write is done (durable) or failed.
    Done(Result<Written>),
    /// The previous leader handed over: commit the next batch.
    Lead,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    leader: bool,
}

/// Where to send a write's result, the result, and the event it appended.
pub(crate) type Answer = (SyncSender<Reply>, Result<Written>, Option<Arc<Event>>);

/// Commits a batch: given the requests, returns the events written (in
/// sequence order) and one answer per request. Implemented by the backend.
pub(crate) trait BatchWriter {
    /// Plans and commits `batch` in one transaction (not yet flushed).
    fn commit_batch(&self, batch: Vec<Request>) -> Result<Vec<Answer>>;
    /// Makes everything committed so far durable.
    fn flush(&self) -> Result<()>;
}

/// The shared queue, durability watermark and live feed.
pub(crate) struct Committer {
    queue: Mutex<Queue>,
    durable: AtomicU64,
    poisoned: AtomicBool,
    tx: broadcast::Sender<Arc<Event>>,
    /// Flushes done and nanoseconds spent in them, for the benchmarks.
    pub(crate) flushes: AtomicU64,
    pub(crate) flush_nanos: AtomicU64,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("durable", &self.durable)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Committer {
    /// A committer whose log is durable up to `last_seq`.
    pub(crate) fn new(last_seq: u64, watch_buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(watch_buffer.max(1));
        Committer {
            queue: Mutex::default(),
            durable: AtomicU64::new(last_seq),
            poisoned: AtomicBool::new(false),
            tx,
            flushes: AtomicU64::new(0),
            flush_nanos: AtomicU64::new(0),
        }
    }

    /// The highest sequence on disk.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    /// A new receiver of durable events.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Queues a write and blocks until it is durable (or failed), leading
    /// the commit if nobody else is.
    pub(crate) fn submit(
        &self,
        backend: &impl BatchWriter,
        object: ObjectRef,
        plan: Planner,
    ) -> Result<Written> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StoreError::Poisoned);
        }
        let (reply, answer) = sync_channel(1);
        let lead = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.requests.push(Request {
                object,
                plan,
                reply,
            });
            !std::mem::replace(&mut q.leader, true)
        };
        if lead {
            self.lead(backend);
        }
        loop {
            match answer.recv() {
                Ok(Reply::Done(result)) => return result,
                Ok(Reply::Lead) => self.lead(backend),
                // The batch was dropped: its transaction or flush failed.
                Err(_) => return Err(StoreError::Poisoned),
            }
        }
    }

    /// Commits one batch, then hands leadership to a queued writer (so no
    /// writer leads forever and waits unboundedly for its own answer).
    fn lead(&self, backend: &impl BatchWriter) {
        let batch = std::mem::take(
            &mut self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .requests,
        );
        if !batch.is_empty() {
            self.commit(backend, batch);
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match q.requests.first() {
            // The channel holds one message and this writer has none yet.
            Some(next) => {
                let _ = next.reply.send(Reply::Lead);
            }
            None => q.leader = false,
        }
    }

    fn commit(&self, backend: &impl BatchWriter, batch: Vec<Request>) {
        if self.poisoned.load(Ordering::SeqCst) {
            for r in batch {
                let _ = r.reply.send(Reply::Done(Err(StoreError::Poisoned)));
            }
            return;
        }
        // A failed transaction means the storage failed: stop acknowledging.
        // The requests' senders drop with the batch, answering `Poisoned`.
        let results = match backend.commit_batch(batch) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store transaction failed; refusing further writes");
                self.poisoned.store(true, Ordering::SeqCst);
                return;
            }
        };
        let t = std::time::Instant::now();
        let flushed = backend.flush();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = flushed {
            tracing::error!(error = %e, "store flush failed; refusing further writes");
            self.poisoned.store(true, Ordering::SeqCst);
            return; // dropping the replies answers `Poisoned`
        }
        if let Some(last) = results.iter().rev().find_map(|(_, _, ev)| ev.as_ref()) {
            self.durable.store(last.seq, Ordering::SeqCst);
        }
        for (reply, result, ev) in results {
            if let Some(ev) = ev {
                // No receivers is fine: nobody is watching.
                let _ = self.tx.send(ev);
            }
            let _ = reply.send(Reply::Done(result));
        }
    }
}
