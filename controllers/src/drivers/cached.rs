//! The real [`ImageFetcher`]: the on-disk image cache of [`crate::images`]
//! (downloads with checksums, unpacked from gzip, xz or zstd; every image
//! inspected as untrusted).

use std::path::Path;

use vmctl_api::ImageSpec;

use super::{BoxFuture, DriverError, ImageFetcher, LocalImage, ProgressFn, Result};
use crate::images::{ImageCache, ImageError};

/// Fetches images into `<data_dir>/images`.
#[derive(Debug)]
pub struct CachedImages {
    cache: ImageCache,
}

impl CachedImages {
    /// A fetcher whose cache lives in `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        CachedImages {
            cache: ImageCache::in_data_dir(data_dir),
        }
    }

    /// A fetcher over `cache` (for a cache with its own retry policy).
    pub fn with_cache(cache: ImageCache) -> Self {
        CachedImages { cache }
    }
}

/// Keeps the code and help of an image error in the driver error's text,
/// which is what status conditions and notes show; a failure that retrying
/// cannot fix is [`DriverError::Permanent`].
fn driver_error(e: ImageError) -> DriverError {
    let mut msg = vmctl_api::error_chain(&e);
    if let Some(h) = e.help() {
        msg.push_str(&format!(" ({h})"));
    }
    let msg = format!("{msg} [{}]", e.code());
    if e.is_transient() {
        DriverError::Backend(msg)
    } else {
        DriverError::Permanent(msg)
    }
}

impl ImageFetcher for CachedImages {
    fn lookup<'a>(
        &'a self,
        _name: &'a str,
        spec: &'a ImageSpec,
    ) -> BoxFuture<'a, Result<Option<LocalImage>>> {
        Box::pin(async move {
            Ok(self
                .cache
                .lookup_spec(spec)
                .await
                .map_err(driver_error)?
                .map(Into::into))
        })
    }

    fn remove<'a>(&'a self, _name: &'a str, spec: &'a ImageSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match &spec.source {
                vmctl_api::ImageSource::Url { url } => {
                    self.cache.remove(url).await.map_err(driver_error)
                }
                // The user's file: never touched.
                vmctl_api::ImageSource::Path { .. } => Ok(()),
            }
        })
    }

    fn ensure<'a>(
        &'a self,
        _name: &'a str,
        spec: &'a ImageSpec,
        progress: ProgressFn<'a>,
    ) -> BoxFuture<'a, Result<LocalImage>> {
        Box::pin(async move {
            let img = self
                .cache
                .ensure(spec, |p: vmctl_api::Progress| progress(p.bytes, p.total))
                .await
                .map_err(driver_error)?;
            Ok(img.into())
        })
    }
}
