//! Streams a source (http(s) or `file://`) into a temporary file next to
//! its final place, hashing the bytes as received and decompressing them
//! on the way (see [`super::compression`]).
//!
//! ```text
//!   async: response.chunk() ──mpsc(8)──▶ blocking: hash ─▶ [gzip|xz|zstd] ─▶ .partial-XXXX ─▶ fsync
//!            │   └─ transient failure: wait, resume with Range (or Restart)
//!            └─ progress (coarse)
//! ```
//!
//! Writing happens on a blocking thread so that hashing, decompression and
//! disk writes never stall the runtime. The bounded channel makes a slow
//! disk slow the download down rather than buffer it in memory. The temp
//! file deletes itself when dropped, so an error or a cancelled fetch
//! leaves nothing behind but what a crash leaves: a `.partial-*` file that
//! the cache never treats as an image and removes on its next download.
//!
//! A transfer interrupted after some bytes came in (a body cut short, a
//! reset, or a transient answer to the request resuming it) is retried
//! within the download with exponential backoff, [`RetryPolicy::attempts`]
//! requests in all. When the server offers ranges (`Accept-Ranges: bytes`
//! and an `ETag` or `Last-Modified` to send back as `If-Range`), it resumes
//! where it stopped; otherwise it starts over. A request that fails before
//! any byte ends the download with its error, which says whether it may
//! pass ([`DownloadError::is_transient`]: 5xx, 408, 429, connection errors)
//! for the Image controller to retry with backoff, shown in the status; a
//! 4xx or unusable data is final.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT_RANGES, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use tempfile::NamedTempFile;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use vmctl_api::Progress;

use super::checksum::{Digests, Hasher};
use super::compression::{self, Compression, Decoder, INPUT_MAGIC_LEN, Unusable};

/// Prefix of temporary files in a cache entry.
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";

/// Progress is reported at most this often…
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// …or when another 1/PROGRESS_STEPS of the total is done.
const PROGRESS_STEPS: u64 = 20;

/// How one download retries an interrupted transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Requests made at most, the first included (≥ 1).
    pub attempts: u32,
    /// The wait before the first retry; each further one doubles it.
    pub base: Duration,
}

impl Default for RetryPolicy {
    /// Four requests, 1 s, 2 s and 4 s apart. Anything longer is the
    /// Image controller's to back off from.
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, retry: u32) -> Duration {
        self.base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
    }
}

/// Errors of downloading one source.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The request could not be sent or its response head not read.
    #[error("Request failed")]
    Request(#[source] reqwest::Error),
    /// The server answered with a status other than 2xx.
    #[error("Server answered {0}")]
    Status(reqwest::StatusCode),
    /// The body ended before the announced Content-Length.
    #[error("Response truncated: got {received} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        received: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// Reading the response body failed.
    #[error("Reading the response failed after {received} bytes")]
    Body {
        /// Bytes received before the failure.
        received: u64,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// Reading a `file://` source failed.
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The data is not valid for its compression, or ends inside a frame.
    #[error("Cannot decompress {0} data")]
    Decompress(Compression, #[source] std::io::Error),
    /// The data is not something vmctl can use as a disk image (an
    /// archive, a compression it does not unpack).
    #[error("Not a usable disk image: {0}")]
    Unusable(#[source] Unusable),
    /// Creating, writing or syncing the temporary file failed.
    #[error("Cannot write the temporary file")]
    Write(#[source] std::io::Error),
    /// The writer thread stopped without a result (it panicked).
    #[error("The writer stopped unexpectedly")]
    WriterLost,
}

impl DownloadError {
    /// Whether trying again can succeed: a 5xx, 408 or 429 answer, a
    /// connection or transfer failure, a body cut short, a full disk.
    /// A 4xx answer, unusable data, a missing `file://` source can not.
    pub fn is_transient(&self) -> bool {
        match self {
            DownloadError::Request(_)
            | DownloadError::Truncated { .. }
            | DownloadError::Body { .. }
            | DownloadError::Write(_)
            | DownloadError::WriterLost => true,
            DownloadError::Status(s) => {
                s.is_server_error()
                    || *s == StatusCode::REQUEST_TIMEOUT
                    || *s == StatusCode::TOO_MANY_REQUESTS
            }
            DownloadError::Read(..)
            | DownloadError::Decompress(..)
            | DownloadError::Unusable(_) => false,
        }
    }
}

/// Where bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// An http(s) URL.
    Http(String),
    /// A local file named by a `file://` URL.
    File(PathBuf),
}

/// A completed download, not yet in its final place.
#[derive(Debug)]
pub(crate) struct Downloaded {
    /// The temporary file, synced; deleted if dropped.
    pub file: NamedTempFile,
    /// Digests of the bytes as downloaded (before decompression).
    pub digests: Digests,
    /// Bytes downloaded.
    pub downloaded: u64,
    /// Bytes written (after decompression).
    pub written: u64,
    /// The compression that was unpacked.
    pub compression: Compression,
    /// Requests made (1 unless transient failures were retried).
    pub attempts: u32,
}

enum Msg {
    Chunk(Bytes),
    /// Drop what was received so far: the next chunks start the data anew.
    Restart,
    End,
}

/// Downloads `source` into a new temp file in `dir`. `named` is the
/// compression the URL's suffix names.
pub(crate) async fn download(
    client: &reqwest::Client,
    source: &Source,
    dir: &Path,
    named: Compression,
    retry: RetryPolicy,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Downloaded, DownloadError> {
    let (tx, rx) = mpsc::channel(8);
    let writer_dir = dir.to_owned();
    let writer = tokio::task::spawn_blocking(move || write_all(rx, writer_dir, named));
    let produced = match source {
        Source::Http(url) => produce_http(client, url, retry, &tx, progress).await,
        Source::File(path) => produce_file(path, &tx, progress).await,
    };
    let produced = match produced {
        Ok(n) => tx.send(Msg::End).await.map(|()| n).map_err(|_| None),
        Err(e) => Err(e),
    };
    drop(tx);
    // Always wait for the writer: its temp file must be gone (or complete)
    // before the caller looks at the cache entry.
    let written = writer.await.map_err(|_| DownloadError::WriterLost);
    match (produced, written) {
        (Ok((downloaded, attempts)), Ok(Ok(w))) => Ok(Downloaded {
            file: w.file,
            digests: w.digests,
            downloaded,
            written: w.written,
            compression: w.compression,
            attempts,
        }),
        // The producer stopped because the writer failed: report why.
        (Err(None), Ok(Err(e))) | (Ok(_), Ok(Err(e))) => Err(e),
        (Err(Some(e)), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(None), Ok(Ok(_))) => Err(DownloadError::WriterLost),
    }
}

/// `Ok((bytes, requests))`; `Err(None)`: the writer hung up (it has the
/// real error).
type Produced = Result<(u64, u32), Option<DownloadError>>;

/// What lets an interrupted body be resumed: the validator to send back
/// as `If-Range`.
fn resume_validator(resp: &reqwest::Response) -> Option<reqwest::header::HeaderValue> {
    let h = resp.headers();
    let ranges = h
        .get(ACCEPT_RANGES)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("bytes"));
    if !ranges {
        return None;
    }
    // A weak ETag cannot be used with If-Range (RFC 9110 13.1.5).
    h.get(ETAG)
        .filter(|v| !v.as_bytes().starts_with(b"W/"))
        .or_else(|| h.get(LAST_MODIFIED))
        .cloned()
}

/// The first byte a 206 answer carries, from `Content-Range: bytes a-b/n`.
fn range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

async fn produce_http(
    client: &reqwest::Client,
    url: &str,
    retry: RetryPolicy,
    tx: &mpsc::Sender<Msg>,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Produced {
    let mut received = 0u64;
    let mut total = None;
    let mut validator = None;
    let mut reporter: Option<Reporter<'_>> = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = http_attempt(
            client,
            url,
            tx,
            progress,
            &mut reporter,
            &mut received,
            &mut total,
            &mut validator,
        )
        .await;
        match result {
            Ok(()) => {
                if let Some(r) = reporter.as_mut() {
                    r.finish(received);
                }
                return Ok((received, attempt));
            }
            // Only a transfer that got somewhere is retried here (resumed or
            // restarted at once, without losing what it has); a request that
            // fails outright is the Image controller's to retry, visibly.
            Err(Some(e)) if e.is_transient() && received > 0 && attempt < retry.attempts.max(1) => {
                let delay = retry.delay(attempt);
                tracing::warn!(
                    url,
                    attempt,
                    received,
                    resume = validator.is_some(),
                    ?delay,
                    error = %vmctl_api::error_chain(&e),
                    "download interrupted; retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One request: continues at `received` when a validator allows it, and
/// otherwise restarts the data from byte 0.
#[allow(clippy::too_many_arguments)]
async fn http_attempt<'p>(
    client: &reqwest::Client,
    url: &str,
    tx: &mpsc::Sender<Msg>,
    progress: &'p (dyn Fn(Progress) + Send + Sync),
    reporter: &mut Option<Reporter<'p>>,
    received: &mut u64,
    total: &mut Option<u64>,
    validator: &mut Option<reqwest::header::HeaderValue>,
) -> Result<(), Option<DownloadError>> {
    let mut req = client.get(url);
    let resuming = *received > 0 && validator.is_some();
    if resuming && let Some(v) = validator.as_ref() {
        req = req
            .header(RANGE, format!("bytes={received}-"))
            .header(IF_RANGE, v.clone());
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| Some(DownloadError::Request(e)))?;
    let status = resp.status();
    let continued =
        resuming && status == StatusCode::PARTIAL_CONTENT && range_start(&resp) == Some(*received);
    if !continued {
        if !status.is_success() || status == StatusCode::PARTIAL_CONTENT {
            // The body is never read: an error page must not become an
            // image. (A 206 for a range not asked for is not usable either.)
            return Err(Some(DownloadError::Status(status)));
        }
        if *received > 0 {
            tx.send(Msg::Restart).await.map_err(|_| None)?;
            *received = 0;
        }
        *total = resp.content_length();
        *validator = resume_validator(&resp);
        match reporter {
            Some(r) => r.restart(*total),
            None => *reporter = Some(Reporter::new(progress, *total)),
        }
    }
    let reporter = reporter.as_mut().expect("set above");
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                *received += chunk.len() as u64;
                tx.send(Msg::Chunk(chunk)).await.map_err(|_| None)?;
                reporter.update(*received);
            }
            Ok(None) => break,
            Err(source) => {
                return Err(Some(match *total {
                    Some(expected) if *received < expected => DownloadError::Truncated {
                        received: *received,
                        expected,
                    },
                    _ => DownloadError::Body {
                        received: *received,
                        source,
                    },
                }));
            }
        }
    }
    if let Some(expected) = *total
        && *received != expected
    {
        return Err(Some(DownloadError::Truncated {
            received: *received,
            expected,
        }));
    }
    Ok(())
}

async fn produce_file(
    path: &Path,
    tx: &mpsc::Sender<Msg>,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Produced {
    let read_err = |e| Some(DownloadError::Read(path.to_owned(), e));
    let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
    let total = file.metadata().await.map_err(read_err)?.len();
    let mut reporter = Reporter::new(progress, Some(total));
    let mut received = 0u64;
    loop {
        let mut buf = vec![0u8; 256 << 10];
        let n = file.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        received += n as u64;
        tx.send(Msg::Chunk(Bytes::from(buf)))
            .await
            .map_err(|_| None)?;
        reporter.update(received);
    }
    reporter.finish(received);
    Ok((received, 1))
}

/// What the writer made.
struct Written {
    file: NamedTempFile,
    digests: Digests,
    written: u64,
    compression: Compression,
}

/// The receiving end: hashes everything, picks the decoder once the first
/// bytes are in, writes the decoded data to a temp file.
struct Writer {
    dir: PathBuf,
    named: Compression,
    hasher: Hasher,
    head: Vec<u8>,
    out: Option<(Compression, Decoder<BufWriter<NamedTempFile>>)>,
}

impl Writer {
    fn new(dir: PathBuf, named: Compression) -> Self {
        Writer {
            dir,
            named,
            hasher: Hasher::default(),
            head: Vec::with_capacity(INPUT_MAGIC_LEN),
            out: None,
        }
    }

    /// A decoder error: ours (unusable data), the disk's (it has an OS
    /// error code), or the decoder's (bad data).
    fn error(c: Compression, e: std::io::Error) -> DownloadError {
        if let Some(u) = Unusable::from_io(&e) {
            DownloadError::Unusable(u)
        } else if e.raw_os_error().is_some() {
            DownloadError::Write(e)
        } else {
            DownloadError::Decompress(c, e)
        }
    }

    fn open(&mut self) -> Result<(), DownloadError> {
        let c = compression::decide(&self.head, self.named).map_err(DownloadError::Unusable)?;
        let file = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(DownloadError::Write)?;
        let mut dec = Decoder::new(c, BufWriter::with_capacity(1 << 20, file))
            .map_err(DownloadError::Write)?;
        let head = std::mem::take(&mut self.head);
        dec.write_all(&head).map_err(|e| Self::error(c, e))?;
        self.out = Some((c, dec));
        Ok(())
    }

    fn write(&mut self, chunk: &[u8]) -> Result<(), DownloadError> {
        self.hasher.update(chunk);
        match &mut self.out {
            Some((c, dec)) => dec.write_all(chunk).map_err(|e| Self::error(*c, e)),
            None => {
                self.head.extend_from_slice(chunk);
                if self.head.len() >= INPUT_MAGIC_LEN {
                    self.open()?;
                }
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<Written, DownloadError> {
        if self.out.is_none() {
            self.open()?;
        }
        let (c, dec) = self.out.take().expect("opened above");
        let buffered = dec.finish().map_err(|e| Self::error(c, e))?;
        let file = buffered
            .into_inner()
            .map_err(|e| DownloadError::Write(e.into_error()))?;
        file.as_file().sync_all().map_err(DownloadError::Write)?;
        let written = file
            .as_file()
            .metadata()
            .map_err(DownloadError::Write)?
            .len();
        Ok(Written {
            file,
            digests: self.hasher.finish(),
            written,
            compression: c,
        })
    }
}

fn write_all(
    mut rx: mpsc::Receiver<Msg>,
    dir: PathBuf,
    named: Compression,
) -> Result<Written, DownloadError> {
    let mut w = Writer::new(dir.clone(), named);
    loop {
        match rx.blocking_recv() {
            Some(Msg::Chunk(chunk)) => w.write(&chunk)?,
            // Dropping the old writer deletes its temp file.
            Some(Msg::Restart) => w = Writer::new(dir.clone(), named),
            Some(Msg::End) => break,
            // The producer failed or was cancelled; dropping `w` deletes
            // the temp file. The error it sees is its own.
            None => return Err(DownloadError::WriterLost),
        }
    }
    w.finish()
}

/// Calls the progress function coarsely: at the start, at most once per
/// [`PROGRESS_INTERVAL`] or [`PROGRESS_STEPS`]th of the total, and at the
/// end, so a status is never rewritten per chunk.
struct Reporter<'a> {
    f: &'a (dyn Fn(Progress) + Send + Sync),
    total: Option<u64>,
    last_at: Instant,
    last_step: u64,
}

impl<'a> Reporter<'a> {
    fn new(f: &'a (dyn Fn(Progress) + Send + Sync), total: Option<u64>) -> Self {
        f(Progress { bytes: 0, total });
        Reporter {
            f,
            total,
            last_at: Instant::now(),
            last_step: 0,
        }
    }

    /// The data starts over (a retry the server would not resume).
    fn restart(&mut self, total: Option<u64>) {
        self.total = total;
        self.last_step = 0;
        self.last_at = Instant::now();
        (self.f)(Progress { bytes: 0, total });
    }

    fn step(&self, bytes: u64) -> u64 {
        match self.total {
            Some(t) if t > 0 => bytes.saturating_mul(PROGRESS_STEPS) / t,
            _ => 0,
        }
    }

    fn update(&mut self, bytes: u64) {
        let step = self.step(bytes);
        if step > self.last_step || self.last_at.elapsed() >= PROGRESS_INTERVAL {
            self.last_step = step;
            self.last_at = Instant::now();
            (self.f)(Progress {
                bytes,
                total: self.total,
            });
        }
    }

    fn finish(&mut self, bytes: u64) {
        if self.last_step < PROGRESS_STEPS {
            (self.f)(Progress {
                bytes,
                total: self.total,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn progress_is_coarse() {
        let seen = Mutex::new(Vec::new());
        let f = |p: Progress| seen.lock().unwrap().push(p.bytes);
        let mut r = Reporter::new(&f, Some(1_000_000));
        for b in (0..=1_000_000).step_by(1000) {
            r.update(b);
        }
        r.finish(1_000_000);
        let seen = seen.into_inner().unwrap();
        // Start, 20 steps of 5%, nothing more (the end is the 20th step).
        assert_eq!(seen.len(), 21, "{seen:?}");
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&1_000_000));
    }

    #[test]
    fn progress_without_total_reports_start_and_end() {
        let seen = Mutex::new(Vec::new());
        let f = |p: Progress| seen.lock().unwrap().push((p.bytes, p.total));
        let mut r = Reporter::new(&f, None);
        for b in 0..1000 {
            r.update(b);
        }
        r.finish(1000);
        assert_eq!(seen.into_inner().unwrap(), vec![(0, None), (1000, None)]);
    }
}
