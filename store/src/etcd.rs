//! [`Store`] over etcd v3 (with the `etcd-client` crate).
//!
//! Keys, under a configurable prefix `P` (default `/vmctl/`), so that
//! several installations can share one etcd:
//!
//! | key                               | value                                    |
//! |-----------------------------------|------------------------------------------|
//! | `P@o/{Kind}/{name}`               | the object and its last change           |
//! | `P@n/{Kind}/{name}/{uuid}`        | a note, attached to a lease (expires)    |
//! | `P@h/{Kind}/{name}/{uid}/{prev}`  | one change of the object (history)       |
//!
//! * `P` starts and ends with `/` and contains no `@` ([`check_prefix`]),
//!   so no installation's keys lie in another's ranges, even when one
//!   prefix is inside the other (`/nest/` and `/nest/o/`: the first one's
//!   ranges start `/nest/@`, the second one's keys `/nest/o/`). With the
//!   sections right under `P` (`P/o/…`, before), a listing under `/nest/`
//!   read `/nest/o/`'s keys as its own, and its compaction pruned their
//!   history.

//! * resourceVersion = etcd's revision: an object's is its key's
//!   `mod_revision`, a listing's is the revision of its range read.
//! * Every write is ONE round trip when the store knows the object: one
//!   transaction that compares the object key's `mod_revision` with the one
//!   the plan was made from (`version == 0`: absent) and, in the same
//!   transaction, writes the history key. The plan is made from the object
//!   as this store last wrote or read it (a cache keyed by `mod_revision`,
//!   so a cached object is exactly what etcd holds at that revision); an
//!   object it does not know is assumed absent for `apply`. When the compare
//!   fails, the transaction's else branch reads the current object, and the
//!   write plans again on it, without another round trip. Outcomes that
//!   write nothing (unchanged, a conflict, not found) are only given after
//!   a fresh read, so a stale cache can cost a round trip, never a wrong
//!   answer. [`StoreError::Conflict`] comes only from the caller's own
//!   `expected_rv`.
//! * The watch covers `P@lease/`, `P@n/` and `P@o/` (one key per revision)
//!   and turns each etcd event of a note or object into an [`Event`], and
//!   a revision with none (the agent lease) into a
//!   [`WatchItem::Bookmark`]; a start revision compacted away
//!   is [`StoreError::TooOld`]. One etcd watch per store is fanned out in
//!   process to every subscriber near its position (it keeps the last
//!   [`HUB_RECENT`] events for late subscribers); a subscriber that falls
//!   behind, or starts below what it keeps, gets its own etcd watch from
//!   its position (every event still once, in order).
//! * History keys (`P@h/…`) are current keys, written in the same
//!   transaction as every change (spec, status, finalizers, deletion), so
//!   they survive etcd's own compaction; [`EtcdStore::compact`] prunes them
//!   below the compacted revision as sled's compaction prunes its log
//!   ([`EtcdOptions::retention`]: spec changes and deletions always stay).
//!   [`Store::history`] adds the object's notes, as sled's does.
//! * Notes expire with their lease ([`EtcdOptions::note_ttl`]).
//! * `P@lease/agent` is the installation's agent lease: one agent at a
//!   time runs the controllers of a prefix ([`EtcdStore::acquire_lease`]).
//!   `P@lease/node/{name}` is a node's lease: held by the agent that
//!   registered the Node `name` while it runs
//!   ([`EtcdStore::acquire_node_lease`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

mod lease;
pub use lease::{AgentLease, LeaseHolder, LeaseOutcome};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use vmctl_api::{ApplySource, Kind, Note, Object, ObjectRef, Time};

use crate::compact::{Retention, Seen, droppable};
use crate::error::{BoxError, Result, StoreError};
use crate::event::{self, Change, Event};
use crate::plan::{self, Outcome, Plan};
use crate::{Listing, RecordedNote, Store, Watch, WatchItem, Written, fold};

/// Largest gRPC message accepted (a listing of many objects is one message).
const MAX_MESSAGE: usize = 256 << 20;

/// Events the store's shared watch keeps for subscribers that start a
/// little behind it (and the depth of its fan-out channel).
pub const HUB_RECENT: usize = 4096;

/// Objects whose last known `(value, mod_revision)` a store remembers to
/// plan writes without reading first; beyond it the cache starts again.
const CACHE_MAX: usize = 100_000;

/// Operations etcd accepts in one transaction (its `--max-txn-ops` default).
const MAX_TXN_OPS: usize = 128;

/// What separates the prefix from the sections of vmctl's keys
/// (`P@o/…`); never part of a prefix, see [`check_prefix`].
const SECTION_MARK: char = '@';

/// Checks an etcd key prefix: it starts and ends with `/` and contains no
/// `@` (the mark that starts vmctl's sections after it, so that no
/// installation's keys fall inside another's ranges, even when one prefix
/// is inside the other). Returns what is wrong, as a sentence naming the
/// prefix.
pub fn check_prefix(prefix: &str) -> std::result::Result<(), String> {
    if !(prefix.starts_with('/') && prefix.ends_with('/')) {
        return Err(format!(
            "etcd key prefix `{prefix}` must start and end with `/` (e.g. \"/vmctl/\")"
        ));
    }
    if prefix.contains(SECTION_MARK) {
        return Err(format!(
            "etcd key prefix `{prefix}` must not contain `{SECTION_MARK}` (vmctl's keys \
             are `PREFIX{SECTION_MARK}o/…`: the mark keeps installations with nested \
             prefixes apart)"
        ));
    }
    Ok(())
}

/// How to reach etcd and lay out vmctl's keys in it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`; requests are balanced over them.
    pub endpoints: Vec<String>,
    /// Every key starts with this (default `/vmctl/`); give each installation its own.
    pub prefix: String,
    /// How long a note lives (attached to a lease; default 1 hour). Notes
    /// expire between half this and this after they are written.
    pub note_ttl: Duration,
    /// Deadline of one request (default 5 s).
    pub request_timeout: Duration,
    /// Deadline of connecting to one endpoint (default 2 s).
    pub connect_timeout: Duration,
    /// Deadline of one request while etcd is known to be unreachable (the
    /// last request found no member within `request_timeout`; default 2 s):
    /// during an outage every caller learns it in this time, not in the
    /// whole request timeout. The first success ends the outage.
    pub outage_timeout: Duration,
    /// How long a broken watch tries to resume from its position before it
    /// reports [`StoreError::Unavailable`] (default 5 s).
    pub watch_resume: Duration,
    /// What [`EtcdStore::compact`] keeps of each object's history below the
    /// compacted revision (`window` and `notes_per_object` are not used:
    /// the revision is the caller's, notes expire with their lease).
    pub retention: Retention,
}

impl EtcdOptions {
    /// Defaults for these endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            prefix: "/vmctl/".into(),
            note_ttl: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            outage_timeout: Duration::from_secs(2),
            watch_resume: Duration::from_secs(5),
            retention: Retention::default(),
        }
    }
}

/// The etcd-backed store. Cheap to clone; clones share one client.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// Set on the controllers' handle ([`EtcdStore::fenced`]): every
    /// object write also compares that this agent still holds its agent
    /// lease.
    fence: Option<Arc<Fence>>,
}

/// An agent lease that object writes are fenced by: the lease's key and
/// id (see [`EtcdStore::fenced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    key: Vec<u8>,
    id: i64,
}

struct Inner {
    client: Client,
    opts: EtcdOptions,
    /// The lease notes are attached to, and when it was granted.
    lease: tokio::sync::Mutex<Option<(i64, Instant)>>,
    /// etcd is known to be unreachable: a request found no member within
    /// its whole timeout, and none succeeded since (see
    /// [`EtcdOptions::outage_timeout`]).
    outage: std::sync::atomic::AtomicBool,
    /// Object key → what this store last wrote or read of it; see the module docs.
    cache: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Known>>,
    /// The shared watch.
    hub: std::sync::Mutex<Hub>,
}

/// An object as known at etcd revision `at`: `object` (`None`: absent) with
/// its key's `mod_revision` (0: absent).
#[derive(Clone)]
struct Known {
    object: Option<Object>,
    mod_revision: i64,
    at: i64,
}

/// The store's one etcd watch and its subscribers (see the module docs).
struct Hub {
    /// A pump task is running.
    running: bool,
    /// Which pump this is (a stopped pump must not reset its successor).
    generation: u64,
    /// `recent` holds every event above this revision that the pump delivered.
    covered_from: u64,
    /// The last [`HUB_RECENT`] events delivered, oldest first.
    recent: std::collections::VecDeque<Arc<Event>>,
    /// Live events to subscribers; dropping it ends their fan-out (they go
    /// on with their own etcd watch).
    tx: tokio::sync::broadcast::Sender<WatchItem>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.opts.endpoints)
            .field("prefix", &self.inner.opts.prefix)
            .finish()
    }
}

/// What the object key holds: the object (its resourceVersion is the key's
/// `mod_revision`) and the change that wrote it, so a watch can tell which
/// [`Change`] it was.
#[derive(Serialize, Deserialize)]
struct Stored {
    time: Time,
    last: Last,
    object: Object,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum Last {
    Created,
    Applied,
    StatusUpdated,
    FinalizersSet,
    DeletionRequested,
}

/// What a note key holds.
#[derive(Serialize, Deserialize)]
struct StoredNote {
    time: Time,
    note: Note,
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// A store over etcd at `opts.endpoints`. Does not wait for etcd: an
    /// unreachable cluster makes each call fail with
    /// [`StoreError::Unavailable`] until it is back.
    ///
    /// Errors: [`StoreError::Invalid`] for no endpoint, a malformed URL or
    /// a prefix not ending in `/`.
    pub async fn connect(opts: EtcdOptions) -> Result<Self> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Invalid(
                "no etcd endpoint given; pass --etcd-endpoints http://HOST:2379[,…]".into(),
            ));
        }
        check_prefix(&opts.prefix).map_err(StoreError::Invalid)?;
        let copts = ConnectOptions::new()
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        let client = Client::connect(&opts.endpoints, Some(copts))
            .await
            .map_err(|e| match e {
                etcd_client::Error::InvalidUri(_) | etcd_client::Error::InvalidArgs(_) => {
                    StoreError::Invalid(format!(
                        "etcd endpoints `{}`: {e}",
                        opts.endpoints.join(",")
                    ))
                }
                e => unavailable_of(&opts, plain(&e)),
            })?;
        Ok(EtcdStore {
            fence: None,
            inner: Arc::new(Inner {
                client,
                opts,
                lease: tokio::sync::Mutex::new(None),
                outage: std::sync::atomic::AtomicBool::new(false),
                cache: Default::default(),
                hub: std::sync::Mutex::new(Hub {
                    running: false,
                    generation: 0,
                    covered_from: 0,
                    recent: Default::default(),
                    tx: tokio::sync::broadcast::channel(HUB_RECENT).0,
                }),
            }),
        })
    }

    /// The options it was opened with.
    pub fn options(&self) -> &EtcdOptions {
        &self.inner.opts
    }

    /// This store, for controllers that run while this agent holds the
    /// agent lease `fence` ([`AgentLease::fence`]): each object write
    /// (apply, status, finalizers, delete) is committed only if the lease
    /// is still this agent's, in the same transaction. An agent cut off
    /// from etcd stops its controllers before its lease can expire, but
    /// a reconcile already under way (its requests held up by the cut)
    /// may go on after another agent took over; fenced, its writes are
    /// refused instead of undoing the new holder's.
    pub fn fenced(&self, fence: Fence) -> EtcdStore {
        EtcdStore {
            inner: self.inner.clone(),
            fence: Some(Arc::new(fence)),
        }
    }

    /// The error of a write refused by `f`: [`StoreError::Unavailable`]
    /// (nothing was written; the controllers stop).
    fn fenced_out(&self, f: &Fence) -> StoreError {
        StoreError::Unavailable {
            store: self.describe(),
            source: format!(
                "this agent no longer holds the agent lease {} (it expired or another agent \
                 took it): its controllers write nothing more",
                f.id
            )
            .into(),
        }
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        classify(&self.inner.opts, e)
    }

    /// `P@{section}/{rest}` (see the module docs).
    fn key(&self, section: &str, rest: &str) -> Vec<u8> {
        format!("{}{SECTION_MARK}{section}/{rest}", self.inner.opts.prefix).into_bytes()
    }

    fn object_key(&self, r: &ObjectRef) -> Vec<u8> {
        self.key("o", &format!("{}/{}", r.kind.as_str(), r.name))
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.inner
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// A range read, retried within the request timeout while etcd is
    /// unavailable through the endpoint tried (a dead member: the client
    /// balances over every endpoint, the next try may reach a live one).
    async fn range(
        &self,
        key: Vec<u8>,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse> {
        let mut budget = self.budget();
        loop {
            let left = budget.left();
            let e = match tokio::time::timeout(left, self.kv().get(key.clone(), opts.clone())).await
            {
                Ok(Ok(r)) => return Ok(self.reached(r)),
                Ok(Err(e)) => self.err(e),
                Err(_) => unavailable_of(
                    &self.inner.opts,
                    format!("no member answered within {}", secs(budget.timeout)),
                ),
            };
            if !e.is_unavailable() || budget.spent(self) {
                return Err(self.unreached(e));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What one request may spend on attempts (see [`Budget`]).
    fn budget(&self) -> Budget {
        let outage = self.inner.outage.load(std::sync::atomic::Ordering::Relaxed);
        let timeout = self.request_timeout();
        Budget {
            start: Instant::now(),
            timeout,
            tries_left: outage.then_some(self.inner.opts.endpoints.len().max(1)),
        }
    }

    /// The deadline of one request now: the request timeout, or the
    /// outage timeout while etcd is known to be unreachable.
    fn request_timeout(&self) -> Duration {
        if self.inner.outage.load(std::sync::atomic::Ordering::Relaxed) {
            self.inner
                .opts
                .outage_timeout
                .min(self.inner.opts.request_timeout)
        } else {
            self.inner.opts.request_timeout
        }
    }

    /// A request reached etcd: no outage.
    fn reached<T>(&self, r: T) -> T {
        self.inner
            .outage
            .store(false, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// A request failed for good with `e`: if etcd could not be reached,
    /// an outage begins (later requests fail within the outage timeout).
    fn unreached(&self, e: StoreError) -> StoreError {
        if e.is_unavailable() {
            self.inner
                .outage
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        e
    }

    /// Runs a write, retried within the request timeout while etcd is
    /// unavailable through the endpoint tried. `idempotent`: running it
    /// twice does no harm, so it is repeated even when its answer was lost
    /// (an object write compares the `mod_revision` it was planned from:
    /// of a lost attempt and its repeat at most one commits, the other's
    /// compare fails and the write plans again on the result). Otherwise
    /// it is repeated only when it was never sent (the connection to the
    /// member was refused). An idempotent attempt gets a quarter of the
    /// timeout: a proposal lost with a dead leader is not answered at all,
    /// and waiting the whole timeout for it held writes up after elections.
    async fn send_write<T, F, Fut>(&self, idempotent: bool, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut budget = self.budget();
        let timeout = budget.timeout;
        let attempt = if idempotent { timeout / 4 } else { timeout };
        loop {
            let Ok(answer) = tokio::time::timeout(attempt.min(budget.left()), f()).await else {
                if budget.spent(self) {
                    return Err(self.unreached(unavailable_of(
                        &self.inner.opts,
                        format!("no member answered within {}", secs(timeout)),
                    )));
                }
                continue;
            };
            match answer {
                Ok(r) => return Ok(self.reached(r)),
                Err(e) if budget.spent(self) => return Err(self.unreached(self.err(e))),
                Err(e) if never_sent(&e) => {}
                Err(e) => {
                    let e = self.err(e);
                    if !idempotent || !e.is_unavailable() {
                        return Err(self.unreached(e));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads one object and its `mod_revision` (0: absent), and remembers it.
    async fn read(&self, r: &ObjectRef) -> Result<(Option<Object>, i64)> {
        let key = self.object_key(r);
        let resp = self.range(key.clone(), None).await?;
        let at = resp.header().map_or(0, |h| h.revision());
        self.remember_read(key, &resp, at)
    }

    /// Remembers and returns what a read of one object key found at revision `at`.
    fn remember_read(
        &self,
        key: Vec<u8>,
        resp: &etcd_client::GetResponse,
        at: i64,
    ) -> Result<(Option<Object>, i64)> {
        let found = match resp.kvs().first() {
            None => (None, 0),
            Some(kv) => (Some(decode_object(kv)?.object), kv.mod_revision()),
        };
        self.remember(
            key,
            Known {
                object: found.0.clone(),
                mod_revision: found.1,
                at,
            },
        );
        Ok(found)
    }

    /// What the cache knows of `key`: the object and its `mod_revision`.
    fn cached(&self, key: &[u8]) -> Option<(Option<Object>, i64)> {
        let cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).map(|k| (k.object.clone(), k.mod_revision))
    }

    /// Remembers `key` as `known`, unless something newer is known.
    fn remember(&self, key: Vec<u8>, known: Known) {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX && !cache.contains_key(&key) {
            cache.clear();
        }
        match cache.get_mut(&key) {
            Some(old) if old.at > known.at => {}
            Some(old) => *old = known,
            None => {
                cache.insert(key, known);
            }
        }
    }

    fn forget(&self, key: &[u8]) {
        let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(key);
    }

    /// Plans `plan` on the object as last known (absent when unknown) and
    /// commits it with one compare-and-swap transaction whose else branch
    /// reads the current object; plans again on that when the compare
    /// failed. Writes nothing and answers only from a fresh read when the
    /// plan is unchanged or refused.
    async fn write(
        &self,
        r: &ObjectRef,
        plan: impl Fn(Option<&Object>, Time) -> Result<Plan> + Send + Sync,
    ) -> Result<Written> {
        let key = self.object_key(r);
        let (mut prev, mut prev_rev) = self.cached(&key).unwrap_or((None, 0));
        let mut fresh = false;
        loop {
            let now = chrono::Utc::now();
            let (change, outcome) = match plan(prev.as_ref(), now) {
                Ok(Some(p)) => p,
                // Not from a guess: read, then plan again.
                _ if !fresh => {
                    (prev, prev_rev) = self.read(r).await?;
                    fresh = true;
                    continue;
                }
                Ok(None) => {
                    return Ok(Written {
                        outcome: Outcome::Unchanged,
                        object: prev,
                        seq: None,
                    });
                }
                Err(e) => return Err(e),
            };
            let ev = Event {
                seq: 0,
                time: now,
                object: r.clone(),
                change,
            };
            let next = fold::apply_event(prev.clone(), &ev);
            let guard = if prev_rev == 0 {
                Compare::version(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, prev_rev)
            };
            let mut ops = Vec::with_capacity(2);
            match &next {
                Some(obj) => {
                    let last = match &ev.change {
                        Change::Applied { created: true, .. } => Last::Created,
                        Change::Applied { .. } => Last::Applied,
                        Change::StatusUpdated { .. } => Last::StatusUpdated,
                        Change::FinalizersSet { .. } => Last::FinalizersSet,
                        _ => Last::DeletionRequested,
                    };
                    let stored = Stored {
                        time: now,
                        last,
                        object: obj.clone(),
                    };
                    ops.push(TxnOp::put(key.clone(), event::encode(&stored)?, None));
                }
                None => ops.push(TxnOp::delete(key.clone(), None)),
            }
            // Every change goes to the history, in the same transaction.
            let uid = next
                .as_ref()
                .or(prev.as_ref())
                .and_then(|o| o.metadata.uid.clone())
                .unwrap_or_default();
            let hkey = self.key(
                "h",
                &format!("{}/{}/{uid}/{prev_rev:020}", r.kind.as_str(), r.name),
            );
            ops.push(TxnOp::put(hkey, event::encode(&ev)?, None));
            let mut guards = vec![guard];
            let mut otherwise = vec![TxnOp::get(key.clone(), None)];
            if let Some(f) = &self.fence {
                guards.push(Compare::lease(f.key.clone(), CompareOp::Equal, f.id));
                otherwise.push(TxnOp::get(f.key.clone(), None));
            }
            let txn = Txn::new().when(guards).and_then(ops).or_else(otherwise);
            let resp = match self
                .send_write(true, || {
                    let (mut kv, txn) = (self.kv(), txn.clone());
                    async move { kv.txn(txn).await }
                })
                .await
            {
                Ok(resp) => resp,
                Err(e) => {
                    // Maybe written, maybe not: know nothing of it.
                    self.forget(&key);
                    return Err(e);
                }
            };
            if !resp.succeeded() {
                let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
                    etcd_client::TxnOpResponse::Get(g) => Some(g),
                    _ => None,
                });
                // Another writer won, or the cache was stale: plan again on
                // the current object, read by the else branch. Unless this
                // agent lost the lease it writes under (then nothing is
                // written again: another agent's controllers run now).
                let current = gets.next();
                if let Some(f) = &self.fence
                    && let Some(held) = gets.next()
                    && held.kvs().first().map(|kv| kv.lease()) != Some(f.id)
                {
                    return Err(self.fenced_out(f));
                }
                let Some(current) = current else {
                    (prev, prev_rev) = self.read(r).await?;
                    fresh = true;
                    continue;
                };
                let at = resp.header().map_or(0, |h| h.revision());
                (prev, prev_rev) = self.remember_read(key.clone(), &current, at)?;
                fresh = true;
                continue;
            }
            let seq = resp.header().map_or(0, |h| rev(h.revision()));
            let object = next.map(|mut o| {
                o.metadata.resource_version = seq;
                o
            });
            self.remember(
                key,
                Known {
                    object: object.clone(),
                    mod_revision: if object.is_some() { seq as i64 } else { 0 },
                    at: seq as i64,
                },
            );
            return Ok(Written {
                outcome,
                object,
                seq: Some(seq),
            });
        }
    }

    /// The lease for new notes, granted anew when half its TTL has passed.
    async fn note_lease(&self, fresh: bool) -> Result<i64> {
        let ttl = self.inner.opts.note_ttl;
        let mut lease = self.inner.lease.lock().await;
        if let Some((id, at)) = *lease
            && !fresh
            && at.elapsed() < ttl / 2
        {
            return Ok(id);
        }
        let resp = self
            .inner
            .client
            .lease_client()
            .grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(|e| self.err(e))?;
        *lease = Some((resp.id(), Instant::now()));
        Ok(resp.id())
    }

    /// Compacts etcd's history below `revision` (its MVCC keeps every
    /// version of every key until then) and prunes vmctl's history keys
    /// written below it as [`EtcdOptions::retention`] says (spec changes
    /// and deletions always stay; statuses: the newest
    /// `status_per_object` of the current incarnation; finalizer changes:
    /// the last). Current objects stay; watches from below `revision` get
    /// [`StoreError::TooOld`]. Returns the revision compacted at.
    pub async fn compact(&self, revision: u64) -> Result<u64> {
        let revision = revision.min(self.current_revision().await?);
        if revision == 0 {
            return Ok(0);
        }
        match self
            .kv()
            .compact(
                revision as i64,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
        {
            Ok(_) => {}
            // Already compacted at or beyond it.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {}
            Err(e) => return Err(self.err(e)),
        }
        {
            // The shared watch no longer serves subscribers from below it.
            let mut hub = self.hub();
            let floor = revision - 1;
            if hub.covered_from < floor {
                hub.covered_from = floor;
                hub.recent.retain(|e| e.seq > floor);
            }
        }
        let pruned = self.prune_history(revision).await?;
        tracing::debug!(revision, pruned, "etcd compacted");
        Ok(revision)
    }

    /// Deletes the history keys written below `below` that the retention
    /// does not keep (the same rule as sled's compaction: [`droppable`]).
    /// Returns how many went.
    async fn prune_history(&self, below: u64) -> Result<usize> {
        let resp = self
            .range(self.key("h", ""), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut per_object: std::collections::HashMap<ObjectRef, Vec<(Event, &[u8])>> =
            Default::default();
        for kv in resp.kvs() {
            let seq = rev(kv.mod_revision());
            if seq >= below {
                continue;
            }
            let mut ev: Event = event::decode(kv.value())?;
            ev.seq = seq;
            per_object
                .entry(ev.object.clone())
                .or_default()
                .push((ev, kv.key()));
        }
        let retention = &self.inner.opts.retention;
        let mut gone = Vec::new();
        for events in per_object.values_mut() {
            events.sort_by_key(|(e, _)| e.seq);
            let mut seen = Seen::default();
            for (ev, key) in events.iter().rev() {
                if droppable(&mut seen, ev, retention) {
                    gone.push(TxnOp::delete(key.to_vec(), None));
                }
            }
        }
        for chunk in gone.chunks(MAX_TXN_OPS) {
            let txn = Txn::new().and_then(chunk.to_vec());
            self.send_write(true, || {
                let (mut kv, txn) = (self.kv(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        }
        Ok(gone.len())
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.inner.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A watch from `after`: on the shared etcd watch when it has every
    /// event above `after`, else on its own (which then starts the shared
    /// one if none runs).
    async fn subscribe(&self, after: u64) -> Result<Sub> {
        {
            let hub = self.hub();
            if hub.running && after >= hub.covered_from {
                return Ok(Sub::shared(self, &hub, after));
            }
        }
        // Open it now, so that a compacted start fails here, like sled's.
        let stream = self.open_watch(after as i64 + 1).await?;
        let own = WatchState::new(self.clone(), after, Some(stream));
        let mut hub = self.hub();
        if hub.running {
            if after >= hub.covered_from {
                return Ok(Sub::shared(self, &hub, after));
            }
            return Ok(Sub::Own(Box::new(own)));
        }
        // This watch becomes the shared one: a pump fans it out.
        hub.running = true;
        hub.generation += 1;
        hub.covered_from = after;
        hub.recent.clear();
        hub.tx = tokio::sync::broadcast::channel(HUB_RECENT).0;
        let sub = Sub::shared(self, &hub, after);
        tokio::spawn(pump(self.clone(), own, hub.generation));
        Ok(sub)
    }

    /// etcd's current revision (any write acknowledged before is at or below it).
    pub async fn current_revision(&self) -> Result<u64> {
        let resp = self
            .range(
                self.key("o", ""),
                Some(GetOptions::new().with_count_only().with_limit(1)),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| rev(h.revision())))
    }

    /// Checks that etcd answers with a leader (a linearizable read).
    /// [`StoreError::Unavailable`] names the endpoints otherwise.
    pub async fn health(&self) -> Result<()> {
        self.current_revision().await.map(|_| ())
    }

    /// Opens the etcd watch from `start` (inclusive) over the agent lease,
    /// notes and objects (`P@lease/` to the end of `P@o/`). The lease key
    /// is watched only so that its writes become bookmarks: found as, after
    /// an etcd outage, every read waited 1 s for the cluster revision that
    /// the agent's new lease had moved past the last object event.
    async fn open_watch(&self, start: i64) -> Result<etcd_client::WatchStream> {
        let from = self.key("lease", "");
        let to = prefix_end(&self.key("o", ""));
        let opts = WatchOptions::new()
            .with_range(to)
            .with_start_revision(start)
            .with_prev_key();
        self.inner
            .client
            .watch_client()
            .watch(from, Some(opts))
            .await
            .map_err(|e| self.err(e))
    }

    /// The [`Event`] of one etcd watch event; `None` for keys outside
    /// vmctl's layout.
    fn event_of(&self, e: &etcd_client::Event) -> Result<Option<Event>> {
        let Some(kv) = e.kv() else { return Ok(None) };
        let key = String::from_utf8_lossy(kv.key());
        let Some(rest) = key
            .strip_prefix(&self.inner.opts.prefix)
            .and_then(|k| k.strip_prefix(SECTION_MARK))
        else {
            return Ok(None);
        };
        let seq = rev(kv.mod_revision());
        let mut parts = rest.splitn(4, '/');
        let (section, kind, name) = (parts.next(), parts.next(), parts.next());
        let (Some(section), Some(kind), Some(name)) = (section, kind, name) else {
            return Ok(None);
        };
        let Some(kind) = Kind::parse(kind) else {
            return Ok(None);
        };
        let object = ObjectRef::new(kind, name);
        match (section, e.event_type()) {
            ("o", EventType::Put) => {
                let st = decode_object(kv)?;
                let mut obj = st.object;
                obj.metadata.resource_version = seq;
                let change = match st.last {
                    Last::Created | Last::Applied => {
                        obj.status = None;
                        Change::Applied {
                            created: matches!(st.last, Last::Created),
                            object: Box::new(obj),
                        }
                    }
                    Last::StatusUpdated => Change::StatusUpdated {
                        status: obj.status.unwrap_or(serde_json::Value::Null),
                    },
                    Last::FinalizersSet => Change::FinalizersSet {
                        finalizers: obj.metadata.finalizers,
                    },
                    Last::DeletionRequested => Change::DeletionRequested {
                        at: obj.metadata.deletion_timestamp.unwrap_or(st.time),
                    },
                };
                Ok(Some(Event {
                    seq,
                    time: st.time,
                    object,
                    change,
                }))
            }
            // etcd records no time for a delete: the watcher's clock it is.
            ("o", EventType::Delete) => Ok(Some(Event {
                seq,
                time: chrono::Utc::now(),
                object,
                change: Change::Deleted,
            })),
            ("n", EventType::Put) => {
                let n: StoredNote = event::decode(kv.value())?;
                Ok(Some(Event {
                    seq,
                    time: n.time,
                    object,
                    change: Change::Noted { note: n.note },
                }))
            }
            // A note expiring is no event of vmctl's.
            _ => Ok(None),
        }
    }
}

fn decode_object(kv: &KeyValue) -> Result<Stored> {
    let mut st: Stored = event::decode(kv.value())?;
    st.object.metadata.resource_version = rev(kv.mod_revision());
    Ok(st)
}

/// Whether a request failed before it reached etcd (connection refused or
/// not established), so that repeating it cannot apply it twice.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect error")
        }
        _ => false,
    }
}

fn describe_opts(opts: &EtcdOptions) -> String {
    format!("etcd at {}", opts.endpoints.join(","))
}

fn unavailable_of(opts: &EtcdOptions, e: impl Into<BoxError>) -> StoreError {
    StoreError::Unavailable {
        store: describe_opts(opts),
        source: e.into(),
    }
}

/// What one request may still spend on attempts while etcd is
/// unavailable: until `timeout` after `start`, and during a known outage
/// (`tries_left`) one try per endpoint at most, so that a request fails
/// within milliseconds when every member refuses connections.
struct Budget {
    start: Instant,
    timeout: Duration,
    tries_left: Option<usize>,
}

impl Budget {
    /// Time left for the next attempt (at least 1 ms).
    fn left(&self) -> Duration {
        self.timeout
            .saturating_sub(self.start.elapsed())
            .max(Duration::from_millis(1))
    }

    /// Counts one failed attempt; whether the request must give up. A
    /// request that found no member for the outage timeout starts an
    /// outage for the requests after it (it still tries until its own
    /// deadline).
    fn spent(&mut self, store: &EtcdStore) -> bool {
        let elapsed = self.start.elapsed();
        if elapsed >= store.inner.opts.outage_timeout {
            store
                .inner
                .outage
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(n) = &mut self.tries_left {
            *n = n.saturating_sub(1);
            if *n == 0 {
                return true;
            }
        }
        elapsed >= self.timeout
    }
}

/// `2 s`, `1.5 s`.
fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// What went wrong, for people: a gRPC status as its message (`tcp
/// connect error: Connection refused (os error 111)`) with its code
/// where the message is empty, never tonic's Debug-like `status: …,
/// metadata: MetadataMap {…}`; other errors as their own chain.
#[derive(Debug)]
struct Plain(String);

impl std::fmt::Display for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Plain {}

fn plain(e: &etcd_client::Error) -> Plain {
    use etcd_client::Error as E;
    Plain(match e {
        E::GRpcStatus(s) if s.message().is_empty() => format!("{:?}", s.code()),
        E::GRpcStatus(s) => {
            let mut text = s.message().to_owned();
            let mut source = std::error::Error::source(s);
            while let Some(inner) = source {
                let more = inner.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                source = inner.source();
            }
            text
        }
        E::TransportError(t) => vmctl_api::error_chain(t),
        e => e.to_string(),
    })
}

/// Sorts an etcd error: unreachable, no leader, timeouts → Unavailable.
fn classify(opts: &EtcdOptions, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    let transient = match &e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted
        ),
        E::WatchError(_) => true,
        _ => false,
    };
    if transient {
        unavailable_of(opts, plain(&e))
    } else {
        StoreError::backend(e)
    }
}

/// Where an etcd watch stream is: the last revision delivered and events
/// received but not yet delivered.
struct WatchState {
    store: EtcdStore,
    stream: Option<etcd_client::WatchStream>,
    pos: u64,
    pending: std::collections::VecDeque<WatchItem>,
    failed: bool,
    /// Since when the etcd watch is broken (a field, not a local, so that
    /// a cancelled `next` keeps counting).
    broken_since: Option<Instant>,
}

impl WatchState {
    /// A watch from `pos` that opens its etcd watch on first use.
    fn new(store: EtcdStore, pos: u64, stream: Option<etcd_client::WatchStream>) -> Self {
        WatchState {
            store,
            stream,
            pos,
            pending: Default::default(),
            failed: false,
            broken_since: None,
        }
    }

    async fn next(&mut self) -> Option<Result<WatchItem>> {
        if self.failed {
            return None;
        }
        let r = self.next_inner().await;
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }

    async fn next_inner(&mut self) -> Result<WatchItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if item.seq() > self.pos {
                    self.pos = item.seq();
                    return Ok(item);
                }
                continue;
            }
            let err = match &mut self.stream {
                None => match self.store.open_watch(self.pos as i64 + 1).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        continue;
                    }
                    Err(e) => e,
                },
                Some(s) => match s.message().await {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            return Err(StoreError::TooOld {
                                requested: self.pos,
                                oldest: rev(resp.compact_revision()).saturating_sub(1),
                            });
                        }
                        if resp.canceled() {
                            self.store.err(etcd_client::Error::WatchError(format!(
                                "watch canceled: {}",
                                resp.cancel_reason()
                            )))
                        } else {
                            self.broken_since = None;
                            // The newest revision this response covers:
                            // a key that is no object event (the lease)
                            // still tells that nothing came before it.
                            let mut top = 0;
                            for e in resp.events() {
                                if let Some(kv) = e.kv() {
                                    top = top.max(rev(kv.mod_revision()));
                                }
                                if let Some(ev) = self.store.event_of(e)? {
                                    self.pending.push_back(WatchItem::Event(Arc::new(ev)));
                                }
                            }
                            let queued = self.pending.back().map_or(self.pos, WatchItem::seq);
                            if top > queued {
                                self.pending.push_back(WatchItem::Bookmark(top));
                            }
                            continue;
                        }
                    }
                    Ok(None) => self.store.err(etcd_client::Error::WatchError(
                        "the watch stream ended".into(),
                    )),
                    Err(e) => self.store.err(e),
                },
            };
            // Resume from our position for a while (a member died, a leader
            // election): every event is still delivered once, in order.
            if !err.is_unavailable() {
                return Err(err);
            }
            self.stream = None;
            let since = *self.broken_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.store.inner.opts.watch_resume {
                return Err(err);
            }
            tracing::debug!(pos = self.pos, error = %err, "etcd watch broken; resuming");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs the shared etcd watch: each event goes to `recent` and to every
/// subscriber. Ends when the watch fails (subscribers then go on with
/// their own etcd watch, which reports the failure if it persists) or when
/// no subscriber is left.
async fn pump(store: EtcdStore, mut watch: WatchState, generation: u64) {
    loop {
        let item = tokio::select! {
            item = watch.next() => item,
            // `WatchState::next` is cancel-safe: its state is in fields.
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                if store.hub().tx.receiver_count() == 0 {
                    break;
                }
                continue;
            }
        };
        let Some(Ok(item)) = item else { break };
        let mut hub = store.hub();
        if hub.generation != generation {
            return;
        }
        // Bookmarks go to live subscribers only: a late one loses nothing
        // without them.
        if let WatchItem::Event(ev) = &item {
            if hub.recent.len() >= HUB_RECENT
                && let Some(old) = hub.recent.pop_front()
            {
                hub.covered_from = hub.covered_from.max(old.seq);
            }
            hub.recent.push_back(ev.clone());
        }
        if hub.tx.send(item).is_err() {
            break; // no subscriber left
        }
    }
    let mut hub = store.hub();
    if hub.generation == generation {
        hub.running = false;
        hub.recent.clear();
        // Dropping the sender ends the fan-out of any late subscriber.
        hub.tx = tokio::sync::broadcast::channel(HUB_RECENT).0;
    }
}

/// One subscriber's watch.
enum Sub {
    /// Fed by the shared watch: first `backlog` (from its recent events),
    /// then live ones; `pos` is the last revision delivered.
    Shared {
        store: EtcdStore,
        backlog: std::collections::VecDeque<Arc<Event>>,
        rx: tokio::sync::broadcast::Receiver<WatchItem>,
        pos: u64,
    },
    /// Its own etcd watch.
    Own(Box<WatchState>),
}

impl Sub {
    /// Subscribes to `hub` (locked, so no event falls between its recent
    /// events and the live ones) from `after`.
    fn shared(store: &EtcdStore, hub: &Hub, after: u64) -> Sub {
        Sub::Shared {
            store: store.clone(),
            backlog: hub
                .recent
                .iter()
                .filter(|e| e.seq > after)
                .cloned()
                .collect(),
            rx: hub.tx.subscribe(),
            pos: after,
        }
    }

    async fn next(&mut self) -> Option<Result<WatchItem>> {
        loop {
            let fallback = match self {
                Sub::Own(own) => return own.next().await,
                Sub::Shared {
                    store,
                    backlog,
                    rx,
                    pos,
                } => {
                    let item = match backlog.pop_front() {
                        Some(ev) => Ok(WatchItem::Event(ev)),
                        None => rx.recv().await,
                    };
                    match item {
                        Ok(item) if item.seq() > *pos => {
                            *pos = item.seq();
                            return Some(Ok(item));
                        }
                        Ok(_) => continue,
                        // Fell behind (lagged) or the shared watch ended:
                        // on with an own etcd watch from here.
                        Err(_) => Box::new(WatchState::new(store.clone(), *pos, None)),
                    }
                }
            };
            *self = Sub::Own(fallback);
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn apply(
        &self,
        obj: Object,
        source: Option<ApplySource>,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        let r = obj.object_ref();
        self.write(&r, |prev, now| {
            plan::apply(prev, obj.clone(), source.clone(), expected_rv, now)
        })
        .await
    }

    async fn update_status(
        &self,
        r: &ObjectRef,
        status: serde_json::Value,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        self.write(r, |prev, _| {
            plan::update_status(r, prev, status.clone(), expected_rv)
        })
        .await
    }

    async fn set_finalizers(
        &self,
        r: &ObjectRef,
        finalizers: Vec<String>,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        self.write(r, |prev, _| {
            plan::set_finalizers(r, prev, finalizers.clone(), expected_rv)
        })
        .await
    }

    async fn request_delete(&self, r: &ObjectRef, expected_rv: Option<u64>) -> Result<Written> {
        self.write(r, |prev, now| {
            plan::request_delete(r, prev, expected_rv, now)
        })
        .await
    }

    async fn record_note(&self, note: Note) -> Result<u64> {
        let key = self.key(
            "n",
            &format!(
                "{}/{}/{}",
                note.object.kind.as_str(),
                note.object.name,
                uuid::Uuid::new_v4()
            ),
        );
        let value = event::encode(&StoredNote {
            time: chrono::Utc::now(),
            note,
        })?;
        let mut fresh = false;
        loop {
            let lease = self.note_lease(fresh).await?;
            match self
                .send_write(false, || {
                    let (mut kv, key, value) = (self.kv(), key.clone(), value.clone());
                    async move {
                        kv.put(key, value, Some(PutOptions::new().with_lease(lease)))
                            .await
                    }
                })
                .await
            {
                Ok(resp) => return Ok(resp.header().map_or(0, |h| rev(h.revision()))),
                // The lease expired or etcd lost it: grant a new one, once.
                Err(StoreError::Backend(e))
                    if !fresh && e.to_string().contains("lease not found") =>
                {
                    fresh = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn get(&self, r: &ObjectRef) -> Result<Option<Object>> {
        Ok(self.read(r).await?.0)
    }

    async fn list(&self, kind: Option<Kind>) -> Result<Listing> {
        let prefix = match kind {
            Some(k) => self.key("o", &format!("{}/", k.as_str())),
            None => self.key("o", ""),
        };
        let resp = self
            .range(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let objects = resp
            .kvs()
            .iter()
            .map(|kv| decode_object(kv).map(|s| s.object))
            .collect::<Result<Vec<_>>>()?;
        Ok(Listing {
            objects,
            resource_version: resp.header().map_or(0, |h| rev(h.revision())),
        })
    }

    async fn watch(&self, after: u64) -> Result<Watch> {
        let sub = self.subscribe(after).await?;
        Ok(Watch::with_bookmarks(futures::stream::unfold(
            sub,
            |mut st| async move { st.next().await.map(|r| (r, st)) },
        )))
    }

    async fn history(&self, r: &ObjectRef) -> Result<Vec<Event>> {
        let prefix = self.key("h", &format!("{}/{}/", r.kind.as_str(), r.name));
        let resp = self
            .range(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = resp
            .kvs()
            .iter()
            .map(|kv| {
                let mut ev: Event = event::decode(kv.value())?;
                ev.seq = rev(kv.mod_revision());
                Ok(ev)
            })
            .collect::<Result<Vec<_>>>()?;
        // The object's notes, as in sled's history.
        let notes = self
            .range(
                self.key("n", &format!("{}/{}/", r.kind.as_str(), r.name)),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        for kv in notes.kvs() {
            let n: StoredNote = event::decode(kv.value())?;
            out.push(Event {
                seq: rev(kv.mod_revision()),
                time: n.time,
                object: r.clone(),
                change: Change::Noted { note: n.note },
            });
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    async fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<RecordedNote>> {
        let prefix = match object {
            Some(r) => self.key("n", &format!("{}/{}/", r.kind.as_str(), r.name)),
            None => self.key("n", ""),
        };
        let resp = self
            .range(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = resp
            .kvs()
            .iter()
            .map(|kv| {
                let n: StoredNote = event::decode(kv.value())?;
                Ok(RecordedNote {
                    seq: rev(kv.mod_revision()),
                    time: n.time,
                    note: n.note,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|n| n.seq);
        Ok(out)
    }

    async fn last_seq(&self) -> Result<u64> {
        self.current_revision().await
    }

    fn describe(&self) -> String {
        describe_opts(&self.inner.opts)
    }

    fn mark_unreachable(&self) {
        self.inner
            .outage
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
