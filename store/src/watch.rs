//! Watching the log: catch up from the `events` tree, then follow live.
//!
//! ```text
//!            subscribe, then read durable seq D
//!   CatchUp ─── events (pos, D] from the tree, in chunks ───> Live
//!      ^                                                        │
//!      └──── lagged: the live buffer overflowed ───────────────┘
//! ```
//!
//! The live feed is a bounded `tokio::sync::broadcast`: the committer never
//! waits for a watcher. A watcher that falls more than the buffer behind is
//! not dropped: it resubscribes and reads what it missed from the log. Only
//! if compaction has dropped what it needs does it get
//! [`StoreError::TooOld`] and must re-list.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::error::{Result, StoreError};
use crate::event::{self, Event};
use crate::sled_store::Inner;

/// The live feed closed. Cannot happen while the watch holds the store
/// (which owns the sender); reported rather than assumed.
fn closed() -> StoreError {
    StoreError::from(sled::Error::ReportableBug(
        "the store's live event feed closed".into(),
    ))
}

/// Events read from the tree per step while catching up.
const CHUNK: usize = 256;

/// A stream of durable events in sequence order, without gaps above the
/// compaction floor. Dropping it unsubscribes.
pub struct Watch {
    inner: Arc<Inner>,
    rx: broadcast::Receiver<Arc<Event>>,
    /// The last sequence delivered (or the starting point).
    pos: u64,
    /// Read from the tree, not yet delivered.
    backlog: VecDeque<Arc<Event>>,
    catching_up: bool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("pos", &self.pos)
            .field("catching_up", &self.catching_up)
            .finish()
    }
}

impl Watch {
    pub(crate) fn new(inner: Arc<Inner>, after: u64) -> Result<Self> {
        // Subscribe before anything is read, so no event falls between the
        // tree and the live feed.
        let rx = inner.committer.subscribe();
        let mut w = Watch {
            inner,
            rx,
            pos: after,
            backlog: VecDeque::new(),
            catching_up: true,
        };
        w.check_floor()?;
        Ok(w)
    }

    /// The last sequence delivered.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn check_floor(&mut self) -> Result<()> {
        let oldest = self.inner.floor.load(Ordering::SeqCst);
        if self.pos < oldest {
            return Err(StoreError::TooOld {
                requested: self.pos,
                oldest,
            });
        }
        Ok(())
    }

    fn deliver(&mut self, ev: Arc<Event>) -> Option<Result<Arc<Event>>> {
        if ev.seq <= self.pos {
            return None;
        }
        self.pos = ev.seq;
        Some(Ok(ev))
    }

    fn resync(&mut self) {
        tracing::debug!(pos = self.pos, "watcher lagged; catching up from the log");
        self.rx = self.inner.committer.subscribe();
        self.backlog.clear();
        self.catching_up = true;
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Arc<Event>>> {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                return self.deliver(ev);
            }
            if self.catching_up {
                match self.read_chunk() {
                    Ok(true) => continue,
                    Ok(false) => self.catching_up = false,
                    Err(e) => return Some(Err(e)),
                }
            }
            match self.rx.try_recv() {
                Ok(ev) => match self.deliver(ev) {
                    Some(r) => return Some(r),
                    None => continue,
                },
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Lagged(_)) => self.resync(),
                Err(TryRecvError::Closed) => return Some(Err(closed())),
            }
        }
    }

    /// Waits for the next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Result<Arc<Event>> {
        loop {
            if let Some(r) = self.try_next() {
                return r;
            }
            // Cancel-safe: broadcast::Receiver::recv loses no message when dropped.
            match self.rx.recv().await {
                Ok(ev) => {
                    if let Some(r) = self.deliver(ev) {
                        return r;
                    }
                }
                Err(RecvError::Lagged(_)) => self.resync(),
                Err(RecvError::Closed) => return Err(closed()),
            }
        }
    }

    /// Waits for the next event, blocking the thread. Panics inside a tokio runtime.
    pub fn next_blocking(&mut self) -> Result<Arc<Event>> {
        loop {
            if let Some(r) = self.try_next() {
                return r;
            }
            match self.rx.blocking_recv() {
                Ok(ev) => {
                    if let Some(r) = self.deliver(ev) {
                        return r;
                    }
                }
                Err(RecvError::Lagged(_)) => self.resync(),
                Err(RecvError::Closed) => return Err(closed()),
            }
        }
    }

    /// Reads durable events after the backlog's end from the tree. Returns
    /// whether any were read; `false` means caught up.
    fn read_chunk(&mut self) -> Result<bool> {
        let durable = self.inner.committer.durable();
        if self.pos >= durable {
            return Ok(false);
        }
        let range = event::seq_key(self.pos + 1)..=event::seq_key(durable);
        let db = self.inner.view()?;
        for v in db.events.range(range).values().take(CHUNK) {
            let v = v.map_err(|e| self.inner.storage_error(e))?;
            self.backlog.push_back(Arc::new(event::decode(&v)?));
        }
        drop(db);
        // Compaction raises the floor before it deletes: if the floor is
        // still at or below our position, nothing we needed was missing.
        self.check_floor()?;
        Ok(!self.backlog.is_empty())
    }
}
