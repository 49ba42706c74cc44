//! Group commit: writers share fsyncs.
//!
//! A writer commits its sled transaction (in memory) under the writer lock,
//! hands the event to the [`Committer`] and waits until a flush that started
//! after its commit has finished. The first waiter to find no flush running
//! becomes the leader and flushes everything committed so far; the others
//! wait on the condition variable and are released together. With N writers
//! one fsync acknowledges up to N writes.
//!
//! ```text
//!  writer ── commit ──> committed=7 ──┐
//!                                     ├─ leader: flush() ──> durable=7 ──> publish 5,6,7 to watchers
//!  writer ── commit ──> committed=6 ──┘   (5, 6, 7 wait on the condvar)
//! ```
//!
//! Watchers are fed only from here, after the flush: a watcher never sees an
//! event that a crash could still take back.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::error::{Result, StoreError};
use crate::event::Event;

#[derive(Debug)]
struct State {
    /// Highest sequence committed to sled (maybe not yet on disk).
    committed: u64,
    /// Highest sequence known to be on disk.
    durable: u64,
    /// Whether a leader is flushing right now.
    flushing: bool,
    /// Committed events not yet published, in sequence order.
    pending: Vec<Arc<Event>>,
    /// A flush failed: nothing may be acknowledged any more.
    poisoned: bool,
}

/// Shares flushes between writers and publishes durable events.
#[derive(Debug)]
pub(crate) struct Committer {
    state: Mutex<State>,
    flushed: Condvar,
    tx: broadcast::Sender<Arc<Event>>,
    fsync: bool,
}

impl Committer {
    /// A committer whose log is durable up to `last_seq`.
    pub(crate) fn new(last_seq: u64, watch_buffer: usize, fsync: bool) -> Self {
        let (tx, _) = broadcast::channel(watch_buffer.max(1));
        Committer {
            state: Mutex::new(State {
                committed: last_seq,
                durable: last_seq,
                flushing: false,
                pending: Vec::new(),
                poisoned: false,
            }),
            flushed: Condvar::new(),
            tx,
            fsync,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent counters behind
        // (every update is a single assignment), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a committed event. Callers hold the writer lock, so events
    /// arrive in sequence order.
    pub(crate) fn committed(&self, ev: Arc<Event>) {
        let mut s = self.lock();
        s.committed = ev.seq;
        s.pending.push(ev);
    }

    /// Fails if an earlier flush failed.
    pub(crate) fn check(&self) -> Result<()> {
        if self.lock().poisoned { Err(StoreError::Poisoned) } else { Ok(()) }
    }

    /// The highest sequence on disk.
    pub(crate) fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// A new receiver of durable events.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Blocks until `seq` is on disk, flushing as the leader if no flush is
    /// running.
    pub(crate) fn wait_durable(&self, db: &sled::Db, seq: u64) -> Result<()> {
        let mut s = self.lock();
        loop {
            if s.poisoned {
                return Err(StoreError::Poisoned);
            }
            if s.durable >= seq {
                return Ok(());
            }
            if s.flushing {
                s = self.flushed.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            s.flushing = true;
            let target = s.committed;
            drop(s);
            let flushed = if self.fsync { db.flush().map(drop) } else { Ok(()) };
            s = self.lock();
            s.flushing = false;
            if let Err(e) = flushed {
                tracing::error!(error = %e, "store flush failed; refusing further writes");
                s.poisoned = true;
                self.flushed.notify_all();
                return Err(StoreError::Sled(e));
            }
            s.durable = s.durable.max(target);
            let n = s.pending.partition_point(|e| e.seq <= target);
            for ev in s.pending.drain(..n) {
                // No receivers is fine: nobody is watching.
                let _ = self.tx.send(ev);
            }
            self.flushed.notify_all();
        }
    }
}
