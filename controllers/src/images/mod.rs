//! Images on the host: local paths checked and inspected, URLs downloaded
//! into a cache.
//!
//! ```text
//!   local(path) ─▶ regular, readable, not compressed? ─▶ inspect_untrusted ─▶ LocalImage
//!
//!   ImageCache::fetch(url) ─▶ lock(key) ─▶ valid entry? ──yes──▶ LocalImage
//!                                              │ no
//!          http(s) / file:// ─chunks─▶ sha256+sha512 ─▶ [gzip|xz|zstd] ─▶ .partial-XXXX
//!                                              │ fsync, checksum ok, inspect_untrusted ok
//!          remove meta.json ─▶ rename → image ─▶ fsync dir ─▶ meta.json (atomic)
//! ```
//!
//! Every image, downloaded or local, is inspected as untrusted
//! ([`inspect::inspect_untrusted`]): raw or self-contained qcow2 only, its
//! format decided from its header and recorded so that QEMU is told it.
//!
//! See [`cache`] for the layout on disk and the rules of a valid entry.

pub mod cache;
pub mod checksum;
pub mod compression;
pub mod download;
pub mod inspect;

#[cfg(test)]
pub(crate) mod tests;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub use cache::ImageCache;
pub use checksum::{Checksum, ChecksumError};
pub use compression::{Compression, Unusable};
pub use download::{DownloadError, RetryPolicy};
pub use inspect::{ImageInfo, InspectError, Refusal, inspect, inspect_as, inspect_untrusted};
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
    /// An image refers to a backing file.
    pub const BACKING_FILE: &str = "vmctl::image::backing_file";
    /// An image refers to another file outside itself (a qcow2 external
    /// data file).
    pub const EXTERNAL_REFERENCE: &str = "vmctl::image::external_reference";
    /// An image is neither raw nor a plain qcow2 (vmdk, vhdx, encrypted, …).
    pub const UNSUPPORTED_FORMAT: &str = "vmctl::image::unsupported_format";
    /// An image is compressed or archived in a way vmctl does not unpack
    /// (or, for a local path, compressed at all).
    pub const UNSUPPORTED_COMPRESSION: &str = "vmctl::image::unsupported_compression";
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
    /// The image must not be opened: it refers to a file outside itself
    /// (which a guest would then read), or is a format whose references
    /// vmctl does not check. Nothing was cached.
    #[error("Image {image} is refused")]
    Refused {
        /// The URL or path.
        image: String,
        /// Why.
        #[source]
        reason: Refusal,
    },
    /// The URL names a compression or archive vmctl does not unpack
    /// (refused before downloading), or a local image file is compressed.
    #[error("Image {image} is {what}")]
    Compressed {
        /// The URL or path.
        image: String,
        /// What it is (`bzip2-compressed`, `a tar archive`).
        what: String,
        /// Whether vmctl would unpack it from a URL.
        unpackable: bool,
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
            ImageError::Download {
                source: DownloadError::Unusable(_),
                ..
            }
            | ImageError::Compressed { .. } => codes::UNSUPPORTED_COMPRESSION,
            ImageError::Download { .. } => codes::DOWNLOAD_FAILED,
            ImageError::ChecksumMismatch { .. } => codes::CHECKSUM_MISMATCH,
            ImageError::Refused { reason: r, .. } => match r {
                Refusal::BackingFile(_) => codes::BACKING_FILE,
                Refusal::External { .. } => codes::EXTERNAL_REFERENCE,
                Refusal::Format(_) | Refusal::Features(_) => codes::UNSUPPORTED_FORMAT,
            },
            ImageError::Format { .. } => codes::FORMAT_DETECTION_FAILED,
            ImageError::Cache { .. } => codes::CACHE_FAILED,
        }
    }

    /// Whether trying again, unchanged, can succeed: a transient download
    /// failure, a full or unwritable cache, a local file not there yet,
    /// qemu-img not runnable. A 4xx answer, a checksum mismatch, a refused
    /// or unusable image, a bad URL or checksum can not: they wait for the
    /// spec (or the file at the URL) to change.
    pub fn is_transient(&self) -> bool {
        match self {
            ImageError::Download { source, .. } => source.is_transient(),
            ImageError::NotFound(_) | ImageError::Unreadable { .. } | ImageError::Cache { .. } => {
                true
            }
            ImageError::Format { source, .. } => matches!(
                source,
                InspectError::Spawn(_) | InspectError::Timeout(_) | InspectError::Read(_)
            ),
            ImageError::InvalidChecksum(_)
            | ImageError::UnsupportedUrl(_)
            | ImageError::ChecksumMismatch { .. }
            | ImageError::Refused { .. }
            | ImageError::Compressed { .. } => false,
        }
    }

    /// What the user can do about it.
    pub fn help(&self) -> Option<&'static str> {
        Some(match self {
            ImageError::NotFound(_) => "check the Image's source path (it must be absolute)",
            ImageError::Unreadable { .. } => "make the file readable by the agent's user",
            ImageError::InvalidChecksum(_) => "write checksum as sha256:<hex> or sha512:<hex>",
            ImageError::UnsupportedUrl(_) => "use an http(s) or file URL, or a path source",
            ImageError::Download {
                source: DownloadError::Unusable(_),
                ..
            } => UNPACK_HELP,
            ImageError::Download { source, .. } if source.is_transient() => {
                "check the URL and the network; it is retried with backoff"
            }
            ImageError::Download { .. } => {
                // Found by the new-user tryout: this said "fix the URL (or
                // the server), then apply again", but an unchanged apply
                // changes nothing and a refused download is not retried.
                "the server refused it: fix the URL and apply again; once the server serves it, `vmctl image pull` with the same URL fetches it again (an unchanged apply does not)"
            }
            ImageError::ChecksumMismatch { .. } => {
                "the file at the URL changed or the checksum is wrong: fix whichever is stale"
            }
            ImageError::Refused { reason: r, .. } => match r {
                Refusal::BackingFile(_) | Refusal::External { .. } => {
                    "use a self-contained image: `qemu-img convert -O qcow2 IN OUT` makes one"
                }
                Refusal::Format(_) | Refusal::Features(_) => {
                    "convert it to a plain qcow2: `qemu-img convert -O qcow2 IN OUT`"
                }
            },
            ImageError::Format { .. } => {
                "check that qemu-img is installed and the file is an image"
            }
            ImageError::Compressed {
                unpackable: true, ..
            } => {
                "decompress it first, or give it as a file:// URL: downloads are unpacked into the cache"
            }
            ImageError::Compressed { .. } => UNPACK_HELP,
            ImageError::Cache { .. } => return None,
        })
    }
}

/// [`inspect_untrusted`] of `path`, a refusal reported for `image` (its
/// URL or path).
pub(crate) async fn inspected(image: &str, path: &Path) -> Result<ImageInfo> {
    inspect_untrusted(path)
        .await
        .map_err(|source| match source {
            InspectError::Refused(reason) => ImageError::Refused {
                image: image.to_owned(),
                reason,
            },
            source => ImageError::Format {
                path: path.to_owned(),
                source,
            },
        })
}

const UNPACK_HELP: &str = "vmctl unpacks gzip (.gz), xz (.xz) and zstd (.zst); unpack other formats yourself and give the disk image inside";

/// Short for `Result<T, ImageError>`.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// A local path source: checks that it is a readable regular file, not
/// compressed, and safe to open ([`inspect_untrusted`]), and detects its
/// format.
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
    let mut head = Vec::with_capacity(compression::OUTPUT_MAGIC_LEN);
    {
        use tokio::io::AsyncReadExt;
        let f = tokio::fs::File::open(path).await.map_err(unreadable)?;
        f.take(compression::OUTPUT_MAGIC_LEN as u64)
            .read_to_end(&mut head)
            .await
            .map_err(unreadable)?;
    }
    let compressed = match compression::magic(&head) {
        compression::Magic::Plain => None,
        compression::Magic::Compressed(c) => Some((format!("{c}-compressed"), true)),
        compression::Magic::Unsupported(what) => Some((what.to_owned(), false)),
    };
    if let Some((what, unpackable)) = compressed {
        return Err(ImageError::Compressed {
            image: path.display().to_string(),
            what,
            unpackable,
        });
    }
    let info = inspected(&path.display().to_string(), path).await?;
    Ok(LocalImage {
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        format: info.format,
        size_bytes: meta.len(),
        virtual_size_bytes: Some(info.virtual_size),
        digest: None,
    })
}
