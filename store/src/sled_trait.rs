//! [`Store`] for [`SledStore`]: its blocking calls, run on tokio's blocking
//! pool (the one place that does so), and its watch as a stream.

use std::sync::Arc;

use vmctl_api::{ApplySource, Kind, Note, Object, ObjectRef};

use crate::error::{Result, StoreError};
use crate::event::Event;
use crate::{Listing, RecordedNote, SledStore, Store, Watch, Written};

impl SledStore {
    /// Runs `f` on a clone of the store on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SledStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(StoreError::backend)?
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    async fn apply(
        &self,
        obj: Object,
        source: Option<ApplySource>,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        self.blocking(move |s| s.apply(obj, source, expected_rv))
            .await
    }

    async fn update_status(
        &self,
        r: &ObjectRef,
        status: serde_json::Value,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        let r = r.clone();
        self.blocking(move |s| s.update_status(&r, status, expected_rv))
            .await
    }

    async fn set_finalizers(
        &self,
        r: &ObjectRef,
        finalizers: Vec<String>,
        expected_rv: Option<u64>,
    ) -> Result<Written> {
        let r = r.clone();
        self.blocking(move |s| s.set_finalizers(&r, finalizers, expected_rv))
            .await
    }

    async fn request_delete(&self, r: &ObjectRef, expected_rv: Option<u64>) -> Result<Written> {
        let r = r.clone();
        self.blocking(move |s| s.request_delete(&r, expected_rv))
            .await
    }

    async fn record_note(&self, note: Note) -> Result<u64> {
        self.blocking(move |s| s.record_note(note)).await
    }

    async fn get(&self, r: &ObjectRef) -> Result<Option<Object>> {
        let r = r.clone();
        self.blocking(move |s| s.get(&r)).await
    }

    async fn list(&self, kind: Option<Kind>) -> Result<Listing> {
        self.blocking(move |s| s.list(kind)).await
    }

    async fn watch(&self, after: u64) -> Result<Watch> {
        let w = SledStore::watch(self, after)?;
        Ok(Watch::new(futures::stream::unfold(w, |mut w| async move {
            let r: Result<Arc<Event>> = w.next().await;
            Some((r, w))
        })))
    }

    async fn history(&self, r: &ObjectRef) -> Result<Vec<Event>> {
        let r = r.clone();
        self.blocking(move |s| s.history(&r)).await
    }

    async fn notes(&self, object: Option<&ObjectRef>) -> Result<Vec<RecordedNote>> {
        let r = object.cloned();
        self.blocking(move |s| s.notes(r.as_ref())).await
    }

    async fn last_seq(&self) -> Result<u64> {
        Ok(SledStore::last_seq(self))
    }

    fn describe(&self) -> String {
        format!("sled at {}", self.path().display())
    }
}
