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
//! that a crash could still take back. Readers (`get`, `list`) are held off
//! from the transaction until the flush (the backend's view lock), so they
//! never see a write that is not durable either: if the flush fails (disk
//! full), the backend reopens its database from disk, which undoes the
//! batch in memory, before readers get in again.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// Where to send a write's result, and the result.
pub(crate) type Answer = (SyncSender<Reply>, Result<Written>);

/// Commits a batch. Implemented by the backend.
pub(crate) trait BatchWriter {
    /// Plans every request of `batch` in order, commits them in one
    /// transaction and makes it durable, then passes the durable events to
    /// `committer.publish`, before any reader can see what the batch wrote.
    /// Returns one answer per request. If the storage fails, the backend
    /// undoes what readers could otherwise see (by reopening its database)
    /// and answers every request of the batch with the error.
    fn write_batch(&self, committer: &Committer, batch: Vec<Request>) -> Vec<Answer>;
}

/// The shared queue, durability watermark and live feed.
pub(crate) struct Committer {
    queue: Mutex<Queue>,
    durable: AtomicU64,
    tx: broadcast::Sender<Arc<Event>>,
    /// Flushes done and nanoseconds spent in them, for the benchmarks.
    pub(crate) flushes: AtomicU64,
    pub(crate) flush_nanos: AtomicU64,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("durable", &self.durable)
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
                // The leader dropped the batch without answering: it panicked.
                Err(_) => {
                    return Err(StoreError::from(sled::Error::ReportableBug(
                        "the thread committing this write panicked".into(),
                    )));
                }
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
        for (reply, result) in backend.write_batch(self, batch) {
            let _ = reply.send(Reply::Done(result));
        }
    }

    /// Makes `events` (in sequence order, all durable) the new durable
    /// watermark and feeds them to watchers. Called by the backend while
    /// readers are held off, so a reader never sees an object newer than
    /// the watermark.
    pub(crate) fn publish(&self, events: impl IntoIterator<Item = Arc<Event>>) {
        for ev in events {
            self.durable.store(ev.seq, Ordering::SeqCst);
            // No receivers is fine: nobody is watching.
            let _ = self.tx.send(ev);
        }
    }

    /// Records one flush and the time it took (for the benchmarks).
    pub(crate) fn count_flush(&self, took: std::time::Duration) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}
