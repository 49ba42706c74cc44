//! Waiting is watching: [`Client::await_condition`] lists the objects once,
//! then follows `/v1/watch` from the listing's resourceVersion, and checks
//! a condition on every change of one of them. No polling.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use vmctl_api::{Kind, Object, ObjectRef};

use super::{Client, ClientError, WatchItem};

/// The current state of each awaited object: `None` while it does not
/// exist (not yet created, or deleted).
pub type States = BTreeMap<ObjectRef, Option<Object>>;

/// How a wait ended.
#[derive(Debug)]
pub enum Awaited<T> {
    /// The condition returned `Some`.
    Done(T),
    /// The timeout passed first; the states it last saw.
    TimedOut(States),
}

impl Client {
    /// Waits until `condition` returns `Some` for the awaited objects'
    /// states, or `timeout` passes (`None`: no limit).
    ///
    /// `condition` is called with the state of every object of `refs` at
    /// once, first as listed, then after each change of one of them, as
    /// the watch reports it; it may print progress. A watch the log has
    /// outrun (410 `too_old`, or a `resync` line) or that ends lists again
    /// and watches from there, so no change is missed.
    ///
    /// Errors: any request's [`ClientError`] (the agent went away, …).
    pub fn await_condition<T>(
        &self,
        refs: &[ObjectRef],
        mut condition: impl FnMut(&States) -> Option<T>,
        timeout: Option<Duration>,
    ) -> Result<Awaited<T>, ClientError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let wanted: BTreeSet<&ObjectRef> = refs.iter().collect();
        let kinds: BTreeSet<Kind> = refs.iter().map(|r| r.kind).collect();
        let mut states: States = refs.iter().map(|r| (r.clone(), None)).collect();
        'list: loop {
            // List what is there, and the resourceVersion to watch from.
            let mut rv = u64::MAX;
            for s in states.values_mut() {
                *s = None;
            }
            for kind in &kinds {
                let list = self.list(Some(*kind), &[])?;
                rv = rv.min(list.resource_version);
                for o in list.items {
                    let r = o.object_ref();
                    if wanted.contains(&r) {
                        states.insert(r, Some(o));
                    }
                }
            }
            if let Some(t) = condition(&states) {
                return Ok(Awaited::Done(t));
            }
            let mut watch = match self.watch(if rv == u64::MAX { 0 } else { rv }) {
                Err(e) if e.is_gone() => continue 'list,
                w => w?,
            };
            loop {
                let item = match watch.next_before(deadline)? {
                    None => return Ok(Awaited::TimedOut(states)),
                    Some(None | Some(WatchItem::Resync(_))) => continue 'list,
                    Some(Some(WatchItem::Event(ev))) => ev,
                };
                if !wanted.contains(&item.object) || item.change_type() == "noted" {
                    continue;
                }
                // The event says what changed; the object as it is now is
                // one read away (and may already be past this event).
                let now = self.get_opt(item.object.kind, &item.object.name)?;
                states.insert(item.object, now);
                if let Some(t) = condition(&states) {
                    return Ok(Awaited::Done(t));
                }
            }
        }
    }
}
