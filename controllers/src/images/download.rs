//! Streams a source (http(s) or `file://`) into a temporary file next to
//! its final place, hashing the bytes as received and decompressing zstd
//! on the way.
//!
//! ```text
//!   async: response.chunk() ──mpsc(8)──▶ blocking: hash ─▶ [zstd] ─▶ .partial-XXXX ─▶ fsync
//!            │
//!            └─ progress (coarse)
//! ```
//!
//! Writing happens on a blocking thread so that hashing, decompression and
//! disk writes never stall the runtime. The bounded channel makes a slow
//! disk slow the download down rather than buffer it in memory. The temp
//! file deletes itself when dropped, so an error or a cancelled fetch
//! leaves nothing behind but what a crash leaves: a `.partial-*` file that
//! the cache never treats as an image and removes on its next download.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tempfile::NamedTempFile;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use vmctl_api::Progress;

use super::checksum::{Digests, Hasher};

/// Prefix of temporary files in a cache entry.
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";

/// Progress is reported at most this often…
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// …or when another 1/PROGRESS_STEPS of the total is done.
const PROGRESS_STEPS: u64 = 20;

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
    /// The data is not valid zstd, or ends inside a frame.
    #[error("Cannot decompress zstd data")]
    Decompress(#[source] std::io::Error),
    /// Creating, writing or syncing the temporary file failed.
    #[error("Cannot write the temporary file")]
    Write(#[source] std::io::Error),
    /// The writer thread stopped without a result (it panicked).
    #[error("The writer stopped unexpectedly")]
    WriterLost,
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
}

enum Msg {
    Chunk(Bytes),
    End,
}

/// Downloads `source` into a new temp file in `dir`.
pub(crate) async fn download(
    client: &reqwest::Client,
    source: &Source,
    dir: &Path,
    zstd: bool,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Downloaded, DownloadError> {
    let file = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempfile_in(dir)
        .map_err(DownloadError::Write)?;
    let (tx, rx) = mpsc::channel(8);
    let writer = tokio::task::spawn_blocking(move || write_all(rx, file, zstd));
    let produced = match source {
        Source::Http(url) => produce_http(client, url, &tx, progress).await,
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
        (Ok(downloaded), Ok(Ok((file, digests, written)))) => Ok(Downloaded {
            file,
            digests,
            downloaded,
            written,
        }),
        // The producer stopped because the writer failed: report why.
        (Err(None), Ok(Err(e))) | (Ok(_), Ok(Err(e))) => Err(e),
        (Err(Some(e)), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(None), Ok(Ok(_))) => Err(DownloadError::WriterLost),
    }
}

/// `Err(None)`: the writer hung up (it has the real error).
type Produced = Result<u64, Option<DownloadError>>;

async fn produce_http(
    client: &reqwest::Client,
    url: &str,
    tx: &mpsc::Sender<Msg>,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Produced {
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| Some(DownloadError::Request(e)))?;
    if !resp.status().is_success() {
        // The body is never read: an error page must not become an image.
        return Err(Some(DownloadError::Status(resp.status())));
    }
    let total = resp.content_length();
    let mut reporter = Reporter::new(progress, total);
    let mut received = 0u64;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                received += chunk.len() as u64;
                tx.send(Msg::Chunk(chunk)).await.map_err(|_| None)?;
                reporter.update(received);
            }
            Ok(None) => break,
            Err(source) => {
                return Err(Some(match total {
                    Some(expected) if received < expected => {
                        DownloadError::Truncated { received, expected }
                    }
                    _ => DownloadError::Body { received, source },
                }));
            }
        }
    }
    if let Some(expected) = total
        && received != expected
    {
        return Err(Some(DownloadError::Truncated { received, expected }));
    }
    reporter.finish(received);
    Ok(received)
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
    Ok(received)
}

enum Out {
    Plain(BufWriter<NamedTempFile>),
    Zstd(zstd::stream::write::Decoder<'static, BufWriter<NamedTempFile>>),
}

/// A zstd decoder reports its own errors without an OS error code; disk
/// errors of the file beneath it have one.
fn decoder_error(e: std::io::Error) -> DownloadError {
    if e.raw_os_error().is_some() {
        DownloadError::Write(e)
    } else {
        DownloadError::Decompress(e)
    }
}

fn write_all(
    mut rx: mpsc::Receiver<Msg>,
    file: NamedTempFile,
    zstd: bool,
) -> Result<(NamedTempFile, Digests, u64), DownloadError> {
    let buffered = BufWriter::with_capacity(1 << 20, file);
    let mut out = if zstd {
        Out::Zstd(zstd::stream::write::Decoder::new(buffered).map_err(DownloadError::Write)?)
    } else {
        Out::Plain(buffered)
    };
    let mut hasher = Hasher::default();
    loop {
        match rx.blocking_recv() {
            Some(Msg::Chunk(chunk)) => {
                hasher.update(&chunk);
                match &mut out {
                    Out::Plain(w) => w.write_all(&chunk).map_err(DownloadError::Write)?,
                    Out::Zstd(w) => w.write_all(&chunk).map_err(decoder_error)?,
                }
            }
            Some(Msg::End) => break,
            // The producer failed or was cancelled; dropping `out` deletes
            // the temp file. The error it sees is its own.
            None => return Err(DownloadError::WriterLost),
        }
    }
    let buffered = match out {
        Out::Plain(w) => w,
        Out::Zstd(w) => w.finish().map_err(decoder_error)?,
    };
    let file = buffered
        .into_inner()
        .map_err(|e| DownloadError::Write(e.into_error()))?;
    file.as_file().sync_all().map_err(DownloadError::Write)?;
    let written = file
        .as_file()
        .metadata()
        .map_err(DownloadError::Write)?
        .len();
    Ok((file, hasher.finish(), written))
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
