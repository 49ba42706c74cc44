//! Fetching against a real HTTP server on 127.0.0.1 and real `qemu-img`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256, Sha512};

use super::*;

/// A tiny HTTP/1.1 server: one thread per connection, `Connection: close`.
pub(crate) struct Server {
    base: String,
    log: Arc<Mutex<Vec<Request>>>,
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Request {
    target: String,
    range: Option<String>,
    if_range: Option<String>,
}

#[derive(Clone)]
pub(crate) enum Route {
    Body(Arc<Vec<u8>>),
    /// Announces the full length, sends half, closes.
    Truncated(Arc<Vec<u8>>),
    /// Sends in small pieces with pauses, so downloads overlap.
    Slow(Arc<Vec<u8>>),
    /// Always answers this status.
    Status(u16),
    /// The first `n` requests get `status`, the rest the body.
    FailFirst(usize, u16, Arc<Vec<u8>>),
    /// Offers ranges (with an ETag); the first request's body is cut in
    /// half, later ones honour `Range` + `If-Range`.
    CutThenRanged(Arc<Vec<u8>>),
    /// No ranges; the first request's body is cut in half.
    CutOnce(Arc<Vec<u8>>),
    /// Sends in `n` pieces, pausing between them.
    Paced(Arc<Vec<u8>>, usize, Duration),
}

impl Server {
    pub(crate) fn start(routes: HashMap<&'static str, Route>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let routes = Arc::new(routes);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (routes, seen) = (routes.clone(), seen.clone());
                std::thread::spawn(move || serve(conn, &routes, &seen));
            }
        });
        Server { base, log }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Requests made for `target` (path and query).
    pub(crate) fn requests(&self, target: &str) -> usize {
        self.log_of(target).len()
    }

    fn log_of(&self, target: &str) -> Vec<Request> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.target == target)
            .cloned()
            .collect()
    }
}

fn serve(conn: TcpStream, routes: &HashMap<&str, Route>, log: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (mut range, mut if_range) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_owned()),
                "if-range" => if_range = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    let nth = {
        let mut log = log.lock().unwrap();
        log.push(Request {
            target: target.clone(),
            range: range.clone(),
            if_range: if_range.clone(),
        });
        log.iter().filter(|r| r.target == target).count()
    };
    let path = target.split('?').next().unwrap();
    let mut conn = conn;
    let head = |status: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let status = |code: u16| {
        let body = format!("<html>error {code}</html>");
        format!("{}{body}", head(&format!("{code} X"), body.len()))
    };
    let _ = match routes.get(path) {
        None => conn.write_all(status(404).as_bytes()),
        Some(Route::Body(b)) => conn
            .write_all(head("200 OK", b.len()).as_bytes())
            .and_then(|()| conn.write_all(b)),
        Some(Route::Truncated(b)) => conn
            .write_all(head("200 OK", b.len()).as_bytes())
            .and_then(|()| conn.write_all(&b[..b.len() / 2])),
        Some(Route::Slow(b)) => conn
            .write_all(head("200 OK", b.len()).as_bytes())
            .and_then(|()| {
                for piece in b.chunks(b.len().div_ceil(10)) {
                    conn.write_all(piece)?;
                    conn.flush()?;
                    std::thread::sleep(Duration::from_millis(30));
                }
                Ok(())
            }),
        Some(Route::Status(code)) => conn.write_all(status(*code).as_bytes()),
        Some(Route::Paced(b, n, pause)) => conn
            .write_all(head("200 OK", b.len()).as_bytes())
            .and_then(|()| {
                for piece in b.chunks(b.len().div_ceil(*n)) {
                    conn.write_all(piece)?;
                    conn.flush()?;
                    std::thread::sleep(*pause);
                }
                Ok(())
            }),
        Some(Route::FailFirst(n, code, _)) if nth <= *n => conn.write_all(status(*code).as_bytes()),
        Some(Route::FailFirst(_, _, b)) => conn
            .write_all(head("200 OK", b.len()).as_bytes())
            .and_then(|()| conn.write_all(b)),
        Some(Route::CutOnce(b)) => conn
            .write_all(head("200 OK", b.len()).as_bytes())
            .and_then(|()| conn.write_all(if nth == 1 { &b[..b.len() / 2] } else { b })),
        Some(Route::CutThenRanged(b)) => {
            let etag = "\"v1\"";
            let from = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|_| if_range.as_deref() == Some(etag));
            match from {
                Some(from) => conn
                    .write_all(
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\nConnection: close\r\n\r\n",
                            b.len() - from,
                            b.len() - 1,
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| conn.write_all(&b[from..])),
                None => conn
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| conn.write_all(if nth == 1 { &b[..b.len() / 2] } else { b })),
            }
        }
    };
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// Fast retries, so that tests of them take milliseconds.
pub(crate) const FAST_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    base: Duration::from_millis(10),
};

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    qcow2: Arc<Vec<u8>>,
    zst: Arc<Vec<u8>>,
    server: Server,
    cache: ImageCache,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let path = dir.join("disk.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let qcow2 = Arc::new(std::fs::read(&path).unwrap());
    let zst = Arc::new(zstd::encode_all(&qcow2[..], 3).unwrap());
    let routes = HashMap::from([
        ("/disk.qcow2", Route::Body(qcow2.clone())),
        ("/disk.qcow2.zst", Route::Body(zst.clone())),
        ("/truncated.qcow2", Route::Truncated(qcow2.clone())),
        ("/slow.qcow2", Route::Slow(qcow2.clone())),
        (
            "/garbage.zst",
            Route::Body(Arc::new(b"not zstd at all".to_vec())),
        ),
        ("/broken.zst", Route::Body(Arc::new(broken_zstd(&zst)))),
        ("/disk.qcow2.gz", Route::Body(Arc::new(gzip(&qcow2)))),
        ("/disk.qcow2.xz", Route::Body(Arc::new(xz(&qcow2)))),
        // Compressed, but the URL does not say so (or says another one).
        ("/download", Route::Body(Arc::new(gzip(&qcow2)))),
        ("/mislabelled.qcow2.gz", Route::Body(Arc::new(xz(&qcow2)))),
        (
            "/disk.img.bz2",
            Route::Body(Arc::new(b"BZh91AY&SY".to_vec())),
        ),
        (
            "/bzip2-download",
            Route::Body(Arc::new(b"BZh91AY&SY....".to_vec())),
        ),
        ("/disk.tar.gz", Route::Body(Arc::new(gzip(&tar_of(&qcow2))))),
        ("/forbidden.qcow2", Route::Status(403)),
        ("/down.qcow2", Route::Status(503)),
        ("/flaky.qcow2", Route::FailFirst(2, 500, qcow2.clone())),
        ("/cut-ranged.qcow2", Route::CutThenRanged(qcow2.clone())),
        ("/cut-once.qcow2", Route::CutOnce(qcow2.clone())),
    ]);
    Fixture {
        server: Server::start(routes),
        cache: ImageCache::new(dir.join("images")).with_retry(FAST_RETRY),
        qcow2,
        zst,
        dir,
        _tmp: tmp,
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// zstd's magic, then a frame that does not decode.
fn broken_zstd(good: &[u8]) -> Vec<u8> {
    let mut b = good[..8].to_vec();
    b.extend(std::iter::repeat_n(0xa5, 4096));
    b
}

/// A one-file tar archive (as Vagrant boxes and OVAs are).
fn tar_of(data: &[u8]) -> Vec<u8> {
    let mut header = vec![0u8; 512];
    header[..9].copy_from_slice(b"disk.img\0");
    header[257..263].copy_from_slice(b"ustar\0");
    header.extend_from_slice(data);
    header
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn sha512(b: &[u8]) -> String {
    format!("sha512:{}", hex::encode(Sha512::digest(b)))
}

fn no_progress(_: Progress) {}

/// Nothing but (possibly) an empty entry directory.
fn assert_nothing_cached(cache: &ImageCache, url: &str) {
    let dir = cache.entry_dir(url);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
}

#[tokio::test]
async fn downloads_and_detects_qcow2() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    let seen = Mutex::new(Vec::new());
    let img = f
        .cache
        .fetch(&url, None, |p| seen.lock().unwrap().push(p))
        .await
        .unwrap();
    assert_eq!(img.format, "qcow2");
    assert_eq!(img.virtual_size_bytes, Some(64 << 20));
    assert_eq!(img.size_bytes, f.qcow2.len() as u64);
    assert_eq!(img.digest, Some(sha256(&f.qcow2)));
    assert_eq!(img.path, f.cache.entry_dir(&url).join("image"));
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.cache.entry_dir(&url).join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["url"], url.as_str());
    assert_eq!(meta["format"], "qcow2");
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() <= 21, "progress is coarse: {seen:?}");
    assert_eq!(seen.last().unwrap().bytes, f.qcow2.len() as u64);
    assert_eq!(f.cache.lookup(&url, None).await.unwrap(), Some(img));
}

#[tokio::test]
async fn checksums_sha256_and_sha512_are_verified() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    let img = f
        .cache
        .fetch(&url, Some(&sha256(&f.qcow2)), no_progress)
        .await
        .unwrap();
    assert_eq!(img.format, "qcow2");
    let url = f.server.url("/disk.qcow2?sha512");
    f.cache
        .fetch(&url, Some(&sha512(&f.qcow2)), no_progress)
        .await
        .unwrap();
    // Both digests are recorded: either algorithm is a cache hit.
    f.cache
        .fetch(&url, Some(&sha256(&f.qcow2)), no_progress)
        .await
        .unwrap();
    assert_eq!(f.server.requests("/disk.qcow2?sha512"), 1);
}

#[tokio::test]
async fn checksum_mismatch_names_both_digests_and_caches_nothing() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = f
        .cache
        .fetch(&url, Some(&wrong), no_progress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), codes::CHECKSUM_MISMATCH);
    let msg = err.to_string();
    assert!(msg.contains(&wrong), "{msg}");
    assert!(msg.contains(&sha256(&f.qcow2)), "{msg}");
    assert_nothing_cached(&f.cache, &url);
    assert_eq!(f.cache.lookup(&url, None).await.unwrap(), None);
}

#[tokio::test]
async fn cached_entry_with_another_digest_is_downloaded_again() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    f.cache.fetch(&url, None, no_progress).await.unwrap();
    let wrong = format!("sha512:{}", "0".repeat(128));
    let err = f
        .cache
        .fetch(&url, Some(&wrong), no_progress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), codes::CHECKSUM_MISMATCH);
    assert_eq!(f.server.requests("/disk.qcow2"), 2);
    // The old, valid entry is untouched.
    assert!(f.cache.lookup(&url, None).await.unwrap().is_some());
}

#[tokio::test]
async fn http_404_fails_naming_status_and_url_and_caches_nothing() {
    let f = fixture();
    let url = f.server.url("/missing.qcow2");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::DOWNLOAD_FAILED);
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("404") && chain.contains(&url), "{chain}");
    assert_nothing_cached(&f.cache, &url);
}

/// The fault (new-user tryout): a 404's advice was "fix the URL (or the
/// server), then apply again", but an unchanged apply changes nothing and
/// a refused download is not retried: the advice names `vmctl image pull`.
#[tokio::test]
async fn a_refused_download_advises_image_pull_not_an_apply_that_changes_nothing() {
    let f = fixture();
    let url = f.server.url("/missing.qcow2");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert!(!err.is_transient());
    let help = err.help().unwrap();
    assert!(help.contains("vmctl image pull"), "{help}");
    assert!(!help.contains("or the server), then apply again"), "{help}");
}

#[tokio::test]
async fn truncated_body_is_retried_then_fails_as_transient_and_caches_nothing() {
    let f = fixture();
    let url = f.server.url("/truncated.qcow2");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Download {
                source: DownloadError::Truncated { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient(), "a cut body can succeed next time");
    assert_eq!(
        f.server.requests("/truncated.qcow2"),
        FAST_RETRY.attempts as usize
    );
    assert_nothing_cached(&f.cache, &url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_url_make_one_request() {
    let f = fixture();
    let url = f.server.url("/slow.qcow2");
    let sum = sha256(&f.qcow2);
    let (a, b, c) = tokio::join!(
        f.cache.fetch(&url, None, no_progress),
        f.cache.fetch(&url, None, no_progress),
        f.cache.fetch(&url, Some(&sum), no_progress),
    );
    let a = a.unwrap();
    assert_eq!(a, b.unwrap());
    assert_eq!(a, c.unwrap());
    assert_eq!(f.server.requests("/slow.qcow2"), 1);
    assert!(f.cache.locks.lock().unwrap().is_empty());
}

#[tokio::test]
async fn second_fetch_is_a_cache_hit_and_a_changed_url_downloads_again() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    let first = f.cache.fetch(&url, None, no_progress).await.unwrap();
    let second = f.cache.fetch(&url, None, no_progress).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(f.server.requests("/disk.qcow2"), 1);

    let changed = f.server.url("/disk.qcow2?v=2");
    let third = f.cache.fetch(&changed, None, no_progress).await.unwrap();
    assert_eq!(f.server.requests("/disk.qcow2?v=2"), 1);
    assert_ne!(third.path, first.path);
}

#[tokio::test]
async fn zst_is_decompressed_and_its_checksum_is_of_the_compressed_bytes() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2.zst");
    assert_ne!(*f.zst, *f.qcow2);
    let img = f
        .cache
        .fetch(&url, Some(&sha512(&f.zst)), no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);
    assert_eq!(img.format, "qcow2");
    assert_eq!(img.size_bytes, f.qcow2.len() as u64);
    assert_eq!(img.digest, Some(sha256(&f.zst)));
}

#[tokio::test]
async fn invalid_zstd_fails_and_caches_nothing() {
    let f = fixture();
    let url = f.server.url("/broken.zst");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Download {
                source: DownloadError::Decompress(Compression::Zstd, _),
                ..
            }
        ),
        "{err:?}"
    );
    assert_nothing_cached(&f.cache, &url);
}

#[tokio::test]
async fn leftover_partial_file_is_never_a_cache_hit() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    let dir = f.cache.entry_dir(&url);
    std::fs::create_dir_all(&dir).unwrap();
    // What a crash mid-download leaves, and a crash between the image's
    // rename and meta.json.
    std::fs::write(dir.join(".partial-abc123"), &f.qcow2[..100]).unwrap();
    std::fs::write(dir.join("image"), &f.qcow2[..100]).unwrap();
    assert_eq!(f.cache.lookup(&url, None).await.unwrap(), None);
    let img = f.cache.fetch(&url, None, no_progress).await.unwrap();
    assert_eq!(f.server.requests("/disk.qcow2"), 1);
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);
    assert!(!dir.join(".partial-abc123").exists());
}

#[tokio::test]
async fn meta_of_another_url_is_not_a_hit() {
    let f = fixture();
    let url = f.server.url("/disk.qcow2");
    let other = f.server.url("/disk.qcow2?other");
    f.cache.fetch(&url, None, no_progress).await.unwrap();
    // A key collision (or a moved directory) must not serve another URL.
    std::fs::rename(f.cache.entry_dir(&url), f.cache.entry_dir(&other)).unwrap();
    assert_eq!(f.cache.lookup(&other, None).await.unwrap(), None);
}

#[tokio::test]
async fn file_urls_are_copied_and_verified() {
    let f = fixture();
    let src = f.dir.join("disk.qcow2");
    let url = format!("file://{}", src.display());
    let img = f
        .cache
        .fetch(&url, Some(&sha256(&f.qcow2)), no_progress)
        .await
        .unwrap();
    assert_eq!(img.format, "qcow2");
    assert_ne!(img.path, src);

    let zpath = f.dir.join("disk.qcow2.zstd");
    std::fs::write(&zpath, &*f.zst).unwrap();
    let img = f
        .cache
        .fetch(&format!("file://{}", zpath.display()), None, no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);

    let missing = format!("file://{}", f.dir.join("nope").display());
    let err = f
        .cache
        .fetch(&missing, None, no_progress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), codes::DOWNLOAD_FAILED);
    assert_nothing_cached(&f.cache, &missing);
}

#[tokio::test]
async fn local_paths_are_checked_and_inspected() {
    let f = fixture();
    let img = local(f.dir.join("disk.qcow2")).await.unwrap();
    assert_eq!(img.format, "qcow2");
    assert_eq!(img.size_bytes, f.qcow2.len() as u64);
    assert_eq!(img.digest, None);

    let err = local(f.dir.join("nope.qcow2")).await.unwrap_err();
    assert_eq!(err.code(), codes::NOT_FOUND);
    let err = local(&f.dir).await.unwrap_err();
    assert!(matches!(err, ImageError::Unreadable { .. }), "{err:?}");
}

#[tokio::test]
async fn ensure_dispatches_on_the_source() {
    let f = fixture();
    let by_path: vmctl_api::ImageSpec = serde_json::from_value(serde_json::json!({
        "source": {"path": f.dir.join("disk.qcow2")},
    }))
    .unwrap();
    assert_eq!(
        f.cache.ensure(&by_path, no_progress).await.unwrap().format,
        "qcow2"
    );
    let by_url: vmctl_api::ImageSpec = serde_json::from_value(serde_json::json!({
        "source": {"url": f.server.url("/disk.qcow2")},
        "checksum": sha256(&f.qcow2),
    }))
    .unwrap();
    assert_eq!(f.cache.lookup_spec(&by_url).await.unwrap(), None);
    let img = f.cache.ensure(&by_url, no_progress).await.unwrap();
    assert_eq!(f.cache.lookup_spec(&by_url).await.unwrap(), Some(img));
    let driver_image: crate::drivers::LocalImage = local(Path::new(&f.dir).join("disk.qcow2"))
        .await
        .unwrap()
        .into();
    assert_eq!(driver_image.format, "qcow2");
}

// ---- Compressed images are unpacked, never used as raw disks (issue 18, item 6)

#[tokio::test]
async fn compressed_image_url_is_not_used_as_a_raw_disk() {
    let f = fixture();
    for path in [
        "/disk.qcow2.gz",
        "/disk.qcow2.xz",
        "/disk.qcow2.zst",
        "/download",
        "/mislabelled.qcow2.gz",
    ] {
        let url = f.server.url(path);
        let img = f.cache.fetch(&url, None, no_progress).await.unwrap();
        assert_eq!(img.format, "qcow2", "{path}");
        assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2, "{path}");
    }
}

#[tokio::test]
async fn unsupported_compression_is_refused_clearly_before_or_after_download() {
    let f = fixture();
    // By suffix: refused without a request.
    let url = f.server.url("/disk.img.bz2");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::UNSUPPORTED_COMPRESSION);
    assert!(!err.is_transient());
    assert!(err.to_string().contains("bzip2"), "{err}");
    assert_eq!(f.server.requests("/disk.img.bz2"), 0);
    // By magic.
    let url = f.server.url("/bzip2-download");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::UNSUPPORTED_COMPRESSION);
    assert!(vmctl_api::error_chain(&err).contains("bzip2"), "{err:?}");
    assert!(err.help().unwrap().contains("gzip"));
    assert_eq!(f.server.requests("/bzip2-download"), 1, "not retried");
    assert_nothing_cached(&f.cache, &url);
}

#[tokio::test]
async fn archive_inside_compression_is_refused_not_used_as_raw() {
    let f = fixture();
    let url = f.server.url("/disk.tar.gz");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::UNSUPPORTED_COMPRESSION);
    assert!(
        vmctl_api::error_chain(&err).contains("a tar archive inside gzip"),
        "{}",
        vmctl_api::error_chain(&err)
    );
    assert_nothing_cached(&f.cache, &url);
}

#[tokio::test]
async fn compressed_suffix_without_compressed_data_is_refused() {
    let f = fixture();
    let url = f.server.url("/garbage.zst");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Download {
                source: DownloadError::Unusable(Unusable::NotCompressed {
                    expected: Compression::Zstd
                }),
                ..
            }
        ),
        "{err:?}"
    );
    assert_nothing_cached(&f.cache, &url);
}

#[tokio::test]
async fn local_compressed_image_is_refused_not_used_as_raw() {
    let f = fixture();
    let gz = f.dir.join("disk.qcow2.gz");
    std::fs::write(&gz, gzip(&f.qcow2)).unwrap();
    let err = local(&gz).await.unwrap_err();
    assert_eq!(err.code(), codes::UNSUPPORTED_COMPRESSION);
    assert!(err.to_string().contains("gzip-compressed"), "{err}");
    assert!(err.help().unwrap().contains("file://"));
}

// ---- Images that refer outside themselves are refused (issue 18, item 7)

fn qemu_img(args: &[&str]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img {args:?}");
}

/// Hostile images made with qemu-img, each pointing at `secret`.
struct Hostile {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    cache: ImageCache,
}

impl Hostile {
    fn new() -> Hostile {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
        std::fs::write(dir.join("secret.raw"), vec![b's'; 1 << 20]).unwrap();
        let secret = p("secret.raw");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={secret}"),
            &p("data-file.qcow2"),
            "1M",
        ]);
        std::fs::write(dir.join("secret.raw"), vec![b's'; 1 << 20]).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &secret,
            "-F",
            "raw",
            &p("backing.qcow2"),
        ]);
        // A vmdk whose descriptor names the secret as its (flat) extent.
        std::fs::write(
            dir.join("extents.vmdk"),
            format!("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{secret}\" 0\n"),
        )
        .unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &p("stream.vmdk"),
            "1M",
        ]);
        qemu_img(&["create", "-q", "-f", "vdi", &p("disk.vdi"), "1M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", &p("clean.qcow2"), "1M"]);
        std::fs::write(dir.join("clean.raw"), vec![0u8; 1 << 20]).unwrap();
        // crypt_method (header offset 32) set: an encrypted qcow2, made
        // without qemu-img's seconds of key stretching.
        let mut enc = std::fs::read(dir.join("clean.qcow2")).unwrap();
        enc[35] = 2;
        std::fs::write(dir.join("encrypted.qcow2"), enc).unwrap();
        Hostile {
            cache: ImageCache::new(dir.join("images")).with_retry(FAST_RETRY),
            dir,
            _tmp: tmp,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("file://{}", self.dir.join(name).display())
    }
}

#[tokio::test]
async fn downloaded_qcow2_with_external_data_file_is_refused() {
    let h = Hostile::new();
    let url = h.url("data-file.qcow2");
    let err = h.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::EXTERNAL_REFERENCE, "{err:?}");
    let chain = vmctl_api::error_chain(&err);
    assert!(
        chain.contains("external data file") && chain.contains("secret.raw"),
        "{chain}"
    );
    assert!(!err.is_transient());
    assert_nothing_cached(&h.cache, &url);
}

#[tokio::test]
async fn downloaded_image_with_a_backing_file_is_refused() {
    let h = Hostile::new();
    let url = h.url("backing.qcow2");
    let err = h.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::BACKING_FILE);
    assert!(vmctl_api::error_chain(&err).contains("secret.raw"));
    assert_nothing_cached(&h.cache, &url);
}

#[tokio::test]
async fn downloaded_vmdk_with_extents_is_refused_whatever_the_format() {
    let h = Hostile::new();
    for name in ["extents.vmdk", "stream.vmdk", "disk.vdi", "encrypted.qcow2"] {
        let url = h.url(name);
        let err = h.cache.fetch(&url, None, no_progress).await.unwrap_err();
        assert_eq!(err.code(), codes::UNSUPPORTED_FORMAT, "{name}: {err:?}");
        assert!(err.help().unwrap().contains("qemu-img convert"));
        assert_nothing_cached(&h.cache, &url);
    }
}

#[tokio::test]
async fn local_images_that_refer_outside_themselves_are_refused_too() {
    let h = Hostile::new();
    for (name, code) in [
        ("data-file.qcow2", codes::EXTERNAL_REFERENCE),
        ("backing.qcow2", codes::BACKING_FILE),
        ("extents.vmdk", codes::UNSUPPORTED_FORMAT),
    ] {
        let err = local(h.dir.join(name)).await.unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err:?}");
    }
}

#[tokio::test]
async fn safe_images_keep_their_probed_format() {
    let h = Hostile::new();
    let img = h
        .cache
        .fetch(&h.url("clean.qcow2"), None, no_progress)
        .await
        .unwrap();
    assert_eq!(img.format, "qcow2");
    let img = h
        .cache
        .fetch(&h.url("clean.raw"), None, no_progress)
        .await
        .unwrap();
    assert_eq!(img.format, "raw");
    assert_eq!(img.virtual_size_bytes, Some(1 << 20));
    assert_eq!(
        local(h.dir.join("clean.qcow2")).await.unwrap().format,
        "qcow2"
    );
}

// ---- Downloads retry what can succeed, and only that (issue 18, item 15)

#[tokio::test]
async fn http_403_is_not_retried_and_is_terminal() {
    let f = fixture();
    let url = f.server.url("/forbidden.qcow2");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::DOWNLOAD_FAILED);
    assert!(!err.is_transient());
    assert!(vmctl_api::error_chain(&err).contains("403"));
    assert!(err.help().unwrap().contains("refused"), "{:?}", err.help());
    assert_eq!(f.server.requests("/forbidden.qcow2"), 1);
}

#[tokio::test]
async fn transient_500_fails_the_fetch_as_transient_for_the_controller_to_retry() {
    let f = fixture();
    let url = f.server.url("/flaky.qcow2");
    // Each failed request is one visible retry of the Image controller.
    for _ in 0..2 {
        let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(vmctl_api::error_chain(&err).contains("500"));
        assert!(err.help().unwrap().contains("retried"));
    }
    assert_eq!(f.server.requests("/flaky.qcow2"), 2);
    let img = f.cache.fetch(&url, None, no_progress).await.unwrap();
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);
    assert_eq!(f.server.requests("/flaky.qcow2"), 3);
    let url = f.server.url("/down.qcow2");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert!(err.is_transient());
    assert_eq!(f.server.requests("/down.qcow2"), 1);
    assert_nothing_cached(&f.cache, &url);
}

#[tokio::test]
async fn truncated_body_is_resumed_with_range() {
    let f = fixture();
    let url = f.server.url("/cut-ranged.qcow2");
    let img = f
        .cache
        .fetch(&url, Some(&sha256(&f.qcow2)), no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);
    let log = f.server.log_of("/cut-ranged.qcow2");
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].range, None);
    let half = f.qcow2.len() / 2;
    assert_eq!(
        log[1].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(log[1].if_range.as_deref(), Some("\"v1\""));
}

#[tokio::test]
async fn truncated_body_without_ranges_starts_over() {
    let f = fixture();
    let url = f.server.url("/cut-once.qcow2");
    let img = f
        .cache
        .fetch(&url, Some(&sha256(&f.qcow2)), no_progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&img.path).unwrap(), *f.qcow2);
    let log = f.server.log_of("/cut-once.qcow2");
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|r| r.range.is_none()));
}
