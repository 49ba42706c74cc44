//! The Image controller: makes every Image available on the host.
//!
//! ```text
//!   Pending ──▶ Downloading ──ok──▶ Ready   (note Pulled)
//!                │    ▲
//!                │    └── transient error: Downloading, Ready=False BackOff
//!                │        (note BackOff), fetched again after a growing delay
//!                └──permanent error──▶ Failed (note Failed); not fetched
//!                                      again until the spec changes
//! ```
//!
//! Observe first: an image the fetcher already has is Ready without a fetch.
//!
//! A fetch runs to its end whatever is applied meanwhile: a status write
//! that loses to another writer (a second VMFile naming the same URL
//! changes the Image's labels and source) is made again on the fresh
//! object rather than abandoning the download. Only a changed source
//! (another URL or path) or a deletion stops following it.
//!
//! The finalizer `vmctl.dev/image-cache` makes a deleted Image wait until no
//! VM uses it (their disks are overlays on its file), then removes the file
//! it downloaded, unless another Image names the same URL. A local path
//! source is the user's file and is never removed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use vmctl_api::{Image, ImagePhase, ImageStatus, Kind, NoteType, Object, set_condition};

use crate::conditions::condition;
use crate::drivers::LocalImage;
use crate::runtime::{Action, Reconciler};
use crate::{Context, Error};

/// The finalizer that removes a deleted Image's downloaded file.
pub const FINALIZER: &str = "vmctl.dev/image-cache";

pub use vmctl_api::resources::PULL_REQUESTED_ANNOTATION;

/// Reconciles Images.
#[derive(Debug)]
pub struct ImageReconciler {
    ctx: Arc<Context>,
    /// Consecutive transient fetch failures per Image: (generation, count).
    failures: Mutex<HashMap<String, (u64, u32)>>,
    /// Per Image, the [`PULL_REQUESTED_ANNOTATION`] value last acted on.
    /// In memory: after a restart a failed Image with a request is tried
    /// once more.
    pulls: Mutex<HashMap<String, String>>,
}

impl ImageReconciler {
    /// An Image reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        ImageReconciler {
            ctx,
            failures: Mutex::default(),
            pulls: Mutex::default(),
        }
    }

    /// Records that `obj`'s pull request (if any) has been acted on;
    /// returns whether it is a new one.
    fn new_pull_request(&self, obj: &Object) -> bool {
        let Some(asked) = obj.metadata.annotations.get(PULL_REQUESTED_ANNOTATION) else {
            return false;
        };
        let mut pulls = self.pulls.lock().unwrap_or_else(PoisonError::into_inner);
        let name = &obj.metadata.name;
        if pulls.get(name) == Some(asked) {
            return false;
        }
        pulls.insert(name.clone(), asked.clone());
        true
    }

    /// Counts one more transient failure of `name` at `generation`.
    fn failed_again(&self, name: &str, generation: u64) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let e = f.entry(name.to_owned()).or_insert((generation, 0));
        if e.0 != generation {
            *e = (generation, 0);
        }
        e.1 += 1;
        e.1
    }

    fn forget_failures(&self, name: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Writes `status` onto the Image as it now is. A write that loses to
    /// another writer is made again on the fresh object, so that a
    /// re-apply never aborts a fetch. `None`: the Image is gone, being
    /// deleted, or names another source, so the fetch in flight is no
    /// longer what it asks for.
    async fn write_fresh(
        &self,
        obj: &Object,
        status: &ImageStatus,
    ) -> Result<Option<Object>, Error> {
        let mut current = obj.clone();
        // Each retry follows a write by someone else; a bound keeps a
        // pathological writer from holding the fetch here forever.
        for _ in 0..16 {
            match self.put(&current, status).await {
                Ok(o) => return Ok(Some(o)),
                Err(e) if e.is_conflict() => match self.ctx.get(&obj.object_ref()).await? {
                    Some(o)
                        if o.metadata.deletion_timestamp.is_none()
                            && o.metadata.uid == obj.metadata.uid
                            && o.spec.get("source") == obj.spec.get("source") =>
                    {
                        current = o;
                    }
                    _ => return Ok(None),
                },
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(self.put(&current, status).await?))
    }
}

impl ImageReconciler {
    /// This node's view of an Image's status: in a cluster its entry in
    /// `status.nodes` (default when it has none), else the whole status.
    fn mine(&self, status: Option<ImageStatus>) -> ImageStatus {
        let s = status.unwrap_or_default();
        if self.ctx.config.cluster {
            s.nodes
                .get(&self.ctx.config.node.name)
                .cloned()
                .unwrap_or_default()
        } else {
            s
        }
    }

    /// Writes `mine` as this node's status of Image `obj` (expecting its
    /// resourceVersion): the whole status on one host; in a cluster its
    /// entry in `status.nodes`, the top-level fields summing the nodes up
    /// ([`summary`]). Returns the object as it now is.
    async fn put(
        &self,
        obj: &Object,
        mine: &ImageStatus,
    ) -> Result<Object, crate::runtime::controller::ControllerError> {
        if !self.ctx.config.cluster {
            return self.ctx.write_status(obj, mine).await;
        }
        let full: ImageStatus = obj
            .status
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let mut nodes = full.nodes.clone();
        let mut entry = mine.clone();
        entry.nodes.clear();
        nodes.insert(self.ctx.config.node.name.clone(), entry);
        let mut top = summary(&nodes, &full);
        top.nodes = nodes;
        self.ctx.write_status(obj, &top).await
    }

    /// In a cluster: whether this node fetches Image `name`: when a VM
    /// bound to it boots from it, or when no VM uses it at all (an image
    /// applied or pulled for its own sake is fetched on every node, so
    /// that `vmctl image pull` and `apply --wait` of an Image end).
    async fn needed_here(&self, name: &str) -> Result<bool, Error> {
        let me = Some(self.ctx.config.node.name.as_str());
        let vms = self.ctx.list(Kind::VirtualMachine).await?;
        let mut users = vms
            .iter()
            .filter(|vm| vm.spec.get("image").and_then(|v| v.as_str()) == Some(name))
            .peekable();
        if users.peek().is_none() {
            return Ok(true);
        }
        Ok(users.any(|vm| crate::context::vm_node(vm) == me))
    }
}

/// The top-level fields of a cluster Image's status, from its nodes'
/// entries (`prev`: the status as it was, whose `Ready` condition keeps
/// its transition time while its status stays): `Ready` once ready on
/// some node, else `Downloading` while some node fetches it, `Pending`
/// while some node has not tried, `Failed` when every node failed. The
/// `Ready` condition's message names the nodes in each phase. No `path`
/// (each node's is in its entry). Pure.
pub fn summary(
    nodes: &std::collections::BTreeMap<String, ImageStatus>,
    prev: &ImageStatus,
) -> ImageStatus {
    let rank = |p: ImagePhase| match p {
        ImagePhase::Ready => 3,
        ImagePhase::Downloading => 2,
        ImagePhase::Pending => 1,
        ImagePhase::Failed => 0,
    };
    let phase = nodes
        .values()
        .map(|s| s.phase)
        .max_by_key(|p| rank(*p))
        .unwrap_or_default();
    let ready = nodes.values().find(|s| s.phase == ImagePhase::Ready);
    // "Ready on a, b; c: Downloading (BackOff: …)": the nodes where it is
    // ready together, each other one with its own reason and message.
    let mut parts = Vec::new();
    let ready_on: Vec<&str> = nodes
        .iter()
        .filter(|(_, s)| s.phase == ImagePhase::Ready)
        .map(|(n, _)| n.as_str())
        .collect();
    if !ready_on.is_empty() {
        parts.push(format!("Ready on {}", ready_on.join(", ")));
    }
    for (n, st) in nodes.iter().filter(|(_, s)| s.phase != ImagePhase::Ready) {
        let why = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| match c.message.as_str() {
                "" => format!(" ({})", c.reason),
                m => format!(" ({}: {m})", c.reason),
            })
            .unwrap_or_default();
        parts.push(format!("{n}: {:?}{why}", st.phase));
    }
    let generation = nodes
        .values()
        .map(|s| s.observed_generation)
        .min()
        .unwrap_or_default();
    let reason = match ready {
        Some(_) => "Available".to_owned(),
        None => nodes
            .values()
            .filter(|s| s.phase == phase)
            .find_map(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map_or_else(|| "Pending".to_owned(), |c| c.reason.clone()),
    };
    let mut conditions = prev.conditions.clone();
    let cond = condition(
        "Ready",
        ready.is_some(),
        &reason,
        parts.join("; "),
        generation,
    );
    set_condition(&mut conditions, cond, Utc::now());
    ImageStatus {
        phase,
        conditions,
        observed_generation: generation,
        path: None,
        format: ready.and_then(|s| s.format.clone()),
        size_bytes: ready.and_then(|s| s.size_bytes),
        virtual_size_bytes: ready.and_then(|s| s.virtual_size_bytes),
        progress: None,
        nodes: Default::default(),
    }
}

fn set_ready(status: &mut ImageStatus, img: &LocalImage, generation: u64) {
    status.phase = ImagePhase::Ready;
    status.observed_generation = generation;
    status.path = Some(img.path.clone());
    status.format = Some(img.format.clone());
    status.size_bytes = Some(img.size_bytes);
    status.virtual_size_bytes = img.virtual_size_bytes;
    status.progress = None;
    let cond = condition("Ready", true, "Available", String::new(), generation);
    set_condition(&mut status.conditions, cond, Utc::now());
}

impl ImageReconciler {
    async fn finalize(&self, obj: &Object, image: &Image) -> Result<Action, Error> {
        let ctx = &self.ctx;
        if !obj.metadata.finalizers.iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let name = image.metadata.name.as_str();
        let r = obj.object_ref();
        let users: Vec<String> = ctx
            .list(Kind::VirtualMachine)
            .await?
            .iter()
            .filter(|vm| vm.spec.get("image").and_then(|v| v.as_str()) == Some(name))
            .map(|vm| vm.metadata.name.clone())
            .collect();
        if !users.is_empty() {
            let mut status = self.mine(image.status.clone());
            let cond = condition(
                "Ready",
                false,
                "InUse",
                format!(
                    "deleted, but VM {} still uses it; it goes when they do",
                    users.join(", ")
                ),
                image.metadata.generation,
            );
            if set_condition(&mut status.conditions, cond, Utc::now()) {
                self.put(obj, &status).await?;
                let msg = format!("Image {name} is kept while VM {} uses it", users.join(", "));
                ctx.note(&r, NoteType::Warning, Self::NAME, "InUse", msg)
                    .await;
            }
            return Ok(Action::requeue(std::time::Duration::from_secs(5)));
        }
        let shared = ctx.list(Kind::Image).await?.iter().any(|o| {
            o.metadata.name != name
                && o.metadata.deletion_timestamp.is_none()
                && o.spec.get("source") == obj.spec.get("source")
        });
        if !shared {
            ctx.drivers
                .images
                .remove(name, &image.spec)
                .await
                .map_err(Error::driver("remove the cached file of", &r))?;
            let msg = format!("Removed the cached file of image {name}");
            ctx.note(&r, NoteType::Normal, Self::NAME, "Removed", msg)
                .await;
        }
        ctx.remove_finalizer(obj, FINALIZER).await?;
        self.forget_failures(name);
        self.pulls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        Ok(Action::await_change())
    }
}

impl Reconciler for ImageReconciler {
    type Error = Error;
    const KIND: Kind = Kind::Image;
    const NAME: &'static str = "image-controller";

    /// In a cluster, a VM bound to this node (or changed while bound to
    /// it) wakes its Image: this node fetches it then.
    fn related(
        &self,
        rel: &crate::runtime::controller::Relations,
        ev: &vmctl_store::Event,
    ) -> Vec<vmctl_api::ObjectRef> {
        if !self.ctx.config.cluster || ev.object.kind != Kind::VirtualMachine {
            return Vec::new();
        }
        // A binding to this node (no VM controller wrote since), or a VM
        // changed after its creation (its image may be another now). A
        // new VM is not bound yet: its binding comes next.
        let here = match &ev.change {
            vmctl_store::Change::StatusUpdated { status } => self.ctx.is_fresh_binding_here(status),
            vmctl_store::Change::Applied { created, .. } => !created,
            _ => false,
        };
        if here {
            rel.image_of(&ev.object.name).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, Error> {
        let ctx = &self.ctx;
        let image = Image::from_object(&obj).map_err(Error::decode(Kind::Image))?;
        if image.metadata.deletion_timestamp.is_some() {
            return self.finalize(&obj, &image).await;
        }
        let Some(obj) = ctx.add_finalizer(&obj, FINALIZER).await? else {
            return Ok(Action::await_change());
        };
        let obj = Arc::new(obj);
        let name = image.metadata.name.as_str();
        let generation = image.metadata.generation;
        let r = obj.object_ref();
        let old = self.mine(image.status.clone());
        // In a cluster a node fetches an image once a VM bound to it needs
        // it (or when no VM uses it).
        if self.ctx.config.cluster
            && old.phase == ImagePhase::Pending
            && !self.needed_here(name).await?
        {
            return Ok(Action::await_change());
        }
        let mut status = old.clone();
        let fetcher = &ctx.drivers.images;

        // Observe: already there?
        let found = fetcher.lookup(name, &image.spec).await.ok().flatten();
        if let Some(img) = found {
            set_ready(&mut status, &img, generation);
            if status != old {
                self.put(&obj, &status).await?;
                if old.phase != ImagePhase::Ready {
                    let msg = format!("Image {name} is available at {}", img.path);
                    ctx.note(&r, NoteType::Normal, Self::NAME, "Pulled", msg)
                        .await;
                }
            }
            return Ok(Action::await_change());
        }

        // A permanent failure stays until the spec changes or `image pull`
        // asks again.
        if old.phase == ImagePhase::Failed
            && old.observed_generation == generation
            && !self.new_pull_request(&obj)
        {
            return Ok(Action::await_change());
        }

        // Act: fetch.
        status.phase = ImagePhase::Downloading;
        let retrying = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "BackOff");
        if !retrying {
            let cond = condition(
                "Ready",
                false,
                "Downloading",
                "fetching the image",
                generation,
            );
            set_condition(&mut status.conditions, cond, Utc::now());
        }
        let Some(mut obj) = self.write_fresh(&obj, &status).await? else {
            return Ok(Action::requeue(Duration::ZERO));
        };
        // Progress reaches the status coarsely (at most every 2 s), so that
        // `apply --wait` can show it without every chunk growing the log.
        let (ptx, mut prx) = tokio::sync::watch::channel(None::<(u64, Option<u64>)>);
        let progress = move |done: u64, total: Option<u64>| {
            ptx.send_replace(Some((done, total)));
        };
        let fetch = fetcher.ensure(name, &image.spec, &progress);
        tokio::pin!(fetch);
        let mut last_write = std::time::Instant::now();
        let result = loop {
            tokio::select! {
                // The fetch stays pinned across iterations: losing this race
                // to the progress arm only delays polling it, nothing is lost.
                r = &mut fetch => break r,
                // `changed` only waits; it is cancel-safe.
                Ok(()) = prx.changed() => {
                    if last_write.elapsed() >= Duration::from_secs(2) {
                        let p = *prx.borrow_and_update();
                        status.progress = p.map(|(bytes, total)| vmctl_api::Progress { bytes, total });
                        if retrying && p.is_some_and(|(bytes, _)| bytes > 0) {
                            let cond = condition("Ready", false,
                                "Downloading",
                                "fetching the image again",
                                generation,
                            );
                            set_condition(&mut status.conditions, cond, Utc::now());
                        }
                        // Progress is only shown: a failed write never
                        // stops the fetch.
                        match self.write_fresh(&obj, &status).await {
                            Ok(Some(o)) => obj = o,
                            Ok(None) => return Ok(Action::requeue(Duration::ZERO)),
                            Err(e) => tracing::warn!(error = %crate::runtime::controller::ErrorChain(&e), "cannot write download progress"),
                        }
                        last_write = std::time::Instant::now();
                    }
                }
            }
        };
        match result {
            Ok(img) => {
                self.forget_failures(name);
                set_ready(&mut status, &img, generation);
                if self.write_fresh(&obj, &status).await?.is_none() {
                    return Ok(Action::requeue(Duration::ZERO));
                }
                let msg = format!("Image {name} is available at {}", img.path);
                ctx.note(&r, NoteType::Normal, Self::NAME, "Pulled", msg)
                    .await;
                Ok(Action::await_change())
            }
            Err(source) if source.is_permanent() => {
                self.forget_failures(name);
                // This failure answers the pull request in force, if any.
                self.new_pull_request(&obj);
                status.phase = ImagePhase::Failed;
                status.observed_generation = generation;
                status.progress = None;
                let message = format!("{source}");
                let cond = condition(
                    "Ready",
                    false,
                    "FetchFailed",
                    format!(
                        "{message}; not retried until the Image changes or `vmctl image pull` asks"
                    ),
                    generation,
                );
                set_condition(&mut status.conditions, cond, Utc::now());
                if self.write_fresh(&obj, &status).await?.is_none() {
                    return Ok(Action::requeue(Duration::ZERO));
                }
                ctx.note(&r, NoteType::Warning, Self::NAME, "Failed", message)
                    .await;
                Ok(Action::await_change())
            }
            Err(source) => {
                let n = self.failed_again(name, generation);
                let delay = ctx.config.backoff.jittered(n);
                status.phase = ImagePhase::Downloading;
                status.observed_generation = generation;
                status.progress = None;
                let message = format!("{source}; retry {n} in {:.1}s", delay.as_secs_f64());
                let cond = condition("Ready", false, "BackOff", message.clone(), generation);
                set_condition(&mut status.conditions, cond, Utc::now());
                if self.write_fresh(&obj, &status).await?.is_none() {
                    return Ok(Action::requeue(Duration::ZERO));
                }
                tracing::warn!(image = name, failures = n, ?delay, error = %source, "image fetch failed; backing off");
                ctx.note(&r, NoteType::Warning, Self::NAME, "BackOff", message)
                    .await;
                Ok(Action::requeue(delay))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The controller with the real image cache, against a real HTTP
    //! server on 127.0.0.1, and the fake hypervisor.

    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use vmctl_api::{ApplySource, ImageSource, ImageSpec, Object, ObjectRef};
    use vmctl_store::{SledStore, Store};

    use super::*;
    use crate::drivers::cached::CachedImages;
    use crate::images::ImageCache;
    use crate::images::tests::{FAST_RETRY, Route, Server};
    use crate::{BackoffPolicy, FakeConfig, FakeWorld, RuntimeConfig};

    struct Harness {
        _tmp: tempfile::TempDir,
        store: Arc<dyn Store>,
        server: Server,
        stop: tokio::sync::watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), crate::RunError>>,
    }

    fn qcow2(dir: &std::path::Path) -> Arc<Vec<u8>> {
        let p = dir.join("disk.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        Arc::new(std::fs::read(p).unwrap())
    }

    async fn start(routes: impl FnOnce(Arc<Vec<u8>>) -> HashMap<&'static str, Route>) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start(routes(qcow2(tmp.path())));
        let cache = ImageCache::new(tmp.path().join("images")).with_retry(FAST_RETRY);
        let mut drivers = FakeWorld::new(FakeConfig::default()).drivers();
        drivers.images = Arc::new(CachedImages::with_cache(cache));
        let store: Arc<dyn Store> = Arc::new(SledStore::open(tmp.path().join("store")).unwrap());
        let config = RuntimeConfig {
            backoff: BackoffPolicy {
                base: Duration::from_millis(20),
                max: Duration::from_millis(200),
            },
            resync: None,
            ..RuntimeConfig::default()
        };
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(crate::run(store.clone(), drivers, config, shutdown));
        Harness {
            _tmp: tmp,
            store,
            server,
            stop,
            task,
        }
    }

    impl Harness {
        fn image(&self, path: &str) -> Object {
            Image::new(
                "img",
                ImageSpec {
                    source: ImageSource::Url {
                        url: self.server.url(path),
                    },
                    checksum: None,
                },
            )
            .to_object()
        }

        async fn apply(&self, obj: Object, file: &str) {
            let (store, source) = (
                self.store.clone(),
                ApplySource {
                    file: Some(file.into()),
                    applied_by: Some("test".into()),
                },
            );
            store.apply(obj, Some(source), None).await.unwrap();
        }

        async fn status(&self) -> Option<ImageStatus> {
            let o = self
                .store
                .get(&ObjectRef::new(Kind::Image, "img"))
                .await
                .unwrap()?;
            serde_json::from_value(o.status?).ok()
        }

        /// The notes' reasons once one is `last` (notes follow the
        /// status write they report).
        async fn reasons_until(&self, last: &str) -> Vec<String> {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let r = self.reasons().await;
                if r.last().is_some_and(|l| l == last) || std::time::Instant::now() > deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn reasons(&self) -> Vec<String> {
            self.store
                .notes(Some(&ObjectRef::new(Kind::Image, "img")))
                .await
                .unwrap()
                .into_iter()
                .map(|n| n.note.reason)
                .collect()
        }

        /// Polls until `cond` holds for the status, recording every
        /// (phase, Ready reason) seen.
        async fn until(
            &self,
            timeout: Duration,
            seen: &mut Vec<(ImagePhase, String)>,
            cond: impl Fn(&ImageStatus) -> bool,
        ) -> ImageStatus {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if let Some(st) = self.status().await {
                    let reason = st
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| c.reason.clone())
                        .unwrap_or_default();
                    if seen.last() != Some(&(st.phase, reason.clone())) {
                        seen.push((st.phase, reason));
                    }
                    if cond(&st) {
                        return st;
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "timed out; saw {seen:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn stop(self) {
            self.stop.send(true).unwrap();
            self.task.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reapply_during_download_does_not_restart_it() {
        // About 4 s: long enough for progress writes after the re-apply.
        let h = start(|q| {
            HashMap::from([(
                "/slow.qcow2",
                Route::Paced(q, 40, Duration::from_millis(100)),
            )])
        })
        .await;
        h.apply(h.image("/slow.qcow2"), "/a/VMFile.kdl").await;
        let mut seen = Vec::new();
        h.until(Duration::from_secs(10), &mut seen, |st| {
            st.phase == ImagePhase::Downloading
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A second VMFile naming the same URL: new labels and source, so
        // the store clears the status and the next progress write conflicts.
        let mut again = h.image("/slow.qcow2");
        again
            .metadata
            .labels
            .insert("vmctl.dev/file".into(), "b".into());
        h.apply(again, "/b/VMFile.kdl").await;
        let st = h
            .until(Duration::from_secs(30), &mut seen, |st| {
                st.phase == ImagePhase::Ready
            })
            .await;
        assert_eq!(st.format.as_deref(), Some("qcow2"));
        assert_eq!(h.server.requests("/slow.qcow2"), 1, "one download per URL");
        let reasons = h.reasons_until("Pulled").await;
        assert_eq!(
            reasons.iter().filter(|r| *r == "Pulled").count(),
            1,
            "{reasons:?}"
        );
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_fetch_failure_backs_off_visibly_then_recovers() {
        // Three 500s: three fetches back off, the fourth works.
        let h = start(|q| HashMap::from([("/flaky.qcow2", Route::FailFirst(3, 500, q))])).await;
        h.apply(h.image("/flaky.qcow2"), "/a/VMFile.kdl").await;
        let mut seen = Vec::new();
        h.until(Duration::from_secs(20), &mut seen, |st| {
            st.phase == ImagePhase::Ready
        })
        .await;
        assert!(
            seen.contains(&(ImagePhase::Downloading, "BackOff".into())),
            "{seen:?}"
        );
        assert!(
            !seen.iter().any(|(p, _)| *p == ImagePhase::Failed),
            "a transient failure is not Failed: {seen:?}"
        );
        let reasons = h.reasons_until("Pulled").await;
        assert!(reasons.contains(&"BackOff".to_owned()), "{reasons:?}");
        assert_eq!(reasons.last().map(String::as_str), Some("Pulled"));
        assert_eq!(h.server.requests("/flaky.qcow2"), 4);
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forbidden_image_fails_at_once_and_is_not_retried() {
        let h = start(|_| HashMap::from([("/forbidden.qcow2", Route::Status(403))])).await;
        h.apply(h.image("/forbidden.qcow2"), "/a/VMFile.kdl").await;
        let mut seen = Vec::new();
        let st = h
            .until(Duration::from_secs(10), &mut seen, |st| {
                st.phase == ImagePhase::Failed
            })
            .await;
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, "FetchFailed");
        assert!(ready.message.contains("403"), "{}", ready.message);
        // With 20 ms backoffs, a retry would have come by now.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(h.server.requests("/forbidden.qcow2"), 1);
        assert_eq!(h.status().await.unwrap().phase, ImagePhase::Failed);
        h.stop().await;
    }
}
