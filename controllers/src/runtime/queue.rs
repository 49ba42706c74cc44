//! The work queue: which object to reconcile next, and when.
//!
//! ```text
//!   trigger / schedule ──▶ pending (earliest time wins) ──due──▶ running
//!                              ▲                                    │
//!                              └──── re-armed by finish() ──────────┘
//!                                    if triggered while running
//! ```
//!
//! * An object is in `pending` at most once: repeated triggers coalesce and
//!   the earliest requested time wins.
//! * An object in `running` is never handed out again until
//!   [`Queue::finish`]; a trigger that arrives meanwhile waits in `pending`
//!   and runs once afterwards.
//! * Concurrency is bounded by the number of workers calling [`Queue::next`].
//! * [`Queue::backoff`] gives per-object exponential delays with jitter,
//!   reset by [`Queue::reset_backoff`]; [`Queue::back_off`] holds a failed
//!   object until its delay ends.
//! * A change of the object itself ([`Queue::trigger`]) runs it at once,
//!   even in its backoff. A change of an object it depends on
//!   ([`Queue::trigger_related`]) does not cut a backoff short: a failing
//!   Provision whose VM keeps writing its status still waits its delay
//!   (before, each of those writes retried it at once).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;
use vmctl_api::ObjectRef;

/// Exponential backoff bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The delay after the first failure.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_millis(500),
            max: Duration::from_secs(300),
        }
    }
}

impl BackoffPolicy {
    /// The delay after `failures` consecutive failures (≥ 1), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1 << exp).min(self.max)
    }

    /// [`delay`](Self::delay) scaled by a random factor in [0.75, 1.0], so
    /// that objects failing together do not retry together. Each step still
    /// grows (0.75 × 2 > 1) until the cap.
    pub fn jittered(&self, failures: u32) -> Duration {
        self.delay(failures)
            .mul_f64(rand::thread_rng().gen_range(0.75..=1.0))
    }
}

#[derive(Debug, Default)]
struct State {
    /// When each waiting object is due.
    pending: HashMap<ObjectRef, Instant>,
    /// Due times, earliest first; entries that no longer match `pending`
    /// are stale and skipped.
    heap: BinaryHeap<Reverse<(Instant, u64, ObjectRef)>>,
    /// Objects being reconciled.
    running: HashSet<ObjectRef>,
    /// Consecutive failures per object.
    failures: HashMap<ObjectRef, u32>,
    /// When the backoff of a failed object ends ([`Queue::back_off`]).
    backoff_until: HashMap<ObjectRef, Instant>,
    /// Pending objects asked for by [`Queue::trigger`] (a change of the
    /// object itself): a backoff does not push them back.
    urgent: HashSet<ObjectRef>,
    /// Tie-breaker keeping the heap FIFO among equal times.
    counter: u64,
}

impl State {
    fn push(&mut self, r: ObjectRef, at: Instant) {
        self.counter += 1;
        self.heap.push(Reverse((at, self.counter, r)));
    }

    /// Makes `r` pending at `at`, unless it is already due earlier (and,
    /// with `replace`, even then); returns whether its time changed.
    fn set_pending(&mut self, r: &ObjectRef, at: Instant, replace: bool) -> bool {
        match self.pending.get(r) {
            Some(&t) if t <= at && !replace => return false,
            Some(&t) if t == at => return false,
            _ => {}
        }
        self.pending.insert(r.clone(), at);
        // A running object is re-armed by finish(); pushing now would only
        // make a stale entry.
        if !self.running.contains(r) {
            self.push(r.clone(), at);
        }
        true
    }
}

/// A queue of object references; see the module docs.
#[derive(Debug, Default)]
pub struct Queue {
    state: Mutex<State>,
    notify: Notify,
    backoff: BackoffPolicy,
}

impl Queue {
    /// An empty queue with the given backoff policy.
    pub fn new(backoff: BackoffPolicy) -> Self {
        Queue {
            backoff,
            ..Default::default()
        }
    }

    /// How many objects are due and wait for a worker (Kubernetes'
    /// workqueue depth; objects scheduled for later are not counted).
    pub fn depth(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .pending
            .values()
            .filter(|at| **at <= now)
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `r` to be reconciled now: `r` itself changed (or must be
    /// looked at again), which no backoff holds up.
    pub fn trigger(&self, r: ObjectRef) {
        self.lock().urgent.insert(r.clone());
        self.schedule(r, Instant::now());
    }

    /// Asks for `r` to be reconciled after `delay`.
    pub fn schedule_after(&self, r: ObjectRef, delay: Duration) {
        self.schedule(r, Instant::now() + delay);
    }

    /// Asks for `r` to be reconciled at `at`, unless it is already due earlier.
    pub fn schedule(&self, r: ObjectRef, at: Instant) {
        let mut s = self.lock();
        if !s.set_pending(&r, at, false) {
            return;
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Asks for `r` to be reconciled because an object it depends on
    /// changed: now, or when its backoff ends if it is backing off after a
    /// failure. A trigger that arrives while `r` runs, and the run then
    /// fails, waits for that backoff too ([`back_off`](Self::back_off)).
    pub fn trigger_related(&self, r: ObjectRef) {
        let mut s = self.lock();
        let now = Instant::now();
        let at = s
            .backoff_until
            .get(&r)
            .copied()
            .filter(|&t| t > now)
            .unwrap_or(now);
        if !s.set_pending(&r, at, false) {
            return;
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Holds `r` after a failure: reconciled again after `delay`, and not
    /// before by related changes (pending ones included); a change of `r`
    /// itself ([`trigger`](Self::trigger)) still runs it at once.
    pub fn back_off(&self, r: ObjectRef, delay: Duration) {
        let mut s = self.lock();
        let at = Instant::now() + delay;
        s.backoff_until.insert(r.clone(), at);
        let replace = !s.urgent.contains(&r);
        if s.set_pending(&r, at, replace) {
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Takes a due object that is not running, or says when to look again.
    fn try_take(&self) -> Result<ObjectRef, Option<Instant>> {
        let mut s = self.lock();
        let now = Instant::now();
        while let Some(Reverse((at, _, r))) = s.heap.peek().cloned() {
            if s.pending.get(&r) != Some(&at) || s.running.contains(&r) {
                s.heap.pop();
                continue;
            }
            if at > now {
                return Err(Some(at));
            }
            s.heap.pop();
            s.pending.remove(&r);
            s.urgent.remove(&r);
            s.running.insert(r.clone());
            return Ok(r);
        }
        Err(None)
    }

    /// Waits for a due object and marks it running. Cancel-safe: the object
    /// is taken only in the poll that returns it.
    pub async fn next(&self) -> ObjectRef {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a trigger between the look and the
            // wait is not missed.
            notified.as_mut().enable();
            match self.try_take() {
                Ok(r) => {
                    // Another worker may be able to take the next one.
                    if self.has_due() {
                        self.notify.notify_one();
                    }
                    return r;
                }
                Err(None) => notified.await,
                Err(Some(at)) => {
                    tokio::select! {
                        // Both arms are cancel-safe: nothing is taken until try_take.
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }

    /// Whether the earliest heap entry is due. It may be stale, which costs
    /// at most one spurious wake-up; scanning `pending` would cost O(n).
    fn has_due(&self) -> bool {
        let s = self.lock();
        s.heap
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= Instant::now())
    }

    /// Marks `r` as no longer running; a trigger that arrived meanwhile makes it pending again.
    pub fn finish(&self, r: &ObjectRef) {
        let mut s = self.lock();
        s.running.remove(r);
        if let Some(&at) = s.pending.get(r) {
            s.push(r.clone(), at);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Records a failure of `r` and returns how long to wait before retrying.
    pub fn backoff(&self, r: &ObjectRef) -> Duration {
        let mut s = self.lock();
        let n = s.failures.entry(r.clone()).or_default();
        *n = n.saturating_add(1);
        let n = *n;
        drop(s);
        self.backoff.jittered(n)
    }

    /// Forgets the failures of `r` after a success.
    pub fn reset_backoff(&self, r: &ObjectRef) {
        let mut s = self.lock();
        s.failures.remove(r);
        s.backoff_until.remove(r);
    }

    /// Forgets everything about `r` (it was deleted), unless it is running or pending.
    pub fn forget(&self, r: &ObjectRef) {
        let mut s = self.lock();
        if !s.running.contains(r) && !s.pending.contains_key(r) {
            s.failures.remove(r);
            s.backoff_until.remove(r);
            s.urgent.remove(r);
        }
    }

    /// Objects waiting (due or not).
    pub fn pending_len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Objects being reconciled.
    pub fn running_len(&self) -> usize {
        self.lock().running.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;
    use vmctl_api::Kind;

    use super::*;

    fn vm(n: &str) -> ObjectRef {
        ObjectRef::new(Kind::VirtualMachine, n)
    }

    async fn next_now(q: &Queue) -> Option<ObjectRef> {
        tokio::time::timeout(Duration::from_millis(1), q.next())
            .await
            .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_related_change_does_not_cut_a_backoff_short_but_an_own_change_does() {
        let q = Queue::default();
        q.trigger(vm("a"));
        assert_eq!(next_now(&q).await, Some(vm("a")));
        // While it runs, an object it depends on changes; then it fails.
        q.trigger_related(vm("a"));
        q.back_off(vm("a"), Duration::from_secs(1));
        q.finish(&vm("a"));
        assert_eq!(next_now(&q).await, None, "held by its backoff");
        q.trigger_related(vm("a"));
        assert_eq!(next_now(&q).await, None, "still held");
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(next_now(&q).await, Some(vm("a")));
        q.back_off(vm("a"), Duration::from_secs(2));
        q.finish(&vm("a"));
        // A change of the object itself runs it at once.
        q.trigger(vm("a"));
        assert_eq!(next_now(&q).await, Some(vm("a")));
        q.reset_backoff(&vm("a"));
        q.finish(&vm("a"));
        // Without a backoff, a related change runs it at once.
        q.trigger_related(vm("a"));
        assert_eq!(next_now(&q).await, Some(vm("a")));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_never_runs_one_object_twice_at_once() {
        let q = Queue::default();
        q.trigger(vm("a"));
        assert_eq!(next_now(&q).await, Some(vm("a")));
        q.trigger(vm("a"));
        assert_eq!(next_now(&q).await, None, "a is running");
        q.finish(&vm("a"));
        assert_eq!(
            next_now(&q).await,
            Some(vm("a")),
            "the trigger waited for the run"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_triggers_coalesce() {
        let q = Queue::default();
        for _ in 0..10 {
            q.trigger(vm("a"));
            q.trigger(vm("b"));
        }
        assert_eq!(q.pending_len(), 2);
        let mut got = vec![next_now(&q).await.unwrap(), next_now(&q).await.unwrap()];
        got.sort();
        assert_eq!(got, vec![vm("a"), vm("b")]);
        assert_eq!(next_now(&q).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn earliest_requested_time_wins() {
        let q = Queue::default();
        q.schedule_after(vm("a"), Duration::from_secs(60));
        q.schedule_after(vm("a"), Duration::from_secs(5));
        q.schedule_after(vm("a"), Duration::from_secs(30));
        let start = Instant::now();
        assert_eq!(q.next().await, vm("a"));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_worker_wakes_for_a_new_trigger() {
        let q = Arc::new(Queue::default());
        q.schedule_after(vm("late"), Duration::from_secs(100));
        let q2 = q.clone();
        let h = tokio::spawn(async move { q2.next().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        q.trigger(vm("now"));
        assert_eq!(h.await.unwrap(), vm("now"));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_resets_on_success() {
        let q = Queue::new(BackoffPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        let r = vm("a");
        let delays: Vec<_> = (0..6).map(|_| q.backoff(&r)).collect();
        for w in delays[..4].windows(2) {
            assert!(w[1] > w[0], "{delays:?}");
        }
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[0] >= Duration::from_millis(75));
        q.reset_backoff(&r);
        assert!(q.backoff(&r) <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn workers_share_the_queue_with_bounded_concurrency() {
        let q = Arc::new(Queue::default());
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..50 {
            q.trigger(vm(&format!("vm{i}")));
        }
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (q, running, peak, done) = (q.clone(), running.clone(), peak.clone(), done.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let r = q.next().await;
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    q.finish(&r);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 50);
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        workers.iter().for_each(|w| w.abort());
    }

    proptest! {
        #[test]
        fn every_triggered_object_is_handed_out_exactly_once(ops in proptest::collection::vec(0u8..8, 1..64)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let q = Queue::default();
                let mut expected = HashSet::new();
                for n in &ops {
                    q.trigger(vm(&n.to_string()));
                    expected.insert(vm(&n.to_string()));
                }
                let mut got = HashSet::new();
                while let Some(r) = next_now(&q).await {
                    prop_assert!(got.insert(r.clone()), "handed out twice");
                    q.finish(&r);
                }
                prop_assert_eq!(got, expected);
                Ok(())
            })?;
        }
    }
}
