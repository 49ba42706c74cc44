//! The Image controller: makes every Image available on the host.
//!
//! ```text
//!   Pending ──▶ Downloading ──ok──▶ Ready   (note Pulled)
//!                   │
//!                   └──error──▶ Failed      (note Failed; retried with backoff)
//! ```
//!
//! Observe first: an image the fetcher already has is Ready without a fetch.
//!
//! The finalizer `vmctl.dev/image-cache` makes a deleted Image wait until no
//! VM uses it (their disks are overlays on its file), then removes the file
//! it downloaded, unless another Image names the same URL. A local path
//! source is the user's file and is never removed.

use std::sync::Arc;

use chrono::Utc;
use vmctl_api::{
    Condition, ConditionStatus, Image, ImagePhase, ImageStatus, Kind, NoteType, Object,
    set_condition,
};

use crate::Context;
use crate::drivers::{DriverError, LocalImage};
use crate::runtime::controller::ControllerError;
use crate::runtime::{Action, ReconcileError, Reconciler};

/// Errors of the Image controller.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The object's spec or status does not match the Image schema.
    #[error("invalid Image object")]
    Decode(#[source] serde_json::Error),
    /// Reading or writing the store failed.
    #[error("store access failed")]
    Store(#[source] ControllerError),
    /// The fetcher could not make the image available.
    #[error("cannot fetch image {name}")]
    Fetch {
        /// The image.
        name: String,
        /// Why.
        #[source]
        source: DriverError,
    },
}

impl ReconcileError for ImageError {
    fn is_conflict(&self) -> bool {
        matches!(self, ImageError::Store(e) if e.is_conflict())
    }
}

impl From<ControllerError> for ImageError {
    fn from(e: ControllerError) -> Self {
        ImageError::Store(e)
    }
}

/// The finalizer that removes a deleted Image's downloaded file.
pub const FINALIZER: &str = "vmctl.dev/image-cache";

/// Reconciles Images.
#[derive(Debug)]
pub struct ImageReconciler {
    ctx: Arc<Context>,
}

impl ImageReconciler {
    /// An Image reconciler using `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        ImageReconciler { ctx }
    }
}

fn ready_condition(
    status: ConditionStatus,
    reason: &str,
    message: String,
    generation: u64,
) -> Condition {
    Condition {
        type_: "Ready".into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: generation,
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
    let cond = ready_condition(
        ConditionStatus::True,
        "Available",
        String::new(),
        generation,
    );
    set_condition(&mut status.conditions, cond, Utc::now());
}

impl ImageReconciler {
    async fn finalize(&self, obj: &Object, image: &Image) -> Result<Action, ImageError> {
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
            let mut status = image.status.clone().unwrap_or_default();
            let cond = ready_condition(
                ConditionStatus::False,
                "InUse",
                format!(
                    "deleted, but VM {} still uses it; it goes when they do",
                    users.join(", ")
                ),
                image.metadata.generation,
            );
            if set_condition(&mut status.conditions, cond, Utc::now()) {
                ctx.write_status(obj, &status).await?;
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
                .map_err(|source| ImageError::Fetch {
                    name: name.to_owned(),
                    source,
                })?;
            let msg = format!("Removed the cached file of image {name}");
            ctx.note(&r, NoteType::Normal, Self::NAME, "Removed", msg)
                .await;
        }
        ctx.remove_finalizer(obj, FINALIZER).await?;
        Ok(Action::await_change())
    }
}

impl Reconciler for ImageReconciler {
    type Error = ImageError;
    const KIND: Kind = Kind::Image;
    const NAME: &'static str = "image-controller";

    async fn reconcile(&self, obj: Arc<Object>) -> Result<Action, ImageError> {
        let ctx = &self.ctx;
        let image = Image::from_object(&obj).map_err(ImageError::Decode)?;
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
        let old = image.status.clone().unwrap_or_default();
        let mut status = old.clone();
        let fetcher = &ctx.drivers.images;

        // Observe: already there?
        let found = fetcher.lookup(name, &image.spec).await.ok().flatten();
        if let Some(img) = found {
            set_ready(&mut status, &img, generation);
            if status != old {
                ctx.write_status(&obj, &status).await?;
                if old.phase != ImagePhase::Ready {
                    let msg = format!("Image {name} is available at {}", img.path);
                    ctx.note(&r, NoteType::Normal, Self::NAME, "Pulled", msg)
                        .await;
                }
            }
            return Ok(Action::await_change());
        }

        // Act: fetch.
        status.phase = ImagePhase::Downloading;
        let cond = ready_condition(
            ConditionStatus::False,
            "Downloading",
            "fetching the image".into(),
            generation,
        );
        set_condition(&mut status.conditions, cond, Utc::now());
        let mut obj = ctx.write_status(&obj, &status).await?;
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
                    if last_write.elapsed() >= std::time::Duration::from_secs(2) {
                        let p = *prx.borrow_and_update();
                        status.progress = p.map(|(bytes, total)| vmctl_api::Progress { bytes, total });
                        obj = ctx.write_status(&obj, &status).await?;
                        last_write = std::time::Instant::now();
                    }
                }
            }
        };
        match result {
            Ok(img) => {
                set_ready(&mut status, &img, generation);
                ctx.write_status(&obj, &status).await?;
                let msg = format!("Image {name} is available at {}", img.path);
                ctx.note(&r, NoteType::Normal, Self::NAME, "Pulled", msg)
                    .await;
                Ok(Action::await_change())
            }
            Err(source) => {
                status.phase = ImagePhase::Failed;
                status.observed_generation = generation;
                let message = format!("{source}");
                let cond = ready_condition(
                    ConditionStatus::False,
                    "FetchFailed",
                    message.clone(),
                    generation,
                );
                set_condition(&mut status.conditions, cond, Utc::now());
                ctx.write_status(&obj, &status).await?;
                ctx.note(&r, NoteType::Warning, Self::NAME, "Failed", message)
                    .await;
                Err(ImageError::Fetch {
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }
}
