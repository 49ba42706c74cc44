//! The download cache.
//!
//! ```text
//!   <root>/<sha256(url)>/image          the image, decompressed
//!                       /meta.json      url, digests, sizes, format, fetched_at
//!                       /.partial-XXXX  a download (or meta.json) in progress
//! ```
//!
//! An entry is valid only if `meta.json` parses, names the same URL, and
//! `image` has the size it records. `meta.json` is removed before a new
//! image is renamed into place and written (atomically) after, so a crash
//! at any point leaves an entry that is either valid and complete or not
//! valid at all. `.partial-*` files are never looked at, and are removed
//! when the next download of that URL starts.
//!
//! Keyed by URL: two Images with one URL share one download and one file,
//! and a changed URL gets a new entry. The content behind an unchanged URL
//! is not re-checked; give a `checksum` to pin it.
//!
//! A `checksum` is verified against the bytes as downloaded, so for a
//! compressed URL (`.gz`, `.xz`, `.zst`) it is the digest of the compressed file (what distributions
//! publish next to it). Both SHA-256 and SHA-512 are computed for every
//! download and recorded. A cached entry whose recorded digest differs
//! from the requested `checksum` is not used: the URL is downloaded again,
//! because a changed checksum usually means the file behind a rolling URL
//! changed on purpose. If the new download does not match either, the
//! fetch fails with both digests and the old entry is left as it was.
//!
//! Concurrent fetches of one URL take a per-URL lock: the first downloads,
//! the others wait and then find the entry valid. [`ImageCache::lookup`]
//! takes no lock, so that it never waits for a download.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tokio::sync::OwnedMutexGuard;
use vmctl_api::{ImageSource, ImageSpec};

use super::checksum::{Checksum, Digests};
use super::compression::{self, Compression};
use super::download::{self, PARTIAL_PREFIX, RetryPolicy, Source};
use super::{ImageError, LocalImage, Progress, Result, inspected, local};

const IMAGE: &str = "image";
const META: &str = "meta.json";

/// Downloads images into `<data_dir>/images`, once per URL.
#[derive(Debug)]
pub struct ImageCache {
    root: PathBuf,
    client: reqwest::Client,
    retry: RetryPolicy,
    pub(super) locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What `meta.json` records about an entry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    url: String,
    /// Digests of the downloaded bytes.
    #[serde(flatten)]
    digests: Digests,
    /// The checksum verified at download time, if one was given.
    checksum: Option<String>,
    size_bytes: u64,
    downloaded_bytes: u64,
    format: String,
    virtual_size_bytes: Option<u64>,
    fetched_at: DateTime<Utc>,
}

impl Meta {
    fn local_image(&self, dir: &Path) -> LocalImage {
        LocalImage {
            path: dir.join(IMAGE),
            format: self.format.clone(),
            size_bytes: self.size_bytes,
            virtual_size_bytes: self.virtual_size_bytes,
            digest: Some(format!("sha256:{}", self.digests.sha256)),
        }
    }
}

/// The cache key of a URL: hex SHA-256 of its text.
pub fn cache_key(url: &str) -> String {
    hex::encode(Sha256::digest(url.as_bytes()))
}

fn parse_checksum(checksum: Option<&str>) -> Result<Option<Checksum>> {
    checksum
        .map(|c| c.parse().map_err(ImageError::InvalidChecksum))
        .transpose()
}

/// The source of a URL and the compression its suffix names; a suffix
/// naming a format vmctl cannot unpack is refused before downloading.
fn parse_source(url: &str) -> Result<(Source, Compression)> {
    let unsupported = || ImageError::UnsupportedUrl(url.to_owned());
    let parsed = url::Url::parse(url).map_err(|_| unsupported())?;
    let named = compression::from_suffix(parsed.path()).map_err(|what| ImageError::Compressed {
        image: url.to_owned(),
        what: what.to_owned(),
        unpackable: false,
    })?;
    let source = match parsed.scheme() {
        "http" | "https" => Source::Http(url.to_owned()),
        "file" => Source::File(parsed.to_file_path().map_err(|()| unsupported())?),
        _ => return Err(unsupported()),
    };
    Ok((source, named))
}

impl ImageCache {
    /// A cache in `root` (usually `<data_dir>/images`), created on first
    /// download.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!("vmctl/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // No overall timeout: images are large. A stalled transfer is
            // caught by the read timeout instead.
            .read_timeout(Duration::from_secs(60))
            .build()
            // Fails only if the TLS backend cannot initialise; rustls with
            // bundled roots has nothing to load from the host.
            .expect("the HTTP client builds");
        ImageCache {
            root: root.into(),
            client,
            retry: RetryPolicy::default(),
            locks: Mutex::default(),
        }
    }

    /// The same cache retrying transient download failures by `retry`
    /// (default: [`RetryPolicy::default`]).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The cache of a data directory: `<data_dir>/images`.
    pub fn in_data_dir(data_dir: impl AsRef<Path>) -> Self {
        ImageCache::new(data_dir.as_ref().join("images"))
    }

    /// The cache's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `url`'s entry.
    pub fn entry_dir(&self, url: &str) -> PathBuf {
        self.root.join(cache_key(url))
    }

    /// The cached image of `url` if there is a valid entry matching
    /// `checksum`, without downloading.
    pub async fn lookup(&self, url: &str, checksum: Option<&str>) -> Result<Option<LocalImage>> {
        let checksum = parse_checksum(checksum)?;
        Ok(read_entry(&self.entry_dir(url), url, checksum.as_ref()).await)
    }

    /// The image of `url`, downloaded unless a valid entry matching
    /// `checksum` is cached. `progress` is called coarsely while
    /// downloading (see [`download`]).
    pub async fn fetch(
        &self,
        url: &str,
        checksum: Option<&str>,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<LocalImage> {
        let checksum = parse_checksum(checksum)?;
        let (source, named) = parse_source(url)?;
        let key = cache_key(url);
        let dir = self.root.join(&key);
        let _lock = self.lock(key).await;
        if let Some(hit) = read_entry(&dir, url, checksum.as_ref()).await {
            tracing::debug!(url, path = %hit.path.display(), "image cache hit");
            return Ok(hit);
        }
        tracing::info!(url, "downloading image");
        self.download(url, &source, named, checksum.as_ref(), &dir, &progress)
            .await
    }

    /// Deletes `url`'s entry (waiting for a download of it in flight).
    pub async fn remove(&self, url: &str) -> Result<()> {
        let key = cache_key(url);
        let dir = self.root.join(&key);
        let _lock = self.lock(key).await;
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ImageError::Cache {
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// The image of `spec` if it is available without downloading: a path
    /// source that exists, or a valid cache entry. A path source's checksum
    /// is not verified (hashing a large local file on every look would be
    /// too slow).
    pub async fn lookup_spec(&self, spec: &ImageSpec) -> Result<Option<LocalImage>> {
        match &spec.source {
            ImageSource::Path { path } => match local(path).await {
                Ok(image) => Ok(Some(image)),
                Err(ImageError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            },
            ImageSource::Url { url } => self.lookup(url, spec.checksum.as_deref()).await,
        }
    }

    /// Makes the image of `spec` available: [`local`] for a path source,
    /// [`ImageCache::fetch`] for a URL.
    pub async fn ensure(
        &self,
        spec: &ImageSpec,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<LocalImage> {
        match &spec.source {
            ImageSource::Path { path } => local(path).await,
            ImageSource::Url { url } => self.fetch(url, spec.checksum.as_deref(), progress).await,
        }
    }

    async fn lock(&self, key: String) -> KeyLock<'_> {
        let mutex = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = mutex.clone().lock_owned().await;
        KeyLock {
            cache: self,
            key,
            mutex,
            guard: Some(guard),
        }
    }

    async fn download(
        &self,
        url: &str,
        source: &Source,
        named: Compression,
        checksum: Option<&Checksum>,
        dir: &Path,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<LocalImage> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| ImageError::Cache {
                path: dir.to_owned(),
                source,
            })?;
        remove_partials(dir).await;
        let got = download::download(&self.client, source, dir, named, self.retry, progress)
            .await
            .map_err(|source| ImageError::Download {
                url: url.to_owned(),
                source,
            })?;
        if let Some(expected) = checksum {
            let actual = got.digests.get(expected.algorithm);
            if actual != *expected {
                return Err(ImageError::ChecksumMismatch {
                    url: url.to_owned(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        // Whatever the format, nothing that refers outside itself is kept.
        let info = inspected(url, got.file.path()).await?;
        let meta = Meta {
            url: url.to_owned(),
            digests: got.digests,
            checksum: checksum.map(ToString::to_string),
            size_bytes: got.written,
            downloaded_bytes: got.downloaded,
            format: info.format,
            virtual_size_bytes: Some(info.virtual_size),
            fetched_at: Utc::now(),
        };
        let entry = dir.to_owned();
        let file = got.file;
        let image = meta.local_image(dir);
        tokio::task::spawn_blocking(move || commit(&entry, file, &meta))
            .await
            .map_err(|e| ImageError::Cache {
                path: dir.to_owned(),
                source: std::io::Error::other(e),
            })??;
        tracing::info!(
            url,
            path = %image.path.display(),
            format = %image.format,
            compression = %got.compression,
            attempts = got.attempts,
            "image downloaded"
        );
        Ok(image)
    }
}

/// Holds the per-URL lock; forgets the URL's mutex when nobody else wants it.
struct KeyLock<'a> {
    cache: &'a ImageCache,
    key: String,
    mutex: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for KeyLock<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self
            .cache
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Clones are only made under `locks`: the map's and ours mean no
        // one else holds or waits for this mutex.
        if Arc::strong_count(&self.mutex) == 2 {
            locks.remove(&self.key);
        }
    }
}

async fn read_entry(dir: &Path, url: &str, checksum: Option<&Checksum>) -> Option<LocalImage> {
    let bytes = tokio::fs::read(dir.join(META)).await.ok()?;
    let meta: Meta = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "ignoring unreadable image cache metadata");
            return None;
        }
    };
    if meta.url != url {
        return None;
    }
    let len = tokio::fs::metadata(dir.join(IMAGE)).await.ok()?.len();
    if len != meta.size_bytes {
        return None;
    }
    if let Some(expected) = checksum
        && !meta.digests.matches(expected)
    {
        tracing::info!(url, %expected, "cached image has another digest; downloading again");
        return None;
    }
    Some(meta.local_image(dir))
}

/// Removes leftovers of interrupted downloads. Called under the URL's
/// lock, so none of them belongs to a live download of this process.
async fn remove_partials(dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PARTIAL_PREFIX)
        {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Moves a verified download into place; see the module docs for the order.
fn commit(dir: &Path, file: NamedTempFile, meta: &Meta) -> Result<()> {
    let cache_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::Cache { path, source }
    };
    let meta_path = dir.join(META);
    let image_path = dir.join(IMAGE);
    // The old meta.json must not outlive the image it describes.
    match fs::remove_file(&meta_path) {
        Ok(()) => sync_dir(dir).map_err(cache_err(dir))?,
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(cache_err(&meta_path)(e)),
    }
    // Temp files are 0600; a hypervisor running as another user must be
    // able to read its base image.
    file.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(cache_err(file.path()))?;
    file.persist(&image_path)
        .map_err(|e| cache_err(&image_path)(e.error))?;
    sync_dir(dir).map_err(cache_err(dir))?;
    if let Some(root) = dir.parent() {
        sync_dir(root).map_err(cache_err(root))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempfile_in(dir)
        .map_err(cache_err(dir))?;
    serde_json::to_writer_pretty(&mut tmp, meta).map_err(|e| cache_err(tmp.path())(e.into()))?;
    tmp.as_file().sync_all().map_err(cache_err(tmp.path()))?;
    tmp.persist(&meta_path)
        .map_err(|e| cache_err(&meta_path)(e.error))?;
    sync_dir(dir).map_err(cache_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_compressions_are_recognised() {
        let (s, z) = parse_source("https://example.org/a/disk.qcow2.zst?x=1").unwrap();
        assert_eq!(
            s,
            Source::Http("https://example.org/a/disk.qcow2.zst?x=1".into())
        );
        assert_eq!(z, Compression::Zstd);
        let (s, z) = parse_source("file:///var/img/disk.raw.ZSTD").unwrap();
        assert_eq!(s, Source::File("/var/img/disk.raw.ZSTD".into()));
        assert_eq!(z, Compression::Zstd);
        let (_, z) = parse_source("http://h/disk.img?f=x.zst").unwrap();
        assert_eq!(z, Compression::None);
        let (_, z) = parse_source("http://h/disk.qcow2.gz").unwrap();
        assert_eq!(z, Compression::Gzip);
        assert!(matches!(
            parse_source("http://h/disk.img.bz2"),
            Err(ImageError::Compressed { .. })
        ));
        assert!(matches!(
            parse_source("ftp://h/x"),
            Err(ImageError::UnsupportedUrl(_))
        ));
        assert!(matches!(
            parse_source("not a url"),
            Err(ImageError::UnsupportedUrl(_))
        ));
    }

    #[test]
    fn keys_differ_per_url() {
        assert_eq!(cache_key("http://a/x").len(), 64);
        assert_ne!(cache_key("http://a/x"), cache_key("http://a/x?v=2"));
    }
}
