//! Images on the host: local paths checked and inspected, URLs downloaded
//! into a cache.
//!
//! ```text
//!   local(path) ─▶ exists, readable? ─▶ qemu-img info ─▶ LocalImage
//!
//!   ImageCache::fetch(url) ─▶ lock(key) ─▶ valid entry? ──yes──▶ LocalImage
//!                                              │ no
//!          http(s) / file:// ─chunks─▶ sha256+sha512 ─▶ [zstd] ─▶ .partial-XXXX
//!                                              │ fsync, checksum ok, qemu-img info ok
//!          remove meta.json ─▶ rename → image ─▶ fsync dir ─▶ meta.json (atomic)
//! ```
//!
//! See [`cache`] for the layout on disk and the rules of a valid entry.

pub mod cache;
pub mod checksum;
pub mod download;
pub mod inspect;

#[cfg(test)]
mod tests;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub use cache::ImageCache;
pub use checksum::{Checksum, ChecksumError};
pub use download::DownloadError;
pub use inspect::{ImageInfo, InspectError, inspect};
/// Download progress: bytes done, total if known (the Image status type).
pub use vmctl_api::Progress;

/// Error codes of [`ImageError`], as shown to users.
pub mod codes {
    /// A download failed (transport, HTTP status, truncated, bad zstd).
    pub const DOWNLOAD_FAILED: &str = "vmctl::image::download_failed";
    /// The downloaded bytes do not have the expected digest.
    pub const CHECKSUM_MISMATCH: &str = "vmctl::image::checksum_mismatch";
    /// `qemu-img info` could not tell what the image is.
    pub const FORMAT_DETECTION_FAILED: &str = "vmctl::image::format_detection_failed";
    /// A local image is missing or unreadable.
    pub const NOT_FOUND: &str = "vmctl::image::not_found";
    /// The `checksum` is not `sha256:<hex>` or `sha512:<hex>`.
    pub const INVALID_CHECKSUM: &str = "vmctl::image::invalid_checksum";
    /// The source is neither an http(s) nor a file URL.
    pub const UNSUPPORTED_URL: &str = "vmctl::image::unsupported_url";
    /// A downloaded image refers to a backing file.
    pub const BACKING_FILE: &str = "vmctl::image::backing_file";
    /// The cache directory cannot be written.
    pub const CACHE_FAILED: &str = "vmctl::image::cache_failed";
}

/// An image available on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Path of the image file.
    pub path: PathBuf,
    /// Its format as `qemu-img` detects it (`qcow2`, `raw`, …).
    pub format: String,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Virtual disk size in bytes.
    pub virtual_size_bytes: Option<u64>,
    /// `sha256:<hex>` of the bytes as downloaded (before decompression);
    /// `None` for local paths, which are not hashed.
    pub digest: Option<String>,
}

impl From<LocalImage> for crate::drivers::LocalImage {
    fn from(i: LocalImage) -> Self {
        crate::drivers::LocalImage {
            path: i.path.to_string_lossy().into_owned(),
            format: i.format,
            size_bytes: i.size_bytes,
            virtual_size_bytes: i.virtual_size_bytes,
        }
    }
}

/// Errors of making an image available.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A local image file does not exist.
    #[error("Image file {0} does not exist")]
    NotFound(PathBuf),
    /// A local image exists but cannot be opened for reading, or is not a
    /// regular file.
    #[error("Cannot read image file {path}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `checksum` does not parse.
    #[error("Invalid checksum")]
    InvalidChecksum(#[source] ChecksumError),
    /// The URL does not parse or has a scheme other than http, https, file.
    #[error("Unsupported image URL {0:?} (expected http://, https:// or file://)")]
    UnsupportedUrl(String),
    /// Downloading failed; nothing was cached.
    #[error("Cannot download {url}")]
    Download {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: DownloadError,
    },
    /// The downloaded bytes have another digest than the `checksum`;
    /// nothing was cached.
    #[error("Checksum mismatch for {url}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// The digest asked for.
        expected: Checksum,
        /// The digest of what was downloaded.
        actual: Checksum,
    },
    /// `qemu-img info` failed on the image.
    #[error("Cannot detect the format of {path}")]
    Format {
        /// The image (a temporary file for downloads).
        path: PathBuf,
        /// Why.
        #[source]
        source: InspectError,
    },
    /// A downloaded image refers to a backing file. Such an image would
    /// read a host file of the download's choosing, so it is refused.
    #[error("Image from {url} refers to backing file {backing:?}")]
    BackingFile {
        /// The URL.
        url: String,
        /// The backing file named in the image.
        backing: String,
    },
    /// Creating, syncing or renaming files in the cache failed.
    #[error("Cannot write image cache entry {path}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The error's code, one of [`codes`].
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::NotFound(_) | ImageError::Unreadable { .. } => codes::NOT_FOUND,
            ImageError::InvalidChecksum(_) => codes::INVALID_CHECKSUM,
            ImageError::UnsupportedUrl(_) => codes::UNSUPPORTED_URL,
            ImageError::Download { .. } => codes::DOWNLOAD_FAILED,
            ImageError::ChecksumMismatch { .. } => codes::CHECKSUM_MISMATCH,
            ImageError::Format { .. } => codes::FORMAT_DETECTION_FAILED,
            ImageError::BackingFile { .. } => codes::BACKING_FILE,
            ImageError::Cache { .. } => codes::CACHE_FAILED,
        }
    }

    /// What the user can do about it.
    pub fn help(&self) -> Option<&'static str> {
        Some(match self {
            ImageError::NotFound(_) => "check the Image's source path (it must be absolute)",
            ImageError::Unreadable { .. } => "make the file readable by the agent's user",
            ImageError::InvalidChecksum(_) => "write checksum as sha256:<hex> or sha512:<hex>",
            ImageError::UnsupportedUrl(_) => "use an http(s) or file URL, or a path source",
            ImageError::Download { .. } => "check the URL and the network; it is retried",
            ImageError::ChecksumMismatch { .. } => {
                "the file at the URL changed or the checksum is wrong: fix whichever is stale"
            }
            ImageError::Format { .. } => {
                "check that qemu-img is installed and the file is an image"
            }
            ImageError::BackingFile { .. } => "flatten it: qemu-img convert -O qcow2 in out",
            ImageError::Cache { .. } => return None,
        })
    }
}

/// Short for `Result<T, ImageError>`.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// A local path source: checks that it is a readable regular file and
/// detects its format.
pub async fn local(path: impl AsRef<Path>) -> Result<LocalImage> {
    let path = path.as_ref();
    let unreadable = |source| ImageError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(ImageError::NotFound(path.to_owned()));
        }
        Err(e) => return Err(unreadable(e)),
    };
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    // Opening proves readability; metadata alone does not.
    drop(tokio::fs::File::open(path).await.map_err(unreadable)?);
    let info = inspect(path).await.map_err(|source| ImageError::Format {
        path: path.to_owned(),
        source,
    })?;
    Ok(LocalImage {
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        format: info.format,
        size_bytes: meta.len(),
        virtual_size_bytes: Some(info.virtual_size),
        digest: None,
    })
}
