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
struct Server {
    base: String,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

#[derive(Clone)]
enum Route {
    Body(Arc<Vec<u8>>),
    /// Announces the full length, sends half, closes.
    Truncated(Arc<Vec<u8>>),
    /// Sends in small pieces with pauses, so downloads overlap.
    Slow(Arc<Vec<u8>>),
}

impl Server {
    fn start(routes: HashMap<&'static str, Route>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let counts = requests.clone();
        let routes = Arc::new(routes);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (routes, counts) = (routes.clone(), counts.clone());
                std::thread::spawn(move || serve(conn, &routes, &counts));
            }
        });
        Server { base, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn requests(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn serve(conn: TcpStream, routes: &HashMap<&str, Route>, counts: &Mutex<HashMap<String, usize>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    *counts.lock().unwrap().entry(target.clone()).or_default() += 1;
    let path = target.split('?').next().unwrap();
    let mut conn = conn;
    let head = |status: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let _ = match routes.get(path) {
        None => {
            let body = b"<html>no such image</html>";
            conn.write_all(head("404 Not Found", body.len()).as_bytes())
                .and_then(|()| conn.write_all(body))
        }
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
    };
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

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
    ]);
    Fixture {
        server: Server::start(routes),
        cache: ImageCache::new(dir.join("images")),
        qcow2,
        zst,
        dir,
        _tmp: tmp,
    }
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

#[tokio::test]
async fn truncated_body_fails_and_caches_nothing() {
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
    let url = f.server.url("/garbage.zst");
    let err = f.cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ImageError::Download {
                source: DownloadError::Decompress(_),
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
async fn downloaded_image_with_a_backing_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.qcow2");
    let top = tmp.path().join("top.qcow2");
    for args in [
        vec!["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"],
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
            "-u",
            top.to_str().unwrap(),
            "1M",
        ],
    ] {
        assert!(
            std::process::Command::new("qemu-img")
                .args(&args)
                .status()
                .unwrap()
                .success()
        );
    }
    let cache = ImageCache::new(tmp.path().join("images"));
    let url = format!("file://{}", top.display());
    let err = cache.fetch(&url, None, no_progress).await.unwrap_err();
    assert_eq!(err.code(), codes::BACKING_FILE);
    assert_nothing_cached(&cache, &url);
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
